"""`spectrt profile`: timings with Polygraphy's onnxruntime runner on the tiny artifact (no timing asserts)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from spectrt.cli import main
from spectrt.profiles.tiny import TINY_DIMS, write_tiny_artifact
from spectrt.profiles.timing import base_feeds, random_tree_mask, shape_points


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
