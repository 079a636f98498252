"""`spectrt profile`: timings on the tiny artifact (no timing asserts): Polygraphy's onnxruntime runner, and
spectrt's own TensorRT runners through the TensorRT emulator (tests/trt_emulator.py)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from spectrt.cli import main
from spectrt.profiles.timing import base_feeds, kv_feeds, random_tree_mask, shape_points
from tests import trt_emulator
from tests.tiny_artifact import SMALL, TINY_DIMS, write_tiny_artifact


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    return write_tiny_artifact(tmp_path_factory.mktemp("prof") / "tiny", max_context=256)


def test_feeds_follow_the_contract():
    rng = np.random.default_rng(0)
    mask, depth = random_tree_mask(9, rng)
    assert mask.diagonal().all() and mask[:, 0].all() and not np.triu(mask, 1).any()
    assert (depth == mask.sum(1) - 1).all()
    f = base_feeds(TINY_DIMS, "float32", q=4, past=10, phase="prefill", rng=rng)
    assert f["position_ids"].tolist() == [[10, 11, 12, 13]]
    assert f["tree_mask"].shape == (1, 4, 4) and f["tree_mask"].dtype == bool
    assert f["past_value.1"].shape == (10, 1, TINY_DIMS["kv_heads"], TINY_DIMS["head_dim"])
    assert f["input_ids"].dtype == np.int64 and f["input_ids"].max() < TINY_DIMS["vocab"]
    p = kv_feeds("hydra_prefix", TINY_DIMS, "float16", q=3, past=5, phase="observe", rng=rng)  # Hydra++ prefix layer
    assert sorted(p) == ["hidden_states", "past_key.0", "past_value.0", "position_ids", "tree_mask"]
    assert p["hidden_states"].shape == (1, 3, TINY_DIMS["hidden"]) and p["hidden_states"].dtype == np.float16
    assert p["past_key.0"].shape == (5, 1, TINY_DIMS["kv_heads"], TINY_DIMS["head_dim"])
    pts = shape_points(TINY_DIMS, max_context=256, prefill_chunk=64, max_tree_nodes=64)
    assert pts["verify_q"] == [1, 2, 4, 8, 16, 32, 64] and pts["prefill_q"][-1] == 64
    assert all(p + 64 <= 256 for p in pts["verify_past"])


def test_profile_ort_writes_json_and_png(art, tmp_path, capsys):
    out_json, png = tmp_path / "t.json", tmp_path / "curve.png"
    assert main(["profile", str(art), "--backend", "ort", "--iterations", "2", "--warmup", "1",
                 "--json", str(out_json), "--plot", str(png)]) == 0
    printed = capsys.readouterr().out
    assert "verify cost" in printed and "polygraphy run" in printed and "--onnxrt" in printed
    r = json.loads(out_json.read_text())
    assert r["backend"] == "ort" and r["iterations"] == 2
    phases = {(p["graph"], p["phase"]) for p in r["points"]}
    assert phases == {("base", "prefill"), ("base", "verify"), ("heads", "frontier"), ("draft_lm_head", "frontier")}
    for p in r["points"]:
        assert {"median_ms", "mean_ms", "min_ms", "p90_ms"} <= set(p) and p["median_ms"] > 0
    curve = r["verify_curve"]
    assert curve["q"] == [1, 2, 4, 8, 16, 32, 64]
    assert len(curve["series"]) >= 2 and all(len(s["median_ms"]) == len(curve["q"]) for s in curve["series"])
    assert len(r["commands"]) == 3
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_profile_bounded_by_device_profile(art, tmp_path):
    out_json = tmp_path / "t.json"
    assert main(["profile", str(art), "--profile", "orin-nano-8gb", "--graphs", "base", "--iterations", "1",
                 "--warmup", "0", "--json", str(out_json)]) == 0
    r = json.loads(out_json.read_text())
    nano_tree = 32
    assert max(p["q"] for p in r["points"] if p["phase"] == "verify") == nano_tree
    assert {p["graph"] for p in r["points"]} == {"base"}


def test_profile_trt_backend_needs_engines(art, capsys):
    assert main(["profile", str(art), "--backend", "trt", "--iterations", "1"]) == 2
    assert "no TensorRT engine" in capsys.readouterr().err


def test_profile_trt_times_the_runner_generate_uses(tmp_path, monkeypatch):
    """Defect 5: verify points run on the decode optimization profile (prefill chunks on prefill), the KV cache
    stays on the device (a call copies in only ids, positions and mask), and a YAML-path profile works (defect 6)."""
    emu = trt_emulator.install(monkeypatch)
    art_dir = write_tiny_artifact(tmp_path / "tiny", max_context=256)
    yaml = tmp_path / "tiny-test.yaml"
    yaml.write_text(SMALL)
    assert main(["build", str(art_dir), "--profile", str(yaml)]) == 0
    emu.executions.clear()
    h2d_before = emu.calls["H2D bytes"]
    out_json = tmp_path / "t.json"
    assert main(["profile", str(art_dir), "--backend", "trt", "--profile", str(yaml), "--iterations", "2",
                 "--warmup", "1", "--json", str(out_json)]) == 0
    r = json.loads(out_json.read_text())
    assert r["backend"] == "trt" and r["profile"] == "tiny-test"
    verify = [p for p in r["points"] if p["phase"] == "verify"]
    assert verify and max(p["q"] for p in verify) == 16 and max(p["past"] for p in verify) > 100
    assert max(p["q"] for p in r["points"] if p["phase"] == "prefill") == 32
    base = [e for e in emu.executions if e["graph"] == "base"]
    for e in base:
        q, past = e["shapes"]["input_ids"][1], e["shapes"]["past_key.0"][0]
        assert e["profile"] == (0 if q == 32 else 1), e  # decode profile for every q it was tuned for
    assert any(e["shapes"]["past_key.0"][0] > 100 for e in base if e["profile"] == 1)
    calls = 2 + 1  # iterations + warmup per point
    h2d = emu.calls["H2D bytes"] - h2d_before
    kv_row = 2 * TINY_DIMS["kv_heads"] * TINY_DIMS["head_dim"] * 4 * TINY_DIMS["num_layers"]
    past_kv = sum(p["past"] for p in verify) * kv_row * calls
    assert h2d < past_kv / 10  # inputs only: no past KV copied to the device per call
    assert {p["graph"] for p in r["points"]} == {"base", "heads", "draft_lm_head"}
