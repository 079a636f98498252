"""Hydra / Hydra++ drafting (torch-free): sequential, one batched head call per tree depth.

At depth d (1 .. max depth) the frontier is every node at depth d - 1 that has children in the tree. One
call of ``hydra_head.{d-1}`` + its LM head drafts all of them at once: each frontier node's input is the
context state and the input embeddings of its path root..node; its children take the top-k ranks the tree
asks for. The decoder then verifies, accepts and commits as for any drafter.

On a dynamic tree (EAGLE-2) the depth-d call expands the ``beam`` new nodes of highest joint probability
(product of the top-k probabilities along the path) among those that can still make the budget; each gets
its top-k children, and the ``budget - 1`` most likely drafted nodes are kept.

Input embeddings come from the base graph's own ``embed_tokens`` initializer through a read-only
``np.memmap`` of ``base.onnx.data``: no second copy of the vocabulary table, only touched rows are paged in.
Hydra++ (arch ``prefix-mlp``) keeps ``hydra_prefix.onnx``'s KV cache in step with the base: ``observe`` runs
the prefix layer over the base hidden states of every committed token (prompt chunks, accepted paths).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from spectrt.runtime.artifact import Artifact, EmbeddingRef
from spectrt.runtime.errors import ArtifactError, SpectrtError
from spectrt.runtime.protocols import Runners
from spectrt.runtime.tree import LOGPROBS, ROOT_ONLY, Draft, DynamicTree, StaticTreeDrafter, Tree, best_nodes, subtree

PREFIX_MAX_Q = 64  # prefix-layer tokens per call; longer observations are split


class EmbeddingTable:
    """Rows of the base's input embedding, read from ``base.onnx.data`` through a read-only memmap."""

    def __init__(self, root: Path, info: EmbeddingRef):
        path = Path(root) / info.file
        dtype = np.dtype(info.dtype).newbyteorder("<" if info.byte_order == "little" else ">")
        need = info.offset + int(np.prod(info.shape)) * dtype.itemsize
        if not path.is_file() or path.stat().st_size < need:
            raise ArtifactError(f"{path}: missing or shorter than the embedding table the manifest points to")
        self.table = np.memmap(path, dtype=dtype, mode="r", offset=info.offset, shape=info.shape)
        self.dtype = np.dtype(info.dtype)

    @classmethod
    def of(cls, artifact: Artifact) -> "EmbeddingTable":
        """The table the artifact's draft section points to."""
        info = artifact.draft.embedding if artifact.draft else None
        if info is None:
            raise ArtifactError(f"{artifact.root}: the manifest records no embedding table for the draft heads")
        return cls(artifact.root, info)

    def __call__(self, ids) -> np.ndarray:
        """``ids`` [...] -> rows [..., H] (a copy; only these rows' pages are read)."""
        return np.asarray(self.table[np.asarray(ids, np.int64)], dtype=self.dtype)


@dataclass(frozen=True)
class _Depth:
    front: np.ndarray  # [F] frontier nodes (depth d - 1, with children)
    ancestors: np.ndarray  # [F, d] path root..node of each frontier node
    kids: np.ndarray  # [C] nodes at depth d
    kid_row: np.ndarray  # [C] row of each kid's parent in ``front``
    kid_rank: np.ndarray  # [C] top-k rank of each kid


def draft_plan(tree: Tree) -> list[_Depth]:
    """Per depth: who is drafted in one batched call and where the results go."""
    plan = []
    for d in range(1, tree.max_depth + 1 if tree.size > 1 else 1):
        front = np.array([n for n in range(tree.size) if tree.depth[n] == d - 1 and tree.children[n]], np.int64)
        anc = np.empty((len(front), d), np.int64)
        for r, n in enumerate(front):
            node = int(n)
            for k in range(d - 1, -1, -1):
                anc[r, k] = node
                node = int(tree.parent[node])
        kids = np.flatnonzero(tree.depth == d)
        row = {int(n): r for r, n in enumerate(front)}
        plan.append(_Depth(front, anc, kids, np.array([row[int(tree.parent[k])] for k in kids], np.int64),
                           tree.rank[kids].astype(np.int64)))
    return plan


class HydraDrafter(StaticTreeDrafter):
    """hydra_head.{i} (+ draft_lm_head or hydra_lm_head.{i}) runners, + the prefix runner for Hydra++,
    all made by ``runners`` (ONNX Runtime or TensorRT). Use inside ``with``."""

    def __init__(self, artifact: Artifact, tree: Tree, runners: Runners):
        draft = artifact.draft
        if draft is None or draft.kind != "hydra" or draft.embedding is None:
            raise ArtifactError(f"{artifact.root}: not a Hydra export")
        tree.check_drafter(draft.num_heads, draft.topk)
        self.hidden = artifact.model.hidden
        self.embed = EmbeddingTable.of(artifact)
        self.tree, self.root, self.topk, self._plans = tree, artifact.root, draft.topk, {}
        fronts = self._fronts(tree, draft.num_heads)
        self.heads = [runners.graph(f"hydra_head.{i}", f) for i, f in enumerate(fronts)]
        if draft.shared_lm_head:
            shared = runners.graph("draft_lm_head", max(fronts, default=1))
            self.lm_heads, self._runners = [shared] * len(fronts), self.heads + [shared]
        else:
            self.lm_heads = [runners.graph(f"hydra_lm_head.{i}", f) for i, f in enumerate(fronts)]
            self._runners = self.heads + self.lm_heads
        self.prefix = runners.prefix(PREFIX_MAX_Q) if draft.is_hydra_plus else None
        if self.prefix is not None:
            self._runners.append(self.prefix)
        self.ctx = None

    def _fronts(self, tree: Tree, num_heads: int) -> list[int]:
        """The most frontier nodes per depth (one head per depth): the batch each head's runner takes."""
        return [max(1, len(p.front)) for p in self._plan(tree)]

    def _plan(self, tree: Tree) -> list[_Depth]:
        key = tree.paths
        if key not in self._plans:
            self._plans[key] = draft_plan(tree)
        return self._plans[key]

    def __enter__(self):
        for r in self._runners:
            r.__enter__()
        return self

    def __exit__(self, *exc):
        for r in reversed(self._runners):
            r.__exit__(*exc)
        return False

    def reset(self) -> None:
        """Forget the sequence (a new prompt): the prefix layer's cache restarts at position 0."""
        if self.prefix is not None:
            self.prefix.reset()
        self.ctx = None

    def rollback(self, n: int) -> None:
        """Forget the last ``n`` observed tokens (the next observe() recomputes the context state)."""
        if self.prefix is not None:
            self.prefix.rollback(n)
        self.ctx = None

    def fill(self, root: int, hidden: np.ndarray, tree: Tree) -> np.ndarray:
        tokens = np.empty(tree.size, np.int64)  # [q]
        tokens[0] = root
        if tree.size == 1:
            return tokens
        ctx = self._context(hidden)
        node_emb = np.empty((tree.size, self.hidden), self.embed.dtype)
        for d, step in enumerate(self._plan(tree)):
            node_emb[step.front] = self.embed(tokens[step.front])  # depth-d nodes: earlier ones already there
            top = self._top(d, ctx, node_emb[step.ancestors])["topk_ids"]  # [F, 1, topk]
            tokens[step.kids] = top[step.kid_row, 0, step.kid_rank]
        return tokens

    def _context(self, hidden: np.ndarray) -> np.ndarray:
        """The heads' context state [H]: the prefix layer's last state (Hydra++) or the base hidden state."""
        if self.prefix is None:
            return hidden.astype(self.embed.dtype, copy=False)
        if self.ctx is None:
            raise SpectrtError("hydra++ drafter: draft() before any observe() (no prefix-layer state)")
        return self.ctx.astype(self.embed.dtype, copy=False)

    def _top(self, d: int, ctx: np.ndarray, path_embeddings: np.ndarray) -> dict[str, np.ndarray]:
        """Head ``d`` + its LM head on F frontier paths (``path_embeddings`` [F, d + 1, H]): outputs [F, 1, topk]."""
        context = np.ascontiguousarray(np.broadcast_to(ctx, (len(path_embeddings), self.hidden)))
        feats = self.heads[d](context=context, path_embeddings=path_embeddings)["head_features"]
        return self.lm_heads[d](head_features=feats)

    def observe(self, hidden: np.ndarray, tokens: np.ndarray) -> None:
        """Hydra++: run the prefix layer over the committed tokens' base hidden states; keep the last state."""
        if self.prefix is None:
            return
        a, s = len(hidden), 0
        if a == 0:
            return
        while s < a:
            c = min(self.prefix.max_q, a - s)
            p = self.prefix.past
            out = self.prefix.forward(hidden[s:s + c], np.arange(p, p + c), np.tri(c, dtype=np.bool_))
            self.prefix.commit(range(c))
            s += c
        self.ctx = out[c - 1].copy()


class DynamicHydraDrafter(HydraDrafter):
    """Hydra on a dynamic tree (EAGLE-2): per depth one batched call expands the ``beam`` most likely new
    nodes that can still make the budget; the budget's most likely nodes are kept (runtime.tree.best_nodes)."""

    tree: DynamicTree  # type: ignore[assignment]

    def _fronts(self, tree: DynamicTree, num_heads: int) -> list[int]:  # type: ignore[override]
        depths = min(num_heads, tree.size - 1)  # a path of n - 1 nodes at most
        return [1] + [min(tree.beam, tree.size - 1)] * (depths - 1) if depths > 0 else []

    def __enter__(self):
        super().__enter__()
        try:
            self.tree.check_lm_heads(self.root, self.lm_heads)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        self.beam = min([self.tree.beam] + [r.max_batch for r in self.heads[1:] + self.lm_heads[1:]])
        return self

    def draft(self, root: int, hidden: np.ndarray, budget: int) -> Draft:
        n = min(budget, self.tree.size)
        if n < 2 or not self.heads:
            return Draft(np.array([root], np.int64), ROOT_ONLY)
        ctx = self._context(hidden)
        depths, beam, k = len(self.heads), self.beam, self.topk
        cap = 1 + k + (depths - 1) * beam * k
        tokens, parent = np.empty(cap, np.int64), np.full(cap, -1, np.int64)  # drafted nodes, parents first
        logp = np.zeros(cap, np.float64)  # log joint probability of each node's path
        emb = np.empty((cap, self.hidden), self.embed.dtype)  # input embeddings of expanded nodes
        tokens[0], emb[0] = root, self.embed(root)
        front, size = np.zeros(1, np.int64), 1  # [F] the nodes expanded at this depth
        for d in range(depths):
            anc = np.empty((len(front), d + 1), np.int64)  # [F, d + 1] path root..node of each frontier node
            anc[:, d] = front
            for j in range(d, 0, -1):
                anc[:, j - 1] = parent[anc[:, j]]
            out = self._top(d, ctx, emb[anc])
            # [F, k]; log-probs clipped to <= 0, so values never grow down a path, even after rounding
            ids, lp = out["topk_ids"][:, 0], np.minimum(out[LOGPROBS][:, 0], 0.0)
            new = np.arange(size, size + ids.size)  # the F * k children, row by row
            tokens[new], parent[new] = ids.ravel(), np.repeat(front, k)
            logp[new] = (logp[front][:, None] + lp).ravel()
            size += ids.size
            if d + 1 == depths:
                break
            kept = best_nodes(logp[:size], n)  # a node outside the budget's best has no child inside it
            cand = kept[kept >= new[0]]
            front = cand[np.lexsort((cand, -logp[cand]))][:beam]  # [F'] most likely first
            if not len(front):
                break
            emb[front] = self.embed(tokens[front])
        keep = best_nodes(logp[:size], n)
        return Draft(tokens[keep], subtree(parent[:size], keep))


__all__ = ["HydraDrafter", "DynamicHydraDrafter", "EmbeddingTable", "draft_plan", "PREFIX_MAX_Q"]
