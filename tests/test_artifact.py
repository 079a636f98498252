"""The typed artifact: strict loading, one-line errors for damaged manifests, integrity, interfaces."""
from __future__ import annotations

import json
import shutil

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spectrt.cli import main
from spectrt.runtime.artifact import (FORMAT_VERSION, Manifest, load_artifact, parse_manifest, write_manifest)
from spectrt.runtime.errors import ArtifactError


@pytest.fixture(scope="module")
def pristine(tiny_exports, tmp_path_factory):
    """A Medusa-free tiny export whose manifest the tests mutate (copied per example)."""
    return tiny_exports["llama"]


def leaves(obj, path=()):
    """Every (path, value) in a JSON document, containers included (the root excluded)."""
    if path:
        yield path, obj
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from leaves(v, path + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from leaves(v, path + (i,))


def kind(v) -> str:
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, (int, float)):
        return "number"
    return type(v).__name__


SWAPS = ["lots", "30", 42, -3, 1.5, True, [], [1], {}, {"x": 1}]


def run(argv, capsys):
    code = main(argv)
    err = capsys.readouterr().err
    return code, err


def assert_clean(code, err, must_fail: bool):
    assert "Traceback" not in err
    if must_fail or code != 0:
        assert code == 2, err
        lines = [l for l in err.splitlines() if l.strip()]
        assert len(lines) == 1 and lines[0].startswith("spectrt "), err


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mutated_manifest_fields_give_one_line_errors(pristine, tmp_path_factory, capsys, data):
    """Type swaps, deletions and out-of-range values of any manifest field: `check` and `generate` exit 2 with
    one line (type swaps must fail), or still work (an optional field deleted); never a traceback."""
    doc = json.loads((pristine / "manifest.json").read_text())
    path, value = data.draw(st.sampled_from(list(leaves(doc))), label="field")
    how = data.draw(st.sampled_from(["swap", "delete", "range"]), label="mutation")
    parent = doc
    for k in path[:-1]:
        parent = parent[k]
    must_fail = False
    if how == "swap":
        new = data.draw(st.sampled_from([s for s in SWAPS if kind(s) != kind(value)]), label="new value")
        parent[path[-1]] = new
        # a list/dict element of a free-form map (dims values, sha256 strings) still has a fixed type; a
        # null may be an optional string or number (model.builtin "lots" is a well-typed name), so there
        # only the one-line-error-or-success rule holds
        must_fail = kind(value) != "NoneType" or kind(new) not in ("str", "number")
    elif how == "delete":
        if isinstance(parent, list):
            parent.pop(path[-1])
        else:
            del parent[path[-1]]
    else:
        parent[path[-1]] = data.draw(st.sampled_from([0, -1, 10 ** 12]), label="new value")
        # a number where a container or string was must fail; a null may be an optional number (a
        # sliding_window of 10**12 is valid), so there only the one-line-error-or-success rule holds
        must_fail = kind(value) not in ("number", "NoneType")
    root = tmp_path_factory.mktemp("mut") / "art"
    shutil.copytree(pristine, root)
    (root / "manifest.json").write_text(json.dumps(doc))
    for argv in (["check", str(root)], ["generate", str(root), "-p", "hi", "-n", "2", "--no-chat"]):
        code, err = run(argv, capsys)
        if argv[0] == "check" and code == 1:  # a graph finding (the manifest loaded): a report, not an error
            continue
        assert_clean(code, err, must_fail)


def test_named_field_errors(pristine, tmp_path):
    doc = json.loads((pristine / "manifest.json").read_text())
    cases = [
        ("max_context", "lots", "max_context: expected an integer, got \"lots\""),
        ("graphs", [], "graphs: expected an object"),
        ("model.num_layers", "30", "model.num_layers: expected an integer, got \"30\""),
        ("model", 42, "model: expected an object, got 42"),
        ("tokenizer.eos_token_ids", 2, "tokenizer.eos_token_ids: expected a list, got 2"),
        ("dtype", 16, "dtype: expected a string, got 16"),
        ("graphs.base.files.0.bytes", "538060032", "graphs.base.files[0].bytes: expected an integer"),
        ("max_context", -3, "max_context: must be in 2..1048576, got -3"),
        ("format", 1, "manifest format 1, this spectrt reads format 2"),
        ("graphs.base.kv_layout", "sideways", "kv_layout: 'sideways' is not one of token-major, in-place"),
        # a base graph's dim is the model's: 10**12 layers must not reach the KV allocation (it did: out of memory)
        ("graphs.base.dims.num_layers", 10 ** 12, "graphs.base.dims.num_layers: 1000000000000 disagrees with model.num_layers"),
    ]
    if "heads" in doc["graphs"]:
        cases.append(("graphs.heads.kv_layout", "in-place", "graphs.heads.kv_layout: 'in-place' exists for the base graph only"))
    for n, (field, value, message) in enumerate(cases):
        d = json.loads(json.dumps(doc))
        parent, keys = d, field.split(".")
        for k in keys[:-1]:
            parent = parent[int(k)] if isinstance(parent, list) else parent[k]
        parent[keys[-1]] = value
        with pytest.raises(ArtifactError) as e:
            root = tmp_path / f"case{n}"
            shutil.copytree(pristine, root)
            (root / "manifest.json").write_text(json.dumps(d))
            load_artifact(root)
        assert message in str(e.value) and "\n" not in str(e.value)


def test_roundtrip_and_refuses_to_write_invalid(pristine, tmp_path):
    m = load_artifact(pristine).manifest
    assert m.format == FORMAT_VERSION
    assert parse_manifest(json.loads(json.dumps(m.to_json()))) == m
    import dataclasses

    bad = dataclasses.replace(m, max_context=1)
    with pytest.raises(ArtifactError, match="invalid manifest: max_context"):
        write_manifest(tmp_path, bad)
    assert not (tmp_path / "manifest.json").exists()
    assert isinstance(m, Manifest)


def test_same_size_corruption_is_caught_by_check_and_verify(pristine, tmp_path, capsys):
    root = tmp_path / "art"
    shutil.copytree(pristine, root)
    data = root / "base.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # same size, one byte flipped in the weights
    data.write_bytes(bytes(raw))
    load_artifact(root)  # the cheap size check passes
    code, err = run(["check", str(root)], capsys)
    assert code == 2 and "sha256 differs" in err and len(err.strip().splitlines()) == 1
    code, err = run(["generate", str(root), "-p", "hi", "-n", "2", "--verify"], capsys)
    assert code == 2 and "sha256 differs" in err


def test_runners_and_drafters_conform_to_the_protocols():
    from spectrt.runtime import protocols
    from spectrt.runtime.drafters import MedusaDrafter, RootOnly
    from spectrt.runtime.hydra import HydraDrafter
    from spectrt.runtime.ort_runner import OrtBaseRunner, OrtGraphRunner, OrtPrefixRunner
    from spectrt.runtime.session import OrtRunners, TrtRunners
    from spectrt.runtime.trt_runner import TrtBaseRunner, TrtGraphRunner, TrtPrefixRunner

    def conforms(cls, proto) -> bool:
        wanted = {n for c in proto.__mro__ if c.__module__ == protocols.__name__ for n, v in vars(c).items()
                  if callable(v) and (not n.startswith("_") or n in ("__enter__", "__exit__", "__call__"))}
        return all(callable(getattr(cls, n, None)) for n in wanted)

    for cls in (OrtBaseRunner, TrtBaseRunner):
        assert conforms(cls, protocols.BaseRunner), cls
    for cls in (OrtPrefixRunner, TrtPrefixRunner):
        assert conforms(cls, protocols.PrefixRunner), cls
    for cls in (OrtGraphRunner, TrtGraphRunner):
        assert conforms(cls, protocols.GraphRunner), cls
    for cls in (RootOnly, MedusaDrafter, HydraDrafter):
        assert conforms(cls, protocols.Drafter), cls
    for cls in (OrtRunners, TrtRunners):
        assert all(callable(getattr(cls, m, None)) for m in ("base", "prefix", "graph")), cls


def test_kv_runner_state_after_enter(pristine):
    """Instances (not only classes) satisfy the runtime-checkable protocol, with past/max_q/max_context."""
    from spectrt.runtime.ort_runner import OrtBaseRunner
    from spectrt.runtime.protocols import BaseRunner

    import numpy as np

    with OrtBaseRunner(load_artifact(pristine), max_q=4) as r:
        assert isinstance(r, BaseRunner)
        r.forward(np.array([1, 2, 3]), np.arange(3), np.tri(3, dtype=np.bool_))
        r.commit([0, 1, 2])
        assert r.past == 3
        r.rollback(2)
        assert r.past == 1
        with pytest.raises(Exception, match="strictly increasing"):
            r.forward(np.array([1, 2]), np.arange(1, 3), np.tri(2, dtype=np.bool_))
            r.commit([1, 0])
