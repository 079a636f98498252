"""Foundation: export fidelity per family, AR == transformers greedy, runtime limits, torch-free runtime."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from spectrt.runtime.generate import Decoder
from spectrt.runtime.artifact import load_artifact
from spectrt.runtime.ort_runner import OrtBaseRunner
from spectrt.runtime.text import TextCodec

FAMILIES = ("llama", "mistral", "qwen2")


def hf_greedy(model_dir, ids, n):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None  # the runtime below is also run without EOS
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(ids):].tolist()


def ar_generate(art_dir, ids, n, eos=(), max_context=None):
    art = load_artifact(art_dir)
    with OrtBaseRunner(art, max_q=16, max_context=max_context) as run:
        return Decoder(run, eos_ids=eos, prefill_chunk=16).generate(ids, n)


def test_runtime_imports_without_torch():
    code = ("import sys, spectrt.runtime, spectrt.runtime.session, spectrt.runtime.drafters, spectrt.cli;"
            "import spectrt.commands.generate;"
            "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers')];"
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("family", FAMILIES)
def test_export_validated_and_manifest(tiny_exports, family):
    art = load_artifact(tiny_exports[family])
    m = art.manifest
    assert m.model.family == family
    assert {c.check.split(" (")[0] for c in m.validation} >= {"prefill logits", "tree pass == causal paths"}
    assert all(c.ok and c.max_abs <= 1e-3 for c in m.validation)
    art.verify(hashes=True)


@pytest.mark.parametrize("family", FAMILIES)
def test_ar_equals_transformers_greedy(tiny_models, tiny_exports, family):
    rng = np.random.default_rng(1)
    ids = rng.integers(4, 256, 37).tolist()  # > prefill chunk: exercises chunked prefill
    res = ar_generate(tiny_exports[family], ids, 40)
    assert res.tokens == hf_greedy(tiny_models[family], ids, 40)
    assert res.stop_reason == "max_tokens" and res.tau == 1.0


def test_tied_embeddings_stored_once(tiny_models, tiny_exports):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"])
    param_bytes = sum(p.numel() for p in model.parameters()) * 4  # parameters() lists a tied weight once
    art = load_artifact(tiny_exports["llama"])
    assert art.model.tied_embeddings
    onnx_bytes = art.graph("base").bytes
    assert onnx_bytes <= 1.05 * param_bytes + 200_000  # + graph structure of a tiny model


def test_kv_cache_is_written_in_place(tiny_exports):
    art = load_artifact(tiny_exports["llama"])
    with OrtBaseRunner(art, max_q=8) as run:
        before = run.keys[0].copy()
        run.forward(np.array([5, 6, 7]), np.arange(3), np.tri(3, dtype=bool))
        assert not np.array_equal(run.keys[0][:3], before[:3])  # new KV landed in the cache slots
        assert np.array_equal(run.keys[0][3:], before[3:])
        rows = run.keys[0][:3].copy()
        run.commit([0, 2])  # keep rows 0 and 2: row 2 moves to slot 1
        assert run.past == 2 and np.array_equal(run.keys[0][1], rows[2])


def test_eos_stops_and_is_included(tiny_models, tiny_exports):
    ids = list(range(10, 30))
    ref = ar_generate(tiny_exports["llama"], ids, 20).tokens
    eos = ref[5]
    res = ar_generate(tiny_exports["llama"], ids, 20, eos=[eos])
    assert res.tokens == ref[:ref.index(eos) + 1] and res.stop_reason == "eos"


def test_context_limit_stops_cleanly(tiny_exports):
    ids = list(range(10, 30))
    full = ar_generate(tiny_exports["llama"], ids, 50).tokens
    res = ar_generate(tiny_exports["llama"], ids, 50, max_context=32)
    assert res.stop_reason == "context"
    assert len(ids) + len(res.tokens) == 32 and res.tokens == full[:12]


def test_prompt_longer_than_context_is_an_error(tiny_exports):
    from spectrt.runtime.errors import SpectrtError

    with pytest.raises(SpectrtError, match="max context"):
        ar_generate(tiny_exports["llama"], list(range(40)), 5, max_context=32)


def test_chat_template_matches_transformers(tiny_models, tiny_exports):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_models["llama"])
    codec = TextCodec(load_artifact(tiny_exports["llama"]))
    msg = [{"role": "user", "content": "Hello, how are you?"}]
    ref = tok.apply_chat_template(msg, add_generation_prompt=True, tokenize=True)
    ref = ref["input_ids"] if hasattr(ref, "keys") else ref
    assert codec.encode("Hello, how are you?") == list(ref)
    assert codec.encode("Hello", chat=False) == tok("Hello")["input_ids"]


def test_generate_cli_json(tiny_exports, capsys):
    from spectrt.cli import main

    assert main(["generate", str(tiny_exports["qwen2"]), "-p", "hi there", "-n", "8", "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["new_tokens"] >= 1 and stats["mode"] == "ar" and stats["prompt_tokens"] > 0
    assert {"prefill_ms", "decode_tok_s", "stop_reason"} <= set(stats)
