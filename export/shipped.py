"""What the repo ships for built-in models: distilled heads (``spectrt/data/heads/<model>-<kind>``),
VocabTrim rankings (``spectrt/data/vocab``) and corpus n-gram tables (``spectrt/data/corpus/<model>.npz``)."""
from __future__ import annotations

from pathlib import Path

import spectrt

DATA = Path(spectrt.__file__).parent / "data"

SHIPPED_KINDS = ("medusa", "hydra")  # spectrt/data/heads/<model>-<kind>, preferred in this order


def shipped_heads(builtin: str | None, kind: str | None = None) -> Path | None:
    """Heads shipped in the repo for a built-in model (``spectrt/data/heads/<name>-<kind>``), if any.

    Without ``kind`` the first shipped of SHIPPED_KINDS is the built-in model's default.
    """
    if builtin is None:
        return None
    root = DATA / "heads"
    for k in (kind,) if kind else SHIPPED_KINDS:
        path = root / f"{builtin}-{k}"
        if (path / "config.json").is_file():
            return path
    return None


# Built-in models' default VocabTrim: (bundled ranking in spectrt/data/vocab, kept N). SmolLM2: N = 2000
# kept the draft stage 7x faster (12.5 -> 1.8 ms per step) with no tau loss in the measured sweep.
BUILTIN_VOCAB = {"smollm2-135m": ("smollm2-135m.json", 2000)}


def builtin_vocab(builtin: str | None) -> tuple[str, int] | None:
    if builtin not in BUILTIN_VOCAB:
        return None
    name, size = BUILTIN_VOCAB[builtin]
    return str(DATA / "vocab" / name), size


def builtin_corpus(builtin: str | None) -> Path | None:
    """The n-gram table shipped for a built-in model (``spectrt calibrate corpus``; runtime.corpus), if any."""
    path = DATA / "corpus" / f"{builtin}.npz"
    return path if builtin is not None and path.is_file() else None
