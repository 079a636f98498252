"""`spectrt distill`: self-distill draft heads (Medusa) on the base model's own greedy responses."""
from __future__ import annotations

import argparse

HELP = "train draft heads by self-distillation on the base model's own responses"


def register(subparsers) -> None:
    from spectrt.calibration.distill import DistillConfig  # no torch at import time

    d = DistillConfig()
    p = subparsers.add_parser("distill", help=HELP, description=HELP + ".")
    # every default lives in DistillConfig: options left at None keep it (the [..] in the help shows it)
    p.add_argument("-m", "--model", required=True, help="built-in name, HF directory or .gguf file")
    p.add_argument("--prompts", required=True, help="JSONL with a 'prompt' or Spec-Bench 'turns' field per line")
    p.add_argument("-o", "--output", required=True, help="output heads directory")
    p.add_argument("--arch", default=None, choices=["medusa", "hydra", "hydra++"],
                   help=f"draft architecture: medusa, hydra (sequential heads) or hydra++ (+ prefix attention "
                        f"layer, teacher loss) [{d.arch}]")
    p.add_argument("--dropout", type=float, default=None, help="hydra heads' dropout [hydra 0, hydra++ 0.1]")
    p.add_argument("--heads", type=int, default=None, help=f"number of heads K [{d.heads}]")
    p.add_argument("--layers", type=int, default=None, help=f"ResBlocks per head [{d.layers}; hydra: 2]")
    p.add_argument("--version", choices=["1", "2"], default=None,
                   help=f"1: each head owns an LM head; 2: heads share the base LM head [{d.version}]")
    p.add_argument("--limit", type=int, default=None, help="use the first N prompts [all]")
    p.add_argument("--max-new-tokens", type=int, default=None, help=f"greedy response length cap [{d.max_new_tokens}]")
    p.add_argument("--epochs", type=int, default=None, help=f"training epochs [{d.epochs}]")
    p.add_argument("--lr", type=float, default=None, help=f"AdamW peak learning rate, cosine schedule [{d.lr:g}]")
    p.add_argument("--batch-size", type=int, default=None, help=f"token positions per optimizer step [{d.batch_size}]")
    p.add_argument("--gen-batch-size", type=int, default=None, help=f"prompts per generation batch [{d.gen_batch_size}]")
    p.add_argument("--seed", type=int, default=None, help=f"random seed [{d.seed}]")
    p.add_argument("--loss", choices=["lm", "teacher"], default=None,
                   help="lm: cross-entropy on the base's greedy tokens; teacher: KL to the base's "
                        f"next-token distribution [{d.loss}; hydra++: teacher]")
    p.add_argument("--holdout", type=float, default=None, help=f"fraction of prompts held out for the accuracy report [{d.holdout}]")
    p.add_argument("--cache", default=None, help="cache directory for generations and hidden states "
                                                 "[$SPECTRT_CACHE/calibration]")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads; 1 is much faster than 2 on a busy machine [torch default]")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="run the frozen LM-head matmuls of training in bfloat16 (~4x faster matmuls on CPUs "
                        "with AMX) [on when the CPU has native bf16]")
    p.add_argument("--fp32", action="store_true", help="save fp32 heads (default fp16)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def config_from_args(args):
    from spectrt.calibration.distill import DistillConfig

    if getattr(args, "arch", None) in ("hydra", "hydra++"):
        from spectrt.calibration.distill_hydra import HydraDistillConfig

        cfg = HydraDistillConfig(arch=args.arch)
        if getattr(args, "dropout", None) is not None:
            cfg.dropout = args.dropout
    else:
        cfg = DistillConfig()
    mapping = {"arch": "arch", "heads": "heads", "layers": "layers", "version": "version", "limit": "limit",
               "max_new_tokens": "max_new_tokens", "epochs": "epochs", "lr": "lr", "batch_size": "batch_size",
               "gen_batch_size": "gen_batch_size", "seed": "seed", "loss": "loss", "holdout": "holdout",
               "cache": "cache_dir", "threads": "threads", "bf16": "bf16"}
    for arg, attr in mapping.items():
        value = getattr(args, arg, None)
        if value is not None:
            setattr(cfg, attr, value)
    if args.fp32:
        cfg.half = False
    cfg.validate()
    return cfg


def run(args) -> int:
    from spectrt.calibration.distill import distill
    from spectrt.calibration.prompts import load_prompts
    from spectrt.export.sources import load_hf, resolve_model

    cfg = config_from_args(args)
    prompts = load_prompts(args.prompts, cfg.limit)  # fail fast, before loading the model
    if cfg.threads:
        import torch

        torch.set_num_threads(cfg.threads)
    source = resolve_model(args.model)
    model, tok = load_hf(source)
    print(f"distilling {cfg.heads} {cfg.arch} v{cfg.version} heads for {args.model} on {len(prompts)} prompts "
          f"({args.prompts})", flush=True)
    if cfg.arch in ("hydra", "hydra++"):
        from spectrt.calibration.distill_hydra import distill_hydra

        distill_hydra(model, tok, prompts, args.output, cfg, model_name=source.name, progress=not args.quiet)
    else:
        distill(model, tok, prompts, args.output, cfg, model_name=source.name, progress=not args.quiet)
    return 0
