"""VocabTrim: calibration from generations, trimmed draft LM head graphs, exactness, bad vocab files."""
from __future__ import annotations

import json

import numpy as np
import pytest

from spectrt.calibration.vocab import rank_tokens
from spectrt.export.vocabtrim import choose_kept, load_vocab
from spectrt.export.exporter import ExportOptions, export_model
from spectrt.runtime.errors import SpectrtError
from spectrt.runtime.artifact import load_artifact
from spectrt.runtime.session import SessionConfig, SpecSession
from tests.test_medusa_export import random_heads

PROMPTS = ["hello world", "the quick brown fox", "1 2 3 4", "once upon a time", "abc def ghi", "x y z"]


@pytest.fixture(scope="module")
def hf_llama(tiny_models):
    from spectrt.export.sources import load_hf

    return load_hf(str(tiny_models["llama"]), progress=lambda *_: None)


@pytest.fixture(scope="module")
def vocab_file(hf_llama, tmp_path_factory):
    from spectrt.calibration.vocab import calibrate_vocab

    model, tok = hf_llama
    root = tmp_path_factory.mktemp("vocab")
    calibrate_vocab(model, tok, PROMPTS, root / "vocab.json", size=256, max_new_tokens=24,
                    cache_path=root / "gen.jsonl", progress=False, source="test")
    return root / "vocab.json"


def test_counts_come_from_generations(hf_llama, vocab_file, tmp_path):
    from spectrt.calibration.generations import generate_responses

    model, tok = hf_llama
    data = json.loads(vocab_file.read_text())
    pairs = generate_responses(model, tok, PROMPTS, 24, vocab_file.parent / "gen.jsonl", progress=False)
    counts = rank_tokens([r for _, r in pairs], 256)
    assert data["generated_tokens"] == counts.sum() > 0
    top = int(np.argmax(counts))
    assert data["kept_ids"][0] == top and data["counts"][0] == counts[top]
    assert {1, 2, 3} <= set(data["kept_ids"])  # special tokens kept


def test_choose_by_coverage_and_specials():
    counts = np.array([0, 0, 50, 30, 15, 5, 0, 0])
    kept, n, cov = choose_kept(counts, specials=[7], coverage=0.8)
    assert kept == [2, 3, 7] and n == 3 and cov == pytest.approx(0.8)
    kept, n, cov = choose_kept(counts, specials=[], size=1)
    assert kept == [2] and cov == pytest.approx(0.5)


@pytest.fixture(scope="module")
def heads_dir(tmp_path_factory):
    return random_heads(tmp_path_factory.mktemp("h") / "heads", "2")


@pytest.mark.parametrize("n", [4, 12, 40])
def test_trimmed_spec_equals_ar(tiny_models, heads_dir, vocab_file, tmp_path, n):
    out = export_model(str(tiny_models["llama"]), tmp_path / "art",
                       ExportOptions(max_context=256, heads=str(heads_dir), topk=4, tree="10", vocab=str(vocab_file),
                                     vocab_size=n), progress=lambda *_: None)
    draft = load_artifact(out).draft
    assert draft.lm_head_rows == draft.vocab_trim.size >= n
    for prompt in PROMPTS[:3]:
        res = {}
        for mode in ("ar", "spec"):
            with SpecSession(out, SessionConfig(mode=mode)) as s:
                res[mode] = s.generate(s.codec.encode(prompt), 40)
        assert res["spec"].tokens == res["ar"].tokens


def test_vocab_without_the_base_choices(tiny_models, heads_dir, vocab_file, tmp_path):
    """A kept set that excludes every token the base generates: drafts never match, output unchanged."""
    base_only = export_model(str(tiny_models["llama"]), tmp_path / "full", ExportOptions(max_context=256),
                             progress=lambda *_: None)
    with SpecSession(base_only) as s:
        ids = s.codec.encode(PROMPTS[0])
        ar = s.generate(ids, 30).tokens
    data = json.loads(vocab_file.read_text())
    kept = [i for i in range(256) if i not in set(ar)][:20]
    data.update(kept_ids=kept, counts=[1] * len(kept), size=len(kept))
    bad = tmp_path / "v.json"
    bad.write_text(json.dumps(data))
    out = export_model(str(tiny_models["llama"]), tmp_path / "art",
                       ExportOptions(max_context=256, heads=str(heads_dir), topk=4, tree="10", vocab=str(bad)),
                       progress=lambda *_: None)
    with SpecSession(out, SessionConfig(draft="heads")) as s:  # the heads alone (lookup drafts would match)
        res = s.generate(ids, 30)
    assert res.tokens == ar and res.tau == 1.0


@pytest.mark.parametrize("edit,match", [
    ({"vocab_size": 300}, "vocabulary of 300"),
    ({"tokenizer": "0000000000000000"}, "another tokenizer"),
    ({"kept_ids": [1, 2, 999]}, "out of range"),
    ({"kept_ids": [1, 2], "counts": [1, 1]}, "fewer than the draft top-k 4"),
])
def test_bad_vocab_files(vocab_file, tmp_path, edit, match):
    data = json.loads(vocab_file.read_text())
    data.update(edit)
    p = tmp_path / "v.json"
    p.write_text(json.dumps(data))
    with pytest.raises(SpectrtError, match=match):
        load_vocab(p, 256, json.loads(vocab_file.read_text())["tokenizer"], topk=4)


def test_sweep_command(tiny_models, heads_dir, vocab_file, tmp_path):
    from spectrt.cli import main

    art = export_model(str(tiny_models["llama"]), tmp_path / "art",
                       ExportOptions(max_context=256, heads=str(heads_dir), topk=4, tree="8"), progress=lambda *_: None)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS[:2]))
    rc = main(["bench", str(art), "--prompts", str(prompts), "-n", "12", "--vocab-sweep", "4,12,full",
               "--vocab", str(vocab_file), "--json", str(tmp_path / "sweep.json"), "--plot", str(tmp_path / "s.png")])
    assert rc == 0
    rows = json.loads((tmp_path / "sweep.json").read_text())
    assert [r["N"] for r in rows][-1] == 256 and rows[0]["N"] >= 4
    assert all(r["mismatches"] == 0 for r in rows)
    assert rows[0]["lm_head_bytes"] < rows[-1]["lm_head_bytes"]
    assert (tmp_path / "s.png").stat().st_size > 1000
    trimmed = load_artifact(tmp_path / "art.vocab-sweep" / "vocab-4")
    assert trimmed.draft.vocab_trim.size == rows[0]["N"]
