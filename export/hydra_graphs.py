"""Hydra / Hydra++ export: ``hydra_head.{i}.onnx`` per head, the LM head(s), ``hydra_prefix.onnx`` (Hydra++),
validation against the torch module, and the manifest ``draft`` section.

No Hydra graph holds the vocabulary embedding: heads take ``path_embeddings`` as an input, and the runtime
gathers those rows from a read-only memmap of the base graph's own ``embed_tokens`` initializer inside
``base.onnx.data`` (offset/shape/dtype recorded here, in the manifest's ``draft.embedding``).
LM heads: a shared base LM head -> ``draft_lm_head.onnx`` (heads = 1, batch = frontier); own LM heads ->
``hydra_lm_head.{i}.onnx``. VocabTrim's kept ids apply to either.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

import onnx
from onnx import TensorProto

from spectrt.export.base import _linear, _rms_norm, _Shapes, attention_tables, decoder_layer
from spectrt.export.draft_graphs import DraftTarget, build_draft_lm_head_graph
from spectrt.export.families import decoder_dims, rope_tables
from spectrt.export.hydra import check_compatible, load_hydra
from spectrt.export.onnx_graph import GraphBuilder, save_graph
from spectrt.export.trees import choose_tree
from spectrt.export.validate import Check, dtype_atol
from spectrt.runtime.artifact import DraftInfo, EmbeddingRef, GraphRecord
from spectrt.runtime.contract import DRAFT_LM_HEAD, HYDRA_HEAD, HYDRA_PREFIX
from spectrt.runtime.errors import SpectrtError
from spectrt.runtime.hydra import EmbeddingTable
from spectrt.runtime.ort_runner import OrtGraphRunner, OrtPrefixRunner

EMBED_INITIALIZER = "embed_tokens"
ONNX_FLOAT = {1: "float32", 10: "float16"}


def _np(t) -> np.ndarray:
    return t.detach().float().cpu().numpy()


def _param(module, hf_name: str, transpose: bool = False) -> np.ndarray | None:
    """A torch layer's weight by its Hugging Face name (``self_attn.q_proj.weight``), None if absent."""
    obj = module
    for part in hf_name.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    w = _np(obj)
    return np.ascontiguousarray(w.T) if transpose else w


def build_hydra_head_graph(heads, i: int, dtype: str, opset: int, producer: str):
    """Head ``i``: context [F, H] + path_embeddings [F, i + 1, H] -> head_features [F, 1, H]."""
    H, L = heads.config.hidden_size, heads.config.num_layers
    g = GraphBuilder(f"spectrt_hydra_head_{i}", opset, dtype)
    dims = {"hidden": H, "heads": 1, "depth": i + 1}
    ctx = g.add_input(HYDRA_HEAD.inputs[0], dims)
    path = g.add_input(HYDRA_HEAD.inputs[1], dims)
    x = g.op("Concat", ctx, g.op("Reshape", path, g.const([0, (i + 1) * H])), axis=1)  # [F, (i + 2) H]
    first = heads.hydra_mlp[i][1]
    y = _linear(g, x, _np(first.linear.weight).T, _np(first.linear.bias), "first.linear")
    r = _linear(g, x, _np(first.res_connection.weight).T, _np(first.res_connection.bias), "first.res_connection")
    x = g.op("Add", r, g.op("Mul", y, g.op("Sigmoid", y)))
    if L > 1:  # the plain blocks are one module (list multiplication): its weights are stored once
        block = heads.hydra_mlp[i][3]
        w = g.weight("block.linear.weight", _np(block.linear.weight).T)
        b = g.weight("block.linear.bias", _np(block.linear.bias))
        for _ in range(L - 1):
            y = g.op("Add", g.op("MatMul", x, w), b)
            x = g.op("Add", x, g.op("Mul", y, g.op("Sigmoid", y)))
    g.add_output(HYDRA_HEAD.outputs[0], dims, g.op("Unsqueeze", x, g.const([1])))
    return g.model(producer)


def build_hydra_prefix_graph(prefix, kv_heads: int, head_dim: int, hidden: int, inv_freq: np.ndarray,
                             rope_scaling: float, dtype: str, opset: int, producer: str):
    """The Hydra++ prefix layer over base hidden states, KV cache under the base's token-major layout."""
    p = prefix.layers[0]
    a = p.self_attn
    D, KVH, NH = head_dim, kv_heads, a.nh
    g = GraphBuilder("spectrt_hydra_prefix", opset, dtype)
    cdims = {"hidden": hidden, "kv_heads": KVH, "head_dim": D}
    ins, outs = HYDRA_PREFIX.expand(cdims)
    names = {s.name: g.add_input(s, cdims) for s in ins}
    out_spec = {s.name: s for s in outs}
    x, pos, tree = names["hidden_states"], names["position_ids"], names["tree_mask"]
    shp = _Shapes(g, x, "past_key.0")  # batch and q are dims 0 and 1 of hidden_states too
    tables = attention_tables(g, tree, pos, shp, inv_freq, rope_scaling, NH // KVH)
    x = decoder_layer(g, x, lambda n, t=False: _param(p, n, t), p.input_layernorm.eps, NH, KVH, D,
                      (names["past_key.0"], names["past_value.0"]), (out_spec["new_key.0"], out_spec["new_value.0"]),
                      cdims, tables, "prefix")
    out = _rms_norm(g, x, g.weight("final_norm", _np(prefix.norm.weight)), prefix.norm.eps)
    g.add_output(out_spec["context"], cdims, out)
    order = {s.name: n for n, s in enumerate(outs)}
    g.outputs.sort(key=lambda vi: order[vi.name])
    return g.model(producer)


def embedding_info(base_onnx: Path) -> EmbeddingRef:
    """Where the base graph's ``embed_tokens`` lives in its external data: file, byte offset, shape, dtype."""
    m = onnx.load(str(base_onnx), load_external_data=False)
    init = next((t for t in m.graph.initializer if t.name == EMBED_INITIALIZER), None)
    if init is None:
        raise SpectrtError(f"{base_onnx}: no '{EMBED_INITIALIZER}' initializer to share with the hydra heads")
    if init.data_location != TensorProto.EXTERNAL or init.data_type not in ONNX_FLOAT:
        raise SpectrtError(f"{base_onnx}: '{EMBED_INITIALIZER}' is not stored as external float data")
    ext = {e.key: e.value for e in init.external_data}
    shape = [int(d) for d in init.dims]
    dtype = ONNX_FLOAT[init.data_type]
    length = int(ext.get("length", np.prod(shape) * np.dtype(dtype).itemsize))
    return EmbeddingRef(EMBED_INITIALIZER, ext["location"], int(ext.get("offset", 0)), length,
                        (shape[0], shape[1]), dtype, "little")


def _load(heads_path, model, dims):
    heads = load_hydra(heads_path, base_config=model.config)
    check_compatible(heads, dims.hidden, dims.vocab, dims.kv_heads, dims.head_dim)
    if heads.config.arch == "prefix-mlp":
        inv_freq, scale = rope_tables(model)
        heads.prefix_embeding_layer.set_rope(inv_freq, scale)
    return heads


def export_hydra(heads_path: str, t: DraftTarget) -> tuple[dict[str, GraphRecord], DraftInfo]:
    """Write the Hydra graphs into ``t.root`` (which already holds base.onnx); returns (records, draft info)."""
    heads = _load(heads_path, t.model, t.dims)
    c = heads.config
    tree = choose_tree(t.tree_spec, Path(heads_path), c.num_heads, t.topk)
    kept = t.trim.kept_ids if t.trim is not None else None
    records = {}
    for i in range(c.num_heads):
        records[f"hydra_head.{i}"] = save_graph(build_hydra_head_graph(heads, i, t.dtype, t.opset, t.producer),
                                                t.root, f"hydra_head.{i}")
    if c.shared_lm_head:
        lm = _np(t.model.get_output_embeddings().weight)
        records["draft_lm_head"] = save_graph(
            build_draft_lm_head_graph(lm, 1, t.topk, t.dtype, t.opset, t.producer, kept), t.root, "draft_lm_head")
    else:
        for i in range(c.num_heads):
            w, b = heads.lm_head(i)
            graph = build_draft_lm_head_graph(_np(w), 1, t.topk, t.dtype, t.opset, t.producer, kept,
                                              bias=None if b is None else _np(b))
            records[f"hydra_lm_head.{i}"] = save_graph(graph, t.root, f"hydra_lm_head.{i}")
    if c.arch == "prefix-mlp":
        inv_freq, scale = rope_tables(t.model)
        graph = build_hydra_prefix_graph(heads.prefix_embeding_layer, t.dims.kv_heads, t.dims.head_dim,
                                         t.dims.hidden, inv_freq, scale, t.dtype, t.opset, t.producer)
        records["hydra_prefix"] = save_graph(graph, t.root, "hydra_prefix")
    draft = DraftInfo(kind="hydra", arch=c.arch, num_heads=c.num_heads, num_layers=c.num_layers, topk=t.topk,
                      shared_lm_head=c.shared_lm_head, source=str(heads_path), tree=tree.paths,
                      embedding=embedding_info(t.root / "base.onnx"),
                      lm_head_rows=int(t.dims.vocab if kept is None else len(kept)), vocab_trim=t.trim_info())
    return records, draft


def validate_hydra(artifact, model, heads_path: str, prompt_ids: list[int], trim=None, seed: int = 0) -> list:
    """ORT vs torch on the base's real hidden states: prefix layer (two chunks through its KV cache), every
    head's features on random paths, every LM head's top-k; and the embedding memmap vs the base's table."""
    import torch

    heads = _load(heads_path, model, decoder_dims(model.config))
    c, dtype, n = heads.config, artifact.dtype, len(prompt_ids)
    topk = artifact.draft.topk
    rng = np.random.default_rng(seed)
    checks = []
    emb = EmbeddingTable.of(artifact)
    ref_table = model.get_input_embeddings().weight.detach().float().numpy()
    ids = rng.integers(0, ref_table.shape[0], 64)
    checks.append(Check("embedding memmap rows", float(np.abs(emb(ids).astype(np.float32)
                                                              - ref_table[ids].astype(dtype)).max()), 0.0))
    with torch.no_grad():
        hidden = model(torch.tensor([prompt_ids]), output_hidden_states=True).hidden_states[-1]  # [1, n, H]
        ctx = heads.context(hidden)[0]  # [n, H]
    if c.arch == "prefix-mlp":
        h = n // 2
        with OrtPrefixRunner(artifact, max_q=n) as pre:  # validation runs on ONNX Runtime CPU
            hs = hidden[0].numpy().astype(dtype)
            a = pre.forward(hs[:h], np.arange(h), np.tri(h, dtype=np.bool_)).copy()
            pre.commit(range(h))
            b = pre.forward(hs[h:], np.arange(h, n), np.tri(n - h, dtype=np.bool_)).copy()
        got = np.concatenate([a, b])
        checks.append(Check("hydra prefix context (2 chunks)", float(np.abs(got - ctx.numpy()).max()),
                            dtype_atol(HYDRA_PREFIX.outputs[0], dtype)))
    kept = torch.as_tensor(trim.kept_ids) if trim is not None else None
    lm_w = model.get_output_embeddings().weight.detach().float() if c.shared_lm_head else None
    f_atol = dtype_atol(HYDRA_HEAD.outputs[0], dtype)
    _, scores_spec, logprobs_spec = DRAFT_LM_HEAD.outputs
    s_atol, lp_atol = dtype_atol(scores_spec, dtype), dtype_atol(logprobs_spec, dtype)
    for i in range(c.num_heads):
        path_ids = rng.integers(0, ref_table.shape[0], (n, i + 1))
        pe = torch.as_tensor(ref_table[path_ids])  # [n, i + 1, H]
        with torch.no_grad():
            feats = heads.features(i, ctx, pe)
            logits = heads.logits(i, feats, lm_w)
            if kept is not None:
                logits = logits[..., kept]
            ref_scores, ref_ids = logits.topk(topk, dim=-1)
            ref_logprobs = torch.log_softmax(logits.float(), dim=-1).gather(-1, ref_ids)
            if kept is not None:
                ref_ids = kept[ref_ids]
        lm_name = "draft_lm_head" if c.shared_lm_head else f"hydra_lm_head.{i}"
        with OrtGraphRunner(artifact, f"hydra_head.{i}", n) as hr, OrtGraphRunner(artifact, lm_name, n) as lr:
            f = hr(context=ctx.numpy().astype(dtype), path_embeddings=pe.numpy().astype(dtype))["head_features"]
            out = lr(head_features=f)
            checks.append(Check(f"hydra head {i} features", float(np.abs(f[:, 0] - feats.numpy()).max()), f_atol))
            same = bool((out["topk_ids"][:, 0, 0] == ref_ids[:, 0].numpy()).all())
            checks.append(Check(f"hydra head {i} top-k scores",
                                float(np.abs(out["topk_scores"][:, 0] - ref_scores.numpy()).max()), s_atol, same))
            checks.append(Check(f"hydra head {i} top-k log-probs",
                                float(np.abs(out["topk_logprobs"][:, 0] - ref_logprobs.numpy()).max()), lp_atol, same))
    failed = [ch for ch in checks if not ch.ok]
    if failed:
        raise SpectrtError(f"validation failed: {failed[0].name}: max |delta| {failed[0].max_abs:.2e} "
                           f"(atol {failed[0].atol:.0e}, argmax equal {failed[0].argmax_equal})")
    return checks
