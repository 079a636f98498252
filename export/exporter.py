"""`spectrt export`: model -> DIR with base.onnx (+ draft graphs), tokenizer files and manifest.json.

Everything is written to a temporary sibling directory and renamed into place at the end, so a failed
or interrupted export leaves no half-written DIR.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from spectrt.export.base import build_base_graph
from spectrt.export.files import staged
from spectrt.export.families import HFWeights, decoder_dims, rope_tables
from spectrt.export.onnx_graph import save_model
from spectrt.export.sources import resolve_model, load_hf
from spectrt.runtime.contract import CONTRACT_VERSION, DEFAULT_MAX_CONTEXT, DEFAULT_OPSET, DEFAULT_TOPK
from spectrt.runtime.errors import SpectrtError
from spectrt.runtime.manifest import MANIFEST, load_artifact, sha256_file, write_manifest
from spectrt.version import __version__

SUPPORTED_DTYPES = ("float32", "float16")
DTYPE_ALIASES = {"fp32": "float32", "float32": "float32", "fp16": "float16", "float16": "float16"}
MAX_OPSET = 20  # highest opset TensorRT 10.x parses


@dataclass
class ExportOptions:
    dtype: str = "float32"
    opset: int = DEFAULT_OPSET
    max_context: int = DEFAULT_MAX_CONTEXT
    validate: bool = True
    heads: str | None = None  # Medusa heads dir/checkpoint; "builtin": the heads shipped for a built-in model
    no_heads: bool = False  # built-in models get their shipped heads unless this is set
    topk: int = DEFAULT_TOPK
    tree: str | None = None  # tree JSON or node count; None: the default size from the heads' accuracies
    vocab: str | None = None  # VocabTrim file from `spectrt calibrate vocab`
    vocab_size: int | None = None  # keep the top N (of --vocab, or of a calibration on the bundled prompts)
    full_vocab: bool = False  # built-in models get their bundled VocabTrim unless this is set


def prepare_output_dir(out: Path) -> None:
    """Fail early (before minutes of work) when ``out`` cannot be written or holds something else."""
    if out.exists() and not out.is_dir():
        raise SpectrtError(f"{out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST).is_file():
        raise SpectrtError(f"{out}: exists, is not empty and is not a spectrt export; refusing to overwrite it")
    parent = out.parent if str(out.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SpectrtError(f"{out}: cannot create the output directory ({e.strerror})") from None
    if not os.access(parent, os.W_OK | os.X_OK):
        raise SpectrtError(f"{out}: output directory is not writable")


def file_record(root: Path, files: list[str]) -> dict:
    return {"file": files[0], "sha256": {f: sha256_file(root / f) for f in files},
            "bytes": {f: (root / f).stat().st_size for f in files}}


def write_tokenizer(tok, model, root: Path) -> dict:
    tok.backend_tokenizer.save(str(root / "tokenizer.json"))
    info = {"file": "tokenizer.json"}
    if tok.chat_template:
        template = tok.chat_template if isinstance(tok.chat_template, str) else tok.chat_template.get("default")
        (root / "chat_template.jinja").write_text(template)
        info["chat_template"] = "chat_template.jinja"
    for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
        value = getattr(tok, key, None)
        if value:
            info[key] = str(value)
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
    if tok.eos_token_id is not None:
        eos.add(tok.eos_token_id)
    info["eos_token_ids"] = sorted(int(e) for e in eos)
    return info


def export_model(model_spec: str, out_dir: str | os.PathLike, options: ExportOptions | None = None,
                 progress=print) -> Path:
    """Export ``model_spec`` to ``out_dir``; returns the directory. Raises SpectrtError on bad input."""
    o = options or ExportOptions()
    dtype = DTYPE_ALIASES.get(o.dtype)
    if dtype is None:
        raise SpectrtError(f"unsupported dtype '{o.dtype}' (supported: fp32, fp16)")
    if not 13 <= o.opset <= MAX_OPSET:
        raise SpectrtError(f"opset {o.opset} outside 13..{MAX_OPSET} (TensorRT 10.x parses up to {MAX_OPSET})")
    if o.max_context < 2:
        raise SpectrtError(f"max context {o.max_context} is too small")
    out = Path(out_dir)
    prepare_output_dir(out)
    source = resolve_model(model_spec)
    heads = _heads_path(o, source)
    if heads is None and (o.vocab or o.vocab_size):
        raise SpectrtError("--vocab/--vocab-size trim the draft LM head: they need draft heads (--heads)")
    if o.full_vocab and (o.vocab or o.vocab_size):
        raise SpectrtError("--full-vocab contradicts --vocab/--vocab-size")
    vocab, vocab_size = o.vocab, o.vocab_size
    if heads is not None and not (o.full_vocab or vocab or vocab_size):
        from spectrt.export.draft_export import builtin_vocab

        vocab, vocab_size = builtin_vocab(source.builtin) or (None, None)

    steps = _Steps(progress, total=(5 if o.validate else 4) + (heads is not None))
    steps("loading model")
    model, tok = load_hf(source, progress, check_config=decoder_dims)
    dims = decoder_dims(model.config)
    if dims.sliding_window is not None and o.max_context > dims.sliding_window:
        raise SpectrtError(f"max context {o.max_context} exceeds the model's sliding window {dims.sliding_window}; "
                           f"export with --max-context {dims.sliding_window} or less")
    tied = dims.tied_embeddings or (
        model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr())
    dims = dims.__class__(**{**dims.__dict__, "tied_embeddings": tied})
    inv_freq, rope_scale = rope_tables(model)

    with staged(out) as tmp:
        steps("building base.onnx")
        graph = build_base_graph(dims, HFWeights(model), inv_freq, rope_scale, dtype, o.opset, __version__)
        files = save_model(graph, tmp / "base.onnx")
        del graph
        steps("writing tokenizer and manifest")
        manifest = {
            "spectrt_version": __version__,
            "contract_version": CONTRACT_VERSION,
            "model": {**dims.manifest(), "source": source.name, "builtin": source.builtin},
            "dtype": dtype,
            "opset": o.opset,
            "max_context": o.max_context,
            "graphs": {"base": file_record(tmp, files)},
            "tokenizer": write_tokenizer(tok, model, tmp),
        }
        if heads is not None:
            steps(f"building the draft graphs from {heads}")
            from spectrt.export.draft_export import export_draft, vocab_trim

            trim = vocab_trim(model, tok, vocab, vocab_size, o.topk)
            records, manifest["draft"] = export_draft(heads, model, dims, tmp, dtype, o.opset, o.topk, o.tree,
                                                       __version__, file_record, trim)
            manifest["graphs"].update(records)
        write_manifest(tmp, manifest)
        if o.validate:
            steps("validating against transformers (onnxruntime vs torch)")
            from spectrt.export.validate import VALIDATION_TEXT, validate_base

            ids = tok(VALIDATION_TEXT, add_special_tokens=False)["input_ids"][:32]
            checks = validate_base(load_artifact(tmp), model, ids)
            if heads is not None:
                from spectrt.export.draft_export import validate_draft

                checks += validate_draft(load_artifact(tmp), model, heads, ids, trim)
            manifest["validation"] = [c.row() for c in checks]
            for c in checks:
                progress(f"  ok  {c.name}: max |delta| {c.max_abs:.2e} (atol {c.atol:.0e})")
            write_manifest(tmp, manifest)
        steps(f"moving into place: {out}")
    return out


def _heads_path(o: ExportOptions, source) -> str | None:
    """--heads: a directory/checkpoint, 'builtin' or 'builtin:KIND' (shipped heads); built-in models get
    their default shipped heads unless --no-heads."""
    from spectrt.export.draft_export import shipped_heads

    if o.no_heads:
        return None
    if o.heads is None or o.heads.startswith("builtin"):
        kind = (o.heads or "").partition(":")[2] or None
        shipped = shipped_heads(source.builtin, kind)
        if o.heads is not None and shipped is None:
            what = f"{kind} heads" if kind else "heads"
            raise SpectrtError(f"no {what} are shipped for '{source.name}'; pass --heads DIR")
        return str(shipped) if shipped else None
    if not Path(o.heads).exists():
        raise SpectrtError(f"{o.heads}: no such heads directory or checkpoint")
    return o.heads


class _Steps:
    """Numbered progress lines for the export's stages."""

    def __init__(self, progress, total: int):
        self.progress, self.total, self.n = progress, total, 0

    def __call__(self, what: str) -> None:
        self.n += 1
        self.progress(f"[{self.n}/{self.total}] {what}")
