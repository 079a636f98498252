"""Draft graphs: Medusa heads (hidden -> per-head features) and the draft LM head (features -> top-k ids,
logits and log-probabilities).

Weights come in the public Medusa key format: ``{h}.{l}.linear.weight/bias`` for the ResBlocks and, for
per-head LM heads (v1), ``{h}.{L}.weight``. The draft LM head may be restricted to a kept-token table
(VocabTrim): top-k runs over the kept rows and ids are mapped back to full-vocabulary ids in the graph.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from spectrt.export.families import DecoderDims
from spectrt.export.onnx_graph import ONNX_DTYPES, GraphBuilder
from spectrt.export.vocabtrim import VocabTrim
from spectrt.runtime.artifact import VocabTrimInfo
from spectrt.runtime.contract import DRAFT_LM_HEAD, HEADS


@dataclass(frozen=True)
class DraftTarget:
    """What draft graphs are built against (Medusa or Hydra): the base model, where they go, and how."""

    model: Any  # the transformers base model (its LM head, embeddings, rotary tables)
    dims: DecoderDims
    root: Path  # the staged export directory, already holding base.onnx
    dtype: str
    opset: int
    topk: int
    tree_spec: str | None  # see export.trees.choose_tree
    producer: str  # spectrt version
    trim: VocabTrim | None = None

    def trim_info(self) -> VocabTrimInfo | None:
        return self.trim.info() if self.trim is not None else None


def medusa_layout(state: dict) -> tuple[int, int]:
    """(num_heads, num_layers) inferred from the keys."""
    heads = {int(k.split(".")[0]) for k in state if k.split(".")[0].isdigit()}
    layers = {int(k.split(".")[1]) for k in state if k.endswith(".linear.weight")}
    return len(heads), len(layers)


def build_heads_graph(state: dict, hidden: int, dtype: str, opset: int, producer: str):
    """All K heads at once: per layer one batched MatMul over stacked [K, H, H] weights."""
    K, L = medusa_layout(state)
    g = GraphBuilder("spectrt_medusa_heads", opset, dtype)
    dims = {"hidden": hidden, "heads": K}
    x = g.op("Unsqueeze", g.add_input(HEADS.inputs[0], dims), g.const([1, 2]))  # [B, 1, 1, H]
    for layer in range(L):
        w = np.stack([state[f"{h}.{layer}.linear.weight"].T for h in range(K)])  # [K, H_in, H_out]
        b = np.stack([state[f"{h}.{layer}.linear.bias"] for h in range(K)])[:, None, :]  # [K, 1, H]
        y = g.op("Add", g.op("MatMul", x, g.weight(f"resblock.{layer}.weight", w)), g.weight(f"resblock.{layer}.bias", b))
        x = g.op("Add", x, g.op("Mul", y, g.op("Sigmoid", y)))  # x + SiLU(Wx + b): [B, K, 1, H]
    feats = g.op("Reshape", x, g.const([0, K, hidden]))  # [B, K, H]
    g.add_output(HEADS.outputs[0], dims, feats)
    return g.model(producer)


def build_draft_lm_head_graph(lm_weight: np.ndarray, num_heads: int, topk: int, dtype: str, opset: int,
                              producer: str, kept_ids: np.ndarray | None = None, bias: np.ndarray | None = None):
    """Top-k over one shared LM head ``[V, H]`` (optionally with a bias ``[V]``, Hydra's own heads) or
    per-head heads ``[K, V, H]`` (Medusa heads with their own LM heads).

    With ``kept_ids`` [N], only those rows are kept and TopK's indices are gathered back to full ids.
    """
    per_head = lm_weight.ndim == 3
    if bias is not None and (per_head or not np.any(bias)):
        bias = None if not np.any(bias) else bias
        if per_head and bias is not None:
            raise ValueError("per-head LM heads with a bias are not supported")
    if kept_ids is not None:
        lm_weight = lm_weight[..., kept_ids, :]
        bias = bias[kept_ids] if bias is not None else None
    rows, hidden = lm_weight.shape[-2], lm_weight.shape[-1]
    g = GraphBuilder("spectrt_draft_lm_head", opset, dtype)
    dims = {"hidden": hidden, "topk": topk, "heads": num_heads}
    feats = g.add_input(DRAFT_LM_HEAD.inputs[0], dims)  # [B, K, H]
    if per_head:
        w = g.weight("lm_head", np.ascontiguousarray(lm_weight.transpose(0, 2, 1)))  # [K, H, N]
        logits = g.op("Squeeze", g.op("MatMul", g.op("Unsqueeze", feats, g.const([2])), w), g.const([2]))
    else:
        w = g.weight("lm_head", lm_weight)  # [N, H]
        flat = g.op("Reshape", feats, g.const([-1, hidden]))  # [B*K, H]
        shape = g.op("Concat", g.op("Slice", g.op("Shape", feats), g.const([0]), g.const([2])),
                     g.const([rows]), axis=0)
        gemm = (flat, w) if bias is None else (flat, w, g.weight("lm_head.bias", bias))
        logits = g.op("Reshape", g.op("Gemm", *gemm, transB=1), shape)  # [B, K, N]
    scores, idx = g.op("TopK", logits, g.const([topk]), axis=-1, largest=1, sorted=1, outputs=2)
    logits32 = g.op("Cast", logits, to=ONNX_DTYPES["float32"]) if dtype != "float32" else logits
    logprobs = g.op("GatherElements", g.op("LogSoftmax", logits32, axis=-1), idx, axis=-1)  # [B, K, topk] fp32
    if kept_ids is not None:
        idx = g.op("Gather", g.const(np.asarray(kept_ids, np.int64)), idx, axis=0)  # trimmed -> full ids
    ids_spec, scores_spec, logprobs_spec = DRAFT_LM_HEAD.outputs
    g.add_output(ids_spec, dims, idx)
    g.add_output(scores_spec, dims, scores)
    g.add_output(logprobs_spec, dims, logprobs)
    return g.model(producer)
