"""Corpus drafting: the n-gram table (counts, fallback, ties, packing limits, file checks), the chain drafter,
exactness on a tiny model, and the table travelling through export, manifest, session and CLI."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from spectrt.runtime.artifact import load_artifact
from spectrt.runtime.corpus import CorpusDrafter, NgramTable, max_orders
from spectrt.runtime.drafters import DRAFT_SOURCES, MergedDrafter, default_draft
from spectrt.runtime.errors import ArtifactError, SpectrtError
from spectrt.runtime.generate import Decoder
from spectrt.runtime.lookup import LookupDrafter
from spectrt.runtime.ort_runner import OrtBaseRunner
from tests.test_speculative import PROMPT

H = np.zeros(4, np.float32)  # a hidden state the corpus drafter never reads


# ----------------------------------------------------------------------------- the table

def test_counts_longest_suffix_and_fallback():
    t = NgramTable.from_sequences([[1, 2, 3, 1, 2, 4], [1, 2, 3], [7, 2, 4]], vocab=10, orders=2, min_total=1)
    assert t.successor([1, 2]) == (3, 2 / 3)  # (1, 2) -> 3 twice, -> 4 once
    assert t.successor([7, 2]) == (4, 1.0)  # the longer n-gram wins over (2,) -> 3 or 4
    assert t.successor([9, 2]) == (3, 2 / 4)  # (9, 2) unseen: (2,) -> 3 x2, 4 x2; the tie goes to the smaller id
    assert t.successor([5]) is None and t.successor([]) is None
    assert t.tokens == 12 and t.orders == 2


def test_min_total_drops_rare_ngrams():
    t = NgramTable.from_sequences([[1, 2, 3, 1, 2, 3, 5, 6]], vocab=10, orders=2, min_total=2)
    assert t.successor([5]) is None  # (5,) -> 6 seen once
    assert t.successor([3, 1]) == (2, 1.0)  # seen once as a 2-gram: dropped; (1,) -> 2 twice
    assert t.successor([2]) == (3, 1.0)


def test_orders_capped_by_the_key_width():
    assert max_orders(49152) == 4 and max_orders(65536) == 4 and max_orders(128256) == 3 and max_orders(2) == 64
    big = NgramTable.from_sequences([[128255, 0, 128255, 0, 1] * 3], vocab=128256, orders=8)
    assert big.orders == 3 and big.successor([1, 128255, 0]) == (128255, 1.0)  # large ids pack exactly
    with pytest.raises(SpectrtError, match="outside the vocabulary"):
        NgramTable.from_sequences([[1, 10]], vocab=10)
    with pytest.raises(SpectrtError, match="must be >= 1"):
        NgramTable.from_sequences([[1, 2]], vocab=10, min_total=0)


def test_save_load_roundtrip_and_checks(tmp_path):
    t = NgramTable.from_sequences([[1, 2, 3, 1, 2, 3]] * 2, vocab=10, source="unit test")
    path = tmp_path / "t.npz"
    t.save(path)
    u = NgramTable.load(path, vocab=10)
    assert (u.entries, u.tokens, u.source, u.orders) == (t.entries, 12, "unit test", t.orders)
    assert u.successor([1, 2]) == t.successor([1, 2]) == (3, 1.0)
    with pytest.raises(ArtifactError, match="vocabulary of 10 tokens; the model has 11"):
        NgramTable.load(path, vocab=11)
    (tmp_path / "junk.npz").write_text("not a table")
    with pytest.raises(ArtifactError, match="not an n-gram table"):
        NgramTable.load(tmp_path / "junk.npz")
    with np.load(path) as z:
        arrays = dict(z)
    arrays["keys1"] = arrays["keys1"][::-1].copy()  # unsorted keys: binary search would lie
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(ArtifactError, match="order 1 is damaged"):
        NgramTable.load(tmp_path / "bad.npz")


# ----------------------------------------------------------------------------- the drafter

def test_chain_follows_the_table_until_unlikely():
    t = NgramTable.from_sequences([[1, 2, 3, 4, 5], [1, 2, 3, 4, 6], [1, 2, 3, 4, 6]], vocab=10, orders=2, min_total=1)
    d = CorpusDrafter(t, max_tokens=8, min_prob=0.5)
    d.observe(H, np.array([9, 1]))
    draft = d.draft(2, H, 16)
    assert draft.tokens.tolist() == [2, 3, 4, 6] and draft.tree.parent.tolist() == [-1, 0, 1, 2]  # 6 at 2/3: kept
    assert CorpusDrafter(t, 8, min_prob=0.7).draft(2, H, 16).tokens.tolist() == [2, 3, 4]  # 2/3 < 0.7: stop
    assert d.draft(2, H, 3).tokens.tolist() == [2, 3, 4]  # the budget counts the root
    assert d.draft(8, H, 16).tree.size == 1  # nothing known after 8: the root alone
    d.rollback(1)
    assert d.history == [9]
    with pytest.raises(SpectrtError, match="rollback of 2 tokens"):
        d.rollback(2)
    one = CorpusDrafter(NgramTable.from_sequences([[1, 2, 1, 2]], vocab=10, orders=1, min_total=1))
    one.observe(H, np.array([7, 7, 7]))
    assert one.draft(1, H, 8).tokens.tolist() == [1, 2, 1, 2]  # orders 1: only the root is context
    with pytest.raises(SpectrtError, match="max_tokens"):
        CorpusDrafter(t, max_tokens=0)


def test_merged_order_follows_the_context_match():
    """Lookup's chain first after a match of 2+ tokens, the corpus chain first after a match of the root
    alone: the first slots hold the likelier path (no recheck when it is accepted)."""
    table = NgramTable.from_sequences([[5, 6, 7, 8], [9, 4, 4]] * 2, vocab=20, min_total=1)
    merged = MergedDrafter([LookupDrafter(max_tokens=2), CorpusDrafter(table, 2, 0.0)])
    merged.observe(H, np.array([1, 5, 9, 9, 3]))
    one = merged.draft(5, H, 16)  # lookup: only (5,) matched -> 9 9; corpus: 5 -> 6 7
    assert one.tokens.tolist() == [5, 6, 7, 9, 9] and one.tree.parent.tolist() == [-1, 0, 1, 0, 3]
    merged.observe(H, np.array([2, 5]))
    two = merged.draft(9, H, 16)  # lookup: (5, 9) matched -> 9 3; corpus: 9 -> 4 4
    assert two.tokens.tolist() == [9, 9, 3, 4, 4] and two.tree.parent.tolist() == [-1, 0, 1, 0, 3]


@pytest.fixture(scope="module")
def llama(tiny_exports):
    return load_artifact(tiny_exports["llama"])


def generate(art, prompt, n, drafter=None, max_context=None):
    q = max(16, drafter.max_nodes if drafter else 1)
    with OrtBaseRunner(art, max_q=q, max_context=max_context) as base:
        return Decoder(base, drafter, (), prefill_chunk=16).generate(prompt, n)


@pytest.mark.parametrize("ctx", [None, 70])
def test_corpus_drafts_equal_ar_and_accept(llama, ctx):
    """A table of the model's own earlier answers (a question asked again, as a server sees) drafts them:
    fewer steps than AR, the same tokens; merged with the lookup too."""
    earlier = generate(llama, PROMPT, 150).tokens
    table = NgramTable.from_sequences([earlier, generate(llama, [50] * 24, 150).tokens], llama.model.vocab, min_total=1)
    prompt = PROMPT
    ar = generate(llama, prompt, 100, max_context=ctx)
    for drafter in (CorpusDrafter(table), MergedDrafter([LookupDrafter(), CorpusDrafter(table, 6, 0.0)])):
        spec = generate(llama, prompt, 100, drafter, max_context=ctx)
        assert spec.tokens == ar.tokens and spec.stop_reason == ar.stop_reason
        assert spec.steps < ar.steps


# ----------------------------------------------------------------------------- export, session, CLI

@pytest.fixture(scope="module")
def table_file(tiny_exports, tmp_path_factory):
    art = load_artifact(tiny_exports["llama"])
    earlier = generate(art, [50] * 24, 150).tokens
    path = tmp_path_factory.mktemp("corpus") / "table.npz"
    NgramTable.from_sequences([earlier], art.model.vocab, min_total=1, source="tiny llama on [50] * 24").save(path)
    return path


@pytest.fixture(scope="module")
def corpus_export(tiny_models, table_file, tmp_path_factory):
    from spectrt.export.exporter import ExportOptions, export_model
    from tests.test_medusa_export import random_heads

    root = tmp_path_factory.mktemp("corpus-export")
    return export_model(str(tiny_models["llama"]), root / "art", ExportOptions(
        max_context=256, heads=str(random_heads(root / "heads", "2")), topk=4, tree="4", corpus=str(table_file),
        validate=False), progress=lambda *_: None)


def test_export_records_the_table(corpus_export, table_file):
    art = load_artifact(corpus_export, verify_hashes=True)
    c = art.corpus
    assert c is not None and c.file.path == "corpus.npz" and c.source == "tiny llama on [50] * 24"
    table = NgramTable.load(table_file)
    assert (c.entries, c.tokens, c.orders) == (table.entries, table.tokens, table.orders)
    assert default_draft(art) == "heads+lookup+corpus"  # GPUs: every source
    assert default_draft(art, cheap_rows=False) == "lookup+corpus"  # a CPU: the heads cost what they add
    assert set(DRAFT_SOURCES) >= {"corpus", "lookup+corpus", "heads+lookup+corpus"}


def test_session_default_draft_uses_the_table(corpus_export):
    from spectrt.runtime.session import SessionConfig, SpecSession

    with SpecSession(corpus_export, SessionConfig(mode="ar")) as s:
        ids = s.codec.encode("hello there")
        ar = s.generate(ids, 60)
    for draft in (None, "corpus", "heads+lookup+corpus"):
        with SpecSession(corpus_export, SessionConfig(draft=draft)) as s:
            assert s.mode == "spec" and s.draft == (draft or "lookup+corpus")  # the CPU default
            assert s.generate(ids, 60).tokens == ar.tokens


def test_missing_or_damaged_table(corpus_export, tiny_exports, tmp_path):
    from spectrt.runtime.session import SessionConfig, SpecSession

    with pytest.raises(SpectrtError, match="no corpus table in this export"):
        SpecSession(tiny_exports["llama"], SessionConfig(draft="lookup+corpus"))
    copy = tmp_path / "art"
    shutil.copytree(corpus_export, copy)
    (copy / "corpus.npz").unlink()
    with pytest.raises(ArtifactError, match="corpus.npz: missing"):
        load_artifact(copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["corpus"]["orders"] = 0
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="corpus.orders"):
        load_artifact(copy)


def tiny_vocab(tiny_models) -> int:
    return json.loads((tiny_models["llama"] / "config.json").read_text())["vocab_size"]


def test_export_refuses_bad_tables(tiny_models, tmp_path):
    from spectrt.export.exporter import ExportOptions, export_model

    other = tmp_path / "other.npz"
    NgramTable.from_sequences([[1, 2, 1, 2]], vocab=7).save(other)
    opts = dict(max_context=64, validate=False)
    with pytest.raises(SpectrtError, match="vocabulary of 7 tokens"):
        export_model(str(tiny_models["llama"]), tmp_path / "a", ExportOptions(corpus=str(other), **opts),
                     progress=lambda *_: None)
    assert not (tmp_path / "a").exists()
    empty = tmp_path / "empty.npz"
    NgramTable.from_sequences([[1, 2]], vocab=tiny_vocab(tiny_models)).save(empty)  # one bigram, seen once
    with pytest.raises(SpectrtError, match="table is empty"):
        export_model(str(tiny_models["llama"]), tmp_path / "e", ExportOptions(corpus=str(empty), **opts),
                     progress=lambda *_: None)
    with pytest.raises(SpectrtError, match="no such corpus table"):
        export_model(str(tiny_models["llama"]), tmp_path / "b", ExportOptions(corpus=str(tmp_path / "nope.npz"), **opts),
                     progress=lambda *_: None)
    with pytest.raises(SpectrtError, match="--no-corpus contradicts --corpus"):
        export_model(str(tiny_models["llama"]), tmp_path / "c", ExportOptions(corpus=str(other), no_corpus=True, **opts),
                     progress=lambda *_: None)


def test_cli_calibrate_corpus_then_bench(tiny_models, corpus_export, tmp_path, capsys):
    from spectrt.cli import main

    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("hello", "a b c", "count up")))
    out = tmp_path / "t.npz"
    code = main(["calibrate", "corpus", "-m", str(tiny_models["llama"]), "--prompts", str(prompts), "-o", str(out),
                 "--max-new-tokens", "24", "--min-total", "1", "--cache", str(tmp_path / "gen.jsonl")])
    printed = capsys.readouterr().out
    table = NgramTable.load(out)
    assert code == 0 and f"from {table.tokens} answer tokens" in printed, printed
    assert 3 <= table.tokens <= 72 and "3 prompts of p.jsonl" in table.source
    code = main(["bench", str(corpus_export), "--prompts", str(prompts), "-n", "16", "--draft", "heads+lookup,corpus"])
    printed = capsys.readouterr().out
    assert code == 0 and "spec:corpus" in printed and "mismatches vs AR: 0" in printed, printed


def test_cli_calibrations_exclude_prompts(tiny_models, tmp_path, capsys):
    """`calibrate corpus|vocab --exclude FILE`: the prompts of FILE are left out (e.g. the calibration prompts
    `calibrate tree` measures on); nothing left is an error before any model is loaded, and no output is written."""
    from spectrt.cli import main

    prompts, kept_out = tmp_path / "p.jsonl", tmp_path / "cal.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("hello", "a b c", "count up")))
    kept_out.write_text(json.dumps({"prompt": "a b c"}) + "\n")
    base = ["-m", str(tiny_models["llama"]), "--prompts", str(prompts), "--max-new-tokens", "16",
            "--cache", str(tmp_path / "gen.jsonl")]
    out = tmp_path / "t.npz"
    assert main(["calibrate", "corpus", *base, "-o", str(out), "--min-total", "1", "--exclude", str(kept_out)]) == 0
    assert "excluded 1 prompts found in" in capsys.readouterr().out
    assert "2 prompts of p.jsonl" in NgramTable.load(out).source
    vocab = tmp_path / "v.json"
    assert main(["calibrate", "vocab", *base, "-o", str(vocab), "--size", "8", "--exclude", str(kept_out)]) == 0
    assert "excluded 1 prompts" in capsys.readouterr().out and "greedy on 2 prompts" in json.loads(vocab.read_text())["source"]
    for sub, path in (("corpus", tmp_path / "none.npz"), ("vocab", tmp_path / "none.json")):
        assert main(["calibrate", sub, *base, "-o", str(path), "--exclude", str(prompts)]) == 2
        assert "0 prompts left after --exclude" in capsys.readouterr().err
        assert not path.exists()
