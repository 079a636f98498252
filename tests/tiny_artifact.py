"""A tiny random artifact built with the exporter's own graph builders from numpy weights: no torch, no
transformers, a second to make. For the tests of check/profile/build/devices (test code, not shipped)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from spectrt.export.base import build_base_graph
from spectrt.export.draft_graphs import build_draft_lm_head_graph, build_heads_graph
from spectrt.export.families import DecoderDims, HFWeights
from spectrt.export.onnx_graph import save_graph
from spectrt.runtime.artifact import Manifest, ModelInfo, TokenizerInfo, write_manifest
from spectrt.runtime.contract import CONTRACT_VERSION, DEFAULT_OPSET

# A small device profile for the tiny artifacts: prefill chunks up to 32 tokens, trees up to 16 nodes
SMALL = """base: orin-nano-8gb
name: tiny-test
precisions: [fp32, fp16]
default_precision: fp32
max_context: 256
opt_context: 32
max_tree_nodes: 16
opt_tree_nodes: 8
max_prefill_chunk: 32
max_frontier: 16
workspace_mb: 256
builder_optimization_level: 1
"""

TINY_DIMS = {"hidden": 32, "vocab": 128, "num_layers": 2, "num_heads": 2, "kv_heads": 2, "head_dim": 16,
             "heads": 3, "topk": 4}


def _decoder(d: dict) -> DecoderDims:
    return DecoderDims(family="llama", hidden=d["hidden"], num_layers=d["num_layers"], num_heads=d["num_heads"],
                       kv_heads=d["kv_heads"], head_dim=d["head_dim"], intermediate=2 * d["hidden"], vocab=d["vocab"],
                       rms_eps=1e-5, tied_embeddings=True, sliding_window=None)


def _weights(dims: DecoderDims, rng) -> HFWeights:
    H, D, I = dims.hidden, dims.head_dim, dims.intermediate
    w = lambda *shape: (rng.standard_normal(shape) / np.sqrt(shape[-1])).astype(np.float32)  # noqa: E731
    state = {"model.embed_tokens.weight": w(dims.vocab, H), "model.norm.weight": np.ones(H, np.float32)}
    for i in range(dims.num_layers):
        p = f"model.layers.{i}."
        state.update({p + "input_layernorm.weight": np.ones(H, np.float32),
                      p + "post_attention_layernorm.weight": np.ones(H, np.float32),
                      p + "self_attn.q_proj.weight": w(dims.num_heads * D, H),
                      p + "self_attn.k_proj.weight": w(dims.kv_heads * D, H),
                      p + "self_attn.v_proj.weight": w(dims.kv_heads * D, H),
                      p + "self_attn.o_proj.weight": w(H, dims.num_heads * D),
                      p + "mlp.gate_proj.weight": w(I, H), p + "mlp.up_proj.weight": w(I, H),
                      p + "mlp.down_proj.weight": w(H, I)})
    return HFWeights(state)


def tiny_base_model(dims: dict | None = None, dtype: str = "float32", opset: int = DEFAULT_OPSET, seed: int = 0):
    d = _decoder(dict(TINY_DIMS, **(dims or {})))
    inv_freq = 1.0 / (10000 ** (np.arange(0, d.head_dim, 2) / d.head_dim))
    return build_base_graph(d, _weights(d, np.random.default_rng(seed)), inv_freq, 1.0, dtype, opset, "tiny")


def write_tiny_artifact(root: str | os.PathLike, dims: dict | None = None, dtype: str = "float32",
                        max_context: int = 256, opset: int = DEFAULT_OPSET,
                        graphs: tuple = ("base", "heads", "draft_lm_head")) -> Path:
    """Write DIR/{graph}.onnx, a tokenizer stub file and manifest.json; returns DIR (``load_artifact`` loads it)."""
    d = dict(TINY_DIMS, **(dims or {}))
    dec = _decoder(d)
    rng = np.random.default_rng(1)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    records = {}
    if "base" in graphs:
        records["base"] = save_graph(tiny_base_model(d, dtype, opset), root, "base")
    H, K = d["hidden"], d["heads"]
    if "heads" in graphs:
        state = {f"{h}.0.linear.{k}": rng.standard_normal(s).astype(np.float32) * 0.1
                 for h in range(K) for k, s in (("weight", (H, H)), ("bias", (H,)))}
        records["heads"] = save_graph(build_heads_graph(state, H, dtype, opset, "tiny"), root, "heads")
    if "draft_lm_head" in graphs:
        lm = rng.standard_normal((d["vocab"], H)).astype(np.float32)
        records["draft_lm_head"] = save_graph(build_draft_lm_head_graph(lm, K, d["topk"], dtype, opset, "tiny"),
                                              root, "draft_lm_head")
    (root / "tokenizer.json").write_text("{}\n")  # not loadable as a tokenizer: these artifacts never decode text
    write_manifest(root, Manifest(
        spectrt_version="tiny", contract_version=CONTRACT_VERSION,
        model=ModelInfo(**vars(dec), source="tiny-random"), dtype=dtype, opset=opset, max_context=max_context,
        graphs=records, tokenizer=TokenizerInfo(file="tokenizer.json", eos_token_ids=())))
    return root
