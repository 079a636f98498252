"""spectrt calibrate vocab -m MODEL [--prompts FILE] -o VOCAB.json [--size N | --coverage C]"""
from __future__ import annotations

import argparse


def register(sub) -> None:
    from spectrt.calibration.vocab import DEFAULT_CALIBRATION_TOKENS

    p = sub.add_parser("calibrate", help="calibration for draft-side optimizations")
    what = p.add_subparsers(dest="what", metavar="WHAT", required=True)
    v = what.add_parser("vocab", help="VocabTrim: rank the tokens the target model generates",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    v.add_argument("-m", "--model", default="smollm2-135m")
    v.add_argument("--prompts", default=None, help="JSONL with 'prompt' or 'turns' (default: the bundled set)")
    v.add_argument("--limit", type=int, default=None)
    v.add_argument("-o", "--output", required=True, help="VOCAB.json")
    g = v.add_mutually_exclusive_group()
    g.add_argument("--size", type=int, default=None, help="keep the N most generated tokens")
    g.add_argument("--coverage", type=float, default=None, help="smallest N covering this share of generated tokens (the default, 0.95, when neither is given)")
    v.add_argument("--max-new-tokens", type=int, default=DEFAULT_CALIBRATION_TOKENS)
    v.add_argument("--batch-size", type=int, default=16)
    v.add_argument("--cache", default=None, help="generation cache file (default: shared with distill)")
    v.set_defaults(func=run)


def run(args) -> int:
    from spectrt.calibration.prompts import DEFAULT_PROMPTS, load_prompts
    from spectrt.calibration.vocab import DEFAULT_COVERAGE, calibrate_vocab
    from spectrt.export.sources import load_hf

    prompts_path = args.prompts or DEFAULT_PROMPTS
    prompts = load_prompts(prompts_path, args.limit)
    model, tok = load_hf(args.model)
    coverage = DEFAULT_COVERAGE if args.size is None and args.coverage is None else args.coverage
    summary = calibrate_vocab(model, tok, prompts, args.output, size=args.size, coverage=coverage,
                              max_new_tokens=args.max_new_tokens, cache_path=args.cache, batch_size=args.batch_size,
                              source=f"{args.model} greedy on {len(prompts)} prompts of {prompts_path}")
    print(f"kept {summary['size']} of {model.config.vocab_size} tokens: coverage {summary['coverage']:.4f} of "
          f"{summary['generated_tokens']} generated tokens ({summary['distinct_generated']} distinct) -> {args.output}")
    return 0
