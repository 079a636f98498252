"""TensorRT engines at load time: find an artifact's engine for a device profile, check its build record
against this TensorRT and GPU and against the graph it was built from, and deserialize it.

Engines live in ``DIR/engines/<graph>.<profile>.engine``; their records in ``manifest.engines`` under
``engine_key(graph, profile)``, always with the device profile's *name* (a profile given as a YAML path
is resolved to its name by whoever loads the YAML: ``spectrt.profiles.load_profile(path).name``).

tensorrt and polygraphy are optional and imported inside the functions that need them; ``require_tensorrt()`` is the
one place that imports tensorrt and checks its version. Everything else here is pure and CPU-tested.
"""
from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from spectrt.runtime.artifact import Artifact, EngineRecord, engine_key
from spectrt.runtime.errors import SpectrtError

if TYPE_CHECKING:
    import tensorrt as trt

ENGINE_DIR = "engines"
TRT_MIN = (10, 0)  # the contract needs TensorRT 10 (tensor-address API, STRONGLY_TYPED, INT64 I/O)
INSTALL_HINT = ("on a Jetson use JetPack's TensorRT (JetPack 6.1 or newer) in a venv made with "
                "--system-site-packages; elsewhere install NVIDIA's TensorRT 10 wheel (see docs/JETSON.md)")


class EngineError(SpectrtError):
    """An engine is missing, stale, or was built for another TensorRT / GPU / graph."""


def parse_version(text: str) -> tuple[int, ...]:
    """'10.3.0.30' -> (10, 3, 0, 30); stops at the first non-numeric part ('10.3.0.post1' -> (10, 3, 0))."""
    out = []
    for part in str(text).split("."):
        m = re.match(r"\d+", part)
        if not m:
            break
        out.append(int(m.group()))
    return tuple(out)


def require_tensorrt():
    """The ``tensorrt`` module, imported and version-checked; SpectrtError when it is unusable.

    A ``tensorrt`` without ``__version__`` counts as missing: installing ``tensorrt-stubs`` leaves a
    ``tensorrt/`` folder of .pyi files that imports as an empty namespace package. Callers follow this with
    a plain ``import tensorrt as trt`` so the type checker sees the real API.
    """
    try:
        import tensorrt
    except ImportError:
        version = None
    else:
        version = getattr(tensorrt, "__version__", None)
    if version is None:
        raise SpectrtError(f"TensorRT's Python package is not installed; {INSTALL_HINT}")
    if parse_version(version)[:2] < TRT_MIN:
        raise SpectrtError(f"TensorRT {version} is too old: spectrt needs TensorRT >= 10.0 (JetPack 6.0 ships 8.6); "
                           f"{INSTALL_HINT}")
    return tensorrt


@dataclass(frozen=True)
class DeviceFacts:
    """What an engine is tied to: the exact TensorRT version and the GPU."""

    tensorrt: str
    gpu: str
    compute_capability: str  # "8.7"


def current_facts() -> DeviceFacts:
    """TensorRT version, name and compute capability of CUDA device 0 (needs tensorrt + a CUDA runtime)."""
    import ctypes

    require_tensorrt()
    import tensorrt as trt
    from polygraphy import cuda

    dev, major, minor = ctypes.c_int(0), ctypes.c_int(0), ctypes.c_int(0)
    props = ctypes.create_string_buffer(8192)  # cudaDeviceProp starts with char name[256]
    try:
        w = cuda.wrapper()
        w.check(w.handle.cudaGetDevice(ctypes.byref(dev)))
        w.check(w.handle.cudaDeviceGetAttribute(ctypes.byref(major), 75, dev))  # cudaDevAttrComputeCapabilityMajor
        w.check(w.handle.cudaDeviceGetAttribute(ctypes.byref(minor), 76, dev))  # cudaDevAttrComputeCapabilityMinor
        get = getattr(w.handle, "cudaGetDeviceProperties_v2", None) or w.handle.cudaGetDeviceProperties
        w.check(get(props, dev))
    except Exception as e:  # noqa: BLE001 - polygraphy raises its own exception type for CUDA errors
        raise SpectrtError(f"no usable CUDA device ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    name = props.raw[:256].split(b"\0", 1)[0].decode(errors="replace")
    return DeviceFacts(trt.__version__, name, f"{major.value}.{minor.value}")


# --------------------------------------------------------------------------------------------------
# records (pure)


def engine_path(root: str | os.PathLike, graph: str, profile: str) -> Path:
    return Path(root) / ENGINE_DIR / f"{engine_key(graph, profile)}.engine"


def profile_name(profile) -> str:
    """The engine-key name of a device profile: a name, or anything with ``.name`` (a DeviceProfile).

    A YAML path is refused rather than guessed at: a user profile's name comes from its ``name:`` or its
    ``base:``, which only ``spectrt.profiles.load_profile`` resolves.
    """
    name = getattr(profile, "name", profile)
    if not isinstance(name, str) or not name:
        raise SpectrtError(f"not a device profile name: {profile!r}")
    if name.endswith((".yaml", ".yml")) or "/" in name or os.sep in name:
        raise SpectrtError(f"'{name}' is a device profile file: engines are keyed by the profile's name; pass "
                           f"spectrt.profiles.load_profile('{name}').name (the CLI does this for --profile)")
    return name


def resolve_profile(art: Artifact, graph: str, profile=None) -> str:
    """The device profile to load ``graph``'s engine for: the one given, else the only one built."""
    if profile is not None:
        return profile_name(profile)
    names = sorted({e.profile for e in art.manifest.engines.values() if e.graph == graph})
    if len(names) == 1:
        return names[0]
    if not names:
        raise EngineError(f"{art.root}: no TensorRT engine for '{graph}'; run `spectrt build {art.root} --profile "
                          "NAME` on this device")
    raise EngineError(f"{art.root}: '{graph}' has engines for several device profiles ({', '.join(names)}); "
                      "pass --profile")


def engine_record(art: Artifact, graph: str, profile: str) -> EngineRecord:
    rec = art.manifest.engines.get(engine_key(graph, profile))
    if rec is None:
        raise EngineError(f"{art.root}: no '{engine_key(graph, profile)}' engine; run `spectrt build {art.root} "
                          f"--profile {profile}`")
    return rec


def source_hashes(art: Artifact, graph: str) -> dict[str, str]:
    """sha256 of every file of ``graph`` (the .onnx and its external data), as recorded at export."""
    return {f.path: f.sha256 for f in art.graph(graph).files}


def check_engine_record(rec: EngineRecord, facts: DeviceFacts, source_sha256: dict[str, str],
                        strict_gpu: bool = True) -> None:
    """Raise EngineError when an engine can't (or shouldn't) run here."""
    name = engine_key(rec.graph, rec.profile)
    if rec.tensorrt != facts.tensorrt:
        raise EngineError(f"engine {name} was built with TensorRT {rec.tensorrt}, this is TensorRT {facts.tensorrt}; "
                          f"engines only load in the exact version that built them: rerun `spectrt build --profile "
                          f"{rec.profile}`")
    if rec.compute_capability != facts.compute_capability:
        raise EngineError(f"engine {name} was built for compute capability {rec.compute_capability} ({rec.gpu}), this "
                          f"GPU is {facts.compute_capability} ({facts.gpu}); rebuild it on this device")
    if strict_gpu and rec.gpu != facts.gpu:
        raise EngineError(f"engine {name} was built on {rec.gpu}, this GPU is {facts.gpu}; rebuild it here (kernels "
                          "are tuned per GPU)")
    if dict(rec.source_sha256) != dict(source_sha256):
        raise EngineError(f"engine {name} was built from another version of the '{rec.graph}' graph (sha256 differs "
                          "from the manifest); the model was re-exported: rebuild the engine")


def load_engine_bytes(art: Artifact, graph: str, profile: str, facts: DeviceFacts | None = None,
                      strict_gpu: bool = True, verify_hash: bool = False) -> bytes:
    """The serialized engine of ``graph`` for ``profile``, after checking its record against this machine
    (and with ``verify_hash`` the file against the record's sha256: seconds for a GB-sized engine)."""
    rec = engine_record(art, graph, profile)
    check_engine_record(rec, facts or current_facts(), source_hashes(art, graph), strict_gpu=strict_gpu)
    path = art.root / rec.file
    if not path.is_file():
        raise EngineError(f"{path}: missing (listed in the manifest); rerun `spectrt build`")
    data = path.read_bytes()
    if verify_hash and hashlib.sha256(data).hexdigest() != rec.engine_sha256:
        raise EngineError(f"{path}: sha256 differs from the build record (corrupt or replaced); rerun `spectrt build`")
    return data


class EngineFromArtifact:
    """Lazy loader (Polygraphy's ``XFromY`` style): picks and checks the engine record now, deserializes the
    engine when called. Returns ``(runtime, engine)``: the runtime must outlive the engine."""

    def __init__(self, art: Artifact, graph: str, profile=None, strict_gpu: bool = True):
        self.art, self.graph, self.strict_gpu = art, graph, strict_gpu
        self.profile = resolve_profile(art, graph, profile)
        self.record = engine_record(art, graph, self.profile)

    def __call__(self) -> tuple[trt.Runtime, trt.ICudaEngine]:
        require_tensorrt()
        import tensorrt as trt

        data = load_engine_bytes(self.art, self.graph, self.profile, strict_gpu=self.strict_gpu)
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        engine = runtime.deserialize_cuda_engine(data)
        if engine is None:
            raise EngineError(f"TensorRT could not deserialize the {engine_key(self.graph, self.profile)} engine "
                              "(see the TensorRT log above); rerun `spectrt build`")
        return runtime, engine


__all__ = ["DeviceFacts", "ENGINE_DIR", "EngineError", "EngineFromArtifact", "check_engine_record", "current_facts",
           "engine_path", "engine_record", "load_engine_bytes", "parse_version", "profile_name", "resolve_profile", "source_hashes"]
