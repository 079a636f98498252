"""The TensorRT emulator (tests/trt_emulator.py) has exactly TensorRT's API: every public method, property and
attribute of every emulated class exists in tensorrt-stubs (the 10.13 Python API) with the same parameter
names, and the fake CUDA wrapper matches the installed polygraphy.cuda. So tests passing on the emulator
call TensorRT the way TensorRT is called. The stubs come from `.ci/typecheck` (.cache/trt-stubs)."""
from __future__ import annotations

import ast
import enum
import inspect
import os
import textwrap
from functools import lru_cache
from pathlib import Path

import pytest

from tests import trt_emulator as emu

ROOT = Path(__file__).resolve().parent.parent
STUBS = Path(os.environ.get("SPECTRT_TRT_STUBS", ROOT / ".cache" / "trt-stubs"))
BINDINGS = STUBS / "tensorrt_bindings" / "tensorrt.pyi"

pytestmark = pytest.mark.skipif(not BINDINGS.is_file(), reason="tensorrt-stubs not installed (run .ci/typecheck)")


@lru_cache(maxsize=None)
def stub_classes() -> dict[str, ast.ClassDef]:
    tree = ast.parse(BINDINGS.read_text())
    return {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}


def stub_members(cls: ast.ClassDef) -> dict[str, list[ast.AST]]:
    """name -> definitions (overloads, properties, annotated attributes, nested classes), bases included."""
    out: dict[str, list[ast.AST]] = {}
    for base in cls.bases:
        name = ast.unparse(base)
        if name in stub_classes():
            for k, v in stub_members(stub_classes()[name]).items():
                out.setdefault(k, []).extend(v)
    for node in cls.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            out.setdefault(node.name, []).append(node)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            out.setdefault(node.target.id, []).append(node)
    return out


def params(args: list[str], defaults: int) -> tuple[list[str], int]:
    """(parameter names without self, number of required ones)."""
    names = [a for a in args if a not in ("self", "this")]
    return names, len(names) - defaults


def stub_signatures(defs: list[ast.AST]) -> list[tuple[list[str], int]]:
    return [params([a.arg for a in d.args.posonlyargs + d.args.args], len(d.args.defaults))
            for d in defs if isinstance(d, ast.FunctionDef)]


def fake_signature(fn) -> tuple[list[str], int]:
    sig = inspect.signature(fn)
    ps = [p for p in sig.parameters.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return params([p.name for p in ps], sum(p.default is not p.empty for p in ps))


def public_instance_attributes(cls) -> set[str]:
    """``self.x = ...`` targets in the class's methods (public ones only)."""
    found = set()
    for fn in vars(cls).values():
        if inspect.isfunction(fn):
            tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
            for node in ast.walk(tree):
                if (isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store)
                        and isinstance(node.value, ast.Name) and node.value.id == "self" and not node.attr.startswith("_")):
                    found.add(node.attr)
    return found


def check_class(fake, stub: ast.ClassDef, where: str) -> list[str]:
    members = stub_members(stub)
    problems = []
    if isinstance(fake, type) and issubclass(fake, enum.Enum):
        return [f"{where}.{m}: not in the stubs" for m in fake.__members__ if m not in members]
    for name, value in vars(fake).items():
        if name.startswith("_") and name != "__init__" or name == "__init__" and "__init__" not in members:
            continue  # objects only TensorRT creates: their constructors are internal (mypy flags user calls)
        if name not in members:
            problems.append(f"{where}.{name}: not in the stubs")
        elif isinstance(value, type):
            problems += check_class(value, next(d for d in members[name] if isinstance(d, ast.ClassDef)),
                                    f"{where}.{name}")
        elif isinstance(value, property):
            if not any(isinstance(d, ast.AnnAssign) or any(ast.unparse(x) == "property" for x in d.decorator_list)
                       for d in members[name] if isinstance(d, (ast.AnnAssign, ast.FunctionDef))):
                problems.append(f"{where}.{name}: a property here, not in the stubs")
        elif inspect.isfunction(value):
            got = fake_signature(value)
            sigs = stub_signatures(members[name])
            if not any(got[0] == names and got[1] <= required for names, required in sigs):
                problems.append(f"{where}.{name}{tuple(got[0])}: the stubs have {[tuple(n) for n, _ in sigs]}")
    for attr in public_instance_attributes(fake):
        if attr not in members:
            problems.append(f"{where}.{attr}: attribute not in the stubs")
    return problems


@pytest.mark.parametrize("fake", emu.TENSORRT_API, ids=lambda c: c.__name__)
def test_emulated_tensorrt_class_matches_stubs(fake):
    assert fake.__name__ in stub_classes(), f"tensorrt has no class {fake.__name__}"
    assert check_class(fake, stub_classes()[fake.__name__], f"tensorrt.{fake.__name__}") == []


def test_emulated_tensorrt_module_matches_stubs():
    exported = set()
    for f in (STUBS / "tensorrt" / "__init__.pyi", STUBS / "tensorrt_bindings" / "__init__.pyi"):
        for node in ast.parse(f.read_text()).body:
            if isinstance(node, ast.ImportFrom):
                exported |= {a.asname or a.name for a in node.names}
            elif isinstance(node, ast.FunctionDef):
                exported.add(node.name)
                if node.name == "nptype":
                    assert fake_signature(emu.nptype) == params([a.arg for a in node.args.args], 0)
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                exported.add(node.target.id)
    missing = [c.__name__ for c in emu.TENSORRT_API if c.__name__ not in exported]
    assert missing == [] and {"nptype", "__version__"} <= exported


@pytest.mark.parametrize("fake", emu.CUDA_API, ids=lambda c: c.__name__)
def test_emulated_cuda_matches_polygraphy(fake):
    from polygraphy.cuda import cuda as real_module

    real = getattr(real_module, fake.__name__)
    problems = []
    for name, value in vars(fake).items():
        if name.startswith("_") and name not in ("__init__", "__enter__", "__exit__"):
            continue
        if not hasattr(real, name):
            problems.append(f"{fake.__name__}.{name}: polygraphy has no such member")
        elif inspect.isfunction(value):
            want = fake_signature(inspect.unwrap(getattr(real, name)))
            if fake_signature(value) != want:
                problems.append(f"{fake.__name__}.{name}{fake_signature(value)}: polygraphy has {want}")
        elif isinstance(getattr(real, name), type(value)) is False:
            problems.append(f"{fake.__name__}.{name}: polygraphy's is a {type(getattr(real, name)).__name__}")
    assert problems == []


def test_checker_catches_drift():
    """The comparison itself works: a misspelled method and a wrong parameter list are reported."""

    class IExecutionContext:
        def set_tensor_adress(self, name, memory):
            pass

        def set_input_shape(self, name):
            pass

    problems = check_class(IExecutionContext, stub_classes()["IExecutionContext"], "x")
    assert any("set_tensor_adress" in p for p in problems) and any("set_input_shape" in p for p in problems)


def test_type_check_catches_a_misspelled_method_and_a_wrong_argument_count(tmp_path):
    """What .ci/typecheck guards: mypy against the stubs rejects a misspelled TensorRT method and a call with
    the wrong number of arguments, and accepts the correct calls."""
    import subprocess
    import sys

    pytest.importorskip("mypy")
    code = textwrap.dedent("""
        import tensorrt as trt

        def run(ctx: trt.IExecutionContext, stream: int) -> None:
            ctx.set_tensor_address("input_ids", 256)
            ctx.set_input_shape("input_ids", (1, 8))
            ctx.execute_async_v3(stream)
        """)
    bad = code.replace("set_tensor_address", "set_tensor_adress").replace("execute_async_v3(stream)",
                                                                         "execute_async_v3()")
    (tmp_path / "mypy.ini").write_text(  # the stub sections of the project's mypy.ini
        "[mypy]\npython_version = 3.10\nfollow_imports = silent\n"
        "[mypy-tensorrt.*,tensorrt_bindings.*]\nignore_errors = True\n"
        "[mypy-tensorrt_libs]\nignore_missing_imports = True\n")
    results = {}
    for name, src in (("good", code), ("bad", bad)):
        (tmp_path / f"{name}.py").write_text(src)
        results[name] = subprocess.run(
            [sys.executable, "-m", "mypy", "--config-file", str(tmp_path / "mypy.ini"), "--cache-dir",
             str(tmp_path / "cache"), str(tmp_path / f"{name}.py")],
            capture_output=True, text=True, env={**os.environ, "MYPYPATH": str(STUBS)}, cwd=tmp_path)
    assert results["good"].returncode == 0, results["good"].stdout
    out = results["bad"].stdout
    assert results["bad"].returncode == 1
    assert '"IExecutionContext" has no attribute "set_tensor_adress"' in out, out
    assert 'Missing positional argument "stream_handle"' in out or "Too few arguments" in out, out
