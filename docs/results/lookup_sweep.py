"""Lookup chain length vs speed, side by side on one base runner (greedy, ONNX Runtime CPU; every output is
asserted equal to AR). Usage: python docs/results/lookup_sweep.py EXPORT_DIR OFFSET [PROMPTS.jsonl]
(8 prompts: every 30th from OFFSET, 64 new tokens each)."""
import json
import sys
from contextlib import ExitStack
from spectrt.runtime.session import SessionConfig, SpecSession
from spectrt.runtime.generate import Decoder
from spectrt.runtime.lookup import LookupDrafter
from spectrt.runtime.drafters import MergedDrafter, heads_drafter

art, n_tok = sys.argv[1], 64
recs = [json.loads(l) for l in open(sys.argv[3] if len(sys.argv) > 3 else "../shared/data/spec_bench_dev.jsonl")][int(sys.argv[2])::30][:8]
with SpecSession(art, SessionConfig(mode="spec", prefill_chunk=64)) as s, ExitStack() as st:
    heads = st.enter_context(heads_drafter(s.artifact, s.tree, s.runners))
    modes = {"ar": None, "heads": heads}
    for k in (2, 4, 8):
        modes[f"lookup{k}"] = LookupDrafter(max_tokens=k)
    for k in (2, 4):
        modes[f"heads+lookup{k}"] = MergedDrafter([LookupDrafter(max_tokens=k), heads])
    decs = {m: Decoder(s.base, d, s.codec.eos_ids, 64) for m, d in modes.items()}
    tot = {m: [0, 0.0, 0] for m in modes}
    for r in recs:
        ids = s.codec.encode(r["turns"][0] if "turns" in r else r["prompt"])
        ref = None
        for m, dec in decs.items():
            res = dec.generate(ids, n_tok)
            ref = ref or res.tokens
            assert res.tokens == ref, m
            tot[m][0] += len(res.tokens) - 1; tot[m][1] += res.decode_s; tot[m][2] += res.steps
    ar = tot["ar"][0] / tot["ar"][1]
    for m, (n, sec, steps) in tot.items():
        print(f"{m:<16} tok/s {n/sec:6.2f}  tau {n/steps:5.2f}  speedup {n/sec/ar:5.2f}x")
