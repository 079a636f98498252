"""VocabTrim files: ranked token ids of what the target model generates (written by `spectrt calibrate
vocab`), read and checked here when an export trims its draft LM head to the top N rows."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from spectrt.runtime.artifact import VocabTrimInfo
from spectrt.runtime.errors import SpectrtError

VOCAB_FORMAT = "spectrt-vocabtrim/1"


def tokenizer_hash(tokenizer_json: str) -> str:
    """Identity of a tokenizer: sha256 of its canonical tokenizer.json text."""
    return hashlib.sha256(tokenizer_json.encode()).hexdigest()[:16]


def hf_tokenizer_hash(tok) -> str:
    return tokenizer_hash(tok.backend_tokenizer.to_str())


def choose_kept(counts: np.ndarray, specials, size: int | None = None, coverage: float | None = None):
    """(kept ids in rank order, N, achieved coverage). Exactly one of ``size`` / ``coverage``."""
    if (size is None) == (coverage is None):
        raise SpectrtError("give exactly one of --size N or --coverage C")
    vocab = len(counts)
    order = np.lexsort((np.arange(vocab), -counts))  # by count desc, then id
    total = int(counts.sum())
    if total == 0:
        raise SpectrtError("the calibration generated no tokens")
    if coverage is not None:
        if not 0 < coverage <= 1:
            raise SpectrtError(f"coverage must be in (0, 1], not {coverage}")
        cum = np.cumsum(counts[order]) / total
        size = int(np.searchsorted(cum, coverage - 1e-12) + 1)
    if not 1 <= size <= vocab:
        raise SpectrtError(f"vocab size {size} outside 1..{vocab}")
    kept = list(order[:size])
    missing = [s for s in specials if s not in set(kept)]
    kept = [int(i) for i in kept + missing]
    return kept, len(kept), float(counts[kept].sum() / total)


@dataclass
class VocabTrim:
    kept_ids: np.ndarray  # [N] int64, rank order
    vocab_size: int
    tokenizer: str  # tokenizer hash
    coverage: float
    source: str

    @property
    def size(self) -> int:
        return len(self.kept_ids)

    def info(self) -> VocabTrimInfo:
        return VocabTrimInfo(self.size, round(self.coverage, 5), self.source, self.vocab_size)


def load_vocab(path, vocab_size: int, tok_hash: str | None, topk: int, size: int | None = None) -> VocabTrim:
    """A vocab file checked against the base (vocabulary, tokenizer) and the draft top-k.

    ``size`` re-cuts a ranked file to its first N ids (plus the special ids it kept).
    """
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SpectrtError(f"{path}: not a spectrt vocab file ({e.__class__.__name__}: {e})") from None
    if not isinstance(data, dict) or data.get("format") != VOCAB_FORMAT:
        raise SpectrtError(f"{path}: not a spectrt vocab file (no \"format\": \"{VOCAB_FORMAT}\"; make one with "
                           "`spectrt calibrate vocab`)")
    ids, file_vocab, file_tok = data.get("kept_ids"), data.get("vocab_size"), data.get("tokenizer")
    if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise SpectrtError(f"{path}: kept_ids must be a list of token ids")
    if not isinstance(file_vocab, int) or isinstance(file_vocab, bool):
        raise SpectrtError(f"{path}: vocab_size must be an integer")
    kept = np.asarray(ids, np.int64)
    if file_vocab != vocab_size:
        raise SpectrtError(f"{path}: made for a vocabulary of {file_vocab}, the base model has {vocab_size}")
    if tok_hash is not None and file_tok is not None and file_tok != tok_hash:
        raise SpectrtError(f"{path}: made for another tokenizer ({file_tok}, the base model's is {tok_hash})")
    if kept.size == 0 or kept.min() < 0 or kept.max() >= vocab_size:
        raise SpectrtError(f"{path}: token ids out of range 0..{vocab_size - 1}")
    if len(set(kept.tolist())) != kept.size:
        raise SpectrtError(f"{path}: duplicate token ids")
    counts_list = data.get("counts", [1] * len(ids))
    if not isinstance(counts_list, list) or len(counts_list) != len(ids) or not all(
            isinstance(c, int) and c >= 0 for c in counts_list):
        raise SpectrtError(f"{path}: counts must be one non-negative integer per kept id")
    if size is not None:
        counts = np.zeros(vocab_size, np.int64)
        counts[kept] = np.asarray(counts_list)
        kept_list, _, _ = choose_kept(counts, data.get("special_ids", []), size=min(size, kept.size))
        kept = np.asarray(kept_list, np.int64)
    if kept.size < topk:
        raise SpectrtError(f"{path}: keeps {kept.size} tokens, fewer than the draft top-k {topk}")
    total = float(data.get("generated_tokens") or 0)
    full = dict(zip(ids, counts_list))
    coverage = sum(full.get(int(i), 0) for i in kept) / total if total else float(data.get("coverage", 0))
    return VocabTrim(kept, vocab_size, file_tok or "", coverage, str(data.get("source", path)))
