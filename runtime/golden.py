"""The golden file: greedy token ids an export must reproduce on a device (``spectrt selftest``).

``spectrt export`` runs a few fixed prompts greedily on the host and writes ``golden.json`` (listed in the
manifest with its sha256): per *run* (the export's own graphs on ONNX Runtime CPU, and the torch model in
fp32), the token ids and, per token, the top-1 minus top-2 logit *margin*. On the device, selftest decodes
the same prompt ids and compares: a divergence where the reference's margin is tiny is a near-tie (fp16
kernels may pick the other token; reported, not a failure); a divergence at a clear margin is a bug.

Everything here is torch-free; the torch run is made by ``spectrt.export.golden``.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from spectrt.runtime.artifact import Artifact, Invalid, atomic_write, decode_json, encode_json
from spectrt.runtime.errors import ArtifactError
from spectrt.runtime.protocols import BaseRunner

GOLDEN = "golden.json"
GOLDEN_FORMAT = 1
REFERENCE_RUN = "onnxruntime-cpu"  # the export's own graphs: what every backend must reproduce
TORCH_RUN = "torch-float32"  # the Hugging Face model the export was made from (for the record)
# Raw prompts (no chat template: the file must not depend on one), short enough for any max_context.
PROMPTS = ("The capital of France is", "def fibonacci(n):\n", "Speculative decoding speeds up", "1, 2, 3, 4, 5,")
NEW_TOKENS = 24
# A divergence is a near-tie when the reference's top-1/top-2 logit margin there is below this (per
# engine dtype): fp16 accumulations move logits by ~1e-2 on a 100-layer model, fp32 by ~1e-4.
TIE_MARGIN = {"float32": 0.02, "float16": 0.25}


@dataclass(frozen=True)
class GoldenRun:
    tokens: tuple[tuple[int, ...], ...]  # per prompt: the greedy ids (EOS included, then stop)
    margins: tuple[tuple[float, ...], ...]  # per prompt, per token: top-1 minus top-2 logit

    def _validate(self) -> None:
        if len(self.tokens) != len(self.margins) or any(len(t) != len(m) for t, m in zip(self.tokens, self.margins)):
            raise Invalid("margins: one margin per token expected")


@dataclass(frozen=True)
class Golden:
    prompts: tuple[str, ...]
    prompt_ids: tuple[tuple[int, ...], ...]
    max_new_tokens: int
    runs: dict[str, GoldenRun]
    format: int = GOLDEN_FORMAT

    def _validate(self) -> None:
        if self.format != GOLDEN_FORMAT:
            raise Invalid(f"format: golden format {self.format}, this spectrt reads {GOLDEN_FORMAT}")
        if len(self.prompts) != len(self.prompt_ids) or not self.prompts:
            raise Invalid("prompt_ids: one id list per prompt expected")
        if REFERENCE_RUN not in self.runs:
            raise Invalid(f"runs: no '{REFERENCE_RUN}' run")
        for name, run in self.runs.items():
            if len(run.tokens) != len(self.prompts):
                raise Invalid(f"runs.{name}.tokens: {len(run.tokens)} lists for {len(self.prompts)} prompts")

    @property
    def reference(self) -> GoldenRun:
        return self.runs[REFERENCE_RUN]


def load_golden(art: Artifact) -> Golden:
    rec = art.manifest.golden
    if rec is None:
        raise ArtifactError(f"{art.root}: no golden file (exported by an older spectrt); re-export to get one")
    path = art.root / rec.path
    try:
        return decode_json(Golden, json.loads(path.read_text()))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{path}: cannot read the golden file ({e.__class__.__name__}: {e})") from None
    except Invalid as e:
        raise ArtifactError(f"{path}: {e}") from None


def write_golden(root: str | os.PathLike, golden: Golden) -> str:
    """Write ``root/golden.json`` atomically; returns its path relative to ``root``."""
    atomic_write(Path(root) / GOLDEN, (json.dumps(encode_json(golden)) + "\n").encode())
    return GOLDEN


def margin(logits: np.ndarray) -> float:
    """Top-1 minus top-2 of one logit row (``[V]``)."""
    top2 = np.partition(np.asarray(logits, np.float64), -2)[-2:]
    return float(top2[1] - top2[0])


def greedy_trace(base: BaseRunner, prompt_ids, max_new_tokens: int, eos_ids=()) -> tuple[list[int], list[float]]:
    """Autoregressive greedy ids and their logit margins on a runner that returns logits; stops after an
    EOS token, at ``max_new_tokens`` or at the context limit (the stops ``Decoder.generate`` makes)."""
    prompt = np.asarray(prompt_ids, np.int64)
    eos, limit = frozenset(int(e) for e in eos_ids), base.max_context
    base.reset()
    for s in range(0, len(prompt), base.max_q):
        chunk = prompt[s:s + base.max_q]
        c = len(chunk)
        out = base.forward(chunk, np.arange(s, s + c), np.tri(c, dtype=np.bool_))  # [c, V] logits
        base.commit(range(c))
    if out.logits is None:
        raise ArtifactError("greedy_trace needs a runner that returns logits")
    tokens, margins = [int(out.greedy_ids[c - 1])], [margin(out.logits[c - 1])]
    while not (tokens[-1] in eos or len(tokens) >= max_new_tokens or len(prompt) + len(tokens) >= limit):
        out = base.forward(np.array([tokens[-1]], np.int64), np.array([base.past]), np.ones((1, 1), np.bool_))
        base.commit([0])
        tokens.append(int(out.greedy_ids[0]))
        margins.append(margin(out.logits[0]))
    return tokens, margins


@dataclass(frozen=True)
class Divergence:
    """Where ``got`` first differs from a run of the golden file, summed over the prompts."""

    matched: int  # tokens equal before the first divergence, over all prompts
    total: int  # reference tokens, over all prompts
    first: tuple[tuple[int, int, float], ...]  # (prompt, token index, reference margin) per diverging prompt
    clear: tuple[tuple[int, int, float], ...]  # those whose margin is at least the near-tie threshold

    @property
    def agreement(self) -> float:
        return self.matched / self.total if self.total else 1.0

    def to_json(self) -> dict:
        return {"agreement": round(self.agreement, 4), "matched_tokens": self.matched, "tokens": self.total,
                "divergences": [{"prompt": p, "token": i, "margin": round(m, 4) if m != float("inf") else None}
                                for p, i, m in self.first],
                "clear_divergences": len(self.clear)}


def compare(got: list[list[int]], run: GoldenRun, tie_margin: float) -> Divergence:
    matched = total = 0
    first, clear = [], []
    for p, (mine, ref) in enumerate(zip(got, run.tokens)):
        total += len(ref)
        n = next((i for i, (a, b) in enumerate(zip(mine, ref)) if a != b), min(len(mine), len(ref)))
        matched += n
        if n < max(len(mine), len(ref)):
            m = run.margins[p][n] if n < len(ref) else float("inf")  # the reference stopped: an EOS was missed
            first.append((p, n, m))
            if m >= tie_margin:
                clear.append((p, n, m))
    return Divergence(matched, total, tuple(first), tuple(clear))


__all__ = ["GOLDEN", "Golden", "GoldenRun", "Divergence", "NEW_TOKENS", "PROMPTS", "REFERENCE_RUN", "TIE_MARGIN",
           "TORCH_RUN", "compare", "greedy_trace", "load_golden", "margin", "write_golden"]
