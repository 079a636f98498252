"""The base decoder as one ONNX graph serving prefill, decode and tree verification (contract: BASE).

Attention sees the whole past plus the new tokens allowed by ``tree_mask``; positions come from the
caller (past + depth), so the same graph runs a causal chunk, one token, or a tree of candidates.
Only standard ONNX ops (no contrib ops) so TensorRT's parser takes it. With weights quantized in the
ORT-only ``matmulnbits`` format (``export.quantize``) the graph is written for ONNX Runtime instead
(``fused_decoder_layer``): fused QKV and gate/up MatMulNBits, ORT's SkipSimplifiedLayerNormalization and
GroupQueryAttention (packed QKV, rotary inside at the given positions) on an in-place KV cache, batch 1 --
a sixth of the nodes, since on a CPU at batch 1 every node's dispatch costs about as much as a small
projection.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
from onnx import helper

from spectrt.export.families import DecoderDims, HFWeights
from spectrt.export.onnx_graph import ONNX_DTYPES, GraphBuilder
from spectrt.runtime.contract import BASE, graph_spec
from spectrt.runtime.errors import SpectrtError

FUSED_OPSET = 23  # ONNX RMSNormalization (the matmulnbits form), run on CPU by onnxruntime 1.32 (measured)


class _Shapes:
    """Runtime dims computed once per graph from the inputs' shapes (1-D int64 tensors)."""

    def __init__(self, g: GraphBuilder, ids: str, past_key0: str | None):
        ids_shape = g.op("Shape", ids)
        self.batch = g.op("Slice", ids_shape, g.const([0]), g.const([1]))
        self.q = g.op("Slice", ids_shape, g.const([1]), g.const([2]))
        if past_key0 is not None:  # token-major past [P, B, ...]
            self.past = g.op("Slice", g.op("Shape", past_key0), g.const([0]), g.const([1]))


def _rms_norm(g: GraphBuilder, x: str, weight: str, eps: float) -> str:
    # x: [B, q, H]; computed in fp32 like transformers' LlamaRMSNorm, then cast back
    xf = g.op("Cast", x, to=ONNX_DTYPES["float32"]) if g.dtype != "float32" else x
    sq = g.op("Mul", xf, xf)
    if g.opset >= 18:  # axes became an input in opset 18
        var = g.op("ReduceMean", sq, g.const([-1]), keepdims=1)
    else:
        var = g.op("ReduceMean", sq, axes=[-1], keepdims=1)
    inv = g.op("Reciprocal", g.op("Sqrt", g.op("Add", var, g.const(eps, "float32"))))
    y = g.op("Mul", xf, inv)
    if g.dtype != "float32":
        y = g.op("Cast", y, to=ONNX_DTYPES[g.dtype])
    return g.op("Mul", y, weight)


def _linear(g: GraphBuilder, x: str, w: np.ndarray, b: np.ndarray | None, name: str) -> str:
    if g.quant is not None and name in g.quant:  # weight-only quantized (export.quantize)
        y = g.quant.matmul(g, x, name)
    else:
        y = g.op("MatMul", x, g.weight(f"{name}.weight", w), name=name)  # w stored [in, out]
    return g.op("Add", y, g.weight(f"{name}.bias", b)) if b is not None else y


def _rotate(g: GraphBuilder, x: str, cos: str, sin: str, half: int) -> str:
    # x: [B, q, heads, D]; rotate_half(x) = concat(-x2, x1)
    x1, x2 = g.op("Split", x, g.const([half, half]), axis=-1, outputs=2)
    rot = g.op("Concat", g.op("Neg", x2), x1, axis=-1)
    return g.op("Add", g.op("Mul", x, cos), g.op("Mul", rot, sin))


def attention_tables(g: GraphBuilder, tree: str, pos: str, shp: _Shapes, inv_freq: np.ndarray,
                     rope_scaling: float, groups: int) -> tuple[str, str, str]:
    """(bias [B, 1, G*q, P+q], cos, sin [B, q, 1, D]): computed once per graph, shared by its layers.

    The bias is 0 where visible and finfo.min where masked; the past is fully visible.
    """
    minval = float(np.finfo(g.np_dtype).min)
    tree_bias = g.op("Where", tree, g.const(0.0, "model"), g.const(minval, "model"))  # [B, q, q]
    past_zero = g.op("ConstantOfShape", g.op("Concat", shp.batch, shp.q, shp.past, axis=0),
                     value=helper.make_tensor("zero", 1 if g.dtype == "float32" else 10, [1], [0]))
    bias = g.op("Unsqueeze", g.op("Concat", past_zero, tree_bias, axis=2), g.const([1]))  # [B, 1, q, P+q]
    if groups > 1:
        bias = g.op("Tile", bias, g.const([1, 1, groups, 1]))  # rows ordered (g, t) like the queries
    # rotary tables from positions, in fp32
    freqs = g.op("Mul", g.op("Unsqueeze", g.op("Cast", pos, to=ONNX_DTYPES["float32"]), g.const([-1])), g.const(inv_freq, "float32"))
    emb = g.op("Concat", freqs, freqs, axis=-1)
    cos, sin = g.op("Cos", emb), g.op("Sin", emb)
    if rope_scaling != 1.0:
        cos, sin = g.op("Mul", cos, g.const(rope_scaling, "float32")), g.op("Mul", sin, g.const(rope_scaling, "float32"))
    if g.dtype != "float32":
        cos, sin = g.op("Cast", cos, to=ONNX_DTYPES[g.dtype]), g.op("Cast", sin, to=ONNX_DTYPES[g.dtype])
    return bias, g.op("Unsqueeze", cos, g.const([2])), g.op("Unsqueeze", sin, g.const([2]))


def decoder_layer(g: GraphBuilder, x: str, param, eps: float, heads: int, kv_heads: int, head_dim: int,
                  past: tuple[str, str], new: tuple, cdims: dict, tables: tuple[str, str, str], name: str) -> str:
    """One pre-norm decoder layer (RMSNorm, rotary GQA attention over past + new, SiLU-gated MLP).

    ``param(hf_name, transpose=False)`` returns a Hugging Face layer weight (``self_attn.q_proj.weight``
    ...) as numpy, or None when absent (biases). ``new``: the contract specs of this layer's new K/V
    outputs, written token-major ``[q, B, kv, hd]``. Returns the layer output ``[B, q, H]``.
    """
    D, KVH, NH, G = head_dim, kv_heads, heads, heads // kv_heads
    bias, cos, sin = tables
    h = _rms_norm(g, x, g.weight(f"{name}.input_norm", param("input_layernorm.weight")), eps)
    qkv = {}
    for proj in ("q", "k", "v"):
        qkv[proj] = _linear(g, h, param(f"self_attn.{proj}_proj.weight", True), param(f"self_attn.{proj}_proj.bias"),
                            f"{name}.{proj}_proj")
    q = g.op("Reshape", qkv["q"], g.const([0, 0, NH, D]))  # [B, q, NH, D]
    k = g.op("Reshape", qkv["k"], g.const([0, 0, KVH, D]))  # [B, q, KVH, D]
    v = g.op("Reshape", qkv["v"], g.const([0, 0, KVH, D]))
    q, k = _rotate(g, q, cos, sin, D // 2), _rotate(g, k, cos, sin, D // 2)

    new_k = g.add_output(new[0], cdims, g.op("Transpose", k, perm=[1, 0, 2, 3]))  # [q, B, KVH, D]
    new_v = g.add_output(new[1], cdims, g.op("Transpose", v, perm=[1, 0, 2, 3]))
    keys_t = g.op("Transpose", g.op("Concat", past[0], new_k, axis=0), perm=[1, 2, 3, 0])  # [B, KVH, D, S]
    vals_t = g.op("Transpose", g.op("Concat", past[1], new_v, axis=0), perm=[1, 2, 0, 3])  # [B, KVH, S, D]

    qg = g.op("Transpose", g.op("Reshape", q, g.const([0, 0, KVH, G, D])), perm=[0, 2, 3, 1, 4])
    qg = g.op("Reshape", qg, g.const([0, 0, -1, D]))  # [B, KVH, G*q, D]
    scale = g.const(1.0 / np.sqrt(D), "model")
    scores = g.op("Add", g.op("Mul", g.op("MatMul", qg, keys_t), scale), bias)  # [B, KVH, G*q, S]
    ctx = g.op("MatMul", g.op("Softmax", scores, axis=-1), vals_t)  # [B, KVH, G*q, D]
    ctx = g.op("Transpose", g.op("Reshape", ctx, g.const([0, 0, G, -1, D])), perm=[0, 3, 1, 2, 4])
    ctx = g.op("Reshape", ctx, g.const([0, 0, NH * D]))  # [B, q, NH*D]
    x = g.op("Add", x, _linear(g, ctx, param("self_attn.o_proj.weight", True), param("self_attn.o_proj.bias"),
                               f"{name}.o_proj"))

    h = _rms_norm(g, x, g.weight(f"{name}.post_norm", param("post_attention_layernorm.weight")), eps)
    gate = _linear(g, h, param("mlp.gate_proj.weight", True), param("mlp.gate_proj.bias"), f"{name}.gate_proj")
    up = _linear(g, h, param("mlp.up_proj.weight", True), param("mlp.up_proj.bias"), f"{name}.up_proj")
    act = g.op("Mul", g.op("Mul", gate, g.op("Sigmoid", gate)), up)  # SiLU(gate) * up
    down = _linear(g, act, param("mlp.down_proj.weight", True), param("mlp.down_proj.bias"), f"{name}.down_proj")
    return g.op("Add", x, down)


def skip_norm(g: GraphBuilder, delta: str, x: str, weight: str, eps: float) -> tuple[str, str]:
    """(RMSNorm(x + delta) * weight, x + delta) in one ORT SkipSimplifiedLayerNormalization (fp32 inside)."""
    h, total = g.fresh("skip_norm_out"), g.fresh("residual")
    g.op("SkipSimplifiedLayerNormalization", delta, x, weight, outputs=[h, "", "", total], domain="com.microsoft",
         epsilon=eps)
    return h, total


class FusedTables(NamedTuple):
    """Per-graph inputs of every fused layer's GroupQueryAttention, computed once."""

    bias: str  # [B, 1, q (+1), P + q (+1)]
    seqlens: str  # [B] int32: tokens in the cache after the call (+1), minus one
    total: str  # scalar int32: the same, over the batch
    cos: str  # [max_context + 1, D/2] fp32 rotary tables
    sin: str
    pos: str  # [B, q (+1)] positions
    q: str | None  # [1]: the call's rows, to drop the dummy row after attention; None: no dummy row
    last: str | None  # [1]: q - dummy rows, where the rows the dummy copies start


def fused_tables(g: GraphBuilder, tree: str, pos: str, past_length: str, shp: _Shapes, inv_freq: np.ndarray,
                 rope_scaling: float, max_context: int, attention_pad: bool) -> FusedTables:
    """The GroupQueryAttention inputs shared by the fused layers.

    GroupQueryAttention is causal over the slots (a tree's parents precede their children) and adds the bias:
    0 over the past and where ``tree`` allows, finfo.min elsewhere. Rotary tables cover every position the
    cache can hold, in fp32. ``attention_pad``: a one-row call's attention runs on a dummy row after it (a
    copy, at its position, seeing everything; its KV lands one slot past the call's and is never committed);
    calls of two rows or more get none. ORT's GroupQueryAttention multiplies probabilities by V with a GEMV
    for one row and a GEMM for several, which round differently; with the dummy it never sees one row, so a
    decode step's attention equals a row of a tree pass bit for bit while its projections still run at one
    row. The real row sees no more than before: the dummy's slot is after its own, outside its causal span."""
    minval = float(np.finfo(g.np_dtype).min)
    past_zero = g.op("ConstantOfShape", g.op("Concat", shp.batch, shp.q, past_length, axis=0),
                     value=helper.make_tensor("zero", ONNX_DTYPES[g.dtype], [1], [0]))
    tree_bias = g.op("Where", tree, g.const(0.0, "model"), g.const(minval, "model"))  # [B, q, q]
    bias = g.op("Unsqueeze", g.op("Concat", past_zero, tree_bias, axis=2), g.const([1]))
    rows, last = shp.q, None
    if attention_pad:  # one-row calls only: dummy = max(0, 2 - q) rows, copies of the last
        dummy = g.op("Max", g.op("Sub", g.const([2]), shp.q), g.const([0]))  # [1]: 1 when q = 1, else 0
        rows, last = g.op("Add", shp.q, dummy), g.op("Sub", shp.q, dummy)
        bias = g.op("Pad", bias, g.op("Concat", g.const([0, 0, 0, 0, 0, 0]), dummy, dummy, axis=0))  # 0: visible
        pos = g.op("Concat", pos, g.op("Slice", pos, last, shp.q, g.const([1])), axis=1)
    total = g.op("Add", past_length, rows)  # [B]: slots in the cache after this call
    seqlens = g.op("Cast", g.op("Sub", total, g.const([1])), to=ONNX_DTYPES["int32"])
    total = g.op("Cast", g.op("ReduceMax", total, keepdims=0), to=ONNX_DTYPES["int32"])  # scalar
    # GroupQueryAttention wants a table row per slot the call fills: a dummy row (the runner's or attention's)
    # at the last position takes one past max_context (its position repeats a real one)
    freqs = np.arange(max_context + 1, dtype=np.float32)[:, None] * inv_freq.astype(np.float32)[None]  # [C+1, D/2]
    cos, sin = (np.cos(freqs) * np.float32(rope_scaling), np.sin(freqs) * np.float32(rope_scaling))
    return FusedTables(bias, seqlens, total, g.weight("rope_cos", cos), g.weight("rope_sin", sin), pos,
                       shp.q if attention_pad else None, last)


def fused_decoder_layer(g: GraphBuilder, h: str, x: str, param, dims: DecoderDims, cache: tuple[str, str],
                        present: tuple, cdims: dict, t: FusedTables, next_norm: np.ndarray,
                        name: str) -> tuple[str, str]:
    """One decoder layer in ONNX Runtime's fused ops (batch 1, in-place KV cache). ``h``: the normed input
    [1, q, H], ``x``: the residual stream before it. Returns (h, x) for the next layer: ``next_norm`` (its
    input norm, or the final norm) is applied by the closing SkipSimplifiedLayerNormalization, which also
    adds the residual. ``cache``/``present``: this layer's contract KV input names and output specs."""
    D, KVH, NH, eps = dims.head_dim, dims.kv_heads, dims.num_heads, dims.rms_eps
    quant = g.quant
    projs = [f"self_attn.{p}_proj" for p in "qkv"]
    qkv_bias = quant.fuse([f"{name}.{p}_proj" for p in "qkv"], f"{name}.qkv_proj", [param(f"{p}.bias") for p in projs])
    qkv = quant.matmul(g, h, f"{name}.qkv_proj")  # [1, q, (NH + 2 KVH) D]
    if qkv_bias is not None:
        qkv = g.op("Add", qkv, g.weight(f"{name}.qkv_proj.bias", qkv_bias))
    g.add_output(present[0], cdims, None)
    g.add_output(present[1], cdims, None)
    # packed q/k/v in, rotary applied inside at the caller's positions (past + depth): no Split, no
    # RotaryEmbedding nodes (bit-identical to them, measured; 90 fewer nodes on SmolLM2, ~0.5 ms a step)
    if t.q is not None:  # the dummy row (fused_tables): a copy of the last
        qkv = g.op("Concat", qkv, g.op("Slice", qkv, t.last, t.q, g.const([1])), axis=1)
    ctx = g.op("GroupQueryAttention", qkv, "", "", cache[0], cache[1], t.seqlens, t.total, t.cos, t.sin, t.pos,
               t.bias, outputs=[g.fresh("attn_out"), present[0].name, present[1].name], domain="com.microsoft",
               num_heads=NH, kv_num_heads=KVH, scale=float(1.0 / np.sqrt(D)), do_rotary=1)[0]  # [1, q (+1), NH D]
    if t.q is not None:
        ctx = g.op("Slice", ctx, g.const([0]), t.q, g.const([1]))  # [1, q, NH D]
    attn = _linear(g, ctx, None, param("self_attn.o_proj.bias"), f"{name}.o_proj")
    h, x = skip_norm(g, attn, x, g.weight(f"{name}.post_norm", param("post_attention_layernorm.weight")), eps)
    mlp_bias = quant.fuse([f"{name}.gate_proj", f"{name}.up_proj"], f"{name}.gate_up_proj",
                          [param("mlp.gate_proj.bias"), param("mlp.up_proj.bias")])
    gate_up = quant.matmul(g, h, f"{name}.gate_up_proj")  # [1, q, 2 I]
    if mlp_bias is not None:
        gate_up = g.op("Add", gate_up, g.weight(f"{name}.gate_up_proj.bias", mlp_bias))
    gate, up = g.op("Split", gate_up, g.const([dims.intermediate, dims.intermediate]), axis=-1, outputs=2)
    act = g.op("Mul", g.op("Mul", gate, g.op("Sigmoid", gate)), up)  # SiLU(gate) * up
    down = _linear(g, act, None, param("mlp.down_proj.bias"), f"{name}.down_proj")
    return skip_norm(g, down, x, g.weight(f"{name}.next_norm", next_norm), eps)


def base_kv_layout(quant) -> str:
    """The KV layout ``build_base_graph`` gives the export (contract: KV layout)."""
    return "in-place" if quant is not None and quant.spec.format == "matmulnbits" else "token-major"


def build_base_graph(dims: DecoderDims, weights: HFWeights, inv_freq: np.ndarray, rope_scaling: float,
                     dtype: str, opset: int, producer: str, quant=None, max_context: int = 0):
    """``quant``: an ``export.quantize.QuantizedWeights`` whose linears (and LM head) are emitted quantized;
    in its ``matmulnbits`` format the graph is ONNX Runtime's fused form (``fused_decoder_layer``, opset
    ``FUSED_OPSET``, batch 1, in-place KV layout, rotary tables for ``max_context`` positions)."""
    layout = base_kv_layout(quant)
    fused, spec = layout == "in-place", graph_spec(BASE.name, layout)
    g = GraphBuilder("spectrt_base", FUSED_OPSET if fused else opset, dtype)
    g.quant = quant
    D, KVH, NH = dims.head_dim, dims.kv_heads, dims.num_heads
    cdims = {"hidden": dims.hidden, "vocab": dims.vocab, "kv_heads": KVH, "head_dim": D, **({"batch": 1} if fused else {})}
    ins, outs = spec.expand({"num_layers": dims.num_layers})
    names = {s.name: g.add_input(s, cdims) for s in ins}
    out_spec = {s.name: s for s in outs}
    ids, pos, tree = names["input_ids"], names["position_ids"], names["tree_mask"]
    shp = _Shapes(g, ids, None if fused else "past_key.0")

    if quant is not None and "embed_tokens" in quant:  # block-quantized table (shared with a quantized LM head)
        embed, x = None, quant.gather(g, ids, dims.hidden)  # [B, q, H]
    else:
        embed = g.weight("embed_tokens", weights.embed)  # [V, H], shared with a tied LM head
        x = g.op("Gather", embed, ids, axis=0)  # [B, q, H]
    kv_in, kv_out = [s.name for s in spec.per_layer_inputs], [s.name for s in spec.per_layer_outputs]
    layer_io = [(tuple(names[n.format(layer=i)] for n in kv_in), tuple(out_spec[n.format(layer=i)] for n in kv_out))
                for i in range(dims.num_layers)]
    final_norm = weights.require("model.norm.weight")
    if fused:
        if max_context < 1:
            raise SpectrtError("the fused (matmulnbits) base graph needs max_context for its rotary tables")
        tables = fused_tables(g, tree, pos, names["past_length"], shp, inv_freq, rope_scaling, max_context,
                              quant.spec.pads_rows)
        h = g.op("RMSNormalization", x, g.weight("layers.0.input_norm", weights.layer(0, "input_layernorm.weight")),
                 axis=-1, epsilon=dims.rms_eps)
        for i, (past, new) in enumerate(layer_io):
            last = i + 1 == dims.num_layers
            h, x = fused_decoder_layer(g, h, x, lambda n, t=False, i=i: weights.layer(i, n, t), dims, past, new, cdims,
                                       tables, final_norm if last else weights.layer(i + 1, "input_layernorm.weight"),
                                       f"layers.{i}")
        hidden = h
    else:
        tables = attention_tables(g, tree, pos, shp, inv_freq, rope_scaling, NH // KVH)
        for i, (past, new) in enumerate(layer_io):
            x = decoder_layer(g, x, lambda n, t=False, i=i: weights.layer(i, n, t), dims.rms_eps, NH, KVH, D,
                              past, new, cdims, tables, f"layers.{i}")
        hidden = _rms_norm(g, x, g.weight("final_norm", final_norm), dims.rms_eps)
    flat = g.op("Reshape", hidden, g.const([-1, dims.hidden]))  # [B*q, H]
    if quant is not None and "lm_head" in quant:
        logits = quant.matmul(g, flat, "lm_head", rank=2)  # [B*q, V]; the (float) embeddings stay for the Gather
    else:
        lm = weights.lm_head(dims.tied_embeddings)
        lm_w = embed if lm is None else g.weight("lm_head", lm)  # [V, H]: tied weights are stored once
        logits = g.op("Gemm", flat, lm_w, transB=1)  # [B*q, V]
    logits = g.op("Reshape", logits, g.op("Concat", shp.batch, shp.q, g.const([dims.vocab]), axis=0))
    g.add_output(out_spec["logits"], cdims, logits)
    g.add_output(out_spec["hidden_states"], cdims, hidden)
    g.add_output(out_spec["greedy_ids"], cdims, g.op("ArgMax", logits, axis=-1, keepdims=0))
    # keep the output order of the contract: logits, hidden_states, greedy_ids, then per-layer KV
    order = {s.name: n for n, s in enumerate(outs)}
    g.outputs.sort(key=lambda vi: order[vi.name])
    return g.model(producer)
