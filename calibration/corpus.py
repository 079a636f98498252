"""Corpus drafting's table: the base model's own greedy answers to calibration prompts, counted into an
n-gram table (``runtime.corpus.NgramTable``) that `spectrt export --corpus` ships with an export.

The answers come from the generation cache shared with distillation and VocabTrim
(``calibration.generations``), so a table over prompts already answered costs no generation. Never
build one from benchmark text: the table would hold the answers being measured.
"""
from __future__ import annotations

from spectrt.calibration.generations import (DEFAULT_ANSWER_TOKENS, DEFAULT_GEN_BATCH, default_generations_path,
                                             generate_responses)
from spectrt.runtime.corpus import DEFAULT_MIN_TOTAL, DEFAULT_ORDERS, NgramTable


def calibrate_corpus(model, tok, prompts: list[str], out_path, orders: int = DEFAULT_ORDERS,
                     min_total: int = DEFAULT_MIN_TOTAL, max_new_tokens: int = DEFAULT_ANSWER_TOKENS,
                     cache_path=None, batch_size: int = DEFAULT_GEN_BATCH, source: str = "", progress: bool = True) -> NgramTable:
    """Generate (or reuse cached) greedy answers to ``prompts``, count them, write the table to ``out_path``."""
    cache_path = cache_path or default_generations_path(model)
    pairs = generate_responses(model, tok, prompts, max_new_tokens, cache_path, batch_size, progress=progress)
    table = NgramTable.from_sequences([r for _, r in pairs], model.config.vocab_size, orders, min_total, source)
    table.save(out_path)
    return table
