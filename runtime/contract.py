"""The export <-> runtime I/O contract, declared once, as data.

Every graph spectrt exports is described here: tensor names, symbolic shapes, dtypes and the
validation tolerance of each output. The exporter builds graphs from these specs, the TensorRT
builder derives optimization profiles from their dynamic axes, and the runtime checks its bindings
against them. The version is written into every artifact manifest; a runtime refuses artifacts
made under another contract version.

Dimension names
    batch     sequences per call (the runtime uses 1)
    q         new tokens in this call: prompt chunk (prefill), 1 (decode) or tree nodes (verify)
    past      tokens already in the KV cache
    heads     number of draft heads K
    topk      candidates per head returned by the draft LM head
    frontier  tree nodes drafted in one sequential (Hydra) call
    depth     tokens on a drafted path so far, root included (fixed per Hydra head: head i sees i + 1)
    Fixed dims (hidden, vocab, kv_heads, head_dim, ...) are resolved from the manifest's model dims.

KV layout (``KV_LAYOUTS``, recorded per graph in the manifest), one cache per layer and per K/V:

- ``token-major`` (every graph TensorRT builds): ``[max_context, batch, kv_heads, head_dim]``. The graph's
  ``past_*`` inputs are the prefix view ``cache[:past]`` and its ``new_*`` outputs are bound to
  ``cache[past:past + q]``: a contiguous slice right after the past, so no per-step copy or concat on the
  host.
- ``in-place`` (``base`` in ONNX Runtime's fused form, ``BASE_IN_PLACE``): head-major
  ``[batch, kv_heads, capacity, head_dim]``, the whole cache bound as ``cache_*`` input and as ``present_*``
  output (one buffer: ORT's GroupQueryAttention writes the q new rows at ``past_length`` and reads the
  past where it lies, so the graph copies no past either). A graph whose manifest records
  ``weights.attention_pad`` also writes one dummy row's KV at ``past_length + q``: capacity holds a spare slot.

Rolling back is moving the integer ``past`` in both.

Tree mask: ``tree_mask[b, i, j]`` is true when new token i may attend to new token j (a node sees its
ancestors and itself). The past is always fully visible, so no ``[q, past + q]`` mask is shipped.
Positions of tree nodes are ``past + depth``.

Optional outputs were added within a contract version: runners bind them when a graph has them, and what
needs one refuses an export without it (dynamic trees need the draft LM head's ``topk_logprobs``).
"""
from __future__ import annotations

from dataclasses import dataclass, field

CONTRACT_VERSION = "1.0"

# Dtype names used in specs (numpy names). "model" resolves to the artifact's dtype, one of FLOAT_DTYPES.
MODEL_DTYPE = "model"
FLOAT_DTYPES = ("float32", "float16")
DTYPE_ALIASES = {"fp32": "float32", "float32": "float32", "fp16": "float16", "float16": "float16"}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple  # str = named dim (dynamic or resolved from model dims), int = fixed
    dtype: str  # "int64" | "bool" | "model" | "float32"
    doc: str = ""
    atol: float | None = None  # fp32 validation tolerance for outputs (None: exact / not compared)
    optional: bool = False  # an output added after v1.0: graphs exported before it lack it (runners skip it)

    def resolve(self, dims: dict, dtype: str) -> tuple[tuple, str]:
        """Shape with fixed dims filled in from ``dims`` (dynamic names kept), concrete dtype."""
        shape = tuple(dims.get(d, d) if isinstance(d, str) else d for d in self.shape)
        return shape, (dtype if self.dtype == MODEL_DTYPE else self.dtype)


@dataclass(frozen=True)
class GraphSpec:
    name: str  # file stem: DIR/<name>.onnx
    inputs: tuple
    outputs: tuple
    dynamic: tuple  # names of the dynamic dims
    per_layer_inputs: tuple = field(default=())  # expanded once per KV layer
    per_layer_outputs: tuple = field(default=())
    kv_layers: str | int = 0  # KV layers: a model dim name ("num_layers") or a count (0: stateless graph)
    files: str = ""  # the files an export writes under this spec (default: <name>.onnx)

    def num_kv_layers(self, dims: dict) -> int:
        return dims[self.kv_layers] if isinstance(self.kv_layers, str) else self.kv_layers

    def fixed_dims(self) -> set[str]:
        """Named dims that are not dynamic: each export records a value for them (hidden, vocab, depth, ...)."""
        specs = self.inputs + self.outputs + self.per_layer_inputs + self.per_layer_outputs
        names = {d for s in specs for d in s.shape if isinstance(d, str) and d not in self.dynamic}
        return names | ({self.kv_layers} if isinstance(self.kv_layers, str) else set())

    def expand(self, dims: dict) -> tuple[list[TensorSpec], list[TensorSpec]]:
        """Inputs and outputs with the per-layer KV tensors spelled out (layer count from ``dims``)."""
        ins, outs = list(self.inputs), list(self.outputs)
        for i in range(self.num_kv_layers(dims)):
            ins += [layer_spec(s, i) for s in self.per_layer_inputs]
            outs += [layer_spec(s, i) for s in self.per_layer_outputs]
        return ins, outs


def layer_spec(spec: TensorSpec, layer: int) -> TensorSpec:
    return TensorSpec(spec.name.format(layer=layer), spec.shape, spec.dtype, spec.doc, spec.atol, spec.optional)


def io_mismatch(specs, names) -> tuple[list[str], list[str]]:
    """(missing, extra): contract tensors a graph lacks (optional outputs may be absent) and names it has that
    the contract does not know; both empty when the graph's ``names`` fit ``specs``."""
    names, known = set(names), {s.name for s in specs}
    return sorted(s.name for s in specs if not s.optional and s.name not in names), sorted(names - known)


KV_SHAPE_PAST = ("past", "batch", "kv_heads", "head_dim")
KV_SHAPE_NEW = ("q", "batch", "kv_heads", "head_dim")

BASE = GraphSpec(
    name="base",
    inputs=(
        TensorSpec("input_ids", ("batch", "q"), "int64", "token ids of the q new tokens"),
        TensorSpec("position_ids", ("batch", "q"), "int64", "rotary positions: past + depth in the tree"),
        TensorSpec("tree_mask", ("batch", "q", "q"), "bool", "new token i may attend new token j"),
    ),
    outputs=(
        TensorSpec("logits", ("batch", "q", "vocab"), MODEL_DTYPE, "full-vocabulary logits", atol=1e-3),
        TensorSpec("hidden_states", ("batch", "q", "hidden"), MODEL_DTYPE, "final-norm hidden states", atol=1e-3),
        TensorSpec("greedy_ids", ("batch", "q"), "int64", "argmax of logits (first max on ties)"),
    ),
    per_layer_inputs=(
        TensorSpec("past_key.{layer}", KV_SHAPE_PAST, MODEL_DTYPE, "view of cache[:past]"),
        TensorSpec("past_value.{layer}", KV_SHAPE_PAST, MODEL_DTYPE, "view of cache[:past]"),
    ),
    per_layer_outputs=(
        TensorSpec("new_key.{layer}", KV_SHAPE_NEW, MODEL_DTYPE, "bound to cache[past:past+q]", atol=1e-3),
        TensorSpec("new_value.{layer}", KV_SHAPE_NEW, MODEL_DTYPE, "bound to cache[past:past+q]", atol=1e-3),
    ),
    dynamic=("batch", "q", "past"),
    kv_layers="num_layers",
)

KV_LAYOUTS = ("token-major", "in-place")
KV_SHAPE_CACHE = ("batch", "kv_heads", "capacity", "head_dim")

# The base graph with an in-place cache (ONNX Runtime's fused form, batch 1): the same tokens in and
# logits out; the KV cache is one buffer per layer, input and output at once.
BASE_IN_PLACE = GraphSpec(
    name="base",
    inputs=BASE.inputs + (
        TensorSpec("past_length", ("batch",), "int64", "tokens already in the cache: the new rows go after them"),
    ),
    outputs=BASE.outputs,
    per_layer_inputs=(
        TensorSpec("cache_key.{layer}", KV_SHAPE_CACHE, MODEL_DTYPE, "the whole cache; the buffer of present_key"),
        TensorSpec("cache_value.{layer}", KV_SHAPE_CACHE, MODEL_DTYPE, "the whole cache; the buffer of present_value"),
    ),
    per_layer_outputs=(
        TensorSpec("present_key.{layer}", KV_SHAPE_CACHE, MODEL_DTYPE, "cache_key's buffer, rows past..past+q written"),
        TensorSpec("present_value.{layer}", KV_SHAPE_CACHE, MODEL_DTYPE, "cache_value's buffer, rows past..past+q written"),
    ),
    dynamic=("batch", "q", "capacity"),
    kv_layers="num_layers",
)

# Medusa heads: base hidden states -> the K heads' features (before the LM head).
HEADS = GraphSpec(
    name="heads",
    inputs=(TensorSpec("hidden_states", ("batch", "hidden"), MODEL_DTYPE, "base hidden state of the last accepted token"),),
    outputs=(TensorSpec("head_features", ("batch", "heads", "hidden"), MODEL_DTYPE, "per-head features", atol=1e-3),),
    dynamic=("batch",),
)

# Draft LM head (possibly VocabTrim-ed): features -> per-head top-k full-vocabulary ids, their logits and
# their log-probabilities (log-softmax over the head's rows, computed in fp32: what dynamic trees rank by).
DRAFT_LM_HEAD = GraphSpec(
    name="draft_lm_head",
    inputs=(TensorSpec("head_features", ("batch", "heads", "hidden"), MODEL_DTYPE, "per-head features"),),
    outputs=(
        TensorSpec("topk_ids", ("batch", "heads", "topk"), "int64", "full-vocabulary ids, best first"),
        TensorSpec("topk_scores", ("batch", "heads", "topk"), MODEL_DTYPE, "logits of those ids", atol=1e-3),
        TensorSpec("topk_logprobs", ("batch", "heads", "topk"), "float32",
                   "log-softmax of those ids over the head's (kept) rows; optional: exports made before dynamic "
                   "trees lack it", atol=1e-3, optional=True),
    ),
    dynamic=("batch",),
    files="`draft_lm_head.onnx` (Medusa; Hydra heads sharing the base LM head), or `hydra_lm_head.{i}.onnx` "
          "per Hydra head with its own LM head",
)

# Hydra head i (one graph per head, ``hydra_head.{i}.onnx``): context state + input embeddings of the path
# root..node -> features; the draft LM head graph (heads = 1, batch = frontier) turns them into top-k ids.
# Path embeddings are inputs, so no Hydra graph holds a copy of the vocabulary embedding table: the runtime
# gathers the rows from the base graph's own ``embed_tokens`` initializer (a read-only memmap).
# ``batch`` is the frontier (the nodes drafted in one call), so the heads/draft_lm_head runners and the
# TensorRT "frontier" profile rule apply unchanged; ``depth`` is fixed per graph (head i: i + 1).
HYDRA_HEAD = GraphSpec(
    name="hydra_head",
    inputs=(
        TensorSpec("context", ("batch", "hidden"), MODEL_DTYPE, "frontier: base hidden (Hydra) or prefix-layer state (Hydra++)"),
        TensorSpec("path_embeddings", ("batch", "depth", "hidden"), MODEL_DTYPE, "E(root), E(y_2), ... of each frontier node"),
    ),
    outputs=(TensorSpec("head_features", ("batch", "heads", "hidden"), MODEL_DTYPE, "features (heads = 1)", atol=1e-3),),
    dynamic=("batch",),
    files="`hydra_head.{i}.onnx`, one per head i (its `depth` is i + 1)",
)

# Hydra++ prefix attention: one decoder layer over the base hidden states, KV cache under the BASE layout.
HYDRA_PREFIX = GraphSpec(
    name="hydra_prefix",
    inputs=(
        TensorSpec("hidden_states", ("batch", "q", "hidden"), MODEL_DTYPE, "base hidden states of committed tokens"),
        TensorSpec("position_ids", ("batch", "q"), "int64", "positions of those tokens"),
        TensorSpec("tree_mask", ("batch", "q", "q"), "bool", "causal among the new tokens"),
    ),
    outputs=(TensorSpec("context", ("batch", "q", "hidden"), MODEL_DTYPE, "prefix-layer output", atol=1e-3),),
    per_layer_inputs=BASE.per_layer_inputs,
    per_layer_outputs=BASE.per_layer_outputs,
    dynamic=("batch", "q", "past"),
    kv_layers=1,
)

GRAPHS = {g.name: g for g in (BASE, HEADS, DRAFT_LM_HEAD, HYDRA_HEAD, HYDRA_PREFIX)}


def graph_spec(graph: str, kv_layout: str = KV_LAYOUTS[0]) -> GraphSpec:
    """The spec of a graph file stem: ``hydra_head.2`` and ``hydra_lm_head.2`` follow their family's spec;
    ``kv_layout`` ``in-place`` exists for ``base`` only."""
    family = graph.split(".")[0]
    spec = GRAPHS[{"hydra_lm_head": "draft_lm_head"}.get(family, family)]
    if kv_layout == KV_LAYOUTS[0]:
        return spec
    if kv_layout == "in-place" and spec is BASE:
        return BASE_IN_PLACE
    raise KeyError(f"{graph}: no '{kv_layout}' KV layout")


def has_spec(graph: str) -> bool:
    """True when ``graph`` (a file stem such as ``hydra_head.2``) has a contract spec."""
    try:
        graph_spec(graph)
    except KeyError:
        return False
    return True

# Defaults shared by export and runtime (one source of truth).
DEFAULT_OPSET = 17  # TensorRT 10.x parses opsets up to 20; 17 keeps JetPack 6 (TRT 10.3) happy
DEFAULT_MAX_CONTEXT = 2048
DEFAULT_PREFILL_CHUNK = 64  # prompt tokens per base call; bounds the logits buffer to chunk x vocab
DEFAULT_TOPK = 10


def describe() -> str:
    """The contract as Markdown tables (used to generate docs/CONTRACT.md)."""
    lines = [f"# spectrt I/O contract v{CONTRACT_VERSION}", "", __doc__.strip(), ""]
    for g in list(GRAPHS.values()) + [BASE_IN_PLACE]:
        kv = f"; KV layers: {g.kv_layers}" if g.kv_layers else ""
        layout = " (in-place KV layout)" if g is BASE_IN_PLACE else ""
        lines += [f"## `{g.name}`{layout}", "", f"Files: {g.files or f'`{g.name}.onnx`'}. Dynamic dims: {', '.join(g.dynamic)}"
                  f"{kv}. Fixed dims (recorded per graph in the manifest): {', '.join(sorted(g.fixed_dims()))}", "",
                  "| io | name | shape | dtype | atol | meaning |", "|---|---|---|---|---|---|"]
        rows = [("in", s) for s in g.inputs] + [("in", s) for s in g.per_layer_inputs]
        rows += [("out", s) for s in g.outputs] + [("out", s) for s in g.per_layer_outputs]  # {layer}: 0 .. KV layers - 1
        for io, s in rows:
            shape = "[" + ", ".join(map(str, s.shape)) + "]"
            lines.append(f"| {io} | `{s.name}` | `{shape}` | {s.dtype} | {s.atol or ''} | {s.doc} |")
        lines.append("")
    return "\n".join(lines)
