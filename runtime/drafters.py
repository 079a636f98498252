"""Drafters fill a tree with candidate tokens. The decoder calls ``draft(root, hidden, tree)`` once per step.

Medusa: one heads call and one draft-LM-head call on the last accepted hidden state; node n of the tree
takes rank ``rank[n]`` of head ``depth[n] - 1``. Hydra (sequential heads) lives in ``runtime.hydra``.
"""
from __future__ import annotations

import numpy as np

from spectrt.runtime.artifact import Artifact
from spectrt.runtime.errors import ArtifactError
from spectrt.runtime.hydra import HydraDrafter
from spectrt.runtime.protocols import Runners
from spectrt.runtime.tree import Tree


class RootOnly:
    """The drafter of autoregressive decoding: proposes nothing beyond the root."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def draft(self, root: int, hidden: np.ndarray, tree: Tree) -> np.ndarray:
        return np.array([root], np.int64)

    def observe(self, hidden: np.ndarray, tokens: np.ndarray) -> None:
        pass

    def reset(self) -> None:
        pass


class MedusaDrafter(RootOnly):
    """heads + draft_lm_head graphs, both bound once; use inside ``with``."""

    def __init__(self, artifact: Artifact, tree: Tree, runners: Runners):
        draft = artifact.draft
        if draft is None or draft.kind != "medusa":
            raise ArtifactError(f"{artifact.root}: not a Medusa export")
        tree.check_drafter(draft.num_heads, draft.topk)
        self.heads = runners.graph("heads", 1)
        self.lm_head = runners.graph("draft_lm_head", 1)

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


DRAFTERS = {"medusa": MedusaDrafter, "hydra": HydraDrafter}


def drafter_for(artifact: Artifact, tree: Tree, runners: Runners):
    """The export's drafter (the manifest's ``draft.kind``) on the given runners."""
    if artifact.draft is None:
        raise ArtifactError(f"{artifact.root}: no draft heads in this export")
    return DRAFTERS[artifact.draft.kind](artifact, tree, runners)
