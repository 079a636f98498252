"""spectrt bench DIR --prompts FILE"""
from __future__ import annotations

import argparse


def register(sub) -> None:
    from spectrt.runtime.ort_runner import DEFAULT_PROVIDER, PROVIDERS
    from spectrt.runtime.session import BACKENDS, DEFAULT_BACKEND

    p = sub.add_parser("bench", help="AR vs speculative decoding (and optionally transformers) on a prompt set",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("artifact", metavar="DIR", nargs="+",
                   help="export(s); AR runs on the first, speculative decoding on each one with draft heads")
    p.add_argument("--prompts", default=None, help="JSONL with 'prompt' or Spec-Bench 'turns' (default: bundled "
                                                   "39-question Spec-Bench subset)")
    p.add_argument("--stride", type=int, default=1, help="every K-th prompt (a spread over all categories)")
    p.add_argument("--limit", type=int, default=None, help="at most N prompts (after --stride)")
    p.add_argument("-n", "--max-new-tokens", type=int, default=128)
    p.add_argument("--tree", default=None, help="tree JSON (default: the export's)")
    p.add_argument("--transformers", action="store_true",
                   help="also time transformers' greedy generate on the source model (needs the export extra)")
    p.add_argument("--backend", choices=sorted(BACKENDS), default=DEFAULT_BACKEND,
                   help="ort: ONNX Runtime graphs; trt: TensorRT engines from `spectrt build`")
    p.add_argument("--profile", default=None, help="device profile the TensorRT engines were built for")
    p.add_argument("--provider", choices=sorted(PROVIDERS), default=DEFAULT_PROVIDER)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", dest="json_out", default=None, metavar="OUT", help="write the figures as JSON")
    p.add_argument("--vocab-sweep", default=None, metavar="N,N,...",
                   help="VocabTrim sweep: benchmark the draft LM head trimmed to each N ('full' = untrimmed)")
    p.add_argument("--vocab", default=None, help="ranked vocab file for --vocab-sweep (spectrt calibrate vocab)")
    p.add_argument("--sweep-dir", default=None, help="where the sweep's variant exports go (default: DIR.vocab-sweep)")
    p.add_argument("--plot", default=None, metavar="PNG", help="coverage and tau vs N plot of the sweep")
    p.set_defaults(func=run)


def run(args) -> int:
    from tqdm import tqdm

    from spectrt.calibration.prompts import DEFAULT_PROMPTS, load_prompt_records
    from spectrt.runtime.bench import format_report, run_bench, write_json
    from spectrt.runtime.errors import SpectrtError
    from spectrt.runtime.manifest import load_artifact
    from spectrt.runtime.session import SessionConfig

    if args.stride < 1:
        raise SpectrtError(f"--stride must be at least 1, not {args.stride}")
    records = load_prompt_records(args.prompts or DEFAULT_PROMPTS)[::args.stride][:args.limit]
    hf = None
    if args.transformers:
        from spectrt.export.reference import HFGreedy

        model = load_artifact(args.artifact[0]).model
        hf = HFGreedy(model.get("builtin") or model["source"], args.threads)
    if args.vocab_sweep:
        return run_sweep(args, records)
    config = SessionConfig(backend=args.backend, profile=args.profile, provider=args.provider, threads=args.threads, tree=args.tree)
    report = run_bench(args.artifact, records, args.max_new_tokens, config, hf,
                       progress=lambda r: tqdm(r, desc="bench", unit="prompt"))
    print(format_report(report))
    if args.json_out:
        write_json(report, args.json_out)
    return 1 if report.mismatches else 0


def run_sweep(args, records) -> int:
    import json

    from spectrt.calibration.vocab_sweep import format_rows, plot, sweep
    from spectrt.runtime.errors import SpectrtError
    from spectrt.runtime.manifest import load_artifact
    from spectrt.runtime.session import SessionConfig

    if not args.vocab:
        raise SpectrtError("--vocab-sweep needs --vocab VOCAB.json (ranked ids from `spectrt calibrate vocab`)")
    if len(args.artifact) != 1:
        raise SpectrtError("--vocab-sweep takes one export")
    artifact = args.artifact[0]
    vocab = load_artifact(artifact).model["vocab"]
    try:
        sizes = [vocab if s.strip() == "full" else int(s) for s in args.vocab_sweep.split(",")]
    except ValueError:
        raise SpectrtError(f"--vocab-sweep takes sizes like 1000,4000,full, not '{args.vocab_sweep}'") from None
    config = SessionConfig(provider=args.provider, threads=args.threads, tree=args.tree)
    rows = sweep(artifact, args.vocab, sizes, records, args.max_new_tokens,
                 args.sweep_dir or f"{artifact.rstrip('/')}.vocab-sweep", config)
    print(format_rows(rows))
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(rows, f, indent=2)
    if args.plot:
        plot(rows, args.plot)
    return 1 if any(r["mismatches"] for r in rows) else 0
