"""spectrt export -m MODEL -o DIR"""
from __future__ import annotations

import argparse


def register(sub) -> None:
    from spectrt.runtime.contract import DEFAULT_MAX_CONTEXT, DEFAULT_OPSET, DEFAULT_TOPK

    p = sub.add_parser("export", help="export a Hugging Face causal LM (and draft heads) to ONNX",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("-m", "--model", default="smollm2-135m",
                   help="HF model directory, .gguf file, or built-in name (smollm2-135m)")
    p.add_argument("-o", "--output", required=True, help="output directory (written atomically)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16"])
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET)
    p.add_argument("--max-context", type=int, default=DEFAULT_MAX_CONTEXT, help="KV cache length in tokens")
    p.add_argument("--no-validate", dest="validate", action="store_false", help="skip the ORT-vs-torch checks")
    p.add_argument("--heads", default=None,
                   help="draft heads: a Medusa or Hydra dir/checkpoint, or 'builtin[:medusa|hydra]' = heads shipped "
                        "for a built-in model (built-in models get their default shipped heads)")
    p.add_argument("--no-heads", action="store_true", help="export the base model only")
    p.add_argument("--topk", type=int, default=DEFAULT_TOPK, help="candidates per head from the draft LM head")
    p.add_argument("--tree", default=None,
                   help="tree: 'cpu' (2 nodes, default), 'gpu' (64), a node count, or a JSON file of top-k rank paths; "
                        "sizes are filled with the best paths for the heads' measured accuracies")
    p.add_argument("--vocab", default=None, help="VocabTrim file (spectrt calibrate vocab) for the draft LM head")
    p.add_argument("--vocab-size", type=int, default=None,
                   help="keep the top N tokens (of --vocab, or calibrated on the bundled prompts)")
    p.add_argument("--full-vocab", action="store_true",
                   help="no VocabTrim (built-in models otherwise get their bundled ranking and default N)")
    p.set_defaults(func=run)


def run(args) -> int:
    from spectrt.export.exporter import ExportOptions, export_model

    options = ExportOptions(dtype=args.dtype, opset=args.opset, max_context=args.max_context, validate=args.validate,
                            heads=args.heads, no_heads=args.no_heads, topk=args.topk, tree=args.tree,
                            vocab=args.vocab, vocab_size=args.vocab_size, full_vocab=args.full_vocab)
    out = export_model(args.model, args.output, options)
    print(f"exported to {out}")
    return 0
