"""Sampling that speculative decoding reproduces exactly.

The random number for the token at sequence position ``p`` is a pure function of ``(seed, p)``
(``uniform``: splitmix64, the same on every machine), and a token is drawn from the processed
distribution by inverse CDF over token ids in order. Autoregressive sampling draws position ``p`` with
``uniform(seed, p)``; speculative decoding draws *every* tree node at position ``p`` with the same number,
so a node's drawn token is exactly the token AR would draw after the same prefix. Acceptance walks from the
root into the child whose token equals the drawn one; the first node without such a child contributes its
drawn token as the bonus. The output is token for token the AR output for the same seed (up to the
floating-point differences between a tree pass and a sequential one, as for greedy decoding), and so has
exactly the processed distribution.

``SamplingConfig()`` (temperature 0) is greedy: the base graph's own ``greedy_ids`` are used.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from spectrt.runtime.errors import SpectrtError

MASK64 = (1 << 64) - 1


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: no top-k cut
    top_p: float = 1.0  # 1: no nucleus cut
    seed: int = 0
    # Medusa's typical acceptance (LOSSY, opt-in): a drafted token is accepted when the base gives it more than
    # min(typical_threshold, typical_alpha * exp(-entropy)); the output is no longer AR sampling's
    typical: bool = False
    typical_threshold: float = 0.09
    typical_alpha: float = 0.3

    def __post_init__(self):
        if not (self.temperature >= 0 and np.isfinite(self.temperature)):
            raise SpectrtError(f"temperature must be a finite number >= 0, not {self.temperature}")
        if self.top_k < 0:
            raise SpectrtError(f"top-k must be >= 0 (0: off), not {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise SpectrtError(f"top-p must be in (0, 1], not {self.top_p}")
        if not 0 <= self.seed <= MASK64:
            raise SpectrtError(f"seed must be in 0..2^64-1, not {self.seed}")
        if self.typical and self.temperature == 0:
            raise SpectrtError("typical acceptance needs sampling (temperature > 0); greedy decoding is exact already")
        if not (0 <= self.typical_threshold <= 1 and 0 <= self.typical_alpha <= 1):
            raise SpectrtError("typical acceptance: threshold and alpha must be in [0, 1]")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


GREEDY = SamplingConfig()


def uniform(seed: int, position: int) -> float:
    """A number in [0, 1) that depends only on (seed, position): splitmix64 of the pair, top 53 bits."""
    z = (seed * 0x9E3779B97F4A7C15 + position + 1) & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    z ^= z >> 31
    return (z >> 11) / float(1 << 53)


def _ranked(x: np.ndarray, m: int) -> np.ndarray:
    """Token ids of the ``m`` largest of ``x`` (all ties at the m-th value included), largest first, ties by id."""
    if m < len(x):
        threshold = np.partition(x, len(x) - m)[len(x) - m]
        ids = np.flatnonzero(x >= threshold)
    else:
        ids = np.arange(len(x))
    return ids[np.lexsort((ids, -x[ids]))]


CANDIDATES = 256  # top-p looks at this many first; it falls back to the whole vocabulary when they hold too little mass


def probabilities(logits: np.ndarray, cfg: SamplingConfig) -> np.ndarray:
    """The processed distribution ``[V]`` (float64): temperature, then top-k, then top-p (nucleus), renormalized.

    Ties at a cut keep the lower token ids, so the result is a function of the logits alone.
    """
    x = np.asarray(logits, np.float64) / cfg.temperature
    if cfg.top_k:
        ids = _ranked(x, cfg.top_k)[:cfg.top_k]
        cut = np.full_like(x, -np.inf)
        cut[ids] = x[ids]
        x = cut
    e = np.exp(x - x.max())
    probs = e / e.sum()
    if cfg.top_p < 1:
        for m in (CANDIDATES, len(x)):
            ids = _ranked(probs, min(m, len(x)))
            mass = np.cumsum(probs[ids])
            if mass[-1] >= cfg.top_p or m >= len(x):
                keep = ids[:int(np.searchsorted(mass, cfg.top_p, side="left")) + 1]  # smallest prefix with mass >= p
                break
        out = np.zeros_like(probs)
        out[keep] = probs[keep] / probs[keep].sum()
        probs = out
    return probs


def sample(logits: np.ndarray, cfg: SamplingConfig, position: int) -> int:
    """The token drawn at sequence ``position`` from ``logits`` (``[V]``): inverse CDF over token ids."""
    cdf = np.cumsum(probabilities(logits, cfg))
    return min(int(np.searchsorted(cdf, uniform(cfg.seed, position) * cdf[-1], side="right")), len(cdf) - 1)


def typical_choice(logits: np.ndarray, cfg: SamplingConfig, candidates: list[int], position: int) -> int:
    """Typical acceptance at one tree node: the most likely of the drafted ``candidates`` the base finds
    typical enough, else a token drawn at ``position`` (the bonus). LOSSY: not AR sampling's distribution."""
    probs = probabilities(logits, cfg)
    entropy = -float(np.sum(probs * np.log(probs + 1e-12)))
    threshold = min(cfg.typical_threshold, cfg.typical_alpha * np.exp(-entropy))
    ok = [c for c in candidates if probs[c] > threshold]
    if ok:
        return max(ok, key=lambda c: (probs[c], -c))
    cdf = np.cumsum(probs)
    return min(int(np.searchsorted(cdf, uniform(cfg.seed, position) * cdf[-1], side="right")), len(cdf) - 1)


def sample_rows(logits: np.ndarray, cfg: SamplingConfig, positions) -> np.ndarray:
    """``[q]`` tokens drawn for each row of ``logits`` ``[q, V]`` at its sequence position."""
    return np.array([sample(row, cfg, int(p)) for row, p in zip(logits, positions)], np.int64)


__all__ = ["GREEDY", "SamplingConfig", "probabilities", "sample", "sample_rows", "typical_choice", "uniform"]
