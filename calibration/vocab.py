"""VocabTrim calibration: which tokens does the target model actually generate?

Counts the tokens of the base model's own greedy continuations of calibration prompts (not the prompt
text), ranks them, and keeps the top N (or the smallest N reaching a coverage), plus every special token.
The draft LM head is then restricted to those rows; verification keeps the full vocabulary, so output is
unchanged.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from spectrt.calibration.generations import (DEFAULT_ANSWER_TOKENS, DEFAULT_GEN_BATCH, default_cache_dir,
                                             default_generations_path, generate_responses, model_fingerprint)
from spectrt.calibration.prompts import CALIBRATION_PROMPTS, load_prompts
from spectrt.export.vocabtrim import VOCAB_FORMAT, VocabTrim, choose_kept, hf_tokenizer_hash, load_vocab
from spectrt.runtime.artifact import atomic_write
from spectrt.runtime.errors import SpectrtError
DEFAULT_COVERAGE = 0.95  # `calibrate vocab` without --size/--coverage


def special_ids(tok) -> list[int]:
    """EOS/BOS/pad/unk and every added special token (chat-template markers such as <|im_start|>)."""
    ids = set(tok.all_special_ids)
    ids |= {i for i, t in tok.added_tokens_decoder.items() if t.special}
    return sorted(int(i) for i in ids if i is not None)


def rank_tokens(responses, vocab_size: int) -> np.ndarray:
    """Counts [vocab] of the generated tokens."""
    counts = np.zeros(vocab_size, np.int64)
    for ids in responses:
        ids = np.asarray(ids, np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
            raise SpectrtError(f"generated token id outside the vocabulary of {vocab_size}")
        counts += np.bincount(ids, minlength=vocab_size)
    return counts


def write_vocab(path, kept, counts, coverage: float, vocab_size: int, tok_hash: str, source: str,
                specials) -> None:
    data = {"format": VOCAB_FORMAT, "vocab_size": vocab_size, "tokenizer": tok_hash, "size": len(kept),
            "coverage": coverage, "generated_tokens": int(counts.sum()), "source": source,
            "special_ids": list(specials), "kept_ids": kept, "counts": [int(counts[i]) for i in kept]}
    atomic_write(Path(path), (json.dumps(data) + "\n").encode())


def default_vocab(model, tok, size: int, progress: bool = True) -> VocabTrim:
    """`export --vocab-size N` without --vocab: calibrate on the bundled calibration prompts (cached; never benchmark text), keep the top N."""
    path = default_cache_dir() / f"vocab-{model_fingerprint(model)}-{CALIBRATION_PROMPTS.stem}.json"
    if not path.is_file():
        calibrate_vocab(model, tok, load_prompts(CALIBRATION_PROMPTS), path, size=model.config.vocab_size,
                        progress=progress, source=f"greedy continuations of {CALIBRATION_PROMPTS.name}")
    return load_vocab(path, model.config.vocab_size, hf_tokenizer_hash(tok), topk=1, size=size)


def calibrate_vocab(model, tok, prompts: list[str], out_path, size: int | None = None, coverage: float | None = None,
                    max_new_tokens: int = DEFAULT_ANSWER_TOKENS, cache_path=None, batch_size: int = DEFAULT_GEN_BATCH,
                    source: str = "", progress: bool = True) -> dict:
    """Generate (or reuse cached) greedy continuations, count, choose N, write ``out_path``; returns a summary."""
    cache_path = cache_path or default_generations_path(model)
    pairs = generate_responses(model, tok, prompts, max_new_tokens, cache_path, batch_size, progress=progress)
    vocab = model.config.vocab_size
    counts = rank_tokens([r for _, r in pairs], vocab)
    specials = special_ids(tok)
    kept, n, cov = choose_kept(counts, specials, size, coverage)
    write_vocab(out_path, kept, counts, cov, vocab, hf_tokenizer_hash(tok), source, specials)
    return {"size": n, "coverage": cov, "generated_tokens": int(counts.sum()), "prompts": len(pairs),
            "distinct_generated": int((counts > 0).sum()), "out": str(out_path)}
