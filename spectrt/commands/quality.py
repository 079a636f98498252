"""`spectrt quality DIR [DIR ...] --reference REF`: perplexity on held-out text and greedy agreement."""
from __future__ import annotations

import click

from spectrt.commands._common import IntRange, command


@command("quality", short_help="perplexity on held-out text and greedy agreement with a reference export")
@click.argument("dirs", nargs=-1, required=True, metavar="DIR...", type=click.Path(file_okay=False))
@click.option("--reference", default=None, metavar="REF", type=click.Path(file_okay=False),
              help="reference export (e.g. the fp32 one): adds top-1 and greedy agreement with it")
@click.option("--text", default=None, metavar="FILE", show_default="fixed sections of Python's pydoc topics",
              help="held-out text for perplexity")
@click.option("--tokens", type=IntRange(min=2), default=2048, help="tokens of held-out text scored")
@click.option("--window", type=IntRange(min=2), default=256,
              help="tokens per scored window (each window starts from an empty KV cache)")
@click.option("-n", "--new-tokens", type=IntRange(min=1), default=32, help="greedy tokens per prompt for agreement")
@click.option("--threads", type=IntRange(min=1), default=None, show_default="all cores",
              help="ONNX Runtime intra-op threads")
@click.option("--json", "json_out", default=None, metavar="OUT", help="also write the report as JSON")
def command(dirs, reference, text, tokens, window, new_tokens, threads, json_out) -> int:
    """Perplexity of each export DIR on held-out text (the same tokens for all) and, with --reference, the
    share of positions whose top-1 token matches the reference's and greedy agreement on fixed prompts."""
    from spectrt.runtime.quality import evaluate, write_report

    report = evaluate(list(dirs), reference, text, tokens, window, new_tokens, threads,
                      progress=lambda m: click.echo(m, err=True))
    print(report.format())
    if json_out:
        write_report(report, json_out)
    return 0
