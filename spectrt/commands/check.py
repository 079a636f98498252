"""`spectrt check DIR`: will TensorRT 10.x parse these graphs? (CPU only, no TensorRT needed)."""
from __future__ import annotations

import click

from spectrt.commands._common import command, complete_profiles, write_json


@command("check", short_help="check an export against TensorRT 10.x's ONNX parser (CPU)")
@click.argument("dir", type=click.Path(file_okay=False))
@click.option("--profile", default=None, shell_complete=complete_profiles,
              help="device profile whose TensorRT version to target (name or YAML); not with --trt-version")
@click.option("--trt-version", default=None, show_default="the oldest among the built-in profiles, JetPack 6's",
              help="TensorRT version to target")
@click.option("--json", "json_out", default=None, metavar="OUT", help="also write the report as JSON")
@click.option("-v", "--verbose", is_flag=True, help="show informational notes too")
@click.pass_context
def command(ctx, dir, profile, trt_version, json_out, verbose) -> int:
    """Check every graph of the export DIR against the TensorRT 10.x ONNX operator table (ops, types, opset,
    custom domains, TopK K, constant inputs) and the I/O contract.

    Exit status 1 when something blocks a build."""
    if profile is not None and trt_version is not None:
        raise click.UsageError("--profile and --trt-version are mutually exclusive", ctx)
    from spectrt.profiles.check import check_artifact

    report = check_artifact(dir, profile=profile, trt_version=trt_version)
    print(report.format(verbose=verbose))
    if json_out:
        write_json(report.to_dict(), json_out)
    return 0 if report.ok else 1
