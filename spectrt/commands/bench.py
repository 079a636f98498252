"""`spectrt bench DIR [DIR ...]`: AR vs speculative decoding (and optionally transformers) on a prompt set."""
from __future__ import annotations

import click

from spectrt.commands._common import (IntRange, backend_options, command, profile_name, sampling_config,
                                     sampling_options, write_json)
from spectrt.runtime.drafters import DRAFT_SOURCES
from spectrt.runtime.tree import TREE_DYNAMIC


class VocabSizes(click.ParamType):
    """``1000,4000,full`` -> [1000, 4000, "full"] ("full" = the untrimmed vocabulary)."""

    name = "N,N,..."

    def convert(self, value, param, ctx):
        if isinstance(value, list):
            return value
        sizes = []
        for s in str(value).split(","):
            s = s.strip()
            if s == "full":
                sizes.append(s)
            elif s.isdigit() and int(s) >= 1:
                sizes.append(int(s))
            else:
                self.fail(f"takes sizes like 1000,4000,full, not '{value}'", param, ctx)
        return sizes


class DraftSources(click.ParamType):
    """``heads,lookup`` -> ["heads", "lookup"] (each one of DRAFT_SOURCES, no repeats)."""

    name = "D,D,..."

    def convert(self, value, param, ctx):
        if isinstance(value, list):
            return value
        drafts = [s.strip() for s in str(value).split(",")]
        bad = [d for d in drafts if d not in DRAFT_SOURCES]
        if bad or len(set(drafts)) != len(drafts):
            self.fail(f"takes distinct draft sources from {', '.join(DRAFT_SOURCES)} (comma-separated), "
                      f"not '{value}'", param, ctx)
        return drafts


def _export_facts(path: str) -> tuple[str, int]:
    """(the source model for transformers, the vocabulary size) of an export: this command's only manifest read."""
    from spectrt.runtime.artifact import load_artifact

    model = load_artifact(path).model
    return model.builtin or model.source, model.vocab


@command("bench", short_help="AR vs speculative decoding (and optionally transformers) on a prompt set")
@click.argument("artifact", metavar="DIR...", nargs=-1, required=True, type=click.Path(file_okay=False))
@click.option("--prompts", default=None, metavar="FILE", show_default="bundled 39-question Spec-Bench subset",
              help="JSONL with 'prompt' or Spec-Bench 'turns'")
@click.option("--stride", type=IntRange(min=1), default=1, metavar="K",
              help="every K-th prompt (a spread over all categories)")
@click.option("--limit", type=IntRange(min=1), default=None, metavar="N", show_default="all",
              help="at most N prompts (after --stride)")
@click.option("-n", "--max-new-tokens", type=IntRange(min=1), default=128, metavar="N",
              help="new tokens per prompt at most")
@click.option("--tree", default=None, metavar="JSON|dynamic", show_default="the export's",
              help=f"tree JSON, or '{TREE_DYNAMIC}' (grown each step under --tree-nodes)")
@click.option("--tree-nodes", type=IntRange(min=1), default=None, metavar="N", show_default="the export's node budget",
              help=f"node budget (root included) of --tree {TREE_DYNAMIC}")
@click.option("--draft", "drafts", type=DraftSources(), default=None,
              show_default="all the export has (heads, lookup, corpus) with draft heads, else none (AR only)",
              help=f"draft sources to compare, comma-separated ({', '.join(DRAFT_SOURCES)}): one row each, "
                   "on the same prompts and base")
@click.option("--transformers", is_flag=True,
              help="also time transformers' greedy generate on the source model (needs the export extra)")
@backend_options("ONNX Runtime intra-op threads (and transformers' torch threads)")
@sampling_options
@click.option("--json", "json_out", default=None, metavar="OUT", help="write the figures as JSON")
@click.option("--vocab-sweep", type=VocabSizes(), default=None,
              help="VocabTrim sweep: benchmark the draft LM head trimmed to each N ('full' = untrimmed)")
@click.option("--vocab", default=None, metavar="VOCAB.json",
              help="ranked vocab file for --vocab-sweep (spectrt calibrate vocab)")
@click.option("--sweep-dir", default=None, show_default="DIR.vocab-sweep", help="where the sweep's variant exports go")
@click.option("--plot", default=None, metavar="PNG", help="coverage and tau vs N plot of the sweep")
@click.pass_context
def command(ctx, artifact, prompts, stride, limit, max_new_tokens, tree, tree_nodes, drafts, transformers, backend, profile,
            provider, threads, verify, temperature, top_k, top_p, seed, typical, json_out, vocab_sweep, vocab, sweep_dir,
            plot) -> int:
    """Benchmark autoregressive decoding (on the first DIR) against speculative decoding with each DIR that
    has draft heads (or with --draft lookup), on the same prompts in one process, and check the outputs are
    identical.

    Exit status 1 when a speculative output differs from the autoregressive one."""
    if vocab_sweep and not vocab:
        raise click.UsageError("--vocab-sweep needs --vocab VOCAB.json (ranked ids from `spectrt calibrate vocab`)",
                               ctx)
    if vocab_sweep and len(artifact) != 1:
        raise click.UsageError("--vocab-sweep takes one export", ctx)
    sampling = sampling_config(temperature, top_k, top_p, seed, typical)
    if (transformers or vocab_sweep) and not sampling.greedy:
        raise click.UsageError(f"{'--transformers' if transformers else '--vocab-sweep'} compares greedy decoding; "
                               "drop --temperature", ctx)
    from tqdm import tqdm

    from spectrt.calibration.prompts import DEFAULT_PROMPTS, load_prompt_records
    from spectrt.runtime.bench import format_report, run_bench
    from spectrt.runtime.session import SessionConfig

    records = load_prompt_records(prompts or DEFAULT_PROMPTS)[::stride][:limit]
    if vocab_sweep:
        return _sweep(artifact[0], records, vocab_sweep, vocab, sweep_dir, max_new_tokens, provider, threads, tree,
                      tree_nodes, json_out, plot, drafts[0] if drafts else "heads")
    hf = None
    if transformers:
        from spectrt.export.reference import HFGreedy

        hf = HFGreedy(_export_facts(artifact[0])[0], threads)
    config = SessionConfig(backend=backend, profile=profile_name(profile), provider=provider, threads=threads,
                           tree=tree, tree_nodes=tree_nodes, draft=drafts[0] if drafts else None, verify=verify,
                           sampling=sampling)
    report = run_bench(list(artifact), records, max_new_tokens, config, hf,
                       progress=lambda r: tqdm(r, desc="bench", unit="prompt"), drafts=drafts)
    print(format_report(report))
    if json_out:
        write_json(report.to_json(), json_out)
    return 1 if report.mismatches and not sampling.typical else 0  # typical acceptance is lossy by design


def _sweep(artifact, records, sizes, vocab, sweep_dir, max_new_tokens, provider, threads, tree, tree_nodes, json_out,
           plot, draft) -> int:
    from spectrt.calibration.vocab_sweep import format_rows, plot as plot_rows, sweep
    from spectrt.runtime.session import SessionConfig

    if "full" in sizes:
        full = _export_facts(artifact)[1]
        sizes = [full if s == "full" else s for s in sizes]
    config = SessionConfig(provider=provider, threads=threads, tree=tree, tree_nodes=tree_nodes, draft=draft)
    rows = sweep(artifact, vocab, sizes, records, max_new_tokens, sweep_dir or f"{artifact.rstrip('/')}.vocab-sweep",
                 config)
    print(format_rows(rows))
    if json_out:
        write_json(rows, json_out)
    if plot:
        plot_rows(rows, plot)
    return 1 if any(r["mismatches"] for r in rows) else 0
