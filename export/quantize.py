"""Weight-only quantization of the base graph's MatMul weights (symmetric, block-wise, round-to-nearest).

One source of truth: each weight ``W [in=K, out=N]`` is quantized once into ``q`` (int8 values in
``[-qmax, qmax]``, ``qmax`` = 127 for int8, 7 for int4) and fp32 ``scales [K / block, N]`` with
``scale = max|W| / qmax`` over each block of ``block`` consecutive input rows. The same (q, scales) are
then written into the torch model as ``q * scale`` (so validation, the golden file and the draft heads
see exactly the weights the graph holds) and emitted into the graph in one of two forms:

- ``qdq``: ``DequantizeLinear(q, scale, axis=0, block_size=B) -> MatMul``, the explicit-quantization form
  TensorRT consumes (INT4 dequantize needs symmetric scales: no zero point). Block-wise DequantizeLinear
  and the INT4 type need opset 21. ONNX Runtime (>= 1.20 or so; measured with 1.32) fuses the pair into
  its ``MatMulNBits`` kernel itself, so these graphs also run at low-bit speed on ORT CPU.
- ``matmulnbits``: ONNX Runtime's ``com.microsoft::MatMulNBits`` directly (any opset, ORT only):
  ``q + 2^(bits-1)`` packed as uint8 (two int4 per byte, low nibble first) per output column and block,
  no zero-point input (the default zero point 2^(bits-1) makes it symmetric), ``accuracy_level`` 4
  (int8 activations: the fast path of MLAS, and what the ORT GenAI builder uses for CPU int4).
  int4 inputs get one extra zero row (``row_pad``, see ``QuantizedWeights.matmul``) so that one token
  costs the same numbers in a decode step and in a tree verification: speculative == AR.

Embeddings stay float (a Gather); the LM head is quantized only when asked (``lm_head``).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from spectrt.runtime.artifact import WeightsInfo
from spectrt.runtime.errors import SpectrtError

WEIGHT_KINDS = ("float", "int8", "int4")
WEIGHT_FORMATS = ("matmulnbits", "qdq")
BLOCK_SIZES = (32, 64, 128)
DEFAULT_BLOCK = 32
DEFAULT_FORMAT = "matmulnbits"
QDQ_OPSET = 21  # block-wise DequantizeLinear (block_size) and the INT4 type
ACCURACY_LEVEL = 4  # MatMulNBits: int8 activations (MLAS's fast path on x86/ARM)
BITS = {"int8": 8, "int4": 4}
PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
LM_HEAD = "lm_head"


@dataclass(frozen=True)
class QuantSpec:
    kind: str = "float"  # float | int8 | int4
    block: int = DEFAULT_BLOCK
    format: str = DEFAULT_FORMAT  # matmulnbits | qdq
    lm_head: bool = False
    row_pad: bool = True  # int4 MatMulNBits: one zero row more, so q = 1 runs the q > 1 kernel (see matmul)

    @property
    def quantized(self) -> bool:
        return self.kind != "float"

    @property
    def bits(self) -> int:
        return BITS[self.kind]

    def check(self, opset: int) -> None:
        """One-line errors for bad combinations (before anything is loaded or written)."""
        if self.kind not in WEIGHT_KINDS:
            raise SpectrtError(f"--weights {self.kind}: choose one of {', '.join(WEIGHT_KINDS)}")
        if self.block not in BLOCK_SIZES:
            raise SpectrtError(f"--block {self.block}: choose one of {', '.join(map(str, BLOCK_SIZES))}")
        if self.format not in WEIGHT_FORMATS:
            raise SpectrtError(f"--weights-format {self.format}: choose one of {', '.join(WEIGHT_FORMATS)}")
        if self.quantized and self.format == "qdq" and opset < QDQ_OPSET:
            raise SpectrtError(f"--weights {self.kind} --weights-format qdq needs --opset {QDQ_OPSET} (block-wise "
                               f"DequantizeLinear), not {opset}")
        if not self.quantized and self.lm_head:
            raise SpectrtError("--quantize-lm-head needs --weights int8 or int4")

    def info(self) -> WeightsInfo | None:
        if not self.quantized:
            return None
        return WeightsInfo(kind=self.kind, block=self.block, format=self.format, lm_head=self.lm_head,
                           scheme="symmetric-rtn",
                           accuracy_level=ACCURACY_LEVEL if self.format == "matmulnbits" else None,
                           row_pad=self.pads_rows)

    @property
    def pads_rows(self) -> bool:
        return self.row_pad and self.kind == "int4" and self.format == "matmulnbits"


def _blocks(k: int, block: int) -> int:
    return -(-k // block)


def quantize_blocks(w: np.ndarray, bits: int, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric round-to-nearest of ``w [K, N]`` in blocks of ``block`` rows: (q int8 [K, N], scales
    float32 [ceil(K / block), N]) with ``q = clip(rint(w / scale), -qmax, qmax)``, ``scale = max|w| / qmax``
    (1 for an all-zero block). A last partial block is allowed (ONNX's blocked DequantizeLinear and
    MatMulNBits both take ceil(K / block) blocks)."""
    w = np.asarray(w, np.float32)
    K, N = w.shape
    nb = _blocks(K, block)
    qmax = 2 ** (bits - 1) - 1
    wb = np.zeros((nb * block, N), np.float32)
    wb[:K] = w
    wb = wb.reshape(nb, block, N)
    scales = (np.abs(wb).max(axis=1) / np.float32(qmax)).astype(np.float32)
    scales[scales == 0] = 1.0
    q = np.clip(np.rint(wb / scales[:, None, :]), -qmax, qmax).astype(np.int8)
    return np.ascontiguousarray(q.reshape(nb * block, N)[:K]), scales


def _padded(q: np.ndarray, block: int) -> np.ndarray:
    K, N = q.shape
    out = np.zeros((_blocks(K, block) * block, N), q.dtype)
    out[:K] = q
    return out


def dequantize_blocks(q: np.ndarray, scales: np.ndarray, block: int) -> np.ndarray:
    """``q * scale`` per block, in fp32 (what DequantizeLinear and MatMulNBits compute)."""
    K, N = q.shape
    qp = _padded(q, block)
    return (qp.reshape(-1, block, N).astype(np.float32) * scales[:, None, :]).reshape(-1, N)[:K]


def pack_matmulnbits(q: np.ndarray, bits: int, block: int) -> np.ndarray:
    """MatMulNBits' B input: uint8 ``[N, ceil(K / block), block * bits / 8]`` of ``q + 2^(bits-1)``
    (padding rows of a partial last block hold the zero point, i.e. 0)."""
    qp = _padded(q, block)
    N = q.shape[1]
    u = (qp.astype(np.int16) + (1 << (bits - 1))).astype(np.uint8).T.reshape(N, -1, block)
    if bits == 8:
        return np.ascontiguousarray(u)
    return np.ascontiguousarray(u[..., 0::2] | (u[..., 1::2] << 4)).astype(np.uint8)


@dataclass
class QuantizedLinear:
    q: np.ndarray  # int8 values [K, N]
    scales: np.ndarray  # float32 [K / block, N]

    def dequantized(self, block: int) -> np.ndarray:
        return dequantize_blocks(self.q, self.scales, block)


@dataclass
class QuantizedWeights:
    """The quantized tensors of one export, keyed by graph linear name (``layers.3.q_proj``, ``lm_head``)."""

    spec: QuantSpec
    tensors: dict[str, QuantizedLinear] = field(default_factory=dict)

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def bytes(self) -> int:
        """Bytes of the quantized weights as stored (packed values + fp32 scales)."""
        return sum(t.q.size * self.spec.bits // 8 + t.scales.nbytes for t in self.tensors.values())

    def matmul(self, g, x: str, name: str, rank: int = 3) -> str:
        """``x @ W`` for the quantized weight ``name`` (``x`` of ``rank`` dims, rows on the next-to-last) in
        the spec's format; returns the output name.

        Row padding (int4 MatMulNBits): ONNX Runtime 1.32's int4 kernel at accuracy level 4 takes another
        code path for one row (M = 1) than for several, and the two differ in the last bits; the int8
        activations it quantizes then turn that into visible logit changes, so a decode step (q = 1) and a
        tree verification (q > 1) of the same token disagree at near-ties and speculative output stops
        being AR's (measured: 4 of 6 prompts on SmolLM2). Rows are independent and bit-identical for any
        M >= 2, so one zero row is appended and sliced off again: exact, at the price of the M = 2 kernel.
        int8 (and fp32 compute) give the same bits for every M and need no padding."""
        t, s = self.tensors[name], self.spec
        K, N = t.q.shape
        scale_dtype = g.dtype  # DequantizeLinear's output and MatMulNBits' scales take the activation dtype
        scales = t.scales.astype(np.dtype(scale_dtype))
        if s.format == "qdq":
            if s.bits == 4:
                flat = t.q.reshape(-1)
                flat = np.append(flat, np.int8(0)) if flat.size % 2 else flat
                nib = flat.astype(np.uint8) & 0x0F  # two's complement nibbles, low nibble first (raw_data)
                raw = (nib[0::2] | (nib[1::2] << 4)).astype(np.uint8).tobytes()
                q = helper.make_tensor(f"{name}.weight_q", TensorProto.INT4, [K, N], raw, raw=True)
            else:
                q = numpy_helper.from_array(t.q, f"{name}.weight_q")
            qn = g.tensor(q)
            sn = g.weight(f"{name}.weight_scale", scales, scale_dtype)
            w = g.op("DequantizeLinear", qn, sn, axis=0, block_size=s.block, name=f"{name}.dq")
            return g.op("MatMul", x, w, name=name)
        g.use_domain("com.microsoft", 1)
        packed = g.weight(f"{name}.weight_nbits", pack_matmulnbits(t.q, s.bits, s.block), "uint8")
        sn = g.weight(f"{name}.weight_scale", np.ascontiguousarray(scales.T).reshape(-1), scale_dtype)
        pad = s.pads_rows
        if pad:  # [..., q, K] -> [..., q + 1, K]
            x = g.op("Pad", x, g.const([0] * rank + [0] * (rank - 2) + [1, 0]), name=f"{name}.pad")
        y = g.op("MatMulNBits", x, packed, sn, name=name, domain="com.microsoft", K=K, N=N, bits=s.bits,
                 block_size=s.block, accuracy_level=ACCURACY_LEVEL)
        if pad:
            y = g.op("Slice", y, g.const([0]), g.const([-1]), g.const([rank - 2]), name=f"{name}.unpad")
        return y


def quantize_model(model, num_layers: int, spec: QuantSpec) -> QuantizedWeights:
    """Quantize the decoder's projections (and the LM head if ``spec.lm_head``) of the Hugging Face
    ``model`` once; write the dequantized values back into ``model`` so every torch-side consumer
    (validation, golden file, draft heads) sees the weights the graph holds. A tied LM head is untied
    first: the input embeddings stay float."""
    import torch

    out = QuantizedWeights(spec)
    layers = model.model.layers

    def quantize(module, name: str) -> None:
        w = module.weight.detach().float().numpy().T  # [in, out]
        q, scales = quantize_blocks(w, spec.bits, spec.block)
        out.tensors[name] = QuantizedLinear(q, scales)
        deq = torch.from_numpy(dequantize_blocks(q, scales, spec.block).T.copy()).to(module.weight.dtype)
        module.weight = torch.nn.Parameter(deq, requires_grad=False)  # a new tensor: unties a shared weight

    with torch.no_grad():
        for i in range(num_layers):
            for proj in PROJECTIONS:
                parent, _, leaf = proj.partition(".")
                quantize(getattr(getattr(layers[i], parent), leaf), f"layers.{i}.{leaf}")
        if spec.lm_head:
            quantize(model.get_output_embeddings(), LM_HEAD)
    return out


__all__ = ["ACCURACY_LEVEL", "BLOCK_SIZES", "DEFAULT_BLOCK", "DEFAULT_FORMAT", "QDQ_OPSET", "QuantSpec",
           "QuantizedLinear", "QuantizedWeights", "WEIGHT_FORMATS", "WEIGHT_KINDS", "dequantize_blocks",
           "pack_matmulnbits", "quantize_blocks", "quantize_model"]
