"""Calibration prompts from JSONL: ``{"prompt": ...}`` records or Spec-Bench ``{"turns": [...]}`` (first turn).

Shared by self-distillation (``spectrt distill``) and VocabTrim calibration (``spectrt calibrate vocab``).
"""
from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import spectrt
from spectrt.runtime.errors import SpectrtError


_EXPECTED = "expected one JSON object per line with a 'prompt' string or a Spec-Bench 'turns' list of strings"


def _json_type(value) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number",
            type(None): "null"}.get(type(value), type(value).__name__)


def _prompt_of(record, path: Path, lineno: int) -> tuple[str | None, str]:
    """(category, prompt) of one parsed JSONL line, or a ``FILE:LINE: ...`` SpectrtError."""
    if not isinstance(record, dict):
        raise SpectrtError(f"{path}:{lineno}: got a JSON {_json_type(record)}; {_EXPECTED}")
    if "prompt" in record:
        prompt = record["prompt"]
        field = "prompt"
    elif "turns" in record:
        turns = record["turns"]
        if not isinstance(turns, list) or not turns:
            raise SpectrtError(f"{path}:{lineno}: 'turns' must be a non-empty list of strings, "
                               f"got {'an empty array' if turns == [] else 'a JSON ' + _json_type(turns)}")
        for i, turn in enumerate(turns):
            if not isinstance(turn, str):
                raise SpectrtError(f"{path}:{lineno}: 'turns' must be a non-empty list of strings, "
                                   f"turns[{i}] is a JSON {_json_type(turn)}")
        prompt = turns[0]
        field = "turns[0]"
    else:
        keys = ", ".join(sorted(record)) or "none"
        raise SpectrtError(f"{path}:{lineno}: no 'prompt' or 'turns' field (fields: {keys})")
    if not isinstance(prompt, str):
        raise SpectrtError(f"{path}:{lineno}: '{field}' must be a string, got a JSON {_json_type(prompt)}")
    if not prompt.strip():
        raise SpectrtError(f"{path}:{lineno}: empty '{field}'")
    category = record.get("category")
    if category is not None and not isinstance(category, str):
        raise SpectrtError(f"{path}:{lineno}: 'category' must be a string, got a JSON {_json_type(category)}")
    return category, prompt


def load_prompts(path: str | os.PathLike, limit: int | None = None) -> list[str]:
    """The prompts of a JSONL file, in file order; at most ``limit`` of them. Blank lines are skipped."""
    return [prompt for _, prompt in load_prompt_records(path, limit)]


def exclude_prompts(prompts: list[str], paths) -> tuple[list[str], int]:
    """``prompts`` without those in any of the prompts files ``paths`` (exact text), and how many went."""
    excluded = {p for path in paths for p in load_prompts(path)}
    kept = [p for p in prompts if p not in excluded]
    return kept, len(prompts) - len(kept)


def select_prompts(paths: str | os.PathLike | Sequence[str | os.PathLike], limit: int | None = None, exclude=(),
                   minimum: int = 1) -> tuple[list[str], str]:
    """The first ``limit`` prompts of the file ``paths`` (or of several files, one after the other) less those
    found in the ``exclude`` files (e.g. the calibration prompts `calibrate tree` measures on, kept out of what
    heads and tables are made from), and a line saying what went ("" when ``exclude`` is empty). Fewer than
    ``minimum`` left is a SpectrtError."""
    if limit is not None and limit < 1:
        raise SpectrtError(f"prompt limit must be at least 1, not {limit}")
    files = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    texts = [p for path in files for p in load_prompts(path)][:limit]
    if not exclude:
        return texts, ""
    texts, dropped = exclude_prompts(texts, exclude)
    if len(texts) < minimum:
        raise SpectrtError(f"{len(texts)} prompts left after --exclude; need at least {minimum}")
    return texts, f"excluded {dropped} prompts found in {', '.join(map(str, exclude))}"


def load_prompt_records(path: str | os.PathLike, limit: int | None = None) -> list[tuple[str | None, str]]:
    """(category, prompt) pairs; category is the record's ``category`` field (Spec-Bench) or None."""
    path = Path(path).expanduser()
    if limit is not None and limit < 1:
        raise SpectrtError(f"prompt limit must be at least 1, not {limit}")
    if not path.is_file():
        raise SpectrtError(f"{path}: no such prompts file" if not path.exists() else f"{path}: not a file")
    prompts: list[tuple[str | None, str]] = []
    try:
        with path.open(encoding="utf-8-sig") as f:  # tolerate a BOM
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise SpectrtError(f"{path}:{lineno}: not valid JSON ({e.msg}); expected JSONL with a "
                                       "'prompt' or 'turns' field per line") from None
                prompts.append(_prompt_of(record, path, lineno))
                if limit is not None and len(prompts) >= limit:
                    break
    except UnicodeDecodeError:
        raise SpectrtError(f"{path}: not UTF-8 text") from None
    except OSError as e:
        raise SpectrtError(f"{path}: cannot read ({e.strerror or e})") from None
    if not prompts:
        raise SpectrtError(f"{path}: no prompts (the file is empty or blank; {_EXPECTED})")
    return prompts


# The benchmark prompts bundled with spectrt (39 Spec-Bench questions, Apache-2.0; see
# spectrt/data/prompts/README.md): the default of `spectrt bench`, so it works on a fresh clone. Never calibrate
# or train on them.
DEFAULT_PROMPTS = Path(spectrt.__file__).parent / "data" / "prompts" / "spec_bench_mini.jsonl"
# Calibration prompts (`spectrt calibrate tree|vocab`, `export --awq`, `export --vocab-size` without --vocab): not
# Spec-Bench text, and not what the shipped heads trained on (see spectrt/data/prompts/README.md).
CALIBRATION_PROMPTS = Path(spectrt.__file__).parent / "data" / "prompts" / "calibration.jsonl"
