"""Decoding: draft -> verify -> accept -> commit (greedy, or seeded sampling: runtime.sampling). Autoregressive decoding is the same loop with a
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
from spectrt.runtime.sampling import GREEDY, SamplingConfig, sample, typical_choice
from spectrt.runtime.tree import ROOT_ONLY, Tree

AR_TREE = ROOT_ONLY


@dataclass
class GenerationResult:
    prompt_tokens: int
    tokens: list = field(default_factory=list)
    stop_reason: str = ""  # "eos" | "max_tokens" | "context"
    prefill_s: float = 0.0
    decode_s: float = 0.0
    steps: int = 0  # verify calls
    reused_tokens: int = 0  # prompt tokens whose K/V were kept from the previous generation (reuse=True)
    rechecks: int = 0  # steps that first verified a path again as a chain (Decoder._recheck)
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
        return {"prompt_tokens": self.prompt_tokens, "reused_tokens": self.reused_tokens,
                "new_tokens": len(self.tokens), "stop_reason": self.stop_reason,
                "prefill_ms": round(self.prefill_s * 1e3, 2), "decode_s": round(self.decode_s, 4),
                "decode_tok_s": finite(self.decode_tok_s, 2), "steps": self.steps, "rechecks": self.rechecks, "tau": finite(self.tau, 3),
                "draft_ms_per_step": round(self.draft_s * 1e3 / max(self.steps, 1), 3),
                "verify_ms_per_step": round(self.verify_s * 1e3 / max(self.steps, 1), 3)}


class Drawn:
    """The base's choice at each node of a verify call, drawn lazily: ``greedy_ids``, or with sampling the
    token drawn from node n's logits with the random number of position ``positions[n]`` (runtime.sampling).
    Acceptance reads only the nodes on its walk, so only those are sampled."""

    def __init__(self, out, sampling: SamplingConfig, positions: np.ndarray, tokens=None, tree=None):
        self.out, self.sampling, self.positions = out, sampling, positions
        self.tokens, self.tree = tokens, tree  # the draft: for typical acceptance's candidates
        self.drawn: dict[int, int] = {}

    def __getitem__(self, node: int) -> int:
        if self.sampling.greedy:
            return int(self.out.greedy_ids[node])
        if node not in self.drawn:
            if self.out.logits is None:
                raise SpectrtError("sampling needs the base runner's logits")
            cfg, logits, position = self.sampling, self.out.logits[node], int(self.positions[node])
            if cfg.typical and self.tree is not None:  # LOSSY opt-in (runtime.sampling.typical_choice)
                kids = [int(self.tokens[c]) for c in self.tree.children[node].values()]
                self.drawn[node] = typical_choice(logits, cfg, kids, position)
            else:
                self.drawn[node] = sample(logits, cfg, position)
        return self.drawn[node]


class Decoder:
    """Generation on a base runner (ORT or TensorRT), optionally with a drafter: greedy, or sampling that
    speculative decoding reproduces exactly for a seed (runtime.sampling)."""

    def __init__(self, base: BaseRunner, drafter: Drafter | None = None, eos_ids=(),
                 prefill_chunk: int = DEFAULT_PREFILL_CHUNK, sampling: SamplingConfig = GREEDY):
        self.base, self.eos, self.sampling = base, frozenset(int(e) for e in eos_ids), sampling
        self.drafter = drafter or RootOnly()
        self.prefill_chunk = min(prefill_chunk, base.max_q)
        self.max_nodes = min(self.drafter.max_nodes, base.max_q)  # an engine built for fewer rows gets smaller drafts
        self.history: list[int] | None = None  # the ids whose K/V rows the cache holds, in order
        # (chain [d], tentative bonus, hidden [d, H]): accepted past the last committed row through a node with
        # non-ancestors before it; the next step verifies it again first (_recheck)
        self._pending: tuple | None = None
        self.copy_logits = base.copy_logits  # the runner's setting for greedy decoding

    def prefill(self, prompt: np.ndarray, reuse: bool = False) -> tuple[int, np.ndarray, int]:
        """Fill the cache with the prompt (causal chunks); returns the first new token, its hidden state and
        how many prompt tokens were already cached. With ``reuse``, the longest common prefix of the prompt and
        what the cache holds from the last generation stays (a conversation's next turn prefills only its new
        tokens); the decoder must then own its base runner (nobody else writes to the cache)."""
        n = len(prompt)
        self._pending = None  # a stopped generation's unconfirmed tail is dropped (never emitted, not cached)
        keep = self._common_prefix(prompt) if reuse else 0
        if keep:
            self.base.rollback(self.base.past - keep)
            self.drafter.rollback(len(self.history) - keep)
            del self.history[keep:]
        else:
            self.base.reset()
            self.drafter.reset()
            self.history = []
        for s in range(keep, n, self.prefill_chunk):
            chunk = prompt[s:s + self.prefill_chunk]
            c = len(chunk)
            out = self.base.forward(chunk, np.arange(s, s + c), np.tri(c, dtype=np.bool_))
            self.base.commit(range(c))
            self.history.extend(int(x) for x in chunk)
            self.drafter.observe(out.hidden_states, chunk)
        first = Drawn(out, self.sampling, np.arange(n - c + 1, n + 1))[c - 1]  # the token at position n
        return first, out.hidden_states[c - 1].copy(), keep

    def _common_prefix(self, prompt: np.ndarray) -> int:
        """Cached tokens the prompt starts with (at most len(prompt) - 1: the last one must run for its logits)."""
        if self.history is None or self.base.past != len(self.history):  # a failed call, or another writer
            return 0
        limit = min(len(self.history), len(prompt) - 1)
        same = np.flatnonzero(np.asarray(self.history[:limit]) != prompt[:limit])
        return int(same[0]) if len(same) else limit

    def step(self, root: int, hidden: np.ndarray, budget: int, res: GenerationResult):
        """One speculative step (one base call) on at most ``budget`` nodes. Returns (the tokens it confirmed,
        next root, its hidden); with a path left to recheck (``_pending``), only the confirmed tokens (no bonus
        yet: None, None) -- the next step verifies the rest first."""
        t0 = time.perf_counter()
        if self._pending is None:
            draft = self.drafter.draft(root, hidden, budget)
            tokens, tree = draft.tokens, draft.tree  # [q], tokens[0] == root; q-node tree
            if tree.size > budget:
                raise SpectrtError(f"the drafter proposed {tree.size} nodes; the budget was {budget}")
            first = 1  # the root was emitted last step
        else:
            tokens, tree = self._recheck(*self._pending, budget)  # the chain, then a draft below it
            res.rechecks += 1
            first = 0
        t1 = time.perf_counter()
        positions = self.base.past + tree.depth  # [q]
        out = self.base.forward(tokens, positions, tree.mask)  # verify all nodes at once
        chosen = Drawn(out, self.sampling, positions + 1, tokens, tree)  # the base's token after each node
        path = tree.accept(tokens, chosen)  # node ids, root first
        c = next((i for i, node in enumerate(path) if node != i), len(path))  # path[:c] holds slots 0..c-1
        self.base.commit(path[:c])  # rows with no masked slot between visible ones: AR's numbers
        self.history.extend(int(x) for x in tokens[path[:c]])
        self.drafter.observe(out.hidden_states[path[:c]], tokens[path[:c]])
        new = [int(t) for t in tokens[path[first:c]]]
        last = path[-1]
        if c < len(path):  # the rest went through a node with non-ancestors before it: verify it again
            self._pending = (tokens[path[c:]], chosen[last], out.hidden_states[path[c:]].copy())
        else:
            self._pending = None
        t2 = time.perf_counter()
        res.draft_s += t1 - t0
        res.verify_s += t2 - t1
        res.steps += 1
        if self._pending is not None:
            return new, None, None
        bonus = chosen[last]
        return new + [bonus], bonus, out.hidden_states[last].copy()

    def _recheck(self, chain: np.ndarray, bonus: int, hidden: np.ndarray, budget: int):
        """The call after a path was accepted through a node with non-ancestors before it (its rows up to that
        node committed): the rest of the path, ``chain`` [d], as a causal chain, and below it the next draft,
        rooted at the tentative ``bonus``. The chain's rows are then AR's, and acceptance over chain + draft
        keeps only what they confirm: the longest prefix of the chain its own choices confirm, and past a
        confirmed bonus the draft's accepted nodes -- one call rechecks and verifies the next draft (its rows:
        what ``budget``, the runner and the context leave beside the chain). ``hidden`` [d, H]: the tree pass's
        hidden states of the chain, good enough to draft from (drafts need not be exact).

        Why: a tree node whose earlier slots hold non-ancestors (an elder sibling's subtree) attends over
        masked keys *between* visible ones; ONNX Runtime's vectorized Softmax and MatMul then sum in another
        order than a decode step does (masked keys after the visible ones change nothing), so its numbers can
        differ from autoregressive decoding in the last bits (measured, SmolLM2 fp32: |d logit| 2.3e-5), and
        int8-activation kernels (MatMulNBits accuracy level 4) turn that into flipped near-ties. A chain has
        only trailing masked keys: its numbers are AR's, so speculative output stays AR's exactly
        (``GenerationResult.rechecks`` counts these calls)."""
        d = len(chain)
        parent = list(range(-1, d - 1))  # the chain
        tokens = [int(t) for t in chain]
        room = min(budget, self.base.max_q - d, self.base.max_context - self.base.past - d)  # a full draft if it fits
        if room >= 1 and self.drafter.max_nodes > 1:
            self.drafter.observe(hidden, chain)  # tentatively, to draft past it; taken back below
            try:
                draft = self.drafter.draft(bonus, hidden[-1], room)
            finally:
                self.drafter.rollback(d)
            if draft.tree.size > room:
                raise SpectrtError(f"the drafter proposed {draft.tree.size} nodes; the budget was {room}")
            parent += [d - 1 if p < 0 else d + int(p) for p in draft.tree.parent]  # the draft's root below the chain
            tokens += [int(t) for t in draft.tokens]
        return np.array(tokens, np.int64), Tree.from_parents(parent)

    def generate(self, prompt_ids, max_new_tokens: int, on_tokens=None, reuse: bool = False) -> GenerationResult:
        """Decode up to ``max_new_tokens`` after the prompt; ``on_tokens(list)`` gets each step's new tokens (it
        may raise to stop, e.g. when a client is gone: the cache stays consistent). ``reuse``: see prefill()."""
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
        self.base.copy_logits = self.copy_logits or not self.sampling.greedy  # sampling draws from the logits
        t0 = time.perf_counter()
        root, hidden, res.reused_tokens = self._guarded(self.prefill, prompt, reuse)
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
            new, root, hidden = self._guarded(self.step, root, hidden, budget, res)
        res.decode_s = time.perf_counter() - t0
        return res

    def _guarded(self, call, *args):
        """A prefill or step; if it fails half-way, the cache's token history is unknown: the next prefill resets."""
        try:
            return call(*args)
        except BaseException:
            self.history, self._pending = None, None
            raise

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
