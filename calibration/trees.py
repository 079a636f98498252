"""`spectrt calibrate tree`: the draft tree's node budget fitted to a device.

For each candidate budget N the best static N-node tree for the measured acceptance is built
(``Tree.from_accuracy``), and greedy speculative decoding is replayed on the calibration positions
(``calibration.acceptance``): each step accepts what the tree (merged with the lookup chain for
``heads+lookup``, as ``MergedDrafter`` merges it) would accept there, and the next step starts after it. The
step's cost is the verify call of that step's node count plus the draft graphs' calls, from measured timings
or a device roofline (``profiles.cost``). The N maximising expected tokens/s = tokens / (verify + draft time)
wins, and its tree and budget are written into the export's manifest, where `generate` takes them from.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from spectrt.calibration.acceptance import DEFAULT_MAX_NEW_TOKENS, Acceptance, measure_acceptance
from spectrt.profiles.cost import step_cost
from spectrt.runtime.artifact import (CALIBRATED_DRAFTS, Artifact, DraftInfo, TreeCalibration, load_artifact,
                                      write_manifest)
from spectrt.runtime.errors import SpectrtError
from spectrt.runtime.hydra import draft_plan
from spectrt.runtime.lookup import DEFAULT_MAX_TOKENS
from spectrt.runtime.text import TextCodec
from spectrt.runtime.tree import ROOT_ONLY, Tree

DEFAULT_PROMPT_LIMIT = 32  # calibration prompts (of the bundled 48)
DEFAULT_TREE_DRAFT = CALIBRATED_DRAFTS[1]  # heads+lookup: the tree is priced with the lookup chain beside it
MAX_NODES = 64  # the largest budget tried (GPUs verify ~64 nodes for about the price of one)
SMALL = 16  # every budget up to this one is tried, then a coarser grid
MEASURE_ITERATIONS = 5  # timed runs per shape when the costs are measured here


@dataclass(frozen=True)
class Row:
    nodes: int  # the heads' tree, root included (1: no heads drafts)
    tau: float  # tokens per step
    verify_q: float  # mean rows per verify call (the lookup chain included)
    cost_ms: float  # mean step cost: verify + draft graphs
    tok_s: float
    speedup: float  # vs autoregressive decoding under the same cost model


@dataclass(frozen=True)
class TreeChoice:
    rows: tuple  # of Row, by nodes
    best: Row
    tree: Tree
    accuracy: list  # acc[d][r] the trees were built from
    ar_ms: float  # an autoregressive step's cost

    def to_json(self) -> dict:
        return {"nodes": self.best.nodes, "tree": [list(p) for p in self.tree.paths], "ar_ms": round(self.ar_ms, 4),
                "rows": [dataclasses.asdict(r) for r in self.rows],
                "accuracy": [[round(a, 4) for a in head] for head in self.accuracy]}


def candidate_budgets(limit: int) -> list[int]:
    """1 .. SMALL, then every 4 to 32, every 8 to 64; capped at ``limit``."""
    grid = list(range(1, SMALL + 1)) + list(range(20, 33, 4)) + list(range(40, MAX_NODES + 1, 8))
    return [n for n in grid if n <= limit]


def _accepted(ranks: np.ndarray, paths: frozenset) -> int:
    """Depth of the longest prefix of a rank path that is a path of the tree."""
    n = 0
    while n < len(ranks) and ranks[n] >= 0 and tuple(int(r) for r in ranks[:n + 1]) in paths:
        n += 1
    return n


class _DraftCost:
    """The draft graphs' cost of one step on a tree (Hydra: one call per depth, batched over the frontier)."""

    def __init__(self, d: DraftInfo, cost, tree: Tree):
        self.cost, self.prefix = cost, d.is_hydra_plus
        self.fixed = 0.0
        if tree.size > 1 and d.kind == "medusa":
            self.fixed = cost.graph_ms("heads", 1) + cost.graph_ms("draft_lm_head", 1)
        elif tree.size > 1:
            for k, step in enumerate(draft_plan(tree)):
                lm = "draft_lm_head" if d.shared_lm_head else f"hydra_lm_head.{k}"
                f = len(step.front)
                self.fixed += cost.graph_ms(f"hydra_head.{k}", f) + cost.graph_ms(lm, f)

    def __call__(self, accepted: int, past: int) -> float:
        return self.fixed + (self.cost.observe_ms(accepted, past) if self.prefix else 0.0)


def check_draft(draft: str) -> None:
    if draft not in CALIBRATED_DRAFTS:
        raise SpectrtError(f"a tree is calibrated for --draft {' or '.join(CALIBRATED_DRAFTS)}, not '{draft}'")


def draft_info(art: Artifact) -> DraftInfo:
    """The export's draft heads; a one-line error for an export without them."""
    if art.draft is None:
        raise SpectrtError(f"{art.root}: no draft heads in this export (export with --heads); a tree is what the "
                           "heads draft on")
    return art.draft


def replay(acc: Acceptance, tree: Tree, draft: str, cost, draft_cost) -> tuple[float, float, float]:
    """Greedy speculative decoding over the calibration positions with ``tree`` (merged with the lookup chain
    for ``heads+lookup``): (tokens per step, mean verify rows, mean step cost in ms).

    A step whose accepted path does not hold the tree's first slots leaves the rest of it to be verified
    again as a causal chain ahead of the next draft (``Decoder._recheck``): the next call is that many rows
    bigger, priced here as the marginal cost of those rows. The lookup chain takes the first slots and the
    heads' nodes follow depth-first, rank 0 first: a path the heads accept past the chain's correct tokens
    is consecutive only if the whole chain was right and every rank on it is 0."""
    paths, lookup = frozenset(tree.paths), draft == "heads+lookup"
    tokens = steps = rows = 0
    ms = 0.0
    for s in acc.sequences:
        i = 0
        while i < len(s):
            got = heads = _accepted(s.ranks[i], paths)
            q, hits, chain = tree.size, 0, 0
            if lookup:
                hits, chain = int(s.chain_hits[i]), int(s.chain[i])
                got = max(heads, hits)
                q += chain - _accepted(s.chain_ranks[i], paths)  # heads nodes on the chain merge
            past = int(s.past[i])
            ms += cost.verify_ms(q, past) + draft_cost(got + 1, past)
            if heads > hits and (hits < chain or (s.ranks[i][:heads] > 0).any()):
                ms += cost.verify_ms(q + heads - hits, past) - cost.verify_ms(q, past)  # the heads' rows, again
            tokens, steps, rows = tokens + got + 1, steps + 1, rows + q
            i += got + 1
    return tokens / steps, rows / steps, ms / steps


def fit_tree(art: Artifact, acc: Acceptance, cost, draft: str = DEFAULT_TREE_DRAFT, max_nodes: int | None = None) -> TreeChoice:
    """Score every candidate budget (1 .. the cost model's largest verify, less the lookup chain) and choose
    the fastest budget of at least 2 nodes."""
    check_draft(draft)
    heads = draft_info(art)
    chain = DEFAULT_MAX_TOKENS if draft == "heads+lookup" else 0
    limit = min(MAX_NODES, cost.max_q - chain, max_nodes or MAX_NODES)
    if limit < 2:
        raise SpectrtError(f"no room for a draft tree: the cost model verifies at most {cost.max_q} nodes"
                           + (f", {chain} of them the lookup chain's" if chain else ""))
    accuracy = acc.accuracy()
    pasts = np.concatenate([s.past for s in acc.sequences])
    ar_ms = float(np.mean([cost.verify_ms(1, int(p)) for p in pasts]))
    rows, trees = [], {}
    for n in candidate_budgets(limit):
        tree = ROOT_ONLY if n == 1 else Tree.from_accuracy(accuracy, n)
        tau, q, ms = replay(acc, tree, draft, cost, _DraftCost(heads, cost, tree))
        rows.append(Row(n, tau, q, ms, 1e3 * tau / ms, ar_ms * tau / ms))
        trees[n] = tree
    best = max((r for r in rows if r.nodes >= 2), key=lambda r: r.tok_s)
    return TreeChoice(tuple(rows), best, trees[best.nodes], accuracy, ar_ms)


def write_choice(art: Artifact, choice: TreeChoice, calibration: TreeCalibration) -> None:
    """The chosen tree and budget into ``art``'s manifest (atomically; the graphs are untouched)."""
    draft = dataclasses.replace(draft_info(art), tree=choice.tree.paths, nodes=choice.tree.size, calibration=calibration)
    write_manifest(art.root, dataclasses.replace(art.manifest, draft=draft))


def calibrate_tree(root, prompts: list[str], prompts_label: str, timings=None, profile=None,
                   draft: str = DEFAULT_TREE_DRAFT, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                   max_nodes: int | None = None, threads: int | None = None, write: bool = True, log=print,
                   progress=lambda it: it) -> tuple[TreeChoice, Acceptance, object]:
    """Measure acceptance on ``prompts`` (texts, chat-templated like `generate` does), cost the steps
    (``timings``: a `spectrt profile --json` file; ``profile``: a device profile's roofline; neither: timed
    here with ONNX Runtime), choose the budget and, with ``write``, record it in the export."""
    check_draft(draft)
    art = load_artifact(root)
    draft_info(art)

    def measure() -> dict:
        from spectrt.profiles.timing import profile_artifact

        log(f"timing the export's graphs here (ort, {MEASURE_ITERATIONS} runs per shape)")
        return profile_artifact(art.root, iterations=MEASURE_ITERATIONS, warmup=1, progress=log)

    cost = step_cost(art, timings, profile, measure)
    codec = TextCodec(art)
    ids = [codec.encode(p, chat=codec.chat_template is not None) for p in prompts]
    acc = measure_acceptance(art.root, ids, max_new_tokens, threads, progress=progress)
    choice = fit_tree(art, acc, cost, draft, max_nodes)
    if write:
        best = choice.best
        write_choice(art, choice, TreeCalibration(
            cost=cost.kind, cost_source=cost.source, draft=draft, prompts=prompts_label, positions=acc.positions,
            tau=round(best.tau, 4), tokens_per_s=round(best.tok_s, 3), speedup=round(best.speedup, 4),
            profile=cost.profile))
    return choice, acc, cost


def format_choice(choice: TreeChoice, draft: str) -> str:
    what = "lookup alone" if draft == "heads+lookup" else "autoregressive"
    lines = [f"{'nodes':>6} {'tau':>6} {'verify q':>9} {'step ms':>9} {'tok/s':>8} {'x AR':>6}"]
    for r in choice.rows:
        mark = " <- chosen" if r is choice.best else f"   ({what})" if r.nodes == 1 else ""
        lines.append(f"{r.nodes:>6} {r.tau:>6.3f} {r.verify_q:>9.2f} {r.cost_ms:>9.3f} {r.tok_s:>8.2f} "
                     f"{r.speedup:>6.2f}{mark}")
    return "\n".join(lines)


def format_accuracy(acc: Acceptance, accuracy: list, ranks: int = 3) -> str:
    cells = [f"head {d}: " + " ".join(f"{a:.3f}" for a in head[:ranks]) + f" (top-{acc.topk} {sum(head):.3f})"
             for d, head in enumerate(accuracy)]
    return f"acceptance by rank, given the heads before were right ({acc.positions} positions):\n  " + "\n  ".join(cells)


__all__ = ["Row", "TreeChoice", "calibrate_tree", "candidate_budgets", "replay", "fit_tree", "write_choice", "format_choice",
           "format_accuracy", "DEFAULT_PROMPT_LIMIT", "MAX_NODES"]
