"""Activation-aware weight scaling (AWQ, Lin et al. 2023) before block quantization (``export --awq``).

Input channels that carry large activations matter more: scaling such a channel of ``W`` up by ``s`` before
rounding (and the activation down by ``s``) shrinks its relative rounding error. Per group of linears that
read the same input, ``s = mean|x|^alpha`` (normalised so that ``sqrt(max s * min s) = 1``) with ``alpha``
chosen on a grid to minimise ``sum ||x W^T - (x / s) Q(W s)^T||^2`` over calibration tokens, where ``Q`` is
the export's own quantizer (``export.quantize.quantize_blocks``: same bits, block and grid). ``1 / s`` is
folded into the op that produces the input, so the float model computes exactly the same function:

- ``input_layernorm`` -> q/k/v_proj and ``post_attention_layernorm`` -> gate/up_proj (RMSNorm weights),
- ``up_proj`` -> ``down_proj`` (SiLU(gate) * up is linear in up's rows),
- ``v_proj`` -> ``o_proj`` only without grouped KV heads (GQA repeats v's channels across heads).

Activations come from one forward pass over calibration prompts (never Spec-Bench text): the mean |x| per
channel over all their tokens, and up to ``sample`` token rows per group for the loss.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from tqdm import tqdm

from spectrt.export.quantize import quantize_blocks
from spectrt.runtime.errors import SpectrtError

GRID = 20  # alpha in 0, 1/20, ..., 19/20
DEFAULT_SAMPLE = 1024  # token rows per group kept for the loss
DEFAULT_TOKENS = 128  # prompt tokens per calibration prompt (longer prompts are cut)


@dataclass(frozen=True)
class _Group:
    layer: int
    prev: str  # module producing the input (its weight rows / elements get 1 / s)
    linears: tuple[str, ...]  # modules reading it (their input columns get s)


@dataclass
class AwqReport:
    prompts: int
    tokens: int
    groups: list = field(default_factory=list)  # (name, alpha, loss at alpha 0, loss at best)

    def summary(self) -> str:
        gain = [1 - best / base for _, _, base, best in self.groups if base > 0]
        alphas = [a for _, a, _, _ in self.groups]
        return (f"AWQ on {self.prompts} prompts ({self.tokens} tokens): {len(self.groups)} groups, mean alpha "
                f"{np.mean(alphas):.2f}, output error of the quantized groups -{100 * np.mean(gain):.1f} % vs plain "
                f"rounding (mean over groups)")


def _groups(model) -> list[_Group]:
    cfg = model.config
    gqa = getattr(cfg, "num_key_value_heads", cfg.num_attention_heads) != cfg.num_attention_heads
    out = []
    for i in range(cfg.num_hidden_layers):
        out.append(_Group(i, "input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")))
        if not gqa:
            out.append(_Group(i, "self_attn.v_proj", ("self_attn.o_proj",)))
        out.append(_Group(i, "post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")))
        out.append(_Group(i, "mlp.up_proj", ("mlp.down_proj",)))
    return out


def _module(layer, path: str):
    for part in path.split("."):
        layer = getattr(layer, part)
    return layer


def _collect(model, groups: list[_Group], batches, sample: int) -> tuple[dict, dict, int]:
    """One forward pass: mean |x| per input channel and up to ``sample`` rows of x, per group."""
    import torch

    sums, rows, counts, hooks = {}, {}, {}, []
    layers = model.model.layers
    for gi, grp in enumerate(groups):
        def hook(_mod, args, gi=gi):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            sums[gi] = sums.get(gi, 0) + x.abs().sum(0)
            counts[gi] = counts.get(gi, 0) + x.shape[0]
            kept = sum(r.shape[0] for r in rows.setdefault(gi, []))
            if kept < sample:
                rows[gi].append(x[: sample - kept].clone())
        hooks.append(_module(layers[grp.layer], grp.linears[0]).register_forward_pre_hook(hook))
    tokens = 0
    try:
        with torch.no_grad():
            for ids in batches:
                model(input_ids=torch.tensor([ids]), use_cache=False)
                tokens += len(ids)
    finally:
        for h in hooks:
            h.remove()
    mean = {gi: (sums[gi] / counts[gi]).numpy() for gi in sums}
    return mean, {gi: torch.cat(r).numpy() for gi, r in rows.items()}, tokens


def _search(x: np.ndarray, mean: np.ndarray, weights: list[np.ndarray], bits: int, block: int,
            grid: str) -> tuple[np.ndarray, float, float, float]:
    """Best ``s`` for one group: (s [K], alpha, loss at alpha 0 (plain rounding), best loss)."""
    refs = [x @ w.T for w in weights]  # [n, N] per linear
    best = (np.ones_like(mean), 0.0, np.inf)
    base = np.inf
    for step in range(GRID):
        alpha = step / GRID
        s = np.maximum(mean, 1e-8) ** alpha
        s = (s / np.sqrt(s.max() * s.min())).astype(np.float32)
        loss = 0.0
        for w, ref in zip(weights, refs):
            wq = quantize_blocks((w * s).T, bits, block, grid).dequantized(block)  # [K, N]
            loss += float(np.square((x / s) @ wq - ref).sum())
        if step == 0:
            base = loss
        if loss < best[2]:
            best = (s, alpha, loss)
    return best[0], best[1], base, best[2]


def _fold(layer, grp: _Group, s: np.ndarray) -> None:
    """prev /= s (its output channels), linears *= s (their input channels): the float function is unchanged."""
    import torch

    st = torch.from_numpy(s)
    prev = _module(layer, grp.prev)
    w = prev.weight.data
    prev.weight.data = (w / st.to(w.dtype)) if w.dim() == 1 else (w / st.to(w.dtype)[:, None])
    if getattr(prev, "bias", None) is not None:
        prev.bias.data = prev.bias.data / st.to(prev.bias.dtype)
    for name in grp.linears:
        lin = _module(layer, name)
        lin.weight.data = lin.weight.data * st.to(lin.weight.dtype)[None, :]


def apply_awq(model, tokenizer, prompts: list[str], bits: int, block: int, grid: str,
              sample: int = DEFAULT_SAMPLE, max_tokens: int = DEFAULT_TOKENS, progress=None) -> AwqReport:
    """Scale ``model``'s projections in place (see the module doc); returns what was chosen."""
    if not prompts:
        raise SpectrtError("AWQ needs at least one calibration prompt")
    if not hasattr(model, "model") or not hasattr(model.model, "layers"):
        raise SpectrtError("AWQ supports decoder models with model.layers (Llama, Mistral, Qwen2)")
    groups = _groups(model)
    batches = [tokenizer(p, add_special_tokens=False)["input_ids"][:max_tokens] for p in prompts]
    mean, rows, tokens = _collect(model, groups, [b for b in batches if b], sample)
    report = AwqReport(len(prompts), tokens)
    layers = model.model.layers
    for gi in (progress(range(len(groups))) if progress else range(len(groups))):
        grp = groups[gi]
        layer = layers[grp.layer]
        weights = [_module(layer, n).weight.detach().float().numpy() for n in grp.linears]  # [N, K] each
        s, alpha, base, best = _search(rows[gi], mean[gi], weights, bits, block, grid)
        _fold(layer, grp, s)
        report.groups.append((f"layers.{grp.layer}.{grp.prev}", alpha, base, best))
    return report


def awq_calibrator(prompts: list[str], progress=print):
    """The ``ExportOptions.calibrate_weights`` of ``export --awq``: AWQ on ``prompts``, reporting its choice."""

    def calibrate(model, tokenizer, bits: int, block: int, grid: str) -> None:
        report = apply_awq(model, tokenizer, prompts, bits, block, grid,
                           progress=lambda it: tqdm(it, desc="AWQ scales", unit="group", leave=False))
        progress(report.summary())

    return calibrate


__all__ = ["AwqReport", "DEFAULT_SAMPLE", "DEFAULT_TOKENS", "GRID", "apply_awq", "awq_calibrator"]
