"""Corpus drafting's chain length / stop probability, with and without the heads, side by side on one base
runner (greedy; every output asserted equal to AR). Tune on calibration prompts, never on benchmark text.
Usage: python docs/results/corpus_variants.py EXPORT_DIR PROMPTS.jsonl STRIDE LIMIT
(the export needs draft heads and a corpus table; 128 new tokens per prompt, 2 threads)."""
import sys, json, time
from contextlib import ExitStack
from spectrt.calibration.prompts import load_prompt_records
from spectrt.runtime.session import SessionConfig, SpecSession
from spectrt.runtime.generate import Decoder
from spectrt.runtime.lookup import LookupDrafter
from spectrt.runtime.corpus import CorpusDrafter, NgramTable
from spectrt.runtime.drafters import MergedDrafter, heads_drafter
exp, pfile, stride, limit = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
recs = load_prompt_records(pfile)[::stride][:limit]
table = NgramTable.load(exp + "/corpus.npz")
with SpecSession(exp, SessionConfig(threads=2)) as s, ExitStack() as st:
    heads = st.enter_context(heads_drafter(s.artifact, s.tree, s.runners))
    modes = {"ar": None, "heads+lookup": MergedDrafter([LookupDrafter(), heads]),
             "lookup+corpus3/0.2": MergedDrafter([LookupDrafter(), CorpusDrafter(table, 3, 0.2)])}
    for k, p in ((2, 0.2), (3, 0.2), (4, 0.1)):
        modes[f"h+l+corpus{k}/{p}"] = MergedDrafter([LookupDrafter(), CorpusDrafter(table, k, p), heads])
    decs = {m: Decoder(s.base, d, s.codec.eos_ids, 64) for m, d in modes.items()}
    tot = {m: [0, 0.0, 0, 0] for m in modes}
    for d in decs.values(): d.generate(s.codec.encode("Hello!"), 8)
    for cat, p in recs:
        ids = s.codec.encode(p); ref = None
        for m, dec in decs.items():
            r = dec.generate(ids, 128)
            ref = ref or r.tokens
            assert r.tokens == ref, m
            tot[m][0] += len(r.tokens) - 1; tot[m][1] += r.decode_s; tot[m][2] += r.steps; tot[m][3] += r.rechecks
    ar = tot["ar"][0] / tot["ar"][1]
    for m, (n, sec, steps, rc) in tot.items():
        print(f"{m:22s} tok/s {n/sec:6.2f}  tau {n/steps:5.2f}  rechecks {rc:4d}  speedup {n/sec/ar:5.3f}x", flush=True)
