"""The TensorRT emulator enforces the rules it claims (tests/trt_emulator.py): each one broken on purpose."""
from __future__ import annotations

import numpy as np
import pytest

from spectrt.profiles.build import build_engines
from spectrt.runtime.artifact import load_artifact
from spectrt.runtime.engines import EngineFromArtifact
from tests import trt_emulator
from tests.tiny_artifact import TINY_DIMS, write_tiny_artifact
from tests.trt_emulator import ApiViolation


@pytest.fixture
def env(monkeypatch, tmp_path):
    emu = trt_emulator.install(monkeypatch)
    art_dir = write_tiny_artifact(tmp_path / "t")
    build_engines(art_dir, "orin-nano-8gb", progress=lambda *_: None)
    import tensorrt as trt
    from polygraphy import cuda

    return emu, load_artifact(art_dir), trt, cuda


def _context(art, graph):
    _, engine = EngineFromArtifact(art, graph)()
    return engine, engine.create_execution_context()


def test_addresses(env):
    emu, art, trt, cuda = env
    _, ctx = _context(art, "heads")
    ptr = cuda.wrapper().malloc(4096)
    assert ctx.set_tensor_address("hidden_states", ptr)
    with pytest.raises(ApiViolation, match="not 256-byte aligned"):
        ctx.set_tensor_address("hidden_states", ptr + 64)
    with pytest.raises(ApiViolation, match="null address"):
        ctx.set_tensor_address("hidden_states", 0)
    with pytest.raises(ApiViolation, match="not in a live device allocation"):
        ctx.set_tensor_address("hidden_states", ptr + (1 << 20))
    with pytest.raises(ApiViolation, match="not an I/O tensor"):
        ctx.set_tensor_address("hidden", ptr)


def test_profiles_and_shapes(env):
    emu, art, trt, cuda = env
    _, ctx = _context(art, "base")  # two optimization profiles
    stream = cuda.Stream()
    with pytest.raises(ApiViolation, match="before set_optimization_profile_async"):
        ctx.set_input_shape("input_ids", (1, 4))
    assert ctx.set_optimization_profile_async(1, stream.ptr)
    with pytest.raises(ApiViolation, match=r"outside optimization profile 1 \(\[1, 1\] .. \[1, 32\]\)"):
        ctx.set_input_shape("input_ids", (1, 40))
    with pytest.raises(ApiViolation, match="the engine's shape is"):
        ctx.set_input_shape("past_key.0", (3, 1, TINY_DIMS["kv_heads"], 99))
    with pytest.raises(ApiViolation, match="no shape set for input"):
        ctx.execute_async_v3(stream.ptr)


def test_execute_needs_distinct_bound_addresses_and_no_overlap(env):
    emu, art, trt, cuda = env
    _, ctx = _context(art, "heads")
    stream, w = cuda.Stream(), cuda.wrapper()
    H, K = TINY_DIMS["hidden"], TINY_DIMS["heads"]
    assert ctx.set_input_shape("hidden_states", (2, H))
    with pytest.raises(ApiViolation, match="no address bound"):
        ctx.execute_async_v3(stream.ptr)
    inp = w.malloc(2 * H * 4)
    ctx.set_tensor_address("hidden_states", inp)
    ctx.set_tensor_address("head_features", inp)
    with pytest.raises(ApiViolation, match="share address"):
        ctx.execute_async_v3(stream.ptr)
    small = w.malloc(2 * K * H * 4 - 4)  # one float short
    ctx.set_tensor_address("head_features", small)
    assert ctx.execute_async_v3(stream.ptr)
    with pytest.raises(ApiViolation, match="4 bytes past the end"):
        stream.synchronize()


def test_stream_work_lands_at_synchronize(env):
    emu, art, trt, cuda = env
    stream, w = cuda.Stream(), cuda.wrapper()
    src = np.arange(64, dtype=np.float32)
    dst = np.zeros_like(src)
    ptr = w.malloc(src.nbytes)
    w.memcpy(ptr, src.ctypes.data, src.nbytes, cuda.MemcpyKind.HostToDevice, stream.ptr)
    w.memcpy(dst.ctypes.data, ptr, src.nbytes, cuda.MemcpyKind.DeviceToHost, stream.ptr)
    assert not dst.any()  # read before the sync: not there yet
    stream.synchronize()
    np.testing.assert_array_equal(dst, src)
    with pytest.raises(ApiViolation, match="overlap"):
        w.memcpy(ptr + 16, ptr, 64, cuda.MemcpyKind.DeviceToDevice, stream.ptr)
    w.free(ptr)
    with pytest.raises(ApiViolation, match="double free"):
        w.free(ptr)
    stream.free()
    with pytest.raises(ApiViolation, match="not a live CUDA stream"):
        w.memcpy(dst.ctypes.data, ptr, 4, cuda.MemcpyKind.DeviceToHost, stream.ptr)


def test_build_rules(env, tmp_path):
    emu, art, trt, cuda = env
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    assert trt.OnnxParser(network, logger).parse_from_file(str(art.graph_path("heads")))
    config = builder.create_builder_config()
    config.set_flag(trt.BuilderFlag.FP16)
    with pytest.raises(ApiViolation, match="not allowed on a strongly typed network"):
        builder.build_serialized_network(network, config)
    config = builder.create_builder_config()
    with pytest.raises(ApiViolation, match="dynamic inputs need an optimization profile"):
        builder.build_serialized_network(network, config)
    profile = builder.create_optimization_profile()
    profile.set_shape("hidden_states", trt.Dims([4, 32]), trt.Dims([1, 32]), trt.Dims([8, 32]))
    assert config.add_optimization_profile(profile) == -1  # min > opt
    engine = (art.root / "engines" / "heads.orin-nano-8gb.engine").read_bytes()
    emu.version = "10.13.0.35"  # another TensorRT: its runtime refuses the engine
    assert trt.Runtime(logger).deserialize_cuda_engine(engine) is None
