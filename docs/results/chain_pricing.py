"""Would pricing each drafted token beat the lookup + corpus defaults on a CPU? An offline, exact study.

On a CPU every verify row costs (SmolLM2 fp32: ~2 ms on a ~29 ms step), so a chain token accepted less
often than ~1 in 10 costs more than it brings. This script:

1. decodes the prompts autoregressively (greedy speculative output == AR output, so acceptance can be
   replayed exactly offline) and times the base runner's verify call at q = 1..16 rows, in the same run;
2. on the first half of the prompts, measures how often a chain token is accepted: the lookup's d-th
   copied token by match length n, the corpus table's by the product of frequencies along its path;
3. on the other half, replays decoding (the runtime's own Decoder and MergedDrafter, a base that answers
   with the AR output) for: the shipped defaults; "priced" chains that stop at the first token estimated
   below a threshold (lookup up to 8 tokens, corpus up to 8), chains ordered by their first token's
   estimate; and an oracle that verifies only the tokens that will be accepted (the bound on any pricing);
4. prints tau, rows per step and the speedup the measured call times give (sum of step costs vs AR).

Usage: python docs/results/chain_pricing.py EXPORT_DIR [PROMPTS.jsonl] [LIMIT]
(default: the 48 bundled calibration prompts; 128 new tokens each, 2 threads; the export needs a corpus table)
"""
import itertools
import sys
import time
from collections import defaultdict

import numpy as np

from spectrt.calibration.prompts import CALIBRATION_PROMPTS, load_prompt_records
from spectrt.runtime.corpus import CorpusDrafter, NgramTable
from spectrt.runtime.drafters import MergedDrafter
from spectrt.runtime.generate import Decoder
from spectrt.runtime.lookup import DEFAULT_MAX_NGRAM, LookupDrafter, NgramIndex
from spectrt.runtime.ort_runner import BaseOutputs
from spectrt.runtime.session import SessionConfig, SpecSession
from spectrt.runtime.tree import ROOT_ONLY, Draft, Tree

K = 8  # longest priced chain
BUCKETS = 10  # corpus frequency-product buckets
QS = (1, 2, 3, 4, 5, 6, 8, 10, 12, 16)

exp = sys.argv[1]
pfile = sys.argv[2] if len(sys.argv) > 2 else str(CALIBRATION_PROMPTS)
limit = int(sys.argv[3]) if len(sys.argv) > 3 else None
recs = load_prompt_records(pfile)[:limit]
table = NgramTable.load(exp + "/corpus.npz")

# 1. AR answers and the verify-call cost curve
runs = []
with SpecSession(exp, SessionConfig(threads=2, mode="ar")) as s:
    for _, text in recs:
        prompt = s.codec.encode(text)
        runs.append((prompt, s.generate(prompt, 128).tokens))
    prompt = runs[0][0] + runs[0][1]
    s.generate(prompt, 1)  # ~200 tokens in the cache
    ms = []
    for q in QS:
        ids, pos, mask = np.array(prompt[:q], np.int64), s.base.past + np.arange(q), np.tri(q, dtype=np.bool_)
        t = []
        for _ in range(12):
            t0 = time.perf_counter()
            s.base.forward(ids, pos, mask)
            t.append(time.perf_counter() - t0)
        ms.append(1e3 * float(np.median(t)))
print("verify call ms at q rows: " + ", ".join(f"{q}: {m:.2f}" for q, m in zip(QS, ms)))


def cost(q):
    return float(np.interp(q, QS, ms))


# 2. acceptance estimates on the first half
fit, held = runs[:len(runs) // 2], runs[len(runs) // 2:]
match = defaultdict(lambda: np.zeros(K + 1))  # n -> [matches, accepted >= 1 .. >= K]
freq = np.zeros((BUCKETS, 2))  # [nodes, accepted]


def bucket(p):
    return min(BUCKETS - 1, int(p * BUCKETS))


def corpus_chain(history, root, k):
    context, prob, out = history[max(0, len(history) - table.orders + 1):] + [int(root)], 1.0, []
    while len(out) < k:
        found = table.successor(context)
        if found is None:
            break
        prob *= found[1]
        out.append((found[0], prob))
        context.append(found[0])
    return out


for prompt, out in fit:
    index, history = NgramIndex(DEFAULT_MAX_NGRAM, 1), list(prompt)
    index.extend(prompt)
    for t in range(len(out) - 1):
        root, truth = out[t], out[t + 1:t + 1 + K]
        n = index.match_length(root)
        if n:
            chain = index.continuation(root, K)
            ok = next((i for i, (a, b) in enumerate(zip(chain, truth)) if a != b), min(len(chain), len(truth)))
            match[n][0] += 1
            match[n][1:ok + 1] += 1
        right = True
        for d, (tok, p) in enumerate(corpus_chain(history, root, len(truth))):
            right = right and tok == truth[d]
            freq[bucket(p)] += (1, right)
        index.extend([root])
        history.append(root)
MATCH = {n: v[1:] / max(v[0], 1) for n, v in match.items()}
FREQ = np.minimum.accumulate((freq[:, 1] / np.maximum(freq[:, 0], 1))[::-1])[::-1]
for n in sorted(MATCH):
    print(f"lookup, match of {n}: P(d-th token accepted), d = 1..{K}: " + " ".join(f"{a:.2f}" for a in MATCH[n]))
print("corpus, by frequency product in tenths: " + " ".join(f"{a:.2f}" for a in FREQ))


# 3. priced chain drafters
class PricedLookup(LookupDrafter):
    def __init__(self, theta):
        super().__init__(max_tokens=K)
        self.theta = theta

    def estimate(self, root):
        n = self.index.match_length(int(root))
        return list(itertools.takewhile(lambda a: a >= self.theta, MATCH[n])) if n else []

    def priority(self, root):
        e = self.estimate(root)
        return e[0] if e else 0.0

    def draft(self, root, hidden, budget):
        chain = self.index.continuation(int(root), min(len(self.estimate(root)), budget - 1))
        if not chain:
            return Draft(np.array([root], np.int64), ROOT_ONLY)
        return Draft(np.array([root] + chain, np.int64), Tree.chain(len(chain)))


class PricedCorpus(CorpusDrafter):
    def __init__(self, theta):
        super().__init__(table, max_tokens=K, min_prob=0.0)
        self.theta = theta

    def priced(self, root, k):
        out, best = [], 1.0
        for tok, p in corpus_chain(self.history, root, k):
            best = min(best, FREQ[bucket(p)])
            if best < self.theta or best <= 0:
                break
            out.append((tok, best))
        return out

    def priority(self, root):
        c = self.priced(root, 1)
        return c[0][1] if c else 0.0

    def chain(self, root, k):
        return [tok for tok, _ in self.priced(root, k)]


# 4. replay
class Replay:
    """A base runner that answers with the AR output: node i's choice is the next AR token if its path is AR's."""

    def __init__(self, seq):
        self.seq, self.past, self.max_q, self.max_context, self.copy_logits = seq, 0, 64, len(seq) + 256, False
        self.rows, self.ms, self.counting = 0, 0.0, False

    def forward(self, ids, pos, mask):
        q, g = len(ids), np.full(len(ids), -1, np.int64)
        for i in range(q):
            if all(pos[a] < len(self.seq) and self.seq[pos[a]] == ids[a] for a in np.flatnonzero(mask[i])):
                g[i] = self.seq[pos[i] + 1] if pos[i] + 1 < len(self.seq) else 0
        if self.counting:
            self.rows += q
            self.ms += cost(q)
        return BaseOutputs(g, np.zeros((q, 1), np.float32), None)

    def commit(self, rows):
        self.past += len(rows)

    def rollback(self, n):
        self.past -= n

    def reset(self):
        self.past = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class Replayed(Decoder):
    def prefill(self, *args, **kw):  # only decode steps count
        self.base.counting = False
        out = super().prefill(*args, **kw)
        self.base.counting = True
        return out


def replay(make):
    tokens = steps = rows = 0
    total_ms = 0.0
    for prompt, out in held:
        base = Replay(prompt + out)
        res = Replayed(base, make()).generate(prompt, len(out))
        assert res.tokens == out
        tokens, steps, rows, total_ms = tokens + len(out) - 1, steps + res.steps, rows + base.rows, total_ms + base.ms
    return tokens / steps, rows / steps, tokens * cost(1) / total_ms


print(f"{len(held)} held-out prompts of {pfile} (estimates fitted on the other {len(fit)})")
configs = {"defaults (lookup+corpus)": lambda: MergedDrafter([LookupDrafter(), CorpusDrafter(table)])}
for theta in (0.0, 0.05, 0.08, 0.1, 0.12, 0.15, 0.2):
    configs[f"priced, threshold {theta:.2f}"] = lambda th=theta: MergedDrafter([PricedLookup(th), PricedCorpus(th)])
for name, make in configs.items():
    tau, q, speed = replay(make)
    print(f"{name:28s} tau {tau:5.3f}  rows/step {q:5.2f}  speedup {speed:5.3f}x")
    if name.endswith("0.00"):  # every chain token drafted; the oracle verifies only what is accepted (tau rows)
        print(f"{'oracle (accepted rows only)':28s} tau {tau:5.3f}  rows/step {tau:5.2f}  speedup "
              f"{tau * cost(1) / cost(tau):5.3f}x (a bound: mean rows)")
