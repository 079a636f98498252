"""Quality of an export, alone or against a reference export (``spectrt quality``), torch-free.

- **perplexity** on held-out text: the text is tokenized (no chat template), cut into windows of
  ``window`` tokens, each window scored from an empty KV cache in one causal pass of ``base.onnx``
  (every token but a window's first is predicted); perplexity = exp(mean negative log-likelihood).
- **top-1 agreement** (teacher forced, same windows): share of positions where the export's argmax equals
  the reference's.
- **greedy agreement** (free running): the golden prompts decoded greedily ``new_tokens`` steps by both
  exports; per prompt the share of tokens before the first divergence, and how many prompts match fully.

The default held-out text is fixed sections of Python's own documentation (``pydoc_data.topics``, shipped
with every CPython): not Spec-Bench, not the calibration prompts, available offline. It changes between
Python versions, so compare exports in one run (the report records its sha256 and token count).
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from spectrt.runtime.artifact import load_artifact
from spectrt.runtime.errors import SpectrtError
from spectrt.runtime.golden import PROMPTS, greedy_trace
from spectrt.runtime.ort_runner import OrtBaseRunner

HELDOUT_SECTIONS = ("assignment", "if", "while", "for", "try", "with", "function", "class", "import", "lambda",
                    "booleans", "comparisons", "numbers", "strings", "typesseq", "typesmapping", "exceptions",
                    "execmodel", "naming", "truth")


def default_heldout_text() -> tuple[str, str]:
    """(text, description): fixed sections of Python's pydoc topics."""
    from pydoc_data.topics import topics

    keys = [k for k in HELDOUT_SECTIONS if k in topics]
    return "\n\n".join(topics[k] for k in keys), f"pydoc_data.topics[{','.join(keys)}]"


@dataclass
class ExportQuality:
    dir: str
    weights: str  # float32 | "int4 (block 32, matmulnbits)" ...
    base_bytes: int
    perplexity: float
    nll: float
    scored_tokens: int
    top1_agreement: float | None = None  # vs the reference, teacher forced
    greedy_prefix_agreement: float | None = None  # vs the reference, mean share before the first divergence
    greedy_identical_prompts: int | None = None


@dataclass
class QualityReport:
    text: str
    text_sha256: str
    text_tokens: int
    window: int
    new_tokens: int
    prompts: int
    exports: list = field(default_factory=list)

    def to_json(self) -> dict:
        return {**{k: v for k, v in asdict(self).items() if k != "exports"}, "exports": [asdict(e) for e in self.exports]}

    def format(self) -> str:
        lines = [f"held-out text: {self.text} ({self.text_tokens} tokens scored in windows of {self.window}; sha256 "
                 f"{self.text_sha256[:12]}); greedy agreement: {self.prompts} prompts x {self.new_tokens} tokens"]
        ref = self.exports[-1] if len(self.exports) > 1 else None
        for e in self.exports:
            row = f"  {e.dir}: {e.weights}, base {e.base_bytes / 1e6:.1f} MB, perplexity {e.perplexity:.3f}"
            if ref is not None and e is not ref:
                row += (f" ({100 * (e.perplexity / ref.perplexity - 1):+.2f} % vs reference), top-1 agreement "
                        f"{100 * e.top1_agreement:.1f} %, greedy {100 * e.greedy_prefix_agreement:.1f} % of tokens "
                        f"before the first divergence, {e.greedy_identical_prompts}/{self.prompts} prompts identical")
            elif ref is not None:
                row += "  (reference)"
            lines.append(row)
        return "\n".join(lines)


def _score(art, ids: np.ndarray, window: int, threads: int | None) -> tuple[float, int, np.ndarray]:
    """(sum of NLL, scored tokens, argmax per scored position) over windows of ``ids``."""
    nll, n, top1 = 0.0, 0, []
    with OrtBaseRunner(art, max_q=window, threads=threads) as run:
        for s in range(0, len(ids) - 1, window):
            chunk = ids[s:s + window]
            c = len(chunk)
            if c < 2:
                break
            run.reset()
            logits = run.forward(chunk, np.arange(c), np.tri(c, dtype=np.bool_)).logits[:c - 1].astype(np.float64)
            mx = logits.max(-1, keepdims=True)
            lse = (mx[:, 0] + np.log(np.exp(logits - mx).sum(-1)))
            nll += float((lse - logits[np.arange(c - 1), chunk[1:]]).sum())
            n += c - 1
            top1.append(logits.argmax(-1))
    return nll, n, np.concatenate(top1)


def _greedy(art, prompt_ids: list[list[int]], new_tokens: int, threads: int | None) -> list[list[int]]:
    eos = art.manifest.tokenizer.eos_token_ids
    with OrtBaseRunner(art, max_q=max(len(p) for p in prompt_ids), threads=threads) as run:
        return [greedy_trace(run, p, new_tokens, eos)[0] for p in prompt_ids]


def _label(art) -> str:
    w = art.manifest.weights
    return art.dtype if w is None else w.label()


def evaluate(dirs: list[str], reference: str | None = None, text: str | None = None, max_tokens: int = 2048,
             window: int = 256, new_tokens: int = 32, threads: int | None = None, progress=print) -> QualityReport:
    """Perplexity of each export in ``dirs`` (and of ``reference``), and their agreement with ``reference``."""
    if window < 2 or max_tokens < 2 or new_tokens < 1:
        raise SpectrtError("window and tokens must be at least 2, new tokens at least 1")
    arts = [load_artifact(d) for d in dirs] + ([load_artifact(reference)] if reference else [])
    if text is None:
        body, what = default_heldout_text()
    else:
        try:
            body, what = Path(text).read_text(), text
        except (OSError, UnicodeDecodeError) as e:
            raise SpectrtError(f"{text}: cannot read the held-out text ({e})") from None
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(arts[0].path(arts[0].manifest.tokenizer.file)))
    ids = np.array(tok.encode(body, add_special_tokens=False).ids[:max_tokens], np.int64)
    if len(ids) < 2:
        raise SpectrtError(f"{what}: fewer than 2 tokens of held-out text")
    vocab = {a.model.vocab for a in arts}
    if len(vocab) > 1:
        raise SpectrtError(f"the exports have different vocabularies ({sorted(vocab)}); compare exports of one model")
    window = min(window, min(a.max_context for a in arts))
    prompt_ids = [tok.encode(p, add_special_tokens=False).ids for p in PROMPTS]
    report = QualityReport(what, hashlib.sha256(body.encode()).hexdigest(), int(len(ids)), window, new_tokens,
                           len(PROMPTS))
    scored = []
    for a in arts:
        progress(f"scoring {a.root} ({_label(a)})")
        nll, n, top1 = _score(a, ids, window, threads)
        greedy = _greedy(a, prompt_ids, new_tokens, threads) if reference else None
        scored.append((top1, greedy))
        report.exports.append(ExportQuality(str(a.root), _label(a), a.graph("base").bytes, math.exp(nll / n),
                                            nll / n, n))
    if reference:
        ref_top1, ref_greedy = scored[-1]
        for e, (top1, greedy) in zip(report.exports[:-1], scored[:-1]):
            e.top1_agreement = float((top1 == ref_top1).mean())
            prefix = []
            for g, r in zip(greedy, ref_greedy):
                k = next((i for i, (x, y) in enumerate(zip(g, r)) if x != y), min(len(g), len(r)))
                prefix.append(k / max(len(r), 1) if len(g) != len(r) or k < len(r) else 1.0)
            e.greedy_prefix_agreement = float(np.mean(prefix))
            e.greedy_identical_prompts = int(sum(g == r for g, r in zip(greedy, ref_greedy)))
    return report


def write_report(report: QualityReport, path: str) -> None:
    Path(path).write_text(json.dumps(report.to_json(), indent=2) + "\n")


__all__ = ["ExportQuality", "QualityReport", "default_heldout_text", "evaluate", "write_report"]
