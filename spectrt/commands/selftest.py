"""`spectrt selftest DIR`: the first thing to run on a device (golden tokens, speculative == AR, timing)."""
from __future__ import annotations

import click

from spectrt.commands._common import command, complete_profiles, to_json
from spectrt.runtime.ort_runner import DEFAULT_PROVIDER, PROVIDERS
from spectrt.runtime.session import BACKENDS


@command("selftest", short_help="device acceptance: golden tokens, speculative == AR, AR vs speculative speed")
@click.argument("dir", type=click.Path(file_okay=False))
@click.option("--backend", "backends", type=click.Choice(sorted(BACKENDS)), multiple=True,
              show_default="ort, and trt when TensorRT >= 10 imports", help="backend to test (repeatable)")
@click.option("--profile", default=None, shell_complete=complete_profiles,
              help="device profile of the TensorRT engines (built first if missing)")
@click.option("--provider", type=click.Choice(sorted(PROVIDERS)), default=DEFAULT_PROVIDER,
              help="ONNX Runtime execution provider")
@click.option("-q", "--quiet", is_flag=True, help="no progress lines (the JSON report and verdict only)")
def command(dir, backends, profile, provider, quiet) -> int:
    """Check the export DIR on this machine: every file's sha256, the tokenizer, then per backend greedy
    decoding of the export's golden prompts, autoregressive and speculative. Fails when speculative output
    differs from autoregressive, or a backend diverges from the golden tokens where the reference's
    top-1/top-2 logit margin is clear (near-ties are reported, not failed). Prints one JSON report, then a
    PASS/FAIL line; exit status 1 on FAIL."""
    import sys

    from spectrt.profiles.selftest import selftest

    say = (lambda *_: None) if quiet else (lambda line: print(line, file=sys.stderr, flush=True))
    report = selftest(dir, tuple(backends) or None, profile=profile, provider=provider, progress=say)
    print(to_json(report.to_json(), indent=2))
    print(report.verdict())
    return 0 if report.passed else 1
