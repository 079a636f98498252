"""Context drafting without training ("prompt lookup"): copy what followed the last occurrence of the
current suffix in the prompt and the text generated so far.

The drafter keeps every committed token (``observe``: prompt chunks, then each step's accepted path) and
an index n-gram -> end position of its most recent occurrence, updated per token (O(max_ngram) each), so a
step costs a few dict lookups, never a rescan of the context. To draft after ``root`` it matches the last
n tokens of ``history + [root]`` (n = max_ngram down to min_ngram) and proposes the tokens that followed the
most recent earlier occurrence, as one chain (a match close to the end repeats its period): as many as the
match's length earns (``DEFAULT_CHAIN``: a longer match is likelier to go on as before); with ``branches`` > 1
also earlier occurrences' continuations (other next tokens) as sibling chains; no match: the root alone (a
step then costs what an autoregressive step costs).
"""
from __future__ import annotations

import numpy as np

from spectrt.runtime.errors import SpectrtError
from spectrt.runtime.tree import ROOT_ONLY, Draft, Tree

DEFAULT_MAX_NGRAM = 3
DEFAULT_MIN_NGRAM = 1
# chain tokens after a match of 1, 2, 3 tokens (the last entry for longer matches). Measured on SmolLM2 fp32,
# 2 CPU threads, lookup+corpus, outputs = AR, side by side: 2/4/6 gave 1.55x AR where 4 tokens after any
# match gave 1.51x (the 39 bundled Spec-Bench questions), 1.63x vs 1.62x and 1.66x vs 1.63x (two sets of 20
# other Spec-Bench dev questions); a fixed 3, 5 or 6 did no better than 4 (each extra row costs verify time
# on a CPU, so only tokens likely to be accepted earn one, and a longer match is likelier to go on)
DEFAULT_CHAIN = (2, 4, 6)
DEFAULT_MAX_TOKENS = max(DEFAULT_CHAIN)  # the longest chain: the rows a lookup may take from a verify call
# node budget >= b: (chain tokens, branches) of a lookup sharing that budget with the heads' dynamic tree;
# the best measured per budget by docs/results/tree_budget_sweep.py (SmolLM2, Hydra++ and Medusa alike)
BUDGET_SIZES = ((64, 16, 3), (32, 8, 3), (16, 8, 1))


class NgramIndex:
    """Token history + for each n in [min_n, max_n]: n-gram -> index just after its most recent occurrence."""

    def __init__(self, max_n: int = DEFAULT_MAX_NGRAM, min_n: int = DEFAULT_MIN_NGRAM):
        if not 1 <= min_n <= max_n:
            raise SpectrtError(f"n-gram sizes need 1 <= min ({min_n}) <= max ({max_n})")
        self.max_n, self.min_n = max_n, min_n
        self.reset()

    def reset(self) -> None:
        self.tokens: list[int] = []
        self.ends: dict[tuple, list[int]] = {}  # n-gram (any n) -> positions after its occurrences, oldest first

    def extend(self, tokens) -> None:
        seq, ends = self.tokens, self.ends
        for t in tokens:
            seq.append(int(t))
            end = len(seq)
            for n in range(self.min_n, min(self.max_n, end) + 1):
                ends.setdefault(tuple(seq[end - n:end]), []).append(end)

    def truncate(self, length: int) -> None:
        """Keep the first ``length`` tokens of the history (the index is rebuilt: O(length))."""
        kept = self.tokens[:length]
        self.reset()
        self.extend(kept)

    def continuation(self, root: int, k: int | tuple[int, ...]) -> list[int]:
        """The tokens that followed the most recent earlier occurrence of the longest matching suffix of
        ``history + [root]`` (n from max_n down to min_n), ``k`` of them (``continuations``); [] when nothing
        matches."""
        found = self.continuations(root, k, 1)
        return found[0] if found else []

    def match_length(self, root: int) -> int:
        """n of the longest n-gram ending in ``root`` that occurred before (0: none)."""
        seq = self.tokens
        for n in range(min(self.max_n, len(seq) + 1), self.min_n - 1, -1):
            if (tuple(seq[len(seq) - n + 1:]) + (root,) if n > 1 else (root,)) in self.ends:
                return n
        return 0

    def continuations(self, root: int, k: int | tuple[int, ...], branches: int, limit: int | None = None) -> list[list[int]]:
        """Up to ``branches`` continuations of ``history + [root]`` with distinct first tokens: longest matching
        suffix first, most recent occurrence first. Each ``k`` tokens long -- or, ``k`` a tuple, ``k[n - 1]``
        for a longest match of n tokens (the last entry for longer ones) -- and at most ``limit``."""
        seq, out, firsts, size = self.tokens, [], set(), None
        for n in range(min(self.max_n, len(seq) + 1), self.min_n - 1, -1):
            key = tuple(seq[len(seq) - n + 1:]) + (root,) if n > 1 else (root,)
            ends = self.ends.get(key, ())
            if ends and size is None:  # n is the longest match: it sizes every chain
                size = k[min(n, len(k)) - 1] if isinstance(k, tuple) else int(k)
                size = size if limit is None else min(size, limit)
            for end in reversed(ends):
                # what followed the match, then (if that runs into the root) the same period again:
                # full = history + [root] is predicted to continue as full[end + i % period]
                period = len(seq) + 1 - end
                cont = [seq[j] if j < len(seq) else root for j in (end + i % period for i in range(size))]
                if cont and cont[0] not in firsts:
                    firsts.add(cont[0])
                    out.append(cont)
                    if len(out) == branches:
                        return out
        return out


class LookupDrafter:
    """Drafts continuations of the last n-gram's matches in the context: the most recent match's as one chain,
    and with ``branches`` > 1 other matches' (distinct next tokens) as sibling chains in whatever budget is
    left. ``max_tokens``: each chain's length, one number, or one per match length (``DEFAULT_CHAIN``)."""

    def __init__(self, max_tokens: int | tuple[int, ...] = DEFAULT_CHAIN, max_ngram: int = DEFAULT_MAX_NGRAM,
                 min_ngram: int = DEFAULT_MIN_NGRAM, branches: int = 1):
        chain = tuple(int(k) for k in np.atleast_1d(max_tokens))  # one length, or one per match length
        if not chain or min(chain) < 1 or branches < 1:
            raise SpectrtError(f"lookup drafter: chain lengths and branches must be at least 1, not {max_tokens}, {branches}")
        self.chain, self.branches = chain, branches
        self.max_tokens = max(chain)
        self.index = NgramIndex(max_ngram, min_ngram)

    @classmethod
    def for_budget(cls, budget: int) -> "LookupDrafter":
        """The lookup sized for a tree of ``budget`` nodes (``BUDGET_SIZES``; below them the default chain)."""
        for least, tokens, branches in BUDGET_SIZES:
            if budget >= least:
                return cls(tokens, branches=branches)
        return cls()

    @property
    def max_nodes(self) -> int:
        return 1 + self.max_tokens * self.branches

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def reset(self) -> None:
        self.index.reset()

    def priority(self, root: int) -> float:
        """Where this step's chain goes in a merged tree (``MergedDrafter``: higher first): a match of 2+
        tokens before the corpus chain, a match of the root alone after it (measured on the calibration
        prompts' greedy answers, SmolLM2: when the two chains disagree, a 1-token match's next token was right
        less often than the corpus's, a longer match's far more often)."""
        return 2.0 if self.index.match_length(int(root)) >= 2 else 0.5

    def observe(self, hidden: np.ndarray, tokens: np.ndarray) -> None:
        self.index.extend(tokens.tolist() if isinstance(tokens, np.ndarray) else tokens)

    def rollback(self, n: int) -> None:
        self.index.truncate(len(self.index.tokens) - n)

    def draft(self, root: int, hidden: np.ndarray, budget: int) -> Draft:
        chains = self.index.continuations(int(root), self.chain, self.branches, limit=budget - 1)
        if not chains:
            return Draft(np.array([root], np.int64), ROOT_ONLY)
        tokens, parent = [int(root)], [-1]
        for chain in chains:  # sibling chains under the root, while the budget lasts
            chain = chain[:budget - len(tokens)]
            for i, t in enumerate(chain):
                parent.append(0 if i == 0 else len(tokens) - 1)
                tokens.append(t)
            if len(tokens) >= budget:
                break
        return Draft(np.array(tokens, np.int64), Tree.from_parents(parent))


__all__ = ["LookupDrafter", "NgramIndex", "BUDGET_SIZES", "DEFAULT_MAX_NGRAM", "DEFAULT_MIN_NGRAM", "DEFAULT_CHAIN",
           "DEFAULT_MAX_TOKENS"]
