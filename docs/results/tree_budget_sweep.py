"""tau (tokens per verify step, bonus included) vs node budget: static trees (``Tree.from_accuracy`` on the heads'
measured accuracies, what `spectrt export --tree N` builds) vs dynamic trees (grown each step from the heads'
top-k log-probabilities), for each export's heads alone and merged with the 4-token lookup chain, the lookup
sized to the budget and, for exports with a corpus table, the corpus chain too.

tau does not depend on the machine, and on a 2-core CPU a 64-node verify costs ~6 decode steps, so each prompt
is decoded once (greedy AR, keeping the base's hidden state of every committed token) and every configuration
replays its draft steps on that sequence: the drafter runs as in decoding (same graphs, same code, shown the
same hidden states), and a node is accepted when its path is the AR continuation (what greedy acceptance
accepts). ``--check N`` also decodes the first N prompts for real with every configuration, asserting each
output equals AR and reporting decoded vs replayed tau (verify-call hidden states may differ from AR's in the
last bits, which can flip a draft at a near-tie).

Usage: python docs/results/tree_budget_sweep.py OUT.json EXPORT_DIR [EXPORT_DIR ...] [--plot PNG]
       [--prompts ../shared/data/spec_bench_dev.jsonl] [--stride 15] [--limit 16] [-n 64] [--check 1]
       [--budgets 2,4,8,16,32,64] [--beam 8] [--only CONFIG,CONFIG]
"""
import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from spectrt.calibration.prompts import load_prompt_records
from spectrt.export.trees import choose_tree
from spectrt.runtime.bench import Totals
from spectrt.runtime.drafters import RootOnly, MergedDrafter, corpus_drafter, heads_drafter
from spectrt.runtime.generate import Decoder, GenerationResult
from spectrt.runtime.lookup import LookupDrafter
from spectrt.runtime.session import SessionConfig, SpecSession
from spectrt.runtime.tree import DEFAULT_BEAM, DynamicTree

BUDGETS = (2, 4, 8, 16, 32, 64)
LOOKUP_VARIANTS = ((8, 1), (16, 1), (8, 3), (16, 3))  # (chain tokens, branches), where they fit the budget
CHUNK = 64  # prefill chunk, as the sessions default


class Recorder(RootOnly):
    """AR decoding's drafter: proposes nothing, keeps every committed token's base hidden state."""

    def __init__(self):
        self.hidden, self.tokens = [], []

    def observe(self, hidden, tokens):
        self.hidden.append(hidden.copy())
        self.tokens.extend(int(t) for t in tokens)


class Truth:
    """The base's choice after each node of a draft rooted at sequence position ``p``: on the AR path it is
    the AR token one position further; acceptance reads no other node."""

    def __init__(self, seq, p, depth):
        self.seq, self.p, self.depth = seq, p, depth

    def __getitem__(self, node):
        i = self.p + int(self.depth[node]) + 1
        return self.seq[i] if i < len(self.seq) else -1


def replay(drafter, prompt_len, seq, hidden, new_tokens, budget):
    """Steps a decoder would take with ``drafter`` to emit the AR continuation ``seq[prompt_len:]`` (``new_tokens``
    of them): drafts are drafted for real, acceptance follows the AR path."""
    drafter.reset()
    for s in range(0, prompt_len, CHUNK):
        drafter.observe(hidden[s:min(s + CHUNK, prompt_len)], np.asarray(seq[s:min(s + CHUNK, prompt_len)]))
    res = GenerationResult(prompt_tokens=prompt_len, tokens=list(seq[prompt_len:prompt_len + new_tokens]))
    p, emitted = prompt_len, 1  # the root sits at position p; the first token came from the prefill
    while emitted < new_tokens:
        t0 = time.perf_counter()
        d = drafter.draft(seq[p], hidden[p - 1], budget)
        res.draft_s += time.perf_counter() - t0
        assert d.tree.size <= budget and d.tokens[0] == seq[p]
        path = d.tree.accept(d.tokens, Truth(seq, p, d.tree.depth))
        res.steps += 1
        emitted += len(path)
        if emitted < new_tokens:
            drafter.observe(hidden[p:p + len(path)], d.tokens[path])
        p += len(path)
    return res


def drafters(session, budget, beam, only=None):
    """name -> drafter of one export at one node budget."""
    art = session.artifact
    d = art.draft
    static = heads_drafter(art, choose_tree(str(budget), Path(d.source), d.num_heads, d.topk), session.runners)
    dynamic = heads_drafter(art, DynamicTree(budget, beam), session.runners)
    out = {"static": static, "dynamic": dynamic,
           "static+lookup": MergedDrafter([LookupDrafter(), static], budget),
           "dynamic+lookup": MergedDrafter([LookupDrafter(), dynamic], budget)}
    for tokens, branches in LOOKUP_VARIANTS:  # the lookup sized to the budget: longer chains, other matches
        if 1 + tokens * branches <= budget:
            out[f"dynamic+lookup{tokens}x{branches}"] = MergedDrafter([LookupDrafter(tokens, branches=branches), dynamic],
                                                                      budget)
    # what `--tree dynamic --tree-nodes N --draft heads+lookup[+corpus]` runs (drafters.drafter_for)
    out["dynamic+sized lookup"] = MergedDrafter([LookupDrafter.for_budget(budget), dynamic], budget)
    if art.corpus is not None:
        out["dynamic+sized lookup+corpus"] = MergedDrafter([LookupDrafter.for_budget(budget), corpus_drafter(art),
                                                            dynamic], budget)
    return {n: dr for n, dr in out.items() if only is None or n in only}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("exports", nargs="+")
    ap.add_argument("--prompts", default="../shared/data/spec_bench_dev.jsonl")
    ap.add_argument("--stride", type=int, default=15)
    ap.add_argument("--limit", type=int, default=16)
    ap.add_argument("-n", type=int, default=64)
    ap.add_argument("--check", type=int, default=1, help="prompts also decoded for real with every configuration")
    ap.add_argument("--check-tokens", type=int, default=32)
    ap.add_argument("--plot", default=None)
    ap.add_argument("--budgets", default=",".join(map(str, BUDGETS)))
    ap.add_argument("--beam", type=int, default=DEFAULT_BEAM, help="dynamic Hydra trees: nodes expanded per depth")
    ap.add_argument("--only", default=None, help="comma-separated configurations to run (default: all)")
    a = ap.parse_args()
    budgets = [int(b) for b in a.budgets.split(",")]
    recs = load_prompt_records(a.prompts)[::a.stride][:a.limit]  # (category, prompt)
    report = {"prompts": f"{a.prompts} every {a.stride}th, {len(recs)} prompts", "new_tokens": a.n,
              "budgets": budgets, "beam": a.beam, "exports": {}}
    t_start = time.time()
    for export in a.exports:
        with SpecSession(export, SessionConfig(mode="spec", draft="heads", prefill_chunk=CHUNK)) as s:
            d = s.artifact.draft
            kind = "hydra++" if d.is_hydra_plus else d.kind
            only = set(a.only.split(",")) if a.only else None
            configs = {b: drafters(s, b, a.beam, only) for b in budgets}
            for ds in configs.values():
                for dr in ds.values():
                    dr.__enter__()
            totals = defaultdict(Totals)  # (config, budget) -> totals
            cats = defaultdict(Totals)  # (category, config, budget)
            checks = []
            for i, (category, prompt) in enumerate(recs):
                ids = s.codec.encode(prompt)
                rec = Recorder()
                ar = Decoder(s.base, rec, s.codec.eos_ids, CHUNK).generate(ids, a.n)
                seq, hidden = ids + ar.tokens, np.concatenate(rec.hidden)  # [prompt + new - 1, H]
                assert rec.tokens == seq[:len(hidden)]
                for b, ds in configs.items():
                    for name, dr in ds.items():
                        res = replay(dr, len(ids), seq, hidden, len(ar.tokens), b)
                        totals[name, b].add(res)
                        cats[category, name, b].add(res)
                        if i < a.check:
                            real = Decoder(s.base, dr, s.codec.eos_ids, CHUNK).generate(ids, a.check_tokens)
                            assert real.tokens == ar.tokens[:a.check_tokens], (kind, name, b)
                            again = replay(dr, len(ids), seq, hidden, len(real.tokens), b)
                            checks.append({"prompt": i, "config": name, "budget": b, "tau_decoded": round(real.tau, 3),
                                           "tau_replayed": round(again.tau, 3)})
                print(f"{kind} prompt {i + 1}/{len(recs)} ({category}) done at {time.time() - t_start:.0f} s",
                      flush=True)
            for ds in configs.values():
                for dr in ds.values():
                    dr.__exit__(None, None, None)
        names = list(dict.fromkeys(n for ds in configs.values() for n in ds))
        report["exports"][kind] = {
            "export": export, "heads": d.source, "topk": d.topk, "num_heads": d.num_heads,
            "tau": {n: {b: round(totals[n, b].tau, 3) for b in budgets if n in configs[b]} for n in names},
            "draft_ms_per_step": {n: {b: round(1e3 * totals[n, b].draft_s / totals[n, b].steps, 2) for b in budgets
                                      if n in configs[b]} for n in names},
            "categories": {c: {n: {b: round(cats[c, n, b].tau, 3) for b in budgets if n in configs[b]} for n in names}
                           for c in sorted({c for c, _ in recs}, key=str)},
            "check": checks,
        }
        print(f"\n{kind}: tau by node budget (root included)")
        print(f"{'config':<24}" + "".join(f"{b:>8}" for b in budgets))
        for n in names:
            print(f"{n:<24}" + "".join(f"{totals[n, b].tau:>8.2f}" if n in configs[b] else f"{'':>8}" for b in budgets))
        bad = [c for c in checks if c["tau_decoded"] != c["tau_replayed"]]
        print(f"check: {len(checks)} decoded runs equal AR; decoded tau != replayed tau in {len(bad)}: {bad[:4]}")
    Path(a.out).write_text(json.dumps(report, indent=2) + "\n")
    if a.plot:
        plot(report, a.plot)


def plot(report, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = list(report["exports"])
    fig, axes = plt.subplots(1, len(kinds), figsize=(5.5 * len(kinds), 4.2), sharey=True, squeeze=False)
    style = {"static": ("tab:blue", "--"), "dynamic": ("tab:red", "-"), "static+lookup": ("tab:cyan", "--"),
             "dynamic+lookup": ("tab:orange", "-"), "dynamic+lookup8x1": ("tab:purple", ":"),
             "dynamic+lookup16x1": ("tab:brown", ":"), "dynamic+lookup8x3": ("tab:green", ":"),
             "dynamic+lookup16x3": ("black", ":")}
    for ax, kind in zip(axes[0], kinds):
        for name, taus in report["exports"][kind]["tau"].items():
            color, ls = style.get(name, (None, ":"))
            ax.plot(list(map(int, taus)), list(taus.values()), ls, color=color, marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_xticks(report["budgets"], [str(b) for b in report["budgets"]])
        ax.set_title(f"SmolLM2-135M, {kind} heads")
        ax.set_xlabel("node budget per verify (root included)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("tau (tokens per verify step)")
    axes[0][-1].legend()
    fig.suptitle(f"static vs dynamic trees ({report['prompts']}, {report['new_tokens']} new tokens)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
