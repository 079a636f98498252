"""VocabTrim sweep: the same heads with draft LM heads trimmed to several N, benchmarked in one run.

Each variant is a sibling artifact directory that hard-links every file of the source export except
the draft LM head, which is rebuilt over the N kept rows from the source's own (untrimmed) weights, so
no torch is needed. Each variant is benchmarked AR vs speculative on the same prompts; the figures go to
a JSON file and a PNG (coverage and tau vs N).
"""
from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper
from tokenizers import Tokenizer

from spectrt.export.draft_graphs import build_draft_lm_head_graph
from spectrt.export.onnx_graph import save_graph
from spectrt.export.vocabtrim import load_vocab, tokenizer_hash
from spectrt.runtime.artifact import MANIFEST, load_artifact, write_manifest
from spectrt.runtime.bench import run_bench
from spectrt.runtime.errors import SpectrtError


def _lm_weight(artifact) -> np.ndarray:
    """The untrimmed draft LM head weight of an export, as the graph builder takes it: [V, H] or [K, V, H]."""
    if artifact.draft.vocab_trim is not None:
        raise SpectrtError(f"{artifact.root}: the sweep needs an export without VocabTrim (re-export without --vocab)")
    model = onnx.load(str(artifact.graph_path("draft_lm_head")), load_external_data=True)
    init = {i.name: i for i in model.graph.initializer}
    if "lm_head" not in init:
        raise SpectrtError(f"{artifact.root}: draft_lm_head.onnx has no 'lm_head' initializer")
    w = numpy_helper.to_array(init["lm_head"])  # stored [V, H] (shared head) or [K, H, V] (per-head heads)
    return np.ascontiguousarray(w.transpose(0, 2, 1)) if w.ndim == 3 else w


def make_variant(src, dst: Path, lm_weight: np.ndarray, trim) -> Path:
    """``dst``: ``src`` with its draft LM head trimmed to ``trim.kept_ids``."""
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    draft_files = {f.path for f in src.graph("draft_lm_head").files}
    for f in src.root.iterdir():
        if f.is_file() and f.name not in draft_files and f.name != MANIFEST:
            os.link(f, dst / f.name)
    m, d = src.manifest, src.draft
    graph = build_draft_lm_head_graph(lm_weight, d.num_heads, d.topk, src.dtype, m.opset, m.spectrt_version,
                                      kept_ids=trim.kept_ids)
    draft = dataclasses.replace(d, vocab_trim=trim.info(), lm_head_rows=trim.size)
    write_manifest(dst, dataclasses.replace(
        m, graphs={**m.graphs, "draft_lm_head": save_graph(graph, dst, "draft_lm_head")}, draft=draft,
        validation=(), engines={}))
    return dst


def sweep(artifact_dir, vocab_file, sizes: list[int], records, max_new_tokens: int, out_dir, config=None,
          progress=print) -> list[dict]:
    src = load_artifact(artifact_dir)
    if src.draft is None:
        raise SpectrtError(f"{src.root}: no draft heads to trim")
    lm = _lm_weight(src)
    vocab, topk = src.model.vocab, src.draft.topk
    tok_hash = _artifact_tokenizer_hash(src)
    out_dir = Path(out_dir)
    rows = []
    for n in sizes:
        if n >= vocab:
            variant, rows_n, coverage = src.root, vocab, 1.0
            lm_bytes = lm.nbytes
        else:
            trim = load_vocab(vocab_file, vocab, tok_hash, topk, size=n)
            variant = make_variant(src, out_dir / f"vocab-{n}", lm, trim)
            rows_n, coverage = trim.size, trim.coverage
            lm_bytes = lm.nbytes * trim.size // vocab
        progress(f"N={rows_n}: benchmarking {variant}")
        report = run_bench(variant, records, max_new_tokens, config).to_json()
        spec, ar = report["modes"]["spec"], report["modes"]["ar"]
        rows.append({"N": rows_n, "coverage": round(coverage, 5), "lm_head_bytes": int(lm_bytes),
                     "draft_ms_per_step": spec["draft_ms_per_step"], "tau": spec["tau"],
                     "spec_tok_s": spec["tok_s"], "ar_tok_s": ar["tok_s"], "speedup": report["speedup"],
                     "mismatches": report["mismatches"]})
    return rows


def _artifact_tokenizer_hash(artifact) -> str:
    path = artifact.path(artifact.manifest.tokenizer.file)
    return tokenizer_hash(Tokenizer.from_file(str(path)).to_str())


def format_rows(rows: list[dict]) -> str:
    lines = [f"{'N':>7}{'coverage':>10}{'LM MB':>8}{'draft ms':>10}{'tau':>7}{'spec tok/s':>12}{'AR tok/s':>10}"
             f"{'speedup':>9}"]
    for r in rows:
        lines.append(f"{r['N']:>7}{r['coverage']:>10.4f}{r['lm_head_bytes'] / 2**20:>8.1f}"
                     f"{r['draft_ms_per_step']:>10.2f}{r['tau']:>7.2f}{r['spec_tok_s']:>12.2f}{r['ar_tok_s']:>10.2f}"
                     f"{r['speedup']:>8.2f}x")
    return "\n".join(lines)


def plot(rows: list[dict], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = [r["N"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(ns, [r["coverage"] for r in rows], "o-", color="tab:blue", label="coverage of calibration generations")
    ax.set_xscale("log")
    ax.set_xlabel("kept vocabulary N (log)")
    ax.set_ylabel("coverage", color="tab:blue")
    ax2 = ax.twinx()
    ax2.plot(ns, [r["tau"] for r in rows], "s--", color="tab:red", label="tau (tokens / verify step)")
    ax2.set_ylabel("tau", color="tab:red")
    ax2.set_ylim(1.0, max(r["tau"] for r in rows) * 1.15 + 0.05)  # from 1.0 (no drafts accepted): honest scale
    ax.set_title("VocabTrim: coverage and tau vs N")
    fig.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
