"""spectrt generate DIR -p PROMPT"""
from __future__ import annotations

import argparse


def register(sub) -> None:
    from spectrt.runtime.session import DEFAULT_MAX_NEW_TOKENS
    from spectrt.runtime.ort_runner import DEFAULT_PROVIDER, PROVIDERS
    from spectrt.runtime.session import BACKENDS, DEFAULT_BACKEND

    p = sub.add_parser("generate", help="greedy generation from an exported directory",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("artifact", metavar="DIR", help="output of `spectrt export`")
    p.add_argument("-p", "--prompt", required=True)
    p.add_argument("-n", "--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS)
    p.add_argument("--mode", choices=["spec", "ar"], default=None,
                   help="speculative or autoregressive (default: spec when the export has draft heads)")
    p.add_argument("--tree", default=None, help="tree JSON (lists of top-k rank paths); default: the export's")
    p.add_argument("--no-chat", dest="chat", action="store_false", help="raw prompt, no chat template")
    p.add_argument("--backend", choices=sorted(BACKENDS), default=DEFAULT_BACKEND,
                   help="ort: ONNX Runtime graphs; trt: TensorRT engines from `spectrt build`")
    p.add_argument("--profile", default=None, help="device profile the TensorRT engines were built for")
    p.add_argument("--provider", choices=sorted(PROVIDERS), default=DEFAULT_PROVIDER, help="ONNX Runtime provider")
    p.add_argument("--max-context", type=int, default=None, help="cap the KV cache (default: the export's)")
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (default: all cores)")
    p.add_argument("--json", action="store_true", help="print machine-readable stats instead of streaming text")
    p.set_defaults(func=run)


def run(args) -> int:
    import json
    import sys

    from spectrt.runtime.session import SessionConfig, SpecSession

    config = SessionConfig(backend=args.backend, profile=args.profile, provider=args.provider, max_context=args.max_context, threads=args.threads,
                           mode=args.mode, tree=args.tree)
    with SpecSession(args.artifact, config) as session:
        ids = session.codec.encode(args.prompt, chat=args.chat)
        if args.json:
            res = session.generate(ids, args.max_new_tokens)
            print(json.dumps({**res.stats(), "mode": session.mode, "text": session.codec.decode(res.tokens)}))
        else:
            res = session.generate(ids, args.max_new_tokens, stream=sys.stdout.write)
            sys.stdout.write("\n")
            if res.stop_reason == "context":
                print(f"[stopped: context limit of {session.max_context} tokens reached]", file=sys.stderr)
    return 0
