"""`spectrt check`: will TensorRT 10.x's ONNX parser accept these graphs? Runs on CPU, no TensorRT.

Checks every graph of an artifact against ``trt_ops.json`` (the onnx-tensorrt operator support matrix,
kept in the repo as data): opset range, custom domains (``com.microsoft`` ...), per-op support and the
TensorRT release that added it, the main input's data type, mechanical restrictions (TopK's K <= 3840,
build-time constant axes, ...) and conformance with the I/O contract. Shape arithmetic that only depends
on constants is folded first (onnx's reference evaluator, node by node, on small tensors only) and the
graph is re-checked, so a blocker that folding removes is reported with the fix instead of as a dead end.

Graphs are loaded with ``load_external_data=False``: weights stay on disk.
"""
from __future__ import annotations

import functools
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from spectrt.profiles.device import PROFILE_DIR, list_profiles, load_profile, parse_version
from spectrt.runtime.artifact import load_artifact
from spectrt.runtime.contract import FLOAT_DTYPES, GraphSpec, graph_spec
from spectrt.runtime.errors import SpectrtError

OPS_FILE = PROFILE_DIR / "trt_ops.json"
ERROR, WARNING, INFO = "error", "warning", "info"

FOLD_MAX_INPUT = 1 << 16  # elements: only shape-sized tensors are evaluated on the CPU
FOLD_MAX_OUTPUT = 1 << 20
NONDETERMINISTIC = {"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Bernoulli",
                    "Multinomial"}
_ONNX_TO_TRT_TYPE = {
    "FLOAT": "FP32", "FLOAT16": "FP16", "BFLOAT16": "BF16", "DOUBLE": "DOUBLE", "INT32": "INT32",
    "INT64": "INT64", "INT8": "INT8", "UINT8": "UINT8", "BOOL": "BOOL", "INT4": "INT4",
    "FLOAT8E4M3FN": "FP8", "FLOAT4E2M1": "FP4",
}
FOLD_HINT = "polygraphy surgeon sanitize --fold-constants IN.onnx -o OUT.onnx"


@functools.lru_cache(maxsize=1)
def trt_ops() -> dict:
    """The TensorRT 10.x ONNX operator table (``profiles/trt_ops.json``)."""
    return json.loads(OPS_FILE.read_text())


def max_opset(trt_version: str) -> int:
    """Highest ONNX opset the given TensorRT parses (last known release <= trt_version)."""
    table = trt_ops()["opset"]["max_by_version"]
    v = parse_version(trt_version)
    known = [(parse_version(k), o) for k, o in table.items() if parse_version(k) <= v]
    return max(known)[1] if known else min(table.values())


def default_trt_target() -> str:
    """The oldest TensorRT among the built-in device profiles (JetPack 6's 10.3): the safe default."""
    return min((load_profile(n).tensorrt for n in list_profiles()), key=parse_version)


@dataclass
class Finding:
    severity: str  # error | warning | info
    where: str  # node / tensor / graph
    message: str


@dataclass
class GraphReport:
    name: str
    path: str
    opset: int | None = None
    nodes: int = 0
    op_types: Counter = field(default_factory=Counter)
    folded: int = 0  # nodes that fold to constants
    findings: list = field(default_factory=list)

    @property
    def errors(self) -> list:
        return [f for f in self.findings if f.severity == ERROR]

    def add(self, severity: str, where: str, message: str) -> None:
        self.findings.append(Finding(severity, where, message))


@dataclass
class CheckReport:
    root: str
    trt_version: str
    graphs: list = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not any(g.errors for g in self.graphs)

    def to_dict(self) -> dict:
        return {
            "root": self.root, "tensorrt": self.trt_version, "ok": self.ok,
            "graphs": [{"name": g.name, "path": g.path, "opset": g.opset, "nodes": g.nodes, "folded": g.folded,
                        "op_types": dict(g.op_types),
                        "findings": [vars(f) for f in g.findings]} for g in self.graphs],
        }

    def format(self, verbose: bool = False) -> str:
        lines = [f"spectrt check {self.root}  (target TensorRT {self.trt_version}: opset "
                 f"{trt_ops()['opset']['min']}..{max_opset(self.trt_version)})"]
        for g in self.graphs:
            status = "BLOCKED" if g.errors else "ok"
            lines.append(f"  {g.name:<14} {status:<8} opset {g.opset}, {g.nodes} nodes, {len(g.op_types)} op types, "
                         f"{g.folded} fold to constants   [{g.path}]")
            for f in g.findings:
                if f.severity == INFO and not verbose:
                    continue
                lines.append(f"    {f.severity.upper():<7} {f.where}: {f.message}")
        n = sum(len(g.errors) for g in self.graphs)
        bad = sum(1 for g in self.graphs if g.errors)
        lines.append(f"RESULT: {'OK: TensorRT ' + self.trt_version + ' can parse every graph' if not n else f'{n} blocker(s) in {bad} graph(s)'}")
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# constant folding (CPU, small tensors only)


@dataclass
class Folded:
    values: dict  # tensor name -> numpy value (known build-time constants)
    static: set  # tensor names that are build-time constants (value known or not: external weights)
    weights: set  # what TensorRT sees as weights without folding: initializers and Constant outputs
    folded_nodes: set  # indices of nodes whose outputs are all build-time constants


def _attr_graphs(node):
    import onnx

    for a in node.attribute:
        if a.type == onnx.AttributeProto.GRAPH:
            yield a.g
        elif a.type == onnx.AttributeProto.GRAPHS:
            yield from a.graphs


def _small_initializer(t):
    import onnx
    from onnx import numpy_helper

    if t.data_location == onnx.TensorProto.EXTERNAL:
        return None
    n = 1
    for d in t.dims:
        n *= d
    if n > FOLD_MAX_INPUT:
        return None
    try:
        return numpy_helper.to_array(t)
    except Exception:  # noqa: BLE001 - exotic types: treat as unknown value
        return None


def _static_shape(vi) -> tuple | None:
    tt = vi.type.tensor_type
    if not tt.HasField("shape"):
        return None
    dims = []
    for d in tt.shape.dim:
        if not d.HasField("dim_value"):
            return None
        dims.append(d.dim_value)
    return tuple(dims)


def fold_constants(model, value_info: dict | None = None) -> Folded:
    """Evaluate the constant part of the main graph (no weights read from disk).

    ``value_info``: tensor name -> ValueInfoProto from shape inference, used to fold ``Shape``/``Size``
    of tensors whose shape is fully static.
    """
    import numpy as np
    from onnx import numpy_helper
    from onnx.reference import ReferenceEvaluator

    g = model.graph
    opset = {o.domain or "": o.version for o in model.opset_import}
    values, static, weights, folded = {}, set(), set(), set()
    for t in g.initializer:
        static.add(t.name)
        weights.add(t.name)
        v = _small_initializer(t)
        if v is not None:
            values[t.name] = v
    value_info = value_info or {}
    for i, node in enumerate(g.node):
        ins = [x for x in node.input if x]
        outs = [x for x in node.output if x]
        if node.domain not in ("", "ai.onnx") or node.op_type in NONDETERMINISTIC:
            continue
        if node.op_type == "Constant":
            static.update(outs)
            weights.update(outs)
            folded.add(i)
            a = node.attribute[0] if node.attribute else None
            if a is not None and a.name == "value" and a.t.data_location != 1:
                n = int(np.prod(a.t.dims)) if a.t.dims else 1
                if n <= FOLD_MAX_INPUT:
                    values[outs[0]] = numpy_helper.to_array(a.t)
                    continue
            if a is not None and a.name != "value":
                try:
                    values[outs[0]] = ReferenceEvaluator(node, opsets=opset).run(None, {})[0]
                except Exception:  # noqa: BLE001
                    pass
            continue
        if node.op_type in ("Shape", "Size") and ins and ins[0] in value_info:
            shape = _static_shape(value_info[ins[0]])
            if shape is not None:
                if node.op_type == "Size":
                    values[outs[0]] = np.array(int(np.prod(shape)), dtype=np.int64)
                else:
                    attrs = {a.name: a.i for a in node.attribute}
                    start, end = attrs.get("start", 0), attrs.get("end", len(shape))
                    values[outs[0]] = np.array(shape[start:end] if "end" in attrs else shape[start:], dtype=np.int64)
                static.update(outs)
                folded.add(i)
                continue
        if list(_attr_graphs(node)) or not all(x in static for x in ins):
            continue
        if not ins and node.op_type not in ("ConstantOfShape", "Range", "EyeLike"):
            continue
        static.update(outs)
        folded.add(i)
        if all(x in values and np.asarray(values[x]).size <= FOLD_MAX_INPUT for x in ins):
            try:
                feeds = {x: values[x] for x in ins}
                results = ReferenceEvaluator(node, opsets=opset).run(None, feeds)
            except Exception:  # noqa: BLE001 - unsupported by the reference backend: value stays unknown
                continue
            for name, r in zip(outs, results):
                if r is not None and np.asarray(r).size <= FOLD_MAX_OUTPUT:
                    values[name] = np.asarray(r)
    return Folded(values, static, weights, folded)


# --------------------------------------------------------------------------------------------------
# per-node rules


def _type_name(elem_type: int) -> str | None:
    import onnx

    try:
        return onnx.TensorProto.DataType.Name(elem_type)
    except ValueError:
        return None


_OUTPUT_TYPED = {"Constant", "ConstantOfShape", "BlackmanWindow", "HammingWindow", "HannWindow", "RandomNormal",
                 "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Shape", "Size"}

# op -> (input index, TensorRT release from which a non-constant input is accepted or None, what it is)
_CONST_INPUTS = {
    **{op: (1, None, "axes") for op in ("ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax",
                                        "ReduceMean", "ReduceMin", "ReduceProd", "ReduceSum", "ReduceSumSquare")},
    "Squeeze": (1, "10.7", "axes"),
    "Unsqueeze": (1, "10.7", "axes"),
    "CumSum": (1, "10.8", "axis"),
    "OneHot": (1, None, "depth"),
    "Dropout": (2, None, "training_mode"),
}


def _check_node(node, where, rep: GraphReport, table: dict, trt_version: str, types: dict,
                fold: Folded | None, folds_away: bool) -> None:
    ops = table["operators"]
    domain = node.domain or ""
    if domain not in table["domains"]:
        hint = " (an ONNX Runtime contrib op: export without ORT-specific fusions)" if domain == "com.microsoft" else ""
        rep.add(ERROR, where, f"custom-domain op '{domain}::{node.op_type}'; TensorRT parses only the standard "
                              f"ONNX domain (custom ops need a TensorRT plugin){hint}")
        return
    entry = ops.get(node.op_type)
    fold_note = f"; the node only computes constants: fold them first ({FOLD_HINT})" if folds_away else ""
    if entry is None:
        rep.add(ERROR, where, f"op '{node.op_type}' is not in TensorRT's ONNX operator table{fold_note}")
        return
    if not entry["supported"]:
        extra = f" ({entry['restrictions']})" if entry.get("restrictions") else ""
        rep.add(ERROR, where, f"op '{node.op_type}' is not supported by TensorRT's ONNX parser{extra}{fold_note}")
        return
    since = entry.get("since")
    if since and parse_version(since) > parse_version(trt_version):
        rep.add(ERROR, where, f"op '{node.op_type}' needs TensorRT >= {since} (target {trt_version}){fold_note}")
    # main input's data type (the output's, for generators whose inputs are sizes/shapes)
    main = None if node.op_type in _OUTPUT_TYPED else next((x for x in node.input if x), None)
    tname = None
    if main is not None and main in types:
        tname = _ONNX_TO_TRT_TYPE.get(_type_name(types[main]), _type_name(types[main]))
    elif main is None and node.output and node.output[0] in types:
        tname = _ONNX_TO_TRT_TYPE.get(_type_name(types[node.output[0]]), _type_name(types[node.output[0]]))
    if tname and "types" in entry and tname not in entry["types"]:
        if tname == "DOUBLE":
            rep.add(WARNING, where, f"{node.op_type} on DOUBLE: TensorRT casts it to FLOAT (clamped to +-FLT_MAX)")
        else:
            rep.add(ERROR, where, f"{node.op_type} on {tname} data: TensorRT supports {', '.join(entry['types'])}"
                                  f"{fold_note}")
    _check_restrictions(node, where, rep, table, trt_version, fold)


def _check_restrictions(node, where, rep, table, trt_version, fold: Folded | None) -> None:
    import numpy as np

    attrs = {a.name: a for a in node.attribute}
    op = node.op_type
    if op == "TopK":
        k_max = table["limits"]["topk_max_k"]
        if "sorted" in attrs and attrs["sorted"].i != 1:
            rep.add(ERROR, where, "TopK with sorted=0: TensorRT requires sorted=1")
        k_name = node.input[1] if len(node.input) > 1 else None
        k_val = None
        if "k" in attrs:  # opset < 10
            k_val = attrs["k"].i
        elif fold is not None and k_name in fold.values:
            k_val = int(np.asarray(fold.values[k_name]).reshape(-1)[0])
        if k_val is not None and k_val > k_max:
            rep.add(ERROR, where, f"TopK with K={k_val}: TensorRT's TopK layer allows K <= {k_max} "
                                  "(trim the vocabulary or take the top-k in stages)")
        elif k_val is None and fold is not None and k_name not in fold.static:
            rep.add(WARNING, where, f"TopK's K is computed at run time; TensorRT needs K <= {k_max} at build time")
    elif op in _CONST_INPUTS:
        idx, dynamic_since, what = _CONST_INPUTS[op]
        if len(node.input) > idx and node.input[idx] and fold is not None:
            name = node.input[idx]
            if dynamic_since and parse_version(trt_version) >= parse_version(dynamic_since):
                pass
            elif name in fold.weights:
                pass
            elif name in fold.static:
                rep.add(ERROR, where, f"{op}'s {what} input '{name}' is computed from constants; TensorRT "
                                      f"needs an initializer: fold constants first ({FOLD_HINT})")
            else:
                rep.add(ERROR, where, f"{op}'s {what} input '{name}' depends on run-time values; TensorRT "
                                      "needs a build-time constant")
    elif op == "ScatterND" and "reduction" in attrs and attrs["reduction"].s not in (b"", b"none"):
        rep.add(ERROR, where, f"ScatterND reduction='{attrs['reduction'].s.decode()}': TensorRT supports only none")
    elif op == "LayerNormalization" and sum(1 for x in node.output[1:] if x):
        rep.add(ERROR, where, "LayerNormalization: TensorRT supports only the first output (Y)")
    elif op == "MaxPool" and len(node.output) > 1 and node.output[1]:
        rep.add(ERROR, where, "MaxPool's Indices output is unsupported by TensorRT")
    elif op == "Constant" and node.attribute and node.attribute[0].name in ("sparse_value", "value_string",
                                                                          "value_strings"):
        rep.add(ERROR, where, f"Constant with {node.attribute[0].name}: unsupported by TensorRT")
    elif op == "Resize" and "antialias" in attrs and attrs["antialias"].i:
        rep.add(ERROR, where, "Resize with antialias=1: unsupported by TensorRT")


# --------------------------------------------------------------------------------------------------
# graph / artifact level


def _check_contract(model, spec: GraphSpec, dims: dict, dtype: str | None, rep: GraphReport) -> None:
    import onnx

    ins, outs = spec.expand(dims)
    actual = {"input": {vi.name: vi for vi in model.graph.input},
              "output": {vi.name: vi for vi in model.graph.output}}
    inits = {t.name for t in model.graph.initializer}
    for vi_name in list(actual["input"]):
        if vi_name in inits:  # old-style graphs list initializers as inputs
            del actual["input"][vi_name]
    for kind, specs in (("input", ins), ("output", outs)):
        expected = {s.name for s in specs}
        for s in specs:
            vi = actual[kind].get(s.name)
            if vi is None and s.optional:
                rep.add(INFO, f"{kind} '{s.name}'", "absent (an optional output added after this export was made)")
                continue
            if vi is None:
                rep.add(ERROR, f"{kind} '{s.name}'", f"missing (the I/O contract's '{spec.name}' graph has it)")
                continue
            shape, want = s.resolve(dims, dtype or "float32")
            tt = vi.type.tensor_type
            have = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type).name if tt.elem_type else "?"
            if dtype is None and s.dtype == "model":
                want = have if have in FLOAT_DTYPES else "|".join(FLOAT_DTYPES)
            if have != want:
                rep.add(ERROR, f"{kind} '{s.name}'", f"dtype {have}, the contract says {want}")
            got = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tt.shape.dim]
            if len(got) != len(shape):
                rep.add(ERROR, f"{kind} '{s.name}'", f"rank {len(got)} {got}, the contract says {list(shape)}")
                continue
            for axis, (g, w) in enumerate(zip(got, shape)):
                if isinstance(w, int) and isinstance(g, int) and g != w:
                    rep.add(ERROR, f"{kind} '{s.name}'", f"dim {axis} is {g}, the model dims say {w}")
                elif isinstance(w, str) and w in spec.dynamic and isinstance(g, int):
                    sev = WARNING if (w == "batch" and g == 1) else ERROR
                    rep.add(sev, f"{kind} '{s.name}'", f"dim {axis} ('{w}') is fixed to {g}; export it as dynamic")
        for extra in sorted(set(actual[kind]) - expected):
            sev = ERROR if kind == "input" else WARNING
            rep.add(sev, f"{kind} '{extra}'", "not in the I/O contract" + (" (the runtime cannot feed it)" if
                                                                            kind == "input" else ""))
    int64_io = [vi.name for vi in list(model.graph.input) + list(model.graph.output)
                if vi.type.tensor_type.elem_type == onnx.TensorProto.INT64]
    if int64_io:
        rep.add(INFO, "int64 I/O", f"{', '.join(int64_io[:6])}{' ...' if len(int64_io) > 6 else ''}: TensorRT >= 9 "
                                   "binds int64 natively (no cast to int32); the runner allocates int64 buffers")


def check_model(model, name: str = "graph", path: str = "", trt_version: str | None = None,
                spec: GraphSpec | None = None, dims: dict | None = None, dtype: str | None = None) -> GraphReport:
    """Check one in-memory ModelProto (weights may be left on disk)."""
    import onnx

    trt_version = trt_version or default_trt_target()
    table = trt_ops()
    rep = GraphReport(name, path)
    default = [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")]
    rep.opset = default[0] if default else None
    lo, hi = table["opset"]["min"], max_opset(trt_version)
    if rep.opset is None:
        rep.add(ERROR, "opset", "no default-domain opset import")
    elif not lo <= rep.opset <= hi:
        rep.add(ERROR, "opset", f"opset {rep.opset} is outside TensorRT {trt_version}'s range {lo}..{hi}; "
                                f"re-export with --opset {min(max(rep.opset, lo), hi)}")
    for o in model.opset_import:
        if o.domain not in ("", "ai.onnx") and o.domain not in {f.domain for f in model.functions}:
            rep.add(WARNING, "opset", f"imports custom domain '{o.domain}' (v{o.version})")
    if model.functions:  # TensorRT >= 9 imports local functions; check their bodies
        try:
            model = onnx.inliner.inline_local_functions(model)
        except Exception as e:  # noqa: BLE001
            rep.add(WARNING, "functions", f"could not inline local functions ({e}); their bodies are not checked")
    try:
        inferred = onnx.shape_inference.infer_shapes(model, check_type=False, strict_mode=False)
    except Exception as e:  # noqa: BLE001 - keep checking ops without types
        rep.add(WARNING, "shape inference", f"failed ({str(e).splitlines()[0][:200]}); data types not checked")
        inferred = model
    g = inferred.graph
    value_info = {vi.name: vi for vi in list(g.value_info) + list(g.input) + list(g.output)}
    types = {n: vi.type.tensor_type.elem_type for n, vi in value_info.items() if vi.type.tensor_type.elem_type}
    types.update({t.name: t.data_type for t in g.initializer})
    fold = fold_constants(inferred, value_info)
    rep.folded = len(fold.folded_nodes)
    rep.nodes = len(g.node)

    def visit(graph, prefix: str, top: bool) -> None:
        for i, node in enumerate(graph.node):
            rep.op_types[node.op_type if not node.domain else f"{node.domain}::{node.op_type}"] += 1
            label = node.name or f"#{i}"
            where = f"{prefix}node '{label}' ({node.op_type})"
            folds_away = top and i in fold.folded_nodes and node.op_type != "Constant"
            _check_node(node, where, rep, table, trt_version, types, fold if top else None, folds_away)
            for sub in _attr_graphs(node):
                visit(sub, f"{prefix}{label}/", False)

    visit(g, "", True)
    if rep.folded:
        rep.add(INFO, "constant folding", f"{rep.folded} of {rep.nodes} nodes compute build-time constants "
                                          "(TensorRT folds them when it builds)")
    if spec is not None and dims is not None:
        _check_contract(model, spec, dims, dtype, rep)
    return rep


def check_onnx(path, **kwargs) -> GraphReport:
    """Load ``path`` without its external weights and check it."""
    import onnx

    path = Path(path)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # noqa: BLE001 - protobuf errors are not user-friendly
        rep = GraphReport(kwargs.get("name", path.stem), str(path))
        rep.add(ERROR, "file", f"cannot be read as ONNX ({str(e).splitlines()[0][:200]})")
        return rep
    kwargs.setdefault("name", path.stem)
    return check_model(model, path=str(path), **kwargs)


def check_artifact(root, profile: str | None = None, trt_version: str | None = None) -> CheckReport:
    """Check every graph of an exported artifact (and every file's sha256 against the manifest); the target
    TensorRT comes from the profile if given."""
    art = load_artifact(root, verify_hashes=True)
    if trt_version is None:
        trt_version = load_profile(profile).tensorrt if profile else default_trt_target()
    if not parse_version(trt_version) or parse_version(trt_version) < (10,):
        raise SpectrtError(f"--trt-version {trt_version}: spectrt targets TensorRT 10.x or newer")
    report = CheckReport(str(art.root), trt_version)
    for name in art.manifest.graphs:
        report.graphs.append(check_onnx(art.graph_path(name), name=name, trt_version=trt_version,
                                        spec=art.spec(name), dims=art.dims(name), dtype=art.dtype))
    w = art.manifest.weights
    if w is not None and w.ort_only:  # one line instead of one per ORT-specific node
        base = next(g for g in report.graphs if g.name == "base")
        n = sum(1 for f in base.findings if f.severity == ERROR)
        base.findings = [f for f in base.findings if f.severity != ERROR]
        base.add(ERROR, "weights", f"ORT-only export: base.onnx is ONNX Runtime's fused form ({w.kind} MatMulNBits "
                                   f"and GatherBlockQuantized, GroupQueryAttention, opset 23; {n} findings for "
                                   f"TensorRT {trt_version}); TensorRT cannot build it: re-export with "
                                   f"--weights {w.kind} --weights-format qdq (opset 21) for TensorRT")
    elif w is not None:
        base = next(g for g in report.graphs if g.name == "base")
        base.add(INFO, "weights", f"{w.label()}: DequantizeLinear -> MatMul (TensorRT explicit quantization; "
                                  "INT4 blocks need symmetric scales, which these are: an asymmetric grid's "
                                  "offsets are a separate float MatMul)")
    return report


__all__ = ["trt_ops", "max_opset", "default_trt_target", "fold_constants", "check_model", "check_onnx",
           "check_artifact", "CheckReport", "GraphReport", "Finding"]
