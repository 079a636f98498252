"""Medusa end to end on tiny models: export heads graphs, validate, speculative == autoregressive."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from spectrt.export.exporter import ExportOptions, export_model
from spectrt.runtime.artifact import load_artifact
from spectrt.runtime.session import SessionConfig, SpecSession


def random_heads(path, lm_head, hidden=64, vocab=256, heads=3, layers=2, seed=0):
    """``lm_head``: "shared" (the base's) or "own" (one per head); spectrt's old "2" / "1" still accepted."""
    lm_head = {"1": "own", "2": "shared"}.get(str(lm_head), lm_head)
    import torch

    from spectrt.export.medusa import MedusaConfig, MedusaHeads, save_medusa

    torch.manual_seed(seed)
    h = MedusaHeads(MedusaConfig(num_heads=heads, num_layers=layers, hidden_size=hidden,
                                 vocab_size=vocab if lm_head == "own" else None, shared_lm_head=lm_head == "shared"))
    with torch.no_grad():
        for p in h.parameters():
            p.normal_(0, 0.2)
    save_medusa(h, path)
    return path


@pytest.fixture(scope="module", params=["own", "shared"])
def medusa_export(request, tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"medusa_{request.param}")
    heads = random_heads(root / "heads", request.param)
    out = export_model(str(tiny_models["llama"]), root / "art",
                       ExportOptions(max_context=256, heads=str(heads), topk=4, tree="12"), progress=lambda *_: None)
    return out


def test_manifest_and_validation(medusa_export):
    art = load_artifact(medusa_export)
    d = art.draft
    assert d.kind == "medusa" and d.num_heads == 3 and d.topk == 4
    assert len(d.tree) == 11
    names = [c.check for c in art.manifest.validation]
    assert "heads features" in names and "draft top-k scores" in names
    assert all(c.ok for c in art.manifest.validation)


@pytest.mark.parametrize("prompt", ["hello world", "the quick brown fox jumps", "1 2 3 4 5 6"])
def test_spec_equals_ar(medusa_export, prompt):
    out = {}
    for mode in ("ar", "spec"):
        with SpecSession(medusa_export, SessionConfig(mode=mode)) as s:
            ids = s.codec.encode(prompt)
            out[mode] = s.generate(ids, 48)
    assert out["spec"].tokens == out["ar"].tokens
    assert out["spec"].stop_reason == out["ar"].stop_reason


def test_custom_tree_file(medusa_export, tmp_path):
    tree = tmp_path / "tree.json"
    tree.write_text(json.dumps({"paths": [[0], [1], [0, 0], [0, 0, 0]]}))
    with SpecSession(medusa_export, SessionConfig(tree=str(tree))) as s:
        assert s.tree.size == 5
        res = s.generate(s.codec.encode("abc"), 20)
    with SpecSession(medusa_export, SessionConfig(mode="ar")) as s:
        assert s.generate(s.codec.encode("abc"), 20).tokens == res.tokens


def cli(*args):
    r = subprocess.run([sys.executable, "-m", "spectrt", *map(str, args)], capture_output=True, text=True)
    return r.returncode, r.stderr.strip()


def test_heads_with_wrong_hidden_size(tiny_models, tmp_path):
    heads = random_heads(tmp_path / "heads", "shared", hidden=32)
    rc, err = cli("export", "-m", tiny_models["llama"], "--heads", heads, "-o", tmp_path / "out")
    assert rc != 0 and "Traceback" not in err and "hidden size 32" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_heads_with_wrong_vocab(tiny_models, tmp_path):
    heads = random_heads(tmp_path / "heads", "own", vocab=300)
    rc, err = cli("export", "-m", tiny_models["llama"], "--heads", heads, "-o", tmp_path / "out")
    assert rc != 0 and "300" in err and len(err.splitlines()) == 1


def test_tree_deeper_than_heads(tiny_models, tmp_path):
    heads = random_heads(tmp_path / "heads", "shared")
    tree = tmp_path / "tree.json"
    tree.write_text(json.dumps([[0], [0, 0], [0, 0, 0], [0, 0, 0, 0]]))
    rc, err = cli("export", "-m", tiny_models["llama"], "--heads", heads, "--tree", tree, "-o", tmp_path / "out")
    assert rc != 0 and "exceeds the 3 draft heads" in err


def test_corrupt_heads_checkpoint(tiny_models, tmp_path):
    heads = random_heads(tmp_path / "heads", "shared")
    (heads / "medusa_lm_head.safetensors").write_bytes(b"\x00" * 64)
    rc, err = cli("export", "-m", tiny_models["llama"], "--heads", heads, "-o", tmp_path / "out")
    assert rc != 0 and "Traceback" not in err and len(err.splitlines()) == 1
