"""A small ONNX graph builder: named ops, initializers stored once, inputs/outputs from contract specs."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from spectrt.runtime.artifact import GraphRecord, file_record
from spectrt.runtime.contract import KV_LAYOUTS, TensorSpec, graph_spec, layer_spec
from spectrt.runtime.errors import SpectrtError

ONNX_DTYPES = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16, "int64": TensorProto.INT64,
               "bool": TensorProto.BOOL, "int32": TensorProto.INT32}


class GraphBuilder:
    """Collects nodes and initializers; ``op`` returns output names so code reads like the math."""

    def __init__(self, name: str, opset: int, dtype: str):
        self.name, self.opset, self.dtype = name, opset, dtype
        self.np_dtype = np.dtype(dtype)
        self.nodes, self.inputs, self.outputs, self.initializers = [], [], [], []
        self._names: set[str] = set()
        self._consts: dict = {}
        self.domains: dict[str, int] = {}  # custom op domains in use (com.microsoft for MatMulNBits)
        self.quant = None  # export.quantize.QuantizedWeights: linears emitted quantized (base graph only)

    def _unique(self, base: str) -> str:
        name, i = base, 0
        while name in self._names:
            i += 1
            name = f"{base}_{i}"
        self._names.add(name)
        return name

    def fresh(self, base: str) -> str:
        """A fresh tensor name (for ops whose outputs are named by the caller)."""
        return self._unique(base)

    def weight(self, name: str, array: np.ndarray, dtype: str | None = None) -> str:
        """A named initializer (a model weight), cast to the graph dtype unless ``dtype`` says otherwise."""
        arr = np.ascontiguousarray(np.asarray(array, dtype=np.dtype(dtype) if dtype else self.np_dtype))
        name = self._unique(name)
        self.initializers.append(numpy_helper.from_array(arr, name))
        return name

    def tensor(self, tensor: onnx.TensorProto) -> str:
        """A prebuilt initializer (e.g. packed INT4), renamed to a unique name; returns the name."""
        tensor.name = self._unique(tensor.name)
        self.initializers.append(tensor)
        return tensor.name

    def use_domain(self, domain: str, version: int) -> None:
        self.domains[domain] = version

    def const(self, value, dtype: str = "int64") -> str:
        """A small shared constant (shapes, axes, scalars); deduplicated by value."""
        arr = np.asarray(value, dtype=np.dtype(dtype) if dtype != "model" else self.np_dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            self._consts[key] = self.weight("const", arr, str(arr.dtype))
        return self._consts[key]

    def op(self, op_type: str, *inputs: str, outputs: int | list[str] = 1, name: str | None = None, **attrs):
        """Add one node; returns its output name (or a list when ``outputs`` > 1 or a list of names)."""
        base = name or op_type.lower()
        outs = outputs if isinstance(outputs, list) else [self._unique(f"{base}_out") for _ in range(outputs)]
        for o in outs if isinstance(outputs, list) else ():
            self._names.add(o)
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=self._unique(base), **attrs))
        return outs[0] if len(outs) == 1 else outs

    def add_input(self, spec: TensorSpec, dims: dict) -> str:
        shape, dtype = spec.resolve(dims, self.dtype)
        self.inputs.append(helper.make_tensor_value_info(spec.name, ONNX_DTYPES[dtype], list(shape)))
        self._names.add(spec.name)
        return spec.name

    def add_output(self, spec: TensorSpec, dims: dict, source: str | None) -> str:
        """Expose ``source`` as the contract output ``spec`` (an Identity keeps names stable; folded away
        by ``model``). ``source`` None: a node names its output ``spec.name`` itself."""
        shape, dtype = spec.resolve(dims, self.dtype)
        if source is not None:
            self.op("Identity", source, outputs=[spec.name], name=f"out_{spec.name}")
        self.outputs.append(helper.make_tensor_value_info(spec.name, ONNX_DTYPES[dtype], list(shape)))
        return spec.name

    def _fold_output_identities(self) -> None:
        """Name a node's output after the graph output its Identity copies, and drop the Identity (a copy
        per call per output otherwise: ONNX Runtime keeps Identities that feed graph outputs)."""
        produced = {o for n in self.nodes for o in n.output}
        outputs = {vi.name for vi in self.outputs}
        rename = {}
        for n in self.nodes:
            if (n.op_type == "Identity" and n.output[0] in outputs and n.input[0] in produced
                    and n.input[0] not in outputs and n.input[0] not in rename):
                rename[n.input[0]] = n.output[0]
        if not rename:
            return
        kept = []
        for n in self.nodes:
            if n.op_type == "Identity" and rename.get(n.input[0]) == n.output[0]:
                continue
            n.input[:] = [rename.get(i, i) for i in n.input]
            n.output[:] = [rename.get(o, o) for o in n.output]
            kept.append(n)
        self.nodes = kept

    def model(self, producer: str) -> onnx.ModelProto:
        self._fold_output_identities()
        graph = helper.make_graph(self.nodes, self.name, self.inputs, self.outputs, self.initializers)
        opsets = [helper.make_opsetid("", self.opset)] + [helper.make_opsetid(d, v) for d, v in self.domains.items()]
        model = helper.make_model(graph, opset_imports=opsets, producer_name="spectrt", producer_version=producer)
        int4 = any(t.data_type == TensorProto.INT4 for t in self.initializers)
        # IR 9: readable by onnxruntime >= 1.16 and TensorRT 10; the INT4 type needs IR 10, opset 23 IR 11
        model.ir_version = min(model.ir_version, 11 if self.opset >= 23 else 10 if int4 else 9)
        return model


def save_model(model: onnx.ModelProto, path: str | os.PathLike) -> list[str]:
    """Save with all weights in one external data file ``<name>.data``; returns the files written."""
    path = Path(path)
    data = path.name + ".data"
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data, size_threshold=1024)
    files = [path.name]
    if (path.parent / data).exists():
        files.append(data)
    return files


def declared_dims(model: onnx.ModelProto, graph: str, kv_layout: str = KV_LAYOUTS[0]) -> dict[str, int]:
    """Every fixed dim of ``graph``'s contract spec, read from the model's declared input/output shapes."""
    spec = graph_spec(graph, kv_layout)
    specs = {s.name: s for s in spec.inputs + spec.outputs}
    specs.update({layer_spec(s, 0).name: s for s in spec.per_layer_inputs + spec.per_layer_outputs})
    dims: dict[str, int] = {}
    for vi in list(model.graph.input) + list(model.graph.output):
        s = specs.get(vi.name)
        for d, dim in zip(s.shape if s else (), vi.type.tensor_type.shape.dim):
            if isinstance(d, str) and d not in spec.dynamic and dim.HasField("dim_value"):
                if dims.setdefault(d, dim.dim_value) != dim.dim_value:
                    raise SpectrtError(f"{graph}: dim '{d}' is {dims[d]} and {dim.dim_value} in one graph")
    if isinstance(spec.kv_layers, str):
        first = layer_spec(spec.per_layer_inputs[0], 0).name[:-1]  # past_key. / cache_key.
        dims[spec.kv_layers] = sum(1 for vi in model.graph.input if vi.name.startswith(first))
    missing = sorted(spec.fixed_dims() - set(dims))
    if missing:
        raise SpectrtError(f"{graph}: the built graph does not declare {', '.join(missing)}")
    return dims


def save_graph(model: onnx.ModelProto, root: Path, name: str, kv_layout: str = KV_LAYOUTS[0]) -> GraphRecord:
    """Save ``root/<name>.onnx`` (+ external data) and return its manifest record: files, fixed dims, KV layout."""
    dims = declared_dims(model, name, kv_layout)
    files = save_model(model, Path(root) / f"{name}.onnx")
    return GraphRecord(files=tuple(file_record(root, f) for f in files), dims=dims, kv_layout=kv_layout)
