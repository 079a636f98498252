"""A strict TensorRT 10 + CUDA emulator, for running spectrt's TensorRT code paths on a CPU (test code only).

``install(monkeypatch)`` puts a fake ``tensorrt`` module and a fake ``polygraphy.cuda`` into ``sys.modules``.
It implements exactly the subset of the API that ``spectrt build``, the TensorRT runners and
``spectrt profile --backend trt`` call; ``tests/test_trt_emulator_api.py`` compares every public method of
every class here with tensorrt-stubs (the 10.13 API) and with the installed polygraphy, so it cannot drift.

Device memory is numpy ``uint8`` arrays behind integer addresses (allocations 256-byte aligned, poisoned
with 0xFF, with guard gaps between them). Work on a stream (copies, ``execute_async_v3``) is queued and runs
at ``synchronize``, so a host read before a sync sees stale data. An "engine" is the ONNX file's path, its
I/O, the optimization profiles and the build flags; executing it runs the ONNX graph with ONNX Runtime
(CPU) on the bytes at the bound addresses.

The rules it enforces, each a documented TensorRT/CUDA rule (or, marked *, stricter than documented):
  * ``set_tensor_address``: a known I/O tensor; non-null, 256-byte aligned, inside a live allocation.
  * ``execute_async_v3``: every input's shape and every I/O tensor's address set since the last profile
    switch (*: TensorRT may keep addresses across switches); all addresses distinct, empty tensors
    included; each tensor's bytes inside its allocation; no output overlapping another I/O tensor.
  * ``set_optimization_profile_async`` before ``set_input_shape`` when an engine has several profiles
    (a switch invalidates the shapes); shapes of the right rank, static dims equal, every dim inside the
    selected profile's [min, max].
  * dtypes per tensor: the engine's I/O dtypes are the ONNX graph's; outputs must fit at their dtype.
  * builds: precision flags are refused on STRONGLY_TYPED networks; every dynamic input needs a
    (min <= opt <= max) shape in every optimization profile; engines load only in the TensorRT version
    that built them; ``set_timing_cache`` returns False for a cache from another version.
  * CUDA: copies inside allocations, no overlapping device-to-device copy, no use of freed memory/streams.

What it does not emulate: TensorRT's numerics (fp16 kernels, TF32, TopK tie-breaking, layer fusion), its
speed, its memory use, or anything the runner does not call. By default a violation raises ``ApiViolation``
at the offending call; ``strict=False`` makes the emulator answer like TensorRT instead (False / None).
"""
from __future__ import annotations

import bisect
import ctypes
import enum
import json
import os
import sys
import types
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ALIGN = 256
MAGIC = b"SPECTRT-EMULATED-TENSORRT-ENGINE\n"
CACHE_MAGIC = b"SPECTRT-EMULATED-TIMING-CACHE "
_EMU: "Emulator | None" = None


class ApiViolation(AssertionError):
    """spectrt used the (emulated) TensorRT or CUDA API against its rules."""


def _emu() -> "Emulator":
    if _EMU is None:
        raise RuntimeError("the TensorRT emulator is not installed (use tests.trt_emulator.install)")
    return _EMU


class Emulator:
    """The emulated machine: device memory, streams, TensorRT version and GPU, and what happened."""

    def __init__(self, version: str, gpu: str, compute_capability: str, strict: bool):
        self.version, self.gpu, self.compute_capability, self.strict = version, gpu, compute_capability, strict
        self.mem: dict[int, np.ndarray] = {}
        self.bases: list[int] = []
        self.next = 0x7F0000000000
        self.streams: dict[int, list] = {}
        self.next_stream = 0x5000
        self.calls: Counter = Counter()
        self.errors: list[str] = []
        self.executions: list[dict] = []  # per execute: graph, profile index, input shapes
        self.sessions: dict[str, object] = {}

    def fail(self, msg: str):
        """A rule was broken: raise (strict) or log and answer like TensorRT (False)."""
        self.errors.append(msg)
        if self.strict:
            raise ApiViolation(msg)
        return False

    # device memory
    def malloc(self, nbytes: int) -> int:
        size = max(int(nbytes), 1)
        base = self.next
        self.next += (size + 2 * ALIGN - 1) // ALIGN * ALIGN + 4096  # a guard gap after every allocation
        self.mem[base] = np.full(size, 0xFF, np.uint8)  # poison: NaN as floats, -1 as ints
        bisect.insort(self.bases, base)
        self.calls["malloc"] += 1
        return base

    def free(self, ptr: int) -> None:
        if ptr not in self.mem:
            self.fail(f"cudaFree({ptr:#x}): not a live allocation (double free?)")
            return
        del self.mem[ptr]
        self.bases.remove(ptr)
        self.calls["free"] += 1

    def allocation(self, addr: int) -> tuple[int, np.ndarray] | None:
        i = bisect.bisect_right(self.bases, addr) - 1
        if i < 0:
            return None
        base = self.bases[i]
        arr = self.mem[base]
        return (base, arr) if addr < base + len(arr) else None

    def region(self, addr: int, nbytes: int, what: str) -> np.ndarray | None:
        """``nbytes`` of device memory at ``addr`` (a uint8 view); a violation if not inside one allocation."""
        found = self.allocation(addr)
        if found is None:
            return self.fail(f"{what}: address {addr:#x} is not in any live device allocation")
        base, arr = found
        if addr + nbytes > base + len(arr):
            return self.fail(f"{what}: {nbytes} bytes at {addr:#x} run {addr + nbytes - base - len(arr)} bytes past "
                             f"the end of its {len(arr)}-byte allocation")
        return arr[addr - base: addr - base + nbytes]

    # streams: work is queued and runs at synchronize, in order
    def create_stream(self) -> int:
        self.next_stream += 16
        self.streams[self.next_stream] = []
        return self.next_stream

    def enqueue(self, stream: int, what: str, work) -> bool:
        if stream not in self.streams:
            return self.fail(f"{what}: stream {stream:#x} is not a live CUDA stream")
        self.streams[stream].append(work)
        return True

    def synchronize(self, stream: int) -> None:
        if stream not in self.streams:
            self.fail(f"cudaStreamSynchronize({stream:#x}): not a live stream")
            return
        queue = self.streams[stream]
        while queue:
            queue.pop(0)()

    def destroy_stream(self, stream: int) -> None:
        self.synchronize(stream)
        self.streams.pop(stream, None)

    def memcpy(self, dst: int, src: int, nbytes: int, kind: int, stream) -> None:
        names = {1: "H2D", 2: "D2H", 3: "D2D"}
        if kind not in names:
            self.fail(f"cudaMemcpy kind {kind}: spectrt copies host<->device or device->device only")
            return
        name = names[kind]
        self.calls[name] += 1
        self.calls[f"{name} bytes"] += nbytes
        if nbytes == 0:
            return
        if name == "H2D":
            data = ctypes.string_at(src, nbytes)  # pageable host memory is staged during the call

            def work():
                out = self.region(dst, nbytes, "cudaMemcpy H2D destination")
                if out is not None and out is not False:
                    out[:] = np.frombuffer(data, np.uint8)
        elif name == "D2H":
            def work():
                got = self.region(src, nbytes, "cudaMemcpy D2H source")
                if got is not None and got is not False:
                    ctypes.memmove(dst, got.ctypes.data, nbytes)
        else:
            if src < dst + nbytes and dst < src + nbytes:
                self.fail(f"cudaMemcpy D2D: source {src:#x} and destination {dst:#x} overlap ({nbytes} bytes)")
                return

            def work():
                a = self.region(src, nbytes, "cudaMemcpy D2D source")
                b = self.region(dst, nbytes, "cudaMemcpy D2D destination")
                if isinstance(a, np.ndarray) and isinstance(b, np.ndarray):
                    b[:] = a
        if stream is None:  # synchronous copy: waits for every (blocking) stream first
            for s in list(self.streams):
                self.synchronize(s)
            work()
        else:
            self.enqueue(stream, f"cudaMemcpyAsync {name}", work)

    def session(self, path: str):
        if path not in self.sessions:
            import onnxruntime as ort

            opts = ort.SessionOptions()
            opts.intra_op_num_threads = 1
            opts.log_severity_level = 3
            self.sessions[path] = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        return self.sessions[path]


# ==================================================================================================
# fake polygraphy.cuda (same names and signatures as polygraphy's; ctypes handle for current_facts())


class MemcpyKind:
    HostToHost = ctypes.c_int(0)
    HostToDevice = ctypes.c_int(1)
    DeviceToHost = ctypes.c_int(2)
    DeviceToDevice = ctypes.c_int(3)
    Default = ctypes.c_int(4)


class _LibCudart:
    """The few libcudart entry points spectrt calls through ``wrapper().handle`` (device facts)."""

    def cudaGetDevice(self, ref) -> int:
        ref._obj.value = 0
        return 0

    def cudaDeviceGetAttribute(self, ref, attr, dev) -> int:
        major, minor = _emu().compute_capability.split(".")
        ref._obj.value = {75: int(major), 76: int(minor)}[attr]
        return 0

    def cudaGetDeviceProperties_v2(self, props, dev) -> int:
        name = _emu().gpu.encode()[:255]
        ctypes.memmove(props, name + b"\0", len(name) + 1)
        return 0

    cudaGetDeviceProperties = cudaGetDeviceProperties_v2


class Cuda:
    def __init__(self):
        self.handle = _LibCudart()

    def check(self, status):
        if status != 0:
            raise RuntimeError(f"CUDA Error: {status}")

    def create_stream(self):
        return _emu().create_stream()

    def stream_synchronize(self, ptr):
        _emu().synchronize(ptr)

    def destroy_stream(self, ptr):
        _emu().destroy_stream(ptr)

    def malloc(self, nbytes):
        return _emu().malloc(nbytes)

    def free(self, ptr):
        _emu().free(ptr)

    def memcpy(self, dst, src, nbytes, kind, stream_ptr=None):
        _emu().memcpy(int(dst), int(src), int(nbytes), getattr(kind, "value", kind), stream_ptr)


def wrapper():
    return _CUDA


_CUDA = Cuda()


class Stream:
    def __init__(self):
        self.ptr = _emu().create_stream()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc_value, traceback):
        self.free()

    def free(self):
        _emu().destroy_stream(self.ptr)

    def synchronize(self):
        _emu().synchronize(self.ptr)


# ==================================================================================================
# fake tensorrt: enums and small types


class DataType(enum.Enum):
    FLOAT = 0
    HALF = 1
    INT8 = 2
    INT32 = 3
    BOOL = 4
    UINT8 = 5
    FP8 = 6
    BF16 = 7
    INT64 = 8
    INT4 = 9
    FP4 = 10


_NUMPY = {DataType.FLOAT: np.float32, DataType.HALF: np.float16, DataType.INT8: np.int8, DataType.INT32: np.int32,
          DataType.BOOL: np.bool_, DataType.UINT8: np.uint8, DataType.INT64: np.int64}
_FROM_ONNX = {1: DataType.FLOAT, 10: DataType.HALF, 3: DataType.INT8, 6: DataType.INT32, 9: DataType.BOOL,
              2: DataType.UINT8, 7: DataType.INT64, 16: DataType.BF16}


def nptype(trt_type):
    return _NUMPY[trt_type]


class TensorIOMode(enum.Enum):
    NONE = 0
    INPUT = 1
    OUTPUT = 2


class NetworkDefinitionCreationFlag(enum.IntEnum):
    EXPLICIT_BATCH = 0
    STRONGLY_TYPED = 1


class BuilderFlag(enum.IntEnum):
    FP16 = 0
    INT8 = 1
    TF32 = 7
    FP8 = 12
    BF16 = 17
    FP4 = 23


PRECISION_FLAGS = (BuilderFlag.FP16, BuilderFlag.BF16, BuilderFlag.INT8, BuilderFlag.FP8, BuilderFlag.FP4)


class MemoryPoolType(enum.IntEnum):
    WORKSPACE = 0


class ExecutionContextAllocationStrategy(enum.IntEnum):
    STATIC = 0
    ON_PROFILE_CHANGE = 1
    USER_MANAGED = 2


class Dims(tuple):
    def __new__(cls, shape=()):
        return super().__new__(cls, (int(d) for d in shape))

    def __init__(self, shape=()):
        super().__init__()


class ILogger:
    class Severity(enum.IntEnum):
        INTERNAL_ERROR = 0
        ERROR = 1
        WARNING = 2
        INFO = 3
        VERBOSE = 4

    def __init__(self):
        pass

    def log(self, severity, msg):
        pass


class Logger(ILogger):
    INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = tuple(ILogger.Severity)

    def __init__(self, min_severity=ILogger.Severity.WARNING):
        super().__init__()
        self.min_severity = min_severity

    def log(self, severity, msg):
        if severity <= self.min_severity:
            print(f"[emulated TensorRT] {msg}", file=sys.stderr)


class IProgressMonitor:
    def __init__(self):
        pass

    def phase_start(self, phase_name, parent_phase, num_steps):
        pass

    def step_complete(self, phase_name, step):
        return True

    def phase_finish(self, phase_name):
        pass


class IHostMemory(bytes):
    @property
    def nbytes(self):
        return len(self)

    @property
    def dtype(self):
        return DataType.UINT8


class ITimingCache:
    def __init__(self, data: bytes):
        self._data = data

    def serialize(self):
        return IHostMemory(self._data)


class ParserError:
    def __init__(self, desc: str):
        self._desc = desc

    def desc(self):
        return self._desc

    def __str__(self):
        return self._desc


@dataclass
class _Tensor:
    name: str
    mode: TensorIOMode
    dtype: DataType
    shape: tuple  # -1 = dynamic

    def to_json(self) -> dict:
        return {"name": self.name, "mode": self.mode.name, "dtype": self.dtype.name, "shape": list(self.shape)}

    @staticmethod
    def from_json(d: dict) -> "_Tensor":
        return _Tensor(d["name"], TensorIOMode[d["mode"]], DataType[d["dtype"]], tuple(d["shape"]))


# ==================================================================================================
# fake tensorrt: build


class INetworkDefinition:
    def __init__(self, flags: int):
        self._flags = flags
        self._onnx: str | None = None
        self._io: list[_Tensor] = []

    @property
    def num_inputs(self):
        return sum(t.mode == TensorIOMode.INPUT for t in self._io)


class OnnxParser:
    def __init__(self, network, logger):
        self._network, self._errors = network, []

    @property
    def num_errors(self):
        return len(self._errors)

    def get_error(self, index):
        return self._errors[index]

    def parse_from_file(self, model):
        import onnx

        path = Path(model)
        try:
            m = onnx.load(str(path), load_external_data=False)
        except Exception as e:  # noqa: BLE001 - whatever onnx raises is a parse error
            self._errors.append(ParserError(f"{path}: {e}"))
            return False
        for init in m.graph.initializer:
            if init.data_location == onnx.TensorProto.EXTERNAL:
                loc = next(e.value for e in init.external_data if e.key == "location")
                if not (path.parent / loc).is_file():
                    self._errors.append(ParserError(f"external weights file '{loc}' of '{init.name}' not found"))
                    return False
        inits = {i.name for i in m.graph.initializer}

        def tensor(vi, mode):
            tt = vi.type.tensor_type
            shape = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in tt.shape.dim)
            return _Tensor(vi.name, mode, _FROM_ONNX[tt.elem_type], shape)

        self._network._io = [tensor(v, TensorIOMode.INPUT) for v in m.graph.input if v.name not in inits]
        self._network._io += [tensor(v, TensorIOMode.OUTPUT) for v in m.graph.output]
        self._network._onnx = str(path.resolve())
        return True


class IOptimizationProfile:
    def __init__(self):
        self._shapes: dict[str, tuple] = {}

    def set_shape(self, input, min, opt, max):  # noqa: A002 - TensorRT's parameter names
        for s in (min, opt, max):
            if not isinstance(s, (Dims, tuple, list)):
                _emu().fail(f"set_shape('{input}'): {s!r} is not a Dims")
        self._shapes[input] = tuple(tuple(int(d) for d in s) for s in (min, opt, max))

    def get_shape(self, input):  # noqa: A002
        return [Dims(s) for s in self._shapes[input]]


class IBuilderConfig:
    def __init__(self):
        self._flags: set = set()
        self._profiles: list[IOptimizationProfile] = []
        self._pools: dict = {}
        self._cache: ITimingCache | None = None
        self.builder_optimization_level = 3
        self.progress_monitor = None

    def set_memory_pool_limit(self, pool, pool_size):
        self._pools[pool] = int(pool_size)

    def set_flag(self, flag):
        self._flags.add(BuilderFlag(flag))

    def add_optimization_profile(self, profile):
        for name, (mn, opt, mx) in profile._shapes.items():
            if len({len(mn), len(opt), len(mx)}) != 1 or not all(a <= b <= c for a, b, c in zip(mn, opt, mx)):
                _emu().errors.append(f"optimization profile: '{name}' needs min <= opt <= max, got {mn}, {opt}, {mx}")
                return -1
        self._profiles.append(profile)
        return len(self._profiles) - 1

    def create_timing_cache(self, serialized_timing_cache):
        return ITimingCache(bytes(serialized_timing_cache))

    def set_timing_cache(self, cache, ignore_mismatch):
        ours = CACHE_MAGIC + _emu().version.encode()
        if cache._data and cache._data != ours and not ignore_mismatch:
            _emu().errors.append("set_timing_cache: the cache was made by another TensorRT version or device")
            return False
        self._cache = cache
        return True

    def get_timing_cache(self):
        return self._cache


class Builder:
    def __init__(self, logger):
        self._logger = logger

    def create_network(self, flags=0):
        return INetworkDefinition(int(flags))

    def create_builder_config(self):
        return IBuilderConfig()

    def create_optimization_profile(self):
        return IOptimizationProfile()

    def build_serialized_network(self, network, config):
        emu = _emu()
        strongly_typed = bool(network._flags & (1 << int(NetworkDefinitionCreationFlag.STRONGLY_TYPED)))
        if network._onnx is None:
            return emu.fail("build_serialized_network: the network is empty (nothing parsed)") or None
        precision = sorted(f.name for f in config._flags if f in PRECISION_FLAGS)
        if strongly_typed and precision:
            return emu.fail(f"build_serialized_network: builder flags {precision} are not allowed on a strongly typed "
                            "network (its tensor types set the precision)") or None
        inputs = [t for t in network._io if t.mode == TensorIOMode.INPUT]
        if any(-1 in t.shape for t in inputs) and not config._profiles:
            return emu.fail("build_serialized_network: dynamic inputs need an optimization profile") or None
        for k, p in enumerate(config._profiles):
            for t in inputs:
                if t.name not in p._shapes:
                    if -1 in t.shape:
                        return emu.fail(f"optimization profile {k}: no shape for dynamic input '{t.name}'") or None
                    p._shapes[t.name] = (t.shape,) * 3
                for s in p._shapes[t.name]:
                    if len(s) != len(t.shape) or any(d != -1 and d != x for d, x in zip(t.shape, s)):
                        return emu.fail(f"optimization profile {k}: shape {s} of '{t.name}' does not match the "
                                        f"network's {t.shape}") or None
            unknown = set(p._shapes) - {t.name for t in inputs}
            if unknown:
                return emu.fail(f"optimization profile {k}: {sorted(unknown)} are not network inputs") or None
        monitor = config.progress_monitor
        if monitor is not None:
            monitor.phase_start("Building engine", None, 1)
            if monitor.step_complete("Building engine", 0) is not True:
                return emu.fail("build cancelled by the progress monitor") or None
            monitor.phase_finish("Building engine")
        if config._cache is not None:
            config._cache._data = CACHE_MAGIC + emu.version.encode()
        blob = {"tensorrt": emu.version, "onnx": network._onnx, "io": [t.to_json() for t in network._io],
                "profiles": [{n: [list(s) for s in shapes] for n, shapes in p._shapes.items()} for p in config._profiles],
                "strongly_typed": strongly_typed, "flags": precision,
                "builder_optimization_level": config.builder_optimization_level,
                "workspace": config._pools.get(MemoryPoolType.WORKSPACE)}
        emu.calls["build"] += 1
        return IHostMemory(MAGIC + json.dumps(blob).encode())


def read_engine(data: bytes) -> dict:
    """An emulated engine file's content (for tests: flags, profiles, the ONNX it runs)."""
    data = bytes(data)
    assert data.startswith(MAGIC), "not an emulated engine"
    return json.loads(data[len(MAGIC):])


# ==================================================================================================
# fake tensorrt: runtime


class Runtime:
    def __init__(self, logger):
        self._logger = logger

    def deserialize_cuda_engine(self, serialized_engine):
        emu = _emu()
        data = bytes(serialized_engine)
        if not data.startswith(MAGIC):
            emu.errors.append("deserialize_cuda_engine: not an engine")
            return None
        blob = json.loads(data[len(MAGIC):])
        if blob["tensorrt"] != emu.version:
            emu.errors.append(f"deserialize_cuda_engine: built by TensorRT {blob['tensorrt']}, this is {emu.version}")
            return None
        return ICudaEngine(blob)


class ICudaEngine:
    def __init__(self, blob: dict):
        self._blob = blob
        self._io = {t["name"]: _Tensor.from_json(t) for t in blob["io"]}
        self._names = list(self._io)
        self._profiles = [{n: tuple(tuple(s) for s in shapes) for n, shapes in p.items()} for p in blob["profiles"]]
        self._graph = Path(blob["onnx"]).stem

    @property
    def num_io_tensors(self):
        return len(self._names)

    @property
    def num_optimization_profiles(self):
        return max(1, len(self._profiles))

    def get_tensor_name(self, index):
        return self._names[index]

    def get_tensor_mode(self, name):
        return self._io[name].mode if name in self._io else TensorIOMode.NONE

    def get_tensor_dtype(self, name):
        return self._io[name].dtype

    def get_tensor_shape(self, name):
        return Dims(self._io[name].shape)

    def get_tensor_profile_shape(self, name, profile_index):
        return [Dims(s) for s in self._profiles[profile_index][name]]

    def create_execution_context(self, strategy=ExecutionContextAllocationStrategy.STATIC):
        return IExecutionContext(self)


class IExecutionContext:
    def __init__(self, engine: ICudaEngine):
        self._engine = engine
        self._profile = 0
        self._selected = engine.num_optimization_profiles == 1
        self._shapes: dict[str, tuple] = {}
        self._addresses: dict[str, int] = {}

    @property
    def active_optimization_profile(self):
        return self._profile

    def set_optimization_profile_async(self, profile_index, stream_handle):
        emu = _emu()
        if not 0 <= profile_index < self._engine.num_optimization_profiles:
            return emu.fail(f"set_optimization_profile_async({profile_index}): the engine has "
                            f"{self._engine.num_optimization_profiles} profile(s)")
        if stream_handle not in emu.streams:
            return emu.fail(f"set_optimization_profile_async: stream {stream_handle:#x} is not a live stream")
        self._profile, self._selected = profile_index, True
        self._shapes.clear()  # shapes belong to a profile
        self._addresses.clear()  # * stricter than documented: bind again after a switch
        return True

    def set_input_shape(self, name, shape):
        emu, engine = _emu(), self._engine
        t = engine._io.get(name)
        if t is None or t.mode != TensorIOMode.INPUT:
            return emu.fail(f"set_input_shape('{name}'): not an input of the {engine._graph} engine")
        if not self._selected:
            return emu.fail(f"set_input_shape('{name}') before set_optimization_profile_async: the {engine._graph} "
                            f"engine has {engine.num_optimization_profiles} optimization profiles")
        shape = tuple(int(d) for d in shape)
        if len(shape) != len(t.shape) or any(d != -1 and d != x for d, x in zip(t.shape, shape)):
            return emu.fail(f"set_input_shape('{name}', {list(shape)}): the engine's shape is {list(t.shape)}")
        if engine._profiles:
            mn, _, mx = engine._profiles[self._profile][name]
            if not all(a <= x <= b for a, x, b in zip(mn, shape, mx)):
                return emu.fail(f"set_input_shape('{name}', {list(shape)}): outside optimization profile "
                                f"{self._profile} ({list(mn)} .. {list(mx)})")
        self._shapes[name] = shape
        return True

    def set_tensor_address(self, name, memory):
        emu = _emu()
        if name not in self._engine._io:
            return emu.fail(f"set_tensor_address('{name}'): not an I/O tensor of the {self._engine._graph} engine")
        if not memory:
            return emu.fail(f"set_tensor_address('{name}'): null address (empty tensors need one too)")
        if memory % ALIGN:
            return emu.fail(f"set_tensor_address('{name}', {memory:#x}): not {ALIGN}-byte aligned "
                            f"(off by {memory % ALIGN})")
        if emu.allocation(memory) is None:
            return emu.fail(f"set_tensor_address('{name}', {memory:#x}): not in a live device allocation")
        self._addresses[name] = int(memory)
        return True

    def execute_async_v3(self, stream_handle):
        emu, engine = _emu(), self._engine
        graph = engine._graph
        if stream_handle not in emu.streams:
            return emu.fail(f"execute_async_v3: stream {stream_handle:#x} is not a live stream")
        missing = [n for n, t in engine._io.items() if t.mode == TensorIOMode.INPUT and n not in self._shapes]
        if missing:
            return emu.fail(f"execute_async_v3 ({graph}): no shape set for input(s) {missing[:3]}")
        unbound = [n for n in engine._names if n not in self._addresses]
        if unbound:
            return emu.fail(f"execute_async_v3 ({graph}): no address bound for {unbound[:3]}")
        by_addr: dict[int, str] = {}
        for n in engine._names:
            a = self._addresses[n]
            if a in by_addr:
                return emu.fail(f"execute_async_v3 ({graph}): '{n}' and '{by_addr[a]}' share address {a:#x} (every "
                                "I/O tensor needs its own, empty ones included)")
            by_addr[a] = n
        inputs = {}
        for n, t in engine._io.items():
            if t.mode == TensorIOMode.INPUT:
                dt = np.dtype(nptype(t.dtype))
                nbytes = int(np.prod(self._shapes[n])) * dt.itemsize
                if emu.region(self._addresses[n], nbytes, f"{graph} input '{n}'") is False:
                    return False
                inputs[n] = (self._addresses[n], self._shapes[n], dt)
        outputs = {n: self._addresses[n] for n, t in engine._io.items() if t.mode == TensorIOMode.OUTPUT}
        emu.calls["execute"] += 1
        emu.executions.append({"graph": graph, "profile": self._profile,
                               "shapes": {n: s for n, (_, s, _) in inputs.items()}})
        return emu.enqueue(stream_handle, "execute_async_v3", lambda: self._run(inputs, outputs))

    def _run(self, inputs: dict, outputs: dict) -> None:
        emu, engine = _emu(), self._engine
        feeds = {}
        regions = []  # (start, end, name, is_output)
        for n, (addr, shape, dt) in inputs.items():
            nbytes = int(np.prod(shape)) * dt.itemsize
            raw = emu.region(addr, nbytes, f"{engine._graph} input '{n}'")
            if not isinstance(raw, np.ndarray):
                return
            feeds[n] = np.frombuffer(raw.tobytes(), dt).reshape(shape)
            regions.append((addr, addr + max(nbytes, 1), n, False))
        session = emu.session(engine._blob["onnx"])
        names = [o.name for o in session.get_outputs()]
        results = dict(zip(names, session.run(names, feeds)))
        for n, addr in outputs.items():
            value = np.ascontiguousarray(results[n])
            want = np.dtype(nptype(engine._io[n].dtype))
            if value.dtype != want:
                emu.fail(f"{engine._graph} output '{n}': the graph produced {value.dtype}, the engine says {want}")
                return
            regions.append((addr, addr + max(value.nbytes, 1), n, True))
        for i, (s1, e1, n1, o1) in enumerate(regions):
            for s2, e2, n2, o2 in regions[i + 1:]:
                if (o1 or o2) and s1 < e2 and s2 < e1:
                    emu.fail(f"{engine._graph}: output '{n1 if o1 else n2}' overlaps '{n2 if o1 else n1}' in device memory")
                    return
        for n, addr in outputs.items():
            value = np.ascontiguousarray(results[n])
            out = emu.region(addr, value.nbytes, f"{engine._graph} output '{n}' ({list(value.shape)} {value.dtype})")
            if isinstance(out, np.ndarray):
                out[:] = value.reshape(-1).view(np.uint8)


# ==================================================================================================
# installation


TENSORRT_API = (Builder, BuilderFlag, DataType, Dims, ExecutionContextAllocationStrategy, IBuilderConfig,
                ICudaEngine, IExecutionContext, IHostMemory, ILogger, INetworkDefinition, IOptimizationProfile,
                IProgressMonitor, ITimingCache, Logger, MemoryPoolType, NetworkDefinitionCreationFlag, OnnxParser,
                ParserError, Runtime, TensorIOMode)
CUDA_API = (Cuda, Stream, MemcpyKind)


def install(monkeypatch, version: str = "10.3.0.30", gpu: str = "Emulated Orin (nvgpu)",
            compute_capability: str = "8.7", strict: bool = True) -> Emulator:
    """Make ``import tensorrt`` and ``from polygraphy import cuda`` give the emulator (undone by monkeypatch)."""
    import polygraphy

    emu = Emulator(version, gpu, compute_capability, strict)
    trt = types.ModuleType("tensorrt")
    for obj in TENSORRT_API:
        setattr(trt, obj.__name__, obj)
    trt.nptype = nptype
    trt.__version__ = version
    cuda = types.ModuleType("polygraphy.cuda")
    cuda.wrapper, cuda.Stream, cuda.MemcpyKind, cuda.Cuda = wrapper, Stream, MemcpyKind, Cuda
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setitem(sys.modules, "polygraphy.cuda", cuda)
    monkeypatch.setattr(polygraphy, "cuda", cuda, raising=False)
    monkeypatch.setattr(sys.modules[__name__], "_EMU", emu)
    return emu


def emulated_engine_files(root: str | os.PathLike) -> dict[str, dict]:
    """``{engine file name: content}`` of an artifact's emulated engines."""
    return {p.name: read_engine(p.read_bytes()) for p in sorted(Path(root, "engines").glob("*.engine"))}


__all__ = ["ApiViolation", "Emulator", "install", "read_engine", "emulated_engine_files", "TENSORRT_API", "CUDA_API"]
