"""Static trees for an export: presets and node counts filled with the best paths for the heads' measured
accuracies (from their distillation report), or a tree JSON."""
from __future__ import annotations

import json
from pathlib import Path

from spectrt.runtime.errors import SpectrtError
from spectrt.runtime.tree import Tree

# Tree sizes (nodes, root included). "cpu" is what `spectrt calibrate tree` chooses for the shipped SmolLM2
# heads on 2 CPU cores (heads+lookup drafts, 32 bundled calibration prompts, rechecks priced): 2 nodes with
# costs timed on the machine (1.33x AR expected; `spectrt bench --stride 3`: 1.23x, and 1.12x for the 4-node
# tree it chose before rechecks were priced).
# Re-run it for another model or device (it writes its choice into the export). GPUs verify ~64 nodes for
# about the price of one (`calibrate tree --profile orin-nano-8gb`: 28 nodes, the profile's 32 rows less the
# lookup chain).
TREE_PRESETS = {"cpu": 2, "gpu": 64}
DEFAULT_TREE = "cpu"
REPORT = "report.json"  # written by `spectrt distill` next to the heads


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
