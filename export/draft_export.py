"""Export of the Medusa draft side: heads -> heads.onnx + draft_lm_head.onnx, the tree, validation."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from spectrt.export.draft_graphs import DraftTarget, build_draft_lm_head_graph, build_heads_graph
from spectrt.export.medusa import check_compatible, load_medusa
from spectrt.export.onnx_graph import save_graph
from spectrt.export.trees import choose_tree
from spectrt.export.validate import Check, dtype_atol
from spectrt.runtime.artifact import DraftInfo, GraphRecord
from spectrt.runtime.contract import DRAFT_LM_HEAD, HEADS
from spectrt.runtime.errors import SpectrtError
from spectrt.runtime.ort_runner import OrtGraphRunner


def export_medusa(heads_path: str, t: DraftTarget) -> tuple[dict[str, GraphRecord], DraftInfo]:
    """Write heads.onnx and draft_lm_head.onnx into ``t.root``; returns (graph records, draft info)."""
    heads = load_medusa(heads_path)
    check_compatible(heads, t.dims.hidden, t.dims.vocab)
    c = heads.config
    shared = c.shared_lm_head  # the heads use the base's LM head
    state = {k: v.detach().float().numpy() for k, v in heads.reference_state_dict().items()}
    if shared:
        lm = t.model.get_output_embeddings().weight.detach().float().numpy()  # [V, H], the base's LM head
    else:
        lm = np.stack([state[f"{h}.{c.num_layers}.weight"] for h in range(c.num_heads)])  # [K, V, H]
    tree = choose_tree(t.tree_spec, Path(heads_path), c.num_heads, t.topk)
    kept = t.trim.kept_ids if t.trim is not None else None
    records = {
        "heads": save_graph(build_heads_graph(state, t.dims.hidden, t.dtype, t.opset, t.producer), t.root, "heads"),
        "draft_lm_head": save_graph(build_draft_lm_head_graph(lm, c.num_heads, t.topk, t.dtype, t.opset, t.producer,
                                                              kept_ids=kept), t.root, "draft_lm_head"),
    }
    draft = DraftInfo(kind="medusa", num_heads=c.num_heads, num_layers=c.num_layers, topk=t.topk,
                      shared_lm_head=shared, source=str(heads_path), tree=tree.paths,
                      lm_head_rows=int(lm.shape[-2] if kept is None else len(kept)), vocab_trim=t.trim_info())
    return records, draft


def validate_medusa(artifact, model, heads_path: str, prompt_ids: list[int], trim=None) -> list:
    """ORT heads + draft LM head vs the torch heads on the base's real hidden states."""
    import torch

    heads = load_medusa(heads_path)
    with torch.no_grad():
        hidden = model(torch.tensor([prompt_ids]), output_hidden_states=True).hidden_states[-1][0]  # [n, H]
        feats = heads.features(hidden)  # [n, K, H]
        lm = model.get_output_embeddings().weight if heads.config.shared_lm_head else None
        logits = heads.logits(hidden, lm)  # [n, K, V]
        kept = torch.as_tensor(trim.kept_ids) if trim is not None else None
        if kept is not None:
            logits = logits[..., kept]
        ref_scores, ref_ids = logits.topk(artifact.draft.topk, dim=-1)
        ref_logprobs = torch.log_softmax(logits.float(), dim=-1).gather(-1, ref_ids)
        if kept is not None:
            ref_ids = kept[ref_ids]
    dtype = artifact.dtype
    with OrtGraphRunner(artifact, "heads", len(prompt_ids)) as h, \
            OrtGraphRunner(artifact, "draft_lm_head", len(prompt_ids)) as d:
        f = h(hidden_states=hidden.numpy().astype(dtype))["head_features"]
        out = d(head_features=f)
        f_atol = dtype_atol(HEADS.outputs[0], dtype)
        _, scores_spec, logprobs_spec = DRAFT_LM_HEAD.outputs
        same_top1 = bool((out["topk_ids"][..., 0] == ref_ids[..., 0].numpy()).all())
        checks = [Check("heads features", float(np.abs(f - feats.numpy()).max()), f_atol),
                  Check("draft top-k scores", float(np.abs(out["topk_scores"] - ref_scores.numpy()).max()),
                        dtype_atol(scores_spec, dtype), same_top1),
                  Check("draft top-k log-probs", float(np.abs(out["topk_logprobs"] - ref_logprobs.numpy()).max()),
                        dtype_atol(logprobs_spec, dtype), same_top1)]
    failed = [c for c in checks if not c.ok]
    if failed:
        raise SpectrtError(f"validation failed: {failed[0].name}: max |delta| {failed[0].max_abs:.2e}")
    return checks
