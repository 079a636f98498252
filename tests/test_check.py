"""`spectrt check`: TensorRT 10.x ONNX parser compatibility, on CPU (no TensorRT)."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from spectrt.cli import main
from spectrt.export.onnx_graph import declared_dims
from spectrt.profiles.check import check_artifact, check_model, check_onnx, max_opset, trt_ops
from tests.tiny_artifact import tiny_base_model, write_tiny_artifact
from spectrt.runtime.artifact import load_artifact, sha256_file


def _model(nodes, inputs, outputs, inits=(), opset=17, extra_opsets=()):
    g = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset), *extra_opsets])
    m.ir_version = 9
    return m


def _f(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def _errors(rep):
    return [f.message for f in rep.errors]


def test_ops_table_is_the_trt10_matrix():
    t = trt_ops()
    assert "onnx-tensorrt" in t["source"] and "operators.md" in t["source"]
    ops = t["operators"]
    assert len(ops) > 150
    assert ops["MatMul"]["supported"] and "FP16" in ops["MatMul"]["types"] and "INT64" not in ops["MatMul"]["types"]
    assert not ops["Unique"]["supported"] and not ops["NonZero"].get("since")
    assert ops["RMSNormalization"]["since"] == "10.15" and t["limits"]["topk_max_k"] == 3840
    assert max_opset("10.3") == 20 and max_opset("10.15.1") == 24


def test_tiny_contract_artifact_passes(tmp_path, capsys):
    art = write_tiny_artifact(tmp_path / "tiny")
    report = check_artifact(art)
    assert report.ok, report.format(verbose=True)
    assert {g.name for g in report.graphs} == {"base", "heads", "draft_lm_head"}
    assert main(["check", str(art), "--profile", "orin-nano-8gb", "--json", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    assert "RESULT: OK" in out and "TensorRT 10.3" in out
    assert json.loads((tmp_path / "r.json").read_text())["ok"] is True


def _swap_base(art_dir, model):
    """Replace DIR/base.onnx and fix its manifest hash so load_artifact accepts it."""
    onnx.save_model(model, str(art_dir / "base.onnx"))
    m = json.loads((art_dir / "manifest.json").read_text())
    path = art_dir / "base.onnx"
    m["graphs"]["base"]["files"] = [{"path": path.name, "bytes": path.stat().st_size, "sha256": sha256_file(path)}]
    (art_dir / "manifest.json").write_text(json.dumps(m))


def test_com_microsoft_op_in_artifact_blocks(tmp_path, capsys):
    art = write_tiny_artifact(tmp_path / "tiny", graphs=("base",))
    model = tiny_base_model()
    old = next(n for n in model.graph.node if n.op_type == "Softmax")
    idx = list(model.graph.node).index(old)
    fused = helper.make_node("BiasSoftmax", [old.input[0], old.input[0]], list(old.output), name="fused",
                             domain="com.microsoft", axis=-1)
    model.graph.node.remove(old)
    model.graph.node.insert(idx, fused)
    model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    _swap_base(art, model)
    assert main(["check", str(art)]) == 1
    out = capsys.readouterr().out
    assert "custom-domain op 'com.microsoft::BiasSoftmax'" in out and "1 blocker(s)" in out


def test_unsupported_op_and_newer_op():
    unique = _model([helper.make_node("Unique", ["x"], ["y"], name="u")], [_f("x", [4])], [_f("y", [None])])
    assert any("'Unique' is not supported" in m for m in _errors(check_model(unique, trt_version="10.3")))
    hann = _model([helper.make_node("HannWindow", ["n"], ["w"], name="h")],
                  [helper.make_tensor_value_info("n", TensorProto.INT64, [])], [_f("w", [None])])
    assert any("needs TensorRT >= 10.4" in m for m in _errors(check_model(hann, trt_version="10.3")))
    assert check_model(hann, trt_version="10.4").errors == []
    bogus = _model([helper.make_node("NotAnOnnxOp", ["x"], ["y"])], [_f("x", [4])], [_f("y", [4])])
    assert any("not in TensorRT's ONNX operator table" in m for m in _errors(check_model(bogus)))


def test_opset_out_of_range():
    relu = [helper.make_node("Relu", ["x"], ["y"])]
    assert check_model(_model(relu, [_f("x", [2])], [_f("y", [2])], opset=20), trt_version="10.3").errors == []
    rep = check_model(_model(relu, [_f("x", [2])], [_f("y", [2])], opset=21), trt_version="10.3")
    assert any("opset 21 is outside" in m for m in _errors(rep))


def test_types_int64_matmul_blocks():
    i64 = lambda n, s: helper.make_tensor_value_info(n, TensorProto.INT64, s)  # noqa: E731
    m = _model([helper.make_node("MatMul", ["a", "b"], ["c"])], [i64("a", [2, 3]), i64("b", [3, 2])], [i64("c", [2, 2])])
    assert any("MatMul on INT64" in msg for msg in _errors(check_model(m)))


def _topk(k_nodes, k_name, inits=()):
    nodes = list(k_nodes) + [helper.make_node("TopK", ["x", k_name], ["v", "i"], name="topk", axis=-1)]
    return _model(nodes, [_f("x", [1, 8000])],
                  [_f("v", [1, None]), helper.make_tensor_value_info("i", TensorProto.INT64, [1, None])], inits)


def test_topk_k_limit_including_folded_k():
    k = lambda v: numpy_helper.from_array(np.array([v], np.int64), "k")  # noqa: E731
    assert check_model(_topk([], "k", [k(10)])).errors == []
    assert any("K=5000" in m for m in _errors(check_model(_topk([], "k", [k(5000)]))))
    # K computed from constants (Constant -> Mul): folded on CPU, then checked
    nodes = [helper.make_node("Constant", [], ["two"], value=numpy_helper.from_array(np.array([2], np.int64))),
             helper.make_node("Mul", ["k", "two"], ["k2"], name="double_k")]
    rep = check_model(_topk(nodes, "k2", [k(3000)]))
    assert any("K=6000" in m for m in _errors(rep)) and rep.folded >= 2


def test_constant_inputs_must_fold_and_report_fix():
    axes = numpy_helper.from_array(np.array([1], np.int64), "axes")
    ok = _model([helper.make_node("ReduceSum", ["x", "axes"], ["y"], keepdims=1)],
                [_f("x", [2, 3])], [_f("y", [2, 1])], [axes])
    assert check_model(ok).errors == []
    # axes computed by a constant subgraph: TensorRT wants an initializer; the report names the fix
    folded = _model([helper.make_node("Identity", ["axes"], ["axes2"], name="id"),
                     helper.make_node("ReduceSum", ["x", "axes2"], ["y"], keepdims=1, name="rs")],
                    [_f("x", [2, 3])], [_f("y", [2, 1])], [axes])
    msgs = _errors(check_model(folded))
    assert any("computed from constants" in m and "fold-constants" in m for m in msgs)
    # axes from a run-time input: no fix by folding
    dyn = _model([helper.make_node("ReduceSum", ["x", "a"], ["y"], keepdims=1)],
                 [_f("x", [2, 3]), helper.make_tensor_value_info("a", TensorProto.INT64, [1])], [_f("y", None)])
    assert any("depends on run-time values" in m for m in _errors(check_model(dyn)))


def test_unsupported_op_that_folds_away_gets_fold_hint():
    # Shape of a static input folds, so the (unsupported) Unique only computes a constant
    nodes = [helper.make_node("Shape", ["x"], ["s"]), helper.make_node("Unique", ["s"], ["u"], name="uniq"),
             helper.make_node("Reshape", ["x", "u"], ["y"])]
    rep = check_model(_model(nodes, [_f("x", [2, 3])], [_f("y", None)]))
    msg = next(m for m in _errors(rep) if "Unique" in m)
    assert "fold them first" in msg


def test_contract_conformance(tmp_path):
    model = tiny_base_model()
    model.graph.output.remove(next(o for o in model.graph.output if o.name == "greedy_ids"))
    model.graph.input[0].type.tensor_type.elem_type = TensorProto.INT32
    from spectrt.runtime.contract import BASE
    from tests.tiny_artifact import TINY_DIMS

    rep = check_model(model, spec=BASE, dims=TINY_DIMS, dtype="float32")
    msgs = [f"{f.where}: {f.message}" for f in rep.errors]
    assert any("output 'greedy_ids': missing" in m for m in msgs)
    assert any("input 'input_ids': dtype int32, the contract says int64" in m for m in msgs)


def test_weights_are_not_loaded(tmp_path):
    """External weights stay on disk: check works even when the .data file is gone."""
    model = tiny_base_model(dims={"vocab": 512})
    path = tmp_path / "base.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="base.onnx.data", size_threshold=1024)
    (tmp_path / "base.onnx.data").unlink()
    rep = check_onnx(path, trt_version="10.3")
    assert rep.errors == [] and rep.nodes > 20


def test_unreadable_graph_is_a_blocker(tmp_path):
    p = tmp_path / "bad.onnx"
    p.write_bytes(b"not a protobuf at all \xff\xfe")
    rep = check_onnx(p)
    assert rep.errors and "cannot be read as ONNX" in rep.errors[0].message


def test_bad_target_version(tmp_path):
    art = write_tiny_artifact(tmp_path / "t", graphs=("base", "heads"))
    assert main(["check", str(art), "--trt-version", "8.6"]) == 2
    assert load_artifact(art).has_graph("heads")


def test_real_exporter_base_graph_passes():
    """The lead's exporter (spectrt.export) on a tiny random Llama: its base graph must pass as fp32 and fp16."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    base = pytest.importorskip("spectrt.export.base")
    from spectrt.export.families import HFWeights, decoder_dims, rope_tables
    from spectrt.runtime.contract import BASE

    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    dims = decoder_dims(model.config)
    inv_freq, scale = rope_tables(model)
    for dtype in ("float32", "float16"):
        graph = base.build_base_graph(dims, HFWeights.from_model(model), inv_freq, scale, dtype, 17, "test")
        rep = check_model(graph, name="base", trt_version="10.3", spec=BASE, dims=declared_dims(graph, "base"), dtype=dtype)
        assert rep.errors == [], [f"{f.where}: {f.message}" for f in rep.errors]
        assert rep.op_types["MatMul"] >= 2 * 7
