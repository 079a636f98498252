"""The runtime's interfaces. The decoding loop and the drafters only talk to these, so an ONNX Runtime
runner, a TensorRT runner or a test double can stand behind any of them (a test checks that every shipped
runner and drafter conforms).
"""
from __future__ import annotations

from typing import Protocol, Sequence, runtime_checkable

import numpy as np


@runtime_checkable
class KVRunner(Protocol):
    """A graph with a position-indexed static KV cache: ``forward`` writes q new rows after ``past``;
    ``commit`` keeps some of them; ``rollback``/``reset`` move the integer ``past``. Use inside ``with``."""

    past: int
    max_q: int  # most new tokens per call
    max_context: int  # KV cache rows

    def commit(self, rows: Sequence[int]) -> None: ...

    def rollback(self, n: int) -> None: ...

    def reset(self) -> None: ...

    def __enter__(self): ...

    def __exit__(self, *exc) -> bool | None: ...


@runtime_checkable
class BaseRunner(KVRunner, Protocol):
    """``base``: ``forward(input_ids [q], position_ids [q], tree_mask [q, q])`` -> BaseOutputs
    (greedy_ids [q], hidden_states [q, H], logits [q, V] or None when ``copy_logits`` is off: greedy
    decoding needs only greedy_ids, sampling turns it on)."""

    copy_logits: bool

    def forward(self, input_ids, position_ids, tree_mask): ...


@runtime_checkable
class PrefixRunner(KVRunner, Protocol):
    """``hydra_prefix``: ``forward(hidden_states [q, H], position_ids [q], tree_mask [q, q])`` -> context [q, H]."""

    def forward(self, hidden_states, position_ids, tree_mask) -> np.ndarray: ...


@runtime_checkable
class GraphRunner(Protocol):
    """A stateless graph (heads, draft LM heads): ``runner(**inputs) -> {output name: array}``, at most
    ``max_batch`` rows per call; ``has_output`` (inside ``with``): whether the graph has an optional output."""

    max_batch: int

    def __call__(self, **inputs: np.ndarray) -> dict[str, np.ndarray]: ...

    def has_output(self, name: str) -> bool: ...

    def __enter__(self): ...

    def __exit__(self, *exc) -> bool | None: ...


@runtime_checkable
class Drafter(Protocol):
    """Proposes a tree of candidate tokens once per step.

    ``draft(root, hidden [H], budget) -> Draft(tokens [q], tree)`` with tokens[0] == root and q <= budget
    (the decoder's budget is ``max_nodes``, less near the context limit); ``observe(hidden [a, H], tokens
    [a])`` is called with every token committed to the base's cache (prompt chunks, then each step's
    accepted path); ``rollback(n)`` forgets the last n observed tokens (a conversation's next turn keeps the
    common prefix); ``reset()`` when a new sequence starts.
    """

    max_nodes: int  # most nodes, root included, of any draft

    def draft(self, root: int, hidden: np.ndarray, budget: int): ...

    def observe(self, hidden: np.ndarray, tokens: np.ndarray) -> None: ...

    def rollback(self, n: int) -> None: ...

    def reset(self) -> None: ...


@runtime_checkable
class ChainDrafter(Drafter, Protocol):
    """A drafter that ranks its own step: ``priority(root)`` orders it among the others in a merged tree
    (``drafters.MergedDrafter``: higher first, drafters without a priority after them)."""

    def priority(self, root: int) -> float: ...


class Runners(Protocol):
    """Makes the runners of one artifact on one backend (ONNX Runtime, TensorRT)."""

    def base(self, max_q: int) -> BaseRunner: ...

    def prefix(self, max_q: int) -> PrefixRunner: ...

    def graph(self, name: str, max_batch: int) -> GraphRunner: ...


__all__ = ["KVRunner", "BaseRunner", "PrefixRunner", "GraphRunner", "Drafter", "ChainDrafter", "Runners"]
