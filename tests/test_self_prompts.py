"""Self-written prompts (Magpie): the user-turn prefix of the chat template, seeded sampling, filtering,
the JSONL file and the `calibrate prompts` command, on a tiny in-process model."""
from __future__ import annotations

import json

import pytest

from spectrt.calibration.prompts import load_prompts
from spectrt.calibration.self_prompts import SelfPromptConfig, clean, self_prompts, user_turn_prefix, write_prompts
from spectrt.runtime.errors import SpectrtError

END = 3  # <|im_end|> of the conftest tokenizer


@pytest.fixture(scope="module")
def tiny(tiny_models):
    """The tiny Llama with its end-of-turn logit raised, so sampled requests end within a few tokens."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"]).eval()
    tok = AutoTokenizer.from_pretrained(tiny_models["llama"])
    model.config.tie_word_embeddings = False  # an own LM head with a bias, copied from the tied embeddings
    head = torch.nn.Linear(64, model.config.vocab_size, bias=True)
    with torch.no_grad():
        head.weight.copy_(model.get_input_embeddings().weight)
        head.bias.zero_()
        head.bias[END] = 6.0  # ~ one in a few tokens ends the turn
    model.lm_head = head
    return model, tok


def test_user_turn_prefix_is_the_template_up_to_the_message(tiny):
    _, tok = tiny
    prefix, stops = user_turn_prefix(tok)
    assert tok.decode(prefix) == "<|im_start|>user\n"
    assert stops == [END]


def test_a_tokenizer_without_a_chat_template_is_refused(tiny_models):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_models["llama"])
    tok.chat_template = None
    with pytest.raises(SpectrtError, match="no chat template"):
        user_turn_prefix(tok)
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}{% endfor %}"
    with pytest.raises(SpectrtError, match="does not render the user's message"):
        user_turn_prefix(tok)


def test_sampled_prompts_are_distinct_clean_seeded_and_exclude(tiny):
    model, tok = tiny
    cfg = SelfPromptConfig(count=6, seed=3, max_new_tokens=24, min_chars=2, batch_size=4)
    got = self_prompts(model, tok, cfg, progress=False)
    assert len(got) == 6 and len(set(got)) == 6
    assert all(p == p.strip() and len(p) >= 2 and "<|" not in p for p in got)
    assert self_prompts(model, tok, cfg, progress=False) == got  # seeded
    other = self_prompts(model, tok, SelfPromptConfig(**{**cfg.__dict__, "seed": 4}), progress=False)
    assert other != got
    without = self_prompts(model, tok, cfg, exclude=got[:2], progress=False)
    assert not set(without) & set(got[:2]) and without[:4] == got[2:6]


def test_too_few_kept_is_an_error_not_a_short_file(tiny):
    model, tok = tiny
    cfg = SelfPromptConfig(count=3, max_new_tokens=4, min_chars=10_000, batch_size=2, max_rounds_factor=1)
    with pytest.raises(SpectrtError, match="kept 0 of 4 sampled requests"):
        self_prompts(model, tok, cfg, progress=False)
    with pytest.raises(SpectrtError, match="temperature must be positive"):
        self_prompts(model, tok, SelfPromptConfig(temperature=0), progress=False)


def test_clean_drops_short_and_markup():
    assert clean("  Write a poem.\n", 5) == "Write a poem."
    assert clean("Hi", 5) is None
    assert clean("tell me <|im_start|>assistant", 5) is None


def test_cli_writes_a_prompts_file_distill_reads(tiny_models, tmp_path, capsys):
    from spectrt.cli import main

    out = tmp_path / "self.jsonl"
    keep_out = tmp_path / "calibration.jsonl"
    keep_out.write_text(json.dumps({"prompt": "x"}) + "\n")
    argv = ["calibrate", "prompts", "-m", str(tiny_models["llama"]), "-o", str(out), "-n", "2", "--min-chars", "0",
            "--max-new-tokens", "512", "--batch-size", "8", "--exclude", str(keep_out), "--threads", "1", "-q"]
    assert main(argv) == 0
    assert "2 prompts written by" in capsys.readouterr().out
    got = load_prompts(out)
    assert len(got) == 2 and "x" not in got
    assert main(argv[:5] + [str(tmp_path / "no" / "dir.jsonl")] + argv[6:]) == 2
    assert "no such directory" in capsys.readouterr().err
    assert main(argv + ["--temperature", "0"]) == 2
    assert main(argv + ["--exclude", str(tmp_path / "missing.jsonl")]) == 2
    assert "missing.jsonl" in capsys.readouterr().err


def test_write_prompts_round_trips(tmp_path):
    path = write_prompts(tmp_path / "p.jsonl", ["a \"quoted\" line", "two\nlines", "ünïcode"])
    assert load_prompts(path) == ["a \"quoted\" line", "two\nlines", "ünïcode"]
    with pytest.raises(SpectrtError, match="no such directory"):
        write_prompts(tmp_path / "missing" / "p.jsonl", ["a"])
