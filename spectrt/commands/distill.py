"""`spectrt distill`: self-distill draft heads (Medusa, Hydra) on the base model's own greedy responses."""
from __future__ import annotations

import sys

import click

from spectrt.calibration.config import DistillConfig, HydraDistillConfig
from spectrt.commands._common import FloatRange, IntRange, command

HELP = "train draft heads by self-distillation on the base model's own responses"
_D = DistillConfig()  # every default lives in DistillConfig (options left at None keep the architecture's own)


@command("distill", short_help=HELP)
@click.option("-m", "--model", required=True, help="built-in name, HF directory or .gguf file")
@click.option("--prompts", required=True, multiple=True, metavar="FILE",
              help="JSONL with a 'prompt' or Spec-Bench 'turns' field per line (repeatable: the files one after "
                   "the other, e.g. yours and `spectrt calibrate prompts`' self-written ones)")
@click.option("-o", "--output", required=True, metavar="DIR", help="output heads directory")
@click.option("--arch", type=click.Choice(["medusa", "hydra", "hydra++"]), default=_D.arch,
              help="draft architecture: medusa, hydra (sequential heads) or hydra++ (+ prefix attention layer, "
                   "teacher loss)")
@click.option("--dropout", type=FloatRange(0, 1, max_open=True), default=None, show_default="hydra 0, hydra++ 0.1",
              help="hydra heads' dropout")
@click.option("--heads", type=IntRange(min=1), default=_D.heads, metavar="K", help="number of heads K")
@click.option("--layers", type=IntRange(min=0), default=None, show_default=f"{_D.layers}; hydra: 2",
              help="ResBlocks per head")
@click.option("--lm-head", type=click.Choice(["shared", "own"]), default=None, show_default=_D.lm_head,
              help="shared: the heads reuse the base model's LM head (small file); own: each head gets its own LM "
                   "head, initialised from the base's")
@click.option("--version", type=click.Choice(["1", "2"]), default=None, hidden=True,
              help="deprecated: 1 = --lm-head own, 2 = --lm-head shared")
@click.option("--limit", type=IntRange(min=1), default=None, metavar="N", show_default="all",
              help="use the first N prompts")
@click.option("--exclude", multiple=True, metavar="FILE", show_default="none",
              help="never train on the prompts of this JSONL file (repeatable), e.g. the calibration prompts "
                   "`calibrate tree` measures on")
@click.option("--copy-tasks", type=IntRange(min=0), default=_D.copy_tasks, metavar="N",
              help="also train on N copy-style prompts (summarize / rewrite / extract / correct) built around the "
                   "base's own answers to training prompts, with the base's answers to them")
@click.option("--max-new-tokens", type=IntRange(min=1), default=_D.max_new_tokens, help="greedy response length cap")
@click.option("--epochs", type=IntRange(min=1), default=_D.epochs, help="training epochs")
@click.option("--lr", type=FloatRange(min=0, min_open=True), default=_D.lr,
              help="AdamW peak learning rate, cosine schedule")
@click.option("--batch-size", type=IntRange(min=1), default=_D.batch_size, help="token positions per optimizer step")
@click.option("--gen-batch-size", type=IntRange(min=1), default=_D.gen_batch_size, help="prompts per generation batch")
@click.option("--seed", type=int, default=_D.seed, help="random seed")
@click.option("--loss", type=click.Choice(["lm", "teacher"]), default=None, show_default=f"{_D.loss}; hydra++: teacher",
              help="lm: cross-entropy on the base's greedy tokens; teacher: KL to the base's next-token distribution")
@click.option("--holdout", type=FloatRange(0, 1, max_open=True), default=_D.holdout,
              help="fraction of prompts held out for the accuracy report")
@click.option("--cache", default=None, metavar="DIR", show_default="$SPECTRT_CACHE/calibration",
              help="cache directory for generations and hidden states")
@click.option("--threads", type=IntRange(min=1), default=None, show_default="torch's",
              help="torch CPU threads; 1 is much faster than 2 on a busy machine")
@click.option("--bf16/--no-bf16", default=None, show_default="on when the CPU has native bf16",
              help="run the frozen LM-head matmuls of training in bfloat16 (~4x faster matmuls on CPUs with AMX)")
@click.option("--train-vocab", type=IntRange(min=1), default=None, metavar="N", show_default="the full vocabulary",
              help="train on the N most frequent tokens of a VocabTrim ranking only: what an export trimmed to N "
                   "drafts from (shared LM head; a Medusa step ~20x cheaper on CPUs without bf16)")
@click.option("--vocab", default=None, metavar="FILE", show_default="the built-in model's ranking",
              help="the VocabTrim ranking for --train-vocab (`spectrt calibrate vocab`)")
@click.option("--fp32", is_flag=True, help="save the heads in fp32 instead of fp16")
@click.option("-q", "--quiet", is_flag=True, help="no progress bars")
def command(model, prompts, output, quiet, **options) -> int:
    """Train draft heads for MODEL on a frozen base by self-distillation: the base answers the PROMPTS
    greedily, the heads learn to predict its next tokens. Generations and hidden states are cached, so a
    rerun with other training options is quick."""
    from spectrt.calibration.distill import distill
    from spectrt.calibration.prompts import select_prompts
    from spectrt.export.shipped import builtin_vocab
    from spectrt.export.sources import load_hf, resolve_model
    from spectrt.runtime.errors import SpectrtError

    if options.get("version") is not None:
        print(f"note: --version {options['version']} is deprecated, use --lm-head "
              f"{'own' if options['version'] == '1' else 'shared'} ('2' never meant the paper's Medusa-2)",
              file=sys.stderr)
    cfg = config_from_options(**options)
    texts, excluded = select_prompts(prompts, cfg.limit, cfg.exclude, minimum=2)  # fail fast, before the model
    if excluded:
        print(excluded, flush=True)
    if cfg.threads:
        import torch

        torch.set_num_threads(cfg.threads)
    source = resolve_model(model)
    if cfg.train_vocab is not None and cfg.vocab is None:
        builtin = builtin_vocab(source.builtin)
        if builtin is None:
            raise SpectrtError(f"--train-vocab: {model} has no built-in VocabTrim ranking; pass --vocab FILE "
                               "(`spectrt calibrate vocab`)")
        cfg.vocab = builtin[0]
    hf_model, tok = load_hf(source)
    print(f"distilling {cfg.heads} {cfg.arch} heads ({cfg.lm_head} LM head) for {model} on {len(texts)} prompts ({', '.join(prompts)})",
          flush=True)
    if cfg.arch in ("hydra", "hydra++"):
        from spectrt.calibration.distill_hydra import distill_hydra

        distill_hydra(hf_model, tok, texts, output, cfg, model_name=source.name, progress=not quiet)
    else:
        distill(hf_model, tok, texts, output, cfg, model_name=source.name, progress=not quiet)
    return 0


def config_from_options(arch: str = _D.arch, dropout: float | None = None, fp32: bool = False, cache=None,
                        **options) -> DistillConfig:
    """The DistillConfig (HydraDistillConfig for hydra, hydra++) of the command's options; None keeps a default."""
    if arch in ("hydra", "hydra++"):
        cfg = HydraDistillConfig(arch=arch)
        if dropout is not None:
            cfg.dropout = dropout
    else:
        cfg = DistillConfig()
    if options.get("exclude") is not None:
        options["exclude"] = tuple(options["exclude"])
    for name, value in {**options, "arch": arch, "cache_dir": cache}.items():
        if not hasattr(cfg, name):
            raise TypeError(f"DistillConfig has no field '{name}'")
        if value is not None:
            setattr(cfg, name, value)
    if fp32:
        cfg.half = False
    version, lm_head = options.get("version"), options.get("lm_head")
    if version is not None and lm_head is not None and lm_head != ("own" if str(version) == "1" else "shared"):
        from spectrt.runtime.errors import SpectrtError

        raise SpectrtError(f"--version {version} (deprecated) contradicts --lm-head {lm_head}")
    cfg.validate()
    return cfg
