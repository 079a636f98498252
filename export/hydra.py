"""Hydra / Hydra++ draft heads: the torch module, its config, and the public checkpoint format.

Hydra head ``i`` (0-based) guesses the token ``i + 1`` places after the root (the base's own next token
``y_1``). It is *sequentially dependent*: its input is the context state and the input embeddings of the
path drafted so far::

    x_i = concat(ctx, E(y_1), ..., E(y_{i+1}))                       # [H * (i + 2)]
    f_i = Block^(L-1)(Res(x_i) + SiLU(Linear(x_i)))                  # [H], Block(x) = x + SiLU(Linear(x))
    logits_i = LM_i(f_i)  (own LM head with bias, or the base's shared LM head)

``ctx`` is the base's last hidden state (arch ``mlp``) or, for Hydra++ (arch ``prefix-mlp``), the output of
one extra Llama decoder layer ("prefix attention": RMSNorm, RoPE attention, MLP, final RMSNorm) run over the
base hidden states of the whole context. ``E`` is the base model's frozen input embedding.

Public format: the reference saves ``torch.save(hydra_head.state_dict(), "hydra_lm_head.pt")`` (its
``HydraMLP`` for arch ``mlp``, ``HydraPrefixMLP`` for ``prefix-mlp``) next to a ``config.json``
(``hydra_num_heads``, ``hydra_num_layers``, ``hydra_head_arch``, ``grounded_heads``, ``hidden_state_offset``,
``base_model_name_or_path``), and loads it with ``load_state_dict(strict=False)``. The key layout depends on the
arch (``L`` blocks per head; the L - 1 plain blocks are ONE module, made by list multiplication):

* ``mlp``: ``hydra_mlp.{i}`` is ``Sequential(Res_first, *[Block] * (L - 1))`` (no Dropout): keys
  ``hydra_mlp.{i}.0.{linear,res_connection}.{weight,bias}``, ``hydra_mlp.{i}.{1..L-1}.linear.{weight,bias}``;
  ``hydra_lm_head.{i}`` is a bare ``Linear``: ``hydra_lm_head.{i}.{weight,bias}``.
* ``prefix-mlp``: ``hydra_mlp.{i}`` is ``Sequential(Dropout, Res_first, *[Dropout, Block] * (L - 1))``: keys
  ``hydra_mlp.{i}.1.{linear,res_connection}.*``, ``hydra_mlp.{i}.{3,5,..,2L-1}.linear.*``; ``hydra_lm_head.{i}``
  is ``Sequential(Dropout, Linear)``: ``hydra_lm_head.{i}.1.{weight,bias}``; the prefix layer is a one-layer
  ``LlamaModel`` copied from transformers 4.31: ``prefix_embeding_layer.{embed_tokens.weight, layers.0.*,
  norm.weight}`` where ``layers.0.self_attn.rotary_emb.inv_freq`` is a *persistent* buffer.

Reading: both block layouts are accepted for either arch (index 0 never holds weights in the Dropout layout,
so the two cannot be confused), which also keeps checkpoints written by earlier spectrt versions (Dropout
layout for every arch) loading. Aliased plain-block keys may all be present (``.pt``: one storage under
several names) or only some (safetensors drops aliases); aliases holding different values are refused. The
prefix layer's unused vocabulary table (``embed_tokens.weight``, the reference feeds ``inputs_embeds``) and
its ``rotary_emb.inv_freq`` buffers (shape-checked; the rotary table comes from the base model) are dropped.
Any other key is refused with one line.

Writing (``save_hydra``): ``hydra_lm_head.pt`` (aliases included, like the reference) + ``hydra_lm_head.safetensors``
(aliases dropped) in the reference layout of the heads' arch, with the ``inv_freq`` buffer for ``prefix-mlp``;
only the unused ``embed_tokens.weight`` is left out. Heads sharing the base LM head (a spectrt extension; the
reference always has per-head LM heads, initialised from the base's ``lm_head`` and then loaded with
``strict=False``) are written with all-zero per-head LM biases when the vocabulary size is known, so the
reference ends up with exactly the shared head; spectrt reads bias-only, all-zero LM heads back as shared.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from spectrt.export.medusa import _load_state_file, _read_json
from spectrt.export.files import staged
from spectrt.runtime.errors import SpectrtError

ARCHS = ("mlp", "prefix-mlp")
HYDRA_FILE = "hydra_lm_head.safetensors"
HYDRA_FILE_PT = "hydra_lm_head.pt"
PREFIX_KEYS = ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
               "self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
               "input_layernorm.weight", "post_attention_layernorm.weight")
_ROOT = re.compile(r"(?:^|\.)(hydra_mlp|hydra_lm_head|prefix_embeding_layer)\.")
_MLP_KEY = re.compile(r"^hydra_mlp\.(\d+)\.(\d+)\.(linear|res_connection)\.(weight|bias)$")
_LM_KEY = re.compile(r"^hydra_lm_head\.(\d+)\.(?:1\.)?(weight|bias)$")
_INV_FREQ = re.compile(r"^(?:layers\.\d+\.self_attn\.)?rotary_emb\.inv_freq$")  # under prefix_embeding_layer.
INV_FREQ_KEY = "prefix_embeding_layer.layers.0.self_attn.rotary_emb.inv_freq"  # transformers 4.31: persistent


@dataclass
class HydraConfig:
    num_heads: int
    num_layers: int  # blocks per head, the first (Res + SiLU(Linear)) included
    hidden_size: int
    vocab_size: int | None  # None: shared LM head whose file does not say
    arch: str = "mlp"  # "mlp" (Hydra) | "prefix-mlp" (Hydra++)
    shared_lm_head: bool = False  # True: all heads use the base model's LM head (no bias)
    dropout: float = 0.0  # training only
    prefix: dict | None = None  # prefix layer dims: num_attention_heads, num_key_value_heads, head_dim, ...
    base_model_name_or_path: str = ""

    def __post_init__(self):
        if self.arch not in ARCHS:
            raise SpectrtError(f"unsupported hydra_head_arch '{self.arch}' (supported: {', '.join(ARCHS)})")
        if self.num_heads < 1 or self.num_layers < 1 or self.hidden_size < 1:
            raise SpectrtError(f"invalid hydra config: {self.num_heads} heads, {self.num_layers} layers, "
                               f"hidden {self.hidden_size} (each at least 1)")
        if not self.shared_lm_head and not self.vocab_size:
            raise SpectrtError("hydra heads with their own LM heads need a vocab_size")
        if self.arch == "prefix-mlp" and not self.prefix:
            raise SpectrtError("prefix-mlp (Hydra++) heads need the prefix layer's dims")


def prefix_dims(config) -> dict:
    """Prefix layer dims from a transformers config (the reference builds the layer from the base config)."""
    nh = int(config.num_attention_heads)
    return {"num_attention_heads": nh,
            "num_key_value_heads": int(getattr(config, "num_key_value_heads", None) or nh),
            "head_dim": int(getattr(config, "head_dim", None) or config.hidden_size // nh),
            "intermediate_size": int(config.intermediate_size),
            "rms_norm_eps": float(getattr(config, "rms_norm_eps", 1e-6)),
            "rope_theta": float(getattr(config, "rope_theta", None)
                                or (getattr(config, "rope_parameters", None) or {}).get("rope_theta", 10000.0))}


# ------------------------------------------------------------------------------------------ modules

class HydraResBlock(nn.Module):
    """``res_connection(x) + SiLU(linear(x))``; ``res_connection`` is the identity for plain blocks."""

    def __init__(self, hidden_size: int, num_condition: int = 0):
        super().__init__()
        width = hidden_size * (num_condition + 1)
        self.linear = nn.Linear(width, hidden_size)
        self.res_connection = nn.Linear(width, hidden_size) if num_condition > 0 else nn.Identity()
        nn.init.zeros_(self.linear.weight)  # like the reference: starts close to the residual path
        self.act = nn.SiLU()

    def forward(self, x):
        return self.res_connection(x) + self.act(self.linear(x))


class _RMSNorm(nn.Module):
    def __init__(self, hidden: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden))
        self.eps = eps

    def forward(self, x):
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * y.to(x.dtype)


class _Attention(nn.Module):
    def __init__(self, hidden: int, nh: int, kvh: int, d: int):
        super().__init__()
        self.nh, self.kvh, self.d = nh, kvh, d
        self.q_proj = nn.Linear(hidden, nh * d, bias=False)
        self.k_proj = nn.Linear(hidden, kvh * d, bias=False)
        self.v_proj = nn.Linear(hidden, kvh * d, bias=False)
        self.o_proj = nn.Linear(nh * d, hidden, bias=False)


class _MLP(nn.Module):
    def __init__(self, hidden: int, inter: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)

    def forward(self, x):
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class _DecoderLayer(nn.Module):
    def __init__(self, hidden: int, p: dict):
        super().__init__()
        self.self_attn = _Attention(hidden, p["num_attention_heads"], p["num_key_value_heads"], p["head_dim"])
        self.mlp = _MLP(hidden, p["intermediate_size"])
        self.input_layernorm = _RMSNorm(hidden, p["rms_norm_eps"])
        self.post_attention_layernorm = _RMSNorm(hidden, p["rms_norm_eps"])


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class PrefixLayer(nn.Module):
    """Hydra++ prefix attention: the reference ``LlamaModel(num_hidden_layers=1)`` minus its embedding table
    (inputs are base hidden states): ``norm(layer(x))`` with keys ``layers.0.*`` and ``norm.weight``."""

    def __init__(self, hidden: int, p: dict):
        super().__init__()
        self.layers = nn.ModuleList([_DecoderLayer(hidden, p)])
        self.norm = _RMSNorm(hidden, p["rms_norm_eps"])
        d = p["head_dim"]
        inv = 1.0 / (p.get("rope_theta", 10000.0) ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
        self.register_buffer("inv_freq", inv, persistent=False)
        self.rope_scale = 1.0

    def set_rope(self, inv_freq, scale: float = 1.0) -> None:
        """Use the base model's own rotary table (the reference prefix layer shares the base config)."""
        self.inv_freq = torch.as_tensor(inv_freq, dtype=torch.float32).clone()
        self.rope_scale = float(scale)

    def forward(self, x, position_ids=None, mask=None, past: tuple | None = None):
        """``x`` [B, T, H]; ``mask`` [B, T, T] bool over the new tokens (default causal); ``past`` (k, v)
        [B, KVH, P, D] fully visible. Returns (output [B, T, H], (k, v) incl. the new tokens)."""
        B, T, _ = x.shape
        layer = self.layers[0]
        a = layer.self_attn
        P = 0 if past is None else past[0].shape[2]
        if position_ids is None:
            position_ids = torch.arange(P, P + T)[None].expand(B, T)
        if mask is None:
            mask = torch.ones(T, T, dtype=torch.bool).tril()[None].expand(B, T, T)
        freqs = position_ids.float()[..., None] * self.inv_freq  # [B, T, D/2]
        emb = torch.cat((freqs, freqs), -1)
        cos, sin = (emb.cos() * self.rope_scale)[:, None].to(x.dtype), (emb.sin() * self.rope_scale)[:, None].to(x.dtype)
        h = layer.input_layernorm(x)
        q = a.q_proj(h).view(B, T, a.nh, a.d).transpose(1, 2)
        k = a.k_proj(h).view(B, T, a.kvh, a.d).transpose(1, 2)
        v = a.v_proj(h).view(B, T, a.kvh, a.d).transpose(1, 2)
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        if past is not None:
            k, v = torch.cat((past[0], k), 2), torch.cat((past[1], v), 2)
        g = a.nh // a.kvh
        kk, vv = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
        visible = torch.cat((torch.ones(B, T, P, dtype=torch.bool), mask), -1)[:, None]  # [B, 1, T, P+T]
        scores = (q @ kk.transpose(-1, -2)) / a.d ** 0.5
        scores = scores.masked_fill(~visible, torch.finfo(scores.dtype).min)
        ctx = torch.softmax(scores.float(), -1).to(q.dtype) @ vv  # [B, NH, T, D]
        x = x + a.o_proj(ctx.transpose(1, 2).reshape(B, T, a.nh * a.d))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
        return self.norm(x), (k, v)


class HydraHeads(nn.Module):
    """K Hydra heads (+ the Hydra++ prefix layer), parameter names as in the reference ``HydraPrefixMLP``."""

    def __init__(self, config: HydraConfig):
        super().__init__()
        self.config = c = config
        H, p = c.hidden_size, c.dropout
        self.hydra_mlp = nn.ModuleList([
            nn.Sequential(nn.Dropout(p), HydraResBlock(H, i + 1), *([nn.Dropout(p), HydraResBlock(H)] * (c.num_layers - 1)))
            for i in range(c.num_heads)])  # list multiplication: the plain blocks of a head are one module
        if not c.shared_lm_head:
            self.hydra_lm_head = nn.ModuleList([nn.Sequential(nn.Dropout(p), nn.Linear(H, c.vocab_size))
                                                for _ in range(c.num_heads)])
        if c.arch == "prefix-mlp":
            self.prefix_embeding_layer = PrefixLayer(H, c.prefix)

    @property
    def num_heads(self) -> int:
        return self.config.num_heads

    def context(self, hidden, position_ids=None, mask=None):
        """Base hidden states [B, T, H] -> context states [B, T, H] (identity for arch mlp)."""
        if self.config.arch == "mlp":
            return hidden
        return self.prefix_embeding_layer(hidden, position_ids, mask)[0]

    def features(self, i: int, ctx, path_embeddings):
        """Head ``i``: ``ctx`` [..., H], ``path_embeddings`` [..., i + 1, H] -> features [..., H]."""
        x = torch.cat((ctx, path_embeddings.flatten(-2)), -1)
        return self.hydra_mlp[i](x)

    def logits(self, i: int, features, base_lm_weight=None):
        if self.config.shared_lm_head:
            if base_lm_weight is None:
                raise SpectrtError("these hydra heads share the base model's LM head: pass base_lm_weight")
            return nn.functional.linear(features, base_lm_weight.to(features.dtype))
        return self.hydra_lm_head[i](features)

    def lm_head(self, i: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(weight [V, H], bias [V]) of head i's own LM head, None when shared."""
        if self.config.shared_lm_head:
            return None
        lin = self.hydra_lm_head[i][1]
        return lin.weight, lin.bias

    def reference_state_dict(self) -> dict[str, torch.Tensor]:
        """The state dict of the reference module for this arch (see the module docstring): ``mlp`` without the
        Dropout offsets (first block at index 0, bare ``Linear`` LM heads), ``prefix-mlp`` as here plus the prefix
        layer's persistent ``rotary_emb.inv_freq``. Aliased plain blocks appear under every key (same tensor), like
        the reference. Shared-LM-head heads of known vocabulary get all-zero per-head LM biases (the reference
        initialises its per-head LM weights from the base's LM head). Only ``embed_tokens.weight`` is missing."""
        c = self.config
        out: dict[str, torch.Tensor] = {}
        for key, value in self.state_dict().items():
            out[_to_reference_key(key, c.arch)] = value
        if c.shared_lm_head and c.vocab_size:
            for i in range(c.num_heads):
                out[_to_reference_key(f"hydra_lm_head.{i}.1.bias", c.arch)] = torch.zeros(c.vocab_size)
        if c.arch == "prefix-mlp":
            out[INV_FREQ_KEY] = self.prefix_embeding_layer.inv_freq
        return out

    def unique_state_dict(self) -> dict[str, torch.Tensor]:
        """``reference_state_dict`` with aliases dropped (first key of each tensor kept), for safetensors."""
        seen, out = set(), {}
        for k, v in self.reference_state_dict().items():
            if v.data_ptr() not in seen:
                seen.add(v.data_ptr())
                out[k] = v
        return out


def _to_reference_key(key: str, arch: str) -> str:
    """A ``HydraHeads`` state-dict key (Dropout layout, ``hydra_lm_head.{i}.1.*``) -> the reference key of ``arch``."""
    if arch != "mlp":
        return key
    if m := re.match(r"^hydra_mlp\.(\d+)\.(\d+)\.(.*)$", key):
        return f"hydra_mlp.{m[1]}.{(int(m[2]) - 1) // 2}.{m[3]}"
    if m := re.match(r"^hydra_lm_head\.(\d+)\.1\.(.*)$", key):
        return f"hydra_lm_head.{m[1]}.{m[2]}"
    return key


# ---------------------------------------------------------------------------------------------- loading

def is_hydra_checkpoint(path) -> bool:
    """True for a directory/file in the Hydra format (config keys or a ``hydra_lm_head.*`` file)."""
    p = Path(path).expanduser()
    if p.is_file():
        return p.name.startswith("hydra_lm_head.") or (p.parent / "config.json").is_file() and \
            _is_hydra_config(p.parent / "config.json")
    if not p.is_dir():
        return False
    return (p / HYDRA_FILE).is_file() or (p / HYDRA_FILE_PT).is_file() or _is_hydra_config(p / "config.json")


def _is_hydra_config(path: Path) -> bool:
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(cfg, dict) and any(k in cfg for k in ("hydra_num_heads", "hydra_head_arch"))


def _find_state(path: Path) -> tuple[dict[str, torch.Tensor], dict, str]:
    config: dict = {}
    if path.is_file():
        files = [path]
        cfg_path = path.parent / "config.json"
    elif path.is_dir():
        files = [p for p in (path / HYDRA_FILE, path / HYDRA_FILE_PT) if p.is_file()][:1]  # safetensors first
        if not files:
            raise SpectrtError(f"{path}: no {HYDRA_FILE} or {HYDRA_FILE_PT}")
        cfg_path = path / "config.json"
    else:
        raise SpectrtError(f"{path}: no such hydra heads file or directory")
    if cfg_path.is_file():
        config = _read_json(cfg_path)
    state = {}
    for f in files:
        for key, value in _load_state_file(f, wanted=lambda k: bool(_ROOT.search(k))).items():
            ref = key[_ROOT.search(key).start(1):]
            if ref in state and state[ref] is not value and not torch.equal(state[ref], value):
                raise SpectrtError(f"{path}: hydra weight {ref} appears twice with different values")
            state[ref] = value
    if not state:
        raise SpectrtError(f"{path}: no hydra head weights in {', '.join(f.name for f in files)} "
                           "(expected keys like 'hydra_mlp.0.1.linear.weight')")
    return state, config, str(path)


def heads_from_state_dict(state: dict, config: dict | None = None, where: str = "hydra heads",
                          base_config=None) -> HydraHeads:
    """Build ``HydraHeads`` from reference keys (either block layout, see the module docstring); K, L, H, V from
    the shapes (config for what they lack)."""
    config = config or {}
    arch = str(config.get("hydra_head_arch", "prefix-mlp" if any(k.startswith("prefix_embeding_layer.")
                                                                   for k in state) else "mlp"))
    if arch not in ARCHS:
        raise SpectrtError(f"{where}: unsupported hydra_head_arch '{arch}' (supported: {', '.join(ARCHS)})")
    if config.get("grounded_heads", True) is not True:
        raise SpectrtError(f"{where}: grounded_heads is false; only grounded (sequentially dependent) heads "
                           "are supported")
    if int(config.get("hidden_state_offset", 0) or 0) != 0:
        raise SpectrtError(f"{where}: hidden_state_offset {config['hidden_state_offset']} is not supported "
                           "(only 0: the base's final hidden state)")
    mlp: dict[int, dict[int, dict[str, torch.Tensor]]] = {}
    lm: dict[int, dict[str, torch.Tensor]] = {}
    prefix: dict[str, torch.Tensor] = {}
    dropped: dict[str, torch.Tensor] = {}  # the prefix layer's rotary buffers: shape-checked below
    for key, value in state.items():
        if m := _MLP_KEY.match(key):
            mlp.setdefault(int(m[1]), {}).setdefault(int(m[2]), {})[f"{m[3]}.{m[4]}"] = value
        elif m := _LM_KEY.match(key):
            lm.setdefault(int(m[1]), {})[m[2]] = value
        elif key.startswith("prefix_embeding_layer."):
            sub = key[len("prefix_embeding_layer."):]
            if _INV_FREQ.match(sub):
                dropped[key] = value
            elif sub != "embed_tokens.weight":  # the reference's unused vocabulary table
                prefix[sub] = value
        else:
            raise SpectrtError(f"{where}: unexpected key {key!r} (expected hydra_mlp.*, hydra_lm_head.* or "
                               "prefix_embeding_layer.*)")
    # block layout: reference ``mlp`` puts the first block at index 0 (no Dropout); the Dropout layout never does
    bare = any(0 in blocks for blocks in mlp.values())
    if bare:
        mlp = {i: {2 * j + 1: v for j, v in blocks.items()} for i, blocks in mlp.items()}  # -> Dropout layout

    def fj(j: int) -> int:  # module index in the file of Dropout-layout index j
        return (j - 1) // 2 if bare else j

    K = len(mlp)
    if K == 0 or sorted(mlp) != list(range(K)):
        raise SpectrtError(f"{where}: hydra_mlp head indices {sorted(mlp)} are not 0..{max(K - 1, 0)}")
    n_cfg = config.get("hydra_num_heads")
    if isinstance(n_cfg, int) and n_cfg != K:
        raise SpectrtError(f"{where}: config says {n_cfg} heads, the weights hold {K}")
    first = mlp[0].get(1, {})
    if "linear.weight" not in first:
        raise SpectrtError(f"{where}: head 0 lacks its first block (hydra_mlp.0.{fj(1)}.linear.weight)")
    H = first["linear.weight"].shape[0]
    max_j = max(j for blocks in mlp.values() for j in blocks)
    L = max(int(config.get("hydra_num_layers") or 1), (max_j + 1) // 2)
    sd: dict[str, torch.Tensor] = {}
    for i in range(K):
        blocks = mlp[i]
        bad = [j for j in blocks if j % 2 == 0 or j > 2 * L - 1]
        if bad:
            allowed = f"0..{L - 1}" if bare else f"1, 3, ..., {2 * L - 1}"
            raise SpectrtError(f"{where}: head {i} has weights at module index {fj(bad[0])} (expected {allowed})")
        b0 = blocks.get(1, {})
        want = (H, H * (i + 2))
        for name in ("linear.weight", "res_connection.weight"):
            if name not in b0:
                raise SpectrtError(f"{where}: head {i} lacks hydra_mlp.{i}.{fj(1)}.{name}"
                                   + (" (ungrounded heads are not supported)" if name.startswith("res") else ""))
            if tuple(b0[name].shape) != want:
                raise SpectrtError(f"{where}: hydra_mlp.{i}.{fj(1)}.{name} has shape {tuple(b0[name].shape)}, "
                                   f"expected {list(want)} (hidden {H} x {i + 2} inputs)")
        for name in ("linear", "res_connection"):
            sd[f"hydra_mlp.{i}.1.{name}.weight"] = b0[f"{name}.weight"]
            sd[f"hydra_mlp.{i}.1.{name}.bias"] = b0.get(f"{name}.bias", torch.zeros(H))
        # the plain blocks are one module in the reference: fill aliases, refuse differing ones
        plain = [j for j in range(3, 2 * L, 2)]
        present = [j for j in plain if "linear.weight" in blocks.get(j, {})]
        if plain and not present:
            raise SpectrtError(f"{where}: head {i} lacks its plain ResBlock weights (hydra_mlp.{i}.{fj(3)}.linear.*)")
        if present:
            ref = blocks[present[0]]
            for j in present[1:]:
                for n in ("linear.weight", "linear.bias"):
                    if n in blocks[j] and n in ref and not torch.equal(blocks[j][n], ref[n]):
                        raise SpectrtError(f"{where}: hydra_mlp.{i}.{fj(j)}.{n} differs from hydra_mlp.{i}."
                                           f"{fj(present[0])}.{n}; the reference shares these blocks (list "
                                           "multiplication)")
            if tuple(ref["linear.weight"].shape) != (H, H):
                raise SpectrtError(f"{where}: hydra_mlp.{i}.{fj(present[0])}.linear.weight has shape "
                                   f"{tuple(ref['linear.weight'].shape)}, expected [{H}, {H}]")
            bias = next((blocks[j]["linear.bias"] for j in present if "linear.bias" in blocks[j]), torch.zeros(H))
            for j in plain:
                sd[f"hydra_mlp.{i}.{j}.linear.weight"] = ref["linear.weight"]
                sd[f"hydra_mlp.{i}.{j}.linear.bias"] = bias
    vocab = None
    if lm and sorted(lm) != list(range(K)):
        raise SpectrtError(f"{where}: LM heads {sorted(lm)} do not match the {K} hydra heads")
    # bias-only, all-zero LM heads: spectrt's shared-LM-head heads written for the reference (module docstring)
    shared = not lm or all("weight" not in lm[i] and "bias" in lm[i] and lm[i]["bias"].ndim == 1
                           and not lm[i]["bias"].any() for i in range(K))
    if not shared:
        for i in range(K):
            w = lm[i].get("weight")
            if w is None or w.ndim != 2 or w.shape[1] != H or (vocab is not None and w.shape[0] != vocab):
                raise SpectrtError(f"{where}: hydra_lm_head.{i} weight has shape "
                                   f"{None if w is None else tuple(w.shape)}, expected [{vocab or 'V'}, {H}]")
            vocab = w.shape[0]
            b = lm[i].get("bias", torch.zeros(vocab))
            if tuple(b.shape) != (vocab,):
                raise SpectrtError(f"{where}: hydra_lm_head.{i} bias has shape {tuple(b.shape)}, expected [{vocab}]")
            sd[f"hydra_lm_head.{i}.1.weight"] = w
            sd[f"hydra_lm_head.{i}.1.bias"] = b
    elif lm:
        sizes = {lm[i]["bias"].shape[0] for i in range(K)}
        if len(sizes) != 1:
            raise SpectrtError(f"{where}: the shared-LM-head heads' zero biases have different sizes {sorted(sizes)}")
        vocab = sizes.pop()
    else:
        vocab = config.get("vocab_size")
    pdims = None
    if arch == "prefix-mlp":
        missing = [k for k in PREFIX_KEYS if f"layers.0.{k}" not in prefix] + \
                  ([] if "norm.weight" in prefix else ["norm.weight"])
        if missing:
            raise SpectrtError(f"{where}: prefix-mlp (Hydra++) heads lack prefix layer weights "
                               f"(prefix_embeding_layer.layers.0.{missing[0]} ...)" if missing[0] != "norm.weight"
                               else f"{where}: prefix-mlp heads lack prefix_embeding_layer.norm.weight")
        extra = [k for k in prefix if not (k == "norm.weight" or k.startswith("layers.0.")
                                           and k[len("layers.0."):] in PREFIX_KEYS)]
        if extra:
            raise SpectrtError(f"{where}: unsupported prefix layer weight prefix_embeding_layer.{extra[0]} "
                               "(one bias-free Llama decoder layer is supported)")
        pdims = dict(config.get("prefix") or {})
        if not pdims.get("num_attention_heads"):
            if base_config is None:
                raise SpectrtError(f"{where}: the prefix layer's attention dims are not in config.json; "
                                   "pass the base model's config")
            pdims = prefix_dims(base_config)
        nq = prefix["layers.0.self_attn.q_proj.weight"].shape
        nk = prefix["layers.0.self_attn.k_proj.weight"].shape
        if nq != (pdims["num_attention_heads"] * pdims["head_dim"], H) or \
                nk != (pdims["num_key_value_heads"] * pdims["head_dim"], H):
            raise SpectrtError(f"{where}: prefix layer projections {tuple(nq)}/{tuple(nk)} do not match hidden {H}, "
                               f"{pdims['num_attention_heads']} heads, {pdims['num_key_value_heads']} kv heads, "
                               f"head dim {pdims['head_dim']}")
        pdims["intermediate_size"] = prefix["layers.0.mlp.gate_proj.weight"].shape[0]
        for k, v in prefix.items():
            sd[f"prefix_embeding_layer.{k}"] = v
    for key, value in dropped.items():  # rotary tables come from the base model; only their shape is checked
        if pdims is None:
            raise SpectrtError(f"{where}: unexpected key {key!r} (arch mlp has no prefix layer)")
        if tuple(value.shape) != (pdims["head_dim"] // 2,):
            raise SpectrtError(f"{where}: {key} has shape {tuple(value.shape)}, expected [{pdims['head_dim'] // 2}] "
                               f"(head dim {pdims['head_dim']} / 2)")
    hcfg = HydraConfig(num_heads=K, num_layers=L, hidden_size=H, vocab_size=vocab, arch=arch, shared_lm_head=shared,
                       prefix=pdims, base_model_name_or_path=str(config.get("base_model_name_or_path") or ""))
    heads = HydraHeads(hcfg)
    heads.load_state_dict({k: v.to(torch.float32) for k, v in sd.items()}, strict=True)
    return heads.eval()


def load_hydra(path, base_config=None) -> HydraHeads:
    """Hydra heads (fp32, eval) from a ``hydra_lm_head`` directory or file. ``base_config`` (transformers) gives
    the prefix layer's attention dims when the checkpoint's config.json lacks them (reference checkpoints)."""
    state, config, where = _find_state(Path(path).expanduser())
    return heads_from_state_dict(state, config, where, base_config)


def check_compatible(heads: HydraHeads, hidden_size: int, vocab_size: int, kv_heads: int | None = None,
                     head_dim: int | None = None) -> None:
    c = heads.config
    trained = f" (heads were trained for {c.base_model_name_or_path})" if c.base_model_name_or_path else ""
    if c.hidden_size != hidden_size:
        raise SpectrtError(f"hydra heads have hidden size {c.hidden_size}, the base model has {hidden_size}{trained}")
    if c.vocab_size is not None and c.vocab_size != vocab_size:
        raise SpectrtError(f"hydra heads predict {c.vocab_size} tokens, the base model's vocabulary has {vocab_size}")
    if c.arch == "prefix-mlp" and kv_heads is not None and (
            c.prefix["num_key_value_heads"], c.prefix["head_dim"]) != (kv_heads, head_dim):
        raise SpectrtError(f"hydra prefix layer has {c.prefix['num_key_value_heads']} kv heads of dim "
                           f"{c.prefix['head_dim']}, the base model {kv_heads} of dim {head_dim}")


def save_hydra(heads: HydraHeads, directory, half: bool = False, extra_config: dict | None = None) -> Path:
    """Write ``config.json`` + ``hydra_lm_head.pt`` (the reference module's keys for the arch, aliases included, as
    the reference saves) + ``hydra_lm_head.safetensors`` (aliases dropped). The reference loads the ``.pt`` into its
    ``HydraMLP`` / ``HydraPrefixMLP`` with every weight in place (see ``HydraHeads.reference_state_dict``).
    Assembled in a temporary sibling, moved into place."""
    from safetensors.torch import save_file

    directory = Path(directory).expanduser()
    directory.parent.mkdir(parents=True, exist_ok=True)
    c = heads.config
    config = {"hydra_num_heads": c.num_heads, "hydra_num_layers": c.num_layers, "hydra_head_arch": c.arch,
              "grounded_heads": True, "hidden_state_offset": 0, "base_model_name_or_path": c.base_model_name_or_path,
              "hidden_size": c.hidden_size, "vocab_size": c.vocab_size, "shared_lm_head": c.shared_lm_head,
              "dropout_rate": c.dropout, "prefix": c.prefix, "torch_dtype": "float16" if half else "float32",
              "format": "spectrt-hydra/2 (reference hydra_lm_head keys and layout of the arch)"}
    config.update(extra_config or {})
    dtype = torch.float16 if half else torch.float32
    cast = {}  # one converted tensor per source tensor, so aliases stay aliases in the .pt
    full = {}
    for k, v in heads.reference_state_dict().items():
        if v.data_ptr() not in cast:
            cast[v.data_ptr()] = v.detach().to("cpu", dtype).contiguous()
        full[k] = cast[v.data_ptr()]
    unique = {k: full[k] for k in heads.unique_state_dict()}
    with staged(directory, keep_existing=True) as tmp:
        torch.save(full, tmp / HYDRA_FILE_PT)
        save_file(unique, str(tmp / HYDRA_FILE), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return directory


__all__ = ["ARCHS", "HydraConfig", "HydraHeads", "HydraResBlock", "PrefixLayer", "is_hydra_checkpoint",
           "load_hydra", "heads_from_state_dict", "check_compatible", "save_hydra", "prefix_dims"]
