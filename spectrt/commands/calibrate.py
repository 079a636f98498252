"""`spectrt calibrate vocab -m MODEL -o VOCAB.json [--size N | --coverage C]`: calibration for draft-side options."""
from __future__ import annotations

import click

from spectrt.calibration.vocab import DEFAULT_CALIBRATION_TOKENS, DEFAULT_COVERAGE
from spectrt.commands._common import FloatRange, IntRange, SpectrtGroup
from spectrt.commands._common import command as spectrt_command


@click.group("calibrate", cls=SpectrtGroup, short_help="calibration for draft-side optimizations")
def command() -> None:
    """Calibration for draft-side optimizations."""


@spectrt_command("vocab", short_help="VocabTrim: rank the tokens the target model generates")
@click.option("-m", "--model", default="smollm2-135m", help="HF model directory, .gguf file or built-in name")
@click.option("--prompts", default=None, metavar="FILE", show_default="the bundled set",
              help="JSONL with 'prompt' or 'turns'")
@click.option("--limit", type=IntRange(min=1), default=None, metavar="N", show_default="all",
              help="use the first N prompts")
@click.option("-o", "--output", required=True, metavar="VOCAB.json", help="where the ranking goes")
@click.option("--size", type=IntRange(min=1), default=None, metavar="N", help="keep the N most generated tokens")
@click.option("--coverage", type=FloatRange(0, 1, min_open=True), default=None, metavar="C",
              show_default=f"{DEFAULT_COVERAGE} unless --size",
              help="smallest N covering this share of generated tokens")
@click.option("--max-new-tokens", type=IntRange(min=1), default=DEFAULT_CALIBRATION_TOKENS,
              help="greedy response length per prompt")
@click.option("--batch-size", type=IntRange(min=1), default=16, help="prompts per generation batch")
@click.option("--cache", default=None, metavar="FILE", show_default="shared with distill", help="generation cache file")
@click.pass_context
def vocab(ctx, model, prompts, limit, output, size, coverage, max_new_tokens, batch_size, cache) -> int:
    """VocabTrim: generate greedy responses with MODEL, rank the tokens it generates, and keep the top N
    (--size N, or the smallest N reaching --coverage C) in VOCAB.json for `spectrt export --vocab`."""
    if size is not None and coverage is not None:
        raise click.UsageError("--size and --coverage are mutually exclusive", ctx)
    from spectrt.calibration.prompts import DEFAULT_PROMPTS, load_prompts
    from spectrt.calibration.vocab import calibrate_vocab
    from spectrt.export.sources import load_hf

    prompts_path = prompts or DEFAULT_PROMPTS
    texts = load_prompts(prompts_path, limit)
    hf_model, tok = load_hf(model)
    if size is None and coverage is None:
        coverage = DEFAULT_COVERAGE
    summary = calibrate_vocab(hf_model, tok, texts, output, size=size, coverage=coverage,
                              max_new_tokens=max_new_tokens, cache_path=cache, batch_size=batch_size,
                              source=f"{model} greedy on {len(texts)} prompts of {prompts_path}")
    print(f"kept {summary['size']} of {hf_model.config.vocab_size} tokens: coverage {summary['coverage']:.4f} of "
          f"{summary['generated_tokens']} generated tokens ({summary['distinct_generated']} distinct) -> {output}")
    return 0


command.add_command(vocab)
