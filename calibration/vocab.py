"""VocabTrim calibration: which tokens does the target model actually generate?

Counts the tokens of the base model's own greedy continuations of calibration prompts (not the prompt
text), ranks them, and keeps the top N (or the smallest N reaching a coverage), plus every special token.
The draft LM head is then restricted to those rows; verification keeps the full vocabulary, so output is
unchanged.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from spectrt.runtime.errors import SpectrtError

VOCAB_FORMAT = "spectrt-vocabtrim/1"
DEFAULT_CALIBRATION_TOKENS = 128  # new tokens generated per calibration prompt
DEFAULT_COVERAGE = 0.95  # `calibrate vocab` without --size/--coverage


def tokenizer_hash(tokenizer_json: str) -> str:
    """Identity of a tokenizer: sha256 of its canonical tokenizer.json text."""
    return hashlib.sha256(tokenizer_json.encode()).hexdigest()[:16]


def hf_tokenizer_hash(tok) -> str:
    return tokenizer_hash(tok.backend_tokenizer.to_str())


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

    def manifest(self) -> dict:
        return {"size": self.size, "coverage": round(self.coverage, 5), "source": self.source,
                "vocab_size": self.vocab_size}


def write_vocab(path, kept, counts, coverage: float, vocab_size: int, tok_hash: str, source: str,
                specials) -> None:
    data = {"format": VOCAB_FORMAT, "vocab_size": vocab_size, "tokenizer": tok_hash, "size": len(kept),
            "coverage": coverage, "generated_tokens": int(counts.sum()), "source": source,
            "special_ids": list(specials), "kept_ids": kept, "counts": [int(counts[i]) for i in kept]}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data) + "\n")
    os.replace(tmp, path)


def load_vocab(path, vocab_size: int, tok_hash: str | None, topk: int, size: int | None = None) -> VocabTrim:
    """A vocab file checked against the base (vocabulary, tokenizer) and the draft top-k.

    ``size`` re-cuts a ranked file to its first N ids (plus the special ids it kept).
    """
    try:
        data = json.loads(Path(path).read_text())
        kept = np.asarray(data["kept_ids"], np.int64)
        file_vocab, file_tok = int(data["vocab_size"]), data.get("tokenizer")
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise SpectrtError(f"{path}: not a spectrt vocab file ({e})") from None
    if file_vocab != vocab_size:
        raise SpectrtError(f"{path}: made for a vocabulary of {file_vocab}, the base model has {vocab_size}")
    if tok_hash is not None and file_tok is not None and file_tok != tok_hash:
        raise SpectrtError(f"{path}: made for another tokenizer ({file_tok}, the base model's is {tok_hash})")
    if kept.size == 0 or kept.min() < 0 or kept.max() >= vocab_size:
        raise SpectrtError(f"{path}: token ids out of range 0..{vocab_size - 1}")
    if len(set(kept.tolist())) != kept.size:
        raise SpectrtError(f"{path}: duplicate token ids")
    if size is not None:
        counts = np.zeros(vocab_size, np.int64)
        counts[kept] = np.asarray(data.get("counts", [1] * kept.size))
        kept_list, _, _ = choose_kept(counts, data.get("special_ids", []), size=min(size, kept.size))
        kept = np.asarray(kept_list, np.int64)
    if kept.size < topk:
        raise SpectrtError(f"{path}: keeps {kept.size} tokens, fewer than the draft top-k {topk}")
    total = float(data.get("generated_tokens") or 0)
    full = dict(zip(data["kept_ids"], data.get("counts", [])))
    coverage = sum(full.get(int(i), 0) for i in kept) / total if total else float(data.get("coverage", 0))
    return VocabTrim(kept, vocab_size, file_tok or "", coverage, str(data.get("source", path)))


def default_vocab(model, tok, size: int, progress: bool = True) -> VocabTrim:
    """`export --vocab-size N`: calibrate on the bundled prompt set (cached), keep the top N."""
    from spectrt.calibration.generations import default_cache_dir, model_fingerprint
    from spectrt.calibration.prompts import DEFAULT_PROMPTS, load_prompts

    path = default_cache_dir() / f"vocab-{model_fingerprint(model)}-{DEFAULT_PROMPTS.stem}.json"
    if not path.is_file():
        calibrate_vocab(model, tok, load_prompts(DEFAULT_PROMPTS), path, size=model.config.vocab_size, progress=progress,
                        source=f"greedy continuations of {DEFAULT_PROMPTS.name}")
    return load_vocab(path, model.config.vocab_size, hf_tokenizer_hash(tok), topk=1, size=size)


def calibrate_vocab(model, tok, prompts: list[str], out_path, size: int | None = None, coverage: float | None = None,
                    max_new_tokens: int = DEFAULT_CALIBRATION_TOKENS, cache_path=None, batch_size: int = 16,
                    source: str = "", progress: bool = True) -> dict:
    """Generate (or reuse cached) greedy continuations, count, choose N, write ``out_path``; returns a summary."""
    from spectrt.calibration.generations import default_generations_path, generate_responses

    cache_path = cache_path or default_generations_path(model)
    pairs = generate_responses(model, tok, prompts, max_new_tokens, cache_path, batch_size, progress=progress)
    vocab = model.config.vocab_size
    counts = rank_tokens([r for _, r in pairs], vocab)
    specials = special_ids(tok)
    kept, n, cov = choose_kept(counts, specials, size, coverage)
    write_vocab(out_path, kept, counts, cov, vocab, hf_tokenizer_hash(tok), source, specials)
    return {"size": n, "coverage": cov, "generated_tokens": int(counts.sum()), "prompts": len(pairs),
            "distinct_generated": int((counts > 0).sum()), "out": str(out_path)}
