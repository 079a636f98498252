"""Medusa draft heads: the module, and import/export of the public checkpoint formats.

A Medusa head ``k`` maps the base model's final hidden state at position ``t`` (after the final norm) to
a guess for token ``t+k+2`` (head 0 guesses the token after the base's own next token)::

    h -> ResBlock^L(h) -> LM head        ResBlock(x) = x + SiLU(Linear(x))

* own LM heads (the original Medusa): every head owns an ``nn.Linear(H, V, bias=False)`` LM head.
* shared LM head (``shared_lm_head``, spectrt's default): all heads reuse the base model's LM head; the heads
  file holds only the ResBlocks (K*L*H*(H+1) parameters, ~2.6 MB fp16 for K=4, L=1, H=576).

spectrt called these two "v1" and "v2" before; "v2" was not the paper's Medusa-2 (heads fine-tuned jointly
with the base model, see the full checkpoints below), so the names are gone. ``MedusaConfig`` still accepts the
old ``version`` values ("1": own, "2": shared) and exposes ``version`` read-only for old callers (deprecated).

On-disk formats (both read, the first one written):

* the reference ``medusa_lm_head`` layout: a directory with ``config.json`` (``medusa_num_heads``,
  ``medusa_num_layers``, ``base_model_name_or_path``; spectrt adds ``shared_lm_head``) and
  ``medusa_lm_head.safetensors`` or ``medusa_lm_head.pt`` whose keys are ``{h}.{l}.linear.weight``,
  ``{h}.{l}.linear.bias`` and, with own LM heads, ``{h}.{L}.weight`` (whether the heads share the base LM head
  is read from the keys, never from the config);
* full "Medusa-2" model checkpoints: a directory of ``*.safetensors`` / ``*.bin`` / ``*.pt`` state dicts
  whose keys hold ``medusa_head.{h}.{l}...`` next to the base model's weights.

The number of heads and layers is always inferred from the keys: released configs under-report heads.
Pickled checkpoints are read with ``torch.load(weights_only=True)`` only.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from torch import nn

from spectrt.export.files import staged
from spectrt.runtime.errors import SpectrtError

HEADS_FILE = "medusa_lm_head.safetensors"
HEADS_FILE_PT = "medusa_lm_head.pt"
_KEY = re.compile(r"^(\d+)\.(\d+)\.(linear\.weight|linear\.bias|weight)$")
_FULL_KEY = re.compile(r"(?:^|\.)medusa_head\.(\d+\.\d+\.(?:linear\.weight|linear\.bias|weight))$")


_LEGACY_VERSION = {"1": False, "v1": False, "2": True, "v2": True}  # spectrt's old names: "2" = shared LM head


def shared_from_version(version) -> bool:
    """spectrt's old Medusa ``version`` value ("1" | "2", also 1, 2, "v1", "v2") -> ``shared_lm_head``."""
    key = str(version).strip().lower()
    if key not in _LEGACY_VERSION:
        raise SpectrtError(f"medusa version must be '1' (own LM heads) or '2' (shared LM head), not {version!r}")
    return _LEGACY_VERSION[key]


class MedusaConfig:
    """K heads of L ResBlocks each on hidden size H. ``shared_lm_head``: the heads reuse the base model's LM head
    (no per-head LM heads in the file); False: each head owns an ``nn.Linear(H, V, bias=False)``.

    ``version=`` ("1" | "2") and a string/int in ``shared_lm_head``'s position are the deprecated spelling of the
    same choice and still accepted; ``config.version`` reads "2" for shared, "1" for own."""

    def __init__(self, num_heads: int, num_layers: int, hidden_size: int, vocab_size: int | None,
                 shared_lm_head: bool | str | int | None = None, base_model_name_or_path: str = "", *,
                 version=None):
        if shared_lm_head is not None and not isinstance(shared_lm_head, bool):  # positional legacy "1" | "2"
            shared_lm_head = shared_from_version(shared_lm_head)
        if version is not None:
            legacy = shared_from_version(version)
            if shared_lm_head is not None and shared_lm_head != legacy:
                raise SpectrtError(f"medusa version {version!r} contradicts shared_lm_head={shared_lm_head}")
            shared_lm_head = legacy
        if shared_lm_head is None:
            shared_lm_head = True
        self.num_heads, self.num_layers, self.hidden_size = num_heads, num_layers, hidden_size
        self.vocab_size = vocab_size  # None: shared-LM-head heads whose file does not say (taken from the base)
        self.shared_lm_head = shared_lm_head
        self.base_model_name_or_path = base_model_name_or_path
        if self.num_heads < 1 or self.num_layers < 0 or self.hidden_size < 1:
            raise SpectrtError(f"invalid medusa config: {self}")
        if not self.shared_lm_head and not self.vocab_size:
            raise SpectrtError("medusa heads with their own LM heads need a vocab_size")

    @property
    def version(self) -> str:
        """Deprecated: "2" for heads sharing the base LM head, "1" for own LM heads (use ``shared_lm_head``)."""
        return "2" if self.shared_lm_head else "1"

    def _fields(self):
        return (self.num_heads, self.num_layers, self.hidden_size, self.vocab_size, self.shared_lm_head,
                self.base_model_name_or_path)

    def __eq__(self, other):
        return isinstance(other, MedusaConfig) and self._fields() == other._fields()

    def __repr__(self):
        return (f"MedusaConfig(num_heads={self.num_heads}, num_layers={self.num_layers}, hidden_size={self.hidden_size}"
                f", vocab_size={self.vocab_size}, shared_lm_head={self.shared_lm_head}, "
                f"base_model_name_or_path={self.base_model_name_or_path!r})")


class ResBlock(nn.Module):
    """``x + SiLU(Linear(x))``. Zero-initialized (weight and bias) so an untrained block is the identity."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, hidden_size)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)
        self.act = nn.SiLU()

    def forward(self, x):
        return x + self.act(self.linear(x))


class MedusaHeads(nn.Module):
    """K Medusa heads. ``medusa_head[h]`` is ``Sequential(ResBlock * L[, Linear(H, V)])`` as in the reference,
    so ``state_dict()`` keys are ``medusa_head.{h}.{l}.linear.weight`` etc."""

    def __init__(self, config: MedusaConfig):
        super().__init__()
        self.config = config
        heads = []
        for _ in range(config.num_heads):
            layers = [ResBlock(config.hidden_size) for _ in range(config.num_layers)]
            if not config.shared_lm_head:
                layers.append(nn.Linear(config.hidden_size, config.vocab_size, bias=False))
            heads.append(nn.Sequential(*layers))
        self.medusa_head = nn.ModuleList(heads)

    @property
    def num_heads(self) -> int:
        return self.config.num_heads

    def features(self, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden[..., H]`` (base final hidden state, after the final norm) -> ``[..., K, H]``."""
        L = self.config.num_layers
        return torch.stack([head[:L](hidden) for head in self.medusa_head], dim=-2)

    def logits(self, hidden: torch.Tensor, base_lm_weight: torch.Tensor | None = None) -> torch.Tensor:
        """``hidden[..., H]`` -> ``[..., K, V]``. Shared-LM-head heads need the base LM head weight ``[V, H]``."""
        feats = self.features(hidden)
        if self.config.shared_lm_head:
            if base_lm_weight is None:
                raise SpectrtError("these medusa heads share the base model's LM head: pass base_lm_weight")
            return torch.nn.functional.linear(feats, base_lm_weight.to(feats.dtype))
        L = self.config.num_layers
        return torch.stack([head[L](feats[..., k, :]) for k, head in enumerate(self.medusa_head)], dim=-2)

    forward = logits

    def reference_state_dict(self) -> dict[str, torch.Tensor]:
        """Weights under the reference ``medusa_lm_head`` keys: ``{h}.{l}.linear.weight`` (+ ``{h}.{L}.weight`` for
        own LM heads)."""
        return {k[len("medusa_head."):]: v for k, v in self.state_dict().items()}


# ---------------------------------------------------------------------------------------------- loading

def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def _load_state_file(path: Path, wanted=None) -> dict[str, torch.Tensor]:
    """Tensors from one ``.safetensors`` or pickled (weights-only) file; ``wanted(key)`` filters keys."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            out = {}
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    if wanted is None or wanted(key):
                        out[key] = f.get_tensor(key)
            return out
        except Exception as e:  # SafetensorError, OSError, ...
            raise SpectrtError(f"{path}: unreadable or corrupt safetensors checkpoint ({_short(e)})") from None
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        msg = str(e)
        if "weights_only" in msg or "Weights only load failed" in msg or "Unsupported global" in msg:
            raise SpectrtError(
                f"{path}: refusing to load a pickle that holds more than tensors (it could run arbitrary "
                "code); re-save it as a plain state dict or safetensors") from None
        raise SpectrtError(f"{path}: unreadable or corrupt checkpoint ({_short(e)})") from None
    if isinstance(obj, dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        for nested in ("state_dict", "model", "module"):
            if isinstance(obj.get(nested), dict):
                obj = obj[nested]
                break
    if not isinstance(obj, dict):
        raise SpectrtError(f"{path}: expected a state dict (a mapping of names to tensors), got {type(obj).__name__}")
    return {k: v for k, v in obj.items()
            if isinstance(k, str) and isinstance(v, torch.Tensor) and (wanted is None or wanted(k))}


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SpectrtError(f"{path}: unreadable config ({_short(e)})") from None
    if not isinstance(data, dict):
        raise SpectrtError(f"{path}: expected a JSON object")
    return data


# Files a training run leaves next to the weights (transformers.Trainer, accelerate, DeepSpeed): never weights.
_NOT_WEIGHTS = re.compile(r"^(training_args|optimizer|scheduler|scaler|rng_state|random_states|trainer_state|"
                          r"custom_checkpoint)([._-][^/]*)?\.(bin|pt|pth|json|safetensors)$", re.IGNORECASE)
_SAFE_INDEX = "model.safetensors.index.json"
_PT_INDEX = "pytorch_model.bin.index.json"


def _index_shards(index: Path) -> list[Path]:
    """The shard files a transformers ``*.index.json`` names (all must exist)."""
    data = _read_json(index)
    weight_map = data.get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise SpectrtError(f"{index}: expected a 'weight_map' of tensor names to shard files")
    shards = [index.parent / name for name in sorted(set(weight_map.values()))]
    missing = [p.name for p in shards if not p.is_file()]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise SpectrtError(f"{index}: shard file(s) {', '.join(missing[:3])}{more} missing")
    return shards


def checkpoint_files(directory: Path) -> list[Path]:
    """The weight files of a full model checkpoint directory, chosen the way transformers does.

    safetensors win over pickles (``model.safetensors.index.json`` shards, else every ``*.safetensors``);
    pickles are read only when there is no safetensors file (``pytorch_model.bin.index.json`` shards, else
    ``pytorch_model*.bin``, else the other ``*.bin`` / ``*.pt`` / ``*.pth``). Trainer leftovers
    (``training_args.bin``, ``optimizer.pt``, ``scheduler.pt``, ``rng_state*.pth`` ...) are never weights.
    """
    if (directory / _SAFE_INDEX).is_file():
        return _index_shards(directory / _SAFE_INDEX)
    candidates = sorted(p for p in directory.iterdir() if p.is_file() and not _NOT_WEIGHTS.match(p.name))
    safetensors = [p for p in candidates if p.suffix == ".safetensors"]
    if safetensors:
        return safetensors
    if (directory / _PT_INDEX).is_file():
        return _index_shards(directory / _PT_INDEX)
    pickles = [p for p in candidates if p.suffix in (".bin", ".pt", ".pth")]
    hf_pickles = [p for p in pickles if p.name.startswith("pytorch_model") and p.suffix == ".bin"]
    return hf_pickles or pickles


def _find_heads_state(path: Path) -> tuple[dict[str, torch.Tensor], dict, str]:
    """(reference-key state dict, config dict, description) from a file or directory."""
    config: dict = {}
    if path.is_file():
        if (path.parent / "config.json").is_file():
            config = _read_json(path.parent / "config.json")
        files = [path]
    elif path.is_dir():
        if (path / "config.json").is_file():
            config = _read_json(path / "config.json")
        heads_files = [path / HEADS_FILE, path / HEADS_FILE_PT]
        files = [p for p in heads_files if p.is_file()][:1]
        if not files:  # a full (Medusa-2) model checkpoint
            files = checkpoint_files(path)
        if not files:
            raise SpectrtError(f"{path}: no {HEADS_FILE}, {HEADS_FILE_PT} or model checkpoint files "
                               "(*.safetensors, pytorch_model*.bin, *.pt)")
    elif path.exists():
        raise SpectrtError(f"{path}: not a file or directory")
    else:
        raise SpectrtError(f"{path}: no such medusa heads file or directory")

    state: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    for f in files:
        tensors = _load_state_file(f, wanted=lambda k: bool(_KEY.match(k) or _FULL_KEY.search(k)))
        for key, value in tensors.items():
            m = _FULL_KEY.search(key)
            ref = m.group(1) if m else key
            if ref in state:
                if state[ref].shape == value.shape and torch.equal(state[ref], value):
                    continue  # the same tensor saved twice (e.g. under two prefixes): harmless
                where = f"{origin[ref]} and {f.name}" if origin[ref] != f.name else f.name
                raise SpectrtError(f"{path}: medusa weight {ref} appears twice with different values "
                                   f"(in {where}); keep one checkpoint per directory")
            state[ref] = value
            origin[ref] = f.name
    if not state:
        names = ", ".join(p.name for p in files)
        raise SpectrtError(f"{path}: no medusa head weights in {names} "
                           "(expected keys like '0.0.linear.weight' or 'medusa_head.0.0.linear.weight')")
    return state, config, str(path)


def heads_from_state_dict(state: dict[str, torch.Tensor], config: dict | None = None,
                          where: str = "medusa heads") -> MedusaHeads:
    """Build ``MedusaHeads`` from reference keys (``{h}.{l}.linear.weight`` ...); K, L, H, V from the shapes."""
    config = config or {}
    by_head: dict[int, dict[int, dict[str, torch.Tensor]]] = {}
    for key, value in state.items():
        m = _KEY.match(key)
        if not m:
            raise SpectrtError(f"{where}: unexpected key {key!r}")
        by_head.setdefault(int(m.group(1)), {}).setdefault(int(m.group(2)), {})[m.group(3)] = value
    K = len(by_head)
    if sorted(by_head) != list(range(K)):
        raise SpectrtError(f"{where}: head indices {sorted(by_head)} are not 0..{K - 1}")

    def layout(layers):
        res = sorted(i for i, d in layers.items() if "linear.weight" in d or "linear.bias" in d)
        lm = sorted(i for i, d in layers.items() if "weight" in d)
        return res, lm

    res0, lm0 = layout(by_head[0])
    L = len(res0)
    if res0 != list(range(L)):
        raise SpectrtError(f"{where}: head 0 has ResBlocks {res0}, expected 0..{L - 1}")
    has_lm = lm0 == [L]
    if lm0 and not has_lm:
        raise SpectrtError(f"{where}: head 0 has an LM head at index {lm0}, expected {L}")
    hidden = None
    vocab = None
    for h in range(K):
        res, lm = layout(by_head[h])
        if res != res0 or lm != lm0:
            raise SpectrtError(f"{where}: head {h} has a different layout from head 0 "
                               f"(ResBlocks {res} vs {res0}, LM head {lm} vs {lm0})")
        for l in res:
            d = by_head[h][l]
            if "linear.weight" not in d or "linear.bias" not in d:
                raise SpectrtError(f"{where}: head {h} layer {l} lacks linear.weight or linear.bias")
            w, b = d["linear.weight"], d["linear.bias"]
            if w.ndim != 2 or w.shape[0] != w.shape[1] or b.shape != (w.shape[0],):
                raise SpectrtError(f"{where}: head {h} layer {l}: inconsistent shapes "
                                   f"weight {tuple(w.shape)}, bias {tuple(b.shape)} (expected [H, H] and [H])")
            if hidden is None:
                hidden = w.shape[0]
            elif w.shape[0] != hidden:
                raise SpectrtError(f"{where}: head {h} layer {l}: hidden size {w.shape[0]}, expected {hidden}")
        if has_lm:
            w = by_head[h][L]["weight"]
            if w.ndim != 2:
                raise SpectrtError(f"{where}: head {h} LM head has shape {tuple(w.shape)}, expected [V, H]")
            if hidden is None:
                hidden = w.shape[1]
            if w.shape[1] != hidden or (vocab is not None and w.shape[0] != vocab):
                raise SpectrtError(f"{where}: head {h} LM head has shape {tuple(w.shape)}, "
                                   f"expected [{vocab or 'V'}, {hidden}]")
            vocab = w.shape[0]
    if hidden is None:
        raise SpectrtError(f"{where}: heads have neither ResBlocks nor LM heads")
    if not has_lm:
        vocab = config.get("vocab_size")
        if vocab is not None and (not isinstance(vocab, int) or vocab < 1):
            raise SpectrtError(f"{where}: invalid vocab_size {vocab!r} in config")
    cfg_hidden = config.get("hidden_size")
    if isinstance(cfg_hidden, int) and cfg_hidden != hidden:
        raise SpectrtError(f"{where}: config says hidden_size {cfg_hidden}, weights have {hidden}")
    mcfg = MedusaConfig(num_heads=K, num_layers=L, hidden_size=hidden, vocab_size=vocab,
                        shared_lm_head=not has_lm,
                        base_model_name_or_path=str(config.get("base_model_name_or_path") or ""))
    heads = MedusaHeads(mcfg)
    full = {f"medusa_head.{k}": v.to(torch.float32) for k, v in state.items()}
    heads.load_state_dict(full, strict=True)
    return heads.eval()


def load_medusa(path: str | os.PathLike) -> MedusaHeads:
    """Medusa heads (fp32, eval mode) from a ``medusa_lm_head`` directory/file or a full Medusa-2 checkpoint."""
    state, config, where = _find_heads_state(Path(path).expanduser())
    return heads_from_state_dict(state, config, where)


def check_compatible(heads: MedusaHeads, hidden_size: int, vocab_size: int) -> None:
    """Raise a SpectrtError when ``heads`` cannot run on a base with this hidden size and vocabulary."""
    c = heads.config
    if c.hidden_size != hidden_size:
        raise SpectrtError(f"medusa heads have hidden size {c.hidden_size}, the base model has {hidden_size}"
                           + (f" (heads were trained for {c.base_model_name_or_path})"
                              if c.base_model_name_or_path else ""))
    if c.vocab_size is not None and c.vocab_size != vocab_size:
        raise SpectrtError(f"medusa heads predict {c.vocab_size} tokens, the base model's vocabulary has "
                           f"{vocab_size}")


def with_own_lm_heads(heads: MedusaHeads, base_lm_weight: torch.Tensor) -> MedusaHeads:
    """Shared-LM-head heads as heads that each own a copy of the base LM head: for tools that expect the original
    layout (TensorRT-LLM's and TGI's Medusa loaders need ``{h}.{L}.weight``). Heads with own LM heads are
    returned as is."""
    if not heads.config.shared_lm_head:
        return heads
    V, H = base_lm_weight.shape
    check_compatible(heads, H, V)
    c = heads.config
    out = MedusaHeads(MedusaConfig(c.num_heads, c.num_layers, H, V, False, c.base_model_name_or_path))
    state = {k: v.detach().clone() for k, v in heads.state_dict().items()}
    for h in range(c.num_heads):
        state[f"medusa_head.{h}.{c.num_layers}.weight"] = base_lm_weight.detach().to(torch.float32).clone()
    out.load_state_dict(state, strict=True)
    return out.eval()


def save_medusa(heads: MedusaHeads, directory: str | os.PathLike, half: bool = False,
                extra_config: dict | None = None) -> Path:
    """Write ``config.json`` + ``medusa_lm_head.safetensors`` (reference keys; fp16 when ``half``).

    Files are written to a temporary sibling directory and moved in place, so ``directory`` never holds
    a half-written checkpoint. Existing other files in ``directory`` (a report, a README) are kept.
    """
    from safetensors.torch import save_file

    directory = Path(directory).expanduser()
    directory.parent.mkdir(parents=True, exist_ok=True)
    c = heads.config
    config = {
        "medusa_num_heads": c.num_heads,
        "medusa_num_layers": c.num_layers,
        "base_model_name_or_path": c.base_model_name_or_path,
        "hidden_size": c.hidden_size,
        "vocab_size": c.vocab_size,
        "shared_lm_head": c.shared_lm_head,
        "torch_dtype": "float16" if half else "float32",
        "format": "spectrt-medusa/1 (reference medusa_lm_head keys)",
    }
    config.update(extra_config or {})
    dtype = torch.float16 if half else torch.float32
    tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in heads.reference_state_dict().items()}
    with staged(directory, keep_existing=True, drop=(HEADS_FILE_PT,)) as tmp:  # a stale .pt would shadow
        save_file(tensors, str(tmp / HEADS_FILE), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return directory


to_v1 = with_own_lm_heads  # deprecated name (spectrt's old "v1" = own LM heads)
