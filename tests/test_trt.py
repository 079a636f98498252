"""TensorRT build + runner. CPU: the pure parts (precision plans, trtexec lines, engine records, KV
compaction plans, dry-run builds). GPU (@pytest.mark.gpu): real engines of the tiny artifact, compared
with onnxruntime; skipped where tensorrt or a CUDA GPU is missing."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import numpy as np
import pytest

from spectrt.cli import main
from spectrt.profiles import load_profile, optimization_profiles
from spectrt.profiles.build import (EngineError, build_record, check_engine_record, engine_path, load_engine_bytes,
                                    plan_precision, trtexec_command, uses_strong_typing)
from spectrt.profiles.tiny import TINY_DIMS, write_tiny_artifact
from spectrt.runtime.errors import SpectrtError
from spectrt.runtime.manifest import load_artifact
from spectrt.runtime.trt_runner import compaction_plan

HAS_TRT = importlib.util.find_spec("tensorrt") is not None
NANO = load_profile("orin-nano-8gb")
THOR = load_profile("agx-thor")


# ----------------------------------------------------------------------------------------------- CPU


def test_precision_plans_weak_and_strong_typing():
    assert not uses_strong_typing("10.3.0.30") and uses_strong_typing("10.12.0.36") and uses_strong_typing("11.0")
    p = plan_precision("fp16", NANO, "float32", "10.3.0.30")
    assert p.flags == ("FP16",) and not p.strongly_typed
    assert plan_precision("fp32", NANO, "float32", "10.3").flags == ()
    with pytest.raises(SpectrtError, match="fp8 is not available on orin-nano-8gb"):
        plan_precision("fp8", NANO, "float16", "10.3")
    with pytest.raises(SpectrtError, match="explicitly quantized"):
        plan_precision("int8", NANO, "float32", "10.3", has_qdq=False)
    assert plan_precision("int8", NANO, "float32", "10.3", has_qdq=True).flags == ("INT8", "FP16")
    # TensorRT >= 10.12: precision comes from the ONNX
    s = plan_precision("fp16", THOR, "float16", "10.13.0")
    assert s.strongly_typed and s.flags == ()
    with pytest.raises(SpectrtError, match="export float16 graphs"):
        plan_precision("fp16", THOR, "float32", "10.13.0")
    with pytest.raises(SpectrtError, match="fp4 needs TensorRT >= 10.8"):
        plan_precision("fp4", THOR, "float16", "10.3", has_qdq=True)


def test_trtexec_command_has_every_profile_and_flag(tmp_path):
    profs = optimization_profiles("base", NANO, TINY_DIMS, 256)
    plan = plan_precision("fp16", NANO, "float32", "10.3")
    cmd = trtexec_command(tmp_path / "base.onnx", tmp_path / "engines/base.orin-nano-8gb.engine", profs, plan, NANO,
                          timing_cache="cache.bin")
    assert cmd.startswith("trtexec --onnx=")
    assert cmd.count("--minShapes=") == cmd.count("--optShapes=") == cmd.count("--maxShapes=") == 2
    assert "input_ids:1x64" in cmd and "past_key.1:0x1x2x16" in cmd and "tree_mask:1x32x32" in cmd
    assert "past_value.0:255x1x2x16" in cmd
    assert "--fp16" in cmd and "--memPoolSize=workspace:1024M" in cmd and "--builderOptimizationLevel=3" in cmd
    assert "--timingCacheFile=cache.bin" in cmd and "--stronglyTyped" not in cmd
    strong = trtexec_command("h.onnx", "h.engine", profs, plan_precision("fp16", THOR, "float16", "10.13"), THOR)
    assert "--stronglyTyped" in strong and "--fp16" not in strong


FACTS = {"tensorrt": "10.3.0.30", "gpu": "Orin (nvgpu)", "compute_capability": "8.7"}
SHA = {"base.onnx": "ab" * 32}


def _record():
    profs = optimization_profiles("base", NANO, TINY_DIMS, 256)
    return build_record("base", NANO, plan_precision("fp16", NANO, "float32", "10.3"), FACTS, SHA,
                        "engines/base.orin-nano-8gb.engine", "cd" * 32, profs, 12.3)


def test_engine_record_checks():
    rec = _record()
    assert rec["profile"] == "orin-nano-8gb" and rec["precision"] == "fp16" and rec["tensorrt"] == "10.3.0.30"
    assert rec["optimization_profiles"][1]["dims"]["q"] == [1, 16, 32]
    json.dumps(rec)  # goes into manifest.json
    check_engine_record(rec, FACTS, SHA)  # same machine, same graph: fine
    with pytest.raises(EngineError, match="TensorRT 10.3.0.30, this is TensorRT 10.4.0"):
        check_engine_record(rec, dict(FACTS, tensorrt="10.4.0"), SHA)
    with pytest.raises(EngineError, match="compute capability 8.7"):
        check_engine_record(rec, dict(FACTS, compute_capability="8.9", gpu="RTX 4090"), SHA)
    with pytest.raises(EngineError, match="built on Orin"):
        check_engine_record(rec, dict(FACTS, gpu="Other Orin"), SHA)
    check_engine_record(rec, dict(FACTS, gpu="Other Orin"), SHA, strict_gpu=False)
    with pytest.raises(EngineError, match="re-exported"):
        check_engine_record(rec, FACTS, {"base.onnx": "00" * 32})


def test_load_engine_without_build_is_a_clear_error(tmp_path):
    art = load_artifact(write_tiny_artifact(tmp_path / "t", graphs=("base",)))
    with pytest.raises(EngineError, match="no 'base.orin-nano-8gb' engine; run `spectrt build"):
        load_engine_bytes(art, "base", "orin-nano-8gb", facts=FACTS)
    m = art.manifest
    m["engines"] = {"base.orin-nano-8gb": dict(_record(), source_sha256=m["graphs"]["base"]["sha256"])}
    with pytest.raises(EngineError, match="missing"):
        load_engine_bytes(art, "base", "orin-nano-8gb", facts=FACTS)


def _simulate(plan, cache, past):
    for src, dst, n in plan:
        assert src - dst >= n, "source and destination overlap (not allowed for cudaMemcpyAsync)"
        cache[past + dst: past + dst + n] = cache[past + src: past + src + n]


@pytest.mark.parametrize("rows", [[0, 1, 2], [0, 2, 3, 4, 5, 9], [3], [1, 2, 3, 4, 5, 6, 7], [0, 5, 6, 7, 8, 20],
                                  [], [0, 1, 4, 5, 6, 7, 8, 9, 10, 30]])
def test_compaction_plan_matches_gather(rows):
    rng = np.random.default_rng(0)
    past = 7
    cache = rng.standard_normal((64, 1, 2, 4)).astype(np.float32)
    expect = cache.copy()
    expect[past: past + len(rows)] = cache[[past + r for r in rows]]
    plan = compaction_plan(rows)
    assert all(n >= 1 and src > dst for src, dst, n in plan)
    _simulate(plan, cache, past)
    np.testing.assert_array_equal(cache[: past + len(rows)], expect[: past + len(rows)])
    if rows == list(range(len(rows))):
        assert plan == []
    if rows == [1, 2, 3, 4, 5, 6, 7]:
        assert len(plan) == 7  # a shift by one row: single-row chunks so no copy overlaps itself
    if rows == [0, 5, 6, 7, 8, 20]:
        assert plan == [(5, 1, 4), (20, 5, 1)]  # runs merged


@pytest.mark.parametrize("rows", [[2, 1], [1, 1], [-1]])
def test_compaction_plan_rejects_bad_rows(rows):
    with pytest.raises(SpectrtError, match="strictly increasing"):
        compaction_plan(rows)


def test_build_dry_run_prints_plan_and_trtexec(tmp_path, capsys):
    art = write_tiny_artifact(tmp_path / "t")
    assert main(["build", str(art), "--profile", "orin-nano-8gb", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.count("trtexec --onnx=") == 3 and "prefill, decode" in out and "frontier" in out
    assert str(engine_path(art, "base", "orin-nano-8gb")) in out
    assert main(["build", str(art), "--profile", "orin-nano-8gb", "--precision", "fp8", "--dry-run"]) == 2
    assert "fp8 is not available on orin-nano-8gb" in capsys.readouterr().err


@pytest.mark.skipif(HAS_TRT, reason="checks the message shown where TensorRT is missing")
def test_build_without_tensorrt_says_how_to_get_it(tmp_path, capsys):
    art = write_tiny_artifact(tmp_path / "t", graphs=("heads",))
    assert main(["build", str(art), "--profile", "orin-nano-8gb"]) == 2
    assert "JetPack's TensorRT" in capsys.readouterr().err


def test_runtime_imports_without_torch_or_tensorrt():
    code = ("import sys; import spectrt.runtime.trt_runner, spectrt.profiles.build, spectrt.profiles.check; "
            "bad = [m for m in ('torch', 'transformers', 'tensorrt') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


# ----------------------------------------------------------------------------------------------- GPU


def _gpu_or_skip():
    pytest.importorskip("tensorrt", reason="TensorRT is not installed (GPU tests run on a Jetson / CUDA machine)")
    try:
        import ctypes

        from polygraphy import cuda

        count = ctypes.c_int(0)
        cuda.wrapper().check(cuda.wrapper().handle.cudaGetDeviceCount(ctypes.byref(count)))
        if count.value < 1:
            raise RuntimeError("no device")
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"no usable CUDA GPU ({e})")


SMALL = """base: orin-nano-8gb
name: tiny-test
precisions: [fp32, fp16]
default_precision: fp32
max_context: 128
opt_context: 32
max_tree_nodes: 16
opt_tree_nodes: 8
max_prefill_chunk: 32
max_frontier: 8
workspace_mb: 256
builder_optimization_level: 1
"""


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    _gpu_or_skip()
    from spectrt.profiles.build import build_engines

    root = tmp_path_factory.mktemp("trt")
    art_dir = write_tiny_artifact(root / "tiny", max_context=128)
    prof = root / "tiny-test.yaml"
    prof.write_text(SMALL)
    records = build_engines(art_dir, str(prof), timing_cache=root / "cache.bin")
    assert set(records) == {"base.tiny-test", "heads.tiny-test", "draft_lm_head.tiny-test"}
    return load_artifact(art_dir)


class _OrtReference:
    """The same draft/verify steps on onnxruntime with a numpy KV cache."""

    def __init__(self, art):
        import onnxruntime as ort

        self.s = ort.InferenceSession(str(art.graph_path("base")), providers=["CPUExecutionProvider"])
        L, kvh, hd = TINY_DIMS["num_layers"], TINY_DIMS["kv_heads"], TINY_DIMS["head_dim"]
        self.k = np.zeros((L, 128, 1, kvh, hd), np.float32)
        self.v = np.zeros_like(self.k)
        self.past = 0

    def forward(self, ids, pos, mask):
        feeds = {"input_ids": ids[None], "position_ids": pos[None], "tree_mask": mask[None]}
        for i in range(self.k.shape[0]):
            feeds[f"past_key.{i}"] = self.k[i, : self.past]
            feeds[f"past_value.{i}"] = self.v[i, : self.past]
        out = dict(zip([o.name for o in self.s.get_outputs()], self.s.run(None, feeds)))
        q = len(ids)
        for i in range(self.k.shape[0]):
            self.k[i, self.past: self.past + q] = out[f"new_key.{i}"]
            self.v[i, self.past: self.past + q] = out[f"new_value.{i}"]
        return out["greedy_ids"][0], out["hidden_states"][0], out["logits"][0]

    def commit(self, rows):
        idx = [self.past + r for r in rows]
        self.k[:, self.past: self.past + len(rows)] = self.k[:, idx]
        self.v[:, self.past: self.past + len(rows)] = self.v[:, idx]
        self.past += len(rows)


@pytest.mark.gpu
def test_trt_base_runner_matches_onnxruntime(built):
    from spectrt.profiles.timing import random_tree_mask
    from spectrt.runtime.trt_runner import TrtBaseRunner

    rng = np.random.default_rng(0)
    ref = _OrtReference(built)
    with TrtBaseRunner(built, profile="tiny-test") as r:
        prompt = rng.integers(0, TINY_DIMS["vocab"], 20)  # prefill profile (q > 16)
        steps = [(prompt, np.arange(20), np.tril(np.ones((20, 20), bool)), list(range(20)))]
        for q in (1, 5, 16, 9):  # decode / verify profile
            mask, depth = random_tree_mask(q, rng)
            rows = [0] + [i for i in range(1, q) if mask[-1, i]]  # the path to the last node
            steps.append((rng.integers(0, TINY_DIMS["vocab"], q), None, mask, rows))
        for ids, pos, mask, rows in steps:
            if pos is None:
                pos = np.where(mask, 1, 0).sum(1) - 1
            pos = pos + r.past
            out = r.forward(ids, pos, mask)
            g_ref, h_ref, l_ref = ref.forward(ids.astype(np.int64), pos.astype(np.int64), mask)
            assert out.greedy_ids.shape == g_ref.shape == (len(ids),) and out.hidden_states.shape == h_ref.shape
            np.testing.assert_allclose(out.hidden_states, h_ref, atol=5e-2, rtol=5e-2)  # TF32 matmuls
            np.testing.assert_allclose(out.logits, l_ref, atol=1e-1, rtol=5e-2)
            assert (out.greedy_ids == g_ref).mean() >= 0.8
            r.commit(rows)
            ref.commit(rows)
            assert r.past == ref.past
        before = r.past
        r.rollback(before - 3)
        assert r.past == before - 3
        r.reset()
        assert r.past == 0
        with pytest.raises(SpectrtError, match="exceed"):  # q above every optimization profile
            r.forward(np.zeros(40, np.int64), np.arange(40), np.tril(np.ones((40, 40), bool)))


@pytest.mark.gpu
def test_trt_graph_runners_match_onnxruntime(built):
    import onnxruntime as ort

    from spectrt.runtime.trt_runner import TrtGraphRunner

    rng = np.random.default_rng(1)
    hidden = rng.standard_normal((3, TINY_DIMS["hidden"])).astype(np.float32)
    heads_ref = ort.InferenceSession(str(built.graph_path("heads"))).run(None, {"hidden_states": hidden})[0]
    with TrtGraphRunner(built, "heads") as heads:
        feats = heads.infer({"hidden_states": hidden})["head_features"]
    np.testing.assert_allclose(feats, heads_ref, atol=5e-2, rtol=5e-2)
    with TrtGraphRunner(built, "draft_lm_head") as lm:
        out = lm(head_features=heads_ref)  # OrtGraphRunner call style
    assert out["topk_ids"].shape == (3, TINY_DIMS["heads"], TINY_DIMS["topk"]) and out["topk_ids"].dtype == np.int64


@pytest.mark.gpu
def test_engine_from_other_graph_is_refused(built, tmp_path):
    import shutil

    from spectrt.runtime.trt_runner import TrtGraphRunner

    copy = tmp_path / "copy"
    shutil.copytree(built.root, copy)
    m = json.loads((copy / "manifest.json").read_text())
    m["graphs"]["heads"]["sha256"] = {"heads.onnx": "0" * 64}
    (copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(EngineError, match="re-exported"):
        with TrtGraphRunner(load_artifact(copy), "heads"):
            pass
