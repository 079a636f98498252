"""`spectrt build DIR --profile NAME`: TensorRT engines for a device (run it on the device)."""
from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser("build", help="build TensorRT engines for a device profile (on the device)",
                              description="Build one TensorRT engine per graph into DIR/engines/<graph>.<profile>."
                                          "engine and record the build in DIR/manifest.json. Prints the equivalent "
                                          "trtexec command lines.")
    p.add_argument("dir", help="export directory (with manifest.json)")
    p.add_argument("--profile", required=True, help="device profile name (spectrt profiles) or YAML path")
    p.add_argument("--precision", choices=("fp32", "fp16", "bf16", "int8", "fp8", "fp4"),
                   help="engine precision (default: the profile's default_precision)")
    p.add_argument("--timing-cache", metavar="FILE", help="TensorRT timing cache to reuse and update")
    p.add_argument("--graphs", nargs="+", metavar="NAME", help="only these graphs (default: all)")
    p.add_argument("--dry-run", action="store_true", help="only print the plan and trtexec commands (no TensorRT)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from spectrt.profiles.build import build_engines

    build_engines(args.dir, args.profile, precision=args.precision, timing_cache=args.timing_cache,
                  graphs=args.graphs, dry_run=args.dry_run)
    return 0
