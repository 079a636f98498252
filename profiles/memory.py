"""Device-memory estimate of an export on a device profile (weights, KV cache, I/O buffers, workspace)."""
from __future__ import annotations

from spectrt.profiles.device import DeviceProfile, load_profile
from spectrt.profiles.shapes import effective_max_context
from spectrt.runtime.artifact import ModelInfo

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "fp32": 4, "fp16": 2, "bf16": 2,
               "int8": 1, "fp8": 1, "fp4": 0.5, "int64": 8, "bool": 1}


def estimate_memory(profile: DeviceProfile | str, model: ModelInfo, weight_bytes: int, graph_dtype: str,
                    precision: str | None = None, max_context: int | None = None, quantized: bool = False) -> dict:
    """Rough device-memory need in MiB for one profile: weights, KV cache, I/O buffers, workspace.

    ``weight_bytes``: bytes of the ONNX graphs (weights dominate); ``graph_dtype``: their dtype
    (float32/float16). A fp16 engine of a fp32 graph holds half the bytes; int8/fp8 a quarter. ``quantized``:
    the graphs already hold low-bit weights (`export --weights`): their bytes are what the engine holds.
    """
    profile = load_profile(profile)
    precision = precision or profile.default_precision
    ctx = effective_max_context(profile, max_context)
    elt = DTYPE_BYTES.get(graph_dtype, 4)
    engine_elt = min(elt, DTYPE_BYTES[precision]) if precision != "fp32" else elt
    kv_elt = min(elt, 2) if precision != "fp32" else elt  # KV stays fp16 with quantized weights
    mib = 1 << 20
    weights = weight_bytes if quantized else weight_bytes * engine_elt / elt
    kv = 2 * model.num_layers * ctx * profile.max_batch * model.kv_heads * model.head_dim * kv_elt
    q = max(profile.max_prefill_chunk, profile.max_tree_nodes)
    io = q * (model.vocab + model.hidden) * kv_elt + profile.max_frontier * model.vocab * kv_elt
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
