"""Exactness: speculative greedy output == autoregressive greedy output, token for token."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spectrt.runtime.generate import Decoder
from spectrt.runtime.artifact import load_artifact
from spectrt.runtime.ort_runner import OrtBaseRunner
from spectrt.runtime.tree import StaticTreeDrafter, Tree

PROMPT = list(range(20, 44))


class OracleDrafter(StaticTreeDrafter):
    """Drafts the true continuation (rank 0) with probability ``p`` per node, else a wrong token.

    Forces long accepted paths, so EOS inside a path, max-token and context edges all get exercised.
    """

    def __init__(self, base, reference: list[int], p: float, seed: int, tree: Tree):
        self.base, self.ref, self.p, self.rng, self.tree = base, reference, p, np.random.default_rng(seed), tree
        self.seen = 0  # tokens observed: the decoder observes every token before a root (a path it drafts
        # past before committing it is observed and rolled back), so this is the root's position

    def observe(self, hidden, tokens):
        self.seen += len(tokens)

    def rollback(self, n):
        self.seen -= n

    def reset(self):
        self.seen = 0

    def fill(self, root, hidden, tree):
        pos = self.seen  # the root sits at this position of the sequence
        tokens = np.empty(tree.size, np.int64)
        tokens[0] = root
        for n in range(1, tree.size):
            i = pos + int(tree.depth[n])
            truth = self.ref[i] if i < len(self.ref) else 0
            right = tree.rank[n] == 0 and self.rng.random() < self.p
            tokens[n] = truth if right else (truth + 1 + int(tree.rank[n])) % 256
        return tokens


paths_strategy = st.lists(st.lists(st.integers(0, 3), min_size=1, max_size=4), min_size=1, max_size=20)


def closed_tree(paths) -> Tree:
    """Add missing parents so any list of paths becomes a valid tree."""
    full = {tuple(p[:i]) for p in paths for i in range(1, len(p) + 1)}
    return Tree.from_paths(full)


@pytest.fixture(scope="module")
def llama(tiny_exports):
    return load_artifact(tiny_exports["llama"])


def run(art, drafter_factory, tree, n, eos=(), max_context=None):
    with OrtBaseRunner(art, max_q=max(16, tree.size if tree else 1), max_context=max_context) as base:
        drafter = drafter_factory(base) if drafter_factory else None
        return Decoder(base, drafter, eos, prefill_chunk=16).generate(PROMPT, n)


@pytest.fixture(scope="module")
def reference(llama):
    res = run(llama, None, None, 120)
    return PROMPT + res.tokens


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(paths=paths_strategy, p=st.floats(0.0, 1.0), n=st.integers(1, 60), seed=st.integers(0, 1000),
       eos_at=st.one_of(st.none(), st.integers(0, 59)), ctx=st.one_of(st.none(), st.integers(26, 90)))
def test_spec_equals_ar_random_trees(llama, reference, paths, p, n, seed, eos_at, ctx):
    tree = closed_tree(paths)
    eos = () if eos_at is None else (reference[len(PROMPT) + eos_at],)
    ar = run(llama, None, None, n, eos, ctx)
    spec = run(llama, lambda b: OracleDrafter(b, reference, p, seed, tree), tree, n, eos, ctx)
    assert spec.tokens == ar.tokens
    assert spec.stop_reason == ar.stop_reason
    assert spec.steps <= ar.steps


def test_oracle_accepts_whole_paths(llama, reference):
    """With a perfect drafter every step accepts the full depth + bonus: tau = depth + 1."""
    tree = Tree.chain(4)
    res = run(llama, lambda b: OracleDrafter(b, reference, 1.0, 0, tree), tree, 50)
    assert res.tokens == reference[len(PROMPT):len(PROMPT) + 50]
    assert res.tau >= 4.5


def test_accept_picks_longest_matching_path():
    tree = Tree.from_paths([[0], [1], [0, 0], [1, 0], [1, 0, 0]])
    # depth-first, rank 0 first: 0 root, 1:[0], 2:[0,0], 3:[1], 4:[1,0], 5:[1,0,0]
    assert tree.paths == ((0,), (0, 0), (1,), (1, 0), (1, 0, 0))
    tokens = np.array([7, 10, 12, 11, 13, 14])
    greedy = np.array([11, 0, 0, 13, 99, 0])  # root -> 11 (node 3) -> 13 (node 4) -> 99 (no child)
    assert tree.accept(tokens, greedy) == [0, 3, 4]
    assert tree.mask[5].tolist() == [True, False, False, True, True, True]
    assert tree.depth.tolist() == [0, 1, 2, 1, 2, 3]
    # the all-rank-0 path takes consecutive slots: accepting it needs no recheck (Decoder._recheck)
    assert tree.accept(tokens, np.array([10, 12, 55, 0, 0, 0])) == [0, 1, 2]


@pytest.mark.parametrize("bad", [[[0, 0]], [[-1]], [[]], "nonsense"])
def test_bad_trees_rejected(bad):
    from spectrt.runtime.errors import SpectrtError

    with pytest.raises(SpectrtError):
        Tree.from_paths(bad)


def test_tree_deeper_than_heads_rejected():
    from spectrt.runtime.errors import SpectrtError

    with pytest.raises(SpectrtError, match="exceeds the 2 draft heads"):
        Tree.chain(3).check_drafter(2, 10)
    with pytest.raises(SpectrtError, match="top-2"):
        Tree.from_paths([[0], [2]]).check_drafter(2, 2)
