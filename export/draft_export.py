"""Export of the draft side: Medusa heads -> heads.onnx + draft_lm_head.onnx, the tree, validation."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from spectrt.export.draft_graphs import build_draft_lm_head_graph, build_heads_graph
from spectrt.export.onnx_graph import save_model
from spectrt.runtime.contract import DRAFT_LM_HEAD, HEADS
from spectrt.runtime.errors import SpectrtError
from spectrt.runtime.ort_runner import OrtGraphRunner
from spectrt.runtime.tree import Tree

# Tree sizes (nodes, root included). Measured with the shipped SmolLM2 heads on 2 CPU cores (fp32 ORT,
# spec_bench_dev every 30th prompt, VocabTrim 4k): 2 nodes 1.10x over AR, 3 nodes 0.99x, 4 nodes 0.97x;
# a verify of q=2 costs about one decode step there, q=4 ~1.15x. GPUs verify ~64 nodes for about the
# price of one.
TREE_PRESETS = {"cpu": 2, "gpu": 64}
DEFAULT_TREE = "cpu"
REPORT = "report.json"


SHIPPED_KINDS = ("medusa", "hydra")  # spectrt/data/heads/<model>-<kind>, preferred in this order


def shipped_heads(builtin: str | None, kind: str | None = None) -> Path | None:
    """Heads shipped in the repo for a built-in model (``spectrt/data/heads/<name>-<kind>``), if any.

    Without ``kind`` the first shipped of SHIPPED_KINDS is the built-in model's default.
    """
    if builtin is None:
        return None
    import spectrt

    root = Path(spectrt.__file__).parent / "data" / "heads"
    for k in (kind,) if kind else SHIPPED_KINDS:
        path = root / f"{builtin}-{k}"
        if (path / "config.json").is_file():
            return path
    return None


def head_accuracy(heads_dir: Path, num_heads: int, topk: int) -> list[list[float]]:
    """acc[d][r]: probability that rank r of head d is right, from the distillation report when present.

    The report gives cumulative top-k accuracies at a few k (e.g. top1, top5); the mass between two known
    k is spread evenly over those ranks, and ranks past the last known k decay geometrically. Where the
    report has ``chain_top1`` (head d right given heads < d right along rank 0), deeper heads are scaled to
    that conditional accuracy, since a tree only asks head d once its ancestors were accepted. Without a
    report, a conservative prior (accuracy halving per head and per rank) is used.
    """
    report = heads_dir / REPORT if heads_dir.is_dir() else None
    if report is not None and report.is_file():
        try:
            heads = json.loads(report.read_text())["heads"]
            acc = []
            for h in heads[:num_heads]:
                known = sorted((int(k[3:]), float(v)) for k, v in h.items() if k.startswith("top") and k[3:].isdigit())
                marg, prev_k, prev_c = [], 0, 0.0
                for k, c in known:
                    marg += [max(c - prev_c, 1e-6) / (k - prev_k)] * (k - prev_k)
                    prev_k, prev_c = k, c
                while len(marg) < topk:
                    marg.append(marg[-1] * 0.5)
                chain = [float(x.get("chain_top1", 0)) for x in heads[:len(acc) + 1]]
                d = len(acc)
                if d and chain[d - 1] > 0 and chain[d] > 0:
                    scale = min(chain[d] / chain[d - 1] / marg[0], 1.0 / marg[0])
                    marg = [m * scale for m in marg]
                acc.append(marg[:topk])
            if len(acc) == num_heads:
                return acc
        except (KeyError, TypeError, ValueError, IndexError, json.JSONDecodeError):
            pass
    return [[0.5 ** (d + 1) * 0.5 ** r for r in range(topk)] for d in range(num_heads)]


def choose_tree(spec: str | None, heads_dir: Path, num_heads: int, topk: int) -> Tree:
    """``spec``: a preset (cpu, gpu), a node count, a tree JSON path, or None (DEFAULT_TREE).

    Presets and counts build the best tree of that size from the heads' measured accuracies.
    """
    spec = str(spec if spec is not None else DEFAULT_TREE)
    if spec not in TREE_PRESETS and not spec.isdigit():
        tree = Tree.load(spec)
    else:
        nodes = TREE_PRESETS.get(spec) or int(spec)
        if nodes < 2:
            raise SpectrtError(f"a tree needs at least 2 nodes (root + 1 candidate), not {nodes}")
        tree = Tree.from_accuracy(head_accuracy(heads_dir, num_heads, topk), nodes)
    tree.check_drafter(num_heads, topk)
    return tree


# Built-in models' default VocabTrim: (bundled ranking in spectrt/data/vocab, kept N). SmolLM2: N = 2000
# kept the draft stage 7x faster (12.5 -> 1.8 ms per step) with no tau loss in the measured sweep.
BUILTIN_VOCAB = {"smollm2-135m": ("smollm2-135m.json", 2000)}


def builtin_vocab(builtin: str | None) -> tuple[str, int] | None:
    if builtin not in BUILTIN_VOCAB:
        return None
    import spectrt

    name, size = BUILTIN_VOCAB[builtin]
    return str(Path(spectrt.__file__).parent / "data" / "vocab" / name), size


def vocab_trim(model, tok, vocab: str | None, vocab_size: int | None, topk: int):
    """The VocabTrim to apply (or None): a vocab file (optionally re-cut to N) or a default calibration."""
    from spectrt.calibration.vocab import default_vocab, hf_tokenizer_hash, load_vocab

    if vocab is not None:
        trim = load_vocab(vocab, model.config.vocab_size, hf_tokenizer_hash(tok), topk, size=vocab_size)
    elif vocab_size is not None:
        trim = default_vocab(model, tok, vocab_size)
    else:
        return None
    if trim.size < topk:
        raise SpectrtError(f"VocabTrim keeps {trim.size} tokens, fewer than the draft top-k {topk}")
    return trim


def export_medusa(heads_path: str, model, dims, root: Path, dtype: str, opset: int, topk: int, tree_spec,
                  producer: str, file_record, trim=None) -> tuple[dict, dict]:
    """Write heads.onnx and draft_lm_head.onnx into ``root``; returns (graph records, manifest draft section)."""
    from spectrt.export.medusa import check_compatible, load_medusa

    heads = load_medusa(heads_path)
    check_compatible(heads, dims.hidden, dims.vocab)
    c = heads.config
    if not 1 <= topk <= dims.vocab:
        raise SpectrtError(f"top-k {topk} outside 1..{dims.vocab}")
    state = {k: v.detach().float().numpy() for k, v in heads.reference_state_dict().items()}
    if c.version == "2":
        lm = model.get_output_embeddings().weight.detach().float().numpy()  # [V, H], the base's LM head
    else:
        lm = np.stack([state[f"{h}.{c.num_layers}.weight"] for h in range(c.num_heads)])  # [K, V, H]
    tree = choose_tree(tree_spec, Path(heads_path), c.num_heads, topk)
    records = {}
    graph = build_heads_graph(state, dims.hidden, dtype, opset, producer)
    records["heads"] = file_record(root, save_model(graph, root / "heads.onnx"))
    kept = trim.kept_ids if trim is not None else None
    graph = build_draft_lm_head_graph(lm, c.num_heads, topk, dtype, opset, producer, kept_ids=kept)
    records["draft_lm_head"] = file_record(root, save_model(graph, root / "draft_lm_head.onnx"))
    draft = {"kind": "medusa", "num_heads": c.num_heads, "num_layers": c.num_layers, "version": c.version,
             "topk": topk, "source": str(heads_path), "dims": {"heads": c.num_heads, "topk": topk},
             "tree": tree.to_json(), "lm_head_rows": int(lm.shape[-2] if kept is None else len(kept)),
             "vocab_trim": trim.manifest() if trim is not None else None}
    return records, draft


def export_draft(heads_path: str, *args, **kwargs) -> tuple[dict, dict]:
    """Export Hydra checkpoints (config keys / hydra_lm_head files) with ``export_hydra``, others as Medusa."""
    from spectrt.export.hydra import is_hydra_checkpoint

    if is_hydra_checkpoint(heads_path):
        from spectrt.export.hydra_graphs import export_hydra

        return export_hydra(heads_path, *args, **kwargs)
    return export_medusa(heads_path, *args, **kwargs)


def validate_draft(artifact, model, heads_path: str, prompt_ids: list[int], trim=None) -> list:
    """Validation of whichever drafter the manifest says was exported."""
    if artifact.manifest.get("draft", {}).get("kind") == "hydra":
        from spectrt.export.hydra_graphs import validate_hydra

        return validate_hydra(artifact, model, heads_path, prompt_ids, trim)
    return validate_medusa(artifact, model, heads_path, prompt_ids, trim)


def validate_medusa(artifact, model, heads_path: str, prompt_ids: list[int], trim=None) -> list:
    """ORT heads + draft LM head vs the torch heads on the base's real hidden states."""
    import torch

    from spectrt.export.medusa import load_medusa
    from spectrt.export.validate import Check, dtype_atol

    heads = load_medusa(heads_path)
    with torch.no_grad():
        hidden = model(torch.tensor([prompt_ids]), output_hidden_states=True).hidden_states[-1][0]  # [n, H]
        feats = heads.features(hidden)  # [n, K, H]
        lm = model.get_output_embeddings().weight if heads.config.version == "2" else None
        logits = heads.logits(hidden, lm)  # [n, K, V]
        kept = torch.as_tensor(trim.kept_ids) if trim is not None else None
        if kept is not None:
            logits = logits[..., kept]
        ref_scores, ref_ids = logits.topk(artifact.manifest["draft"]["topk"], dim=-1)
        if kept is not None:
            ref_ids = kept[ref_ids]
    dtype = artifact.dtype
    with OrtGraphRunner(artifact, "heads", len(prompt_ids)) as h, \
            OrtGraphRunner(artifact, "draft_lm_head", len(prompt_ids)) as d:
        f = h(hidden_states=hidden.numpy().astype(dtype))["head_features"]
        out = d(head_features=f)
        f_atol = dtype_atol(HEADS.outputs[0], dtype)
        s_atol = dtype_atol(DRAFT_LM_HEAD.outputs[1], dtype)
        same_top1 = bool((out["topk_ids"][..., 0] == ref_ids[..., 0].numpy()).all())
        checks = [Check("heads features", float(np.abs(f - feats.numpy()).max()), f_atol),
                  Check("draft top-k scores", float(np.abs(out["topk_scores"] - ref_scores.numpy()).max()), s_atol,
                        same_top1)]
    failed = [c for c in checks if not c.ok]
    if failed:
        raise SpectrtError(f"validation failed: {failed[0].name}: max |delta| {failed[0].max_abs:.2e}")
    return checks
