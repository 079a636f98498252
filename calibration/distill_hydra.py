"""Self-distillation of Hydra (``--arch hydra``) and Hydra++ (``--arch hydra++``) heads.

Same pipeline and caches as Medusa (``calibration.distill``): greedy responses from the shared generations
cache, a seeded train/held-out split, base hidden states from the shared ``sequence_hidden`` cache. Differences:

* teacher forcing: head k at position t sees ``concat(ctx_t, E(y_{t+1}), ..., E(y_{t+k+1}))`` with the true
  (base greedy) tokens, and predicts ``y_{t+k+2}``; ``E`` is the base's frozen input embedding;
* Hydra++ runs the prefix layer (one Llama decoder layer, trained) over the base hidden states of the
  *whole* sequence, prompt included (the shared cache holds every position; Hydra and Medusa read only the
  response rows); only positions in the response are trained on;
* losses: ``lm`` (cross-entropy on the base's greedy tokens, Hydra's default) or ``teacher`` (cross-entropy
  against the base's next-token distribution, Hydra++'s default, with dropout ``--dropout``).

Per-head held-out accuracy (teacher forced; ``chain_top1``: heads 0..k all right) goes to ``report.json`` in
the format the exporter reads to size the tree.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass

from spectrt.calibration.config import HYDRA_ARCHS, HydraDistillConfig
from spectrt.calibration.distill import (format_report, lm_head_dtype, optimizer_step, publish_heads, response_rows,
                                         split_hidden, token_rows, training_data, training_optimizer, training_setup,
                                         trimmed_rows)
from spectrt.export.families import rope_tables
from spectrt.export.hydra import HydraConfig, HydraHeads, prefix_dims, save_hydra
from spectrt.runtime.errors import SpectrtError


@dataclass
class SeqData:
    """Per sample: hidden rows [n, H] (row r at position start0 + r predicts tokens[r]) and the first row
    that is trained on (the last prompt position)."""

    hidden: list  # of [n_s, H] fp16 tensors
    tokens: list  # of [n_s] long tensors
    starts: list  # first trained row per sample

    def __len__(self):
        return len(self.hidden)


def load_data(hs, samples, full: bool) -> SeqData:
    """Per-sample hidden states from ``sequence_hidden(samples)`` rows ``hs``; ``full``: every position from 0
    (Hydra++'s prefix layer reads the whole context), else only the response rows (Hydra, like Medusa)."""
    if full:
        starts = [len(p) - 1 for p, _ in samples]
    else:
        hs, starts = response_rows(hs, samples), [0] * len(samples)
    hidden, tokens, s = [], [], 0
    for n in hs.lengths:
        hidden.append(hs.hidden[s:s + n])
        tokens.append(hs.tokens[s:s + n])
        s += n
    return SeqData(hidden, tokens, starts)


def _batch(data: SeqData, idx, num_heads: int):
    """Padded batch + the trained (sample, row) pairs: hid [B, T, H] fp32, tok [B, T + K], rows, valid [M, K]."""
    import torch

    B, T = len(idx), max(data.hidden[i].shape[0] for i in idx)
    H = data.hidden[idx[0]].shape[1]
    hid = torch.zeros(B, T, H)
    tok = torch.zeros(B, T + num_heads + 1, dtype=torch.long)
    bs, rs, lens = [], [], []
    for b, i in enumerate(idx):
        n = data.hidden[i].shape[0]
        hid[b, :n] = data.hidden[i].float()
        tok[b, :n] = data.tokens[i]
        r = torch.arange(data.starts[i], n)
        bs.append(torch.full_like(r, b))
        rs.append(r)
        lens.append(torch.full_like(r, n))
    b, r, n = torch.cat(bs), torch.cat(rs), torch.cat(lens)
    valid = r[:, None] + torch.arange(num_heads)[None] + 1 < n[:, None]  # [M, K] target row inside the sample
    return hid, tok, b, r, valid


def _head_terms(heads, emb, lm_weight, hid, tok, b, r, valid, ctx):
    """Yields (k, logits [M_k, V], target rows (b, r + k + 1)) for every head with valid positions.
    ``lm_weight``: the base LM head [V, H] (shared heads run their matmul in its dtype)."""
    import torch

    for k in range(heads.num_heads):
        m = valid[:, k]
        if not m.any():
            continue
        bk, rk = b[m], r[m]
        path = tok[bk[:, None], rk[:, None] + torch.arange(k + 1)[None]]  # y_{t+1} .. y_{t+k+1}
        feats = heads.features(k, ctx[bk, rk], emb[path])
        if heads.config.shared_lm_head:
            logits = torch.nn.functional.linear(feats.to(lm_weight.dtype), lm_weight)
        else:
            logits = heads.logits(k, feats)
        yield k, logits, (bk, rk + k + 1)


def hydra_loss(heads, emb, lm_weight, hid, tok, b, r, valid, loss: str, decay: float, remap=None):
    """``remap`` [vocab]: a token's row in a trimmed ``lm_weight`` (-1: not kept), None: the full LM head. Over
    trimmed rows, ``lm`` ignores targets outside them and ``teacher`` is the base's distribution over them."""
    import torch
    import torch.nn.functional as F

    ctx = heads.context(hid)
    total, weight = 0.0, 0.0
    for k, logits, (bt, rt) in _head_terms(heads, emb, lm_weight, hid, tok, b, r, valid, ctx):
        logp = F.log_softmax(logits.float(), -1)
        if loss == "lm":
            gold = tok[bt, rt] if remap is None else remap[tok[bt, rt]]
            inside = gold >= 0
            if not inside.any():
                continue
            per = -logp[inside].gather(1, gold[inside][:, None]).squeeze(1)
        else:  # cross-entropy against the base's next-token distribution at the target position
            with torch.no_grad():
                t_p = F.softmax(F.linear(hid[bt, rt].to(lm_weight.dtype), lm_weight).float(), -1)
            per = -(t_p * logp).sum(-1)
        total = total + decay ** k * per.mean()
        weight += decay ** k
    return total / weight if weight else None


def evaluate(heads, data: SeqData, emb, lm_weight, seqs_per_batch: int = 16, kept=None) -> list[dict]:
    """Teacher-forced top-1/top-5/chain accuracy; ``kept``: the token ids of a trimmed ``lm_weight``'s rows."""
    import torch

    K = heads.num_heads
    top1, top5, chain, n = (torch.zeros(K) for _ in range(4))
    heads.eval()
    for s in range(0, len(data), seqs_per_batch):
        idx = list(range(s, min(len(data), s + seqs_per_batch)))
        hid, tok, b, r, valid = _batch(data, idx, K)
        with torch.no_grad():
            ctx = heads.context(hid)
            hit1 = torch.zeros(valid.shape, dtype=torch.bool)
            for k, logits, (bt, rt) in _head_terms(heads, emb, lm_weight, hid, tok, b, r, valid, ctx):
                gold = tok[bt, rt]
                best = logits.topk(5, -1).indices
                if kept is not None:
                    best = kept[best]
                hit1[valid[:, k], k] = best[:, 0] == gold
                top5[k] += (best == gold[:, None]).any(-1).sum()
        top1 += hit1.sum(0)
        chain += (torch.cumprod(hit1.int(), 1).bool() & valid).sum(0)
        n += valid.sum(0)
    return [{"head": k, "predicts": f"t+{k + 2}", "positions": int(n[k]),
             "top1": round(float(top1[k] / max(n[k], 1)), 4), "top5": round(float(top5[k] / max(n[k], 1)), 4),
             "chain_top1": round(float(chain[k] / max(n[k], 1)), 4)} for k in range(K)]


def train_hydra(heads, data: SeqData, emb, lm_weight, cfg: HydraDistillConfig, progress=True, heldout=None,
                log=print, kept=None) -> list[dict]:
    """Train in place; ``kept``: the token ids of a trimmed ``lm_weight``'s rows (``cfg.train_vocab``)."""
    import torch
    from tqdm.auto import tqdm

    K = heads.num_heads
    gen = torch.Generator().manual_seed(cfg.seed)
    rows = [max(0, data.hidden[i].shape[0] - data.starts[i]) for i in range(len(data))]
    if sum(max(0, n - 1) for n in rows) == 0:
        raise SpectrtError("no training positions: responses are too short for the heads")

    def batches(order):
        """Samples packed greedily into batches of at least ``cfg.batch_size`` trained rows."""
        cur, size = [], 0
        for i in order:
            cur.append(i)
            size += rows[i]
            if size >= cfg.batch_size:
                yield cur
                cur, size = [], 0
        if cur:
            yield cur

    # one sample order per epoch, drawn up front, so the step count (LR schedule, progress) is exact
    orders = [torch.randperm(len(data), generator=gen).tolist() for _ in range(cfg.epochs)]
    steps = [sum(1 for _ in batches(o)) for o in orders]
    lm_train = lm_weight.detach().to(lm_head_dtype(cfg))  # the base LM head: teacher, and shared heads' LM head
    remap = None if kept is None else token_rows(kept, emb.shape[0])
    params, opt, sched = training_optimizer(heads, cfg, sum(steps))
    history = []
    for epoch in range(cfg.epochs):
        heads.train()
        bar = tqdm(batches(orders[epoch]), total=steps[epoch], desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="step",
                   disable=not progress)
        tot, seen = 0.0, 0
        for idx in bar:
            hid, tok, b, r, valid = _batch(data, idx, K)
            loss = hydra_loss(heads, emb, lm_train, hid, tok, b, r, valid, cfg.loss, cfg.decay, remap)
            if loss is None:
                continue
            optimizer_step(opt, sched, params, loss)
            tot += loss.item() * len(b)
            seen += len(b)
            bar.set_postfix(loss=f"{tot / max(seen, 1):.3f}")
        bar.close()
        entry = {"epoch": epoch + 1, "train_loss": round(tot / max(seen, 1), 4)}
        if heldout is not None and len(heldout):
            entry["heldout_top1"] = [h["top1"] for h in evaluate(heads, heldout, emb, lm_weight, kept=kept)]
        history.append(entry)
        log(f"epoch {epoch + 1}: train loss {entry['train_loss']:.4f}"
            + (f", held-out top-1 {entry['heldout_top1']}" if "heldout_top1" in entry else ""))
    heads.eval()
    return history


def distill_hydra_samples(model, samples, out_dir, cfg: HydraDistillConfig, model_name: str = "",
                          progress: bool = True, log=print, fingerprint: str | None = None,
                          timings: dict | None = None, kept=None, extra=()) -> dict:
    """Train Hydra/Hydra++ heads on ``[(prompt_ids, response_ids)]``; writes heads + report.json to ``out_dir``.
    ``kept``: the token ids the shared LM head is trimmed to (``cfg.train_vocab``), None: the full vocabulary;
    ``extra``: more samples, trained on only (copy-style tasks)."""

    out_dir, fingerprint, cache_dir, train_idx, held_idx = training_setup(model, samples, out_dir, cfg, fingerprint)
    timings = dict(timings or {})
    out_emb = model.get_output_embeddings()
    if out_emb is None or getattr(out_emb, "bias", None) is not None:
        raise SpectrtError("the base model needs a bias-free linear LM head for hydra heads")
    lm_weight = out_emb.weight.detach().float()
    V, H = lm_weight.shape
    kept, rows_weight = trimmed_rows(lm_weight, kept)
    arch = HYDRA_ARCHS[cfg.arch]
    full = arch == "prefix-mlp"
    t0 = time.time()
    (train, train_samples), (held, held_samples) = split_hidden(model, samples, extra, train_idx, held_idx, cache_dir,
                                                                fingerprint, cfg.hidden_batch_tokens, progress, log)
    train = load_data(train, train_samples, full)
    held = load_data(held, held_samples, full) if held is not None else None
    timings["hidden_s"] = round(time.time() - t0, 1)

    emb = model.get_input_embeddings().weight.detach().float()  # frozen E
    shared = cfg.shared_lm_head
    hcfg = HydraConfig(num_heads=cfg.heads, num_layers=cfg.layers, hidden_size=H, vocab_size=V, arch=arch,
                       shared_lm_head=shared, dropout=cfg.dropout,
                       prefix=prefix_dims(model.config) if full else None, base_model_name_or_path=model_name)
    heads = HydraHeads(hcfg)
    if not shared:  # like the reference: own LM heads start as the base's
        for k in range(cfg.heads):
            heads.hydra_lm_head[k][1].weight.data.copy_(lm_weight)
            heads.hydra_lm_head[k][1].bias.data.zero_()
    if full:
        inv_freq, scale = rope_tables(model)
        heads.prefix_embeding_layer.set_rope(inv_freq, scale)
    initial = evaluate(heads, held, emb, rows_weight, kept=kept) if held is not None else None
    t0 = time.time()
    history = train_hydra(heads, train, emb, rows_weight, cfg, progress, held, log, kept=kept)
    timings["train_s"] = round(time.time() - t0, 1)
    final = evaluate(heads, held, emb, rows_weight, kept=kept) if held is not None else []
    report = {"model": model_name, "model_fingerprint": fingerprint, "arch": cfg.arch, "hydra_head_arch": arch,
              "num_heads": cfg.heads, "num_layers": cfg.layers, "shared_lm_head": shared, "loss": cfg.loss,
              "lm_head_dtype": str(lm_head_dtype(cfg)).removeprefix("torch."),
              "train_vocab": None if kept is None else {"size": int(kept.numel()), "ranking": cfg.vocab},
              "train": {"prompts": len(train_idx), "copy_tasks": len(extra), "positions": sum(h.shape[0] - s for h, s in
                                                                    zip(train.hidden, train.starts))},
              "heldout": {"prompts": len(held_idx)}, "heads": final, "untrained_heads": initial,
              "history": history, "timings": timings, "config": asdict(cfg)}
    publish_heads(save_hydra, heads, out_dir, report, half=cfg.half,
                  extra_config={"trained_with": f"spectrt distill --arch {cfg.arch}", "loss": cfg.loss})
    if final:
        log(f"held-out accuracy ({len(held_idx)} prompts, teacher forced):\n" + format_report(report))
    log(f"wrote {out_dir}")
    return report


def distill_hydra(model, tok, prompts: list[str], out_dir, cfg: HydraDistillConfig, model_name: str = "",
                  progress: bool = True, log=print) -> dict:
    """Greedy responses (the shared cache) -> hidden states (cached) -> trained Hydra heads in ``out_dir``."""
    d = training_data(model, tok, prompts, cfg, progress, log)
    return distill_hydra_samples(model, d.samples, out_dir, cfg, model_name, progress, log, d.fingerprint,
                                 d.timings, d.kept, d.extra)
