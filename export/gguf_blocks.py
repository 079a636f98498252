"""Quantized GGUF tensors mapped to spectrt's blocks without a float round trip (``--scheme gguf``).

ggml stores a weight ``[N out, K in]`` row by row in blocks of 32 consecutive input values, the same axis
spectrt quantizes along (``export.quantize``: blocks of ``block`` input rows of ``W [K, N]``). Three block
types map directly:

============  =====================================  ==============================================
ggml type     block (32 values)                      spectrt (q centred int, scale, offset)
============  =====================================  ==============================================
``Q8_0``      fp16 d, int8 x[32]; w = d x            8-bit: q = x, scale = d (bit-exact)
``Q4_0``      fp16 d, 16 B nibbles; w = d (x - 8)    4-bit: q = x - 8, scale = d (bit-exact)
``Q4_1``      fp16 d, fp16 m, 16 B; w = d x + m      4-bit: q = x - 8, scale = d, offset = m + 8 d
============  =====================================  ==============================================

Nibbles: byte j holds value j (low nibble) and value j + 16 (high nibble). q and d are carried bit for bit;
a Q4_1 offset ``m + 8 d`` is one fp32 addition of two fp16 values (exact unless their exponents are more
than 13 apart), and ``q * d + offset`` equals ggml's ``d * x + m`` up to fp32 rounding of that sum (tested
against transformers' own dequantization of the file). Other types (K-quants, F16, ...) are refused with the
tensor's name: use ``--scheme asymmetric`` to re-quantize the float weights instead.

llama.cpp's converter permutes the rows of ``attn_q``/``attn_k`` of llama-architecture files for its rotary
layout; ``unpermute_rows`` undoes it exactly as transformers does when it loads the file, so block (row,
block) pairs keep their values. ``export.quantize`` checks every mapped tensor against the float weights
transformers loaded from the same file, so a mapping error cannot pass silently.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from spectrt.runtime.errors import SpectrtError

GGUF_BLOCK = 32
PROJECTION_NAMES = {  # graph linear leaf -> GGUF tensor name in block i
    "q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
    "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down",
}
EMBEDDING = "token_embd.weight"
OUTPUT = "output.weight"  # absent for tied embeddings
BITS = {"Q8_0": 8, "Q4_0": 4, "Q4_1": 4}
PERMUTED_ARCHS = ("llama",)  # q/k rows permuted by llama.cpp's converter (transformers' LlamaTensorProcessor)
_LAYOUT = {  # fields of one block: (fp16 scalars, bytes of values)
    "Q8_0": (1, 32),
    "Q4_0": (1, 16),
    "Q4_1": (2, 16),
}


@dataclass(frozen=True)
class GGUFBlocks:
    """One tensor's blocks in spectrt's orientation: ``q [K, N]`` centred ints, ``scales``/``offset [K/32, N]``."""

    type: str
    q: np.ndarray  # int8 [K, N]
    scales: np.ndarray  # float32 [K / 32, N]
    offset: np.ndarray | None  # float32 [K / 32, N] (Q4_1), else None

    @property
    def bits(self) -> int:
        return BITS[self.type]


def decode_blocks(raw: np.ndarray, type_name: str, rows: int, cols: int) -> GGUFBlocks:
    """``raw``: the tensor's bytes (``rows`` = N outputs of ``cols`` = K inputs, row-major, ggml blocks)."""
    if type_name not in _LAYOUT:
        raise SpectrtError(f"GGUF type {type_name} has no direct block mapping (only {', '.join(_LAYOUT)})")
    if cols % GGUF_BLOCK:
        raise SpectrtError(f"GGUF rows of {cols} values are not whole blocks of {GGUF_BLOCK}")
    halves, nbytes = _LAYOUT[type_name]
    nb = cols // GGUF_BLOCK
    blocks = np.ascontiguousarray(raw, np.uint8).reshape(rows, nb, 2 * halves + nbytes)  # [N, nb, bytes]
    head = blocks[..., :2 * halves].copy().view(np.float16).astype(np.float32)  # [N, nb, halves]
    vals = blocks[..., 2 * halves:]
    if type_name == "Q8_0":
        x = vals.view(np.int8).astype(np.int16)  # [N, nb, 32]
    else:
        x = np.concatenate([vals & 0x0F, vals >> 4], axis=-1).astype(np.int16) - 8  # [N, nb, 32], centred
    d = head[..., 0]
    offset = None
    if type_name == "Q4_1":
        offset = (head[..., 1] + np.float32(8) * d).T.copy()  # [nb, N]: d (x - 8) + (m + 8 d) = d x + m
    q = x.astype(np.int8).reshape(rows, cols).T.copy()  # [K, N]
    return GGUFBlocks(type_name, q, d.T.copy(), offset)


def unpermute_rows(blocks: GGUFBlocks, n_head: int) -> GGUFBlocks:
    """Undo llama.cpp's q/k row permutation (transformers' ``reverse_permute_weights``) on the N axis."""
    N = blocks.q.shape[1]
    dim = N // n_head // 2
    order = np.arange(N).reshape(n_head, dim, 2).swapaxes(1, 2).reshape(N)  # new row r <- old row order[r]
    off = blocks.offset[:, order] if blocks.offset is not None else None
    return GGUFBlocks(blocks.type, blocks.q[:, order].copy(), blocks.scales[:, order].copy(), off)


class GGUFFile:
    """The quantized tensors of a llama-family GGUF file, read lazily by name."""

    def __init__(self, path: str | Path):
        from gguf import GGUFReader  # transformers' GGUF loading depends on it

        self.path = Path(path)
        reader = GGUFReader(str(self.path))
        self.tensors = {t.name: t for t in reader.tensors}
        arch = reader.fields.get("general.architecture")
        self.arch = bytes(arch.parts[arch.data[0]]).decode() if arch is not None else None

    def type_of(self, name: str) -> str | None:
        t = self.tensors.get(name)
        return None if t is None else t.tensor_type.name

    def blocks(self, name: str) -> GGUFBlocks:
        if name not in self.tensors:
            raise SpectrtError(f"{self.path.name}: no tensor '{name}'")
        t = self.tensors[name]
        cols, rows = (int(n) for n in t.shape[:2])  # ggml order: ne0 = inputs, ne1 = outputs
        try:
            return decode_blocks(np.asarray(t.data), t.tensor_type.name, rows, cols)
        except SpectrtError as e:
            raise SpectrtError(f"{self.path.name}: tensor '{name}': {e}; use --scheme asymmetric to re-quantize "
                               f"the float weights instead") from None

    def projection(self, layer: int, leaf: str, num_heads: int, kv_heads: int) -> GGUFBlocks:
        b = self.blocks(f"blk.{layer}.{PROJECTION_NAMES[leaf]}.weight")
        if self.arch not in PERMUTED_ARCHS:
            return b
        if leaf == "q_proj":
            return unpermute_rows(b, num_heads)
        if leaf == "k_proj":
            return unpermute_rows(b, kv_heads)
        return b


__all__ = ["BITS", "EMBEDDING", "GGUFBlocks", "GGUFFile", "GGUF_BLOCK", "OUTPUT", "PERMUTED_ARCHS", "PROJECTION_NAMES",
           "decode_blocks", "unpermute_rows"]
