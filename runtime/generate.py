"""Greedy decoding: draft -> verify -> accept -> commit. Autoregressive decoding is the same loop with a
one-node tree and no drafter, so there is exactly one loop to trust. The drafter returns the tree it filled
each step (a static tree, a lookup chain, a merged token tree); the verify call takes that tree's size,
depths (positions) and mask.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from spectrt.runtime.contract import DEFAULT_PREFILL_CHUNK
from spectrt.runtime.drafters import RootOnly
from spectrt.runtime.errors import SpectrtError
from spectrt.runtime.protocols import BaseRunner, Drafter
from spectrt.runtime.tree import ROOT_ONLY

AR_TREE = ROOT_ONLY


@dataclass
class GenerationResult:
    prompt_tokens: int
    tokens: list = field(default_factory=list)
    stop_reason: str = ""  # "eos" | "max_tokens" | "context"
    prefill_s: float = 0.0
    decode_s: float = 0.0
    steps: int = 0  # verify calls
    draft_s: float = 0.0
    verify_s: float = 0.0

    @property
    def tau(self) -> float:
        """Mean tokens per verify step, bonus included (1.0 for autoregressive decoding)."""
        return (len(self.tokens) - 1) / self.steps if self.steps else float("nan")

    @property
    def decode_tok_s(self) -> float:
        return (len(self.tokens) - 1) / self.decode_s if self.decode_s > 0 else float("nan")

    def stats(self) -> dict:
        """JSON-safe figures (no NaN: ``tau``/``decode_tok_s`` are null when nothing was decoded)."""
        finite = lambda x, nd: round(x, nd) if x == x else None  # noqa: E731  (NaN != NaN)
        return {"prompt_tokens": self.prompt_tokens, "new_tokens": len(self.tokens), "stop_reason": self.stop_reason,
                "prefill_ms": round(self.prefill_s * 1e3, 2), "decode_s": round(self.decode_s, 4),
                "decode_tok_s": finite(self.decode_tok_s, 2), "steps": self.steps, "tau": finite(self.tau, 3),
                "draft_ms_per_step": round(self.draft_s * 1e3 / max(self.steps, 1), 3),
                "verify_ms_per_step": round(self.verify_s * 1e3 / max(self.steps, 1), 3)}


class Decoder:
    """Greedy generation on a base runner (ORT or TensorRT), optionally with a drafter."""

    def __init__(self, base: BaseRunner, drafter: Drafter | None = None, eos_ids=(),
                 prefill_chunk: int = DEFAULT_PREFILL_CHUNK):
        self.base, self.eos = base, frozenset(int(e) for e in eos_ids)
        self.drafter = drafter or RootOnly()
        self.prefill_chunk = min(prefill_chunk, base.max_q)
        self.max_nodes = min(self.drafter.max_nodes, base.max_q)  # an engine built for fewer rows gets smaller drafts

    def prefill(self, prompt: np.ndarray) -> tuple[int, np.ndarray]:
        """Fill the cache with the prompt (causal chunks); returns the first new token and its hidden state."""
        self.base.reset()
        self.drafter.reset()
        n = len(prompt)
        for s in range(0, n, self.prefill_chunk):
            chunk = prompt[s:s + self.prefill_chunk]
            c = len(chunk)
            out = self.base.forward(chunk, np.arange(s, s + c), np.tri(c, dtype=np.bool_))
            self.base.commit(range(c))
            self.drafter.observe(out.hidden_states, chunk)
        return int(out.greedy_ids[c - 1]), out.hidden_states[c - 1].copy()

    def step(self, root: int, hidden: np.ndarray, budget: int, res: GenerationResult):
        """One speculative step on at most ``budget`` nodes. Returns (accepted tokens after root + bonus,
        next root, its hidden)."""
        t0 = time.perf_counter()
        draft = self.drafter.draft(root, hidden, budget)
        tokens, tree = draft.tokens, draft.tree  # [q], tokens[0] == root; q-node tree
        if tree.size > budget:
            raise SpectrtError(f"the drafter proposed {tree.size} nodes; the budget was {budget}")
        t1 = time.perf_counter()
        out = self.base.forward(tokens, self.base.past + tree.depth, tree.mask)  # verify all nodes at once
        path = tree.accept(tokens, out.greedy_ids)  # node ids, root first
        self.base.commit(path)  # accepted KV rows move into place
        self.drafter.observe(out.hidden_states[path], tokens[path])
        t2 = time.perf_counter()
        res.draft_s += t1 - t0
        res.verify_s += t2 - t1
        res.steps += 1
        last = path[-1]
        bonus = int(out.greedy_ids[last])
        return [int(t) for t in tokens[path[1:]]] + [bonus], bonus, out.hidden_states[last].copy()

    def generate(self, prompt_ids, max_new_tokens: int, on_tokens=None) -> GenerationResult:
        prompt = np.asarray(prompt_ids, np.int64)
        limit = self.base.max_context
        if len(prompt) == 0:
            raise SpectrtError("empty prompt")
        if len(prompt) >= limit:
            raise SpectrtError(f"prompt has {len(prompt)} tokens; the max context is {limit} (prompt + output)")
        res = GenerationResult(prompt_tokens=len(prompt))
        if max_new_tokens < 1:
            res.stop_reason = "max_tokens"
            return res
        t0 = time.perf_counter()
        root, hidden = self.prefill(prompt)
        res.prefill_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        new = [root]
        while True:
            emitted, stop = self._emit(new, res, max_new_tokens, limit)
            if on_tokens and emitted:
                on_tokens(emitted)
            if stop:
                break
            # near the context limit the node budget shrinks to what fits (any tree gives the same output)
            budget = min(self.max_nodes, limit - self.base.past)
            new, root, hidden = self.step(root, hidden, budget, res)
        res.decode_s = time.perf_counter() - t0
        return res

    def _emit(self, new: list, res: GenerationResult, max_new: int, limit: int) -> tuple[list, bool]:
        """Append tokens to the result, honouring EOS, max tokens and the context limit."""
        emitted = []
        for t in new:
            emitted.append(t)
            res.tokens.append(t)
            if t in self.eos:
                res.stop_reason = "eos"
            elif len(res.tokens) >= max_new:
                res.stop_reason = "max_tokens"
            elif res.prompt_tokens + len(res.tokens) >= limit:
                res.stop_reason = "context"
            if res.stop_reason:
                return emitted, True
        return emitted, False
