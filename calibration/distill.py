"""Self-distillation of Medusa heads on the base model's own greedy responses.

Pipeline (``distill``):

1. greedy responses to the prompts (``generations.generate_responses``, cached + resumable);
2. prompts are split (seeded) into train and held-out;
3. the base's final hidden states (after the final norm) over prompt+response are computed once and
   cached on disk as fp16 (``sequence_hidden``, one cache for Medusa, Hydra and Hydra++); the heads train on
   the rows from the last prompt position to the second-to-last response position;
4. heads are trained with AdamW + cosine LR. Row ``t`` (hidden state at position ``t``) trains head ``k``
   to predict token ``t+k+2``; only targets inside the response count. Losses, weighted ``decay**k``:
   ``lm`` = cross-entropy on the base's own greedy tokens; ``teacher`` = KL(base next-token distribution
   at ``t+k+1`` || head ``k`` at ``t``);
5. per-head top-1/top-5 accuracy on the held-out prompts -> ``report.json``; heads via ``save_medusa``.
   The output directory is assembled in a temporary sibling and renamed into place.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from spectrt.calibration.config import DistillConfig
from spectrt.calibration.generations import (default_cache_dir, default_generations_path, generate_responses,
                                             model_fingerprint)
from spectrt.export.medusa import MedusaConfig, MedusaHeads, save_medusa
from spectrt.export.vocabtrim import hf_tokenizer_hash, load_vocab
from spectrt.export.files import staged
from spectrt.runtime.artifact import atomic_write
from spectrt.runtime.errors import SpectrtError

# ---------------------------------------------------------------------------------------- data

@dataclass
class HiddenSet:
    """Training rows of a set of samples. Row ``i`` of sample ``s`` is the hidden state at position
    ``p_s - 1 + i``; ``tokens[i]`` is the token that follows it (response token ``i``)."""

    hidden: torch.Tensor  # [N, H] fp16
    tokens: torch.Tensor  # [N] long
    lengths: list[int]  # rows per sample (= response length)

    def __len__(self):
        return self.hidden.shape[0]

    def select(self, seqs: list[int]) -> HiddenSet:
        """The rows of sequences ``seqs`` (indices into ``lengths``), in that order."""
        import torch

        starts = np.concatenate([[0], np.cumsum(self.lengths)]).astype(np.int64)
        idx = [torch.arange(int(starts[i]), int(starts[i + 1])) for i in seqs]
        idx = torch.cat(idx) if idx else torch.zeros(0, dtype=torch.long)
        return HiddenSet(self.hidden[idx], self.tokens[idx], [self.lengths[i] for i in seqs])

    def targets(self, num_heads: int) -> torch.Tensor:
        """``[N, K]`` row index of the token head k must predict (``i+k+1`` within the sample), -1 if outside."""
        import torch

        N = len(self)
        local = torch.empty(N, dtype=torch.long)
        start = 0
        for r in self.lengths:
            local[start:start + r] = torch.arange(r)
            start += r
        length = torch.repeat_interleave(torch.tensor(self.lengths, dtype=torch.long),
                                         torch.tensor(self.lengths, dtype=torch.long))
        ks = torch.arange(num_heads)
        ahead = local[:, None] + ks[None, :] + 1  # [N, K]
        rows = torch.arange(N)[:, None] + ks[None, :] + 1
        return torch.where(ahead < length[:, None], rows, torch.full_like(rows, -1))


def _base_decoder(model):
    base = getattr(model, "base_model", None)
    return base if base is not None and base is not model else None


def compute_hidden(model, samples: list[tuple[list[int], list[int]]], batch_tokens: int = 4096,
                   progress: bool = True) -> HiddenSet:
    """Final hidden states (fp16) of the base over prompt+response, at the rows the heads train on."""
    import torch
    from tqdm.auto import tqdm

    decoder = _base_decoder(model)
    device = next(model.parameters()).device
    seqs = [(i, list(p) + list(r[:-1]), len(p), len(r)) for i, (p, r) in enumerate(samples)]
    for i, seq, plen, rlen in seqs:
        if plen < 1 or rlen < 1:
            raise SpectrtError(f"sample {i}: empty prompt or response")
    order = sorted(seqs, key=lambda s: len(s[1]))
    batches, cur = [], []
    for s in order:
        if cur and (len(cur) + 1) * len(s[1]) > batch_tokens:
            batches.append(cur)
            cur = []
        cur.append(s)
    if cur:
        batches.append(cur)
    H = model.config.hidden_size
    out: list[torch.Tensor | None] = [None] * len(samples)
    bar = tqdm(total=sum(len(s[1]) for s in seqs), desc="hidden states", unit="tok", disable=not progress)
    try:
        for batch in batches:
            width = max(len(s[1]) for s in batch)
            ids = torch.zeros((len(batch), width), dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for j, (_, seq, _, _) in enumerate(batch):
                ids[j, :len(seq)] = torch.tensor(seq)
                mask[j, :len(seq)] = 1
            with torch.inference_mode():
                ids, mask = ids.to(device), mask.to(device)
                if decoder is not None:
                    hs = decoder(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
                else:
                    hs = model(input_ids=ids, attention_mask=mask, use_cache=False,
                               output_hidden_states=True).hidden_states[-1]
            if hs.shape[-1] != H:
                raise SpectrtError(f"base hidden states have size {hs.shape[-1]}, config says {H}")
            for j, (i, seq, plen, rlen) in enumerate(batch):
                out[i] = hs[j, plen - 1:plen - 1 + rlen].to("cpu", torch.float16).clone()
            bar.update(sum(len(s[1]) for s in batch))
    finally:
        bar.close()
    tokens = torch.tensor([t for _, r in samples for t in r], dtype=torch.long)
    return HiddenSet(torch.cat(out, 0), tokens, [len(r) for _, r in samples])


def _running_keys(fingerprint: str, samples) -> list[str]:
    """The cache key of every prefix of ``samples``: key ``i`` names the hidden states of ``samples[:i + 1]``."""
    h = hashlib.sha256(fingerprint.encode())
    keys = []
    for p, r in samples:
        h.update(json.dumps([p, r], separators=(",", ":")).encode())
        keys.append(h.copy().hexdigest()[:20])
    return keys


def _load_hidden(path: Path, samples) -> HiddenSet | None:
    """The cached hidden states of ``samples`` at ``path``, None when missing, damaged or of other samples."""
    from safetensors.torch import load_file

    if not path.is_file():
        return None
    try:
        t = load_file(str(path))
        hs = HiddenSet(t["hidden"], t["tokens"], t["lengths"].tolist())
    except Exception:  # corrupt cache: recompute
        return None
    if len(hs) == sum(len(r) for _, r in samples) and hs.lengths == [len(r) for _, r in samples]:
        return hs
    return None


def cached_hidden(model, samples, cache_dir: Path, fingerprint: str, batch_tokens: int,
                  progress: bool = True, log=print) -> HiddenSet:
    """``compute_hidden`` through an on-disk cache keyed by the model fingerprint and the samples.

    Samples appended to an earlier run's (more prompts files, say) reuse its cache for the samples they
    share: the longest cached prefix is loaded and only the rest is computed."""
    import torch
    from safetensors.torch import save

    keys = _running_keys(fingerprint, samples)
    path = Path(cache_dir) / f"hidden-{keys[-1]}.safetensors"
    hs = _load_hidden(path, samples)
    if hs is not None:
        log(f"hidden states: cached ({path})")
        return hs
    head = None
    for k in range(len(samples) - 1, 0, -1):
        prefix = Path(cache_dir) / f"hidden-{keys[k - 1]}.safetensors"
        if prefix.is_file() and (head := _load_hidden(prefix, samples[:k])) is not None:
            log(f"hidden states: the first {k} of {len(samples)} samples cached, computing the rest")
            break
    done = len(head.lengths) if head is not None else 0
    hs = compute_hidden(model, samples[done:], batch_tokens, progress)
    if head is not None:
        hs = HiddenSet(torch.cat([head.hidden, hs.hidden], 0), torch.cat([head.tokens, hs.tokens], 0),
                       head.lengths + hs.lengths)
    atomic_write(path, save({"hidden": hs.hidden.contiguous(), "tokens": hs.tokens,
                             "lengths": torch.tensor(hs.lengths, dtype=torch.long)}))
    return hs


def sequence_hidden(model, samples, cache_dir: Path, fingerprint: str, batch_tokens: int,
                    progress: bool = True, log=print) -> HiddenSet:
    """The base's hidden states at every position of each prompt + response but the last (sample row ``i``
    predicts token ``i + 1``), through the on-disk cache. One cache serves every draft architecture: Medusa
    and Hydra train on the response rows (``response_rows``), Hydra++'s prefix layer reads them all."""
    seqs = [([p[0]], list(p[1:]) + list(r)) for p, r in samples]
    return cached_hidden(model, seqs, cache_dir, fingerprint, batch_tokens, progress, log)


def split_hidden(model, samples, extra, train_idx: list[int], held_idx: list[int], cache_dir: Path,
                 fingerprint: str, batch_tokens: int, progress: bool = True, log=print) -> tuple[tuple, tuple]:
    """((``sequence_hidden`` rows, samples) of ``samples[train_idx] + extra``, the same of
    ``samples[held_idx]``: (None, []) when it is empty).

    Computed as one cache over ``samples + extra`` in their order, then split: the split is a permutation of
    all samples, so a cache per split would change whenever prompts are added; one over every sample in order
    is a prefix of the next run's when prompts files are appended (``cached_hidden`` reuses it)."""
    every = list(samples) + list(extra)
    full = sequence_hidden(model, every, cache_dir, fingerprint, batch_tokens, progress, log)
    train = list(train_idx) + list(range(len(samples), len(every)))
    held = full.select(list(held_idx)) if held_idx else None
    return (full.select(train), [every[i] for i in train]), (held, [samples[i] for i in held_idx])


def response_rows(full: HiddenSet, samples) -> HiddenSet:
    """The rows of ``sequence_hidden(samples)`` that predict response tokens (the last ``len(response)`` of
    each sample): the same rows ``compute_hidden(samples)`` computes."""
    import torch

    idx, start = [], 0
    for n, (_, r) in zip(full.lengths, samples):
        idx.append(torch.arange(start + n - len(r), start + n))
        start += n
    idx = torch.cat(idx) if idx else torch.zeros(0, dtype=torch.long)
    return HiddenSet(full.hidden[idx], full.tokens[idx], [len(r) for _, r in samples])


# ---------------------------------------------------------------------------------------- training

def native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AMX or AVX512-BF16, read from /proc/cpuinfo)."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def lm_head_dtype(cfg: DistillConfig):
    """The dtype of the frozen base LM head during training: the ``[rows, H] x [H, V]`` matmuls (forward and
    backward) dominate a step, and bfloat16 on a CPU with native bf16 (AMX) runs them ~4x faster than fp32.
    Logits are upcast to fp32 before the softmax; held-out accuracy is always measured in fp32."""
    import torch

    use = native_bf16() if cfg.bf16 is None else cfg.bf16
    return torch.bfloat16 if use else torch.float32


def _head_loss(heads, hidden, tidx, data: HiddenSet, lm_weight, loss: str, decay: float, remap=None):
    """Weighted loss of one minibatch. ``hidden`` [B, H] fp32, ``tidx`` [B, K] target rows (-1: none);
    ``lm_weight`` [V, H] in the dtype the LM-head matmuls run in (``lm_head_dtype``). ``remap`` [vocab]: a
    token's row in a trimmed ``lm_weight`` (-1: not kept; such targets do not count), None: the full one."""
    import torch
    import torch.nn.functional as F

    K = tidx.shape[1]
    if remap is not None:  # targets outside the kept rows cannot be drafted: they teach nothing
        tidx = torch.where((tidx >= 0) & (remap[data.tokens[tidx.clamp(min=0)]] >= 0), tidx, -1)
    feats = heads.features(hidden)  # [B, K, H]
    valid = tidx >= 0
    if not valid.any():
        return None
    kk = torch.arange(K).expand_as(tidx)[valid]  # [M] head of each (row, head) pair
    rows = tidx[valid]  # [M] row of the token to predict
    f = feats[valid]  # [M, H]
    if heads.config.shared_lm_head:
        logits = F.linear(f.to(lm_weight.dtype), lm_weight)
    else:
        L = heads.config.num_layers
        logits = torch.zeros(f.shape[0], heads.config.vocab_size, dtype=f.dtype)
        for k in range(K):
            idx = (kk == k).nonzero().flatten()
            if idx.numel():
                logits = logits.index_put((idx,), heads.medusa_head[k][L](f[idx]))
    logp = F.log_softmax(logits.float(), dim=-1)
    if loss == "lm":
        gold = data.tokens[rows] if remap is None else remap[data.tokens[rows]]
        per = -logp.gather(1, gold[:, None]).squeeze(1)
    else:
        with torch.no_grad():
            # row r's hidden state (position p-1+r) is where the base predicts tokens[r]: for head k at row i
            # (position t) that is row i+k+1, i.e. the base's next-token distribution at position t+k+1
            t_logp = F.log_softmax(F.linear(data.hidden[rows].to(lm_weight.dtype), lm_weight).float(), dim=-1)
        per = (t_logp.exp() * (t_logp - logp)).sum(-1)
    w = decay ** torch.arange(K, dtype=torch.float32)
    counts = torch.bincount(kk, minlength=K).clamp(min=1).float()
    per_head = torch.zeros(K).index_add_(0, kk, per) / counts
    present = (torch.bincount(kk, minlength=K) > 0).float()
    return (w * per_head * present).sum() / (w * present).sum()


def evaluate(heads, data: HiddenSet, lm_weight, batch_size: int = 512, kept=None) -> list[dict]:
    """Per head: top-1 / top-5 accuracy against the base's greedy tokens, and chain top-1 (heads 0..k all
    right, i.e. a chain of k+1 drafted tokens accepted). ``kept`` [N]: the token id of each row of a trimmed
    ``lm_weight`` (as a trimmed export drafts: a token outside it is a miss)."""
    import torch

    K = heads.num_heads
    tidx = data.targets(K)
    top1 = torch.zeros(K)
    top5 = torch.zeros(K)
    chain = torch.zeros(K)
    n = torch.zeros(K)
    heads.eval()
    for s in range(0, len(data), batch_size):
        h = data.hidden[s:s + batch_size].float()
        t = tidx[s:s + batch_size]
        with torch.no_grad():
            logits = heads.logits(h, lm_weight)  # [B, K, V]
        valid = t >= 0
        gold = data.tokens[t.clamp(min=0)]
        best = logits.topk(5, dim=-1).indices  # [B, K, 5]
        if kept is not None:
            best = kept[best]
        hit1 = (best[..., 0] == gold) & valid
        hit5 = (best == gold[..., None]).any(-1) & valid
        top1 += hit1.sum(0)
        top5 += hit5.sum(0)
        chain += (torch.cumprod(hit1.int(), dim=1).bool() & valid).sum(0)
        n += valid.sum(0)
    return [{"head": k, "predicts": f"t+{k + 2}", "positions": int(n[k]),
             "top1": round(float(top1[k] / max(n[k], 1)), 4), "top5": round(float(top5[k] / max(n[k], 1)), 4),
             "chain_top1": round(float(chain[k] / max(n[k], 1)), 4)} for k in range(K)]


def train_heads(heads, data: HiddenSet, lm_weight, cfg: DistillConfig, progress: bool = True,
                heldout: HiddenSet | None = None, log=print, kept=None) -> list[dict]:
    """Train ``heads`` in place; returns per-epoch history (mean train loss, held-out top-1 per head).
    ``kept``: the token ids of a trimmed ``lm_weight``'s rows (``cfg.train_vocab``), None: the full vocabulary."""
    import torch
    from tqdm.auto import tqdm

    K = heads.num_heads
    tidx_all = data.targets(K)
    keep = (tidx_all >= 0).any(1).nonzero().flatten()  # rows with at least one target
    if keep.numel() == 0:
        raise SpectrtError("no training positions: responses are too short for the heads "
                           f"(need at least 2 response tokens; got lengths {data.lengths[:8]}...)")
    gen = torch.Generator().manual_seed(cfg.seed)
    steps_per_epoch = math.ceil(keep.numel() / cfg.batch_size)
    params, opt, sched = training_optimizer(heads, cfg, steps_per_epoch * cfg.epochs)
    lm_weight = lm_weight.detach().to(lm_head_dtype(cfg))
    remap = None if kept is None else token_rows(kept, max(int(kept.max()), int(data.tokens.max())) + 1)
    history = []
    step = 0
    for epoch in range(cfg.epochs):
        heads.train()
        perm = keep[torch.randperm(keep.numel(), generator=gen)]
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="step",
                   disable=not progress)
        total_loss, seen = 0.0, 0
        for b in bar:
            rows = perm[b * cfg.batch_size:(b + 1) * cfg.batch_size]
            loss = _head_loss(heads, data.hidden[rows].float(), tidx_all[rows], data, lm_weight, cfg.loss,
                              cfg.decay, remap)
            if loss is None:
                continue
            optimizer_step(opt, sched, params, loss)
            step += 1
            total_loss += loss.detach().item() * rows.numel()
            seen += rows.numel()
            bar.set_postfix(loss=f"{total_loss / seen:.3f}", lr=f"{sched.get_last_lr()[0]:.2e}")
        bar.close()
        entry = {"epoch": epoch + 1, "train_loss": round(total_loss / max(seen, 1), 4)}
        if heldout is not None and len(heldout):
            entry["heldout_top1"] = [r["top1"] for r in evaluate(heads, heldout, lm_weight, kept=kept)]
        history.append(entry)
        log(f"epoch {epoch + 1}: train loss {entry['train_loss']:.4f}"
            + (f", held-out top-1 {entry['heldout_top1']}" if "heldout_top1" in entry else ""))
    heads.eval()
    return history


# ---------------------------------------------------------------------------------------- driver

def split_samples(n: int, holdout: float, seed: int) -> tuple[list[int], list[int]]:
    """(train indices, held-out indices): a seeded permutation, ``max(1, round(holdout*n))`` held out."""
    import torch

    if n < 2:
        raise SpectrtError(f"need at least 2 prompts (got {n}): some are held out to measure the heads")
    k = 0 if holdout <= 0 else min(n - 1, max(1, round(holdout * n)))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(perm[k:]), sorted(perm[:k])


def format_report(report: dict) -> str:
    lines = [f"{'head':>4} {'predicts':>8} {'top-1':>7} {'top-5':>7} {'chain':>7} {'positions':>9}"]
    for r in report["heads"]:
        lines.append(f"{r['head']:>4} {r['predicts']:>8} {r['top1']:>7.3f} {r['top5']:>7.3f} "
                     f"{r['chain_top1']:>7.3f} {r['positions']:>9}")
    return "\n".join(lines)


def distill_samples(model, samples, out_dir, cfg: DistillConfig, model_name: str = "", progress: bool = True,
                    log=print, fingerprint: str | None = None, timings: dict | None = None,
                    kept=None, extra=()) -> dict:
    """Train heads on ``[(prompt_ids, response_ids)]`` and write them (+ report.json) to ``out_dir``.
    ``kept``: token ids (``cfg.train_vocab`` of a VocabTrim ranking) the shared LM head is trimmed to in
    training and in the reported accuracy; None: the full vocabulary. ``extra``: more samples, trained on
    only (``copy_task_responses``: never in the held-out split)."""

    out_dir, fingerprint, cache_dir, train_idx, held_idx = training_setup(model, samples, out_dir, cfg, fingerprint)
    timings = dict(timings or {})
    out_emb = model.get_output_embeddings()
    if out_emb is None or getattr(out_emb, "bias", None) is not None:
        raise SpectrtError("the base model needs a bias-free linear LM head for Medusa heads")
    lm_weight = out_emb.weight.detach().float()
    V, H = lm_weight.shape
    kept, rows_weight = trimmed_rows(lm_weight, kept)  # the LM-head rows the heads train and are measured on

    t0 = time.time()

    (train, train_samples), (held, held_samples) = split_hidden(model, samples, extra, train_idx, held_idx, cache_dir,
                                                                fingerprint, cfg.hidden_batch_tokens, progress, log)
    train = response_rows(train, train_samples)
    held = response_rows(held, held_samples) if held is not None else None
    timings["hidden_s"] = round(time.time() - t0, 1)

    mcfg = MedusaConfig(num_heads=cfg.heads, num_layers=cfg.layers, hidden_size=H, vocab_size=V,
                        shared_lm_head=cfg.shared_lm_head, base_model_name_or_path=model_name)
    heads = MedusaHeads(mcfg)
    if not mcfg.shared_lm_head:  # like the reference: each head's LM head starts as a copy of the base's
        for head in heads.medusa_head:
            head[cfg.layers].weight.data.copy_(lm_weight)

    initial = evaluate(heads, held, rows_weight, kept=kept) if held is not None else None
    t0 = time.time()
    history = train_heads(heads, train, rows_weight, cfg, progress, heldout=held, log=log, kept=kept)
    timings["train_s"] = round(time.time() - t0, 1)
    final = evaluate(heads, held, rows_weight, kept=kept) if held is not None else []

    report = {
        "model": model_name,
        "model_fingerprint": fingerprint,
        "arch": cfg.arch,
        "shared_lm_head": mcfg.shared_lm_head,
        "num_heads": cfg.heads,
        "num_layers": cfg.layers,
        "loss": cfg.loss,
        "lm_head_dtype": str(lm_head_dtype(cfg)).removeprefix("torch."),
        "train_vocab": None if kept is None else {"size": int(kept.numel()), "ranking": cfg.vocab},
        "train": {"prompts": len(train_idx), "copy_tasks": len(extra), "positions": len(train)},
        "heldout": {"prompts": len(held_idx), "positions": len(held) if held is not None else 0},
        "heads": final,
        "untrained_heads": initial,
        "history": history,
        "timings": timings,
        "config": asdict(cfg),
    }
    publish_heads(save_medusa, heads, out_dir, report, half=cfg.half,
                  extra_config={"trained_with": "spectrt distill", "loss": cfg.loss})
    if final:
        log(f"held-out accuracy ({len(held_idx)} prompts, {len(held)} positions):\n" + format_report(report))
    log(f"wrote {out_dir}")
    return report


def trimmed_rows(lm_weight, kept):
    """(kept as a tensor, ``lm_weight[kept]``) for token ids ``kept`` (checked), or (None, lm_weight)."""
    import torch

    if kept is None:
        return None, lm_weight
    V = lm_weight.shape[0]
    kept = torch.as_tensor(np.asarray(kept, np.int64))
    if kept.numel() == 0 or int(kept.min()) < 0 or int(kept.max()) >= V:
        raise SpectrtError(f"the trimmed vocabulary's token ids must lie in 0..{V - 1}")
    return kept, lm_weight[kept]


def token_rows(kept, size: int):
    """[size]: each token id's row in an LM head trimmed to ``kept`` (-1: not kept)."""
    import torch

    rows = torch.full((size,), -1, dtype=torch.long)
    rows[kept] = torch.arange(len(kept))
    return rows


def training_optimizer(heads, cfg, total: int):
    """(trainable params, AdamW, its LR schedule) for ``total`` steps: linear warm-up over ``cfg.warmup`` of them,
    then cosine decay to 0 — one schedule for Medusa and Hydra distillation."""
    import torch

    warm = max(1, int(cfg.warmup * total)) if cfg.warmup > 0 else 0

    def lr_at(step):
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))

    params = [p for p in heads.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return params, opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_at)


def optimizer_step(opt, sched, params, loss) -> None:
    """Backward, clip the gradient norm to 1, step the optimizer and the LR schedule."""
    import torch

    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    sched.step()


def training_setup(model, samples, out_dir, cfg, fingerprint: str | None):
    """Shared start of Medusa and Hydra training: checked config and output dir, seed, cache dir, the
    model fingerprint and the seeded train/held-out split. Returns (out_dir, fingerprint, cache_dir,
    train_idx, held_idx)."""
    import torch


    cfg.validate()
    out_dir = Path(out_dir).expanduser()
    if out_dir.exists() and not out_dir.is_dir():
        raise SpectrtError(f"{out_dir}: exists and is not a directory")
    torch.manual_seed(cfg.seed)
    fingerprint = fingerprint or model_fingerprint(model)
    cache_dir = cache_dir_of(cfg)
    train_idx, held_idx = split_samples(len(samples), cfg.holdout, cfg.seed)
    return out_dir, fingerprint, cache_dir, train_idx, held_idx


def publish_heads(save, heads, out_dir: Path, report: dict, **save_kwargs) -> None:
    """``save(heads, dir, **save_kwargs)`` + ``report.json`` into ``out_dir`` atomically (other files kept)."""
    with staged(out_dir, keep_existing=True) as staging:
        save(heads, staging / "heads", **save_kwargs)
        for f in (staging / "heads").iterdir():
            os.replace(f, staging / f.name)
        (staging / "heads").rmdir()
        (staging / "report.json").write_text(json.dumps(report, indent=2) + "\n")


def cache_dir_of(cfg) -> Path:
    """The generations + hidden-states cache directory of ``cfg`` (default: ``generations.default_cache_dir``)."""
    return Path(cfg.cache_dir).expanduser() if cfg.cache_dir else default_cache_dir()


def distill(model, tok, prompts: list[str], out_dir, cfg: DistillConfig | None = None, model_name: str = "",
            progress: bool = True, log=print) -> dict:
    """Greedy responses (cached) -> hidden states (cached) -> trained heads in ``out_dir``; the report dict."""
    cfg = cfg or DistillConfig()
    d = training_data(model, tok, prompts, cfg, progress, log)
    return distill_samples(model, d.samples, out_dir, cfg, model_name, progress, log, d.fingerprint, d.timings,
                           d.kept, d.extra)


@dataclass
class TrainingData:
    """What Medusa and Hydra distillation train on (``training_data``)."""

    samples: list  # [(prompt_ids, response_ids)]: the base's greedy answers to the prompts
    fingerprint: str  # the base model's
    timings: dict
    kept: object  # token ids of ``cfg.train_vocab`` (np.ndarray), None: the full vocabulary
    extra: list  # copy-style samples, trained on only


def training_data(model, tok, prompts: list[str], cfg, progress: bool = True, log=print) -> TrainingData:
    """The trimmed rows (a bad ranking fails before any generation), the base's answers to ``prompts`` and
    the copy-style tasks built from them, all through the shared generation cache."""
    kept = train_vocab_ids(model, tok, cfg)
    samples, fingerprint, timings = base_responses(model, tok, prompts, cfg, progress, log)
    extra = copy_task_responses(model, tok, samples, cfg, progress, log, fingerprint)
    return TrainingData(samples, fingerprint, timings, kept, extra)


# copy-style tasks over the base's own answers (``cfg.copy_tasks``): the answer to such a prompt repeats much of
# the prompt, the copying that summarization, extraction and RAG prompts reward
COPY_TEMPLATES = (
    "Summarize the following text in two or three sentences.\n\n{text}",
    "Rewrite the following text in simpler words.\n\n{text}",
    "Extract the key points of the following text as a bulleted list.\n\n{text}",
    "Correct any mistakes in the following text and give the corrected text.\n\n{text}",
)
COPY_MIN_TOKENS = 32  # answers shorter than this make poor source texts


def copy_task_responses(model, tok, samples, cfg, progress: bool = True, log=print,
                        fingerprint: str | None = None) -> list:
    """``cfg.copy_tasks`` copy-style samples: prompts from ``COPY_TEMPLATES`` around the base's answers to
    training-split prompts (seeded; never a held-out prompt's answer, so the held-out accuracy stays clean), and
    the base's greedy answers to them (the shared generation cache)."""
    import torch

    if not cfg.copy_tasks:
        return []
    train_idx, _ = split_samples(len(samples), cfg.holdout, cfg.seed)
    sources = [i for i in train_idx if len(samples[i][1]) >= COPY_MIN_TOKENS]
    if not sources:
        raise SpectrtError(f"--copy-tasks: no training answer has {COPY_MIN_TOKENS} tokens or more to build them from")
    order = torch.randperm(len(sources), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
    picked = [sources[order[j % len(sources)]] for j in range(cfg.copy_tasks)]
    texts = [tok.decode(samples[i][1], skip_special_tokens=True).strip() for i in picked]
    prompts = [COPY_TEMPLATES[j % len(COPY_TEMPLATES)].format(text=t) for j, t in enumerate(texts)]
    log(f"copy-style tasks: {len(prompts)} from {len(set(picked))} training answers")
    path = default_generations_path(model, cache_dir_of(cfg), fingerprint)
    return generate_responses(model, tok, prompts, cfg.max_new_tokens, path, cfg.gen_batch_size, progress)


def train_vocab_ids(model, tok, cfg: DistillConfig):
    """The token ids of ``cfg.train_vocab`` (the first N of the ranking ``cfg.vocab``), None when unset; shared
    by Medusa and Hydra distillation."""
    if cfg.train_vocab is None:
        return None
    if not cfg.vocab:
        raise SpectrtError("--train-vocab needs a VocabTrim ranking: --vocab FILE (`spectrt calibrate vocab`)")
    vocab = model.get_output_embeddings().weight.shape[0]
    return load_vocab(cfg.vocab, vocab, hf_tokenizer_hash(tok), topk=1, size=cfg.train_vocab).kept_ids


def base_responses(model, tok, prompts: list[str], cfg, progress: bool = True, log=print):
    """The base model's greedy answers (shared generation cache): (samples, model fingerprint, timings).

    Also applies ``cfg.validate()`` and ``cfg.threads``; shared by Medusa and Hydra distillation.
    """
    import torch

    cfg.validate()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    cache_dir = cache_dir_of(cfg)
    fingerprint = model_fingerprint(model)
    t0 = time.time()
    gen_path = default_generations_path(model, cache_dir, fingerprint)
    log(f"generations cache: {gen_path}")
    samples = generate_responses(model, tok, prompts, cfg.max_new_tokens, gen_path, cfg.gen_batch_size, progress)
    return samples, fingerprint, {"generate_s": round(time.time() - t0, 1)}
