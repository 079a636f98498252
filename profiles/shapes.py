"""TensorRT optimization profiles of a graph, from the I/O contract + a device profile + the graph's dims."""
from __future__ import annotations

from dataclasses import dataclass

from spectrt.profiles.device import DeviceProfile, ProfileError, load_profile
from spectrt.runtime.contract import MODEL_DTYPE, GraphSpec, graph_spec


@dataclass(frozen=True)
class ShapeProfile:
    """One TensorRT optimization profile: input name -> (min, opt, max) shapes."""

    label: str  # prefill | decode | frontier
    shapes: dict  # name -> (min_shape, opt_shape, max_shape)
    dims: dict  # dynamic dim -> (min, opt, max), the source of ``shapes``


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


def optimization_profiles(graph: str | GraphSpec, profile: DeviceProfile | str, dims: dict,
                          max_context: int | None = None) -> list[ShapeProfile]:
    """TensorRT optimization profiles of one graph, derived from the contract.

    ``dims`` are the graph's fixed dims (``Artifact.dims(graph)``: hidden, vocab, kv_heads, depth, ...).
    Every input of the expanded graph (per-layer KV views included) gets a (min, opt, max) shape.
    """
    profile = load_profile(profile)
    spec = graph_spec(graph) if isinstance(graph, str) else graph
    missing = sorted(spec.fixed_dims() - set(dims))
    if missing:
        raise ProfileError(f"graph '{spec.name}': no value for dim(s) {', '.join(missing)}")
    inputs, _ = spec.expand(dims)
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
                    else:  # a dynamic dim without a rule: a contract change not followed here
                        raise ProfileError(f"graph '{spec.name}' input '{t.name}': no range for dim '{d}'")
                triple.append(tuple(s))
            shapes[t.name] = tuple(triple)  # (min, opt, max)
        out.append(ShapeProfile(label, shapes, dict(ranges)))
    return out
