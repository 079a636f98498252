"""How often an export's draft heads propose the base's own tokens, measured with its graphs (no torch).

Per calibration prompt: the base's greedy continuation (speculative decoding with the export: the same
tokens as autoregressive decoding) and the base's hidden state at every committed position (those the
drafter is shown). A draft step after position t (the last committed token; the root is the base's
token t + 1) is then replayed exactly, for every t at once:

* head d's top-k at t, on the base's own path for Hydra (root, t + 2, ..., t + d + 1: the only path whose
  drafts can be accepted), and the rank of the base's token t + d + 2 in it (``ranks``);
* the context-lookup chain the lookup drafter proposes at t, how many of its first tokens are the base's,
  and where its tokens sit in the heads' top-k (those heads' nodes merge with the chain's in a
  ``heads+lookup`` tree).

A static tree then accepts at t the longest prefix of ``ranks[t]`` that is one of its paths, so any tree
can be scored on these positions without running the model again (``calibration.trees``).
"""
from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass

import numpy as np

from spectrt.runtime.artifact import Artifact, DraftInfo
from spectrt.runtime.errors import SpectrtError
from spectrt.runtime.generate import Decoder
from spectrt.runtime.hydra import PREFIX_MAX_Q, EmbeddingTable
from spectrt.runtime.lookup import DEFAULT_CHAIN, NgramIndex
from spectrt.runtime.protocols import Runners
from spectrt.runtime.session import SessionConfig, SpecSession

DEFAULT_MAX_NEW_TOKENS = 96  # continuation per calibration prompt
REPLAY_BATCH = 64  # draft positions per draft-graph call


@dataclass(frozen=True)
class Positions:
    """The draft positions of one calibration sequence (row i: the step after position t = first + i)."""

    ranks: np.ndarray  # [n, K] rank of the base's token at depth d + 1 in head d's top-k; -1: not in it
    chain: np.ndarray  # [n] length of the lookup chain (0: no match)
    chain_hits: np.ndarray  # [n] its first tokens that are the base's
    chain_ranks: np.ndarray  # [n, K] rank of the chain's depth-(d + 1) token in head d's top-k; -1: none/unknown
    past: np.ndarray  # [n] tokens in the KV cache at the step

    def __len__(self) -> int:
        return len(self.past)


@dataclass(frozen=True)
class Acceptance:
    kind: str  # medusa | hydra | hydra++
    num_heads: int
    topk: int
    sequences: tuple  # of Positions

    @property
    def positions(self) -> int:
        return sum(len(s) for s in self.sequences)

    def accuracy(self) -> list[list[float]]:
        """acc[d][r]: how often rank r of head d is the base's token, given heads 0..d-1 were right at some
        rank (a tree asks head d only below accepted nodes): what ``Tree.from_accuracy`` takes."""
        ranks = np.concatenate([s.ranks for s in self.sequences]) if self.sequences else np.zeros((0, self.num_heads))
        acc, alive = [], np.ones(len(ranks), bool)
        for d in range(self.num_heads):
            n = max(int(alive.sum()), 1)
            acc.append([float(np.sum(alive & (ranks[:, d] == r))) / n for r in range(self.topk)])
            alive &= ranks[:, d] >= 0
        return acc


class _Recorder:
    """Wraps a drafter and keeps the base's hidden state of every committed token (what ``observe`` is shown:
    prompt chunks, then each step's accepted path), so no second pass over the sequence is needed."""

    def __init__(self, inner):
        self.inner, self.rows, self.max_nodes = inner, [], inner.max_nodes

    def draft(self, root: int, hidden: np.ndarray, budget: int):
        return self.inner.draft(root, hidden, budget)

    def observe(self, hidden: np.ndarray, tokens: np.ndarray) -> None:
        self.rows.append(np.array(hidden))
        self.inner.observe(hidden, tokens)

    def rollback(self, n: int) -> None:
        """Forget the last ``n`` rows (the decoder drafts past a path it has yet to recheck, then takes the
        observation back)."""
        self.inner.rollback(n)
        while n > 0:
            last = self.rows.pop()
            if len(last) > n:
                self.rows.append(last[:len(last) - n])
            n -= min(n, len(last))

    def reset(self) -> None:
        self.rows = []
        self.inner.reset()

    def hidden(self) -> np.ndarray:
        return np.concatenate(self.rows)


class _Replay:
    """The export's draft graphs, called for many draft positions at once: ``top(ctx, seq, ts)`` -> [n, K, topk]
    top-k ids of every head at the positions ``ts`` (Hydra on the base's own path)."""

    def __init__(self, art: Artifact, draft: DraftInfo, runners: Runners, stack: ExitStack):
        self.draft = d = draft
        self.hydra = d.kind == "hydra"
        if self.hydra:
            self.embed = EmbeddingTable.of(art)
            self.heads = [stack.enter_context(runners.graph(f"hydra_head.{i}", REPLAY_BATCH)) for i in range(d.num_heads)]
            shared = stack.enter_context(runners.graph("draft_lm_head", REPLAY_BATCH)) if d.shared_lm_head else None
            self.lm = [shared or stack.enter_context(runners.graph(f"hydra_lm_head.{i}", REPLAY_BATCH))
                       for i in range(d.num_heads)]
            self.prefix = stack.enter_context(runners.prefix(PREFIX_MAX_Q)) if d.is_hydra_plus else None
        else:
            self.medusa = stack.enter_context(runners.graph("heads", REPLAY_BATCH))
            self.lm = [stack.enter_context(runners.graph("draft_lm_head", REPLAY_BATCH))]

    def context(self, hidden: np.ndarray) -> np.ndarray:
        """What the heads read at each position: the base's hidden state, or Hydra++'s prefix-layer state."""
        if not self.hydra or self.prefix is None:
            return hidden
        self.prefix.reset()
        out = []
        for s in range(0, len(hidden), self.prefix.max_q):
            c = len(hidden[s:s + self.prefix.max_q])
            out.append(self.prefix.forward(hidden[s:s + c], np.arange(s, s + c), np.tri(c, dtype=np.bool_)).copy())
            self.prefix.commit(range(c))
        self.prefix.reset()
        return np.concatenate(out)

    def top(self, ctx: np.ndarray, seq: np.ndarray, ts: np.ndarray) -> np.ndarray:
        d = self.draft
        out = np.empty((len(ts), d.num_heads, d.topk), np.int64)
        for s in range(0, len(ts), REPLAY_BATCH):
            t = ts[s:s + REPLAY_BATCH]
            c = np.ascontiguousarray(ctx[t])
            if not self.hydra:
                feats = self.medusa(hidden_states=c)["head_features"]
                out[s:s + len(t)] = self.lm[0](head_features=feats)["topk_ids"]
                continue
            for k in range(d.num_heads):  # head k reads the path root (t + 1) .. t + k + 1
                path = self.embed(seq[t[:, None] + 1 + np.arange(k + 1)[None]])
                feats = self.heads[k](context=c.astype(path.dtype, copy=False), path_embeddings=path)["head_features"]
                out[s:s + len(t), k] = self.lm[k](head_features=feats)["topk_ids"][:, 0]
        return out


def _rank(top: np.ndarray, want: np.ndarray) -> np.ndarray:
    """[n, K] position of ``want[i, d]`` in ``top[i, d]``; -1 where absent."""
    hit = top == want[..., None]
    return np.where(hit.any(-1), hit.argmax(-1), -1)


def _positions(replay: _Replay, hidden: np.ndarray, seq: np.ndarray, first: int,
               lookup_chain: tuple[int, ...]) -> Positions:
    K = replay.draft.num_heads
    ts = np.arange(first, len(seq) - K - 1)  # steps whose K drafted depths all have a base token to compare
    top = replay.top(replay.context(hidden), seq, ts)
    ranks = _rank(top, seq[ts[:, None] + 2 + np.arange(K)[None]])
    index = NgramIndex()
    index.extend(seq[:first + 1].tolist())
    chains = np.full((len(ts), K), -1, np.int64)  # chain tokens by depth (-1: none)
    length, hits = np.zeros(len(ts), np.int64), np.zeros(len(ts), np.int64)
    for i, t in enumerate(ts):
        root = int(seq[t + 1])
        chain = index.continuation(root, lookup_chain)
        index.extend([root])
        length[i] = len(chain)
        truth = seq[t + 2:t + 2 + len(chain)]
        hits[i] = next((j for j, (a, b) in enumerate(zip(chain, truth)) if a != b), min(len(chain), len(truth)))
        chains[i, :min(len(chain), K)] = chain[:K]
    chain_ranks = _rank(top, chains)
    chain_ranks[chains < 0] = -1
    if replay.hydra:  # a Hydra head's top-k is known on the base's path only: where the chain left it, unknown
        chain_ranks[np.arange(K)[None] > hits[:, None]] = -1
    return Positions(ranks, length, hits, chain_ranks, ts + 1)


def measure_acceptance(root, prompt_ids: list[list[int]], max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                       threads: int | None = None, lookup_chain: tuple[int, ...] = DEFAULT_CHAIN,
                       progress=lambda it: it) -> Acceptance:
    """Replay the draft heads of the export ``root`` at every position of the base's greedy continuation of
    each prompt (token ids); ``progress`` wraps the prompt iterator (a tqdm bar)."""
    if max_new_tokens < 1:
        raise SpectrtError(f"max new tokens must be at least 1, not {max_new_tokens}")
    with ExitStack() as stack:
        session = stack.enter_context(SpecSession(root, SessionConfig(threads=threads)))
        draft = session.artifact.draft
        if draft is None:
            raise SpectrtError(f"{session.artifact.root}: no draft heads in this export (export with --heads); "
                               "a tree is what the heads draft on")
        replay = _Replay(session.artifact, draft, session.runners, stack)
        recorder = _Recorder(session.decoder.drafter)
        decoder = Decoder(session.base, recorder, session.codec.eos_ids)
        sequences = []
        for ids in progress(prompt_ids):
            if len(ids) + max_new_tokens + 1 > session.max_context:
                continue  # a calibration prompt too long for the export's context
            res = decoder.generate(ids, max_new_tokens)
            seq = np.asarray(list(ids) + res.tokens, np.int64)
            pos = _positions(replay, recorder.hidden(), seq, len(ids) - 1, lookup_chain)
            if len(pos):
                sequences.append(pos)
        kind = "hydra++" if draft.is_hydra_plus else draft.kind
    if not sequences:
        raise SpectrtError(f"no draft positions: the continuations are shorter than the {draft.num_heads} heads + 2 "
                           "tokens (or every prompt is too long for the export's context)")
    return Acceptance(kind, draft.num_heads, draft.topk, tuple(sequences))


__all__ = ["Acceptance", "Positions", "measure_acceptance", "DEFAULT_MAX_NEW_TOKENS"]
