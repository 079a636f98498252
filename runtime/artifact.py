"""The exported artifact: ``DIR/manifest.json`` as frozen, versioned, typed data.

Everything an export directory holds is described by one ``Manifest`` (model dims, one ``GraphRecord``
per graph with every fixed dim of its contract spec resolved, the draft spec and tree, the VocabTrim record,
engine records per device profile, each file's size and sha256). ``load_artifact`` is the one place that
reads the JSON: a wrong type, a missing field, an out-of-range value or another format version becomes one
``ArtifactError`` line naming the field (``manifest.json: model.num_layers: expected an integer, got '30'``).
Only ``export`` and ``build`` write manifests, atomically (``write_manifest``); nothing reads keys by string.

Decoding is driven by the dataclasses' own type annotations, so the schema is declared once.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from spectrt.runtime.contract import CONTRACT_VERSION, FLOAT_DTYPES, KV_LAYOUTS, GraphSpec, graph_spec, has_spec
from spectrt.runtime.errors import ArtifactError

MANIFEST = "manifest.json"
FORMAT_VERSION = 2  # the manifest schema below; 1 was the untyped dict of spectrt 0.1
MAX_CONTEXT_LIMIT = 1 << 20  # tokens; a KV cache beyond this is a damaged manifest, not a model


class Invalid(ValueError):
    """A value that has the right type but breaks a rule; the loader prefixes the field path."""


def _positive(obj, *names: str) -> None:
    for n in names:
        if getattr(obj, n) < 1:
            raise Invalid(f"{n}: must be >= 1, got {getattr(obj, n)}")


@dataclass(frozen=True)
class DecoderDims:
    """A supported decoder's dims (the exporter reads them from the Hugging Face config)."""

    family: str
    hidden: int
    num_layers: int
    num_heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    rms_eps: float
    tied_embeddings: bool
    sliding_window: int | None


@dataclass(frozen=True)
class ModelInfo(DecoderDims):
    """The decoder's dims and where it came from."""

    source: str
    builtin: str | None = None

    def _validate(self) -> None:
        _positive(self, "hidden", "num_layers", "num_heads", "kv_heads", "head_dim", "intermediate", "vocab")
        if self.num_heads % self.kv_heads:
            raise Invalid(f"num_heads: {self.num_heads} is not a multiple of kv_heads {self.kv_heads}")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise Invalid(f"sliding_window: must be >= 1 (or null: no window), got {self.sliding_window}")

    def dims(self) -> dict[str, int]:
        """The contract's fixed model dims."""
        return {"hidden": self.hidden, "vocab": self.vocab, "num_layers": self.num_layers,
                "num_heads": self.num_heads, "kv_heads": self.kv_heads, "head_dim": self.head_dim}


@dataclass(frozen=True)
class FileRecord:
    path: str  # relative to the artifact root
    bytes: int
    sha256: str

    def _validate(self) -> None:
        p = Path(self.path)
        if p.is_absolute() or ".." in p.parts or not self.path:
            raise Invalid(f"path: '{self.path}' must be a relative path inside the export")
        if self.bytes < 0:
            raise Invalid(f"bytes: must be >= 0, got {self.bytes}")
        if len(self.sha256) != 64 or any(c not in "0123456789abcdef" for c in self.sha256):
            raise Invalid(f"sha256: '{self.sha256}' is not a hex sha256 digest")


@dataclass(frozen=True)
class GraphRecord:
    """One ONNX graph: its files (the .onnx first, then external data) and every fixed dim of its spec."""

    files: tuple[FileRecord, ...]
    dims: dict[str, int]
    kv_layout: str = KV_LAYOUTS[0]  # token-major | in-place (contract: KV layout)

    @property
    def file(self) -> str:
        return self.files[0].path

    @property
    def bytes(self) -> int:
        return sum(f.bytes for f in self.files)

    def _validate(self) -> None:
        if not self.files:
            raise Invalid("files: a graph needs at least its .onnx file")
        bad = [k for k, v in self.dims.items() if v < 1]
        if bad:
            raise Invalid(f"dims.{bad[0]}: must be >= 1, got {self.dims[bad[0]]}")
        if self.kv_layout not in KV_LAYOUTS:
            raise Invalid(f"kv_layout: '{self.kv_layout}' is not one of {', '.join(KV_LAYOUTS)}")


@dataclass(frozen=True)
class TokenizerInfo:
    file: str
    eos_token_ids: tuple[int, ...]
    chat_template: str | None = None
    bos_token: str | None = None
    eos_token: str | None = None
    pad_token: str | None = None
    unk_token: str | None = None

    def special_tokens(self) -> dict[str, str]:
        """The names a chat template may use (bos_token, eos_token, ...)."""
        return {k: v for k, v in (("bos_token", self.bos_token), ("eos_token", self.eos_token),
                                  ("pad_token", self.pad_token), ("unk_token", self.unk_token)) if v}


@dataclass(frozen=True)
class VocabTrimInfo:
    size: int  # kept rows of the draft LM head
    coverage: float
    source: str
    vocab_size: int

    def _validate(self) -> None:
        _positive(self, "size", "vocab_size")
        if not 0.0 <= self.coverage <= 1.0:
            raise Invalid(f"coverage: must be in [0, 1], got {self.coverage}")


@dataclass(frozen=True)
class EmbeddingRef:
    """Where the base graph's input embedding table lives inside its external data (shared with Hydra)."""

    initializer: str
    file: str
    offset: int
    length: int
    shape: tuple[int, int]
    dtype: str
    byte_order: str = "little"

    def _validate(self) -> None:
        if self.dtype not in FLOAT_DTYPES:
            raise Invalid(f"dtype: '{self.dtype}' is not one of {', '.join(FLOAT_DTYPES)}")
        if self.offset < 0 or self.length < 1:
            raise Invalid(f"offset/length: {self.offset}/{self.length} is not a byte range")


@dataclass(frozen=True)
class CorpusInfo:
    """The n-gram table of the base model's own answers that corpus drafting reads (``runtime.corpus``)."""

    file: FileRecord
    orders: int  # longest context n-gram
    entries: int  # n-grams in the table, all orders
    tokens: int  # answer tokens it was counted from
    source: str  # how it was made (model, prompts)

    def _validate(self) -> None:
        _positive(self, "orders", "entries", "tokens")


DRAFT_KINDS = ("medusa", "hydra")
HYDRA_ARCHS = ("mlp", "prefix-mlp")
MAX_TREE_NODES = 4096  # a verify call's rows; a larger node budget is a damaged manifest
TREE_COSTS = ("measured", "roofline")  # where `spectrt calibrate tree` took a step's cost from
CALIBRATED_DRAFTS = ("heads", "heads+lookup")  # the drafts a calibration simulates (runtime.drafters sources)


@dataclass(frozen=True)
class TreeCalibration:
    """How `spectrt calibrate tree` chose the node budget: acceptance measured on calibration prompts, and a
    step's cost measured (`spectrt profile --json`) or estimated from a device profile's roofline."""

    cost: str  # measured | roofline
    cost_source: str  # the timings file, "measured here (ort)", or the device profile's name
    draft: str  # the drafts simulated: heads | heads+lookup
    prompts: str  # calibration prompts: file and count
    positions: int  # draft positions measured
    tau: float  # expected tokens per step
    tokens_per_s: float  # expected decode tokens/s under the cost model
    speedup: float  # expected, vs autoregressive decoding under the same cost model
    profile: str | None = None  # the device profile (roofline), if any

    def _validate(self) -> None:
        if self.cost not in TREE_COSTS:
            raise Invalid(f"cost: '{self.cost}' is not one of {', '.join(TREE_COSTS)}")
        if self.draft not in CALIBRATED_DRAFTS:
            raise Invalid(f"draft: '{self.draft}' is not one of {', '.join(CALIBRATED_DRAFTS)}")
        _positive(self, "positions")
        if not self.tau >= 1.0:
            raise Invalid(f"tau: tokens per step are at least 1, got {self.tau}")
        if not (self.tokens_per_s > 0 and self.speedup > 0):
            raise Invalid(f"tokens_per_s/speedup: must be > 0, got {self.tokens_per_s}/{self.speedup}")


@dataclass(frozen=True)
class DraftInfo:
    """The exported drafter: which graphs it runs and the static tree it verifies."""

    kind: str  # medusa | hydra
    num_heads: int
    num_layers: int
    topk: int
    shared_lm_head: bool  # heads use the base's LM head (Medusa "shared-head" heads, Hydra shared_lm_head)
    source: str
    tree: tuple[tuple[int, ...], ...]  # paths of top-k ranks (see runtime.tree)
    lm_head_rows: int  # rows of the draft LM head (< vocab with VocabTrim)
    arch: str | None = None  # hydra: mlp | prefix-mlp (Hydra++)
    vocab_trim: VocabTrimInfo | None = None
    embedding: EmbeddingRef | None = None  # hydra: path embeddings come from the base's table
    # node budget of one step's draft tree, root included, fitted to a device by `spectrt calibrate tree`
    # (``calibration`` says how); None: not calibrated, the static tree's size
    nodes: int | None = None
    calibration: TreeCalibration | None = None

    def _validate(self) -> None:
        if self.kind not in DRAFT_KINDS:
            raise Invalid(f"kind: '{self.kind}' is not one of {', '.join(DRAFT_KINDS)}")
        _positive(self, "num_heads", "num_layers", "topk", "lm_head_rows")
        if self.nodes is not None:
            if not 1 <= self.nodes <= MAX_TREE_NODES:
                raise Invalid(f"nodes: must be in 1..{MAX_TREE_NODES}, got {self.nodes}")
            if len(self.tree) + 1 > self.nodes:
                raise Invalid(f"nodes: the static tree has {len(self.tree) + 1} nodes, over the budget of {self.nodes}")
        if self.calibration is not None and self.nodes is None:
            raise Invalid("calibration: records a calibrated node budget, but nodes is null")
        if self.kind == "hydra":
            if self.arch not in HYDRA_ARCHS:
                raise Invalid(f"arch: '{self.arch}' is not one of {', '.join(HYDRA_ARCHS)}")
            if self.embedding is None:
                raise Invalid("embedding: a hydra drafter needs the base's embedding table record")
        if self.topk > self.lm_head_rows:
            raise Invalid(f"topk: {self.topk} exceeds the draft LM head's {self.lm_head_rows} rows")

    @property
    def node_budget(self) -> int:
        """Nodes of one step's draft tree, root included: the calibrated budget, else the static tree's size."""
        return self.nodes if self.nodes is not None else len(self.tree) + 1

    @property
    def is_hydra_plus(self) -> bool:
        return self.kind == "hydra" and self.arch == "prefix-mlp"

    def graph_names(self) -> tuple[str, ...]:
        """The graphs this drafter needs, in the order they run."""
        if self.kind == "medusa":
            return ("heads", "draft_lm_head")
        names = [f"hydra_head.{i}" for i in range(self.num_heads)]
        names += ["draft_lm_head"] if self.shared_lm_head else [f"hydra_lm_head.{i}" for i in range(self.num_heads)]
        return tuple(names + (["hydra_prefix"] if self.is_hydra_plus else []))


WEIGHT_KINDS = ("int8", "int4")
WEIGHT_FORMATS = ("qdq", "matmulnbits")
WEIGHT_BLOCKS = (32, 64, 128)
WEIGHT_SCHEMES = ("symmetric-rtn", "asymmetric-rtn", "gguf", "symmetric-full-rtn")  # as recorded (full: all 2^b levels)
SYMMETRIC_SCHEMES = ("symmetric-rtn", "symmetric-full-rtn")  # no per-block offsets
QUANT_SCHEMES = ("auto", "symmetric", "asymmetric", "gguf")  # `export --scheme` (auto resolves to another)
DEFAULT_WEIGHT_BLOCK = 32
WEIGHT_BITS = {"int8": 8, "int4": 4}
VOCAB_WEIGHT_BITS = (8, 4)  # a quantized LM head / embedding table (export.quantize); the first is the default


@dataclass(frozen=True)
class WeightsInfo:
    """Weight-only quantization of the base graph's MatMul weights (absent: float weights).

    ``qdq``: DequantizeLinear -> MatMul (opset 21; TensorRT explicit quantization, ONNX Runtime fuses it);
    ``matmulnbits``: ONNX Runtime's com.microsoft::MatMulNBits (ORT only; TensorRT cannot build it)."""

    kind: str  # int8 | int4
    block: int  # input rows per scale
    format: str  # qdq | matmulnbits
    lm_head: bool = False  # the LM head is quantized too (8-bit blocks)
    scheme: str = "symmetric-rtn"  # the projections': one of WEIGHT_SCHEMES (gguf: the source's blocks)
    accuracy_level: int | None = None  # MatMulNBits' accuracy_level (4: int8 activations)
    row_pad: bool = False  # runners call q = 1 as q = 2 (ORT's one-row kernels round differently) unless
    # ``attention_pad`` and a probe at load finds this CPU's one-row MatMulNBits exact (runtime.ort_runner)
    attention_pad: bool = False  # GroupQueryAttention runs on one dummy row more (in the graph): a spare cache slot
    embeddings: bool = False  # input embeddings quantized (GatherBlockQuantized; a tied LM head shares them)
    awq: bool = False  # activation-aware scales (calibration prompts) before rounding
    vocab_bits: int = VOCAB_WEIGHT_BITS[0]  # of the quantized LM head / embeddings (symmetric blocks)

    def _validate(self) -> None:
        if self.kind not in WEIGHT_KINDS:
            raise Invalid(f"kind: '{self.kind}' is not one of {', '.join(WEIGHT_KINDS)}")
        if self.format not in WEIGHT_FORMATS:
            raise Invalid(f"format: '{self.format}' is not one of {', '.join(WEIGHT_FORMATS)}")
        if self.block not in WEIGHT_BLOCKS:
            raise Invalid(f"block: {self.block} is not one of {', '.join(map(str, WEIGHT_BLOCKS))}")
        if self.scheme not in WEIGHT_SCHEMES:
            raise Invalid(f"scheme: '{self.scheme}' is not one of {', '.join(WEIGHT_SCHEMES)}")
        if self.embeddings and self.format != "matmulnbits":
            raise Invalid("embeddings: quantized embeddings exist only in the matmulnbits format")
        if self.vocab_bits not in VOCAB_WEIGHT_BITS:
            raise Invalid(f"vocab_bits: {self.vocab_bits} is not one of {', '.join(map(str, VOCAB_WEIGHT_BITS))}")

    @property
    def ort_only(self) -> bool:
        return self.format == "matmulnbits"

    def element_bytes(self, vocab: bool = False) -> float:
        """Stored bytes per weight: the packed value, its block's fp32 scale and, for the projections of an
        asymmetric or GGUF grid, its block's fp32 offset (GGUF Q4_0/Q8_0 have none: an upper bound there).
        ``vocab``: the LM head / embedding table (``vocab_bits`` symmetric blocks)."""
        if vocab:
            return self.vocab_bits / 8 + 4 / self.block
        offsets = 4 / self.block if self.scheme not in SYMMETRIC_SCHEMES else 0.0
        return WEIGHT_BITS[self.kind] / 8 + 4 / self.block + offsets

    def label(self) -> str:
        table = f"int{self.vocab_bits}"
        vocab = f", embeddings + LM head {table}" if self.embeddings else f", LM head {table}" if self.lm_head else ""
        return f"{self.kind} {self.scheme}{' + AWQ' if self.awq else ''} (block {self.block}, {self.format}{vocab})"


@dataclass(frozen=True)
class ValidationRow:
    check: str
    max_abs: float
    atol: float
    argmax_equal: bool
    ok: bool


@dataclass(frozen=True)
class OptimizationProfileRecord:
    label: str  # prefill | decode | frontier
    dims: dict[str, tuple[int, int, int]]  # dynamic dim -> (min, opt, max)


@dataclass(frozen=True)
class EngineRecord:
    """A TensorRT engine built by `spectrt build` for one graph and one device profile."""

    graph: str
    file: str
    engine_sha256: str
    profile: str  # device profile name
    precision: str
    strongly_typed: bool
    tensorrt: str
    gpu: str
    compute_capability: str
    source_sha256: dict[str, str]  # file -> sha256 of the graph it was built from
    optimization_profiles: tuple[OptimizationProfileRecord, ...]
    build_seconds: float
    built_at: str

    def max_dims(self) -> dict[str, int]:
        """Largest value of each dynamic dim over the optimization profiles."""
        out: dict[str, int] = {}
        for p in self.optimization_profiles:
            for k, (_, _, mx) in p.dims.items():
                out[k] = max(out.get(k, 0), mx)
        return out


def engine_key(graph: str, profile: str) -> str:
    """The key of an engine record and the stem of its file: ``<graph>.<device profile>``."""
    return f"{graph}.{profile}"


@dataclass(frozen=True)
class Manifest:
    spectrt_version: str
    contract_version: str
    model: ModelInfo
    dtype: str  # float32 | float16
    opset: int  # of the graphs (an ORT-fused base graph, kv_layout in-place, is written at opset 23)
    max_context: int
    graphs: dict[str, GraphRecord]
    tokenizer: TokenizerInfo
    format: int = FORMAT_VERSION
    draft: DraftInfo | None = None
    validation: tuple[ValidationRow, ...] = ()
    engines: dict[str, EngineRecord] = field(default_factory=dict)
    golden: FileRecord | None = None  # greedy ids for `spectrt selftest` (runtime.golden)
    weights: WeightsInfo | None = None  # weight-only quantization of base.onnx; None: float weights
    corpus: CorpusInfo | None = None  # n-gram table for corpus drafting; None: none shipped

    def _validate(self) -> None:
        if self.dtype not in FLOAT_DTYPES:
            raise Invalid(f"dtype: '{self.dtype}' is not one of {', '.join(FLOAT_DTYPES)}")
        if not 2 <= self.max_context <= MAX_CONTEXT_LIMIT:
            raise Invalid(f"max_context: must be in 2..{MAX_CONTEXT_LIMIT}, got {self.max_context}")
        window = self.model.sliding_window
        if window is not None and self.max_context > window:
            raise Invalid(f"max_context: {self.max_context} exceeds the model's sliding_window {window}")
        if "base" not in self.graphs:
            raise Invalid("graphs: no 'base' graph")
        for name, g in self.graphs.items():
            if not has_spec(name):
                raise Invalid(f"graphs.{name}: not a graph of I/O contract {CONTRACT_VERSION}")
            try:
                spec = graph_spec(name, g.kv_layout)
            except KeyError:
                raise Invalid(f"graphs.{name}.kv_layout: '{g.kv_layout}' exists for the base graph only") from None
            missing = sorted(spec.fixed_dims() - set(g.dims))
            if missing:
                raise Invalid(f"graphs.{name}.dims: no value for {', '.join(missing)}")
        model_dims = self.model.dims()  # the base graph is the model: its dims are the model's (KV buffers are sized by them)
        for k, v in self.graphs["base"].dims.items():
            if k in model_dims and v != model_dims[k]:
                raise Invalid(f"graphs.base.dims.{k}: {v} disagrees with model.{k} {model_dims[k]}")
        bad_eos = [e for e in self.tokenizer.eos_token_ids if not 0 <= e < self.model.vocab]
        if bad_eos:
            raise Invalid(f"tokenizer.eos_token_ids: {bad_eos[0]} is outside the vocabulary (0..{self.model.vocab - 1})")
        if self.draft is not None:
            missing = [g for g in self.draft.graph_names() if g not in self.graphs]
            if missing:
                raise Invalid(f"draft: needs graph(s) {', '.join(missing)}, which graphs does not list")
        for key, e in self.engines.items():
            if key != engine_key(e.graph, e.profile) or e.graph not in self.graphs:
                raise Invalid(f"engines.{key}: record is for graph '{e.graph}' and profile '{e.profile}'")

    def with_engines(self, records: dict[str, EngineRecord]) -> "Manifest":
        return dataclasses.replace(self, engines={**self.engines, **records})

    def to_json(self) -> dict:
        return _encode(self)


# --------------------------------------------------------------------------------------------------
# strict decoding from JSON, driven by the annotations above


def _type_name(tp) -> str:
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(tp, getattr(
        tp, "__name__", str(tp)))


def _got(value) -> str:
    text = json.dumps(value) if not isinstance(value, float) or math.isfinite(value) else str(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _decode(tp, value, where: str):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            if len(args) < len(typing.get_args(tp)):
                return None
            raise Invalid(f"{where}: must not be null")
        return _decode(args[0], value, where)
    if tp is bool:
        if not isinstance(value, bool):
            raise Invalid(f"{where}: expected true or false, got {_got(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise Invalid(f"{where}: expected an integer, got {_got(value)}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise Invalid(f"{where}: expected a number, got {_got(value)}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise Invalid(f"{where}: expected a string, got {_got(value)}")
        return value
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, list):
            raise Invalid(f"{where}: expected a list, got {_got(value)}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_decode(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise Invalid(f"{where}: expected {len(args)} items, got {len(value)}")
        return tuple(_decode(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if origin is dict:
        _, vt = typing.get_args(tp)
        if not isinstance(value, dict):
            raise Invalid(f"{where}: expected an object, got {_got(value)}")
        return {k: _decode(vt, v, f"{where}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return _decode_dataclass(tp, value, where)
    raise TypeError(f"no decoder for {tp}")  # a schema bug, not bad input


_HINTS: dict = {}


def _hints(cls) -> dict:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def _decode_dataclass(cls, value, where: str):
    prefix = f"{where}." if where else ""
    if not isinstance(value, dict):
        raise Invalid(f"{where or 'manifest'}: expected an object, got {_got(value)}")
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(value) - names)
    if unknown:
        raise Invalid(f"{prefix}{unknown[0]}: unknown field (known: {', '.join(sorted(names))})")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in value:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise Invalid(f"{prefix}{f.name}: missing")
            continue
        kwargs[f.name] = _decode(hints[f.name], value[f.name], prefix + f.name)
    obj = cls(**kwargs)
    check = getattr(obj, "_validate", None)
    if check is not None:
        try:
            check()
        except Invalid as e:
            raise Invalid(f"{prefix}{e}") from None
    return obj


def _encode(obj):
    if dataclasses.is_dataclass(obj):
        return {f.name: _encode(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (tuple, list)):
        return [_encode(v) for v in obj]
    if isinstance(obj, dict):
        return {k: _encode(v) for k, v in obj.items()}
    return obj


def decode_json(cls, data):
    """An instance of the frozen dataclass ``cls`` from decoded JSON, every field type-checked and each
    ``_validate`` run; ``Invalid`` names the first bad field."""
    return _decode_dataclass(cls, data, "")


def encode_json(obj):
    """The JSON-ready form of a dataclass (tuples as lists)."""
    return _encode(obj)


def parse_manifest(data) -> Manifest:
    """A Manifest from decoded JSON; ``Invalid`` names the first bad field."""
    if isinstance(data, dict):
        fmt = data.get("format", 1)
        if fmt != FORMAT_VERSION:
            raise Invalid(f"format: manifest format {_got(fmt)}, this spectrt reads format {FORMAT_VERSION}; "
                          "re-export the model with this spectrt")
        version = data.get("contract_version")
        if version != CONTRACT_VERSION:
            raise Invalid(f"contract_version: made for I/O contract {_got(version)}, this spectrt speaks "
                          f"{CONTRACT_VERSION!r}; re-export the model")
    return _decode_dataclass(Manifest, data, "")


# --------------------------------------------------------------------------------------------------
# the directory


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_record(root: Path, rel: str) -> FileRecord:
    p = Path(root) / rel
    return FileRecord(rel, p.stat().st_size, sha256_file(p))


@dataclass(frozen=True)
class Artifact:
    """An export directory and its checked manifest."""

    root: Path
    manifest: Manifest

    @property
    def model(self) -> ModelInfo:
        return self.manifest.model

    @property
    def dtype(self) -> str:
        return self.manifest.dtype

    @property
    def max_context(self) -> int:
        return self.manifest.max_context

    @property
    def draft(self) -> DraftInfo | None:
        return self.manifest.draft

    @property
    def corpus(self) -> CorpusInfo | None:
        return self.manifest.corpus

    def has_graph(self, name: str) -> bool:
        return name in self.manifest.graphs

    def graph(self, name: str) -> GraphRecord:
        if name not in self.manifest.graphs:
            raise ArtifactError(f"{self.root}: the artifact has no '{name}' graph")
        return self.manifest.graphs[name]

    def graph_path(self, name: str) -> Path:
        return self.root / self.graph(name).file

    def dims(self, name: str) -> dict[str, int]:
        """Every fixed dim of graph ``name`` (resolved at export)."""
        return dict(self.graph(name).dims)

    def spec(self, name: str) -> GraphSpec:
        """The contract spec graph ``name`` was exported under (its KV layout)."""
        return graph_spec(name, self.graph(name).kv_layout)

    def path(self, rel: str) -> Path:
        return self.root / rel

    def files(self) -> list[FileRecord]:
        extra = [self.manifest.golden] if self.manifest.golden else []
        if self.corpus is not None:
            extra.append(self.corpus.file)
        return [f for g in self.manifest.graphs.values() for f in g.files] + extra

    def verify(self, hashes: bool = False) -> None:
        """Every listed file exists with its recorded size; with ``hashes``, also its sha256 (reads every byte)."""
        for f in self.files():
            p = self.root / f.path
            if not p.is_file():
                raise ArtifactError(f"{p}: missing (listed in the manifest)")
            size = p.stat().st_size
            if size != f.bytes:
                raise ArtifactError(f"{p}: {size} bytes, the manifest says {f.bytes} (truncated or replaced)")
            if hashes and sha256_file(p) != f.sha256:
                raise ArtifactError(f"{p}: sha256 differs from the manifest (the file is corrupt or was replaced); "
                                    "re-export the model")
        tok = self.root / self.manifest.tokenizer.file
        if not tok.is_file():
            raise ArtifactError(f"{tok}: missing tokenizer file (listed in the manifest)")


def load_artifact(root: str | os.PathLike, verify_hashes: bool = False) -> Artifact:
    """Read, type-check and size-check ``root/manifest.json``; raises ArtifactError with a one-line reason."""
    root = Path(root)
    if not root.is_dir():
        raise ArtifactError(f"{root}: not a directory (expected the output of `spectrt export`)")
    mpath = root / MANIFEST
    if not mpath.is_file():
        raise ArtifactError(f"{mpath}: missing; is {root} an export directory?")
    try:
        data = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{mpath}: corrupt manifest ({e})") from None
    try:
        manifest = parse_manifest(data)
    except Invalid as e:
        raise ArtifactError(f"{mpath}: {e}") from None
    art = Artifact(root, manifest)
    art.verify(hashes=verify_hashes)
    return art


def write_manifest(root: str | os.PathLike, manifest: Manifest) -> None:
    """Write ``root/manifest.json`` atomically (temp file + fsync + rename); checks the manifest first."""
    data = manifest.to_json()
    try:
        parse_manifest(json.loads(json.dumps(data)))  # what we write must load
    except Invalid as e:
        raise ArtifactError(f"refusing to write an invalid manifest: {e}") from None
    atomic_write(Path(root) / MANIFEST, (json.dumps(data, indent=2) + "\n").encode())


def atomic_write(path: str | os.PathLike, data: bytes | memoryview) -> None:
    """Write a file so readers see the old or the new content, never a half-written one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


__all__ = ["Artifact", "CorpusInfo", "DecoderDims", "DraftInfo", "EmbeddingRef", "EngineRecord", "FileRecord", "FORMAT_VERSION", "GraphRecord",
           "Invalid", "MANIFEST", "MAX_TREE_NODES", "TreeCalibration", "decode_json", "encode_json", "Manifest", "ModelInfo", "OptimizationProfileRecord", "TokenizerInfo",
           "ValidationRow", "VocabTrimInfo", "WeightsInfo", "atomic_write", "engine_key", "file_record", "load_artifact",
           "parse_manifest", "sha256_file", "write_manifest"]
