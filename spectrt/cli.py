"""The `spectrt` command line: a thin layer over the public Python API.

Each subcommand lives in ``spectrt/commands/<name>.py`` with ``register(subparsers)``; modules import
only argparse at load time so `spectrt generate` never pulls in torch.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from spectrt.version import __version__

COMMANDS = ("export", "generate", "bench", "distill", "calibrate", "build", "check", "profile", "profiles")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spectrt", description="Speculative decoding export and edge runtime")
    parser.add_argument("--version", action="version", version=f"spectrt {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(f"spectrt.commands.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from spectrt.runtime.errors import SpectrtError

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except SpectrtError as e:
        print(f"spectrt {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"spectrt {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
