"""`spectrt build`: one TensorRT engine per graph of an artifact, for one device profile.

Engines land in ``DIR/engines/<graph>.<profile>.engine`` (written atomically) and each build is recorded
in ``manifest["engines"]["<graph>.<profile>"]``: TensorRT version, GPU, compute capability, profile,
precision, optimization profiles and the sha256 of the source graph. Loading an engine checks that
record against the running TensorRT/GPU and the artifact's current graph hashes (``check_engine_record``,
pure, so it is tested on CPU).

Two TensorRT generations:
  * TensorRT 10.3 .. 10.11 (JetPack 6): weakly typed networks; precision comes from builder flags
    (``BuilderFlag.FP16`` ...), the ONNX may stay fp32.
  * TensorRT >= 10.12 (JetPack 7, desktop): strongly typed networks
    (``NetworkDefinitionCreationFlag.STRONGLY_TYPED``); precision comes from the ONNX tensor types, so
    export fp16 graphs (``spectrt export --dtype fp16``) for fp16 engines.
Quantized precisions (int8/fp8/fp4) need an explicitly quantized (Q/DQ) graph in both modes.

Nothing here imports tensorrt at module level; everything but ``EngineFromOnnx.__call__`` and
``current_facts`` runs on CPU.
"""
from __future__ import annotations

import json
import os
import shlex
import time
from dataclasses import dataclass
from pathlib import Path

from spectrt.profiles import (QUANTIZED_PRECISIONS, DeviceProfile, ShapeProfile, effective_max_context,
                              estimate_memory, graph_dims, load_profile, optimization_profiles, parse_version)
from spectrt.runtime.contract import has_spec
from spectrt.runtime.errors import SpectrtError
from spectrt.runtime.manifest import MANIFEST, load_artifact, sha256_file

ENGINE_DIR = "engines"
STRONGLY_TYPED_SINCE = (10, 12)  # weak typing (precision builder flags) deprecated from here on
FP4_SINCE = (10, 8)
_FLAG = {"fp16": "FP16", "bf16": "BF16", "int8": "INT8", "fp8": "FP8", "fp4": "FP4"}
_GRAPH_DTYPE_FOR = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


class EngineError(SpectrtError):
    """An engine is missing, stale, or was built for another TensorRT / GPU / graph."""


# --------------------------------------------------------------------------------------------------
# pure planning (CPU-testable)


@dataclass(frozen=True)
class PrecisionPlan:
    precision: str
    strongly_typed: bool
    flags: tuple  # BuilderFlag names to set (empty when strongly typed)
    note: str = ""


def engine_name(graph: str, profile: str) -> str:
    return f"{graph}.{profile}"


def engine_path(root, graph: str, profile: str) -> Path:
    return Path(root) / ENGINE_DIR / f"{engine_name(graph, profile)}.engine"


def uses_strong_typing(trt_version: str) -> bool:
    return parse_version(trt_version)[:2] >= STRONGLY_TYPED_SINCE


def plan_precision(precision: str, profile: DeviceProfile, graph_dtype: str, trt_version: str,
                   has_qdq: bool = False, strongly_typed: bool | None = None) -> PrecisionPlan:
    """How to get ``precision`` out of this TensorRT for a graph of ``graph_dtype``; SpectrtError if impossible."""
    if precision not in profile.precisions:
        raise SpectrtError(f"precision {precision} is not available on {profile.name} "
                           f"(supported: {', '.join(profile.precisions)})")
    strong = uses_strong_typing(trt_version) if strongly_typed is None else strongly_typed
    if precision in QUANTIZED_PRECISIONS and not has_qdq:
        raise SpectrtError(f"{precision} needs an explicitly quantized graph (QuantizeLinear/DequantizeLinear "
                           f"nodes, e.g. from `spectrt calibrate`); this graph has none. Build fp16 instead")
    if precision == "fp4" and parse_version(trt_version)[:2] < FP4_SINCE:
        raise SpectrtError(f"fp4 needs TensorRT >= 10.8 (this is {trt_version})")
    if strong:
        want = _GRAPH_DTYPE_FOR.get(precision)
        if want is not None and graph_dtype != want:
            raise SpectrtError(
                f"TensorRT {trt_version} builds strongly typed networks: the precision comes from the ONNX, which "
                f"is {graph_dtype}. For a {precision} engine export {want} graphs "
                f"(spectrt export --dtype {precision}), or pass --precision "
                f"{ {'float32': 'fp32', 'float16': 'fp16'}.get(graph_dtype, 'fp32') }")
        return PrecisionPlan(precision, True, (), "strongly typed: precision from the ONNX tensor types")
    if graph_dtype == "float16" and precision == "fp32":
        raise SpectrtError("the graph is float16: build it with --precision fp16 (or export float32 graphs)")
    flags = () if precision == "fp32" else (_FLAG[precision],)
    if precision in QUANTIZED_PRECISIONS:
        flags += ("FP16",)  # unquantized layers may run fp16 rather than fp32
    return PrecisionPlan(precision, False, flags, "weakly typed: builder precision flags")


def _shape_str(shape) -> str:
    return "x".join(str(int(d)) for d in shape)


def trtexec_command(onnx_path, engine, profiles: list[ShapeProfile], plan: PrecisionPlan,
                    profile: DeviceProfile, timing_cache=None) -> str:
    """The `trtexec` line that builds the same engine (one --minShapes/--optShapes/--maxShapes group per
    optimization profile)."""
    args = ["trtexec", f"--onnx={onnx_path}", f"--saveEngine={engine}"]
    for p in profiles:
        for i, flag in enumerate(("--minShapes", "--optShapes", "--maxShapes")):
            args.append(flag + "=" + ",".join(f"{name}:{_shape_str(s[i])}" for name, s in p.shapes.items()))
    if plan.strongly_typed:
        args.append("--stronglyTyped")
    args += [f"--{f.lower()}" for f in plan.flags]
    args += [f"--memPoolSize=workspace:{profile.workspace_mb}M",
             f"--builderOptimizationLevel={profile.builder_optimization_level}"]
    if timing_cache:
        args.append(f"--timingCacheFile={timing_cache}")
    return " ".join(shlex.quote(a) for a in args)


def build_record(graph: str, profile: DeviceProfile, plan: PrecisionPlan, facts: dict, source_sha256: dict,
                 engine_file: str, engine_sha256: str, profiles: list[ShapeProfile], seconds: float) -> dict:
    return {
        "graph": graph,
        "file": engine_file,
        "engine_sha256": engine_sha256,
        "profile": profile.name,
        "precision": plan.precision,
        "strongly_typed": plan.strongly_typed,
        "tensorrt": facts["tensorrt"],
        "gpu": facts["gpu"],
        "compute_capability": facts["compute_capability"],
        "source_sha256": dict(source_sha256),
        "optimization_profiles": [{"label": p.label, "dims": {k: list(v) for k, v in p.dims.items()}}
                                  for p in profiles],
        "build_seconds": round(seconds, 1),
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def check_engine_record(record: dict, facts: dict, source_sha256: dict, strict_gpu: bool = True) -> None:
    """Raise EngineError when an engine can't (or shouldn't) run here. Pure: ``facts`` is current_facts()."""
    name = f"{record.get('graph', '?')}.{record.get('profile', '?')}"
    if record.get("tensorrt") != facts.get("tensorrt"):
        raise EngineError(f"engine {name} was built with TensorRT {record.get('tensorrt')}, this is TensorRT "
                          f"{facts.get('tensorrt')}; engines only load in the exact version that built them: "
                          f"rerun `spectrt build --profile {record.get('profile')}`")
    if record.get("compute_capability") != facts.get("compute_capability"):
        raise EngineError(f"engine {name} was built for compute capability {record.get('compute_capability')} "
                          f"({record.get('gpu')}), this GPU is {facts.get('compute_capability')} ({facts.get('gpu')}); "
                          "rebuild it on this device")
    if strict_gpu and record.get("gpu") != facts.get("gpu"):
        raise EngineError(f"engine {name} was built on {record.get('gpu')}, this GPU is {facts.get('gpu')}; rebuild it "
                          "here (kernels are tuned per GPU)")
    if dict(record.get("source_sha256", {})) != dict(source_sha256):
        raise EngineError(f"engine {name} was built from another version of the '{record.get('graph')}' graph "
                          "(sha256 differs from the manifest); the model was re-exported: rebuild the engine")


def has_qdq(onnx_path) -> bool:
    import onnx

    m = onnx.load(str(onnx_path), load_external_data=False)
    return any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in m.graph.node)


# --------------------------------------------------------------------------------------------------
# GPU side (lazy imports)


def current_facts() -> dict:
    """TensorRT version, GPU name and compute capability of this machine (needs tensorrt + CUDA)."""
    import ctypes

    import tensorrt as trt
    from polygraphy import cuda

    handle = cuda.wrapper().handle
    dev = ctypes.c_int(0)
    cuda.wrapper().check(handle.cudaGetDevice(ctypes.byref(dev)))
    major, minor = ctypes.c_int(0), ctypes.c_int(0)
    cuda.wrapper().check(handle.cudaDeviceGetAttribute(ctypes.byref(major), 75, dev))  # ComputeCapabilityMajor
    cuda.wrapper().check(handle.cudaDeviceGetAttribute(ctypes.byref(minor), 76, dev))  # ComputeCapabilityMinor
    props = ctypes.create_string_buffer(8192)  # cudaDeviceProp starts with char name[256]
    get = getattr(handle, "cudaGetDeviceProperties_v2", None) or handle.cudaGetDeviceProperties
    cuda.wrapper().check(get(props, dev))
    return {"tensorrt": trt.__version__, "gpu": props.raw[:256].split(b"\0", 1)[0].decode(errors="replace"),
            "compute_capability": f"{major.value}.{minor.value}"}


class EngineFromOnnx:
    """Lazy loader: builds a serialized engine (bytes) from an ONNX file when called. Allocates nothing
    until then (Polygraphy's ``XFromY`` style)."""

    def __init__(self, onnx_path, profiles: list[ShapeProfile], plan: PrecisionPlan, profile: DeviceProfile,
                 timing_cache=None, progress=print):
        self.onnx_path, self.profiles, self.plan, self.profile = Path(onnx_path), profiles, plan, profile
        self.timing_cache = Path(timing_cache) if timing_cache else None
        self.progress = progress

    def __call__(self) -> bytes:
        import tensorrt as trt

        logger = trt.Logger(trt.Logger.WARNING)
        builder = trt.Builder(logger)
        flags = 0
        if self.plan.strongly_typed:
            flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(self.onnx_path)):  # resolves external weights next to the file
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise SpectrtError(f"{self.onnx_path}: TensorRT's ONNX parser failed: {errors} "
                               f"(run `spectrt check` for a readable report)")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, self.profile.workspace_mb << 20)
        config.builder_optimization_level = self.profile.builder_optimization_level
        for f in self.plan.flags:
            config.set_flag(getattr(trt.BuilderFlag, f))
        for p in self.profiles:
            op = builder.create_optimization_profile()
            for name, (mn, opt, mx) in p.shapes.items():
                op.set_shape(name, mn, opt, mx)  # tuples convert to trt.Dims
            config.add_optimization_profile(op)
        cache_bytes = self.timing_cache.read_bytes() if self.timing_cache and self.timing_cache.is_file() else b""
        cache = config.create_timing_cache(cache_bytes)
        config.set_timing_cache(cache, ignore_mismatch=False)
        monitor = _progress_monitor(trt, self.progress)
        if monitor is not None:
            config.progress_monitor = monitor
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise SpectrtError(f"{self.onnx_path}: TensorRT failed to build the engine (see the TensorRT log above)")
        if self.timing_cache:
            _atomic_write(self.timing_cache, memoryview(config.get_timing_cache().serialize()))
        return bytes(memoryview(serialized))


def _progress_monitor(trt, progress):
    """A trt.IProgressMonitor printing top-level build phases (None if this TensorRT lacks it)."""
    base = getattr(trt, "IProgressMonitor", None)
    if base is None:
        return None

    class Monitor(base):
        def __init__(self):
            base.__init__(self)
            self.t0 = time.time()

        def phase_start(self, phase_name, parent_phase, num_steps):
            if parent_phase is None:
                progress(f"    [{time.time() - self.t0:6.1f}s] {phase_name} ({num_steps} steps)")

        def step_complete(self, phase_name, step):
            return True  # keep building

        def phase_finish(self, phase_name):
            pass

    return Monitor()


def _atomic_write(path: Path, data) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _write_manifest_atomic(root: Path, manifest: dict) -> None:
    _atomic_write(root / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())


def source_hashes(art, graph: str) -> dict:
    """sha256 of the graph's files, from the manifest (or hashed now if the manifest has none)."""
    rec = art.manifest["graphs"][graph]
    if rec.get("sha256"):
        return dict(rec["sha256"])
    return {rec["file"]: sha256_file(art.root / rec["file"])}


def build_engines(root, profile: str, precision: str | None = None, timing_cache=None,
                  graphs: list[str] | None = None, dry_run: bool = False, progress=print) -> dict:
    """Build (or with ``dry_run`` only plan and print) the engines of an artifact; returns the records."""
    art = load_artifact(root)
    prof = load_profile(profile)
    precision = precision or prof.default_precision
    names = graphs or [g for g in art.manifest["graphs"] if has_spec(g)]
    unknown = [g for g in names if g not in art.manifest["graphs"]]
    if unknown:
        raise SpectrtError(f"{art.root}: no graph(s) {', '.join(unknown)} (have: {', '.join(art.manifest['graphs'])})")
    skipped = [g for g in names if not has_spec(g)]
    if skipped:
        raise SpectrtError(f"graph(s) {', '.join(skipped)} have no I/O contract spec to derive shapes from")
    weight_bytes = sum(sum(art.manifest["graphs"][g].get("bytes", {}).values()) for g in names)
    mem = estimate_memory(prof, art.model, weight_bytes, art.dtype, precision, art.max_context)
    ctx = effective_max_context(prof, art.max_context)
    progress(f"profile {prof.name}: {prof.description}")
    progress(f"  max context {ctx}, tree nodes <= {prof.max_tree_nodes}, prefill chunk <= {prof.max_prefill_chunk}, "
             f"precision {precision}; estimated memory {mem['total_mb']:.0f} MiB of {mem['budget_mb']} MiB budget "
             f"(weights {mem['weights_mb']:.0f}, KV {mem['kv_cache_mb']:.0f}, workspace {mem['workspace_mb']})")
    if not mem["fits"]:
        progress("  WARNING: this may not fit the device's memory budget: lower max_context / workspace_mb in a "
                 "custom profile (base: " + prof.name + ") or use a smaller model")
    trt_version = None
    facts = None
    if not dry_run:
        try:
            import tensorrt as trt
        except ImportError:
            raise SpectrtError("TensorRT's Python package is not importable; on a Jetson use JetPack's TensorRT "
                               "in a venv made with --system-site-packages (see docs/JETSON.md)") from None
        trt_version = trt.__version__
        facts = current_facts()
        progress(f"  TensorRT {facts['tensorrt']} on {facts['gpu']} (compute capability {facts['compute_capability']})")
        if facts["compute_capability"] != prof.compute_capability:
            progress(f"  WARNING: profile {prof.name} is for compute capability {prof.compute_capability}; "
                     f"this GPU is {facts['compute_capability']}")
    else:
        trt_version = prof.tensorrt
    records = {}
    for i, g in enumerate(names, 1):
        onnx_path = art.graph_path(g)
        shape_profiles = optimization_profiles(g, prof, graph_dims(art, g), art.max_context)
        plan = plan_precision(precision, prof, art.dtype, trt_version, has_qdq=has_qdq(onnx_path))
        out = engine_path(art.root, g, prof.name)
        progress(f"[{i}/{len(names)}] {g}: {len(shape_profiles)} optimization profile(s) "
                 f"({', '.join(p.label for p in shape_profiles)}), {plan.note}")
        progress("  equivalent: " + trtexec_command(onnx_path, out, shape_profiles, plan, prof, timing_cache))
        if dry_run:
            continue
        t0 = time.time()
        data = EngineFromOnnx(onnx_path, shape_profiles, plan, prof, timing_cache, progress)()
        _atomic_write(out, data)
        import hashlib

        rec = build_record(g, prof, plan, facts, source_hashes(art, g), str(out.relative_to(art.root)),
                           hashlib.sha256(data).hexdigest(), shape_profiles, time.time() - t0)
        records[engine_name(g, prof.name)] = rec
        progress(f"  wrote {out} ({len(data) / 2**20:.1f} MiB) in {rec['build_seconds']} s")
        manifest = json.loads((art.root / MANIFEST).read_text())  # re-read: keep other writers' changes
        manifest.setdefault("engines", {})[engine_name(g, prof.name)] = rec
        _write_manifest_atomic(art.root, manifest)
    return records


def load_engine_bytes(art, graph: str, profile: str, facts: dict | None = None, strict_gpu: bool = True) -> bytes:
    """The engine of ``graph`` for ``profile``, after checking its build record against this machine."""
    key = engine_name(graph, profile)
    rec = art.manifest.get("engines", {}).get(key)
    if rec is None:
        raise EngineError(f"{art.root}: no '{key}' engine; run `spectrt build {art.root} --profile {profile}`")
    check_engine_record(rec, facts or current_facts(), source_hashes(art, graph), strict_gpu=strict_gpu)
    path = art.root / rec["file"]
    if not path.is_file():
        raise EngineError(f"{path}: missing (listed in the manifest); rerun `spectrt build`")
    return path.read_bytes()


__all__ = ["PrecisionPlan", "EngineError", "EngineFromOnnx", "engine_name", "engine_path", "uses_strong_typing",
           "plan_precision", "trtexec_command", "build_record", "check_engine_record", "current_facts",
           "build_engines", "load_engine_bytes", "source_hashes", "has_qdq"]
