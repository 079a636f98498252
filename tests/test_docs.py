"""The README's two commands are what CI runs, and the contract doc is generated from the code."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_commands_are_ci_commands():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Two commands", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"```bash\n(.+?)\n```", section, re.S)
    assert len(commands) == 2
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    for cmd in commands:
        assert f"{cmd.strip()} || exit 1" in ci, f"README command not run verbatim (and checked) by .ci/run: {cmd}"


def test_contract_doc_in_sync():
    from spectrt.runtime.contract import describe

    assert (ROOT / "docs" / "CONTRACT.md").read_text() == describe() + "\n"


def test_every_package_is_installed():
    """pyproject lists packages explicitly (package-dir mapping): a new subpackage must be added there."""
    import tomllib

    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed, dirs = set(cfg["packages"]), cfg["package-dir"]
    for name, folder in dirs.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            if "__pycache__" in rel.parts or any(p.startswith(".") for p in rel.parts):
                continue
            package = ".".join((name, *rel.parts))
            assert package in listed, f"{package} ({init.parent}) is not in pyproject's packages"
