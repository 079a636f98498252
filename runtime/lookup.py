"""Context drafting without training ("prompt lookup"): copy what followed the last occurrence of the
current suffix in the prompt and the text generated so far.

The drafter keeps every committed token (``observe``: prompt chunks, then each step's accepted path) and
an index n-gram -> end position of its most recent occurrence, updated per token (O(max_ngram) each), so a
step costs a few dict lookups, never a rescan of the context. To draft after ``root`` it matches the last
n tokens of ``history + [root]`` (n = max_ngram down to min_ngram) and proposes the ``max_tokens`` tokens
that followed the most recent earlier occurrence, as one chain (a match close to the end repeats its
period); no match: the root alone (a step then costs what an autoregressive step costs).
"""
from __future__ import annotations

import numpy as np

from spectrt.runtime.errors import SpectrtError
from spectrt.runtime.tree import ROOT_ONLY, Draft, Tree

DEFAULT_MAX_NGRAM = 3
DEFAULT_MIN_NGRAM = 1
DEFAULT_MAX_TOKENS = 4  # measured on SmolLM2 CPU: 4 beat 2 and 8 (a longer chain costs more verify than it gains)


class NgramIndex:
    """Token history + for each n in [min_n, max_n]: n-gram -> index just after its most recent occurrence."""

    def __init__(self, max_n: int = DEFAULT_MAX_NGRAM, min_n: int = DEFAULT_MIN_NGRAM):
        if not 1 <= min_n <= max_n:
            raise SpectrtError(f"n-gram sizes need 1 <= min ({min_n}) <= max ({max_n})")
        self.max_n, self.min_n = max_n, min_n
        self.reset()

    def reset(self) -> None:
        self.tokens: list[int] = []
        self.last: dict[tuple, int] = {}  # n-gram (any n) -> position after its most recent occurrence

    def extend(self, tokens) -> None:
        seq, last = self.tokens, self.last
        for t in tokens:
            seq.append(int(t))
            end = len(seq)
            for n in range(self.min_n, min(self.max_n, end) + 1):
                last[tuple(seq[end - n:end])] = end

    def truncate(self, length: int) -> None:
        """Keep the first ``length`` tokens of the history (the index is rebuilt: O(length))."""
        kept = self.tokens[:length]
        self.reset()
        self.extend(kept)

    def continuation(self, root: int, k: int) -> list[int]:
        """``k`` tokens that followed the most recent earlier occurrence of the longest matching
        suffix of ``history + [root]`` (n from max_n down to min_n); [] when nothing matches."""
        seq = self.tokens
        for n in range(min(self.max_n, len(seq) + 1), self.min_n - 1, -1):
            key = tuple(seq[len(seq) - n + 1:]) + (root,) if n > 1 else (root,)
            end = self.last.get(key)
            if end is not None:
                # what followed the match, then (if that runs into the root) the same period again:
                # full = history + [root] is predicted to continue as full[end + i % period]
                period = len(seq) + 1 - end
                return [seq[j] if j < len(seq) else root for j in (end + i % period for i in range(k))]
        return []


class LookupDrafter:
    """Drafts the continuation of the last n-gram's most recent match in the context as one chain."""

    def __init__(self, max_tokens: int = DEFAULT_MAX_TOKENS, max_ngram: int = DEFAULT_MAX_NGRAM,
                 min_ngram: int = DEFAULT_MIN_NGRAM):
        if max_tokens < 1:
            raise SpectrtError(f"lookup drafter: max_tokens must be at least 1, not {max_tokens}")
        self.max_tokens = max_tokens
        self.index = NgramIndex(max_ngram, min_ngram)

    @property
    def max_nodes(self) -> int:
        return 1 + self.max_tokens

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def reset(self) -> None:
        self.index.reset()

    def observe(self, hidden: np.ndarray, tokens: np.ndarray) -> None:
        self.index.extend(tokens.tolist() if isinstance(tokens, np.ndarray) else tokens)

    def rollback(self, n: int) -> None:
        self.index.truncate(len(self.index.tokens) - n)

    def draft(self, root: int, hidden: np.ndarray, budget: int) -> Draft:
        chain = self.index.continuation(int(root), min(self.max_tokens, budget - 1))  # [<= max_tokens]
        if not chain:
            return Draft(np.array([root], np.int64), ROOT_ONLY)
        return Draft(np.array([root] + chain, np.int64), Tree.chain(len(chain)))


__all__ = ["LookupDrafter", "NgramIndex", "DEFAULT_MAX_NGRAM", "DEFAULT_MIN_NGRAM", "DEFAULT_MAX_TOKENS"]
