"""`spectrt calibrate vocab -m MODEL -o VOCAB.json [--size N | --coverage C]`, `spectrt calibrate tree DIR
[--timings PROFILE.json | --profile P]`, `spectrt calibrate corpus -m MODEL -o TABLE.npz` and `spectrt calibrate
prompts -m MODEL -o PROMPTS.jsonl`: calibration for draft-side options."""
from __future__ import annotations

from pathlib import Path

import click

from spectrt.calibration.acceptance import DEFAULT_MAX_NEW_TOKENS
from spectrt.calibration.generations import DEFAULT_ANSWER_TOKENS, DEFAULT_GEN_BATCH
from spectrt.calibration.self_prompts import SelfPromptConfig
from spectrt.calibration.trees import DEFAULT_PROMPT_LIMIT, DEFAULT_TREE_DRAFT
from spectrt.calibration.vocab import DEFAULT_COVERAGE
from spectrt.runtime.artifact import CALIBRATED_DRAFTS
from spectrt.runtime.corpus import DEFAULT_MIN_TOTAL, DEFAULT_ORDERS
from spectrt.commands._common import FloatRange, IntRange, SpectrtGroup, complete_profiles, write_json
from spectrt.commands._common import command as spectrt_command


@click.group("calibrate", cls=SpectrtGroup, short_help="calibration for draft-side optimizations")
def command() -> None:
    """Calibration for draft-side optimizations."""


def answer_options(output_help: tuple[str, str]):
    """The options of a calibration that generates the model's greedy answers (cached, shared with distill)."""
    metavar, help_ = output_help
    options = [
        click.option("-m", "--model", default="smollm2-135m", help="HF model directory, .gguf file or built-in name"),
        click.option("--prompts", default=None, metavar="FILE", show_default="the bundled calibration set",
                     help="JSONL with 'prompt' or 'turns' (never benchmark text)"),
        click.option("--limit", type=IntRange(min=1), default=None, metavar="N", show_default="all",
                     help="use the first N prompts"),
        click.option("--exclude", multiple=True, metavar="FILE", show_default="none",
                     help="leave out the prompts of this JSONL file (repeatable), e.g. the calibration prompts "
                          "`calibrate tree` measures on"),
        click.option("-o", "--output", required=True, metavar=metavar, help=help_),
        click.option("--max-new-tokens", type=IntRange(min=1), default=DEFAULT_ANSWER_TOKENS,
                     help="greedy answer length per prompt"),
        click.option("--batch-size", type=IntRange(min=1), default=DEFAULT_GEN_BATCH, help="prompts per generation batch"),
        click.option("--cache", default=None, metavar="FILE", show_default="shared with distill",
                     help="generation cache file"),
    ]

    def apply(f):
        for option in reversed(options):
            f = option(f)
        return f
    return apply


@spectrt_command("vocab", short_help="VocabTrim: rank the tokens the target model generates")
@answer_options(("VOCAB.json", "where the ranking goes"))
@click.option("--size", type=IntRange(min=1), default=None, metavar="N", help="keep the N most generated tokens")
@click.option("--coverage", type=FloatRange(0, 1, min_open=True), default=None, metavar="C",
              show_default=f"{DEFAULT_COVERAGE} unless --size",
              help="smallest N covering this share of generated tokens")
@click.pass_context
def vocab(ctx, model, prompts, limit, exclude, output, size, coverage, max_new_tokens, batch_size, cache) -> int:
    """VocabTrim: generate greedy responses with MODEL, rank the tokens it generates, and keep the top N
    (--size N, or the smallest N reaching --coverage C) in VOCAB.json for `spectrt export --vocab`."""
    if size is not None and coverage is not None:
        raise click.UsageError("--size and --coverage are mutually exclusive", ctx)
    from spectrt.calibration.prompts import CALIBRATION_PROMPTS, select_prompts
    from spectrt.calibration.vocab import calibrate_vocab
    from spectrt.export.sources import load_hf

    prompts_path = prompts or CALIBRATION_PROMPTS
    texts, excluded = select_prompts(prompts_path, limit, exclude)
    if excluded:
        print(excluded, flush=True)
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


@spectrt_command("tree", short_help="fit the draft tree's node budget to a device")
@click.argument("dir", type=click.Path(file_okay=False))
@click.option("--timings", default=None, metavar="PROFILE.json",
              help="costs measured on the device: `spectrt profile DIR --json PROFILE.json` (there: --backend trt)")
@click.option("--profile", default=None, shell_complete=complete_profiles,
              help="costs from this device profile's roofline (bandwidth, fp16 peak): an estimate from the host")
@click.option("--prompts", default=None, metavar="FILE", show_default="the bundled calibration set (not Spec-Bench)",
              help="JSONL with 'prompt' or 'turns'")
@click.option("--limit", type=IntRange(min=1), default=DEFAULT_PROMPT_LIMIT, metavar="N", help="use the first N prompts")
@click.option("-n", "--max-new-tokens", type=IntRange(min=1), default=DEFAULT_MAX_NEW_TOKENS, metavar="N",
              help="greedy continuation per prompt")
@click.option("--draft", type=click.Choice(CALIBRATED_DRAFTS), default=DEFAULT_TREE_DRAFT,
              help="the drafts the tree serves: the heads alone, or merged with the lookup chain")
@click.option("--max-nodes", type=IntRange(min=2), default=None, metavar="N", show_default="the costs' largest verify",
              help="try budgets up to N nodes")
@click.option("--threads", type=IntRange(min=1), default=None, help="ONNX Runtime intra-op threads")
@click.option("--dry-run", is_flag=True, help="print the table, write nothing")
@click.option("--json", "json_out", default=None, metavar="OUT", help="write the table and the choice as JSON")
def tree(dir, timings, profile, prompts, limit, max_new_tokens, draft, max_nodes, threads, dry_run, json_out) -> int:
    """Choose the draft tree's node budget N (and its static tree) for the export DIR that maximises expected
    tokens/s = tau(N) / (verify cost(N) + draft cost(N)): tau replayed from the heads' acceptance, measured
    with DIR's own graphs on calibration prompts, the costs from --timings (measured on the device), from
    --profile (a roofline estimate on the host), or else timed here. Writes the tree and N into DIR's manifest,
    which `generate` uses by default."""
    if timings and profile:
        raise click.UsageError("--timings and --profile are two sources of the same costs; pass one")
    from tqdm import tqdm

    from spectrt.calibration.prompts import CALIBRATION_PROMPTS, load_prompts
    from spectrt.calibration.trees import calibrate_tree, format_accuracy, format_choice

    path = prompts or CALIBRATION_PROMPTS
    texts = load_prompts(path, limit)
    choice, acc, cost = calibrate_tree(dir, texts, f"{len(texts)} prompts of {path}", timings, profile,
                                       draft, max_new_tokens, max_nodes, threads, write=not dry_run,
                                       progress=lambda it: tqdm(it, desc="acceptance", unit="prompt"))
    print(format_accuracy(acc, choice.accuracy))
    print(f"\ncosts: {cost.kind} ({cost.source}); drafts: {draft}; AR step {choice.ar_ms:.3f} ms")
    print(format_choice(choice, draft))
    best = choice.best
    where = "not written (--dry-run)" if dry_run else f"written to {dir}/manifest.json"
    print(f"\nchose {best.nodes} nodes: expected tau {best.tau:.2f}, {best.speedup:.2f}x AR; {where}")
    if json_out:
        print(f"wrote {write_json(choice.to_json(), json_out)}")
    return 0


command.add_command(tree)


@spectrt_command("corpus", short_help="n-gram table of the model's own answers, for corpus drafting")
@answer_options(("TABLE.npz", "where the table goes"))
@click.option("--orders", type=IntRange(min=1), default=DEFAULT_ORDERS, metavar="N",
              help="longest context n-gram (capped by what 64-bit keys hold for the vocabulary)")
@click.option("--min-total", type=IntRange(min=1), default=DEFAULT_MIN_TOTAL, metavar="N",
              help="keep n-grams seen at least N times")
@click.option("--threads", type=IntRange(min=1), default=None, help="torch CPU threads for generation")
def corpus(model, prompts, limit, exclude, output, orders, min_total, max_new_tokens, batch_size, cache,
           threads) -> int:
    """Corpus drafting: generate greedy answers with MODEL (cached, shared with distill and vocab), count
    every n-gram -> next token and write TABLE.npz for `spectrt export --corpus` (drafts that continue the
    model's habitual phrasing; no model call at draft time)."""
    import torch

    from spectrt.calibration.corpus import calibrate_corpus
    from spectrt.calibration.prompts import CALIBRATION_PROMPTS, select_prompts
    from spectrt.export.sources import load_hf

    prompts_path = prompts or CALIBRATION_PROMPTS
    texts, excluded = select_prompts(prompts_path, limit, exclude)  # fail fast, before loading the model
    if excluded:
        print(excluded, flush=True)
    if threads:
        torch.set_num_threads(threads)
    hf_model, tok = load_hf(model)
    name = Path(str(prompts_path)).name
    table = calibrate_corpus(hf_model, tok, texts, output, orders, min_total, max_new_tokens, cache, batch_size,
                             source=f"{model} greedy answers (<= {max_new_tokens} tokens) to {len(texts)} prompts of {name}")
    print(f"{table.entries} n-grams (orders 1..{table.orders}, seen >= {min_total} times) from {table.tokens} "
          f"answer tokens -> {output}")
    return 0


command.add_command(corpus)


_SP = SelfPromptConfig()  # every default lives in SelfPromptConfig


@spectrt_command("prompts", short_help="prompts written by the model itself (Magpie), for distillation")
@click.option("-m", "--model", default="smollm2-135m", help="HF model directory, .gguf file or built-in name (a chat model)")
@click.option("-o", "--output", required=True, metavar="PROMPTS.jsonl", help="where the prompts go (JSONL, 'prompt')")
@click.option("-n", "--count", type=IntRange(min=1), default=_SP.count, metavar="N", help="distinct prompts to keep")
@click.option("--seed", type=int, default=_SP.seed, help="random seed (batch b samples with seed + b)")
@click.option("--temperature", type=FloatRange(min=0, min_open=True), default=_SP.temperature,
              help="sampling temperature (no top-p / top-k: diversity is the point)")
@click.option("--max-new-tokens", type=IntRange(min=1), default=_SP.max_new_tokens,
              help="a request not finished within this many tokens is dropped")
@click.option("--min-chars", type=IntRange(min=0), default=_SP.min_chars, help="drop shorter requests")
@click.option("--batch-size", type=IntRange(min=1), default=_SP.batch_size, help="requests sampled per batch")
@click.option("--exclude", multiple=True, metavar="FILE", show_default="none",
              help="never keep a prompt of this JSONL file (repeatable), e.g. the calibration prompts")
@click.option("--threads", type=IntRange(min=1), default=None, help="torch CPU threads")
@click.option("-q", "--quiet", is_flag=True, help="no progress bar")
def prompts(model, output, count, seed, temperature, max_new_tokens, min_chars, batch_size, exclude, threads,
            quiet) -> int:
    """Sample N user requests from MODEL itself: its chat template up to the start of a user turn, continued
    by sampling (Magpie). An instruction-tuned model writes requests like those it was tuned on, so the base's
    answers to them train draft heads for what its users ask, with no outside text. Pass the file to
    `spectrt distill --prompts` beside your own prompts."""
    import torch

    from spectrt.calibration.prompts import load_prompts
    from spectrt.calibration.self_prompts import check_output, self_prompts, write_prompts
    from spectrt.export.sources import load_hf

    cfg = SelfPromptConfig(count=count, seed=seed, temperature=temperature, max_new_tokens=max_new_tokens,
                           min_chars=min_chars, batch_size=batch_size)
    cfg.validate()
    excluded = [p for path in exclude for p in load_prompts(path)]  # fail fast, before loading the model
    check_output(output)
    if threads:
        torch.set_num_threads(threads)
    hf_model, tok = load_hf(model)
    texts = self_prompts(hf_model, tok, cfg, exclude=excluded, progress=not quiet)
    write_prompts(output, texts)
    print(f"{len(texts)} prompts written by {model} itself (seed {seed}, temperature {temperature}) -> {output}")
    return 0


command.add_command(prompts)
