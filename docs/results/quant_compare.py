"""Quantized exports side by side with ONNX Runtime GenAI, one process, runs interleaved per prompt.

Usage: python docs/results/quant_compare.py OGA_MODEL_DIR EXPORT_DIR [EXPORT_DIR ...]
       [--prompts FILE] [--stride K] [--limit N] [-n TOKENS] [--threads T] [--one-row-ar] [--json OUT]

Every engine decodes the same token ids (each export's chat template applied by spectrt) greedily for at
most N new tokens. Per export: AR and speculative decoding (its default drafter; output checked equal
to its own AR output), base graph bytes; with ``--one-row-ar``, also AR with one-token calls unpadded
(``ar-1row``: what ORT's one-row int4 kernel would give, and how often its output differs from the exact
AR's; spectrt pads them for exactness, see ``runtime.ort_runner``); for ONNX Runtime GenAI: its own greedy loop (``og.Generator``)
with ``intra_op_num_threads`` set to the same T. Decode tok/s counts tokens after the first (the first
comes from prefill) over the time after prefill, for every engine alike. A benchmark: prints, asserts nothing.
The ORT GenAI model: ``python -m onnxruntime_genai.models.builder -m HF_DIR -i HF_DIR -o OUT -p int4 -e cpu``.
"""
import argparse
import json
import math
import time
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import onnxruntime_genai as og

from spectrt.calibration.prompts import load_prompt_records
from spectrt.runtime.artifact import load_artifact
from spectrt.runtime.generate import Decoder
from spectrt.runtime.quality import default_heldout_text
from spectrt.runtime.session import SessionConfig, SpecSession


def oga_model(path: str, threads: int):
    """The ORT GenAI model on the CPU with ``threads`` intra-op threads (an overlay: its files are untouched)."""
    cfg = og.Config(path)
    cfg.clear_providers()
    cfg.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
    return og.Model(cfg)


def oga_generate(model, ids, n):
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + n, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(ids)  # prefill
    gen.generate_next_token()  # first new token: from prefill's logits
    t = time.perf_counter()
    while not gen.is_done():
        gen.generate_next_token()
    dt = time.perf_counter() - t
    out = list(gen.get_sequence(0))[len(ids):]
    return out, dt


def oga_perplexity(path: str, ids: np.ndarray, window: int, threads: int) -> float:
    """Perplexity of the ORT GenAI model on ``ids`` scored as ``spectrt quality`` does (windows of ``window``
    tokens, each from an empty cache), run by onnxruntime on its model.onnx."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(Path(path) / "model.onnx"), opts, providers=["CPUExecutionProvider"])
    head_size = json.loads((Path(path) / "genai_config.json").read_text())["model"]["decoder"]["head_size"]
    nll, n = 0.0, 0
    for start in range(0, len(ids) - 1, window):
        chunk = ids[start:start + window]
        c = len(chunk)
        if c < 2:
            break
        feeds = {"input_ids": chunk[None], "attention_mask": np.ones((1, c), np.int64)}
        for i in sess.get_inputs():
            if i.name.startswith("past_key_values"):
                feeds[i.name] = np.zeros((1, i.shape[1], 0, head_size), np.float32)
        logits = sess.run(["logits"], feeds)[0][0, :c - 1].astype(np.float64)
        mx = logits.max(-1, keepdims=True)
        lse = mx[:, 0] + np.log(np.exp(logits - mx).sum(-1))
        nll += float((lse - logits[np.arange(c - 1), chunk[1:]]).sum())
        n += c - 1
    return math.exp(nll / n)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("oga")
    ap.add_argument("exports", nargs="+")
    ap.add_argument("--prompts", default="../shared/data/spec_bench_dev.jsonl")
    ap.add_argument("--stride", type=int, default=60)
    ap.add_argument("--limit", type=int, default=4)
    ap.add_argument("-n", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--one-row-ar", action="store_true", help="also AR without the dummy row (diagnostic, not exact)")
    ap.add_argument("--perplexity", action="store_true",
                    help="also ORT GenAI's perplexity on spectrt quality's default held-out text (2048 tokens, windows of 256)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    prompts = [p for _, p in load_prompt_records(a.prompts)[::a.stride][:a.limit]]
    cfg = SessionConfig(mode="spec", threads=a.threads)
    rows = {}
    with ExitStack() as st:
        sessions = {d: st.enter_context(SpecSession(d, cfg)) for d in a.exports}
        decs = {}
        padded = {d: s.base.pad_single for d, s in sessions.items()}
        for d, s in sessions.items():
            decs[(d, "ar")] = Decoder(s.base, None, s.codec.eos_ids, cfg.prefill_chunk)
            decs[(d, "spec")] = s.decoder
            if a.one_row_ar and s.base.pad_single:
                decs[(d, "ar-1row")] = decs[(d, "ar")]
        model = oga_model(a.oga, a.threads)
        first = next(iter(sessions.values()))
        first_codec = first.codec
        warm = first.codec.encode("Hello!")
        for dec in decs.values():
            dec.generate(warm, 8)
        oga_generate(model, warm, 8)
        for p in prompts:
            ids = first.codec.encode(p)
            ar_out = {}
            for (d, mode), dec in decs.items():
                sessions[d].base.pad_single = padded[d] and mode != "ar-1row"
                r = dec.generate(ids, a.n)
                row = rows.setdefault(f"{Path(d).name}:{mode}", {"tokens": 0, "s": 0.0, "steps": 0, "mismatch": 0, "rechecks": 0})
                row["rechecks"] += r.rechecks
                row["tokens"] += len(r.tokens) - 1
                row["s"] += r.decode_s
                row["steps"] += r.steps
                if mode == "ar":
                    ar_out[d] = r.tokens
                else:  # spec, ar-1row: vs the exact AR
                    row["mismatch"] += r.tokens != ar_out[d]
            toks, dt = oga_generate(model, ids, a.n)
            row = rows.setdefault("onnxruntime-genai:ar", {"tokens": 0, "s": 0.0, "steps": 0, "mismatch": 0})
            row["tokens"] += len(toks) - 1
            row["s"] += dt
            row["steps"] += len(toks) - 1
    oga = rows["onnxruntime-genai:ar"]
    oga_rate = oga["tokens"] / oga["s"]
    mb = {Path(d).name: load_artifact(d).graph("base").bytes / 1e6 for d in a.exports}
    oga_mb = sum(f.stat().st_size for f in Path(a.oga).glob("model.onnx*")) / 1e6
    print(f"{len(prompts)} prompts x {a.n} tokens, {a.threads} threads, greedy")
    print(f"{'engine:mode':<34}{'base MB':>9}{'tok/s':>8}{'tau':>7}{'vs ORT GenAI':>14}{'!= AR':>12}{'rechecks':>10}")
    for name, r in rows.items():
        rate = r["tokens"] / r["s"]
        size = mb.get(name.split(":")[0], oga_mb)
        print(f"{name:<34}{size:>9.1f}{rate:>8.2f}{r['tokens'] / r['steps']:>7.2f}{rate / oga_rate:>13.2f}x"
              f"{r['mismatch'] if not name.endswith(':ar') else '':>12}{r.get('rechecks', '') if name.endswith(':spec') else '':>10}")
        r.update(tok_s=round(rate, 2), tau=round(r["tokens"] / r["steps"], 3), base_mb=round(size, 1),
                 vs_onnxruntime_genai=round(rate / oga_rate, 3))
    if a.perplexity:
        text, what = default_heldout_text()
        ids = np.array(first_codec.tokenizer.encode(text, add_special_tokens=False).ids[:2048], np.int64)
        oga["perplexity"] = round(oga_perplexity(a.oga, ids, 256, a.threads), 3)
        print(f"ORT GenAI perplexity on {what[:40]}... ({len(ids)} tokens, windows of 256): {oga['perplexity']}")
    if a.json:
        Path(a.json).write_text(json.dumps({"prompts": len(prompts), "new_tokens": a.n, "threads": a.threads,
                                            "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
