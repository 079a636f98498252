"""Weight-only quantization of the base graph's MatMul weights (block-wise, weight-only).

One source of truth: each weight ``W [in=K, out=N]`` becomes one ``QuantizedLinear``: centred integers
``q`` (int8 storage, ``[-2^(b-1), 2^(b-1) - 1]``), fp32 ``scales [K / block, N]`` and, for asymmetric grids,
an fp32 ``offset [K / block, N]`` added to every weight of its block::

    W[k, n] = q[k, n] * scales[k // block, n] + offset[k // block, n]

The same tensors are written into the torch model as that value (so validation, the golden file and the
draft heads see exactly the weights the graph holds) and emitted into the graph in one of two forms:

- ``qdq``: ``DequantizeLinear(q, scale, axis=0, block_size=B) -> MatMul``, the explicit-quantization form
  TensorRT consumes (its INT4 dequantize needs symmetric scales: no zero point). Block-wise DequantizeLinear
  and the INT4 type need opset 21. ONNX Runtime (measured with 1.32) fuses the pair into ``MatMulNBits``.
- ``matmulnbits``: ONNX Runtime's ``com.microsoft::MatMulNBits`` directly (any opset, ORT only):
  ``q + 2^(bits-1)`` packed as uint8 (two int4 per byte, low nibble first) per output column and block,
  no zero-point input (the default zero point 2^(bits-1) makes it symmetric), ``accuracy_level`` 4
  (int8 activations: the fast path of MLAS, and what the ORT GenAI builder uses for CPU int4).

An offset is applied as ``x @ W = x @ (q * scale) + blocksum(x) @ offset`` with ``blocksum(x)[.., b]`` the sum
of x over block b: a plain fp32 MatMul of K / block rows next to the symmetric low-bit one, in both forms.
(MatMulNBits' own float zero points would do the same, but ONNX Runtime 1.32 runs them through a slow
dequantizing path: 1032 us vs 35 us for one 576 x 1536 int4 product, measured.)

Schemes (``--scheme``): ``symmetric`` (round to nearest, no offsets; in the matmulnbits form on all 2^b
levels with the block's largest-magnitude value on the lowest -- GGUF Q4_0's grid, ORT's own quantizer's,
one level more than the qdq form's ±(2^(b-1) - 1), whose positive scales TensorRT needs), ``asymmetric``
(scale = (max - min) / (2^b - 1) over the block, offset from the minimum; the grid of GGUF's Q4_1),
``gguf`` (a GGUF source's own Q4_0/Q4_1/Q8_0 blocks, no float round trip: ``export.gguf_blocks``) and
``auto`` (``gguf`` when the source's projections are blocks of the asked bits, else ``asymmetric``).

Vocabulary matrices: the LM head (``--quantize-lm-head``) and the input embeddings
(``--quantize-embeddings``, ORT only: ``com.microsoft::GatherBlockQuantized``) are quantized to
symmetric blocks of ``--vocab-bits`` (8, or 4 as ORT GenAI's int4 builder does; a GGUF's Q8_0/Q4_0 table
as it is when its bits are those). A tied table is stored once: the embedding
Gather and the LM head MatMulNBits read the same packed initializer.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from spectrt.export.gguf_blocks import BITS as GGUF_BITS
from spectrt.export.gguf_blocks import EMBEDDING as GGUF_EMBEDDING
from spectrt.export.gguf_blocks import OUTPUT as GGUF_OUTPUT
from spectrt.export.gguf_blocks import GGUF_BLOCK, PROJECTION_NAMES, GGUFFile
from spectrt.runtime.artifact import (DEFAULT_WEIGHT_BLOCK, QUANT_SCHEMES, VOCAB_WEIGHT_BITS, WEIGHT_BITS,
                                      WEIGHT_BLOCKS, WEIGHT_FORMATS, WeightsInfo)
from spectrt.runtime.errors import SpectrtError

WEIGHT_KINDS = ("float", "int8", "int4")
SCHEMES = QUANT_SCHEMES

BLOCK_SIZES = WEIGHT_BLOCKS
DEFAULT_BLOCK = DEFAULT_WEIGHT_BLOCK
DEFAULT_FORMAT = "matmulnbits"
DEFAULT_SCHEME = QUANT_SCHEMES[0]  # auto
QDQ_OPSET = 21  # block-wise DequantizeLinear (block_size) and the INT4 type
ACCURACY_LEVEL = 4  # MatMulNBits: int8 activations (MLAS's fast path on x86/ARM)
# Rounding grids (quantize_blocks): symmetric = 2^bits - 1 levels and positive scales (TensorRT's INT8/INT4
# DequantizeLinear: the qdq form); symmetric-full = all 2^bits levels, the block's largest-magnitude value on
# the lowest (GGUF Q4_0's grid, and ORT's block quantizer's: the matmulnbits form); asymmetric = min..max.
GRIDS = ("symmetric", "symmetric-full", "asymmetric")  # recorded as "<grid>-rtn" (WEIGHT_SCHEMES)
PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
LM_HEAD = "lm_head"
EMBED = "embed_tokens"


@dataclass(frozen=True)
class QuantSpec:
    kind: str = "float"  # float | int8 | int4
    block: int = DEFAULT_BLOCK
    format: str = DEFAULT_FORMAT  # matmulnbits | qdq
    lm_head: bool = False
    row_pad: bool = True  # matmulnbits: the runner calls q = 1 as q = 2 (one kernel; see matmul)
    scheme: str = DEFAULT_SCHEME  # auto | symmetric | asymmetric | gguf (resolved by quantize_model)
    embeddings: bool = False  # GatherBlockQuantized input embeddings (a tied LM head shares them)
    awq: bool = False  # activation-aware scales before rounding (calibration.awq; not with the gguf scheme)
    vocab_bits: int = VOCAB_WEIGHT_BITS[0]  # of the quantized LM head / embeddings

    @property
    def quantized(self) -> bool:
        return self.kind != "float"

    @property
    def bits(self) -> int:
        return WEIGHT_BITS[self.kind]

    def check(self, opset: int, gguf_source: bool = False) -> None:
        """One-line errors for bad combinations (before anything is loaded or written)."""
        if self.kind not in WEIGHT_KINDS:
            raise SpectrtError(f"--weights {self.kind}: choose one of {', '.join(WEIGHT_KINDS)}")
        if self.block not in BLOCK_SIZES:
            raise SpectrtError(f"--block {self.block}: choose one of {', '.join(map(str, BLOCK_SIZES))}")
        if self.format not in WEIGHT_FORMATS:
            raise SpectrtError(f"--weights-format {self.format}: choose one of {', '.join(WEIGHT_FORMATS)}")
        if self.scheme not in SCHEMES:
            raise SpectrtError(f"--scheme {self.scheme}: choose one of {', '.join(SCHEMES)}")
        if self.quantized and self.format == "qdq" and opset < QDQ_OPSET:
            raise SpectrtError(f"--weights {self.kind} --weights-format qdq needs --opset {QDQ_OPSET} (block-wise "
                               f"DequantizeLinear), not {opset}")
        if not self.quantized and (self.lm_head or self.embeddings or self.awq or self.scheme != DEFAULT_SCHEME):
            raise SpectrtError("--quantize-lm-head/--quantize-embeddings/--scheme/--awq need --weights int8 or int4")
        if self.vocab_bits not in VOCAB_WEIGHT_BITS:
            raise SpectrtError(f"--vocab-bits {self.vocab_bits}: choose one of {', '.join(map(str, VOCAB_WEIGHT_BITS))}")
        if self.vocab_bits != VOCAB_WEIGHT_BITS[0] and not (self.lm_head or self.embeddings):
            raise SpectrtError("--vocab-bits sets the quantized LM head / embeddings: add --quantize-lm-head or "
                               "--quantize-embeddings")
        if self.awq and self.scheme == "gguf":
            raise SpectrtError("--awq re-quantizes the float weights: it contradicts --scheme gguf")
        if self.embeddings and self.format != "matmulnbits":
            raise SpectrtError("--quantize-embeddings needs --weights-format matmulnbits (ONNX Runtime's "
                               "GatherBlockQuantized; TensorRT has no block-quantized Gather)")
        if self.scheme == "gguf" and not gguf_source:
            raise SpectrtError("--scheme gguf takes the blocks of a .gguf source; this model is not one")
        if self.scheme == "gguf" and self.block != GGUF_BLOCK:
            raise SpectrtError(f"--scheme gguf: GGUF blocks hold {GGUF_BLOCK} values, not --block {self.block}")

    def grid(self, scheme: str) -> str:
        """The rounding grid of the projections for a resolved round-to-nearest ``scheme`` (and of the
        vocabulary tables for ``symmetric``): the full symmetric grid where the format allows negative scales."""
        if scheme == "asymmetric":
            return "asymmetric"
        return "symmetric-full" if self.format == "matmulnbits" else "symmetric"

    def info(self, scheme: str) -> WeightsInfo | None:
        """The manifest record, with the resolved ``scheme``."""
        if not self.quantized:
            return None
        record = "gguf" if scheme == "gguf" else f"{self.grid(scheme)}-rtn"
        return WeightsInfo(kind=self.kind, block=self.block, format=self.format,
                           lm_head=self.lm_head or self.embeddings, embeddings=self.embeddings,
                           scheme=record,
                           accuracy_level=ACCURACY_LEVEL if self.format == "matmulnbits" else None,
                           row_pad=self.pads_rows, attention_pad=self.pads_rows, awq=self.awq,
                           vocab_bits=self.vocab_bits)

    @property
    def pads_rows(self) -> bool:
        """matmulnbits exports (ONNX Runtime's fused graph): its int4 MatMulNBits and GroupQueryAttention
        both have a one-row path that rounds differently (see ``matmul``). The graph gives attention a dummy
        row of its own (``export.base.fused_decoder_layer``); whether the MatMulNBits need the runner's dummy
        row too depends on the CPU's kernels, which the runner probes at load (``runtime.ort_runner``)."""
        return self.row_pad and self.quantized and self.format == "matmulnbits"


def _blocks(k: int, block: int) -> int:
    return -(-k // block)


def _padded(q: np.ndarray, block: int) -> np.ndarray:
    K, N = q.shape
    out = np.zeros((_blocks(K, block) * block, N), q.dtype)
    out[:K] = q
    return out


@dataclass
class QuantizedLinear:
    """``W [K, N] = q * scales + offset`` per block of ``block`` input rows (see the module doc)."""

    q: np.ndarray  # int8 centred values [K, N]
    scales: np.ndarray  # float32 [ceil(K / block), N]
    bits: int = 8
    offset: np.ndarray | None = None  # float32 [ceil(K / block), N]; None: symmetric

    def dequantized(self, block: int) -> np.ndarray:
        """The fp32 weights the graph computes with."""
        K, N = self.q.shape
        w = _padded(self.q, block).reshape(-1, block, N).astype(np.float32) * self.scales[:, None, :]
        if self.offset is not None:
            w = w + self.offset[:, None, :]
        return w.reshape(-1, N)[:K]

    def nbytes(self) -> int:
        """Bytes as stored: packed values, fp32 scales (and offsets)."""
        extra = self.offset.nbytes if self.offset is not None else 0
        return self.q.size * self.bits // 8 + self.scales.nbytes + extra


def quantize_blocks(w: np.ndarray, bits: int, block: int, grid: str = GRIDS[0]) -> QuantizedLinear:
    """Round-to-nearest of ``w [K, N]`` in blocks of ``block`` rows (a last partial block is allowed; ONNX's
    blocked DequantizeLinear and MatMulNBits both take ceil(K / block) blocks), on one of ``GRIDS``.

    symmetric: ``scale = max|w| / qmax`` (qmax = 2^(bits-1) - 1; 1 for an all-zero block),
    ``q = clip(rint(w / scale), -qmax, qmax)``. symmetric-full: all 2^bits levels, ``scale = v / -2^(bits-1)``
    with v the block's value of largest magnitude, sign kept (it lands on -2^(bits-1) exactly; the scale may
    be negative), ``q = clip(rint(w / scale), -2^(bits-1), 2^(bits-1) - 1)``.
    asymmetric: ``scale = (max - min) / (2^bits - 1)``,
    ``u = clip(rint((w - min) / scale), 0, 2^bits - 1)``, ``q = u - 2^(bits-1)``, ``offset = min + 2^(bits-1) scale``
    (so ``q * scale + offset = u * scale + min``; the partial block's padding rows do not count)."""
    w = np.asarray(w, np.float32)
    K, N = w.shape
    nb = _blocks(K, block)
    wb = np.zeros((nb * block, N), np.float32)
    wb[:K] = w
    wb = wb.reshape(nb, block, N)
    if grid not in GRIDS:
        raise SpectrtError(f"unknown quantization grid '{grid}' (one of {', '.join(GRIDS)})")
    if grid != "asymmetric":
        qmax, qmin = 2 ** (bits - 1) - 1, -(2 ** (bits - 1))
        if grid == "symmetric":
            qmin, scales = -qmax, np.abs(wb).max(axis=1) / np.float32(qmax)
        else:  # the value of largest magnitude, with its sign, onto qmin
            v = np.take_along_axis(wb, np.abs(wb).argmax(axis=1)[:, None, :], axis=1)[:, 0, :]
            scales = v / np.float32(qmin)
        scales = scales.astype(np.float32)
        scales[scales == 0] = 1.0
        q = np.clip(np.rint(wb / scales[:, None, :]), qmin, qmax).astype(np.int8)
        return QuantizedLinear(np.ascontiguousarray(q.reshape(nb * block, N)[:K]), scales, bits)
    real = (np.arange(nb * block) < K).reshape(nb, block, 1)  # padding rows are not weights
    lo = np.where(real, wb, np.inf).min(axis=1)  # [nb, N]
    hi = np.where(real, wb, -np.inf).max(axis=1)
    top, mid = 2 ** bits - 1, 2 ** (bits - 1)
    scales = ((hi - lo) / np.float32(top)).astype(np.float32)
    scales[scales == 0] = 1.0
    u = np.clip(np.rint((wb - lo[:, None, :]) / scales[:, None, :]), 0, top)
    q = (u - mid).astype(np.int8)
    offset = (lo + np.float32(mid) * scales).astype(np.float32)
    return QuantizedLinear(np.ascontiguousarray(q.reshape(nb * block, N)[:K]), scales, bits, offset)


def dequantize_blocks(q: np.ndarray, scales: np.ndarray, block: int) -> np.ndarray:
    """``q * scale`` per block, in fp32 (what DequantizeLinear and MatMulNBits compute)."""
    return QuantizedLinear(q, scales).dequantized(block)


def pack_matmulnbits(q: np.ndarray, bits: int, block: int) -> np.ndarray:
    """MatMulNBits' B input (and GatherBlockQuantized's data): uint8 ``[N, ceil(K / block), block * bits / 8]``
    of ``q + 2^(bits-1)`` (padding rows of a partial last block hold the zero point, i.e. 0)."""
    qp = _padded(q, block)
    N = q.shape[1]
    u = (qp.astype(np.int16) + (1 << (bits - 1))).astype(np.uint8).T.reshape(N, -1, block)
    if bits == 8:
        return np.ascontiguousarray(u)
    return np.ascontiguousarray(u[..., 0::2] | (u[..., 1::2] << 4)).astype(np.uint8)


@dataclass
class QuantizedWeights:
    """The quantized tensors of one export, keyed by graph name (``layers.3.q_proj``, ``lm_head``,
    ``embed_tokens``; a tied table is one object under both of its names)."""

    spec: QuantSpec
    tensors: dict[str, QuantizedLinear] = field(default_factory=dict)
    scheme: str = "symmetric"  # the resolved scheme of the projections
    _packed: dict[int, str] = field(default_factory=dict)  # id(tensor) -> packed initializer (shared tables)

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def bytes(self) -> int:
        """Bytes of the quantized weights as stored (a shared table once)."""
        return sum(t.nbytes() for t in {id(t): t for t in self.tensors.values()}.values())

    def info(self) -> WeightsInfo | None:
        return self.spec.info(self.scheme)

    def _nbits_data(self, g, name: str) -> str:
        t = self.tensors[name]
        if id(t) not in self._packed:
            self._packed[id(t)] = g.weight(f"{name}.weight_nbits", pack_matmulnbits(t.q, t.bits, self.spec.block),
                                           "uint8")
        return self._packed[id(t)]

    def fuse(self, names: list[str], as_name: str, biases: list | None = None) -> np.ndarray | None:
        """Replace the linears ``names`` (one input, same bits) by one whose outputs are theirs side by side
        (``[K, N1 + N2 + ...]``): one MatMulNBits instead of several. Asymmetric parts keep their offsets
        (zero for a symmetric part next to them). Returns the concatenated bias (None when none has one)."""
        parts = [self.tensors.pop(n) for n in names]
        if len({(t.q.shape[0], t.bits) for t in parts}) != 1:
            raise SpectrtError(f"cannot fuse {names}: their inputs or bits differ")
        offsets = None
        if any(t.offset is not None for t in parts):
            offsets = np.concatenate([t.offset if t.offset is not None else np.zeros_like(t.scales) for t in parts], 1)
        self.tensors[as_name] = QuantizedLinear(np.concatenate([t.q for t in parts], 1),
                                                np.concatenate([t.scales for t in parts], 1), parts[0].bits, offsets)
        if biases is None or all(b is None for b in biases):
            return None
        return np.concatenate([b if b is not None else np.zeros(t.q.shape[1], np.float32) for b, t in zip(biases, parts)])

    def matmul(self, g, x: str, name: str, rank: int = 3) -> str:
        """``x @ W`` for the quantized weight ``name`` (``x`` of ``rank`` dims, rows on the next-to-last) in
        the spec's format; returns the output name.

        ONNX Runtime 1.32's int4 MatMulNBits at accuracy level 4 takes another code path for one row (M = 1)
        than for several, and the two differ in the last bits; its int8 activations turn that into visible
        logit changes, so a decode step (q = 1) and a tree verification (q > 1) of the same token would
        disagree at near-ties (measured: 4 of 6 prompts on SmolLM2). GroupQueryAttention (the fused graph's
        attention) has a one-token path of its own too (int8 exports: 4 of 4 prompts). Rows are independent
        and bit-identical for any M >= 2, so matmulnbits exports record ``row_pad`` and the runner gives
        every one-token call a second, dummy row (``runtime.ort_runner``): one kernel for every call."""
        t, s = self.tensors[name], self.spec
        K, N = t.q.shape
        scales = t.scales.astype(g.np_dtype)  # DequantizeLinear's output and MatMulNBits' scales: activation dtype
        if s.format == "qdq":
            if t.bits == 4:
                flat = t.q.reshape(-1)
                flat = np.append(flat, np.int8(0)) if flat.size % 2 else flat
                nib = flat.astype(np.uint8) & 0x0F  # two's complement nibbles, low nibble first (raw_data)
                raw = (nib[0::2] | (nib[1::2] << 4)).astype(np.uint8).tobytes()
                q = helper.make_tensor(f"{name}.weight_q", TensorProto.INT4, [K, N], raw, raw=True)
            else:
                q = numpy_helper.from_array(t.q, f"{name}.weight_q")
            sn = g.weight(f"{name}.weight_scale", scales, g.dtype)
            w = g.op("DequantizeLinear", g.tensor(q), sn, axis=0, block_size=s.block, name=f"{name}.dq")
            y = g.op("MatMul", x, w, name=name)
        else:
            g.use_domain("com.microsoft", 1)
            sn = g.weight(f"{name}.weight_scale", np.ascontiguousarray(scales.T).reshape(-1), g.dtype)
            y = g.op("MatMulNBits", x, self._nbits_data(g, name), sn, name=name, domain="com.microsoft", K=K, N=N,
                     bits=t.bits, block_size=s.block, accuracy_level=ACCURACY_LEVEL)
        if t.offset is not None:
            y = g.op("Add", y, self._offset_term(g, x, name, rank), name=f"{name}.offset_add")
        return y

    def _offset_term(self, g, x: str, name: str, rank: int) -> str:
        """``blocksum(x) @ offset``: [..., K] -> [..., nb] -> [..., N]."""
        t, block = self.tensors[name], self.spec.block
        K = t.q.shape[0]
        nb = t.offset.shape[0]
        if nb * block != K:  # a partial last block: zero columns up to whole blocks
            x = g.op("Pad", x, g.const([0] * (2 * rank - 1) + [nb * block - K]), name=f"{name}.offset_pad")
        xb = g.op("Reshape", x, g.const([0] * (rank - 1) + [nb, block]), name=f"{name}.blocks")  # [..., nb, B]
        sums = g.op("ReduceSum", xb, g.const([-1]), keepdims=0, name=f"{name}.blocksum")  # [..., nb]
        return g.op("MatMul", sums, g.weight(f"{name}.weight_offset", t.offset), name=f"{name}.offset")

    def gather(self, g, ids: str, hidden: int) -> str:
        """Input embeddings of ``ids`` [B, q] -> [B, q, H] from the quantized table (shared with a tied LM
        head): ``com.microsoft::GatherBlockQuantized`` on the packed ``[V, nb, block * bits / 8]`` data."""
        t, block = self.tensors[EMBED], self.spec.block
        g.use_domain("com.microsoft", 1)
        nb = t.scales.shape[0]
        scales = g.weight(f"{EMBED}.gather_scale", np.ascontiguousarray(t.scales.T)[..., None])  # [V, nb, 1]
        rows = g.op("GatherBlockQuantized", self._nbits_data(g, EMBED), ids, scales, name=f"{EMBED}.gather",
                    domain="com.microsoft", bits=t.bits, block_size=block, gather_axis=0, quantize_axis=2)
        if nb * block != hidden:
            raise SpectrtError(f"quantized embeddings need whole blocks: hidden size {hidden} is not a multiple "
                               f"of --block {block}")
        return g.op("Reshape", rows, g.const([0, 0, hidden]), name=f"{EMBED}.rows")  # [B, q, nb, B] -> [B, q, H]


def _resolve_scheme(spec: QuantSpec, gguf: GGUFFile | None, num_layers: int) -> str:
    """``auto``: ``gguf`` when every projection of the source is a GGUF block type of the asked bits."""
    if spec.scheme not in ("auto", "gguf"):
        return spec.scheme
    if spec.awq:  # auto + AWQ: re-quantize the (rescaled) float weights
        return "asymmetric"
    if gguf is not None and spec.block == GGUF_BLOCK:
        names = [f"blk.{i}.{n}.weight" for i in range(num_layers) for n in PROJECTION_NAMES.values()]
        wrong = [(n, gguf.type_of(n)) for n in names if GGUF_BITS.get(gguf.type_of(n) or "") != spec.bits]
        if not wrong:
            return "gguf"
        if spec.scheme == "gguf":
            n, ty = wrong[0]
            raise SpectrtError(f"--scheme gguf --weights {spec.kind}: {gguf.path.name} tensor '{n}' is {ty}, not a "
                               f"{spec.bits}-bit block type ({', '.join(k for k, b in GGUF_BITS.items() if b == spec.bits)})"
                               f"; use --scheme asymmetric to re-quantize the float weights")
    return "asymmetric"


GGUF_RTOL = 1e-6  # a GGUF block mapping must reproduce transformers' float load within this share of max |w|


def _mismatch(t: QuantizedLinear, ref_kn: np.ndarray) -> float | None:
    """Max |dequantized - ref| when it exceeds the tolerance, else None (the blocks reproduce ``ref_kn [K, N]``)."""
    diff = float(np.abs(t.dequantized(GGUF_BLOCK) - ref_kn).max())
    return diff if diff > GGUF_RTOL * max(float(np.abs(ref_kn).max()), 1e-30) else None


def _checked(t: QuantizedLinear, module, name: str, gguf: GGUFFile) -> QuantizedLinear:
    """A GGUF block mapping must reproduce the float weights transformers dequantized from the same file."""
    diff = _mismatch(t, module.weight.detach().float().numpy().T)
    if diff is not None:
        raise SpectrtError(f"{gguf.path.name}: the blocks of '{name}' do not reproduce the loaded weights (max "
                           f"difference {diff:.3g}); use --scheme asymmetric")
    return t


def _vocab_table(spec: QuantSpec, w_vh: np.ndarray, gguf: GGUFFile | None, gguf_name: str) -> QuantizedLinear:
    """A vocabulary matrix ``[V, H]`` as a symmetric ``spec.vocab_bits`` (or the GGUF's own Q8_0/Q4_0 of those
    bits) ``[H, V]`` linear."""
    same_bits = "Q8_0" if spec.vocab_bits == 8 else "Q4_0"
    if gguf is not None and spec.block == GGUF_BLOCK and gguf.type_of(gguf_name) == same_bits:
        b = gguf.blocks(gguf_name)
        t = QuantizedLinear(b.q, b.scales, b.bits)
        if _mismatch(t, w_vh.T) is None:
            return t
    return quantize_blocks(w_vh.T, spec.vocab_bits, spec.block, spec.grid("symmetric"))


def quantize_model(model, num_layers: int, spec: QuantSpec, gguf_path=None, num_heads: int = 0,
                   kv_heads: int = 0, prescale=None) -> QuantizedWeights:
    """Quantize the decoder's projections (and the vocabulary matrices the spec asks for) of the Hugging
    Face ``model`` once; write the dequantized values back into ``model`` so every torch-side consumer
    (validation, golden file, draft heads) sees the weights the graph holds. ``gguf_path``: the model's
    GGUF source (for ``--scheme gguf``/``auto``; q/k rows are un-permuted with ``num_heads``/``kv_heads``).
    ``prescale(model, bits, block, grid)``: rescales the float model in place before rounding (AWQ,
    ``spec.awq``; it lives in ``calibration`` and is passed in by the caller).

    A tied LM head quantized alone is untied (the embeddings stay float); with ``spec.embeddings`` the tied
    table is quantized once and shared."""
    import torch

    gguf = GGUFFile(gguf_path) if gguf_path is not None and spec.scheme in ("auto", "gguf") else None
    scheme = _resolve_scheme(spec, gguf, num_layers)
    out = QuantizedWeights(spec, scheme=scheme)
    layers = model.model.layers
    if spec.awq:
        if prescale is None:
            raise SpectrtError("--awq needs calibration (the caller passes calibration.awq)")
        prescale(model, spec.bits, spec.block, spec.grid(scheme))

    def write_back(module, t: QuantizedLinear) -> None:
        deq = torch.from_numpy(t.dequantized(spec.block).T.copy()).to(module.weight.dtype)
        module.weight = torch.nn.Parameter(deq, requires_grad=False)  # a new tensor: unties a shared weight

    with torch.no_grad():
        for i in range(num_layers):
            for proj in PROJECTIONS:
                parent, _, leaf = proj.partition(".")
                module = getattr(getattr(layers[i], parent), leaf)
                if scheme == "gguf":
                    b = gguf.projection(i, leaf, num_heads, kv_heads)
                    t = _checked(QuantizedLinear(b.q, b.scales, b.bits, b.offset), module, f"layers.{i}.{leaf}", gguf)
                else:
                    t = quantize_blocks(module.weight.detach().float().numpy().T, spec.bits, spec.block,
                                        spec.grid(scheme))
                out.tensors[f"layers.{i}.{leaf}"] = t
                write_back(module, t)
        inp, outp = model.get_input_embeddings(), model.get_output_embeddings()
        tied = inp.weight.data_ptr() == outp.weight.data_ptr()
        if spec.lm_head or (spec.embeddings and tied):
            t = _vocab_table(spec, outp.weight.detach().float().numpy(), gguf, GGUF_EMBEDDING if tied else GGUF_OUTPUT)
            out.tensors[LM_HEAD] = t
            write_back(outp, t)
            if spec.embeddings and tied:
                out.tensors[EMBED] = t
                inp.weight = outp.weight  # tied again: one table
        if spec.embeddings and not tied:
            t = _vocab_table(spec, inp.weight.detach().float().numpy(), gguf, GGUF_EMBEDDING)
            out.tensors[EMBED] = t
            write_back(inp, t)
    return out


__all__ = ["ACCURACY_LEVEL", "BLOCK_SIZES", "DEFAULT_BLOCK", "DEFAULT_FORMAT", "DEFAULT_SCHEME", "EMBED", "LM_HEAD",
           "QDQ_OPSET", "QuantSpec", "QuantizedLinear", "QuantizedWeights", "SCHEMES",
           "WEIGHT_FORMATS", "WEIGHT_KINDS", "dequantize_blocks", "pack_matmulnbits", "quantize_blocks",
           "quantize_model"]
