"""`spectrt export`: model -> DIR with base.onnx (+ draft graphs), tokenizer files and manifest.json.

Everything is written to a temporary sibling directory and renamed into place at the end, so a failed
or interrupted export leaves no half-written DIR.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from spectrt.export.base import base_kv_layout, build_base_graph
from spectrt.export.draft_export import export_medusa, validate_medusa
from spectrt.export.draft_graphs import DraftTarget
from spectrt.export.families import HFWeights, decoder_dims, rope_tables
from spectrt.export.golden import make_golden
from spectrt.export.files import staged
from spectrt.export.hydra import is_hydra_checkpoint
from spectrt.export.hydra_graphs import export_hydra, validate_hydra
from spectrt.export.onnx_graph import save_graph
from spectrt.export.quantize import DEFAULT_SCHEME, QDQ_OPSET, QuantSpec, quantize_model
from spectrt.export.shipped import builtin_corpus, builtin_vocab, shipped_heads
from spectrt.export.sources import load_hf, resolve_model
from spectrt.export.validate import VALIDATION_TEXT, validate_base
from spectrt.export.vocabtrim import VocabTrim, hf_tokenizer_hash, load_vocab
from spectrt.runtime.artifact import (MANIFEST, VOCAB_WEIGHT_BITS, CorpusInfo, Manifest, ModelInfo, TokenizerInfo,
                                      file_record, load_artifact, write_manifest)
from spectrt.runtime.contract import (CONTRACT_VERSION, DEFAULT_MAX_CONTEXT, DEFAULT_OPSET, DEFAULT_TOPK,
                                      DTYPE_ALIASES)
from spectrt.runtime.corpus import CORPUS_FILE, NgramTable
from spectrt.runtime.errors import ArtifactError, SpectrtError
from spectrt.runtime.golden import write_golden
from spectrt.version import __version__

MIN_OPSET, MAX_OPSET = 13, 21  # TensorRT 10.0-10.14 parse opsets up to 20; 21: block-wise Q/DQ (qdq weights)
VocabCalibrator = Callable[[object, object, int], VocabTrim]  # (model, tokenizer, N) -> the top-N VocabTrim
# (model, tokenizer, bits, block, asymmetric) -> rescales the float model in place before rounding (AWQ)
WeightCalibrator = Callable[[object, object, int, int, bool], None]


@dataclass
class ExportOptions:
    dtype: str = "float32"
    opset: int | None = None  # None: DEFAULT_OPSET, or 21 for qdq-quantized weights
    max_context: int = DEFAULT_MAX_CONTEXT
    validate: bool = True
    heads: str | None = None  # Medusa heads dir/checkpoint; "builtin": the heads shipped for a built-in model
    no_heads: bool = False  # built-in models get their shipped heads unless this is set
    topk: int = DEFAULT_TOPK
    tree: str | None = None  # tree JSON or node count; None: the default size from the heads' accuracies
    vocab: str | None = None  # VocabTrim file from `spectrt calibrate vocab`
    vocab_size: int | None = None  # keep the top N (of --vocab, or of a calibration on the bundled prompts)
    full_vocab: bool = False  # built-in models get their bundled VocabTrim unless this is set
    # --vocab-size without --vocab on a model with no bundled ranking: rank tokens by calibration
    # (`spectrt.calibration.vocab.default_vocab`; the CLI passes it). None: that combination is an error.
    calibrate_vocab: VocabCalibrator | None = None
    weights: str = "float"  # float | int8 | int4: weight-only quantization of base.onnx (export.quantize)
    block: int = 32  # input rows per quantization scale
    weights_format: str = "matmulnbits"  # matmulnbits (ONNX Runtime only) | qdq (TensorRT, opset 21)
    quantize_lm_head: bool = False
    row_pad: bool = True  # int4 matmulnbits: keeps speculative == AR on ONNX Runtime (export.quantize)
    scheme: str = DEFAULT_SCHEME  # auto | symmetric | asymmetric | gguf (export.quantize)
    quantize_embeddings: bool = False
    vocab_bits: int = VOCAB_WEIGHT_BITS[0]  # of the quantized LM head / embeddings
    awq: bool = False  # activation-aware scaling before rounding: needs calibrate_weights (the CLI passes it)
    calibrate_weights: WeightCalibrator | None = None  # `spectrt.calibration.awq` on calibration prompts
    corpus: str | None = None  # n-gram table (`spectrt calibrate corpus`); None: the built-in model's shipped one
    no_corpus: bool = False  # built-in models get their shipped table unless this is set

    def quant_spec(self) -> QuantSpec:
        return QuantSpec(self.weights, self.block, self.weights_format, self.quantize_lm_head, self.row_pad,
                         self.scheme, self.quantize_embeddings, self.awq, self.vocab_bits)


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


def write_tokenizer(tok, model, root: Path) -> TokenizerInfo:
    tok.backend_tokenizer.save(str(root / "tokenizer.json"))
    template = None
    if tok.chat_template:
        text = tok.chat_template if isinstance(tok.chat_template, str) else tok.chat_template.get("default")
        (root / "chat_template.jinja").write_text(text)
        template = "chat_template.jinja"
    specials = {k: str(v) for k in ("bos_token", "eos_token", "pad_token", "unk_token")
                if (v := getattr(tok, k, None))}
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
    if tok.eos_token_id is not None:
        eos.add(tok.eos_token_id)
    return TokenizerInfo(file="tokenizer.json", eos_token_ids=tuple(sorted(int(e) for e in eos)),
                         chat_template=template, **specials)


def export_model(model_spec: str, out_dir: str | os.PathLike, options: ExportOptions | None = None,
                 progress=print) -> Path:
    """Export ``model_spec`` to ``out_dir``; returns the directory. Raises SpectrtError on bad input,
    before any output is written where the input can be checked up front."""
    o = options or ExportOptions()
    quant = o.quant_spec()
    if o.opset is None:
        o = dataclasses.replace(o, opset=QDQ_OPSET if quant.quantized and quant.format == "qdq" else DEFAULT_OPSET)
    dtype = DTYPE_ALIASES.get(o.dtype)
    if dtype is None:
        raise SpectrtError(f"unsupported dtype '{o.dtype}' (supported: fp32, fp16)")
    if not MIN_OPSET <= o.opset <= MAX_OPSET:
        raise SpectrtError(f"opset {o.opset} outside {MIN_OPSET}..{MAX_OPSET} (TensorRT 10.0-10.14 parse up to 20, "
                           f"10.15 up to 24)")
    if o.max_context < 2:
        raise SpectrtError(f"max context {o.max_context} is too small (at least 2 tokens)")
    if o.topk < 1:
        raise SpectrtError(f"top-k must be at least 1, not {o.topk}")
    out = Path(out_dir)
    prepare_output_dir(out)
    source = resolve_model(model_spec)
    quant.check(o.opset, gguf_source=source.is_gguf)
    if quant.awq and o.calibrate_weights is None:
        raise SpectrtError("--awq needs a weight calibrator (spectrt.calibration.awq; the CLI passes it)")
    heads = _heads_path(o, source)
    corpus = _corpus_path(o, source)
    if quant.embeddings and heads is not None and is_hydra_checkpoint(heads):
        raise SpectrtError("--quantize-embeddings: Hydra heads read the base's float embedding table; export "
                           "them without it")
    if heads is None and (o.vocab or o.vocab_size):
        raise SpectrtError("--vocab/--vocab-size trim the draft LM head: they need draft heads (--heads)")
    if o.full_vocab and (o.vocab or o.vocab_size):
        raise SpectrtError("--full-vocab contradicts --vocab/--vocab-size")
    if o.vocab is not None and not Path(o.vocab).is_file():
        raise SpectrtError(f"{o.vocab}: no such vocab file")
    vocab, vocab_size = o.vocab, o.vocab_size
    if heads is not None and not (o.full_vocab or vocab or vocab_size):
        vocab, vocab_size = builtin_vocab(source.builtin) or (None, None)

    steps = _Steps(progress, total=(6 if o.validate else 5) + (heads is not None))
    steps("loading model")
    model, tok = load_hf(source, progress, check_config=decoder_dims)
    dims = decoder_dims(model.config)
    if dims.sliding_window is not None and o.max_context > dims.sliding_window:
        raise SpectrtError(f"max context {o.max_context} exceeds the model's sliding window {dims.sliding_window}; "
                           f"export with --max-context {dims.sliding_window} or less")
    if heads is not None and o.topk > dims.vocab:
        raise SpectrtError(f"top-k {o.topk} exceeds the vocabulary of {dims.vocab}")
    tied = dims.tied_embeddings or (
        model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr())
    dims = dataclasses.replace(dims, tied_embeddings=tied)
    trim = _vocab_trim(o, model, tok, vocab, vocab_size) if heads is not None else None  # checked before building
    table = _load_corpus(corpus, dims.vocab) if corpus is not None else None
    inv_freq, rope_scale = rope_tables(model)
    # quantized once: the graph gets (q, scales), the torch model q * scale (validation, golden, draft heads)
    prescale = (lambda m, *args: o.calibrate_weights(m, tok, *args)) if o.calibrate_weights else None
    qweights = (quantize_model(model, dims.num_layers, quant, source.path if source.is_gguf else None,
                               dims.num_heads, dims.kv_heads, prescale) if quant.quantized else None)

    with staged(out) as tmp:
        steps("building base.onnx")
        graph = build_base_graph(dims, HFWeights.from_model(model), inv_freq, rope_scale, dtype, o.opset, __version__,
                                 quant=qweights, max_context=o.max_context)
        graphs = {"base": save_graph(graph, tmp, "base", base_kv_layout(qweights))}
        del graph
        steps("writing tokenizer and manifest")
        manifest = Manifest(
            spectrt_version=__version__, contract_version=CONTRACT_VERSION,
            model=ModelInfo(**dataclasses.asdict(dims), source=source.name, builtin=source.builtin),
            dtype=dtype, opset=o.opset, max_context=o.max_context, graphs=graphs,
            tokenizer=write_tokenizer(tok, model, tmp), weights=qweights.info() if qweights else None)
        if table is not None:
            table.save(tmp / CORPUS_FILE)
            manifest = dataclasses.replace(manifest, corpus=CorpusInfo(
                file=file_record(tmp, CORPUS_FILE), orders=table.orders, entries=table.entries, tokens=table.tokens,
                source=table.source or str(corpus)))
        if heads is not None:
            steps(f"building the draft graphs from {heads}")
            target = DraftTarget(model, dims, tmp, dtype, o.opset, o.topk, o.tree, __version__, trim)
            export = export_hydra if is_hydra_checkpoint(heads) else export_medusa
            records, draft = export(heads, target)
            manifest = dataclasses.replace(manifest, graphs={**graphs, **records}, draft=draft)
        write_manifest(tmp, manifest)
        if o.validate:
            steps("validating against transformers (onnxruntime vs torch)")
            ids = tok(VALIDATION_TEXT, add_special_tokens=False)["input_ids"][:32]
            art = load_artifact(tmp)
            checks = validate_base(art, model, ids)
            if heads is not None:
                validate = validate_hydra if manifest.draft.kind == "hydra" else validate_medusa
                checks += validate(art, model, heads, ids, trim)
            for c in checks:
                progress(f"  ok  {c.name}: max |delta| {c.max_abs:.2e} (atol {c.atol:.0e})")
            manifest = dataclasses.replace(manifest, validation=tuple(c.row() for c in checks))
        steps("writing golden tokens for `spectrt selftest` (onnxruntime and torch, greedy)")
        golden = write_golden(tmp, make_golden(load_artifact(tmp), model, tok))
        write_manifest(tmp, dataclasses.replace(manifest, golden=file_record(tmp, golden)))
        steps(f"moving into place: {out}")
    return out


def _vocab_trim(o: ExportOptions, model, tok, vocab: str | None, vocab_size: int | None) -> VocabTrim | None:
    """The VocabTrim to apply (or None): a vocab file (optionally re-cut to N) or a calibration."""
    if vocab is not None:
        trim = load_vocab(vocab, model.config.vocab_size, hf_tokenizer_hash(tok), o.topk, size=vocab_size)
    elif vocab_size is not None:
        if o.calibrate_vocab is None:
            raise SpectrtError("--vocab-size without --vocab needs a token ranking: make one with `spectrt calibrate "
                               "vocab -m MODEL -o VOCAB.json` and pass --vocab VOCAB.json")
        trim = o.calibrate_vocab(model, tok, vocab_size)
    else:
        return None
    if trim.size < o.topk:
        raise SpectrtError(f"VocabTrim keeps {trim.size} tokens, fewer than the draft top-k {o.topk}")
    return trim


def _heads_path(o: ExportOptions, source) -> str | None:
    """--heads: a directory/checkpoint, 'builtin' or 'builtin:KIND' (shipped heads); built-in models get
    their default shipped heads unless --no-heads."""
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


def _corpus_path(o: ExportOptions, source) -> Path | None:
    """--corpus FILE, else the built-in model's shipped table; none with --no-corpus."""
    if o.no_corpus:
        if o.corpus is not None:
            raise SpectrtError("--no-corpus contradicts --corpus")
        return None
    if o.corpus is None:
        return builtin_corpus(source.builtin)
    if not Path(o.corpus).is_file():
        raise SpectrtError(f"{o.corpus}: no such corpus table (make one with `spectrt calibrate corpus`)")
    return Path(o.corpus)


def _load_corpus(path: Path, vocab: int) -> NgramTable:
    try:
        table = NgramTable.load(path, vocab)
    except ArtifactError as e:
        raise SpectrtError(str(e)) from None
    if table.entries == 0:
        raise SpectrtError(f"{path}: the n-gram table is empty (too few answers for its --min-total)")
    return table


class _Steps:
    """Numbered progress lines for the export's stages."""

    def __init__(self, progress, total: int):
        self.progress, self.total, self.n = progress, total, 0

    def __call__(self, what: str) -> None:
        self.n += 1
        self.progress(f"[{self.n}/{self.total}] {what}")
