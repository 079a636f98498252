"""`spectrt export -m MODEL -o DIR`: a Hugging Face causal LM (and draft heads) to ONNX."""
from __future__ import annotations

import click

from spectrt.commands._common import IntRange, command
from spectrt.runtime.artifact import DEFAULT_WEIGHT_BLOCK, QUANT_SCHEMES, VOCAB_WEIGHT_BITS, WEIGHT_BLOCKS
from spectrt.runtime.contract import DEFAULT_MAX_CONTEXT, DEFAULT_OPSET, DEFAULT_TOPK


@command("export", short_help="export a Hugging Face causal LM (and draft heads) to ONNX")
@click.option("-m", "--model", default="smollm2-135m",
              help="HF model directory, .gguf file, or built-in name (smollm2-135m)")
@click.option("-o", "--output", required=True, metavar="DIR", help="output directory (written atomically)")
@click.option("--dtype", type=click.Choice(["fp32", "fp16"]), default="fp32", help="weights and activations")
@click.option("--opset", type=IntRange(13, 21), default=None, show_default=f"{DEFAULT_OPSET}; 21 with --weights-format qdq",
              help="ONNX opset (TensorRT 10.0-10.14 parse up to 20, 10.15 up to 24; 17 suits JetPack 6's TensorRT "
                   "10.3; qdq-quantized weights need 21)")
@click.option("--max-context", type=IntRange(min=2), default=DEFAULT_MAX_CONTEXT, help="KV cache length in tokens")
@click.option("--validate/--no-validate", default=True,
              help="check the ONNX Runtime graphs against torch (--no-validate skips the checks)")
@click.option("--heads", default=None,
              help="draft heads: a Medusa or Hydra dir/checkpoint, or 'builtin[:medusa|hydra]' = heads shipped "
                   "for a built-in model (built-in models get their default shipped heads)")
@click.option("--no-heads", is_flag=True, help="export the base model only")
@click.option("--topk", type=IntRange(min=1), default=DEFAULT_TOPK, help="candidates per head from the draft LM head")
@click.option("--tree", default=None, show_default="cpu",
              help="tree: 'cpu' (2 nodes), 'gpu' (64), a node count, or a JSON file of top-k rank paths; sizes are "
                   "filled with the best paths for the heads' measured accuracies")
@click.option("--vocab", default=None, metavar="VOCAB.json",
              help="VocabTrim file (spectrt calibrate vocab) for the draft LM head")
@click.option("--vocab-size", type=IntRange(min=1), default=None, metavar="N",
              help="keep the top N tokens (of --vocab, or calibrated on the bundled prompts)")
@click.option("--full-vocab", is_flag=True,
              help="no VocabTrim (built-in models otherwise get their bundled ranking and default N)")
@click.option("--corpus", default=None, metavar="TABLE.npz",
              help="n-gram table of the model's own answers for corpus drafting (spectrt calibrate corpus); built-in "
                   "models get their shipped table")
@click.option("--no-corpus", is_flag=True, help="no corpus table")
@click.option("--weights", type=click.Choice(["float", "int8", "int4"]), default="float",
              help="weight-only quantization of base.onnx's projection weights (block-wise; see --scheme)")
@click.option("--scheme", type=click.Choice(QUANT_SCHEMES), default=QUANT_SCHEMES[0],
              help="symmetric / asymmetric round-to-nearest blocks, or a GGUF source's own Q4_0/Q4_1/Q8_0 blocks "
                   "(no float round trip); auto: gguf when the source's blocks fit --weights, else asymmetric")
@click.option("--block", type=click.Choice([str(b) for b in WEIGHT_BLOCKS]), default=str(DEFAULT_WEIGHT_BLOCK),
              help="input rows per quantization scale (--weights int8/int4)")
@click.option("--weights-format", type=click.Choice(["matmulnbits", "qdq"]), default="matmulnbits",
              help="matmulnbits: ONNX Runtime's MatMulNBits (ORT only, any opset); qdq: DequantizeLinear -> MatMul "
                   "(opset 21) for TensorRT explicit quantization, which ONNX Runtime also runs at low-bit speed")
@click.option("--quantize-lm-head", is_flag=True,
              help="quantize the LM head to blocks of --vocab-bits too (a tied head alone gets its own copy)")
@click.option("--quantize-embeddings", is_flag=True,
              help="block-quantized input embeddings (--vocab-bits) (ORT's GatherBlockQuantized; a tied LM head shares the "
                   "table; not with Hydra heads)")
@click.option("--vocab-bits", type=click.Choice([str(b) for b in VOCAB_WEIGHT_BITS]), default=str(VOCAB_WEIGHT_BITS[0]),
              help="bits of the quantized LM head / embeddings (symmetric blocks; 4 as ORT GenAI's int4 builder does: "
                   "fewer bytes, see `spectrt quality` for what it costs)")
@click.option("--awq", is_flag=True,
              help="activation-aware scales (AWQ) chosen on calibration prompts before rounding (--scheme symmetric "
                   "or asymmetric)")
@click.option("--calibration-prompts", default=None, metavar="FILE", show_default="the bundled calibration set",
              help="JSONL prompts for --awq (never benchmark text)")
@click.option("--row-pad/--no-row-pad", "row_pad", default=True,
              help="matmulnbits: the runtime runs one-token calls with a dummy second row, so ORT's kernels (int4 "
                   "MatMulNBits, GroupQueryAttention) see at least 2 rows and decode (q = 1) and tree verification "
                   "compute the same numbers: "
                   "speculative output stays AR's; off makes AR faster but speculative output may differ at near-ties")
def command(model, output, block, vocab_bits, calibration_prompts, **options) -> int:
    """Export MODEL to DIR: base.onnx (+ heads.onnx, draft_lm_head.onnx), the tokenizer and manifest.json,
    validated against transformers unless --no-validate."""
    from spectrt.calibration.awq import awq_calibrator
    from spectrt.calibration.prompts import CALIBRATION_PROMPTS, load_prompts
    from spectrt.calibration.vocab import default_vocab
    from spectrt.export.exporter import ExportOptions, export_model

    if calibration_prompts and not options["awq"]:
        raise click.UsageError("--calibration-prompts is for --awq")
    weights = awq_calibrator(load_prompts(calibration_prompts or CALIBRATION_PROMPTS)) if options["awq"] else None
    options = ExportOptions(block=int(block), vocab_bits=int(vocab_bits), calibrate_vocab=default_vocab, calibrate_weights=weights, **options)
    out = export_model(model, output, options)
    print(f"exported to {out}")
    return 0
