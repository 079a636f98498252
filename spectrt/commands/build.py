"""`spectrt build DIR --profile NAME`: TensorRT engines for a device (run it on the device)."""
from __future__ import annotations

import click

from spectrt.commands._common import CommaList, command, complete_profiles, flatten


@command("build", short_help="build TensorRT engines for a device profile (on the device)")
@click.argument("dir", type=click.Path(file_okay=False))
@click.option("--profile", required=True, shell_complete=complete_profiles,
              help="device profile name (spectrt devices) or YAML path")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "bf16", "int8", "fp8", "fp4"]), default=None,
              show_default="the export's dtype", help="engine precision (int8/fp8/fp4 need a graph with Q/DQ nodes)")
@click.option("--timing-cache", default=None, metavar="FILE", help="TensorRT timing cache to reuse and update")
@click.option("--graphs", type=CommaList(), multiple=True, show_default="all",
              help="only these graphs (comma-separated, or the option repeated)")
@click.option("--dry-run", is_flag=True, help="only print the plan and trtexec commands (no TensorRT)")
@click.option("--ignore-memory", is_flag=True,
              help="build even when the memory estimate exceeds the profile's budget (refused otherwise)")
def command(dir, profile, precision, timing_cache, graphs, dry_run, ignore_memory) -> int:
    """Build one TensorRT engine per graph of the export DIR into DIR/engines/<graph>.<profile>.engine and
    record the build in DIR/manifest.json. Prints the equivalent trtexec command lines."""
    from spectrt.profiles.build import build_engines

    build_engines(dir, profile, precision=precision, timing_cache=timing_cache, graphs=flatten(graphs),
                  dry_run=dry_run, ignore_memory=ignore_memory)
    return 0
