"""Supported decoder families and the adapter from Hugging Face weights to spectrt's graph builder.

Llama (SmolLM2), Mistral and Qwen2 share one pre-norm decoder: RMSNorm, rotary attention with grouped
KV heads (Qwen2 adds q/k/v biases), a SiLU-gated MLP. A family is a row of data, not a code path.
"""
from __future__ import annotations


import numpy as np

from spectrt.runtime.artifact import DecoderDims
from spectrt.runtime.errors import SpectrtError

# model_type -> family name (all share the same decoder layout)
FAMILIES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2"}
SUPPORTED_ACTIVATIONS = ("silu",)
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn", "longrope")


def decoder_dims(config) -> DecoderDims:
    """Dims from a transformers config; unsupported architectures fail with the list of supported ones."""
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        supported = ", ".join(sorted(FAMILIES))
        raise SpectrtError(f"unsupported architecture '{model_type}' (supported: {supported})")
    act = getattr(config, "hidden_act", "silu")
    if act not in SUPPORTED_ACTIVATIONS:
        raise SpectrtError(f"unsupported MLP activation '{act}' (supported: {', '.join(SUPPORTED_ACTIVATIONS)})")
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    window = getattr(config, "sliding_window", None)
    if model_type == "qwen2" and not getattr(config, "use_sliding_window", False):
        window = None
    return DecoderDims(
        family=FAMILIES[model_type], hidden=config.hidden_size, num_layers=config.num_hidden_layers,
        num_heads=heads, kv_heads=getattr(config, "num_key_value_heads", None) or heads, head_dim=head_dim,
        intermediate=config.intermediate_size, vocab=config.vocab_size, rms_eps=float(config.rms_norm_eps),
        tied_embeddings=bool(getattr(config, "tie_word_embeddings", False)), sliding_window=window)


def rope_tables(model) -> tuple[np.ndarray, float]:
    """(inv_freq [head_dim/2], attention_scaling) from the model's own rotary embedding module."""
    rotary = model.model.rotary_emb
    rope_type = getattr(rotary, "rope_type", "default")
    if rope_type not in STATIC_ROPE_TYPES:
        raise SpectrtError(f"unsupported rope type '{rope_type}' (supported: {', '.join(STATIC_ROPE_TYPES)})")
    inv_freq = rotary.inv_freq.detach().float().cpu().numpy()
    return inv_freq, float(getattr(rotary, "attention_scaling", 1.0))


class HFWeights:
    """Access to a transformers decoder's weights as numpy, in the layouts the graph wants."""

    def __init__(self, state: dict[str, np.ndarray]):
        self.state = state  # Hugging Face key -> fp32 array

    @classmethod
    def from_model(cls, model) -> "HFWeights":
        return cls({k: v.detach().float().cpu().numpy() for k, v in model.state_dict().items()})

    def get(self, key: str, transpose: bool = False) -> np.ndarray | None:
        w = self.state.get(key)
        if w is None:
            return None
        return np.ascontiguousarray(w.T) if transpose else w

    def require(self, key: str, transpose: bool = False) -> np.ndarray:
        w = self.get(key, transpose)
        if w is None:
            raise SpectrtError(f"checkpoint has no weight '{key}'")
        return w

    def layer(self, i: int, name: str, transpose: bool = False) -> np.ndarray | None:
        return self.get(f"model.layers.{i}.{name}", transpose)

    @property
    def embed(self) -> np.ndarray:  # [V, H]
        return self.require("model.embed_tokens.weight")

    def lm_head(self, tied: bool) -> np.ndarray | None:  # [V, H], None when tied
        return None if tied else self.require("lm_head.weight")
