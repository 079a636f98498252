"""A tiny, contract-conformant artifact built with ``onnx.helper`` (no torch, seconds to make).

Random weights, real math: a one-block attention decoder over ``past + q`` tokens with the tree mask,
Medusa-style heads and a top-k draft LM head. Used by the tests (check/profile/build), and on a device to
smoke-test ``spectrt build`` and the TensorRT runner before spending minutes on a real model:

    python -c "from spectrt.profiles.tiny import write_tiny_artifact as w; w('/tmp/tiny')"
"""
from __future__ import annotations

import os
from pathlib import Path

from spectrt.runtime.contract import BASE, CONTRACT_VERSION, DEFAULT_OPSET, DEFAULT_TOPK, DRAFT_LM_HEAD, HEADS

TINY_DIMS = {"hidden": 32, "vocab": 128, "num_layers": 2, "num_heads": 2, "kv_heads": 2, "head_dim": 16,
             "heads": 3, "topk": 4}


def _onnx_dtype(name: str) -> int:
    from onnx import TensorProto

    return {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16, "int64": TensorProto.INT64,
            "bool": TensorProto.BOOL}[name]


def _value_info(spec, dims: dict, dtype: str):
    from onnx import helper

    shape, dt = spec.resolve(dims, dtype)
    return helper.make_tensor_value_info(spec.name, _onnx_dtype(dt), list(shape))


class _G:
    """Minimal node/initializer collector."""

    def __init__(self, dtype: str, rng):
        import numpy as np

        self.nodes, self.inits, self.n = [], [], 0
        self.dtype, self.np = dtype, np.dtype(dtype)
        self.rng = rng

    def op(self, op_type: str, inputs: list, n_out: int = 1, **attrs):
        from onnx import helper

        self.n += 1
        outs = [f"{op_type.lower()}_{self.n}_{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=f"{op_type}_{self.n}", **attrs))
        return outs[0] if n_out == 1 else outs

    def out(self, op_type: str, inputs: list, outputs: list, **attrs) -> None:
        from onnx import helper

        self.n += 1
        self.nodes.append(helper.make_node(op_type, inputs, outputs, name=f"{op_type}_{self.n}", **attrs))

    def const(self, name: str, value, dtype=None) -> str:
        import numpy as np
        from onnx import numpy_helper

        arr = np.asarray(value, dtype=dtype or self.np)
        self.inits.append(numpy_helper.from_array(arr, name))
        return name

    def weight(self, name: str, shape: tuple, scale: float = 0.2) -> str:
        return self.const(name, self.rng.standard_normal(shape) * scale)

    def model(self, name: str, inputs, outputs, opset: int):
        from onnx import helper

        graph = helper.make_graph(self.nodes, name, inputs, outputs, self.inits)
        m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="spectrt-tiny")
        m.ir_version = 9
        return m


def tiny_base_model(dims: dict | None = None, dtype: str = "float32", opset: int = DEFAULT_OPSET, seed: int = 0):
    """base.onnx per the contract: embeddings + per-layer tree-masked attention over [past | new] KV."""
    import numpy as np
    from onnx import TensorProto, helper

    d = dict(TINY_DIMS, **(dims or {}))
    H, V, L, kvh, hd = d["hidden"], d["vocab"], d["num_layers"], d["kv_heads"], d["head_dim"]
    assert kvh * hd == H, "tiny model: hidden must equal kv_heads * head_dim"
    g = _G(dtype, np.random.default_rng(seed))
    i64 = np.int64
    x = g.op("Gather", [g.weight("embed", (V, H), 1.0), "input_ids"])  # [b, q, H]
    pos = g.op("Gather", [g.weight("pos_embed", (4096, H), 0.1), "position_ids"])
    x = g.op("Add", [x, pos])
    split_heads = g.const("split_heads", [0, 0, kvh, hd], i64)
    merge_heads = g.const("merge_heads", [0, 0, H], i64)
    # full mask [b, 1, q, past + q]: past always visible, then the tree mask
    past_len = g.op("Slice", [g.op("Shape", ["past_key.0"]), g.const("c0", [0], i64), g.const("c1", [1], i64)])
    bq = g.op("Slice", [g.op("Shape", ["tree_mask"]), g.const("c0b", [0], i64), g.const("c2", [2], i64)])
    ones = g.op("ConstantOfShape", [g.op("Concat", [bq, past_len], axis=0)],
                value=helper.make_tensor("one", TensorProto.BOOL, [1], [True]))
    mask = g.op("Unsqueeze", [g.op("Concat", [ones, "tree_mask"], axis=2), g.const("ax1", [1], i64)])
    neg = g.const("neg", [-1e4])
    scale = g.const("scale", [1.0 / np.sqrt(hd)])
    for i in range(L):
        k = g.op("Reshape", [g.op("MatMul", [x, g.weight(f"wk{i}", (H, H))]), split_heads])  # [b, q, kvh, hd]
        v = g.op("Reshape", [g.op("MatMul", [x, g.weight(f"wv{i}", (H, H))]), split_heads])
        g.out("Transpose", [k], [f"new_key.{i}"], perm=[1, 0, 2, 3])  # [q, b, kvh, hd]
        g.out("Transpose", [v], [f"new_value.{i}"], perm=[1, 0, 2, 3])
        qh = g.op("Transpose", [g.op("Reshape", [g.op("MatMul", [x, g.weight(f"wq{i}", (H, H))]), split_heads])],
                  perm=[0, 2, 1, 3])  # [b, kvh, q, hd]
        k_all = g.op("Concat", [f"past_key.{i}", f"new_key.{i}"], axis=0)  # [P, b, kvh, hd]
        v_all = g.op("Concat", [f"past_value.{i}", f"new_value.{i}"], axis=0)
        kt = g.op("Transpose", [k_all], perm=[1, 2, 3, 0])  # [b, kvh, hd, P]
        vt = g.op("Transpose", [v_all], perm=[1, 2, 0, 3])  # [b, kvh, P, hd]
        scores = g.op("Mul", [g.op("MatMul", [qh, kt]), scale])  # [b, kvh, q, P]
        probs = g.op("Softmax", [g.op("Where", [mask, scores, neg])], axis=-1)
        att = g.op("Reshape", [g.op("Transpose", [g.op("MatMul", [probs, vt])], perm=[0, 2, 1, 3]), merge_heads])
        x = g.op("Add", [x, g.op("MatMul", [att, g.weight(f"wo{i}", (H, H))])])
    g.out("Identity", [x], ["hidden_states"])
    g.out("MatMul", [x, g.weight("lm_head", (H, V))], ["logits"])
    g.out("ArgMax", ["logits"], ["greedy_ids"], axis=-1, keepdims=0)
    ins, outs = BASE.expand(L)
    return g.model("base", [_value_info(s, d, dtype) for s in ins], [_value_info(s, d, dtype) for s in outs], opset)


def tiny_heads_model(dims: dict | None = None, dtype: str = "float32", opset: int = DEFAULT_OPSET, seed: int = 1):
    """heads.onnx: hidden [b, H] -> head features [b, heads, H] (one residual SiLU block per head)."""
    import numpy as np

    d = dict(TINY_DIMS, **(dims or {}))
    H, K = d["hidden"], d["heads"]
    g = _G(dtype, np.random.default_rng(seed))
    h = g.op("MatMul", ["hidden_states", g.weight("w", (H, K * H))])
    h = g.op("Mul", [h, g.op("Sigmoid", [h])])
    h = g.op("Reshape", [h, g.const("shape", [0, K, H], np.int64)])
    g.out("Add", [h, g.op("Unsqueeze", ["hidden_states", g.const("ax", [1], np.int64)])], ["head_features"])
    return g.model("heads", [_value_info(s, d, dtype) for s in HEADS.inputs],
                   [_value_info(s, d, dtype) for s in HEADS.outputs], opset)


def tiny_draft_lm_head_model(dims: dict | None = None, dtype: str = "float32", opset: int = DEFAULT_OPSET,
                             seed: int = 2):
    """draft_lm_head.onnx: features [b, heads, H] -> TopK over the vocabulary (ids int64, scores)."""
    import numpy as np

    d = dict(TINY_DIMS, **(dims or {}))
    g = _G(dtype, np.random.default_rng(seed))
    logits = g.op("MatMul", ["head_features", g.weight("lm_head", (d["hidden"], d["vocab"]))])
    g.out("TopK", [logits, g.const("k", [d["topk"]], np.int64)], ["topk_scores", "topk_ids"], axis=-1)
    return g.model("draft_lm_head", [_value_info(s, d, dtype) for s in DRAFT_LM_HEAD.inputs],
                   [_value_info(s, d, dtype) for s in DRAFT_LM_HEAD.outputs], opset)


def write_tiny_artifact(root: str | os.PathLike, dims: dict | None = None, dtype: str = "float32",
                        max_context: int = 256, opset: int = DEFAULT_OPSET,
                        graphs: tuple = ("base", "heads", "draft_lm_head")) -> Path:
    """Write DIR/{graph}.onnx + manifest.json; returns DIR (loadable with ``load_artifact``)."""
    import onnx

    from spectrt.runtime.manifest import sha256_file, write_manifest

    d = dict(TINY_DIMS, **(dims or {}))
    d.setdefault("topk", DEFAULT_TOPK)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    makers = {"base": tiny_base_model, "heads": tiny_heads_model, "draft_lm_head": tiny_draft_lm_head_model}
    records = {}
    for name in graphs:
        f = f"{name}.onnx"
        onnx.save_model(makers[name](d, dtype, opset), str(root / f))
        records[name] = {"file": f, "sha256": {f: sha256_file(root / f)}, "bytes": {f: (root / f).stat().st_size}}
    manifest = {
        "spectrt_version": "tiny",
        "contract_version": CONTRACT_VERSION,
        "model": {k: d[k] for k in ("hidden", "vocab", "num_layers", "num_heads", "kv_heads", "head_dim")}
        | {"source": "tiny-random", "heads": d["heads"], "topk": d["topk"]},
        "dtype": dtype,
        "opset": opset,
        "max_context": max_context,
        "graphs": records,
    }
    write_manifest(root, manifest)
    return root
