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
        assert cmd.strip() in ci, f"README command not run verbatim by .ci/run: {cmd}"


def test_contract_doc_in_sync():
    from spectrt.runtime.contract import describe

    assert (ROOT / "docs" / "CONTRACT.md").read_text() == describe() + "\n"
