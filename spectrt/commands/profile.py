"""`spectrt profile DIR`: per-graph latency at the contract's shapes, and the verify-cost curve."""
from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser("profile", help="time each graph (prefill, verify q=1..64, heads) with Polygraphy",
                              description="Time every graph of an export with Polygraphy runners at the I/O "
                                          "contract's shapes: prefill chunks, verify with q = 1, 2, 4, ... 64 at a "
                                          "few past lengths, heads/draft_lm_head at a few batch sizes.")
    p.add_argument("dir", help="export directory (with manifest.json)")
    p.add_argument("--backend", choices=("ort", "trt"), default="ort", help="onnxruntime or TensorRT engines")
    p.add_argument("--profile", help="device profile: bounds the shapes (and picks the engines for --backend trt)")
    p.add_argument("--iterations", type=int, default=20, metavar="N", help="timed runs per shape (default 20)")
    p.add_argument("--warmup", type=int, default=3, metavar="N", help="untimed runs per shape (default 3)")
    p.add_argument("--graphs", nargs="+", metavar="NAME", help="only these graphs")
    p.add_argument("--json", metavar="OUT", help="write all timings and the verify-cost curve as JSON")
    p.add_argument("--plot", metavar="PNG", help="plot the verify-cost curve (latency vs q)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from spectrt.profiles.timing import format_table, plot_verify_curve, profile_artifact, write_json

    result = profile_artifact(args.dir, backend=args.backend, iterations=args.iterations, warmup=args.warmup,
                              profile=args.profile, graphs=args.graphs)
    print(format_table(result))
    print("\nequivalent Polygraphy commands (random data, same shapes):")
    for c in result["commands"]:
        print("  " + c)
    if args.json:
        print(f"wrote {write_json(result, args.json)}")
    if args.plot:
        print(f"wrote {plot_verify_curve(result, args.plot)}")
    return 0
