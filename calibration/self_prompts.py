"""Prompts written by the base model itself (Magpie, Xu et al. 2024): the chat template up to the start of a
user turn, then sampling. An instruction-tuned model continues it with a user's request of the kind it was
tuned on, so the requests cover what users of the chat model ask (writing, advice, explanations, code)
without any outside text.

Training data for draft heads: the heads learn from the base's greedy answers to these prompts, beside
whatever prompt file a user has (`spectrt distill --prompts A.jsonl --prompts SELF.jsonl`). The file is
JSONL, one ``{"prompt": ...}`` per line, the format every calibration command reads.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from spectrt.runtime.artifact import atomic_write
from spectrt.runtime.errors import SpectrtError

_SENTINEL = "\x00spectrt-user-turn\x00"


@dataclass
class SelfPromptConfig:
    """How `spectrt calibrate prompts` samples; every default lives here."""

    count: int = 1000  # prompts to keep
    seed: int = 0
    temperature: float = 1.0  # Magpie samples at 1.0, no top-p: diversity is the point
    max_new_tokens: int = 64  # a request still open after this many tokens is dropped
    min_chars: int = 16  # shorter requests ("Hi!") teach little
    batch_size: int = 32
    max_rounds_factor: int = 4  # give up after sampling this many times ``count``

    def validate(self) -> None:
        for name in ("count", "max_new_tokens", "batch_size", "max_rounds_factor"):
            if getattr(self, name) < 1:
                raise SpectrtError(f"{name.replace('_', '-')} must be at least 1, not {getattr(self, name)}")
        if not self.temperature > 0:
            raise SpectrtError(f"temperature must be positive, not {self.temperature}")
        if self.min_chars < 0:
            raise SpectrtError(f"min-chars must be non-negative, not {self.min_chars}")


def user_turn_prefix(tok) -> tuple[list[int], list[int]]:
    """(token ids of the chat template up to where a user's message starts, the token ids that end a turn).

    Rendered with a sentinel message and cut at it, so the system prompt the template adds by itself stays
    in. A tokenizer without a chat template, or whose template does not show the user's text, is an error."""
    template = getattr(tok, "chat_template", None)
    if not template:
        raise SpectrtError("the model's tokenizer has no chat template: self-written prompts need an "
                           "instruction-tuned (chat) model")
    text = tok.apply_chat_template([{"role": "user", "content": _SENTINEL}], tokenize=False)
    cut = text.find(_SENTINEL)
    if cut < 0:
        raise SpectrtError("the chat template does not render the user's message; cannot find where a user turn starts")
    prefix = tok(text[:cut], add_special_tokens=False)["input_ids"]
    # the tokens right after the user's text close the turn (e.g. "<|im_end|>"); the first special one does
    tail = tok(text[cut + len(_SENTINEL):], add_special_tokens=False)["input_ids"]
    special = set(getattr(tok, "all_special_ids", []) or [])
    stops = [t for t in tail if t in special][:1]
    if tok.eos_token_id is not None:
        stops.append(int(tok.eos_token_id))
    if not prefix or not stops:
        raise SpectrtError("the chat template has no special token that ends a user turn")
    return list(prefix), sorted(set(int(t) for t in stops))


def clean(text: str, min_chars: int) -> str | None:
    """The request as kept, or None: stripped; too short, or with template markup left in, is dropped."""
    text = text.strip()
    if len(text) < min_chars or "<|" in text:
        return None
    return text


def self_prompts(model, tok, cfg: SelfPromptConfig | None = None, exclude=(), progress: bool = True) -> list[str]:
    """``cfg.count`` distinct user requests sampled from ``model`` after its chat template's user-turn prefix.

    Seeded: batch ``b`` samples with ``torch.manual_seed(cfg.seed + b)``, so a run is reproducible on the same
    torch build. Requests that never end their turn within ``cfg.max_new_tokens``, that repeat an earlier
    one, or that are in ``exclude`` (texts) are dropped; after ``cfg.max_rounds_factor * cfg.count`` samples
    without enough kept, a SpectrtError says how many were."""
    import torch
    from tqdm.auto import tqdm

    cfg = cfg or SelfPromptConfig()
    cfg.validate()
    prefix, stops = user_turn_prefix(tok)
    pad = tok.pad_token_id if tok.pad_token_id is not None else stops[0]
    device = next(model.parameters()).device
    ids = torch.tensor([prefix], dtype=torch.long, device=device)
    seen = set(exclude)
    kept: list[str] = []
    sampled = 0
    bar = tqdm(total=cfg.count, desc="self-written prompts", unit="prompt", disable=not progress)
    try:
        batch = 0
        while len(kept) < cfg.count:
            if sampled >= cfg.max_rounds_factor * cfg.count:
                raise SpectrtError(f"kept {len(kept)} of {sampled} sampled requests (the rest unfinished within "
                                   f"{cfg.max_new_tokens} tokens, shorter than {cfg.min_chars} characters or "
                                   f"repeated); try a larger --max-new-tokens or a smaller --count")
            n = cfg.batch_size
            torch.manual_seed(cfg.seed + batch)
            with torch.inference_mode():
                out = model.generate(ids.expand(n, -1), attention_mask=torch.ones_like(ids).expand(n, -1),
                                     do_sample=True, temperature=cfg.temperature, top_p=1.0, top_k=0,
                                     max_new_tokens=cfg.max_new_tokens, eos_token_id=stops, pad_token_id=pad)
            batch += 1
            sampled += n
            for row in out[:, len(prefix):].tolist():
                ends = [i for i, t in enumerate(row) if t in stops]
                if not ends:
                    continue  # still writing when the budget ran out
                text = clean(tok.decode(row[:ends[0]], skip_special_tokens=True), cfg.min_chars)
                if text is None or text in seen or len(kept) >= cfg.count:
                    continue
                seen.add(text)
                kept.append(text)
                bar.update(1)
    finally:
        bar.close()
    return kept


def check_output(path: str | os.PathLike) -> Path:
    """``path`` for ``write_prompts``, its directory checked (before minutes of sampling)."""
    path = Path(path)
    if not path.parent.is_dir():
        raise SpectrtError(f"{path.parent}: no such directory")
    return path


def write_prompts(path: str | os.PathLike, prompts: list[str]) -> Path:
    """``prompts`` as JSONL ``{"prompt": ...}`` lines, written atomically."""
    path = check_output(path)
    atomic_write(path, "".join(json.dumps({"prompt": p}, ensure_ascii=False) + "\n" for p in prompts).encode())
    return path
