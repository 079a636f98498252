"""Device profiles: what a target GPU can hold and run, as YAML next to this file.

A profile bounds every dynamic dim of the I/O contract (``batch``, ``q``, ``past``) for one device, so
the TensorRT optimization profiles, the runner's buffers and the memory estimate all come from here
plus the contract plus the artifact's model dims. Users may pass their own YAML path anywhere a
profile name is accepted; ``base: NAME`` in a user YAML inherits a built-in profile's values.

Loading imports only pyyaml; nothing here touches torch, TensorRT or CUDA.
"""
from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from spectrt.runtime.contract import GRAPHS, MODEL_DTYPE, GraphSpec, graph_spec
from spectrt.runtime.errors import SpectrtError

PROFILE_DIR = Path(__file__).resolve().parent

# Precisions spectrt knows how to ask TensorRT for. "quantized" ones need a Q/DQ graph.
PRECISIONS = ("fp32", "fp16", "bf16", "int8", "fp8", "fp4")
QUANTIZED_PRECISIONS = ("int8", "fp8", "fp4")
DEVICES = ("jetson", "desktop")
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "fp32": 4, "fp16": 2, "bf16": 2,
               "int8": 1, "fp8": 1, "fp4": 0.5, "int64": 8, "bool": 1}


class ProfileError(SpectrtError):
    """A device profile is missing, malformed or does not fit the artifact."""


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    description: str
    device: str  # jetson | desktop
    compute_capability: str  # "8.7"
    tensorrt: str  # oldest TensorRT the device ships (JetPack 6 -> 10.3); `check` targets it
    precisions: tuple  # what the hardware runs fast, best first
    default_precision: str
    memory_budget_mb: int  # model + KV cache + activations + workspace
    max_context: int  # tokens in the KV cache (capped by the artifact's max_context)
    opt_context: int  # past length TensorRT tunes kernels for
    max_tree_nodes: int  # q of a verify call
    opt_tree_nodes: int
    max_prefill_chunk: int  # q of a prefill call
    max_frontier: int  # batch of the heads / draft_lm_head graphs
    max_batch: int  # batch of the base graph (the runtime uses 1)
    workspace_mb: int  # TensorRT builder workspace pool limit
    builder_optimization_level: int  # 0..5 (TensorRT default 3)
    source: str = ""  # where it was loaded from (not a YAML key)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["precisions"] = list(self.precisions)
        return d

    def describe(self) -> str:
        width = max(len(f.name) for f in fields(self))
        lines = [f"{k:<{width}}  {', '.join(v) if isinstance(v, (list, tuple)) else v}"
                 for k, v in self.to_dict().items()]
        return "\n".join(lines)


_INT_FIELDS = {
    # key: (min, max) inclusive
    "memory_budget_mb": (256, 1 << 22),
    "max_context": (16, 1 << 20),
    "opt_context": (0, 1 << 20),
    "max_tree_nodes": (1, 4096),
    "opt_tree_nodes": (1, 4096),
    "max_prefill_chunk": (1, 1 << 16),
    "max_frontier": (1, 4096),
    "max_batch": (1, 256),
    "workspace_mb": (16, 1 << 20),
    "builder_optimization_level": (0, 5),
}
_STR_FIELDS = ("name", "description", "device", "compute_capability", "tensorrt", "default_precision")
_KEYS = tuple(f.name for f in fields(DeviceProfile) if f.name != "source")


def list_profiles() -> list[str]:
    """Names of the built-in profiles (the YAML files shipped in this package), sorted."""
    return sorted(p.stem for p in PROFILE_DIR.glob("*.yaml"))


def load_profile(name_or_path: str | os.PathLike | DeviceProfile) -> DeviceProfile:
    """A built-in profile by name, or a user YAML by path; raises ProfileError with a one-line reason."""
    if isinstance(name_or_path, DeviceProfile):
        return name_or_path
    raw, source = _read(name_or_path)
    return _validate(_resolve_base(raw, source, seen=(source,)), source)


def _read(name_or_path) -> tuple[dict, str]:
    import yaml

    s = str(name_or_path)
    path = Path(s)
    if not (path.suffix in (".yaml", ".yml") or os.sep in s or "/" in s):
        path = PROFILE_DIR / f"{s}.yaml"
        if not path.is_file():
            raise ProfileError(f"unknown device profile '{s}' (built-in: {', '.join(list_profiles())}; "
                               "or pass the path of a YAML file)")
    if not path.is_file():
        raise ProfileError(f"{path}: no such profile file")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise ProfileError(f"{path}: not valid YAML{where}: {getattr(e, 'problem', e)}") from None
    if not isinstance(raw, dict):
        raise ProfileError(f"{path}: a profile must be a YAML mapping of key: value")
    return raw, str(path)


def _resolve_base(raw: dict, source: str, seen: tuple) -> dict:
    base = raw.get("base")
    if base is None:
        return raw
    if not isinstance(base, str):
        raise ProfileError(f"{source}: base: must be a profile name or path, got {base!r}")
    parent, psource = _read(base)
    if psource in seen:
        raise ProfileError(f"{source}: base: cycle through {psource}")
    merged = dict(_resolve_base(parent, psource, seen + (psource,)))
    merged.pop("base", None)
    merged.update({k: v for k, v in raw.items() if k != "base"})
    return merged


def _validate(raw: dict, source: str) -> DeviceProfile:
    unknown = sorted(set(raw) - set(_KEYS))
    if unknown:
        raise ProfileError(f"{source}: unknown key(s) {', '.join(unknown)} (allowed: {', '.join(_KEYS)}, base)")
    missing = [k for k in _KEYS if k not in raw]
    if missing:
        raise ProfileError(f"{source}: missing key(s) {', '.join(missing)}")
    values = {}
    for k in _STR_FIELDS:
        v = raw[k]
        if isinstance(v, (int, float)) and k in ("compute_capability", "tensorrt"):
            v = str(v)  # YAML reads 8.7 as a float
        if not isinstance(v, str) or not v:
            raise ProfileError(f"{source}: {k}: expected a non-empty string, got {v!r}")
        values[k] = v
    for k, (lo, hi) in _INT_FIELDS.items():
        v = raw[k]
        if isinstance(v, bool) or not isinstance(v, int):
            raise ProfileError(f"{source}: {k}: expected an integer, got {v!r}")
        if not lo <= v <= hi:
            raise ProfileError(f"{source}: {k}: {v} is out of range [{lo}, {hi}]")
        values[k] = v
    if values["device"] not in DEVICES:
        raise ProfileError(f"{source}: device: '{values['device']}' is not one of {', '.join(DEVICES)}")
    for k in ("compute_capability", "tensorrt"):
        if not _is_version(values[k]):
            raise ProfileError(f"{source}: {k}: '{values[k]}' is not a version like 8.7")
    if parse_version(values["tensorrt"]) < (10,):
        raise ProfileError(f"{source}: tensorrt: spectrt needs TensorRT 10.x or newer, got {values['tensorrt']}")
    precisions = raw["precisions"]
    if not isinstance(precisions, list) or not precisions:
        raise ProfileError(f"{source}: precisions: expected a non-empty list, e.g. [fp16, fp32]")
    bad = [p for p in precisions if p not in PRECISIONS]
    if bad:
        raise ProfileError(f"{source}: precisions: unknown {', '.join(map(str, bad))} (known: {', '.join(PRECISIONS)})")
    if values["default_precision"] not in precisions:
        raise ProfileError(f"{source}: default_precision: '{values['default_precision']}' is not in precisions")
    for opt, mx in (("opt_context", "max_context"), ("opt_tree_nodes", "max_tree_nodes"),
                    ("max_prefill_chunk", "max_context"), ("max_tree_nodes", "max_context")):
        if values[opt] > values[mx]:
            raise ProfileError(f"{source}: {opt} ({values[opt]}) must be <= {mx} ({values[mx]})")
    return DeviceProfile(precisions=tuple(precisions), source=source, **values)


def _is_version(s: str) -> bool:
    parts = s.split(".")
    return 1 <= len(parts) <= 4 and all(p.isdigit() for p in parts)


def parse_version(s: str) -> tuple:
    """'10.3.0.30' -> (10, 3, 0, 30); non-numeric suffixes ('10.3.0.post1') are dropped."""
    out = []
    for part in str(s).split("."):
        m = re.match(r"\d+", part)
        if not m:
            break
        out.append(int(m.group()))
    return tuple(out)


# --------------------------------------------------------------------------------------------------
# TensorRT optimization profiles from contract + device profile + model dims


@dataclass(frozen=True)
class ShapeProfile:
    """One TensorRT optimization profile: input name -> (min, opt, max) shapes."""

    label: str  # prefill | decode | frontier
    shapes: dict  # name -> (min_shape, opt_shape, max_shape)
    dims: dict  # dynamic dim -> (min, opt, max), the source of ``shapes``

    def max_shape(self, name: str) -> tuple:
        return self.shapes[name][2]


def effective_max_context(profile: DeviceProfile, artifact_max_context: int | None = None) -> int:
    """The KV cache length: the device's limit, capped by what the artifact was exported for."""
    if artifact_max_context is None:
        return profile.max_context
    return min(profile.max_context, int(artifact_max_context))


def dim_ranges(graph: str | GraphSpec, profile: DeviceProfile, max_context: int | None = None) -> list[tuple[str, dict]]:
    """(label, {dynamic dim: (min, opt, max)}) per optimization profile of ``graph``.

    base and hydra_prefix (dims batch, q, past): "prefill" (q up to the prefill chunk) and "decode"
    (q = 1 .. max tree nodes, decode and verify); past spans 0 .. ctx - 1 in both (0: the first prefill
    chunk, empty KV views).
    heads / draft_lm_head: "frontier" (batch = 1 .. max frontier nodes).
    """
    spec = graph_spec(graph) if isinstance(graph, str) else graph
    ctx = effective_max_context(profile, max_context)
    batch = (1, 1, profile.max_batch)
    if set(spec.dynamic) == {"batch", "q", "past"}:
        chunk = min(profile.max_prefill_chunk, ctx)
        tree = min(profile.max_tree_nodes, ctx)
        past_max = ctx - 1
        past_opt = min(profile.opt_context, past_max)
        return [
            ("prefill", {"batch": batch, "q": (1, chunk, chunk), "past": (0, past_opt, past_max)}),
            ("decode", {"batch": batch, "q": (1, min(profile.opt_tree_nodes, tree), tree),
                        "past": (0, past_opt, past_max)}),
        ]
    if set(spec.dynamic) == {"batch"}:
        return [("frontier", {"batch": (1, 1, profile.max_frontier)})]
    raise ProfileError(f"no optimization-profile rule for graph '{spec.name}' (dynamic dims {spec.dynamic})")


def optimization_profiles(graph: str | GraphSpec, profile: DeviceProfile | str, model: dict,
                          max_context: int | None = None) -> list[ShapeProfile]:
    """TensorRT optimization profiles of one graph, derived from the contract.

    ``model`` is the manifest's model dims (hidden, vocab, num_layers, kv_heads, head_dim, ...).
    Every input of the expanded graph (per-layer KV views included) gets a (min, opt, max) shape.
    """
    from spectrt.runtime.contract import model_dims

    profile = load_profile(profile)
    spec = graph_spec(graph) if isinstance(graph, str) else graph
    dims = {**model_dims(model), **{k: v for k, v in model.items() if type(v) is int}}
    if "num_layers" not in dims and spec.per_layer_inputs:
        raise ProfileError(f"graph '{spec.name}': the manifest's model dims lack num_layers")
    inputs, _ = spec.expand(dims.get("num_layers", 0))
    out = []
    for label, ranges in dim_ranges(spec, profile, max_context):
        shapes = {}
        for t in inputs:
            shape, _ = t.resolve(dims, MODEL_DTYPE)
            triple = []
            for i in range(3):
                s = []
                for d in shape:
                    if isinstance(d, int):
                        s.append(d)
                    elif d in ranges:
                        s.append(ranges[d][i])
                    else:
                        raise ProfileError(f"graph '{spec.name}' input '{t.name}': dim '{d}' is neither a "
                                           "model dim in the manifest nor a dynamic dim of the profile")
                triple.append(tuple(s))
            shapes[t.name] = tuple(triple)  # (min, opt, max)
        out.append(ShapeProfile(label, shapes, dict(ranges)))
    return out


# --------------------------------------------------------------------------------------------------
# Memory estimate


def estimate_memory(profile: DeviceProfile | str, model: dict, weight_bytes: int, graph_dtype: str,
                    precision: str | None = None, max_context: int | None = None) -> dict:
    """Rough device-memory need in MiB for one profile: weights, KV cache, I/O buffers, workspace.

    ``weight_bytes``: bytes of the ONNX graphs (weights dominate); ``graph_dtype``: their dtype
    (float32/float16). A fp16 engine of a fp32 graph holds half the bytes; int8/fp8 a quarter.
    """
    profile = load_profile(profile)
    precision = precision or profile.default_precision
    ctx = effective_max_context(profile, max_context)
    elt = DTYPE_BYTES.get(graph_dtype, 4)
    engine_elt = min(elt, DTYPE_BYTES[precision]) if precision != "fp32" else elt
    kv_elt = min(elt, 2) if precision != "fp32" else elt  # KV stays fp16 with quantized weights
    mib = 1 << 20
    weights = weight_bytes * engine_elt / elt
    kv = 2 * model["num_layers"] * ctx * profile.max_batch * model["kv_heads"] * model["head_dim"] * kv_elt
    q = max(profile.max_prefill_chunk, profile.max_tree_nodes)
    io = q * (model["vocab"] + model["hidden"]) * kv_elt + profile.max_frontier * model["vocab"] * kv_elt
    workspace = profile.workspace_mb * mib
    total = weights + kv + io + workspace
    return {
        "precision": precision,
        "max_context": ctx,
        "weights_mb": round(weights / mib, 1),
        "kv_cache_mb": round(kv / mib, 1),
        "io_buffers_mb": round(io / mib, 1),
        "workspace_mb": profile.workspace_mb,
        "total_mb": round(total / mib, 1),
        "budget_mb": profile.memory_budget_mb,
        "fits": total / mib <= profile.memory_budget_mb,
    }




def graph_dims(artifact, graph: str) -> dict:
    """Fixed dims of one graph: the manifest's model dims, plus ``heads``/``topk`` etc. read from the
    manifest or, failing that, from the ONNX file's declared input/output shapes (no weights loaded)."""
    from spectrt.runtime.contract import model_dims

    dims = model_dims(artifact.model)
    draft = artifact.manifest.get("draft", {}).get("dims", {})
    for src in (draft, artifact.model, artifact.manifest.get("graphs", {}).get(graph, {})):
        for k in ("heads", "topk", "frontier"):
            if isinstance(src.get(k), int):
                dims.setdefault(k, src[k])
    spec = GRAPHS.get(graph)
    if spec is None or not artifact.has_graph(graph):
        return dims
    wanted = {d for s in spec.inputs + spec.outputs for d in s.shape
              if isinstance(d, str) and d not in spec.dynamic and d not in dims}
    if wanted:
        import onnx

        m = onnx.load(str(artifact.graph_path(graph)), load_external_data=False)
        by_name = {s.name: s for s in spec.inputs + spec.outputs}
        for vi in list(m.graph.input) + list(m.graph.output):
            s = by_name.get(vi.name)
            if s is None:
                continue
            for d, dim in zip(s.shape, vi.type.tensor_type.shape.dim):
                if isinstance(d, str) and d in wanted and dim.HasField("dim_value"):
                    dims.setdefault(d, dim.dim_value)
    return dims


__all__ = [
    "DeviceProfile", "ProfileError", "ShapeProfile", "PRECISIONS", "QUANTIZED_PRECISIONS",
    "list_profiles", "load_profile", "parse_version", "dim_ranges", "optimization_profiles",
    "effective_max_context", "estimate_memory", "graph_dims",
]
