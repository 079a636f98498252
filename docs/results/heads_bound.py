"""What limits the draft heads' tau, whatever the tree: bounds from where the base's tokens sit in the heads'
top-k, measured with an export's own graphs on calibration prompts (``calibration.acceptance``).

At every position of the base's greedy answers: the rank of the base's token t + d + 2 in head d's top-k
(given the right path before it). Printed, all on the same positions:
- the static tree `spectrt calibrate tree` would build at N nodes from these positions (``Tree.from_accuracy``),
  replayed;
- the best static tree of N nodes in hindsight: the N - 1 rank paths accepted most often on these very
  positions (a path is accepted at least as often as any extension, so they form a tree);
- no tree at all: every position accepts its whole right path within the top-k (the bound of any tree,
  static or dynamic, at any budget, drawn from these heads' top-k).

Usage: python docs/results/heads_bound.py EXPORT_DIR [PROMPTS.jsonl] [LIMIT]
(default: the 48 bundled calibration prompts, 128 new tokens each; the export needs draft heads)
"""
import sys
from collections import Counter

import numpy as np

from spectrt.calibration.acceptance import measure_acceptance
from spectrt.calibration.prompts import CALIBRATION_PROMPTS, load_prompt_records
from spectrt.calibration.trees import _accepted
from spectrt.runtime.artifact import load_artifact
from spectrt.runtime.text import TextCodec
from spectrt.runtime.tree import Tree

exp = sys.argv[1]
pfile = sys.argv[2] if len(sys.argv) > 2 else str(CALIBRATION_PROMPTS)
limit = int(sys.argv[3]) if len(sys.argv) > 3 else None
codec = TextCodec(load_artifact(exp))
prompts = [codec.encode(text) for _, text in load_prompt_records(pfile)[:limit]]
acc = measure_acceptance(exp, prompts, threads=2)
ranks = np.concatenate([s.ranks for s in acc.sequences])  # [positions, heads]
n = len(ranks)
right = np.cumprod(ranks >= 0, axis=1).sum(axis=1)  # depth of the right path inside the top-k
paths = Counter(tuple(int(r) for r in row[:d]) for row, k in zip(ranks, right) for d in range(1, k + 1))
print(f"{acc.kind} heads ({acc.num_heads}, top-{acc.topk}), {n} positions of {len(prompts)} prompts of {pfile}")
print("head d top-1 / top-k given the path before it right: " + ", ".join(
    f"{a[0]:.3f} / {sum(a):.3f}" for a in acc.accuracy()))
for nodes in (2, 4, 8, 16, 32, 64):
    tree = Tree.from_accuracy(acc.accuracy(), nodes)
    fitted = 1 + np.mean([_accepted(r, frozenset(tree.paths)) for r in ranks])
    best = 1 + sum(c for _, c in paths.most_common(nodes - 1)) / n
    print(f"{nodes:3d} nodes: tau {fitted:.3f} with the static tree fitted here, {best:.3f} with the best static tree "
          "in hindsight")
print(f"any tree, any budget (every right path within the top-{acc.topk} accepted): tau {1 + right.mean():.3f}")
