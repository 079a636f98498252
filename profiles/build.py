"""`spectrt build`: one TensorRT engine per graph of an artifact, for one device profile.

Engines land in ``DIR/engines/<graph>.<profile>.engine`` (written atomically) and each build is recorded in
``manifest.engines[engine_key(graph, profile)]`` (an ``EngineRecord``: TensorRT version, GPU, compute
capability, precision, optimization profiles, sha256 of the engine and of the graph's files). The profile
part of the key is always the device profile's name, also when it was given as a YAML path. Loading an
engine checks that record (``spectrt.runtime.engines``).

Precision, on every TensorRT 10.x (``NetworkDefinitionCreationFlag.STRONGLY_TYPED`` exists since 10.0):
networks are built strongly typed, so the ONNX tensor types are the precision and no precision builder
flag is set. An fp16 engine comes from an fp16 export (``spectrt export --dtype fp16``); an fp32 export
builds an fp32 engine. Setting ``BuilderFlag.FP16`` on a weakly typed fp32 network instead would let
TensorRT run any layer in fp16, RoPE, RMSNorm and softmax included, which an fp16 export keeps in fp32
where the exporter put casts. int8/fp8/fp4 need an explicitly quantized graph (QuantizeLinear /
DequantizeLinear nodes); the rest of the graph keeps the export's dtype.

Nothing here imports tensorrt, polygraphy or onnx at module level: ``--dry-run`` needs none of them.
"""
from __future__ import annotations

import hashlib
import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from spectrt.profiles import (QUANTIZED_PRECISIONS, DeviceProfile, ShapeProfile, effective_max_context,
                              estimate_memory, load_profile, optimization_profiles, parse_version)
from spectrt.profiles.check import max_opset
from spectrt.runtime.artifact import (EngineRecord, OptimizationProfileRecord, atomic_write, engine_key,
                                      load_artifact, write_manifest)
from spectrt.runtime.engines import (DeviceFacts, EngineError, require_tensorrt, current_facts, engine_path, source_hashes)
from spectrt.runtime.errors import SpectrtError

if TYPE_CHECKING:
    import tensorrt as trt

FP4_SINCE = (10, 8)
DTYPE_PRECISION = {"float32": "fp32", "float16": "fp16"}  # the precision a strongly typed build of an export gets
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")


@dataclass(frozen=True)
class PrecisionPlan:
    precision: str
    note: str
    strongly_typed: bool = True  # always, on TensorRT 10.x; recorded in the engine record


def default_precision(profile: DeviceProfile, graph_dtype: str) -> str:
    """What a build without --precision makes: the export's own precision (a strongly typed build)."""
    return DTYPE_PRECISION.get(graph_dtype, profile.default_precision)


def plan_precision(precision: str, profile: DeviceProfile, graph_dtype: str, trt_version: str,
                   has_qdq: bool = False) -> PrecisionPlan:
    """How to build ``precision`` from a ``graph_dtype`` export; SpectrtError (one line, with the fix) if impossible."""
    if precision not in profile.precisions:
        raise SpectrtError(f"precision {precision} is not available on {profile.name} "
                           f"(supported: {', '.join(profile.precisions)})")
    own = DTYPE_PRECISION.get(graph_dtype, graph_dtype)
    if precision in QUANTIZED_PRECISIONS:
        if not has_qdq:
            raise SpectrtError(f"{precision} needs an explicitly quantized graph (QuantizeLinear/DequantizeLinear "
                               f"nodes); this graph has none. Build --precision {own} instead")
        if precision == "fp4" and parse_version(trt_version)[:2] < FP4_SINCE:
            raise SpectrtError(f"fp4 needs TensorRT >= 10.8 (this is {trt_version})")
        return PrecisionPlan(precision, f"strongly typed: {precision} where the graph quantizes, {own} elsewhere")
    if precision == "bf16":
        raise SpectrtError("bf16 engines need bf16 graphs, which `spectrt export` does not make; build fp16 from an "
                           "fp16 export (spectrt export --dtype fp16)")
    if precision != own:
        fix = ("export fp16 graphs (spectrt export --dtype fp16) for an fp16 engine" if precision == "fp16"
               else f"export {precision} graphs (spectrt export --dtype {precision})")
        raise SpectrtError(f"the export is {graph_dtype} and engines are built strongly typed (the precision is the "
                           f"ONNX's): {fix}, or build --precision {own}")
    return PrecisionPlan(precision, f"strongly typed: {own} from the {graph_dtype} graph")


def check_weights(art, trt_version: str) -> None:
    """Refuse, in one line naming the fix, an export whose quantized weights TensorRT cannot build."""
    w = art.manifest.weights
    if w is None:
        return
    if w.ort_only:
        raise SpectrtError(f"{art.root}: base.onnx holds {w.kind} weights as ONNX Runtime's MatMulNBits (an ORT-only "
                           f"export); TensorRT cannot build it: re-export with --weights {w.kind} --weights-format qdq")
    if art.manifest.opset > max_opset(trt_version):
        raise SpectrtError(f"{art.root}: {w.kind} qdq weights need opset {art.manifest.opset} (block-wise "
                           f"DequantizeLinear), which TensorRT {trt_version} does not parse (up to "
                           f"{max_opset(trt_version)}); use a TensorRT >= 10.15 device profile or a float export")


def has_qdq(onnx_path: str | Path) -> bool:
    """True if the graph has QuantizeLinear/DequantizeLinear nodes.

    With onnx importable, from the node list (weights not loaded). Without it (the runtime install on a
    device has no onnx), from the .onnx file's bytes: ONNX stores each node's op_type as a plain string,
    so a Q/DQ graph contains b"QuantizeLinear" (also inside b"DequantizeLinear"). The scan can only err
    towards yes (a tensor or node *named* ...QuantizeLinear... in an unquantized graph); TensorRT's parser
    then has the last word.
    """
    path = Path(onnx_path)
    try:
        import onnx
    except ImportError:
        return _bytes_contain(path, QDQ_OPS[0].encode())
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # noqa: BLE001 - onnx raises DecodeError, OSError, ...
        raise SpectrtError(f"{path}: not a readable ONNX file ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
                           ) from None
    return any(n.op_type in QDQ_OPS for n in model.graph.node)


def _bytes_contain(path: Path, needle: bytes, chunk: int = 1 << 20) -> bool:
    try:
        with open(path, "rb") as f:
            tail = b""
            while block := f.read(chunk):
                if needle in tail + block:
                    return True
                tail = block[-(len(needle) - 1):]
    except OSError as e:
        raise SpectrtError(f"{path}: {e.strerror}") from None
    return False


def _shape_str(shape) -> str:
    return "x".join(str(int(d)) for d in shape)


def trtexec_command(onnx_path, engine, profiles: list[ShapeProfile], plan: PrecisionPlan, profile: DeviceProfile,
                    timing_cache=None) -> str:
    """The `trtexec` line that builds the same engine; with several optimization profiles each shape group
    follows its ``--profile=N`` (trtexec rejects repeated groups without it)."""
    args = ["trtexec", f"--onnx={onnx_path}", f"--saveEngine={engine}"]
    for n, p in enumerate(profiles):
        if len(profiles) > 1:
            args.append(f"--profile={n}")
        for i, flag in enumerate(("--minShapes", "--optShapes", "--maxShapes")):
            args.append(flag + "=" + ",".join(f"{name}:{_shape_str(s[i])}" for name, s in p.shapes.items()))
    if plan.strongly_typed:
        args.append("--stronglyTyped")
    args += [f"--memPoolSize=workspace:{profile.workspace_mb}M",
             f"--builderOptimizationLevel={profile.builder_optimization_level}"]
    if timing_cache:
        args.append(f"--timingCacheFile={timing_cache}")
    return " ".join(shlex.quote(str(a)) for a in args)


def build_record(graph: str, profile: DeviceProfile, plan: PrecisionPlan, facts: DeviceFacts,
                 source_sha256: dict[str, str], engine_file: str, engine_sha256: str, profiles: list[ShapeProfile],
                 seconds: float) -> EngineRecord:
    return EngineRecord(
        graph=graph, file=engine_file, engine_sha256=engine_sha256, profile=profile.name, precision=plan.precision,
        strongly_typed=plan.strongly_typed, tensorrt=facts.tensorrt, gpu=facts.gpu,
        compute_capability=facts.compute_capability, source_sha256=dict(source_sha256),
        optimization_profiles=tuple(OptimizationProfileRecord(p.label, {k: tuple(v) for k, v in p.dims.items()})
                                    for p in profiles),
        build_seconds=round(seconds, 1), built_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"))


class EngineFromOnnx:
    """Lazy loader: builds a serialized engine (bytes) from an ONNX file when called (Polygraphy's ``XFromY``)."""

    def __init__(self, onnx_path, profiles: list[ShapeProfile], profile: DeviceProfile, timing_cache=None,
                 progress=print):
        self.onnx_path, self.profiles, self.profile = Path(onnx_path), profiles, profile
        self.timing_cache = Path(timing_cache) if timing_cache else None
        self.progress = progress

    def __call__(self) -> bytes:
        require_tensorrt()
        import tensorrt as trt

        logger = trt.Logger(trt.Logger.WARNING)
        builder = trt.Builder(logger)
        network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(self.onnx_path)):  # resolves external weights next to the file
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise SpectrtError(f"{self.onnx_path}: TensorRT's ONNX parser failed: {errors} (run `spectrt check` for a "
                               "readable report)")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, self.profile.workspace_mb << 20)
        config.builder_optimization_level = self.profile.builder_optimization_level
        for p in self.profiles:
            op = builder.create_optimization_profile()
            for name, (mn, opt, mx) in p.shapes.items():
                op.set_shape(name, trt.Dims(list(mn)), trt.Dims(list(opt)), trt.Dims(list(mx)))
            if config.add_optimization_profile(op) < 0:
                raise SpectrtError(f"{self.onnx_path}: TensorRT refused the '{p.label}' optimization profile")
        if self.timing_cache is not None:
            data = self.timing_cache.read_bytes() if self.timing_cache.is_file() else b""
            if not config.set_timing_cache(config.create_timing_cache(data), ignore_mismatch=False):
                raise SpectrtError(f"{self.timing_cache}: TensorRT refused this timing cache (made by another TensorRT "
                                   "version or GPU?); delete it or pass another --timing-cache")
        config.progress_monitor = _progress_monitor(self.progress)
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise SpectrtError(f"{self.onnx_path}: TensorRT failed to build the engine (see the TensorRT log above)")
        if self.timing_cache is not None:
            atomic_write(self.timing_cache, memoryview(config.get_timing_cache().serialize()))
        return bytes(memoryview(serialized))


def _progress_monitor(progress) -> trt.IProgressMonitor:
    """A TensorRT progress monitor printing the top-level build phases."""
    import tensorrt as trt

    class Monitor(trt.IProgressMonitor):
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)
            self.t0 = time.time()

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            if parent_phase is None:
                progress(f"    [{time.time() - self.t0:6.1f}s] {phase_name} ({num_steps} steps)")

        def step_complete(self, phase_name: str, step: int) -> bool:
            return True  # keep building

        def phase_finish(self, phase_name: str) -> None:
            pass

    return Monitor()


def build_engines(root, profile, precision: str | None = None, timing_cache=None, graphs: list[str] | None = None,
                  dry_run: bool = False, progress=print, ignore_memory: bool = False) -> dict[str, EngineRecord]:
    """Build (or with ``dry_run`` only plan and print) the engines of an artifact; returns the new records.

    ``profile``: a device profile name, YAML path or DeviceProfile; engines are keyed by its name.
    ``precision``: default the export's own (fp16 for an fp16 export, fp32 for fp32).
    """
    art = load_artifact(root)
    prof = load_profile(profile)
    check_weights(art, prof.tensorrt)
    names = list(graphs or art.manifest.graphs)
    unknown = [g for g in names if not art.has_graph(g)]
    if unknown:
        raise SpectrtError(f"{art.root}: no graph(s) {', '.join(unknown)} (have: {', '.join(art.manifest.graphs)})")
    precision = precision or default_precision(prof, art.dtype)
    weight_bytes = sum(art.graph(g).bytes for g in names)
    mem = estimate_memory(prof, art.model, weight_bytes, art.dtype, precision, art.max_context,
                          quantized=art.manifest.weights is not None)
    ctx = effective_max_context(prof, art.max_context)
    progress(f"profile {prof.name}: {prof.description}")
    progress(f"  max context {ctx}, tree nodes <= {prof.max_tree_nodes}, prefill chunk <= {prof.max_prefill_chunk}, "
             f"precision {precision}; estimated memory {mem['total_mb']:.0f} MiB of {mem['budget_mb']} MiB budget "
             f"(weights {mem['weights_mb']:.0f}, KV {mem['kv_cache_mb']:.0f}, workspace {mem['workspace_mb']})")
    if precision != prof.default_precision and precision == DTYPE_PRECISION.get(art.dtype):
        progress(f"  note: {prof.name} runs {prof.default_precision} best; this {art.dtype} export builds {precision} "
                 f"(export with --dtype {prof.default_precision} for {prof.default_precision} engines)")
    if not mem["fits"]:
        fix = (f"lower max_context / workspace_mb in a custom profile (base: {prof.name}), export --weights int8|int4, "
               "or use a smaller model")
        if not (dry_run or ignore_memory):
            raise SpectrtError(f"{art.root} does not fit {prof.name}: estimated {mem['total_mb']:.0f} MiB (weights "
                               f"{mem['weights_mb']:.0f}, KV cache {mem['kv_cache_mb']:.0f}, I/O {mem['io_buffers_mb']:.0f}, "
                               f"workspace {mem['workspace_mb']}) of a {mem['budget_mb']} MiB budget; {fix} "
                               "(--ignore-memory builds anyway)")
        progress(f"  WARNING: this may not fit the device's memory budget: {fix}")
    facts = None
    trt_version = prof.tensorrt
    if not dry_run:
        require_tensorrt()
        facts = current_facts()
        trt_version = facts.tensorrt
        progress(f"  TensorRT {facts.tensorrt} on {facts.gpu} (compute capability {facts.compute_capability})")
        if facts.compute_capability != prof.compute_capability:
            progress(f"  WARNING: profile {prof.name} is for compute capability {prof.compute_capability}; this GPU is "
                     f"{facts.compute_capability}")
    plans = {}  # plan every graph before building any
    for g in names:
        qdq = precision in QUANTIZED_PRECISIONS and has_qdq(art.graph_path(g))
        try:
            plans[g] = plan_precision(precision, prof, art.dtype, trt_version, has_qdq=qdq)
        except SpectrtError as e:
            raise SpectrtError(f"{g}: {e}") from None
    records: dict[str, EngineRecord] = {}
    for i, g in enumerate(names, 1):
        onnx_path, plan = art.graph_path(g), plans[g]
        shape_profiles = optimization_profiles(g, prof, art.dims(g), art.max_context)
        out = engine_path(art.root, g, prof.name)
        progress(f"[{i}/{len(names)}] {g}: {len(shape_profiles)} optimization profile(s) "
                 f"({', '.join(p.label for p in shape_profiles)}), {plan.note}")
        progress("  equivalent: " + trtexec_command(onnx_path, out, shape_profiles, plan, prof, timing_cache))
        if dry_run:
            continue
        assert facts is not None
        t0 = time.time()
        data = EngineFromOnnx(onnx_path, shape_profiles, prof, timing_cache, progress)()
        atomic_write(out, data)
        key = engine_key(g, prof.name)
        records[key] = rec = build_record(g, prof, plan, facts, source_hashes(art, g), str(out.relative_to(art.root)),
                                          hashlib.sha256(data).hexdigest(), shape_profiles, time.time() - t0)
        progress(f"  wrote {out} ({len(data) / 2**20:.1f} MiB) in {rec.build_seconds} s")
        current = load_artifact(art.root)  # re-read: keep what other writers recorded meanwhile
        write_manifest(art.root, current.manifest.with_engines({key: rec}))
    return records


__all__ = ["PrecisionPlan", "EngineError", "EngineFromOnnx", "build_engines", "build_record", "default_precision",
           "has_qdq", "plan_precision", "trtexec_command"]
