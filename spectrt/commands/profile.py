"""`spectrt profile DIR`: per-graph latency at the contract's shapes, and the verify-cost curve (Polygraphy)."""
from __future__ import annotations

import click

from spectrt.commands._common import CommaList, IntRange, command, complete_profiles, flatten, write_json


@command("profile", short_help="time each graph (prefill, verify q=1..64, heads) with Polygraphy")
@click.argument("dir", type=click.Path(file_okay=False))
@click.option("--backend", type=click.Choice(["ort", "trt"]), default="ort", help="ONNX Runtime or TensorRT engines")
@click.option("--profile", default=None, shell_complete=complete_profiles,
              help="device profile: bounds the shapes (and picks the engines for --backend trt)")
@click.option("--iterations", type=IntRange(min=1), default=20, metavar="N", help="timed runs per shape")
@click.option("--warmup", type=IntRange(min=0), default=3, metavar="N", help="untimed runs per shape")
@click.option("--graphs", type=CommaList(), multiple=True, show_default="all",
              help="only these graphs (comma-separated, or the option repeated)")
@click.option("--json", "json_out", default=None, metavar="OUT",
              help="write all timings and the verify-cost curve as JSON")
@click.option("--plot", default=None, metavar="PNG", help="plot the verify-cost curve (latency vs q)")
def command(dir, backend, profile, iterations, warmup, graphs, json_out, plot) -> int:
    """Time every graph of the export DIR with Polygraphy runners at the I/O contract's shapes: prefill
    chunks, verify with q = 1, 2, 4, ... 64 at a few past lengths, heads/draft_lm_head at a few batch sizes.
    (`spectrt devices` lists the device profiles.)"""
    from spectrt.profiles.timing import format_table, plot_verify_curve, profile_artifact

    result = profile_artifact(dir, backend=backend, iterations=iterations, warmup=warmup, profile=profile,
                              graphs=flatten(graphs))
    print(format_table(result))
    print("\nequivalent Polygraphy commands (random data, same shapes):")
    for c in result["commands"]:
        print("  " + c)
    if json_out:
        print(f"wrote {write_json(result, json_out)}")
    if plot:
        print(f"wrote {plot_verify_curve(result, plot)}")
    return 0
