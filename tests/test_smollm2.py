"""Slow tier: the real SmolLM2-135M-Instruct (built-in GGUF) against transformers."""
from __future__ import annotations

import pytest

from spectrt.calibration.prompts import DEFAULT_PROMPTS, load_prompts
from spectrt.runtime.session import SessionConfig, SpecSession

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def hf_model(smollm2_installed):
    from spectrt.export.sources import load_hf

    model, _ = load_hf("smollm2-135m", progress=lambda *_: None)
    return model


def test_export_validation_and_size(smol_export):
    from spectrt.runtime.artifact import load_artifact

    art = load_artifact(smol_export)
    assert all(c.ok for c in art.manifest.validation)
    base_bytes = art.graph("base").bytes
    params = 134_515_008  # SmolLM2-135M parameters, tied embeddings counted once
    assert base_bytes <= 1.05 * params * 4


def test_ar_equals_transformers_greedy(smol_export, hf_model):
    import torch

    prompts = load_prompts(DEFAULT_PROMPTS)[::8][:5]
    with SpecSession(smol_export, SessionConfig(mode="ar")) as s:
        for p in prompts:
            ids = s.codec.encode(p)
            res = s.generate(ids, 64)
            with torch.no_grad():
                ref = hf_model.generate(torch.tensor([ids]), max_new_tokens=64, do_sample=False,
                                        pad_token_id=2)[0, len(ids):].tolist()
            assert res.tokens == ref, p


def test_shipped_heads_spec_equals_ar(smol_export):
    """SmolLM2 + the shipped Medusa heads: speculative == autoregressive on 10 dev prompts x 128 tokens."""
    from spectrt.runtime.artifact import load_artifact

    draft = load_artifact(smol_export).draft
    assert draft and draft.kind == "medusa", "built-in export should include the shipped heads"
    prompts = load_prompts(DEFAULT_PROMPTS)[1::4][:10]
    taus = []
    with SpecSession(smol_export) as spec, SpecSession(smol_export, SessionConfig(mode="ar")) as ar:
        for p in prompts:
            ids = spec.codec.encode(p)
            s, a = spec.generate(ids, 128), ar.generate(ids, 128)
            assert s.tokens == a.tokens, p
            taus.append(s.tau)
    assert sum(taus) / len(taus) > 1.0  # the heads do draft accepted tokens
