"""Drafters propose a token tree once per step: ``draft(root, hidden, budget) -> Draft(tokens, tree)``.

Medusa: one heads call and one draft-LM-head call on the last accepted hidden state; node n of its static
tree takes rank ``rank[n]`` of head ``depth[n] - 1``; a dynamic tree is chosen each step from those calls'
probabilities. Hydra (sequential heads) lives in ``runtime.hydra``, context drafting ("prompt lookup", no
weights) in ``runtime.lookup``, corpus drafting (an n-gram table of the model's own answers) in
``runtime.corpus``. ``MergedDrafter`` composes drafters: their trees merged into one token tree under one
node budget.
"""
from __future__ import annotations

import itertools
from contextlib import ExitStack

import numpy as np

from spectrt.runtime.artifact import Artifact, DraftInfo
from spectrt.runtime.corpus import CorpusDrafter, NgramTable
from spectrt.runtime.errors import ArtifactError, SpectrtError
from spectrt.runtime.hydra import DynamicHydraDrafter, HydraDrafter
from spectrt.runtime.lookup import LookupDrafter
from spectrt.runtime.protocols import ChainDrafter, Runners
from spectrt.runtime.tree import LOGPROBS, ROOT_ONLY, TREE_DYNAMIC, Draft, DynamicTree, StaticTreeDrafter, Tree


class RootOnly(StaticTreeDrafter):
    """The drafter of autoregressive decoding: proposes nothing beyond the root."""

    tree = ROOT_ONLY

    def fill(self, root: int, hidden: np.ndarray, tree: Tree) -> np.ndarray:
        return np.array([root], np.int64)


class MedusaDrafter(StaticTreeDrafter):
    """heads + draft_lm_head graphs, both bound once; use inside ``with``."""

    def __init__(self, artifact: Artifact, tree: Tree, runners: Runners):
        draft = artifact.draft
        if draft is None or draft.kind != "medusa":
            raise ArtifactError(f"{artifact.root}: not a Medusa export")
        tree.check_drafter(draft.num_heads, draft.topk)
        self.tree, self.root = tree, artifact.root
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

    def fill(self, root: int, hidden: np.ndarray, tree: Tree) -> np.ndarray:
        if tree.size == 1:
            return np.array([root], np.int64)
        return tokens_of(root, self._top(hidden)["topk_ids"][0], tree)  # [q]

    def _top(self, hidden: np.ndarray) -> dict[str, np.ndarray]:
        """The draft LM head's outputs for the heads on ``hidden`` [H]: each [1, K, topk]."""
        return self.lm_head(head_features=self.heads(hidden_states=hidden[None])["head_features"])


def tokens_of(root: int, top: np.ndarray, tree: Tree) -> np.ndarray:
    """Tokens [q] of a rank tree: node n takes rank ``rank[n]`` of head ``depth[n] - 1`` in ``top`` [K, topk]."""
    tokens = np.empty(tree.size, np.int64)  # [q]
    tokens[0] = root
    tokens[1:] = top[tree.depth[1:] - 1, tree.rank[1:]]
    return tokens


class DynamicMedusaDrafter(MedusaDrafter):
    """Medusa on a dynamic tree: each step the ``budget`` nodes of highest joint probability, a path's being
    the product of its ranks' probabilities under their heads (heads are independent per depth)."""

    tree: DynamicTree  # type: ignore[assignment]

    def __enter__(self):
        super().__enter__()
        try:
            self.tree.check_lm_heads(self.root, [self.lm_head])
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def draft(self, root: int, hidden: np.ndarray, budget: int) -> Draft:
        n = min(budget, self.tree.size)
        if n < 2:
            return Draft(np.array([root], np.int64), ROOT_ONLY)
        top = self._top(hidden)
        tree = Tree.from_accuracy(np.exp(top[LOGPROBS][0]).tolist(), n)  # [K][topk] probabilities
        return Draft(tokens_of(root, top["topk_ids"][0], tree), tree)


class MergedDrafter:
    """Several drafters' trees merged into one token tree of at most ``max_nodes`` nodes (root included).

    Drafters are asked in order (chain drafters first, by this step's ``priority``), each with the budget
    still free; a node whose token equals a sibling's (from an earlier drafter) is the same node, so e.g. a
    lookup chain and the heads' rank-0 path share nodes; nodes past the budget, and their subtrees, are
    dropped. Any tree verifies exactly, so the
    output is the base model's whatever the drafters propose.
    """

    def __init__(self, drafters, max_nodes: int | None = None):
        self.drafters = list(drafters)
        # chain drafters rank their own step (``priority``); the rest (the heads' tree) follow them, in order
        self._chains = [d for d in self.drafters if isinstance(d, ChainDrafter)]
        self._rest = [d for d in self.drafters if not isinstance(d, ChainDrafter)]
        self.max_nodes = max_nodes or 1 + sum(d.max_nodes - 1 for d in self.drafters)
        self._stack = ExitStack()

    def __enter__(self):
        for d in self.drafters:
            self._stack.enter_context(d)
        return self

    def __exit__(self, *exc):
        self._stack.close()
        return False

    def reset(self) -> None:
        for d in self.drafters:
            d.reset()

    def observe(self, hidden: np.ndarray, tokens: np.ndarray) -> None:
        for d in self.drafters:
            d.observe(hidden, tokens)

    def rollback(self, n: int) -> None:
        for d in self.drafters:
            d.rollback(n)

    def draft(self, root: int, hidden: np.ndarray, budget: int) -> Draft:
        budget = min(budget, self.max_nodes)
        tokens, parent, kids = [int(root)], [-1], [{}]  # merged tree; kids[node]: {token: child node}
        # chains first, higher priority first: the first slots are the likeliest path's, and an accepted path
        # on consecutive slots needs no causal recheck (Decoder._recheck)
        for d in sorted(self._chains, key=lambda d: -d.priority(root)) + self._rest:
            if len(tokens) >= budget:
                break
            part = d.draft(root, hidden, budget - len(tokens) + 1)
            where = [0] * part.tree.size  # part's node -> merged node (-1: dropped)
            for n in range(1, part.tree.size):
                p = where[part.tree.parent[n]]
                t = int(part.tokens[n])
                m = kids[p].get(t, -1) if p >= 0 else -1
                if m < 0 and p >= 0 and len(tokens) < budget:
                    m = len(tokens)
                    tokens.append(t)
                    parent.append(p)
                    kids.append({})
                    kids[p][t] = m
                where[n] = m
        return Draft(np.array(tokens, np.int64), Tree.from_parents(parent))


DRAFTERS = {"medusa": MedusaDrafter, "hydra": HydraDrafter}
DYNAMIC_DRAFTERS = {"medusa": DynamicMedusaDrafter, "hydra": DynamicHydraDrafter}
# draft sources (`--draft`): "+"-joined parts, named in this order; merged, the chains (lookup, corpus) go
# first in this step's priority order, then the heads' tree (MergedDrafter: equal nodes are shared)
DRAFT_PARTS = ("heads", "lookup", "corpus")
DRAFT_SOURCES = tuple("+".join(c) for r in range(1, len(DRAFT_PARTS) + 1) for c in itertools.combinations(DRAFT_PARTS, r))


def default_draft(artifact: Artifact, cheap_rows: bool = True) -> str:
    """Every draft source the export has -- its heads (if any), the context lookup, its corpus table (if
    any) -- except the heads beside a corpus table where verify rows are not cheap (``cheap_rows`` False:
    ONNX Runtime on a CPU). Measured on SmolLM2 fp32, 2 CPU threads, 16 of the bundled calibration prompts:
    heads+lookup 1.55x AR, heads+lookup+corpus 1.56x (tau 2.15, more rows and rechecks), lookup+corpus
    1.60x (tau 2.04) -- the heads' nodes and draft calls cost about what they add. On GPUs a tree of tens
    of nodes verifies for about the price of one, so every source drafts (at 64 nodes the corpus chain
    leaves tau as it is or adds a little: Hydra++ 2.60 either way, Medusa 2.35 -> 2.38)."""
    heads = artifact.draft is not None and (cheap_rows or artifact.corpus is None)
    return "+".join(p for p, has in zip(DRAFT_PARTS, (heads, True, artifact.corpus is not None)) if has)


def draft_parts(artifact: Artifact, draft: str) -> frozenset[str]:
    """The parts of ``draft`` (one of DRAFT_SOURCES), checked against what the export has."""
    if draft not in DRAFT_SOURCES:
        raise SpectrtError(f"unknown draft source '{draft}' (choose from {', '.join(DRAFT_SOURCES)})")
    parts = frozenset(draft.split("+"))
    if "heads" in parts and artifact.draft is None:
        raise SpectrtError(f"{artifact.root}: no draft heads in this export; use --draft lookup, --mode ar or "
                           "export --heads")
    if "corpus" in parts and artifact.corpus is None:
        raise SpectrtError(f"{artifact.root}: no corpus table in this export (export --corpus FILE, made by "
                           "`spectrt calibrate corpus`)")
    return parts


def heads_tree(draft: DraftInfo, tree: str | None = None, nodes: int | None = None) -> Tree | DynamicTree:
    """The heads' tree: the export's static tree (``tree`` None), a tree JSON, or ``tree="dynamic"``: a tree
    grown each step under ``nodes`` nodes (root included; default: the export's node budget)."""
    if tree == TREE_DYNAMIC:
        return DynamicTree(nodes or draft.node_budget)
    if nodes is not None:
        raise SpectrtError(f"a node budget ({nodes}) is for dynamic trees (tree '{TREE_DYNAMIC}'); a static tree's "
                           "size is its own")
    return Tree.load(tree) if tree else Tree.from_paths(draft.tree)


def heads_drafter(artifact: Artifact, tree: Tree | DynamicTree, runners: Runners):
    """The export's draft-head drafter (the manifest's ``draft.kind``) on the given runners and tree."""
    if artifact.draft is None:
        raise ArtifactError(f"{artifact.root}: no draft heads in this export")
    kinds = DYNAMIC_DRAFTERS if isinstance(tree, DynamicTree) else DRAFTERS
    return kinds[artifact.draft.kind](artifact, tree, runners)


def drafter_for(artifact: Artifact, tree: Tree | DynamicTree | None, runners: Runners, draft: str = "heads"):
    """``draft``: one of DRAFT_SOURCES -- "heads" (the export's heads on ``tree``), "lookup" (context drafting,
    no weights), "corpus" (the export's n-gram table) or several merged (lookup, corpus, heads). With a
    static tree the chains come on top of the tree's nodes; a dynamic tree's node budget is shared: the
    lookup sized to it (``LookupDrafter.for_budget``: longer chains and other matches' branches for big
    budgets), the heads' tree grown in what is left."""
    parts = draft_parts(artifact, draft)
    budget = tree.size if isinstance(tree, DynamicTree) else None
    drafters: list = []
    if "lookup" in parts:
        drafters.append(LookupDrafter() if budget is None else LookupDrafter.for_budget(budget))
    if "corpus" in parts:
        drafters.append(corpus_drafter(artifact))
    if "heads" in parts:
        drafters.append(heads_drafter(artifact, tree, runners))
    return drafters[0] if len(drafters) == 1 else MergedDrafter(drafters, budget)


def corpus_drafter(artifact: Artifact) -> CorpusDrafter:
    """A chain drafter on the export's n-gram table (``runtime.corpus``)."""
    if artifact.corpus is None:
        raise ArtifactError(f"{artifact.root}: no corpus table in this export")
    return CorpusDrafter(NgramTable.load(artifact.path(artifact.corpus.file.path), artifact.model.vocab))
