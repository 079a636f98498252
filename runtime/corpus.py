"""Drafting from what the base model wrote before: an n-gram table of its own answers (retrieval drafting,
as REST does with a datastore), shipped with an export next to the context lookup (``runtime.lookup``).

Context lookup copies from the prompt and the text so far; many steps have nothing there to copy, yet the
model's phrasing repeats across answers ("Here are some ...", list markers, the tail of a GSM8K
solution). The table holds, for every n-gram (n = 1 .. ``orders``) that occurred at least ``min_total``
times in the model's greedy answers to calibration prompts, the token that most often followed it and how
often. Drafting after ``root`` extends ``history + [root]`` one token at a time from the longest n-gram
suffix the table knows, while the running product of those frequencies stays at least ``min_prob``: one
chain, no model call. Any draft verifies exactly, so a stale or foreign table costs rows, never
correctness.

File format (``.npz``, no pickles): ``vocab``, ``orders`` and ``tokens`` (counted) scalars, ``source`` (how
it was made), and per order n: ``keys{n}`` (uint64,
sorted: the n tokens as base-``vocab`` digits, exact while vocab^n < 2^64), ``next{n}`` (int32), ``count{n}``
and ``total{n}`` (uint32: how often ``next`` followed, and the n-gram occurred with a successor).
"""
from __future__ import annotations

import io
import math
import os
from pathlib import Path

import numpy as np

from spectrt.runtime.artifact import atomic_write
from spectrt.runtime.errors import ArtifactError, SpectrtError
from spectrt.runtime.tree import ROOT_ONLY, Draft, Tree

DEFAULT_ORDERS = 4  # longest context n-gram (fewer when the vocabulary is too large to pack 4 tokens in 64 bits)
DEFAULT_MIN_TOTAL = 2  # an n-gram seen once predicts little
DEFAULT_MAX_TOKENS = 3
DEFAULT_MIN_PROB = 0.2  # stop a chain when the product of its tokens' frequencies drops below this
CORPUS_FILE = "corpus.npz"  # its name inside an export


def max_orders(vocab: int) -> int:
    """The longest n-gram whose tokens pack exactly into a uint64 key (vocab^n <= 2^64)."""
    if vocab < 2:
        raise SpectrtError(f"vocabulary of {vocab} tokens")
    return max(1, int(64 // math.log2(vocab)))


class NgramTable:
    """Most frequent successor of each known n-gram, looked up by binary search (see the module doc)."""

    def __init__(self, vocab: int, keys: list[np.ndarray], nxt: list[np.ndarray], count: list[np.ndarray],
                 total: list[np.ndarray], tokens: int = 0, source: str = ""):
        if not 1 <= len(keys) <= max_orders(vocab):
            raise SpectrtError(f"{len(keys)} n-gram orders for a vocabulary of {vocab} (1..{max_orders(vocab)})")
        self.vocab, self.keys, self.next, self.count, self.total = vocab, keys, nxt, count, total
        self.tokens, self.source = tokens, source  # tokens counted; how the table was made

    @property
    def orders(self) -> int:
        return len(self.keys)

    @property
    def entries(self) -> int:
        return sum(len(k) for k in self.keys)

    @classmethod
    def from_sequences(cls, sequences, vocab: int, orders: int = DEFAULT_ORDERS,
                       min_total: int = DEFAULT_MIN_TOTAL, source: str = "") -> "NgramTable":
        """Count every n-gram -> next token in ``sequences`` (lists of token ids); keep n-grams seen at least
        ``min_total`` times. ``orders`` is capped by what the vocabulary packs (``max_orders``)."""
        orders = min(orders, max_orders(vocab))
        if orders < 1 or min_total < 1:
            raise SpectrtError(f"n-gram table: orders and min_total must be >= 1, not {orders}, {min_total}")
        seqs = [np.asarray(s, np.int64) for s in sequences if len(s) > 1]
        if any(((s < 0) | (s >= vocab)).any() for s in seqs):
            raise SpectrtError(f"n-gram table: token ids outside the vocabulary (0..{vocab - 1})")
        V = np.uint64(vocab)
        tables: list[list[np.ndarray]] = [[], [], [], []]
        for n in range(1, orders + 1):
            ks, ns = [], []
            for s in seqs:
                if len(s) <= n:
                    continue
                key = np.zeros(len(s) - n, np.uint64)
                for j in range(n):  # key of s[i : i + n], followed by s[i + n]
                    key = key * V + s[j:len(s) - n + j].astype(np.uint64)
                ks.append(key)
                ns.append(s[n:])
            if not ks:  # every sequence shorter than n + 1
                for out, dt in zip(tables, (np.uint64, np.int32, np.uint32, np.uint32)):
                    out.append(np.zeros(0, dt))
                continue
            key, nxt = np.concatenate(ks), np.concatenate(ns)
            order = np.lexsort((nxt, key))  # by key, then successor
            key, nxt = key[order], nxt[order]
            pair_start = np.flatnonzero(np.r_[True, (key[1:] != key[:-1]) | (nxt[1:] != nxt[:-1])])
            pair_key, pair_next = key[pair_start], nxt[pair_start]
            pair_count = np.diff(np.r_[pair_start, len(key)])
            key_start = np.flatnonzero(np.r_[True, pair_key[1:] != pair_key[:-1]])
            total = np.add.reduceat(pair_count, key_start)
            # the most frequent successor per key (ties: the smallest token id, which sorts first)
            group = np.repeat(np.arange(len(key_start)), np.diff(np.r_[key_start, len(pair_key)]))
            best = np.lexsort((-pair_count, group))[key_start]
            keep = total >= min_total
            for out, arr, dt in zip(tables, (pair_key[best], pair_next[best], pair_count[best], total),
                                    (np.uint64, np.int32, np.uint32, np.uint32)):
                out.append(arr[keep].astype(dt))
        return cls(vocab, tables[0], tables[1], tables[2], tables[3], tokens=sum(len(s) for s in seqs), source=source)

    def save(self, path: str | os.PathLike) -> None:
        arrays = {"vocab": np.int64(self.vocab), "orders": np.int64(self.orders), "tokens": np.int64(self.tokens),
                  "source": np.str_(self.source)}
        for n in range(1, self.orders + 1):
            arrays.update({f"keys{n}": self.keys[n - 1], f"next{n}": self.next[n - 1],
                           f"count{n}": self.count[n - 1], f"total{n}": self.total[n - 1]})
        buf = io.BytesIO()
        np.savez_compressed(buf, **arrays)
        atomic_write(path, buf.getbuffer())

    @classmethod
    def load(cls, path: str | os.PathLike, vocab: int | None = None) -> "NgramTable":
        """Read a table; ``vocab``: the model's, which the table must have been counted for."""
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as z:
                v, orders, tokens, source = int(z["vocab"]), int(z["orders"]), int(z["tokens"]), str(z["source"])
                arrays = [[z[f"{name}{n}"] for n in range(1, orders + 1)] for name in ("keys", "next", "count", "total")]
        except (OSError, KeyError, ValueError) as e:
            raise ArtifactError(f"{path}: not an n-gram table ({e})") from None
        if vocab is not None and v != vocab:
            raise ArtifactError(f"{path}: n-gram table for a vocabulary of {v} tokens; the model has {vocab}")
        for n, (k, x, c, t) in enumerate(zip(*arrays), start=1):
            if not (k.dtype == np.uint64 and x.dtype == np.int32 and c.dtype == t.dtype == np.uint32
                    and len(k) == len(x) == len(c) == len(t) and (len(k) < 2 or (k[1:] > k[:-1]).all())):
                raise ArtifactError(f"{path}: order {n} is damaged (types, lengths or key order)")
            if len(x) and not (0 <= x.min() and x.max() < v):
                raise ArtifactError(f"{path}: order {n} has token ids outside the vocabulary")
        try:
            return cls(v, arrays[0], arrays[1], arrays[2], arrays[3], tokens=tokens, source=source)
        except SpectrtError as e:
            raise ArtifactError(f"{path}: {e}") from None

    def successor(self, context) -> tuple[int, float] | None:
        """(token, frequency) after the longest suffix of ``context`` the table knows; None when none is."""
        V = self.vocab
        for n in range(min(self.orders, len(context)), 0, -1):
            key = 0
            for t in context[-n:]:
                key = key * V + int(t)
            keys = self.keys[n - 1]
            i = int(np.searchsorted(keys, np.uint64(key)))
            if i < len(keys) and int(keys[i]) == key:
                return int(self.next[n - 1][i]), int(self.count[n - 1][i]) / int(self.total[n - 1][i])
        return None


class CorpusDrafter:
    """Drafts one chain from an ``NgramTable`` (module doc): at most ``max_tokens`` tokens, while the product
    of their frequencies stays >= ``min_prob``. Keeps the committed tokens (``observe``/``rollback``)."""

    def __init__(self, table: NgramTable, max_tokens: int = DEFAULT_MAX_TOKENS, min_prob: float = DEFAULT_MIN_PROB):
        if max_tokens < 1 or not 0.0 <= min_prob <= 1.0:
            raise SpectrtError(f"corpus drafter: max_tokens >= 1 and min_prob in [0, 1], not {max_tokens}, {min_prob}")
        self.table, self.max_tokens, self.min_prob = table, max_tokens, min_prob
        self.history: list[int] = []

    @property
    def max_nodes(self) -> int:
        return 1 + self.max_tokens

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def reset(self) -> None:
        self.history = []

    def observe(self, hidden: np.ndarray, tokens) -> None:
        self.history.extend(int(t) for t in tokens)

    def rollback(self, n: int) -> None:
        if not 0 <= n <= len(self.history):
            raise SpectrtError(f"rollback of {n} tokens with {len(self.history)} observed")
        del self.history[len(self.history) - n:]

    def priority(self, root: int) -> float:
        """Merged-tree order (``LookupDrafter.priority``): after a context match of 2+ tokens, before a
        match of the root alone."""
        return 1.0

    def chain(self, root: int, k: int) -> list[int]:
        """Up to ``k`` tokens after ``history + [root]`` (see the class doc)."""
        context, prob = self.history[max(0, len(self.history) - self.table.orders + 1):] + [int(root)], 1.0
        out: list[int] = []
        while len(out) < k:
            found = self.table.successor(context)
            if found is None or prob * found[1] < self.min_prob:
                break
            prob *= found[1]
            out.append(found[0])
            context.append(found[0])
        return out

    def draft(self, root: int, hidden: np.ndarray, budget: int) -> Draft:
        chain = self.chain(root, min(self.max_tokens, budget - 1))
        if not chain:
            return Draft(np.array([root], np.int64), ROOT_ONLY)
        return Draft(np.array([root] + chain, np.int64), Tree.chain(len(chain)))


__all__ = ["NgramTable", "CorpusDrafter", "max_orders", "CORPUS_FILE", "DEFAULT_ORDERS", "DEFAULT_MIN_TOTAL",
           "DEFAULT_MAX_TOKENS", "DEFAULT_MIN_PROB"]
