"""`spectrt check DIR`: will TensorRT 10.x parse these graphs? (CPU only, no TensorRT needed)."""
from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser("check", help="check an export against TensorRT 10.x's ONNX parser (CPU)",
                              description="Check every graph of an exported DIR against the TensorRT 10.x ONNX "
                                          "operator table (ops, types, opset, custom domains, TopK K, constant "
                                          "inputs) and the I/O contract. Exit status 1 when something blocks a build.")
    p.add_argument("dir", help="export directory (with manifest.json)")
    target = p.add_mutually_exclusive_group()
    target.add_argument("--profile", help="device profile whose TensorRT version to target (name or YAML)")
    target.add_argument("--trt-version", help="TensorRT version to target (default: the oldest among the "
                                              "built-in profiles, JetPack 6's)")
    p.add_argument("--json", metavar="OUT", help="also write the report as JSON")
    p.add_argument("-v", "--verbose", action="store_true", help="show informational notes too")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from spectrt.profiles.check import check_artifact

    report = check_artifact(args.dir, profile=args.profile, trt_version=args.trt_version)
    print(report.format(verbose=args.verbose))
    if args.json:
        Path(args.json).write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    return 0 if report.ok else 1
