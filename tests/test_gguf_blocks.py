"""GGUF Q8_0 / Q4_0 / Q4_1 blocks mapped to spectrt's (q, scale, offset) without a float round trip
(export.gguf_blocks): against gguf-py's own quantizer and dequantizer, transformers' q/k un-permutation,
and (slow tier) every projection of the real SmolLM2 GGUF against transformers' fp32 conversion."""
from __future__ import annotations

import numpy as np
import pytest

from spectrt.export.gguf_blocks import GGUF_BLOCK, decode_blocks, unpermute_rows
from spectrt.export.quantize import QuantizedLinear, pack_matmulnbits
from spectrt.runtime.errors import SpectrtError


@pytest.mark.parametrize("type_name", ["Q8_0", "Q4_0", "Q4_1"])
def test_blocks_reproduce_ggufs_dequantization(type_name):
    """q * scale + offset == gguf-py's dequantize, bit for bit, for every value of a [N=6, K=96] tensor."""
    from gguf import GGMLQuantizationType, quants

    qtype = GGMLQuantizationType[type_name]
    w = np.random.default_rng(3).standard_normal((6, 96)).astype(np.float32) + 0.3  # [N, K], off-centre
    raw = quants.quantize(w, qtype)  # [N, bytes per row]
    want = quants.dequantize(raw, qtype)  # [N, K] fp32
    b = decode_blocks(raw, type_name, 6, 96)
    assert b.q.shape == (96, 6) and b.scales.shape == (3, 6) and b.bits == (8 if type_name == "Q8_0" else 4)
    assert (b.offset is not None) == (type_name == "Q4_1")
    lo, hi = (-128, 127) if b.bits == 8 else (-8, 7)
    assert lo <= b.q.min() and b.q.max() <= hi
    got = QuantizedLinear(b.q, b.scales, b.bits, b.offset).dequantized(GGUF_BLOCK)  # [K, N]
    np.testing.assert_array_equal(got, want.T)


def test_blocks_pack_into_matmulnbits_without_loss():
    """The centred 4-bit values pack into MatMulNBits nibbles that unpack to ggml's own nibbles."""
    from gguf import GGMLQuantizationType, quants

    w = np.random.default_rng(4).standard_normal((2, 64)).astype(np.float32)
    raw = quants.quantize(w, GGMLQuantizationType.Q4_1)
    b = decode_blocks(raw, "Q4_1", 2, 64)
    packed = pack_matmulnbits(b.q, 4, GGUF_BLOCK)  # [N, nb, 16]
    ggml = raw.reshape(2, 2, 20)[..., 4:]  # Q4_1 block: fp16 d, fp16 m, 16 bytes
    ggml_vals = np.concatenate([ggml & 15, ggml >> 4], -1)  # byte j holds values j and j + 16
    un = np.empty((2, 2, 32), np.uint8)
    un[..., 0::2], un[..., 1::2] = packed & 15, packed >> 4  # MatMulNBits: byte j holds values 2j, 2j + 1
    np.testing.assert_array_equal(un, ggml_vals)


def test_unpermute_matches_transformers():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    rng = np.random.default_rng(5)
    q = rng.integers(-8, 8, (64, 48)).astype(np.int8)  # [K, N]: N = 6 heads x 8
    s = rng.random((2, 48)).astype(np.float32)
    from spectrt.export.gguf_blocks import GGUFBlocks

    b = unpermute_rows(GGUFBlocks("Q4_1", q, s, s + 1), 6)
    ref = LlamaTensorProcessor()._reverse_permute_weights(q.T, 6, 6)  # transformers works on [N, K]
    np.testing.assert_array_equal(b.q.T, ref)
    np.testing.assert_array_equal(b.scales.T, LlamaTensorProcessor()._reverse_permute_weights(s.T, 6, 6))
    np.testing.assert_array_equal(b.offset, b.scales + 1)


def test_unmapped_types_are_refused():
    with pytest.raises(SpectrtError, match="GGUF type Q6_K has no direct block mapping"):
        decode_blocks(np.zeros(210, np.uint8), "Q6_K", 1, 256)
    with pytest.raises(SpectrtError, match="not whole blocks of 32"):
        decode_blocks(np.zeros(20, np.uint8), "Q4_1", 1, 48)


@pytest.mark.slow
def test_smollm2_blocks_equal_transformers_weights(smollm2_installed):
    """The shipped Q4_1 GGUF: every projection's blocks (q/k un-permuted) and the Q8_0 embedding reproduce
    transformers' fp32 conversion of the same file exactly."""
    from spectrt.export.gguf_blocks import EMBEDDING, GGUFFile
    from spectrt.export.quantize import PROJECTIONS
    from spectrt.export.sources import load_hf, resolve_model

    model, _ = load_hf("smollm2-135m", progress=lambda *_: None)
    f = GGUFFile(resolve_model("smollm2-135m").path)
    cfg = model.config
    assert f.arch == "llama"
    for i in (0, cfg.num_hidden_layers - 1):
        layer = model.model.layers[i]
        for proj in PROJECTIONS:
            parent, _, leaf = proj.partition(".")
            b = f.projection(i, leaf, cfg.num_attention_heads, cfg.num_key_value_heads)
            assert b.type == "Q4_1"
            ref = getattr(getattr(layer, parent), leaf).weight.detach().numpy().T
            np.testing.assert_array_equal(QuantizedLinear(b.q, b.scales, 4, b.offset).dequantized(32), ref)
    e = f.blocks(EMBEDDING)
    assert e.type == "Q8_0"
    np.testing.assert_array_equal(QuantizedLinear(e.q, e.scales, 8).dequantized(32).T,
                                  model.get_input_embeddings().weight.detach().numpy())
