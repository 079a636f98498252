"""The golden file of an export (``runtime.golden``): greedy ids of fixed prompts from the export's own
graphs on ONNX Runtime CPU (the reference a device must reproduce) and from the torch model in fp32."""
from __future__ import annotations

import numpy as np
import torch

from spectrt.runtime.artifact import Artifact
from spectrt.runtime.golden import (NEW_TOKENS, PROMPTS, REFERENCE_RUN, TORCH_RUN, Golden, GoldenRun, greedy_trace,
                                    margin)
from spectrt.runtime.ort_runner import OrtBaseRunner


def torch_trace(model, prompt_ids: list[int], max_new_tokens: int, eos_ids, limit: int) -> tuple[list[int], list[float]]:
    """``greedy_trace`` on the Hugging Face model in fp32: same stops, first maximum on ties. Each step
    re-runs the whole (short) sequence: no dependence on transformers' KV-cache API, which keeps changing."""
    eos = frozenset(int(e) for e in eos_ids)
    seq, tokens, margins = list(prompt_ids), [], []
    with torch.no_grad():
        while True:
            logits = model(torch.tensor([seq])).logits[0, -1].float().numpy()
            tokens.append(int(np.argmax(logits)))
            margins.append(margin(logits))
            seq.append(tokens[-1])
            if tokens[-1] in eos or len(tokens) >= max_new_tokens or len(prompt_ids) + len(tokens) >= limit:
                return tokens, margins


def make_golden(art: Artifact, model, tok, prompts=PROMPTS, max_new_tokens: int = NEW_TOKENS) -> Golden:
    """Both runs for ``prompts`` (raw text, no chat template) on the export in ``art``."""
    eos = art.manifest.tokenizer.eos_token_ids
    limit = art.max_context
    ids = [list(tok(p, add_special_tokens=False)["input_ids"])[:max(1, limit - 2)] for p in prompts]
    ort_tokens, ort_margins, pt_tokens, pt_margins = [], [], [], []
    with OrtBaseRunner(art, max_q=max(len(i) for i in ids)) as base:
        for p in ids:
            t, m = greedy_trace(base, p, max_new_tokens, eos)
            ort_tokens.append(tuple(t))
            ort_margins.append(tuple(m))
    for p in ids:
        t, m = torch_trace(model, p, max_new_tokens, eos, limit)
        pt_tokens.append(tuple(t))
        pt_margins.append(tuple(m))
    return Golden(prompts=tuple(prompts), prompt_ids=tuple(tuple(i) for i in ids), max_new_tokens=max_new_tokens,
                  runs={REFERENCE_RUN: GoldenRun(tuple(ort_tokens), tuple(ort_margins)),
                        TORCH_RUN: GoldenRun(tuple(pt_tokens), tuple(pt_margins))})


__all__ = ["make_golden", "torch_trace"]
