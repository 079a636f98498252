"""Candidate trees: the buffers a verify call needs (depth, mask, parent/children), built once per shape.

A static tree is a list of paths of top-k ranks: ``[[0], [0, 0], [1]]`` has a root (node 0, the token the
base already chose) and one node per path: ``[0, 0]`` is "rank 0 of head 1 below rank 0 of head 0"; its
nodes are in depth-first order, lower ranks first (paths sorted as tuples: a parent before its children),
so the all-rank-0 path holds slots 0, 1, 2, ...: its rows see no masked slot between visible ones and
accepting along it needs no causal recheck (``Decoder._recheck``; breadth-first order put every depth-1
sibling between [0] and [0, 0]). A per-step token tree (``Tree.from_parents``) is any parent array whose
parents come before their children; a child's "rank" is then its place among its siblings. Either way an
accepted root path has increasing node indices, and ``accept`` walks children by token equality.

A dynamic tree (``DynamicTree``, EAGLE-2 style) is grown anew each step from the draft heads' own top-k
log-probabilities under a node budget: a node's value is the joint probability of its path (the product
along it), and the tree keeps the nodes of highest value. Values never grow down a path, so the best nodes
(ties broken parent-first) always form a tree.
"""
from __future__ import annotations

import functools
import heapq
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from spectrt.runtime.contract import DRAFT_LM_HEAD
from spectrt.runtime.errors import ArtifactError, SpectrtError


@dataclass(frozen=True)
class Tree:
    paths: tuple  # node i (i >= 1) is paths[i - 1]; node 0 is the root
    parent: np.ndarray  # [q] int64, -1 for the root
    depth: np.ndarray  # [q] int64, 0 for the root
    rank: np.ndarray  # [q] int64, top-k rank at its depth (0 for the root)
    mask: np.ndarray  # [q, q] bool, node i sees its ancestors and itself
    children: tuple  # per node: {rank: child node}

    @property
    def size(self) -> int:
        return len(self.parent)

    @property
    def max_depth(self) -> int:
        return int(self.depth.max())

    @property
    def max_rank(self) -> int:
        return int(self.rank.max())

    @classmethod
    def from_paths(cls, paths) -> "Tree":
        ok = isinstance(paths, (list, tuple, set, frozenset)) and all(
            isinstance(p, (list, tuple)) and all(isinstance(r, (int, np.integer)) and not isinstance(r, bool) for r in p) for p in paths)
        if not ok:
            raise SpectrtError("a tree is a list of paths, each a list of top-k ranks, e.g. [[0], [0, 0], [1]]")
        paths = sorted({tuple(int(r) for r in p) for p in paths})  # depth-first, rank 0 first
        index = {(): 0}
        for n, p in enumerate(paths, start=1):
            if not p or min(p) < 0:
                raise SpectrtError(f"tree path {list(p)}: paths are non-empty lists of ranks >= 0")
            if p[:-1] not in index:
                raise SpectrtError(f"tree path {list(p)} has no parent path {list(p[:-1])} in the tree")
            index[p] = n
        q = len(paths) + 1
        parent = np.full(q, -1, np.int64)
        depth = np.zeros(q, np.int64)
        rank = np.zeros(q, np.int64)
        mask = np.eye(q, dtype=np.bool_)
        children = [dict() for _ in range(q)]
        for p, n in index.items():
            if n == 0:
                continue
            parent[n], depth[n], rank[n] = index[p[:-1]], len(p), p[-1]
            children[parent[n]][p[-1]] = n
            mask[n] = mask[parent[n]]
            mask[n, n] = True
        return cls(tuple(paths), parent, depth, rank, mask, tuple(children))

    @classmethod
    def from_parents(cls, parent) -> "Tree":
        """A token tree from ``parent[i]`` (-1 for node 0, else < i); cached per shape."""
        return _from_parents(tuple(int(p) for p in parent))

    def head(self, n: int) -> "Tree":
        """The first ``n`` nodes (parents come first, so any prefix is a tree): a tree that fits ``n`` rows."""
        if n >= self.size:
            return self
        return Tree.from_paths(self.paths[:max(n, 1) - 1])  # paths are sorted: the same nodes, ranks kept

    @classmethod
    def chain(cls, length: int) -> "Tree":
        """Rank-0 path of ``length`` nodes below the root (length 0: plain autoregressive decoding)."""
        return _from_parents(tuple(range(-1, length)))

    @classmethod
    def from_accuracy(cls, acc, size: int) -> "Tree":
        """The ``size``-node tree (root included) maximising expected accepted length, Medusa-style.

        ``acc[d][r]`` is the probability that rank r of head d is the base's token at depth d + 1. A path's
        value is the product along it; values shrink down a path, so the best ``size - 1`` paths form a tree.
        """
        heap, paths = [(-acc[0][r], (r,)) for r in range(len(acc[0]))], []
        heapq.heapify(heap)
        while heap and len(paths) < size - 1:
            neg, path = heapq.heappop(heap)
            paths.append(path)
            if len(path) < len(acc):
                for r in range(len(acc[len(path)])):
                    heapq.heappush(heap, (neg * acc[len(path)][r], path + (r,)))
        return _paths_tree(tuple(sorted(paths)))

    @classmethod
    def load(cls, path: str | Path) -> "Tree":
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SpectrtError(f"{path}: cannot read a tree JSON ({e.__class__.__name__}: {e})") from None
        if isinstance(data, dict):
            if "paths" not in data:
                raise SpectrtError(f"{path}: a tree JSON is a list of paths or an object with 'paths'")
            data = data["paths"]
        try:
            return cls.from_paths(data)
        except SpectrtError as e:
            raise SpectrtError(f"{path}: {e}") from None

    def check_drafter(self, num_heads: int, topk: int) -> None:
        if self.max_depth > num_heads:
            raise SpectrtError(f"tree depth {self.max_depth} exceeds the {num_heads} draft heads")
        if self.size > 1 and self.max_rank >= topk:
            raise SpectrtError(f"tree uses rank {self.max_rank} but the draft LM head returns top-{topk}")

    def accept(self, tokens: np.ndarray, chosen) -> list[int]:
        """Longest root path whose tokens equal the base's own choices (``chosen[node]``: the base's token
        after ``node``); returns its node indices."""
        path, node = [0], 0
        while True:
            want = chosen[node]
            nxt = next((c for c in self.children[node].values() if tokens[c] == want), None)
            if nxt is None:
                return path
            path.append(nxt)
            node = nxt

    def to_json(self) -> dict:
        return {"paths": [list(p) for p in self.paths]}


@functools.lru_cache(maxsize=4096)
def _from_parents(parent: tuple) -> Tree:
    q = len(parent)
    if q == 0 or parent[0] != -1 or any(not 0 <= p < i for i, p in enumerate(parent) if i):
        raise SpectrtError(f"a token tree's parents are -1 for node 0, then earlier nodes; got {list(parent)}")
    par = np.array(parent, np.int64)
    depth = np.zeros(q, np.int64)
    rank = np.zeros(q, np.int64)
    mask = np.eye(q, dtype=np.bool_)
    children = [dict() for _ in range(q)]
    paths: list = [()]
    for n in range(1, q):
        p = parent[n]
        depth[n], rank[n] = depth[p] + 1, len(children[p])
        children[p][int(rank[n])] = n
        mask[n] = mask[p]
        mask[n, n] = True
        paths.append(paths[p] + (int(rank[n]),))
    for a in (par, depth, rank, mask):
        a.flags.writeable = False  # shared by every step that drafts this shape
    return Tree(tuple(paths[1:]), par, depth, rank, mask, tuple(children))


@functools.lru_cache(maxsize=1024)
def _paths_tree(paths: tuple) -> Tree:
    """``Tree.from_paths`` of sorted paths, cached (per-step trees repeat their shapes)."""
    tree = Tree.from_paths(paths)
    for a in (tree.parent, tree.depth, tree.rank, tree.mask):
        a.flags.writeable = False
    return tree


def best_nodes(logp: np.ndarray, n: int) -> np.ndarray:
    """Node 0 and the ``n - 1`` other nodes of highest ``logp`` (ties: the earlier node), in node order.

    When parents come before their children and ``logp`` never grows down a path (a log joint probability),
    every kept node's parent is kept too: the nodes form a tree."""
    best = np.lexsort((np.arange(1, len(logp)), -logp[1:]))[:max(n, 1) - 1] + 1
    return np.concatenate([[0], np.sort(best)])


def subtree(parent: np.ndarray, keep: np.ndarray) -> Tree:
    """The token tree of the nodes ``keep`` (node order, node 0 first, closed under parents)."""
    where = np.full(len(parent), -1, np.int64)
    where[keep] = np.arange(len(keep))
    return Tree.from_parents([-1] + where[parent[keep[1:]]].tolist())


@dataclass(frozen=True)
class Draft:
    """What a drafter proposes for one step: ``tokens`` [q] (tokens[0] is the root) on ``tree`` (q nodes)."""
    tokens: np.ndarray
    tree: Tree


ROOT_ONLY = Tree.chain(0)  # one node: autoregressive decoding
TREE_DYNAMIC = "dynamic"  # the tree option's value for dynamic trees (else a static tree's JSON)
DEFAULT_BEAM = 8  # frontier nodes a sequential (Hydra) head expands per depth in a dynamic tree
LOGPROBS = DRAFT_LM_HEAD.outputs[2].name  # topk_logprobs: what dynamic trees rank candidates by


@dataclass(frozen=True)
class DynamicTree:
    """A tree grown each step from the heads' top-k log-probabilities: at most ``size`` nodes, root included.

    Medusa (heads independent per depth): the best paths by the product of this step's per-head
    probabilities (``Tree.from_accuracy``). Hydra (sequential heads): per depth, one batched head call
    expands the ``beam`` most likely new nodes; then the ``size - 1`` most likely drafted nodes are kept.
    """
    size: int
    beam: int = DEFAULT_BEAM

    def __post_init__(self):
        if self.size < 1 or self.beam < 1:
            raise SpectrtError(f"a dynamic tree needs at least 1 node and a beam of 1, not {self.size} / {self.beam}")

    def check_drafter(self, num_heads: int, topk: int) -> None:
        """Any budget fits any heads: a dynamic tree is never deeper than the heads nor wider than the top-k."""

    def check_lm_heads(self, root, lm_heads) -> None:
        """The draft LM head runners (entered) must return ``topk_logprobs``; exports made before it lack it."""
        if not all(r.has_output(LOGPROBS) for r in lm_heads):
            raise ArtifactError(f"{root}: the draft LM head has no {LOGPROBS} output (exported before dynamic "
                                "trees); re-export it, or use the static tree")


class StaticTreeDrafter:
    """Base of drafters that fill one fixed tree (Medusa, Hydra): ``fill(root, hidden, tree) -> tokens [q]``.
    Under a smaller node budget (near the context limit) they fill the tree's first ``budget`` nodes."""

    tree: Tree

    @property
    def max_nodes(self) -> int:
        return self.tree.size

    def draft(self, root: int, hidden: np.ndarray, budget: int) -> Draft:
        tree = self.tree if budget >= self.tree.size else _paths_tree(self.tree.paths[:max(budget, 1) - 1])
        return Draft(self.fill(root, hidden, tree), tree)

    def fill(self, root: int, hidden: np.ndarray, tree: Tree) -> np.ndarray:
        raise NotImplementedError

    def observe(self, hidden: np.ndarray, tokens: np.ndarray) -> None:
        pass

    def rollback(self, n: int) -> None:
        pass

    def reset(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
