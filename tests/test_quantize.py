"""Weight-only INT8/INT4 quantization (export.quantize): the block math, both graph forms (ONNX Runtime's
MatMulNBits and DequantizeLinear -> MatMul), exports of a tiny model, the manifest record, check/build,
option errors, speculative == AR and the quality report."""
from __future__ import annotations

import json

import numpy as np
import pytest

from spectrt.export.onnx_graph import GraphBuilder
from spectrt.export.quantize import (ACCURACY_LEVEL, QuantizedWeights, QuantSpec,
                                     dequantize_blocks, pack_matmulnbits, quantize_blocks)
from spectrt.runtime.artifact import WeightsInfo, load_artifact, parse_manifest
from spectrt.runtime.errors import SpectrtError

QMAX = {8: 127, 4: 7}


# ----------------------------------------------------------------------------- block math (numpy only)

@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("K,block", [(64, 32), (96, 64), (576, 128), (128, 128)])
def test_quantize_blocks_exact(bits, K, block):
    """scale = max|w| / qmax per block (last block may be partial); q = rint(w / scale); |w - q*scale| <= scale/2."""
    rng = np.random.default_rng(K + bits)
    w = rng.standard_normal((K, 24)).astype(np.float32)
    w[:block, 3] = 0.0  # an all-zero block gets scale 1 and q 0
    t = quantize_blocks(w, bits, block)
    q, s = t.q, t.scales
    assert t.offset is None and t.bits == bits
    nb = -(-K // block)
    assert q.shape == w.shape and q.dtype == np.int8 and s.shape == (nb, 24) and s.dtype == np.float32
    assert np.abs(q).max() <= QMAX[bits]
    for b in range(nb):
        rows = slice(b * block, min(K, (b + 1) * block))
        amax = np.abs(w[rows]).max(0)
        want = np.where(amax == 0, np.float32(1), (amax / np.float32(QMAX[bits])).astype(np.float32))
        np.testing.assert_array_equal(s[b], want)
        np.testing.assert_array_equal(q[rows], np.clip(np.rint(w[rows] / want), -QMAX[bits], QMAX[bits]))
        deq = dequantize_blocks(q, s, block)[rows]
        np.testing.assert_array_equal(deq, q[rows].astype(np.float32) * s[b])
        assert (np.abs(deq - w[rows]) <= s[b] / 2 * (1 + 1e-6)).all()
    assert s[0, 3] == 1 and not q[:block, 3].any()


@pytest.mark.parametrize("bits", [8, 4])
def test_full_symmetric_grid(bits):
    """symmetric-full: the block's largest-magnitude value lands on -2^(bits-1) exactly (scale negative for a
    positive one), the lowest level is used, rounding error is half a step within reach of both signs' levels
    and a step at most (at 4 bits well below the ±qmax grid's)."""
    rng = np.random.default_rng(bits)
    w = rng.standard_normal((96, 40)).astype(np.float32)
    w[:32, 5] = 0.0
    full, half = quantize_blocks(w, bits, 32, "symmetric-full"), quantize_blocks(w, bits, 32, "symmetric")
    lo = -(1 << (bits - 1))
    assert full.q.min() == lo and full.q.max() <= -lo - 1 and full.offset is None
    deq = full.dequantized(32)
    for b in range(3):
        rows = slice(32 * b, 32 * b + 32)
        top = np.abs(w[rows]).argmax(0)
        v = w[rows][top, np.arange(40)]
        live = v != 0
        np.testing.assert_array_equal(full.scales[b][live], (v / np.float32(lo)).astype(np.float32)[live])
        np.testing.assert_array_equal(deq[rows][top, np.arange(40)][live], v[live])  # exact
        err, step = np.abs(deq[rows] - w[rows]), np.abs(full.scales[b])
        assert (err <= step * (1 + 1e-6)).all()  # a step at most: the opposite sign tops out at +2^(bits-1) - 1
        inside = np.abs(w[rows]) <= step * (-lo - 1)  # within reach of both signs' levels
        assert (err[inside] <= np.broadcast_to(step, err.shape)[inside] / 2 * (1 + 1e-6)).all()
    assert full.scales[0, 5] == 1 and not full.q[:32, 5].any()
    if bits == 4:  # a step 7/8 of the ±7 grid's: (7/8)^2 of its mean squared error, about
        assert np.square(deq - w).mean() < 0.9 * np.square(half.dequantized(32) - w).mean()
    with pytest.raises(SpectrtError, match="unknown quantization grid 'bad'"):
        quantize_blocks(w, bits, 32, "bad")


@pytest.mark.parametrize("bits", [8, 4])
def test_matmulnbits_packing_round_trips(bits):
    rng = np.random.default_rng(bits)
    q = rng.integers(-QMAX[bits], QMAX[bits] + 1, (80, 5)).astype(np.int8)  # 80 rows: blocks of 32, 32, 16+pad
    packed = pack_matmulnbits(q, bits, 32)
    assert packed.dtype == np.uint8 and packed.shape == (5, 3, 32 * bits // 8)
    if bits == 4:
        u = np.stack([packed & 15, packed >> 4], -1).reshape(5, 3, 32)  # low nibble first
    else:
        u = packed
    got = u.reshape(5, 96).T.astype(np.int16) - (1 << (bits - 1))
    np.testing.assert_array_equal(got[:80], q)
    assert not got[80:].any()  # padding holds the zero point


# ----------------------------------------------------------------------------- one quantized MatMul on ORT

def _single_matmul(fmt: str, bits: int, block: int, w: np.ndarray, opset: int, row_pad: bool = True,
                   grid: str = "symmetric"):
    import onnxruntime as ort
    from onnx import helper

    K, N = w.shape
    t = quantize_blocks(w, bits, block, grid)
    kind = {8: "int8", 4: "int4"}[bits]
    g = GraphBuilder("one", opset, "float32")
    g.quant = QuantizedWeights(QuantSpec(kind, block, fmt, row_pad=row_pad), {"w": t})
    g.inputs.append(helper.make_tensor_value_info("x", 1, ["m", K]))
    g.op("Identity", g.quant.matmul(g, "x", "w", rank=2), outputs=["y"])
    g.outputs.append(helper.make_tensor_value_info("y", 1, ["m", N]))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(g.model("test").SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess, t


@pytest.mark.parametrize("fmt,opset", [("matmulnbits", 17), ("qdq", 21)])
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("asymmetric", [False, True])
def test_quantized_matmul_within_bound(fmt, opset, bits, asymmetric):
    """ORT's output vs x @ W (float): within the bound the quantization steps give, term by term:
    weights |x| @ |W - Wq| (at most half a step each, a step for the full grid's far side), plus int8
    activations (accuracy level 4: per block of x, step max|x|/127) |dx| @ |q*scale| with
    |dx| <= max|x_block| / 254 (an asymmetric grid's offset term is fp32)."""
    rng = np.random.default_rng(bits)
    K, N, block = 80, 40, 32  # 80: a partial last block
    w = rng.standard_normal((K, N)).astype(np.float32) + (1.5 if asymmetric else 0)  # off-centre weights
    x = rng.standard_normal((3, K)).astype(np.float32)
    grid = "asymmetric" if asymmetric else "symmetric-full" if fmt == "matmulnbits" else "symmetric"
    sess, t = _single_matmul(fmt, bits, block, w, opset, grid=grid)
    y = sess.run(None, {"x": x})[0]
    step = np.abs(np.repeat(t.scales, block, axis=0)[:K])  # [K, N] step of each weight
    deq = dequantize_blocks(t.q, t.scales, block)  # q * scale, without the offset
    werr = np.abs(w - t.dequantized(block))
    assert (werr <= step * (1 + 1e-6)).all()
    xp = np.zeros((3, -(-K // block) * block), np.float32)
    xp[:, :K] = x
    xmax = np.abs(xp.reshape(3, -1, block)).max(-1).repeat(block, -1)[:, :K]  # [3, K]
    bound = np.abs(x) @ werr + (xmax / 254) @ np.abs(deq)
    err = np.abs(y - x @ w)
    assert (err <= bound * 1.01 + 1e-5).all(), float((err / bound).max())
    assert err.max() > 0  # it is quantized


@pytest.mark.parametrize("bits", [8, 4])
def test_rows_do_not_depend_on_how_many(bits):
    """Speculative == AR needs a token's numbers to be the same in a decode step and in a tree pass: rows
    are bit-identical for any M >= 2 (a one-token call padded with a dummy row, as the runner does for
    ``row_pad`` exports); int8 also for M = 1."""
    w = np.random.default_rng(1).standard_normal((576, 192)).astype(np.float32)
    x = np.random.default_rng(2).standard_normal((5, 576)).astype(np.float32)
    sess, _ = _single_matmul("matmulnbits", bits, 32, w, 17)
    many = sess.run(None, {"x": x})[0]
    for i in range(5):
        np.testing.assert_array_equal(sess.run(None, {"x": np.stack([x[i], x[i]])})[0][0], many[i])
        if bits == 8:
            np.testing.assert_array_equal(sess.run(None, {"x": x[i:i + 1]})[0][0], many[i])


def test_qdq_graph_form():
    """qdq: blocked DequantizeLinear (axis 0, no zero point: symmetric) feeding MatMul; INT4 needs IR 10."""
    import onnx

    w = np.random.default_rng(0).standard_normal((64, 8)).astype(np.float32)
    sess, _ = _single_matmul("qdq", 4, 32, w, 21)
    g = GraphBuilder("one", 21, "float32")
    g.quant = QuantizedWeights(QuantSpec("int4", 32, "qdq"), {"w": quantize_blocks(w, 4, 32)})
    g.quant.matmul(g, "x", "w")
    dq = next(n for n in g.nodes if n.op_type == "DequantizeLinear")
    attrs = {a.name: a.i for a in dq.attribute}
    assert attrs == {"axis": 0, "block_size": 32} and len(dq.input) == 2
    assert {t.data_type for t in g.initializers} >= {onnx.TensorProto.INT4}
    assert g.model("t").ir_version == 10


# ----------------------------------------------------------------------------- spec, manifest record

def test_spec_errors():
    with pytest.raises(SpectrtError, match="--block 48"):
        QuantSpec("int4", 48).check(17)
    with pytest.raises(SpectrtError, match="--weights int3"):
        QuantSpec("int3").check(17)
    with pytest.raises(SpectrtError, match="needs --opset 21"):
        QuantSpec("int4", 32, "qdq").check(20)
    with pytest.raises(SpectrtError, match="--quantize-lm-head/--quantize-embeddings/--scheme/--awq need"):
        QuantSpec("float", lm_head=True).check(17)
    with pytest.raises(SpectrtError, match="--quantize-embeddings needs --weights-format matmulnbits"):
        QuantSpec("int4", 32, "qdq", embeddings=True).check(21)
    with pytest.raises(SpectrtError, match="not one"):
        QuantSpec("int4", scheme="gguf").check(17, gguf_source=False)
    with pytest.raises(SpectrtError, match="GGUF blocks hold 32 values"):
        QuantSpec("int4", 64, scheme="gguf").check(17, gguf_source=True)
    with pytest.raises(SpectrtError, match="--scheme awq"):
        QuantSpec("int4", scheme="awq").check(17)
    QuantSpec("int8", 64, "qdq").check(21)
    assert QuantSpec().info("symmetric") is None
    assert QuantSpec("int4", 32, "matmulnbits").info("asymmetric").accuracy_level == ACCURACY_LEVEL


# ----------------------------------------------------------------------------- tiny exports

VARIANTS = {
    "int4-matmulnbits": dict(weights="int4", quantize_lm_head=True),  # auto: asymmetric; LM head int8, 2-D
    "int4-qdq": dict(weights="int4", weights_format="qdq", quantize_lm_head=True),  # the same tensors in qdq form
    "int8-matmulnbits-head-b128": dict(weights="int8", block=128, quantize_lm_head=True, scheme="symmetric"),
    "int4-embeddings": dict(weights="int4", quantize_embeddings=True),  # tied: one GatherBlockQuantized table
    "int4-vocab4": dict(weights="int4", quantize_embeddings=True, vocab_bits=4),  # the table at 4 bits too
}


@pytest.fixture(scope="module")
def quant_exports(tiny_models, tmp_path_factory):
    from spectrt.export.exporter import ExportOptions, export_model

    root = tmp_path_factory.mktemp("quant")
    out = {"float": export_model(str(tiny_models["llama"]), root / "float", ExportOptions(max_context=256),
                                 progress=lambda *_: None)}
    for name, kw in VARIANTS.items():  # validated on export: exact kernels vs torch holding q * scale
        out[name] = export_model(str(tiny_models["llama"]), root / name, ExportOptions(max_context=256, **kw),
                                 progress=lambda *_: None)
    return out


def test_manifest_records_weights(quant_exports):
    assert load_artifact(quant_exports["float"]).manifest.weights is None
    m = load_artifact(quant_exports["int4-qdq"]).manifest
    assert m.weights == WeightsInfo("int4", 32, "qdq", True, "asymmetric-rtn", None, False) and m.opset == 21
    assert load_artifact(quant_exports["int4-matmulnbits"]).manifest.weights.scheme == "asymmetric-rtn"
    w = load_artifact(quant_exports["int4-embeddings"]).manifest.weights
    assert w.embeddings and w.lm_head and w.scheme == "asymmetric-rtn"
    m = load_artifact(quant_exports["int8-matmulnbits-head-b128"]).manifest
    assert (m.weights.kind, m.weights.block, m.weights.format, m.weights.lm_head) == ("int8", 128, "matmulnbits", True)
    assert m.weights.scheme == "symmetric-full-rtn"  # K = 64 < 128: one partial block; all 256 levels
    assert m.weights.accuracy_level == ACCURACY_LEVEL and m.opset == 17
    assert all(row.ok for row in m.validation) and m.validation  # contract tolerances, exact kernels
    data = json.loads((quant_exports["int4-matmulnbits"] / "manifest.json").read_text())
    data["weights"]["kind"] = "int3"
    with pytest.raises(ValueError, match="weights.kind: 'int3'"):
        parse_manifest(data)
    del data["weights"]  # manifests without the record (float exports, older spectrt) still load
    assert parse_manifest(data).weights is None


def test_graph_forms_and_bytes(quant_exports):
    import onnx

    ops = {}
    for name in ("float", "int4-matmulnbits", "int4-qdq"):
        m = onnx.load(str(quant_exports[name] / "base.onnx"), load_external_data=False)
        ops[name] = {n.op_type for n in m.graph.node}
    assert "MatMulNBits" in ops["int4-matmulnbits"] and "DequantizeLinear" not in ops["int4-matmulnbits"]
    assert "DequantizeLinear" in ops["int4-qdq"] and "MatMulNBits" not in ops["int4-qdq"]
    # matmulnbits graphs are ONNX Runtime's fused form (fused QKV / gate-up, GroupQueryAttention on an
    # in-place cache, packed q/k/v with rotary inside); qdq keeps the standard ops and the token-major cache
    # TensorRT takes
    m4 = onnx.load(str(quant_exports["int4-matmulnbits"] / "base.onnx"), load_external_data=False)
    fused = {"GroupQueryAttention", "SkipSimplifiedLayerNormalization"}
    assert fused <= ops["int4-matmulnbits"] and "RotaryEmbedding" not in ops["int4-matmulnbits"]
    gqa = [n for n in m4.graph.node if n.op_type == "GroupQueryAttention"]
    made_by = {o: n for n in m4.graph.node for o in n.output}
    assert all(n.input[1] == n.input[2] == "" for n in gqa)  # packed q/k/v
    # rotary inside, at the caller's positions plus the dummy row's (attention never sees one row)
    assert all(made_by[n.input[9]].op_type == "Concat" and made_by[n.input[9]].input[0] == "position_ids" for n in gqa)
    assert all(made_by[n.input[0]].op_type == "Concat" for n in gqa)  # q/k/v rows + the dummy
    assert sum(n.op_type == "Slice" and n.input[0] in {g.output[0] for g in gqa} for n in m4.graph.node) == len(gqa)
    layer_products = [n for n in m4.graph.node if n.op_type == "MatMulNBits" and n.name.startswith("layers.")]
    assert len(layer_products) == 4 * 2  # 2 layers: qkv, o, gate_up, down
    assert not fused & ops["int4-qdq"]
    assert load_artifact(quant_exports["int4-matmulnbits"]).graph("base").kv_layout == "in-place"
    assert load_artifact(quant_exports["int4-qdq"]).graph("base").kv_layout == "token-major"
    # no product is padded in the graph: only the attention bias, once, for the dummy row
    assert sum(n.op_type == "Pad" for n in m4.graph.node) == 1
    w = load_artifact(quant_exports["int4-matmulnbits"]).manifest.weights
    assert w.row_pad and w.attention_pad
    size = {n: load_artifact(p).graph("base").bytes for n, p in quant_exports.items()}
    assert size["int4-matmulnbits"] < size["float"] and size["int4-qdq"] < size["float"]
    assert size["int4-embeddings"] < size["int4-matmulnbits"]


def test_quantized_embeddings_share_the_tied_table(quant_exports):
    """--quantize-embeddings on a tied model: GatherBlockQuantized and the LM head's MatMulNBits read one
    packed initializer, no float table is left, and the rows it gathers are the torch model's (validated
    on export) -- the asymmetric projections carry their offset MatMul."""
    import onnx

    m = onnx.load(str(quant_exports["int4-embeddings"] / "base.onnx"), load_external_data=False)
    gather = next(n for n in m.graph.node if n.op_type == "GatherBlockQuantized")
    head = next(n for n in m.graph.node if n.op_type == "MatMulNBits" and n.name == "lm_head")
    assert gather.input[0] == head.input[1]
    assert not any(n.op_type == "Gather" and n.input[0] == "embed_tokens" for n in m.graph.node)
    assert not any(i.name == "embed_tokens" for i in m.graph.initializer)
    assert any(n.name.endswith(".offset") for n in m.graph.node)
    assert all(row.ok for row in load_artifact(quant_exports["int4-embeddings"]).manifest.validation)


def _greedy(path, prompt, n=24):
    from spectrt.runtime.golden import greedy_trace
    from spectrt.runtime.ort_runner import OrtBaseRunner

    art = load_artifact(path)
    with OrtBaseRunner(art, max_q=16) as base:
        return greedy_trace(base, prompt, n)


def test_formats_agree(quant_exports):
    """matmulnbits and qdq hold the same (q, scales): ORT runs both through MatMulNBits at accuracy level 4
    (qdq by fusing DequantizeLinear + MatMul), so their greedy tokens agree wherever the margin is clear."""
    from spectrt.runtime.golden import TIE_MARGIN

    for prompt in ([5, 9, 33, 7], [40, 41, 42]):
        a, ma = _greedy(quant_exports["int4-matmulnbits"], prompt)
        b, _ = _greedy(quant_exports["int4-qdq"], prompt)
        k = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
        assert k == len(a) or ma[k] < TIE_MARGIN["float32"], (prompt, k, a, b)


def test_speculative_equals_ar_on_quantized(quant_exports):
    from spectrt.runtime.generate import Decoder
    from spectrt.runtime.lookup import LookupDrafter
    from spectrt.runtime.ort_runner import OrtBaseRunner

    for name in ("int4-matmulnbits", "int8-matmulnbits-head-b128", "int4-embeddings"):
        art = load_artifact(quant_exports[name])
        drafter = LookupDrafter()
        with OrtBaseRunner(art, max_q=max(16, drafter.max_nodes)) as base:
            ar = Decoder(base, None, (), prefill_chunk=16).generate([5], 120).tokens
            spec = Decoder(base, drafter, (), prefill_chunk=16).generate([5], 120).tokens
        assert spec == ar


def test_check_and_build_know_the_formats(quant_exports):
    from spectrt.profiles.build import build_engines
    from spectrt.profiles.check import check_artifact

    rep = check_artifact(quant_exports["int4-matmulnbits"])
    base = next(g for g in rep.graphs if g.name == "base")
    assert not rep.ok and [f.where for f in base.errors] == ["weights"]
    assert "ORT-only" in base.errors[0].message and "--weights-format qdq" in base.errors[0].message
    with pytest.raises(SpectrtError, match="re-export with --weights int4 --weights-format qdq"):
        build_engines(quant_exports["int4-matmulnbits"], "orin-nano-8gb", dry_run=True, progress=lambda *_: None)
    rep = check_artifact(quant_exports["int4-qdq"], trt_version="10.15")
    assert rep.ok, rep.format(verbose=True)
    assert not check_artifact(quant_exports["int4-qdq"], trt_version="10.3").ok  # opset 21 > 20
    with pytest.raises(SpectrtError, match="TensorRT 10.3 does not parse"):
        build_engines(quant_exports["int4-qdq"], "orin-nano-8gb", dry_run=True, progress=lambda *_: None)


@pytest.mark.parametrize("args,message", [
    (["--weights", "int4", "--weights-format", "qdq", "--opset", "20"], "needs --opset 21"),
    (["--quantize-lm-head"], "--quantize-lm-head/--quantize-embeddings/--scheme/--awq need --weights int8 or int4"),
    (["--weights", "int4", "--scheme", "gguf"], "--scheme gguf takes the blocks of a .gguf source"),
    (["--weights", "int4", "--weights-format", "qdq", "--quantize-embeddings"], "needs --weights-format matmulnbits"),
    (["--block", "48"], "'48' is not one of '32', '64', '128'"),
    (["--weights", "int3"], "'int3' is not one of 'float', 'int8', 'int4'"),
])
def test_bad_options_exit_2_before_writing(tiny_models, tmp_path, capsys, args, message):
    from spectrt.cli import main

    out = tmp_path / "out"
    assert main(["export", "-m", str(tiny_models["llama"]), "-o", str(out), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_quality_report(quant_exports, tmp_path):
    from spectrt.runtime.quality import evaluate

    text = tmp_path / "heldout.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 20)
    rep = evaluate([str(quant_exports["int4-matmulnbits"]), str(quant_exports["float"])], str(quant_exports["float"]),
                   str(text), max_tokens=300, window=64, new_tokens=8, progress=lambda *_: None)
    q4, same, ref = rep.exports
    assert ref.top1_agreement is None and ref.perplexity > 1
    assert same.perplexity == ref.perplexity and same.top1_agreement == 1.0 and same.greedy_identical_prompts == 4
    assert 0 <= q4.top1_agreement <= 1 and 0 <= q4.greedy_prefix_agreement <= 1 and np.isfinite(q4.perplexity)
    assert q4.base_bytes < ref.base_bytes
    assert "perplexity" in rep.format() and rep.to_json()["exports"][0]["weights"].startswith("int4")


@pytest.mark.parametrize("kind,scheme", [("int4", "symmetric-rtn"), ("int4", "symmetric-full-rtn"),
                                         ("int4", "asymmetric-rtn"), ("int8", "asymmetric-rtn")])
def test_element_bytes_match_the_stored_tensors(kind, scheme):
    """WeightsInfo.element_bytes (what the roofline cost model reads) is what QuantizedLinear stores."""
    bits = {"int4": 4, "int8": 8}[kind]
    w = np.random.default_rng(0).standard_normal((128, 48)).astype(np.float32)
    info = WeightsInfo(kind, 32, "matmulnbits", scheme=scheme)
    t = quantize_blocks(w, bits, 32, {"symmetric-rtn": "symmetric", "symmetric-full-rtn": "symmetric-full"}.get(scheme, "asymmetric"))
    assert t.nbytes() / w.size == info.element_bytes()
    assert quantize_blocks(w, 8, 32).nbytes() / w.size == info.element_bytes(vocab=True)
    info4 = WeightsInfo(kind, 32, "matmulnbits", scheme=scheme, lm_head=True, vocab_bits=4)
    assert quantize_blocks(w, 4, 32).nbytes() / w.size == info4.element_bytes(vocab=True)


def test_vocab_bits(quant_exports):
    """--vocab-bits 4: the shared embedding / LM head table is stored as 4-bit blocks (fewer bytes than the
    8-bit one), read by GatherBlockQuantized and MatMulNBits at 4 bits; the export validated against torch
    holding the same 4-bit values; the manifest says so."""
    import onnx

    w = load_artifact(quant_exports["int4-vocab4"]).manifest.weights
    assert w.vocab_bits == 4 and w.embeddings and "LM head int4" in w.label()
    assert load_artifact(quant_exports["int4-embeddings"]).manifest.weights.vocab_bits == 8
    m = onnx.load(str(quant_exports["int4-vocab4"] / "base.onnx"), load_external_data=False)
    table_ops = [n for n in m.graph.node if n.op_type == "GatherBlockQuantized" or n.name.startswith("lm_head")]
    assert table_ops and all(a.i == 4 for n in table_ops for a in n.attribute if a.name == "bits")
    size = {n: load_artifact(quant_exports[n]).graph("base").bytes for n in ("int4-embeddings", "int4-vocab4")}
    assert size["int4-vocab4"] < size["int4-embeddings"]
    with pytest.raises(SpectrtError, match="--vocab-bits 6"):
        QuantSpec("int4", vocab_bits=6).check(17)
    with pytest.raises(SpectrtError, match="add --quantize-lm-head or --quantize-embeddings"):
        QuantSpec("int4", vocab_bits=4).check(17)
    data = json.loads((quant_exports["int4-vocab4"] / "manifest.json").read_text())
    data["weights"]["vocab_bits"] = 2
    with pytest.raises(ValueError, match="vocab_bits: 2"):
        parse_manifest(data)


def test_in_place_cache_moves_out_of_place_rows(quant_exports):
    """ORT-fused graphs keep the cache in place (one head-major buffer per layer, input and output); a commit
    of tree rows that are not in place moves them, so the next call sees the past a causal run of the
    accepted path leaves."""
    from spectrt.runtime.ort_runner import OrtBaseRunner

    art = load_artifact(quant_exports["int8-matmulnbits-head-b128"])  # int8: one kernel for any row count
    assert art.graph("base").kv_layout == "in-place"
    prompt = [5, 9, 13, 2]
    tree = np.array([[1, 0, 0], [1, 1, 0], [1, 0, 1]], bool)  # root; a and b both under it
    with OrtBaseRunner(art, max_q=8) as run:
        run.forward(np.array(prompt), np.arange(4), np.tri(4, dtype=bool))
        run.commit(range(4))
        run.forward(np.array([7, 11, 3]), np.array([4, 5, 5]), tree)
        run.commit([0, 2])  # root and b: b moves from slot 2 to slot 1
        after_tree = run.forward(np.array([8]), np.array([6]), np.ones((1, 1), bool)).logits.copy()
        run.reset()
        run.forward(np.array(prompt + [7, 3]), np.arange(6), np.tri(6, dtype=bool))
        run.commit(range(6))
        causal = run.forward(np.array([8]), np.array([6]), np.ones((1, 1), bool)).logits.copy()
        run.rollback(2)  # without the move the past would hold a's row: a different prediction
        run.forward(np.array([7, 11]), np.array([4, 5]), np.tri(2, dtype=bool))
        run.commit(range(2))
        wrong = run.forward(np.array([8]), np.array([6]), np.ones((1, 1), bool)).logits.copy()
    np.testing.assert_allclose(after_tree, causal, atol=1e-3)
    assert np.abs(wrong - causal).max() > 1e-2


@pytest.mark.parametrize("name", ["int4-matmulnbits", "int8-matmulnbits-head-b128", "int4-embeddings"])
def test_one_token_call_is_a_row_of_a_chunk(quant_exports, name):
    """Speculative == AR rests on this: a token decoded alone gives bit for bit the logits it gets as the last
    row of a causal chunk (ORT's one-row kernels -- int4 MatMulNBits, GroupQueryAttention's decode path --
    round differently, so the runner gives one-token calls a dummy second row)."""
    from spectrt.runtime.ort_runner import OrtBaseRunner

    art = load_artifact(quant_exports[name])
    assert art.manifest.weights.row_pad
    prompt = [5, 9, 13, 2, 7]
    with OrtBaseRunner(art, max_q=8) as run:
        run.forward(np.array(prompt), np.arange(5), np.tri(5, dtype=bool))
        run.commit(range(5))
        chunk = run.forward(np.array([11, 3]), np.array([5, 6]), np.tri(2, dtype=bool)).logits[1].copy()
        run.forward(np.array([11]), np.array([5]), np.ones((1, 1), bool))
        run.commit([0])
        alone = run.forward(np.array([3]), np.array([6]), np.ones((1, 1), bool)).logits[0].copy()
    np.testing.assert_array_equal(alone, chunk)


@pytest.mark.parametrize("name", ["int4-matmulnbits", "int8-matmulnbits-head-b128"])
def test_the_load_probe_pads_exactly_when_one_row_calls_differ(quant_exports, name):
    """The runner's probe at load (``OrtBaseRunner.one_row_exact``) decides whether one-token calls need the
    dummy row: it pads iff an unpadded one-token call differs from row 0 of a two-token call (on this CPU),
    and, either way, the graph's own attention dummy keeps GroupQueryAttention off its one-row path."""
    from spectrt.runtime.ort_runner import OrtBaseRunner

    art = load_artifact(quant_exports[name])
    prompt = [5, 9, 13, 2, 7, 4]
    with OrtBaseRunner(art, max_q=8) as run:
        decided = run.pad_single
        gap = run.one_row_gap()  # the probe as a number: 0 exactly when it decided not to pad
        assert decided == (gap != 0.0) and run.pad_single == decided and run.past == 0  # setting kept, cache reset
        run.pad_single = False  # what an unpadded call gives, at another prefix than the probe's
        run.forward(np.array(prompt), np.arange(6), np.tri(6, dtype=bool))
        run.commit(range(6))
        alone = run.forward(np.array([11]), np.array([6]), np.ones((1, 1), bool)).logits[0].copy()
        chunk = run.forward(np.array([11, 3]), np.array([6, 7]), np.tri(2, dtype=bool)).logits[0].copy()
    assert decided == (not np.array_equal(alone, chunk))


def test_attention_dummy_has_its_slot_at_a_full_context(tiny_models, tmp_path):
    """The dummy row's KV lands one slot past the call's: decoding up to the last slot of max_context
    (padded or not) stays inside the cache and equals the causal chunk, then the context is full."""
    from spectrt.export.exporter import ExportOptions, export_model
    from spectrt.runtime.ort_runner import ContextFull, OrtBaseRunner

    C = 48  # the export's own checks run 32-token chunks
    out = export_model(str(tiny_models["llama"]), tmp_path / "e", ExportOptions(max_context=C, weights="int4"),
                       progress=lambda *_: None)
    art = load_artifact(out)
    assert art.manifest.weights.attention_pad
    ids = (np.arange(C) * 7 + 5) % 250 + 4
    with OrtBaseRunner(art, max_q=C) as run:
        for pad in sorted({run.pad_single, True}):  # what the probe chose (exact), and the runner's dummy row
            run.reset()
            run.pad_single = pad
            chunk = run.forward(ids, np.arange(C), np.tri(C, dtype=bool)).greedy_ids.copy()
            run.reset()
            run.forward(ids[:C - 4], np.arange(C - 4), np.tri(C - 4, dtype=bool))
            run.commit(range(C - 4))
            steps = []
            for i in range(C - 4, C):
                steps.append(int(run.forward(ids[i:i + 1], np.array([i]), np.ones((1, 1), bool)).greedy_ids[0]))
                run.commit([0])
            assert steps == chunk[C - 4:].tolist()
            with pytest.raises(ContextFull):
                run.forward(ids[:1], np.array([C]), np.ones((1, 1), bool))


def test_fused_graph_with_projection_biases(tmp_path):
    """Qwen2's q/k/v biases are concatenated with their fused MatMulNBits (``QuantizedWeights.fuse``);
    the export validates against torch (exact kernels, contract tolerances) with the in-place cache. The
    biases are made non-zero first (a fresh model's are zero, which would hide a dropped bias)."""
    from safetensors.numpy import load_file, save_file

    from spectrt.export.exporter import ExportOptions, export_model
    from tests.conftest import make_tiny_model

    src = make_tiny_model(tmp_path / "qwen2", "qwen2", seed=5)
    rng = np.random.default_rng(0)
    for f in src.glob("*.safetensors"):
        w = load_file(str(f))
        w = {k: (rng.standard_normal(v.shape).astype(v.dtype) if k.endswith("_proj.bias") else v) for k, v in w.items()}
        assert any(k.endswith("q_proj.bias") for k in w)
        save_file(w, str(f), metadata={"format": "pt"})
    out = export_model(str(src), tmp_path / "q", ExportOptions(max_context=128, weights="int4"), progress=lambda *_: None)
    art = load_artifact(out)
    assert art.graph("base").kv_layout == "in-place"
    assert art.manifest.validation and all(row.ok for row in art.manifest.validation)
