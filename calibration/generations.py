"""The base model's own greedy responses to calibration prompts, cached as JSONL and resumable.

Used by self-distillation of draft heads and by VocabTrim token counting. Each cache line is one
record::

    {"model": <fingerprint>, "key": <hash of prompt ids>, "max_new_tokens": N, "finished": bool,
     "prompt_ids": [...], "response_ids": [...]}

``response_ids`` ends at (and includes) the first EOS token when the model stopped by itself
(``finished``), else it holds exactly ``max_new_tokens`` tokens. Greedy decoding is deterministic, so a
record made with a larger ``max_new_tokens`` (or a finished one that fits) answers a smaller request.
Each batch is appended with one ``write`` + ``fsync``; a torn last line from a crash is ignored and
regenerated on the next run.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from spectrt.export.sources import cache_root
from spectrt.runtime.errors import SpectrtError

DEFAULT_ANSWER_TOKENS = 128  # greedy answer length per prompt (VocabTrim and corpus calibration)
DEFAULT_GEN_BATCH = 16  # prompts per generation batch


def model_fingerprint(model) -> str:
    """A short identity for a model's weights + architecture (config without paths, sampled weights)."""
    import torch

    h = hashlib.sha256()
    cfg = model.config.to_dict()
    for k in ("_name_or_path", "name_or_path", "transformers_version", "torch_dtype", "dtype", "use_cache",
              "output_hidden_states", "output_attentions", "return_dict"):
        cfg.pop(k, None)
    h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, p in sorted(model.state_dict().items()):
            flat = p.detach().reshape(-1)
            step = max(1, flat.numel() // 256)
            sample = flat[::step][:256].to(torch.float32).cpu().numpy().round(5)
            h.update(name.encode())
            h.update(sample.tobytes())
    return h.hexdigest()[:16]


def default_cache_dir() -> Path:
    """``$SPECTRT_CACHE/calibration`` (default ``~/.cache/spectrt/calibration``)."""

    return cache_root() / "calibration"


def default_generations_path(model, cache_dir: str | os.PathLike | None = None,
                             fingerprint: str | None = None) -> Path:
    """``<cache_dir>/generations-<fingerprint>.jsonl``, the cache shared by distill and VocabTrim."""
    cache_dir = default_cache_dir() if cache_dir is None else Path(cache_dir).expanduser()
    return cache_dir / f"generations-{fingerprint or model_fingerprint(model)}.jsonl"


def _ids(x) -> list[int]:
    if isinstance(x, dict) or hasattr(x, "keys"):
        x = x["input_ids"]
    if hasattr(x, "tolist"):
        x = x.tolist()
    if x and isinstance(x[0], list):
        if len(x) != 1:
            raise SpectrtError("expected a single sequence from the tokenizer")
        x = x[0]
    return [int(t) for t in x]


def encode_prompt(tok, prompt: str) -> list[int]:
    """Token ids of ``prompt`` as a single user turn with the generation prompt (chat template if any)."""
    if getattr(tok, "chat_template", None):
        out = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                      tokenize=True)
        return _ids(out)
    return _ids(tok(prompt, add_special_tokens=True))


def _key(prompt_ids: list[int]) -> str:
    return hashlib.sha1(",".join(map(str, prompt_ids)).encode()).hexdigest()


def _eos_ids(model, tok) -> set[int]:
    eos = getattr(model.generation_config, "eos_token_id", None)
    if eos is None:
        eos = getattr(tok, "eos_token_id", None)
    if eos is None:
        return set()
    return {int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])}


def read_cache(cache_path: Path, fingerprint: str) -> dict[str, dict]:
    """Records of ``fingerprint`` in the cache, by key (later lines win). Torn/foreign lines are skipped."""
    records: dict[str, dict] = {}
    if not cache_path.is_file():
        return records
    with cache_path.open(encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a torn line from an interrupted run
            if not isinstance(rec, dict) or rec.get("model") != fingerprint:
                continue
            if not isinstance(rec.get("prompt_ids"), list) or not isinstance(rec.get("response_ids"), list):
                continue
            records[rec["key"]] = rec
    return records


def _usable(rec: dict | None, max_new_tokens: int) -> list[int] | None:
    if rec is None:
        return None
    resp = rec["response_ids"]
    if rec.get("finished") and len(resp) <= max_new_tokens:
        return resp
    if rec.get("max_new_tokens", 0) >= max_new_tokens:
        return resp[:max_new_tokens]
    return None


def _append(cache_path: Path, lines: list[str]) -> None:
    data = "".join(line + "\n" for line in lines).encode()
    fd = os.open(cache_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        if size:  # make sure a torn last line from a crash does not swallow our first record
            with open(cache_path, "rb") as f:
                f.seek(size - 1)
                if f.read(1) != b"\n":
                    data = b"\n" + data
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def generate_responses(model, tok, prompts: list[str], max_new_tokens: int, cache_path, batch_size: int = DEFAULT_GEN_BATCH,
                       progress: bool = True, prompt_ids: list[list[int]] | None = None,
                       ) -> list[tuple[list[int], list[int]]]:
    """``[(prompt_ids, response_ids)]`` in prompt order: the model's greedy answers, from/into the cache.

    Prompts are chat-templated (``encode_prompt``) unless ``prompt_ids`` (already tokenized) is given.
    Only prompts not yet in the cache are generated, in batches of ``batch_size`` with left padding
    (sorted by length to waste little on padding); each finished batch is appended to the cache.
    """
    import torch
    from tqdm.auto import tqdm

    if max_new_tokens < 1:
        raise SpectrtError(f"max_new_tokens must be at least 1, not {max_new_tokens}")
    if batch_size < 1:
        raise SpectrtError(f"batch size must be at least 1, not {batch_size}")
    cache_path = Path(cache_path).expanduser()
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    if prompt_ids is None:
        prompt_ids = [encode_prompt(tok, p) for p in prompts]
    elif len(prompt_ids) != len(prompts):
        raise SpectrtError("prompt_ids and prompts differ in length")
    fingerprint = model_fingerprint(model)
    cached = read_cache(cache_path, fingerprint)
    results: list[list[int] | None] = [_usable(cached.get(_key(ids)), max_new_tokens) for ids in prompt_ids]

    pending: dict[str, list[int]] = {}  # unique prompts still to generate
    for ids, res in zip(prompt_ids, results):
        if res is None:
            if not ids:
                raise SpectrtError("a prompt tokenized to nothing")
            pending.setdefault(_key(ids), ids)
    if pending:
        eos = _eos_ids(model, tok)
        pad = getattr(tok, "pad_token_id", None)
        if pad is None:
            pad = min(eos) if eos else 0
        order = sorted(pending.items(), key=lambda kv: len(kv[1]))
        batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
        device = next(model.parameters()).device
        bar = tqdm(total=len(order), desc="generating", unit="prompt", disable=not progress)
        new: dict[str, list[int]] = {}
        try:
            for batch in batches:
                width = max(len(ids) for _, ids in batch)
                input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
                mask = torch.zeros((len(batch), width), dtype=torch.long)
                for i, (_, ids) in enumerate(batch):
                    input_ids[i, width - len(ids):] = torch.tensor(ids)
                    mask[i, width - len(ids):] = 1
                with torch.inference_mode():
                    out = model.generate(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                                         max_new_tokens=max_new_tokens, min_new_tokens=1, do_sample=False,
                                         num_beams=1, temperature=None, top_p=None, top_k=None,
                                         pad_token_id=pad, eos_token_id=sorted(eos) or None)
                lines = []
                for i, (key, ids) in enumerate(batch):
                    gen = out[i, width:].tolist()
                    finished = False
                    for j, t in enumerate(gen):
                        if t in eos:
                            gen, finished = gen[:j + 1], True
                            break
                    new[key] = gen
                    lines.append(json.dumps({"model": fingerprint, "key": key, "max_new_tokens": max_new_tokens,
                                             "finished": finished, "prompt_ids": ids, "response_ids": gen},
                                            separators=(",", ":")))
                _append(cache_path, lines)
                bar.update(len(batch))
        finally:
            bar.close()
        results = [res if res is not None else new[_key(ids)] for ids, res in zip(prompt_ids, results)]
    return [(ids, res) for ids, res in zip(prompt_ids, results)]
