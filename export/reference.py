"""transformers' own greedy generate, as the reference that spectrt's runtime must match and beat."""
from __future__ import annotations

import time

import torch

from spectrt.export.sources import load_hf


class HFGreedy:
    """Greedy generation with transformers on the model an artifact was exported from."""

    def __init__(self, model_spec: str, threads: int | None = None):
        if threads:
            torch.set_num_threads(threads)
        self.model, _ = load_hf(model_spec, progress=lambda *_: None)

    def __call__(self, ids: list[int], max_new_tokens: int) -> tuple[list[int], float]:
        """(new tokens, decode seconds): the time of n tokens minus the time of the first (prefill) one."""
        x = torch.tensor([ids])
        eos = self.model.generation_config.eos_token_id
        kw = dict(do_sample=False, pad_token_id=eos if isinstance(eos, int) else None)
        with torch.no_grad():
            t0 = time.perf_counter()
            self.model.generate(x, max_new_tokens=1, **kw)
            t1 = time.perf_counter()
            out = self.model.generate(x, max_new_tokens=max_new_tokens, **kw)
            t2 = time.perf_counter()
        return out[0, len(ids):].tolist(), (t2 - t1) - (t1 - t0)
