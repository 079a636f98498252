"""TensorRT build + runners, on the CPU.

Pure parts (precision plans, trtexec lines, engine records, Q/DQ detection, KV copy runs) directly; the
rest (``spectrt build``, the runners, ``generate``/``bench --backend trt``) through the strict TensorRT
emulator of tests/trt_emulator.py, which executes each engine's ONNX graph with ONNX Runtime and fails on
any breach of TensorRT's API rules. GPU tests (@pytest.mark.gpu) run the same runners on real engines where
tensorrt and a CUDA GPU exist."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from spectrt.cli import main
from spectrt.profiles import load_profile, optimization_profiles
from spectrt.profiles.build import (build_engines, build_record, default_precision, has_qdq, plan_precision,
                                    trtexec_command)
from spectrt.runtime.artifact import load_artifact, write_manifest
from spectrt.runtime.engines import (DeviceFacts, EngineError, require_tensorrt, check_engine_record, engine_path,
                                     load_engine_bytes, source_hashes)
from spectrt.runtime.errors import SpectrtError
from spectrt.runtime.protocols import BaseRunner, PrefixRunner
from spectrt.runtime.trt_runner import TrtBaseRunner, TrtGraphRunner, TrtKVRunner, copy_runs
from tests import trt_emulator
from tests.tiny_artifact import SMALL, TINY_DIMS, write_tiny_artifact

NANO = load_profile("orin-nano-8gb")
THOR = load_profile("agx-thor")
FACTS = DeviceFacts("10.3.0.30", "Orin (nvgpu)", "8.7")


@pytest.fixture
def emu(monkeypatch):
    """The TensorRT + CUDA emulator in place of tensorrt and polygraphy.cuda (strict: violations raise)."""
    return trt_emulator.install(monkeypatch)


@pytest.fixture
def small(tmp_path):
    path = tmp_path / "tiny-test.yaml"
    path.write_text(SMALL)
    return path


# ----------------------------------------------------------------------------------------------- precision


def test_fp16_engines_come_from_fp16_exports_strongly_typed_on_every_trt10():
    for version in ("10.3.0.30", "10.13.0.35"):
        plan = plan_precision("fp16", NANO, "float16", version)
        assert plan.strongly_typed and plan.precision == "fp16"
        with pytest.raises(SpectrtError, match=r"export fp16 graphs \(spectrt export --dtype fp16\)"):
            plan_precision("fp16", NANO, "float32", version)  # never FP16 flags on a weakly typed fp32 network
    assert plan_precision("fp32", NANO, "float32", "10.3").precision == "fp32"
    with pytest.raises(SpectrtError, match="build --precision fp16"):
        plan_precision("fp32", NANO, "float16", "10.3")
    with pytest.raises(SpectrtError, match="bf16 graphs"):
        plan_precision("bf16", THOR, "float16", "10.13")
    assert default_precision(NANO, "float32") == "fp32" and default_precision(NANO, "float16") == "fp16"


def test_quantized_precisions_need_qdq():
    with pytest.raises(SpectrtError, match="fp8 is not available on orin-nano-8gb"):
        plan_precision("fp8", NANO, "float16", "10.3")
    with pytest.raises(SpectrtError, match="explicitly quantized"):
        plan_precision("int8", NANO, "float16", "10.3", has_qdq=False)
    assert "int8 where the graph quantizes, fp16 elsewhere" in plan_precision("int8", NANO, "float16", "10.3", True).note
    with pytest.raises(SpectrtError, match="fp4 needs TensorRT >= 10.8"):
        plan_precision("fp4", THOR, "float16", "10.3", has_qdq=True)


def _qdq_model(path, quantized: bool):
    import onnx
    from onnx import TensorProto, helper

    nodes = [helper.make_node("Identity", ["x"], ["y"], name="id")]
    inits = []
    if quantized:
        inits = [helper.make_tensor("s", TensorProto.FLOAT, [], [0.1]), helper.make_tensor("z", TensorProto.INT8, [], [0])]
        nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
                 helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_has_qdq_with_and_without_onnx(tmp_path, monkeypatch):
    q, plain = _qdq_model(tmp_path / "q.onnx", True), _qdq_model(tmp_path / "p.onnx", False)
    assert has_qdq(q) and not has_qdq(plain)
    monkeypatch.setitem(sys.modules, "onnx", None)  # the device's runtime install: `import onnx` fails
    assert has_qdq(q) and not has_qdq(plain)
    with pytest.raises(SpectrtError, match="missing.onnx"):
        has_qdq(tmp_path / "missing.onnx")


NO_ONNX_NO_TRT = ("import sys; sys.modules['onnx'] = sys.modules['tensorrt'] = None; "
                  "from spectrt.cli import main; sys.exit(main(sys.argv[1:]))")


def test_dry_run_needs_neither_onnx_nor_tensorrt(tmp_path):
    """Defect 1: `spectrt build --dry-run` on a device install (no onnx, no tensorrt) plans without a traceback,
    also for a quantized precision (Q/DQ detection falls back to a byte scan)."""
    art = write_tiny_artifact(tmp_path / "t", dtype="float16")
    r = subprocess.run([sys.executable, "-c", NO_ONNX_NO_TRT, "build", str(art), "--profile", "orin-nano-8gb",
                        "--dry-run"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("trtexec --onnx=") == 3 and "strongly typed: fp16" in r.stdout
    r = subprocess.run([sys.executable, "-c", NO_ONNX_NO_TRT, "build", str(art), "--profile", "orin-nano-8gb",
                        "--precision", "int8", "--dry-run"], capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "explicitly quantized" in r.stderr
    r = subprocess.run([sys.executable, "-c", NO_ONNX_NO_TRT, "build", str(art), "--profile", "orin-nano-8gb"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "JetPack's TensorRT" in r.stderr


def test_tensorrt_import_checks(tmp_path, monkeypatch):
    """Defect 8: tensorrt-stubs' empty namespace package counts as missing; TensorRT 8.x is refused."""
    (tmp_path / "tensorrt").mkdir()
    (tmp_path / "tensorrt" / "__init__.pyi").write_text("__version__: str\n")
    monkeypatch.delitem(sys.modules, "tensorrt", raising=False)
    monkeypatch.syspath_prepend(str(tmp_path))
    import tensorrt  # noqa: F401 - succeeds: a namespace package of .pyi files

    with pytest.raises(SpectrtError, match="not installed"):
        require_tensorrt()
    monkeypatch.setitem(sys.modules, "tensorrt", type(sys)("tensorrt"))
    sys.modules["tensorrt"].__version__ = "8.6.2"  # JetPack 6.0
    with pytest.raises(SpectrtError, match=r"TensorRT 8.6.2 is too old.*JetPack 6.0 ships 8.6"):
        require_tensorrt()


def test_trt_extra_does_not_pull_tensorrt_from_pypi():
    import tomllib
    from pathlib import Path

    extras = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert extras["trt"] == ["polygraphy>=0.49"]


def test_runtime_imports_no_heavy_or_upstream_modules():
    """The runtime loads without torch/onnx/tensorrt/polygraphy, and never imports spectrt.profiles (imports
    flow runtime <- profiles <- export <- calibration <- CLI)."""
    code = ("import sys; import spectrt.runtime.trt_runner, spectrt.runtime.engines, spectrt.runtime.session; "
            "bad = [m for m in ('torch', 'transformers', 'onnx', 'tensorrt', 'polygraphy.cuda', 'spectrt.profiles', "
            "'spectrt.export', 'spectrt.calibration') if m in sys.modules]; assert not bad, bad; "
            "import spectrt.profiles.build, spectrt.profiles.timing; "
            "bad = [m for m in ('torch', 'onnx', 'tensorrt', 'polygraphy.cuda') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


# ----------------------------------------------------------------------------------------------- trtexec, records


def test_trtexec_command_one_profile_flag_per_shape_group(tmp_path):
    """Defect 7: trtexec 10.3 wants --profile=N before each optimization profile's shape group."""
    profs = optimization_profiles("base", NANO, TINY_DIMS, 256)
    plan = plan_precision("fp16", NANO, "float16", "10.3")
    cmd = trtexec_command(tmp_path / "base.onnx", tmp_path / "base.orin-nano-8gb.engine", profs, plan, NANO,
                          timing_cache="cache.bin")
    args = cmd.split()
    assert args[0] == "trtexec" and args[1].startswith("--onnx=")
    p0, p1 = args.index("--profile=0"), args.index("--profile=1")
    assert [a.split("=")[0] for a in args[p0 + 1:p1]] == ["--minShapes", "--optShapes", "--maxShapes"]
    assert [a.split("=")[0] for a in args[p1 + 1:p1 + 4]] == ["--minShapes", "--optShapes", "--maxShapes"]
    assert cmd.count("--minShapes=") == 2 and "input_ids:1x64" in cmd and "past_key.1:0x1x2x16" in cmd
    assert "past_value.0:255x1x2x16" in cmd and "tree_mask:1x32x32" in cmd
    assert "--stronglyTyped" in args and "--fp16" not in cmd and "--memPoolSize=workspace:1024M" in args
    assert "--timingCacheFile=cache.bin" in args
    heads = trtexec_command("h.onnx", "h.engine", optimization_profiles("heads", NANO, TINY_DIMS, 256), plan, NANO)
    assert "--profile=" not in heads and heads.count("--minShapes=") == 1


def _record(art_dir, graph="base"):
    art = load_artifact(art_dir)
    profs = optimization_profiles(graph, NANO, art.dims(graph), 256)
    plan = plan_precision("fp32", NANO, "float32", "10.3")
    return build_record(graph, NANO, plan, FACTS, source_hashes(art, graph), f"engines/{graph}.orin-nano-8gb.engine",
                        "cd" * 32, profs, 12.3)


def test_engine_record_checks(tmp_path):
    art_dir = write_tiny_artifact(tmp_path / "t", graphs=("base",))
    rec = _record(art_dir)
    assert rec.profile == "orin-nano-8gb" and rec.strongly_typed and rec.tensorrt == "10.3.0.30"
    assert rec.optimization_profiles[1].dims["q"] == (1, 16, 32) and rec.max_dims() == {"batch": 1, "q": 64, "past": 255}
    art = load_artifact(art_dir)
    sha = source_hashes(art, "base")
    assert set(sha) == {f.path for f in art.graph("base").files}  # the .onnx and its external data
    write_manifest(art_dir, art.manifest.with_engines({"base.orin-nano-8gb": rec}))  # a valid manifest
    assert load_artifact(art_dir).manifest.engines["base.orin-nano-8gb"] == rec
    check_engine_record(rec, FACTS, sha)
    with pytest.raises(EngineError, match="TensorRT 10.3.0.30, this is TensorRT 10.4.0"):
        check_engine_record(rec, DeviceFacts("10.4.0", FACTS.gpu, "8.7"), sha)
    with pytest.raises(EngineError, match="compute capability 8.7"):
        check_engine_record(rec, DeviceFacts(FACTS.tensorrt, "RTX 4090", "8.9"), sha)
    with pytest.raises(EngineError, match="built on Orin"):
        check_engine_record(rec, DeviceFacts(FACTS.tensorrt, "Other Orin", "8.7"), sha)
    check_engine_record(rec, DeviceFacts(FACTS.tensorrt, "Other Orin", "8.7"), sha, strict_gpu=False)
    with pytest.raises(EngineError, match="re-exported"):
        check_engine_record(rec, FACTS, {k: "00" * 32 for k in sha})


def test_load_engine_without_build_is_a_clear_error(tmp_path):
    art_dir = write_tiny_artifact(tmp_path / "t", graphs=("base",))
    art = load_artifact(art_dir)
    with pytest.raises(EngineError, match="no 'base.orin-nano-8gb' engine; run `spectrt build"):
        load_engine_bytes(art, "base", "orin-nano-8gb", facts=FACTS)
    write_manifest(art_dir, art.manifest.with_engines({"base.orin-nano-8gb": _record(art_dir)}))
    with pytest.raises(EngineError, match="missing"):
        load_engine_bytes(load_artifact(art_dir), "base", "orin-nano-8gb", facts=FACTS)
    engine_path(art_dir, "base", "orin-nano-8gb").parent.mkdir()
    engine_path(art_dir, "base", "orin-nano-8gb").write_bytes(b"not the built engine")
    assert load_engine_bytes(load_artifact(art_dir), "base", "orin-nano-8gb", facts=FACTS) == b"not the built engine"
    with pytest.raises(EngineError, match="sha256 differs from the build record"):
        load_engine_bytes(load_artifact(art_dir), "base", "orin-nano-8gb", facts=FACTS, verify_hash=True)


@pytest.mark.parametrize("rows,runs", [([0, 1, 2], [(0, 0, 3)]), ([0, 2, 3, 4, 9], [(0, 0, 1), (2, 1, 3), (9, 4, 1)]),
                                       ([3], [(3, 0, 1)]), ([], [])])
def test_copy_runs(rows, runs):
    assert copy_runs(rows) == runs
    scratch = np.arange(10)
    cache = np.full(5, -1)
    for src, dst, n in copy_runs(rows):
        cache[dst:dst + n] = scratch[src:src + n]
    assert cache[:len(rows)].tolist() == rows


# ----------------------------------------------------------------------------------------------- build (emulated)


def test_build_through_the_emulator(emu, tmp_path, capsys):
    art_dir = write_tiny_artifact(tmp_path / "t")  # float32
    cache = tmp_path / "cache.bin"
    assert main(["build", str(art_dir), "--profile", "orin-nano-8gb", "--timing-cache", str(cache)]) == 0
    out = capsys.readouterr().out
    assert "this float32 export builds fp32" in out and "Emulated Orin" in out
    art = load_artifact(art_dir)
    assert set(art.manifest.engines) == {"base.orin-nano-8gb", "heads.orin-nano-8gb", "draft_lm_head.orin-nano-8gb"}
    rec = art.manifest.engines["base.orin-nano-8gb"]
    assert rec.precision == "fp32" and rec.strongly_typed and rec.gpu == "Emulated Orin (nvgpu)"
    assert [p.label for p in rec.optimization_profiles] == ["prefill", "decode"]
    engines = trt_emulator.emulated_engine_files(art_dir)
    assert all(e["strongly_typed"] and e["flags"] == [] for e in engines.values())  # no FP16 flag, ever
    assert len(engines["base.orin-nano-8gb.engine"]["profiles"]) == 2
    assert cache.read_bytes().startswith(trt_emulator.CACHE_MAGIC)
    # an fp32 export refuses --precision fp16 (defect 3)
    assert main(["build", str(art_dir), "--profile", "orin-nano-8gb", "--precision", "fp16"]) == 2
    assert "spectrt export --dtype fp16" in capsys.readouterr().err
    # a timing cache TensorRT refuses is an error, not silently ignored (defect 9)
    cache.write_bytes(b"a cache from another TensorRT")
    assert main(["build", str(art_dir), "--profile", "orin-nano-8gb", "--timing-cache", str(cache)]) == 2
    assert "TensorRT refused this timing cache" in capsys.readouterr().err


def test_fp16_export_builds_fp16_strongly_typed(emu, tmp_path):
    art_dir = write_tiny_artifact(tmp_path / "t", dtype="float16")
    records = build_engines(art_dir, "orin-nano-8gb", progress=lambda *_: None)
    assert {r.precision for r in records.values()} == {"fp16"}
    assert all(e["strongly_typed"] and not e["flags"] for e in trt_emulator.emulated_engine_files(art_dir).values())
    with TrtGraphRunner(load_artifact(art_dir), "heads") as heads:
        assert heads.dtypes["hidden_states"] == np.float16


def test_engines_are_keyed_by_profile_name_not_path(emu, tmp_path, small, monkeypatch):
    """Defect 6: a profile given as a YAML path keys engines by its name, in build and in the runner."""
    art_dir = write_tiny_artifact(tmp_path / "t")
    assert main(["build", str(art_dir), "--profile", str(small)]) == 0
    art = load_artifact(art_dir)
    assert {e.profile for e in art.manifest.engines.values()} == {"tiny-test"}
    with TrtBaseRunner(art, profile=load_profile(small)) as r:  # a loaded profile
        assert r.profile == "tiny-test"
    with TrtBaseRunner(art) as r:  # the only profile built
        assert r.profile == "tiny-test"
    with pytest.raises(SpectrtError, match="is a device profile file: engines are keyed by the profile's name"):
        TrtBaseRunner(art, profile=str(small))
    # the old behaviour (the path as the key) fails
    import spectrt.runtime.engines as engines

    monkeypatch.setattr(engines, "profile_name", lambda p: getattr(p, "name", p))
    with pytest.raises(EngineError, match=r"no 'base\..*tiny-test.yaml' engine"):
        TrtBaseRunner(art, profile=str(small))


# ----------------------------------------------------------------------------------------------- runners (emulated)


class _OrtReference:
    """The same steps on onnxruntime with a numpy KV cache."""

    def __init__(self, art, ctx=256):
        import onnxruntime as ort

        self.s = ort.InferenceSession(str(art.graph_path("base")), providers=["CPUExecutionProvider"])
        L, kvh, hd = TINY_DIMS["num_layers"], TINY_DIMS["kv_heads"], TINY_DIMS["head_dim"]
        self.k = np.zeros((L, ctx, 1, kvh, hd), np.float32)
        self.v = np.zeros_like(self.k)
        self.past = 0

    def forward(self, ids, pos, mask):
        feeds = {"input_ids": ids[None], "position_ids": pos[None], "tree_mask": mask[None]}
        for i in range(self.k.shape[0]):
            feeds[f"past_key.{i}"], feeds[f"past_value.{i}"] = self.k[i, :self.past], self.v[i, :self.past]
        out = dict(zip([o.name for o in self.s.get_outputs()], self.s.run(None, feeds)))
        q = len(ids)
        for i in range(self.k.shape[0]):
            self.k[i, self.past:self.past + q] = out[f"new_key.{i}"]
            self.v[i, self.past:self.past + q] = out[f"new_value.{i}"]
        return out["greedy_ids"][0], out["hidden_states"][0], out["logits"][0]

    def commit(self, rows):
        idx = [self.past + r for r in rows]
        self.k[:, self.past:self.past + len(rows)] = self.k[:, idx]
        self.v[:, self.past:self.past + len(rows)] = self.v[:, idx]
        self.past += len(rows)


def _steps(rng):
    """A 20-token prompt chunk (prefill profile), then trees of 1, 5, 16, 9 nodes (decode profile)."""
    from spectrt.profiles.timing import random_tree_mask

    yield rng.integers(0, TINY_DIMS["vocab"], 20), np.tril(np.ones((20, 20), bool)), np.arange(20), list(range(20))
    for q in (1, 5, 16, 9):
        mask, depth = random_tree_mask(q, rng)
        yield rng.integers(0, TINY_DIMS["vocab"], q), mask, depth, [i for i in range(q) if mask[-1, i]]


@pytest.fixture
def built(emu, tmp_path, small):
    art_dir = write_tiny_artifact(tmp_path / "tiny", max_context=256)
    build_engines(art_dir, small, progress=lambda *_: None)
    return load_artifact(art_dir)


def test_base_runner_matches_onnxruntime(built, emu):
    ref = _OrtReference(built)
    with TrtBaseRunner(built, profile="tiny-test") as r:
        assert isinstance(r, BaseRunner) and (r.max_q, r.max_context) == (32, 256)
        for ids, mask, depth, rows in _steps(np.random.default_rng(0)):
            pos = depth + r.past
            out = r.forward(ids, pos, mask)
            g, h, logits = ref.forward(ids.astype(np.int64), pos.astype(np.int64), mask)
            np.testing.assert_array_equal(out.greedy_ids, g)
            np.testing.assert_allclose(out.hidden_states, h, atol=1e-5)
            np.testing.assert_allclose(out.logits, logits, atol=1e-4)
            r.commit(rows)
            ref.commit(rows)
            assert r.past == ref.past
        # the prompt chunk ran on the prefill profile, every tree on the decode profile
        assert [e["profile"] for e in emu.executions] == [0, 1, 1, 1, 1]
        with pytest.raises(SpectrtError, match="strictly increasing"):
            r.commit([0])  # nothing to commit since the last commit
        before = r.past
        r.rollback(3)
        assert r.past == before - 3
        with pytest.raises(SpectrtError, match="rollback of"):
            r.rollback(r.past + 1)
        out = r.forward(np.array([5]), np.array([r.past]), np.ones((1, 1), bool))  # after a rollback
        with pytest.raises(SpectrtError, match="strictly increasing"):
            r.commit([1])  # row 1 of a 1-token call
        r.reset()
        assert r.past == 0
        with pytest.raises(SpectrtError, match="the engine takes 1..32"):
            r.forward(np.zeros(40, np.int64), np.arange(40), np.tril(np.ones((40, 40), bool)))
    assert not emu.mem and not emu.streams  # everything freed on exit


def test_kv_cache_stays_on_the_device(built, emu):
    """A verify step copies only its inputs in and greedy ids + hidden states out; accepting a path costs one
    device-to-device copy per contiguous run of rows and per KV buffer."""
    with TrtBaseRunner(built, copy_logits=False) as r:
        r.forward(np.arange(24), np.arange(24), np.tril(np.ones((24, 24), bool)))
        r.commit(range(24))
        before = dict(emu.calls)
        out = r.forward(np.arange(5), 24 + np.array([0, 1, 1, 2, 2]), np.array(
            [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 0, 1, 0, 0], [1, 1, 0, 1, 0], [1, 0, 1, 0, 1]], bool))
        assert out.logits is None
        moved = {k: emu.calls[k] - before.get(k, 0) for k in emu.calls}
        assert moved["H2D"] == 3 and moved["H2D bytes"] == 5 * 8 * 2 + 25  # ids, positions, mask
        assert moved["D2H"] == 2 and moved.get("D2D", 0) == 0
        r.commit([0, 2, 4])  # one run of 1 row, then rows 2 and 4 (not consecutive): 3 runs
        assert emu.calls["D2D"] - before.get("D2D", 0) == 3 * 2 * TINY_DIMS["num_layers"]


def test_misaligned_or_shared_kv_addresses_are_caught(built, emu, monkeypatch):
    """Defect 2 reintroduced: new_* bound at cache + past * row_bytes (128 B rows here) as before."""
    original = TrtKVRunner._execute

    def in_place_binding(self):
        for i in range(self.layers):
            for kind in ("key", "value"):
                cache = self.addresses[f"past_{kind}.{i}"]
                self.context.set_tensor_address(f"new_{kind}.{i}", cache + self.past * self.row_bytes)
        original(self)

    monkeypatch.setattr(TrtKVRunner, "_execute", in_place_binding)
    with TrtBaseRunner(built) as r:
        with pytest.raises(trt_emulator.ApiViolation, match="share address"):  # past = 0: past_* == new_*
            r.forward(np.arange(4), np.arange(4), np.tril(np.ones((4, 4), bool)))
        r.past = 1
        with pytest.raises(trt_emulator.ApiViolation, match="not 256-byte aligned"):
            r.forward(np.arange(4), 1 + np.arange(4), np.tril(np.ones((4, 4), bool)))


def test_every_refusal_is_an_error(built, monkeypatch):
    """TensorRT answers False (the emulator in non-strict mode, like TensorRT): the runner raises, naming the call."""
    trt_emulator.install(monkeypatch, strict=False)
    with TrtBaseRunner(built) as r:
        ok = (np.arange(4), np.arange(4), np.tril(np.ones((4, 4), bool)))
        r.addresses["new_key.0"] += 128
        with pytest.raises(SpectrtError, match="TensorRT refused address .* for 'new_key.0'"):
            r.forward(*ok)
        r.addresses["new_key.0"] -= 128
        r._active = -1
        with pytest.raises(SpectrtError, match="refused optimization profile 7"):
            r._select(7)
        r._select(1)
        with pytest.raises(SpectrtError, match=r"refused shape \[1, 40\] for 'input_ids'"):
            r._set_shape("input_ids", (1, 40))
        stream, r.device.stream.ptr = r.device.stream.ptr, 0xDEAD  # not a live stream
        with pytest.raises(SpectrtError, match="execute_async_v3 returned False"):
            r.forward(*ok)
        r.device.stream.ptr = stream


def test_graph_runner_matches_onnxruntime(built):
    import onnxruntime as ort

    rng = np.random.default_rng(1)
    hidden = rng.standard_normal((3, TINY_DIMS["hidden"])).astype(np.float32)
    want = ort.InferenceSession(str(built.graph_path("heads"))).run(None, {"hidden_states": hidden})[0]
    with TrtGraphRunner(built, "heads") as heads:
        assert heads.max_batch == 16
        np.testing.assert_allclose(heads(hidden_states=hidden)["head_features"], want, atol=1e-5)
        with pytest.raises(SpectrtError, match="batch 17 outside"):
            heads(hidden_states=np.zeros((17, TINY_DIMS["hidden"]), np.float32))
    with TrtGraphRunner(built, "draft_lm_head") as lm:
        out = lm(head_features=want)
    assert out["topk_ids"].shape == (3, TINY_DIMS["heads"], TINY_DIMS["topk"]) and out["topk_ids"].dtype == np.int64


def test_engine_of_a_re_exported_graph_is_refused(built, tmp_path):
    import dataclasses

    m = built.manifest
    heads = m.graphs["heads"]
    files = (dataclasses.replace(heads.files[0], sha256="0" * 64),) + heads.files[1:]
    write_manifest(built.root, dataclasses.replace(m, graphs={**m.graphs, "heads": dataclasses.replace(heads, files=files)}))
    with pytest.raises(EngineError, match="re-exported"):
        with TrtGraphRunner(load_artifact(built.root), "heads"):
            pass


# ----------------------------------------------------------------------------------------------- end to end (emulated)


PROMPTS = ["hello world", "the quick brown fox"]


@pytest.mark.parametrize("kind", ["medusa", "hydra++"])
def test_generate_and_bench_on_trt_equal_ort(draft_exports, kind, emu, small, tmp_path, capsys):
    """Speculative == autoregressive on the TensorRT backend, token for token the ONNX Runtime output."""
    from spectrt.runtime.session import SessionConfig, SpecSession

    art_dir = draft_exports[kind]
    assert main(["build", str(art_dir), "--profile", str(small)]) == 0
    built = {e.graph for e in load_artifact(art_dir).manifest.engines.values()}
    if kind == "hydra++":
        assert {"hydra_head.0", "hydra_head.2", "hydra_lm_head.1", "hydra_prefix"} <= built  # defect 4
    capsys.readouterr()
    for prompt in PROMPTS:
        tokens = {}
        for backend in ("ort", "trt"):
            for mode, tree in (("ar", None), ("spec", None), ("spec", "dynamic")):
                cfg = SessionConfig(backend=backend, profile="tiny-test" if backend == "trt" else None, mode=mode,
                                    tree=tree, tree_nodes=8 if tree else None, prefill_chunk=16)
                with SpecSession(art_dir, cfg) as s:
                    tokens[backend, mode, tree] = s.generate(s.codec.encode(prompt), 24).tokens
        assert len(set(map(tuple, tokens.values()))) == 1, tokens
    graphs = {e["graph"] for e in emu.executions}
    assert "base" in graphs and (("hydra_prefix" in graphs and "hydra_head.1" in graphs) if kind == "hydra++"
                                 else "heads" in graphs)
    assert main(["generate", str(art_dir), "--backend", "trt", "--profile", str(small), "-p", PROMPTS[0], "-n", "16",
                 "--json"]) == 0
    ort_json = capsys.readouterr().out
    assert main(["generate", str(art_dir), "-p", PROMPTS[0], "-n", "16", "--json"]) == 0
    assert json.loads(ort_json)["text"] == json.loads(capsys.readouterr().out)["text"]
    report, prompts = tmp_path / "bench.json", tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    assert main(["bench", str(art_dir), "--backend", "trt", "--profile", str(small), "--prompts", str(prompts),
                 "-n", "12", "--json", str(report)]) == 0
    assert json.loads(report.read_text())["mismatches"] == 0


def test_prefix_runner_matches_onnxruntime(draft_exports, emu, small):
    from spectrt.runtime.ort_runner import OrtPrefixRunner
    from spectrt.runtime.trt_runner import TrtPrefixRunner

    art_dir = draft_exports["hydra++"]
    build_engines(art_dir, small, graphs=["hydra_prefix"], progress=lambda *_: None)
    art = load_artifact(art_dir)
    rng = np.random.default_rng(3)
    H = art.model.hidden
    with TrtPrefixRunner(art, profile="tiny-test") as trt, OrtPrefixRunner(art, max_q=32) as ort:
        assert isinstance(trt, PrefixRunner) and trt.max_q == 32 and trt.max_context == 256
        for q, keep in ((20, 20), (3, 3), (1, 1), (4, 2)):
            hidden = rng.standard_normal((q, H)).astype(np.float32)
            pos, mask = trt.past + np.arange(q), np.tril(np.ones((q, q), bool))
            np.testing.assert_allclose(trt.forward(hidden, pos, mask), ort.forward(hidden, pos, mask), atol=1e-5)
            trt.commit(range(keep))
            ort.commit(range(keep))
        assert trt.past == ort.past == 26
        trt.rollback(2)
        trt.reset()
        assert trt.past == 0


# ----------------------------------------------------------------------------------------------- GPU


def _gpu_or_skip():
    try:
        require_tensorrt()
        import ctypes

        from polygraphy import cuda

        count = ctypes.c_int(0)
        cuda.wrapper().check(cuda.wrapper().handle.cudaGetDeviceCount(ctypes.byref(count)))
        if count.value < 1:
            raise RuntimeError("no device")
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"no TensorRT + CUDA GPU here ({e})")


@pytest.mark.gpu
def test_real_trt_base_runner_matches_onnxruntime(tmp_path, small):
    """The runner on real TensorRT engines (TF32/fp kernels: tolerances, most greedy ids equal)."""
    _gpu_or_skip()
    art_dir = write_tiny_artifact(tmp_path / "tiny", max_context=256)
    build_engines(art_dir, small, timing_cache=tmp_path / "cache.bin")
    art = load_artifact(art_dir)
    ref = _OrtReference(art)
    with TrtBaseRunner(art, profile="tiny-test") as r:
        for ids, mask, depth, rows in _steps(np.random.default_rng(0)):
            pos = depth + r.past
            out = r.forward(ids, pos, mask)
            g, h, logits = ref.forward(ids.astype(np.int64), pos.astype(np.int64), mask)
            np.testing.assert_allclose(out.hidden_states, h, atol=5e-2, rtol=5e-2)
            np.testing.assert_allclose(out.logits, logits, atol=1e-1, rtol=5e-2)
            assert (out.greedy_ids == g).mean() >= 0.8
            r.commit(rows)
            ref.commit(rows)
    with TrtGraphRunner(art, "heads") as heads:
        assert heads(hidden_states=np.zeros((2, TINY_DIMS["hidden"]), np.float32))["head_features"].shape[0] == 2


def test_dry_run_plans_every_graph_for_every_device_profile(draft_exports, capsys):
    """Done-when of the TensorRT issue: `build --dry-run` plans each graph of Medusa and Hydra++ exports on
    every built-in device profile (Hydra's per-head graphs included: their dims are in the manifest)."""
    from spectrt.profiles import list_profiles

    for kind, art_dir in draft_exports.items():
        graphs = list(load_artifact(art_dir).manifest.graphs)
        for name in list_profiles():
            assert main(["build", str(art_dir), "--profile", name, "--dry-run"]) == 0, (kind, name)
            out = capsys.readouterr().out
            missing = [g for g in graphs if f"{g}.onnx" not in out]
            assert not missing, (kind, name, missing)


def test_build_refuses_a_profile_the_export_cannot_fit(emu, tmp_path, capsys):
    """The memory estimate over the profile's budget: build refuses with the numbers (dry-run only warns;
    --ignore-memory builds anyway)."""
    art = write_tiny_artifact(tmp_path / "a", max_context=256)
    tight = tmp_path / "tight.yaml"
    tight.write_text(SMALL.replace("name: tiny-test", "name: tight") + "memory_budget_mb: 256\n")  # < workspace + KV
    assert main(["build", str(art), "--profile", str(tight)]) == 2
    err = capsys.readouterr().err
    assert "does not fit tight: estimated" in err and "of a 256 MiB budget" in err and "--ignore-memory" in err
    assert not load_artifact(art).manifest.engines  # nothing built
    assert main(["build", str(art), "--profile", str(tight), "--dry-run"]) == 0
    assert "WARNING: this may not fit" in capsys.readouterr().out
    assert main(["build", str(art), "--profile", str(tight), "--ignore-memory"]) == 0
    assert {e.profile for e in load_artifact(art).manifest.engines.values()} == {"tight"}
