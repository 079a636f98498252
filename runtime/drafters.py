"""Drafters fill a tree with candidate tokens. The decoder calls ``draft(root, hidden, tree)`` once per step.

Medusa: one heads call and one draft-LM-head call on the last accepted hidden state; node n of the tree
takes rank ``rank[n]`` of head ``depth[n] - 1``.
"""
from __future__ import annotations

import numpy as np

from spectrt.runtime.errors import ArtifactError
from spectrt.runtime.generate import RootOnly
from spectrt.runtime.manifest import Artifact
from spectrt.runtime.tree import Tree


class MedusaDrafter(RootOnly):
    """heads + draft_lm_head graphs, both bound once; use inside ``with``.

    ``graphs(name, max_batch)`` makes a runner for a graph (ONNX Runtime or TensorRT).
    """

    def __init__(self, artifact: Artifact, tree: Tree, graphs):
        draft = artifact.manifest["draft"]
        tree.check_drafter(draft["num_heads"], draft["topk"])
        self.heads = graphs("heads", 1)
        self.lm_head = graphs("draft_lm_head", 1)

    def __enter__(self):
        self.heads.__enter__()
        self.lm_head.__enter__()
        return self

    def __exit__(self, *exc):
        self.heads.__exit__(*exc)
        self.lm_head.__exit__(*exc)
        return False

    def draft(self, root: int, hidden: np.ndarray, tree: Tree) -> np.ndarray:
        tokens = np.empty(tree.size, np.int64)  # [q]
        tokens[0] = root
        if tree.size > 1:
            feats = self.heads(hidden_states=hidden[None])["head_features"]  # [1, K, H]
            top = self.lm_head(head_features=feats)["topk_ids"][0]  # [K, topk]
            tokens[1:] = top[tree.depth[1:] - 1, tree.rank[1:]]
        return tokens


def _hydra(artifact: Artifact, tree: Tree, graphs):
    from spectrt.runtime.hydra import HydraDrafter  # sequential heads, one batched call per tree depth

    return HydraDrafter(artifact, tree, graphs)


DRAFTERS = {"medusa": MedusaDrafter, "hydra": _hydra}


def drafter_for(artifact: Artifact, tree: Tree, graphs):
    kind = artifact.manifest["draft"].get("kind")
    if kind not in DRAFTERS:
        raise ArtifactError(f"{artifact.root}: unknown drafter '{kind}' (supported: {', '.join(DRAFTERS)})")
    return DRAFTERS[kind](artifact, tree, graphs)
