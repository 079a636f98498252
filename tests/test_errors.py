"""Bad input: one-line errors, exit code != 0, no traceback, nothing half-written."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest


def spectrt(*args):
    r = subprocess.run([sys.executable, "-m", "spectrt", *map(str, args)], capture_output=True, text=True)
    return r.returncode, r.stderr.strip()


def assert_one_line_error(rc, err, match):
    assert rc != 0
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    assert match in err, err


@pytest.fixture
def artifact_copy(tiny_exports, tmp_path):
    dst = tmp_path / "art"
    shutil.copytree(tiny_exports["llama"], dst)
    return dst


def test_missing_manifest(artifact_copy):
    (artifact_copy / "manifest.json").unlink()
    assert_one_line_error(*spectrt("generate", artifact_copy, "-p", "hi"), "manifest.json: missing")


def test_corrupt_manifest(artifact_copy):
    (artifact_copy / "manifest.json").write_text("{not json")
    assert_one_line_error(*spectrt("generate", artifact_copy, "-p", "hi"), "corrupt manifest")


def test_other_contract_version(artifact_copy):
    m = json.loads((artifact_copy / "manifest.json").read_text())
    m["contract_version"] = "0.1"
    (artifact_copy / "manifest.json").write_text(json.dumps(m))
    assert_one_line_error(*spectrt("generate", artifact_copy, "-p", "hi"), "contract")


def test_truncated_graph_data(artifact_copy):
    data = artifact_copy / "base.onnx.data"
    data.write_bytes(data.read_bytes()[:1000])
    assert_one_line_error(*spectrt("generate", artifact_copy, "-p", "hi"), "truncated or replaced")


def test_corrupt_graph(artifact_copy):
    m = json.loads((artifact_copy / "manifest.json").read_text())
    (artifact_copy / "base.onnx").write_bytes(b"\x00garbage" * 10)
    m["graphs"]["base"]["files"][0]["bytes"] = 80
    (artifact_copy / "manifest.json").write_text(json.dumps(m))
    assert_one_line_error(*spectrt("generate", artifact_copy, "-p", "hi"), "cannot load the graph")


def test_prompt_longer_than_context(tiny_exports):
    rc, err = spectrt("generate", tiny_exports["llama"], "-p", "word " * 300, "--no-chat")
    assert_one_line_error(rc, err, "the prompt has 1500 tokens; this model's context is 256 tokens")


def test_unknown_model_name(tmp_path):
    rc, err = spectrt("export", "-m", "no-such-model", "-o", tmp_path / "out")
    assert_one_line_error(rc, err, "unknown model 'no-such-model'")
    assert not (tmp_path / "out").exists()


def _run_cli(capsys, *args):
    from spectrt.cli import main

    rc = main([str(a) for a in args])
    return rc, capsys.readouterr().err.strip()


def test_model_dir_with_only_config(tiny_models, tmp_path, capsys):
    """A model folder with only config.json: name the missing tokenizer and weights, not transformers'
    "Couldn't instantiate the backend tokenizer from one of: ..."."""
    model = tmp_path / "model"
    model.mkdir()
    shutil.copy(tiny_models["llama"] / "config.json", model / "config.json")
    rc, err = _run_cli(capsys, "export", "-m", model, "-o", tmp_path / "out")
    assert rc == 2
    assert_one_line_error(rc, err, f"spectrt export: error: {model}: no tokenizer (tokenizer.json, tokenizer.model")
    assert "no weights (model.safetensors or pytorch_model.bin" in err
    assert "Couldn't instantiate" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("keep, message", [
    (("config.json", "model.safetensors"), "no tokenizer (tokenizer.json"),
    (("config.json", "tokenizer.json", "tokenizer_config.json"), "no weights (model.safetensors"),
])
def test_model_dir_missing_tokenizer_or_weights(tiny_models, tmp_path, capsys, keep, message):
    model = tmp_path / "model"
    model.mkdir()
    for name in keep:
        shutil.copy(tiny_models["llama"] / name, model / name)
    rc, err = _run_cli(capsys, "export", "-m", model, "-o", tmp_path / "out")
    assert rc == 2
    assert_one_line_error(rc, err, f"{model}: {message}")
    assert not (tmp_path / "out").exists()


def test_model_dir_missing_shard(tiny_models, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(tiny_models["llama"], model)
    (model / "model.safetensors").unlink()
    (model / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors",
                                        "b": "model-00002-of-00002.safetensors"}}))
    (model / "model-00001-of-00002.safetensors").write_bytes(b"")
    rc, err = _run_cli(capsys, "export", "-m", model, "-o", tmp_path / "out")
    assert rc == 2
    assert_one_line_error(rc, err, "model.safetensors.index.json names missing shard(s) "
                                   "model-00002-of-00002.safetensors")
    assert not (tmp_path / "out").exists()


def test_unsupported_architecture(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(tmp_path / "gpt2")
    from tests.conftest import _tokenizer

    _tokenizer().save_pretrained(tmp_path / "gpt2")
    rc, err = spectrt("export", "-m", tmp_path / "gpt2", "-o", tmp_path / "out")
    assert_one_line_error(rc, err, "unsupported architecture 'gpt2' (supported: llama, mistral, qwen2)")
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no temp dir left behind


def test_unwritable_output_dir(tiny_models, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    rc, err = spectrt("export", "-m", tiny_models["llama"], "-o", blocker / "out")
    assert_one_line_error(rc, err, "cannot create the output directory")


def test_refuses_to_overwrite_foreign_dir(tiny_models, tmp_path):
    (tmp_path / "keep").mkdir()
    (tmp_path / "keep" / "precious.txt").write_text("x")
    rc, err = spectrt("export", "-m", tiny_models["llama"], "-o", tmp_path / "keep")
    assert_one_line_error(rc, err, "refusing to overwrite")
    assert (tmp_path / "keep" / "precious.txt").exists()


def test_failed_validation_leaves_nothing(tiny_models, tmp_path, monkeypatch):
    """A failure mid-export (here: validation) removes the temp dir and never creates DIR."""
    from spectrt.export import exporter, validate
    from spectrt.runtime.errors import SpectrtError

    def broken(*a, **k):
        raise SpectrtError("validation failed: injected")

    monkeypatch.setattr(exporter, "validate_base", broken)
    with pytest.raises(SpectrtError, match="injected"):
        exporter.export_model(str(tiny_models["llama"]), tmp_path / "out", progress=lambda *_: None)
    assert list(tmp_path.iterdir()) == []
