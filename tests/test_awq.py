"""AWQ (calibration.awq): the folded scales leave the float model's function unchanged, they lower the
quantization error where activations have outlier channels, and `export --awq` records and validates it."""
from __future__ import annotations

import numpy as np
import pytest

PROMPTS = ["the quick brown fox jumps over the lazy dog", "one two three four five six seven eight nine ten",
           "a b c d e f g h i j k l m n o p", "hello world, this is a calibration prompt"]


def _load(path, outlier: bool):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    if outlier:  # channel 5 of the input embeddings 20x larger: the kind of channel AWQ protects
        with torch.no_grad():
            model.get_input_embeddings().weight[:, 5] *= 20
    return model, AutoTokenizer.from_pretrained(path)


def _logits(model, ids):
    import torch

    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].numpy()


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_folding_keeps_the_float_function(tiny_models, family):
    from spectrt.calibration.awq import apply_awq

    model, tok = _load(tiny_models[family], outlier=True)
    ids = tok(PROMPTS[0], add_special_tokens=False)["input_ids"]
    before = _logits(model, ids)
    report = apply_awq(model, tok, PROMPTS, bits=4, block=32, grid="symmetric-full")
    np.testing.assert_allclose(_logits(model, ids), before, rtol=1e-4, atol=1e-4)
    assert len(report.groups) == 2 * 3  # GQA (4 heads, 2 KV heads): no v -> o group
    assert report.tokens == sum(len(tok(p, add_special_tokens=False)["input_ids"]) for p in PROMPTS)


@pytest.mark.parametrize("grid", ["symmetric-full", "asymmetric"])
def test_scales_lower_the_error_of_outlier_channels(tiny_models, grid):
    """With an outlier input channel the chosen alpha is > 0 for the groups reading the residual stream,
    and the quantized groups' output error drops below plain rounding's (alpha = 0, also on the grid)."""
    from spectrt.calibration.awq import apply_awq

    model, tok = _load(tiny_models["llama"], outlier=True)
    report = apply_awq(model, tok, PROMPTS, bits=4, block=32, grid=grid)
    norms = [(a, base, best) for name, a, base, best in report.groups if name.endswith("layernorm")]
    assert all(a > 0 for a, _, _ in norms), report.groups
    assert sum(best for _, _, best in norms) < 0.9 * sum(base for _, base, _ in norms)
    assert "AWQ on 4 prompts" in report.summary()


def test_export_with_awq(tiny_models, tmp_path):
    from spectrt.calibration.awq import awq_calibrator
    from spectrt.export.exporter import ExportOptions, export_model
    from spectrt.runtime.artifact import load_artifact

    said = []
    out = export_model(str(tiny_models["llama"]), tmp_path / "awq",
                       ExportOptions(max_context=128, weights="int4", awq=True, no_heads=True,
                                     calibrate_weights=awq_calibrator(PROMPTS, progress=said.append)),
                       progress=lambda *_: None)
    w = load_artifact(out).manifest.weights
    assert w.awq and w.scheme == "asymmetric-rtn" and "AWQ" in w.label()
    assert all(row.ok for row in load_artifact(out).manifest.validation)  # graph == the rescaled torch model
    assert said and said[0].startswith("AWQ on 4 prompts")


def test_awq_option_errors(tiny_models, tmp_path, capsys):
    from spectrt.cli import main

    for args, message in ((["--awq"], "need --weights int8 or int4"),
                          (["--weights", "int4", "--awq", "--scheme", "gguf"], "contradicts --scheme gguf"),
                          (["--weights", "int4", "--calibration-prompts", "x.jsonl"], "--calibration-prompts is for --awq"),
                          (["--weights", "int4", "--awq", "--calibration-prompts", str(tmp_path / "none.jsonl")],
                           "none.jsonl")):
        out = tmp_path / "out"
        assert main(["export", "-m", str(tiny_models["llama"]), "-o", str(out), *args]) == 2, args
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err, (args, err)
        assert not out.exists()
