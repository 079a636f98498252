"""`spectrt selftest`: the golden file written at export, and the device acceptance run against it (ONNX
Runtime here, and TensorRT through the strict emulator of tests/trt_emulator.py)."""
from __future__ import annotations

import dataclasses
import json

import pytest

from spectrt.cli import main
from spectrt.runtime.artifact import file_record, load_artifact, write_manifest
from spectrt.runtime.golden import (GOLDEN, REFERENCE_RUN, TIE_MARGIN, TORCH_RUN, Golden, GoldenRun, compare,
                                    load_golden, write_golden)
from spectrt.runtime.session import SessionConfig, SpecSession
from tests import trt_emulator
from tests.tiny_artifact import SMALL


def _copy(src, tmp_path):
    import shutil

    dst = tmp_path / "art"
    shutil.copytree(src, dst)
    return dst


def _rewrite_golden(root, golden: Golden) -> None:
    """Replace golden.json and its manifest record (so the sha256 check still passes)."""
    art = load_artifact(root)
    write_golden(root, golden)
    write_manifest(root, dataclasses.replace(art.manifest, golden=file_record(root, GOLDEN)))


def _run(argv, capsys) -> tuple[int, dict, str]:
    code = main(argv)
    out = capsys.readouterr().out.strip().splitlines()
    return code, json.loads("\n".join(out[:-1])), out[-1]


def test_export_writes_a_golden_file_the_runtime_reproduces(medusa_export):
    art = load_artifact(medusa_export, verify_hashes=True)
    assert art.manifest.golden is not None and art.manifest.golden.path == GOLDEN
    golden = load_golden(art)
    assert set(golden.runs) == {REFERENCE_RUN, TORCH_RUN}
    with SpecSession(medusa_export, SessionConfig(mode="ar")) as s:
        got = [s.generate(list(ids), golden.max_new_tokens).tokens for ids in golden.prompt_ids]
    assert got == [list(t) for t in golden.reference.tokens]
    assert all(len(t) == len(m) and all(x >= 0 for x in m) for t, m in zip(golden.reference.tokens,
                                                                            golden.reference.margins))
    # the fp32 graphs and the fp32 torch model agree wherever the choice is not a near-tie
    assert not compare([list(t) for t in golden.runs[TORCH_RUN].tokens], golden.reference, TIE_MARGIN["float32"]).clear


def test_compare_tells_near_ties_from_clear_divergences():
    run = GoldenRun(tokens=((1, 2, 3), (4, 5)), margins=((5.0, 0.001, 5.0), (5.0, 5.0)))
    d = compare([[1, 9, 9], [4, 5]], run, 0.02)
    assert (d.matched, d.total, d.first, d.clear) == (3, 5, ((0, 1, 0.001),), ())
    d = compare([[1, 2, 3], [4, 7]], run, 0.02)
    assert d.clear == ((1, 1, 5.0),) and d.agreement == 4 / 5
    d = compare([[1, 2, 3, 8], [4, 5]], run, 0.02)  # went on where the reference stopped (a missed EOS)
    assert len(d.clear) == 1 and d.to_json()["divergences"][0]["margin"] is None
    assert compare([[1, 2, 3], [4, 5]], run, 0.02).agreement == 1.0


def test_selftest_passes_on_a_fresh_export(medusa_export, capsys):
    code, report, verdict = _run(["selftest", str(medusa_export), "--backend", "ort", "-q"], capsys)
    assert code == 0 and verdict.startswith("PASS") and report["pass"] is True
    names = {c["name"]: c["ok"] for c in report["checks"]}
    assert names == {"files": True, "tokenizer": True, "ort: ar == golden": True, "ort: speculative == ar": True}
    ort = report["backends"]["ort"]
    assert ort[REFERENCE_RUN]["agreement"] == 1.0 and ort["ar_tok_s"] > 0 and ort["spec_tok_s"] > 0


def test_selftest_fails_on_a_clear_divergence_and_reports_a_near_tie(medusa_export, tmp_path, capsys):
    root = _copy(medusa_export, tmp_path)
    golden = load_golden(load_artifact(root))
    ref = golden.reference
    tokens = [list(t) for t in ref.tokens]
    margins = [list(m) for m in ref.margins]
    tokens[0][1] = (tokens[0][1] + 1) % 64  # the device "chose" another token at prompt 0, token 1
    margins[0][1] = 10.0  # ... where the reference was sure
    bad = dataclasses.replace(golden, runs={**golden.runs, REFERENCE_RUN: GoldenRun(
        tuple(map(tuple, tokens)), tuple(map(tuple, margins)))})
    _rewrite_golden(root, bad)
    code, report, verdict = _run(["selftest", str(root), "--backend", "ort", "-q"], capsys)
    assert code == 1 and verdict.startswith("FAIL: ort: ar == golden: diverges at clear margins: prompt 0 token 1")
    margins[0][1] = 0.001  # the same divergence at a near-tie: reported, not failed
    tie = dataclasses.replace(bad, runs={**bad.runs, REFERENCE_RUN: GoldenRun(
        tuple(map(tuple, tokens)), tuple(map(tuple, margins)))})
    _rewrite_golden(root, tie)
    code, report, verdict = _run(["selftest", str(root), "--backend", "ort", "-q"], capsys)
    assert code == 0 and verdict.startswith("PASS")
    assert report["backends"]["ort"][REFERENCE_RUN]["divergences"] == [{"prompt": 0, "token": 1, "margin": 0.001}]


def test_selftest_fails_on_a_corrupt_file_and_needs_a_golden_file(medusa_export, tmp_path, capsys):
    root = _copy(medusa_export, tmp_path)
    data = bytearray((root / "base.onnx.data").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (root / "base.onnx.data").write_bytes(bytes(data))
    code, report, verdict = _run(["selftest", str(root), "--backend", "ort", "-q"], capsys)
    assert code == 1 and verdict.startswith("FAIL: files: ") and "sha256" in verdict
    root2 = tmp_path / "old"
    root2.mkdir()
    old = _copy(medusa_export, root2)
    art = load_artifact(old)
    write_manifest(old, dataclasses.replace(art.manifest, golden=None))
    assert main(["selftest", str(old), "--backend", "ort", "-q"]) == 2
    assert capsys.readouterr().err.strip() == f"spectrt selftest: error: {old}: no golden file (exported by an older " \
                                              "spectrt); re-export to get one"


def test_selftest_builds_missing_engines_and_compares_backends(medusa_export, tmp_path, monkeypatch, capsys):
    """With TensorRT (here the strict emulator): engines are built when missing, then ort and trt both pass
    and agree token for token."""
    trt_emulator.install(monkeypatch)
    root = _copy(medusa_export, tmp_path)
    small = tmp_path / "tiny-test.yaml"
    small.write_text(SMALL)
    assert not load_artifact(root).manifest.engines
    code, report, verdict = _run(["selftest", str(root), "--profile", str(small), "-q"], capsys)  # default: ort + trt
    assert code == 0 and verdict.startswith("PASS"), verdict
    assert set(report["backends"]) == {"ort", "trt"} and report["backends"]["trt"]["profile"] == "tiny-test"
    assert report["cross_backend"]["trt vs ort"]["agreement"] == 1.0
    assert {e.graph for e in load_artifact(root).manifest.engines.values()} == set(load_artifact(root).manifest.graphs)
