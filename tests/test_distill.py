"""Self-distillation on a tiny in-process Llama: prompts, generation cache, hidden states, training, CLI."""
from __future__ import annotations

import json

import pytest
import torch

from spectrt.calibration.distill import (DistillConfig, HiddenSet, compute_hidden, distill_samples, evaluate,
                                         split_samples, train_heads)
from spectrt.calibration.generations import encode_prompt, generate_responses, read_cache, model_fingerprint
from spectrt.calibration.prompts import load_prompts
from spectrt.export.medusa import MedusaConfig, MedusaHeads, load_medusa
from spectrt.runtime.errors import SpectrtError

VOCAB = 256
WORDS = ["<pad>", "<s>", "</s>", "<user>", "<assistant>"] + [f"w{i}" for i in range(VOCAB - 5)]


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="w0"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                  unk_token="w0")
    tok.chat_template = ("{% for m in messages %}<user> {{ m['content'] }} {% endfor %}"
                         "{% if add_generation_prompt %}<assistant> {% endif %}")
    return tok


@pytest.fixture(scope="module")
def tiny():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                         initializer_range=0.2)
    model = LlamaForCausalLM(config).eval()
    model.generation_config.eos_token_id = 2
    model.generation_config.pad_token_id = 0
    return model, _tokenizer()


def _prompts(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [" ".join(f"w{int(i)}" for i in torch.randint(0, VOCAB - 5, (int(torch.randint(2, 9, (1,), generator=g)),),
                                                           generator=g)) for _ in range(n)]


# ------------------------------------------------------------------------------------------ prompts

def test_load_prompts(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"id": 1, "prompt": "hello"}\n\n{"question_id": 2, "turns": ["first", "second"]}\n'
                 '{"prompt": "third"}\n')
    assert load_prompts(f) == ["hello", "first", "third"]
    assert load_prompts(f, limit=2) == ["hello", "first"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"text": "no prompt"}\n')
    with pytest.raises(SpectrtError, match=r"bad.jsonl:2: no 'prompt' or 'turns' field \(fields: text\)"):
        load_prompts(bad)
    bad.write_text('{"prompt": "ok"}\nnot json\n')
    with pytest.raises(SpectrtError, match="bad.jsonl:2: not valid JSON"):
        load_prompts(bad)
    bad.write_text('{"turns": []}\n')
    with pytest.raises(SpectrtError, match="non-empty list"):
        load_prompts(bad)
    bad.write_text("\n\n")
    with pytest.raises(SpectrtError, match="no prompts"):
        load_prompts(bad)
    with pytest.raises(SpectrtError, match="no such prompts file"):
        load_prompts(tmp_path / "missing.jsonl")


# ------------------------------------------------------------------------------------------ generations

def test_generation_cache_is_resumable(tiny, tmp_path, monkeypatch):
    model, tok = tiny
    calls = []
    real_generate = model.generate

    def counting_generate(*args, **kwargs):  # a spy: counts rows, runs the real generate
        calls.append(kwargs["input_ids"].shape[0])
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(model, "generate", counting_generate)
    cache = tmp_path / "gen.jsonl"
    prompts = _prompts(7)
    first = generate_responses(model, tok, prompts[:5], 12, cache, batch_size=2, progress=False)
    assert sum(calls) == 5 and len(calls) == 3
    assert len(cache.read_text().splitlines()) == 5
    for prompt, (pids, rids) in zip(prompts, first):
        assert pids == encode_prompt(tok, prompt) and pids[0] == 3 and pids[-1] == 4
        assert 1 <= len(rids) <= 12 and (len(rids) == 12 or rids[-1] == 2)
        assert 2 not in rids[:-1]  # cut at the first EOS

    calls.clear()
    again = generate_responses(model, tok, prompts[:5], 12, cache, batch_size=2, progress=False)
    assert calls == [] and again == first  # second call generates nothing new

    shorter = generate_responses(model, tok, prompts[:5], 5, cache, batch_size=2, progress=False)
    assert calls == [] and shorter == [(p, r[:5]) for p, r in first]  # greedy: a prefix of the longer run

    # a crash mid-append leaves a torn line: it is ignored, and the next batch still lands on its own line
    with cache.open("a") as f:
        f.write('{"model": "' + model_fingerprint(model) + '", "key": "abc", "prompt_ids": [1, 2')
    more = generate_responses(model, tok, prompts, 12, cache, batch_size=2, progress=False)
    assert sum(calls) == 2 and more[:5] == first
    assert len(read_cache(cache, model_fingerprint(model))) == 7

    # left-padded batches give the same greedy answers as one prompt at a time
    calls.clear()
    single = generate_responses(model, tok, prompts, 12, tmp_path / "single.jsonl", batch_size=1, progress=False)
    assert len(calls) == 7 and single == more


def test_generation_cache_is_per_model(tiny, tmp_path):
    from transformers import LlamaForCausalLM

    model, tok = tiny
    cache = tmp_path / "gen.jsonl"
    generate_responses(model, tok, _prompts(2), 6, cache, progress=False)
    torch.manual_seed(1)
    other = LlamaForCausalLM(model.config).eval()
    assert model_fingerprint(other) != model_fingerprint(model)
    assert read_cache(cache, model_fingerprint(other)) == {}


# ------------------------------------------------------------------------------------------ hidden states

def test_hidden_states_match_output_hidden_states(tiny):
    model, _ = tiny
    g = torch.Generator().manual_seed(3)
    samples = [(torch.randint(5, VOCAB, (p,), generator=g).tolist(), torch.randint(5, VOCAB, (r,), generator=g).tolist())
               for p, r in [(3, 5), (7, 1), (2, 9), (5, 4)]]
    hs = compute_hidden(model, samples, batch_tokens=20, progress=False)  # forces several padded batches
    assert hs.lengths == [5, 1, 9, 4] and len(hs) == 19 and hs.hidden.dtype == torch.float16
    start = 0
    for p, r in samples:
        with torch.no_grad():
            ref = model(input_ids=torch.tensor([p + r]), output_hidden_states=True).hidden_states[-1][0]
        rows = ref[len(p) - 1:len(p) - 1 + len(r)]
        assert torch.allclose(hs.hidden[start:start + len(r)].float(), rows, atol=2e-2, rtol=1e-2)
        assert hs.tokens[start:start + len(r)].tolist() == r
        start += len(r)


def test_targets_stay_inside_each_response():
    data = HiddenSet(torch.zeros(8, 4, dtype=torch.float16), torch.arange(8), [3, 1, 4])
    t = data.targets(2)
    # head k at row i predicts row i+k+1, only within the same sample
    assert t.tolist() == [[1, 2], [2, -1], [-1, -1], [-1, -1], [5, 6], [6, 7], [7, -1], [-1, -1]]


def test_split_is_seeded_and_disjoint():
    a = split_samples(40, 0.1, seed=3)
    assert a == split_samples(40, 0.1, seed=3) and a != split_samples(40, 0.1, seed=4)
    train, held = a
    assert len(held) == 4 and not set(train) & set(held) and sorted(train + held) == list(range(40))
    with pytest.raises(SpectrtError, match="at least 2 prompts"):
        split_samples(1, 0.1, 0)


# ------------------------------------------------------------------------------------------ training

def test_losses_use_the_right_targets(tiny):
    """Head k at row i: lm target tokens[i+k+1]; teacher = the base's distribution at row i+k+1."""
    from spectrt.calibration.distill import _head_loss

    model, _ = tiny
    g = torch.Generator().manual_seed(5)
    samples = [([3, 9, 4], torch.randint(5, VOCAB, (6,), generator=g).tolist()),
               ([3, 11, 12, 4], torch.randint(5, VOCAB, (4,), generator=g).tolist())]
    data = compute_hidden(model, samples, progress=False)
    w = model.get_output_embeddings().weight.detach()
    heads = MedusaHeads(MedusaConfig(2, 1, 64, VOCAB, "2"))  # untrained: features == hidden
    rows = torch.arange(len(data))
    tidx = data.targets(2)
    logp = torch.log_softmax(data.hidden.float() @ w.T, -1)  # base log-probs per row
    lm, kl = [], []
    for k in range(2):
        valid = tidx[:, k] >= 0
        src, dst = rows[valid], tidx[valid, k]
        assert torch.equal(dst, src + k + 1)
        lm.append(-logp[src, data.tokens[dst]].mean())
        kl.append((logp[dst].exp() * (logp[dst] - logp[src])).sum(-1).mean())
    for loss, expected in (("lm", lm), ("teacher", kl)):
        got = _head_loss(heads, data.hidden.float(), tidx, data, w, loss, decay=0.5)
        want = (expected[0] + 0.5 * expected[1]) / 1.5
        assert torch.allclose(got, want, atol=1e-4), (loss, got, want)
        # the bf16 LM-head matmul of fast training: the same loss to bf16 precision
        low = _head_loss(heads, data.hidden.float(), tidx, data, w.bfloat16(), loss, decay=0.5)
        assert low.dtype == torch.float32 and torch.allclose(low, want, rtol=2e-2, atol=2e-2), (loss, low, want)


def test_lm_head_dtype_follows_the_config():
    from spectrt.calibration.distill import lm_head_dtype, native_bf16

    assert lm_head_dtype(DistillConfig(bf16=True)) == torch.bfloat16
    assert lm_head_dtype(DistillConfig(bf16=False)) == torch.float32
    assert lm_head_dtype(DistillConfig()) == (torch.bfloat16 if native_bf16() else torch.float32)


def _pattern_samples(n, length=24, seed=0):
    """Responses that cycle through 16 tokens: the token two ahead is a function of the current one."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        start = int(torch.randint(0, 16, (1,), generator=g))
        prompt = [3] + torch.randint(5, VOCAB, (4,), generator=g).tolist() + [4]
        out.append((prompt, [5 + 7 * ((start + i) % 16) for i in range(length)]))
    return out


@pytest.mark.parametrize("loss,bf16", [("lm", False), ("teacher", False), ("lm", True)])
def test_training_learns_a_pattern(tiny, loss, bf16):
    model, _ = tiny
    samples = _pattern_samples(48)
    train_idx, held_idx = split_samples(len(samples), 0.25, 0)
    train = compute_hidden(model, [samples[i] for i in train_idx], progress=False)
    held = compute_hidden(model, [samples[i] for i in held_idx], progress=False)
    lm_weight = model.get_output_embeddings().weight.detach()
    heads = MedusaHeads(MedusaConfig(2, 1, 64, VOCAB, "2"))
    before = evaluate(heads, held, lm_weight)
    cfg = DistillConfig(heads=2, epochs=6, lr=3e-2, batch_size=64, loss=loss, seed=0, bf16=bf16)
    history = train_heads(heads, train, lm_weight, cfg, progress=False, heldout=held, log=lambda *_: None)
    after = evaluate(heads, held, lm_weight)
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    if loss == "lm":  # the lm loss directly targets the counting pattern
        assert after[0]["top1"] > before[0]["top1"] + 0.3, (before, after)
        assert after[0]["top5"] >= after[0]["top1"]
    else:  # the teacher is the random base itself: the heads learn to match it two/three tokens ahead
        assert history[-1]["train_loss"] < 0.8 * history[0]["train_loss"]


def test_distill_samples_writes_loadable_heads(tiny, tmp_path):
    model, _ = tiny
    samples = _pattern_samples(16, length=10)
    out = tmp_path / "out" / "heads"
    logs = []
    cfg = DistillConfig(heads=3, epochs=1, batch_size=64, holdout=0.25, cache_dir=str(tmp_path / "cache"), half=True)
    report = distill_samples(model, samples, out, cfg, "tiny", progress=False, log=logs.append)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "medusa_lm_head.safetensors", "report.json"]
    assert [p.name for p in out.parent.iterdir()] == ["heads"]  # nothing half-written left around
    assert out.stat().st_mode & 0o755 == 0o755  # not the 0700 of a temp dir: shipped as package data
    assert all(p.stat().st_mode & 0o644 == 0o644 for p in out.iterdir())
    heads = load_medusa(out)
    assert heads.config.num_heads == 3 and heads.config.version == "2" and heads.config.vocab_size == VOCAB
    assert heads.config.base_model_name_or_path == "tiny"
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk == json.loads(json.dumps(report))
    assert [h["head"] for h in on_disk["heads"]] == [0, 1, 2] and on_disk["heldout"]["prompts"] == 4
    assert all(0 <= h["top1"] <= h["top5"] <= 1 for h in on_disk["heads"])
    # the second run reuses the cached hidden states and replaces the heads in place
    distill_samples(model, samples, out, cfg, "tiny", progress=False, log=logs.append)
    assert any("hidden states: cached" in line for line in logs)
    assert [p.name for p in out.parent.iterdir()] == ["heads"]


def test_cli_end_to_end(tiny, tmp_path, capsys):
    from spectrt.cli import main

    model, tok = tiny
    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in _prompts(6)))
    out = tmp_path / "heads"
    argv = ["distill", "-m", str(model_dir), "--prompts", str(prompts), "-o", str(out), "--heads", "2",
            "--max-new-tokens", "8", "--epochs", "1", "--cache", str(tmp_path / "cache"), "--holdout", "0.3",
            "--threads", "1", "-q"]
    assert main(argv) == 0
    assert load_medusa(out).config.num_heads == 2
    assert "held-out accuracy" in capsys.readouterr().out
    assert json.loads((out / "report.json").read_text())["config"]["max_new_tokens"] == 8

    assert main(argv[:4] + [str(tmp_path / "missing.jsonl")] + argv[5:]) == 2
    assert "no such prompts file" in capsys.readouterr().err
    assert main(argv + ["--loss", "teacher", "--heads", "0"]) == 2
    assert "--heads must be at least 1" in capsys.readouterr().err
    kept_out = tmp_path / "calibration.jsonl"
    kept_out.write_text(json.dumps({"prompt": _prompts(6)[0]}) + "\n")
    assert main(argv + ["--exclude", str(kept_out)]) == 0
    assert "excluded 1 prompts" in capsys.readouterr().out
    assert json.loads((out / "report.json").read_text())["train"]["prompts"] + \
        json.loads((out / "report.json").read_text())["heldout"]["prompts"] == 5
    assert main(argv + ["--exclude", str(prompts)]) == 2
    assert "0 prompts left after --exclude" in capsys.readouterr().err
    assert main(argv + ["--train-vocab", "8"]) == 2  # no ranking for a model that is not built in
    assert "no built-in VocabTrim ranking" in capsys.readouterr().err
    ranking = tmp_path / "vocab.json"
    ids = list(range(5, VOCAB))
    ranking.write_text(json.dumps({"format": "spectrt-vocabtrim/1", "vocab_size": VOCAB, "kept_ids": ids,
                                   "counts": [1] * len(ids), "special_ids": [], "generated_tokens": len(ids)}))
    assert main(argv + ["--train-vocab", "64", "--vocab", str(ranking)]) == 0
    assert json.loads((out / "report.json").read_text())["train_vocab"] == {"size": 64, "ranking": str(ranking)}
    extra = tmp_path / "extra.jsonl"
    extra.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in _prompts(3, seed=5)))
    assert main(argv + ["--prompts", str(extra)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["train"]["prompts"] + report["heldout"]["prompts"] == 9


def test_response_rows_of_the_shared_cache_equal_compute_hidden(tiny, tmp_path):
    """Medusa/Hydra rows sliced from the whole-sequence cache (also Hydra++'s) are the rows compute_hidden
    makes for the responses alone; a second call is a cache hit."""
    from spectrt.calibration.distill import response_rows, sequence_hidden

    model, _ = tiny
    samples = _pattern_samples(5, length=7) + [([3], [9, 10, 11])]  # a one-token prompt too
    direct = compute_hidden(model, samples, progress=False)
    logs = []
    full = sequence_hidden(model, samples, tmp_path, "fp", 4096, progress=False, log=logs.append)
    assert full.lengths == [len(p) - 1 + len(r) for p, r in samples]
    rows = response_rows(full, samples)
    assert rows.lengths == direct.lengths and torch.equal(rows.tokens, direct.tokens)
    torch.testing.assert_close(rows.hidden.float(), direct.hidden.float(), atol=2e-3, rtol=0)
    again = sequence_hidden(model, samples, tmp_path, "fp", 4096, progress=False, log=logs.append)
    assert any("cached" in m for m in logs) and torch.equal(again.hidden, full.hidden)


def test_hidden_cache_reuses_the_samples_an_earlier_run_computed(tiny, tmp_path, monkeypatch):
    """Samples appended to an earlier run's: its cache serves the shared prefix, only the new ones are computed,
    and the result equals a computation from scratch."""
    from spectrt.calibration import distill as distill_mod

    model, _ = tiny
    first, more = _pattern_samples(4, length=6), _pattern_samples(3, length=5, seed=1)
    logs = []
    distill_mod.cached_hidden(model, first, tmp_path, "fp", 4096, progress=False, log=logs.append)
    computed = []
    real = distill_mod.compute_hidden
    monkeypatch.setattr(distill_mod, "compute_hidden", lambda m, s, *a, **k: computed.append(len(s)) or real(m, s, *a, **k))
    both = distill_mod.cached_hidden(model, first + more, tmp_path, "fp", 4096, progress=False, log=logs.append)
    assert computed == [3] and "the first 4 of 7 samples cached" in logs[-1]
    scratch = real(model, first + more, progress=False)
    assert both.lengths == scratch.lengths and torch.equal(both.tokens, scratch.tokens)
    torch.testing.assert_close(both.hidden.float(), scratch.hidden.float(), atol=2e-3, rtol=0)
    again = distill_mod.cached_hidden(model, first + more, tmp_path, "fp", 4096, progress=False, log=logs.append)
    assert computed == [3] and torch.equal(again.hidden, both.hidden)
    other = distill_mod.cached_hidden(model, more + first, tmp_path, "fp", 4096, progress=False, log=logs.append)
    assert computed == [3, 7] and other.lengths == scratch.lengths[4:] + scratch.lengths[:4]  # not a prefix


@pytest.mark.parametrize("arch", ["medusa", "hydra++"])
def test_appending_prompts_computes_only_their_hidden_states(tiny, tmp_path, monkeypatch, arch):
    """distill's hidden states are one cache over every sample in order, split afterwards: a second run with
    more samples appended reuses the first run's cache (its seeded split reshuffles every sample) and
    computes only the new ones."""
    from spectrt.calibration import distill as distill_mod
    from spectrt.calibration.distill_hydra import distill_hydra_samples
    from spectrt.commands.distill import config_from_options

    model, _ = tiny
    computed = []
    real = distill_mod.compute_hidden
    monkeypatch.setattr(distill_mod, "compute_hidden", lambda m, s, *a, **k: computed.append(len(s)) or real(m, s, *a, **k))
    first, more = _pattern_samples(8, length=6), _pattern_samples(3, length=5, seed=1)
    run = distill_samples if arch == "medusa" else distill_hydra_samples
    for samples in (first, first + more):
        cfg = config_from_options(arch=arch, heads=2, epochs=1, holdout=0.25, cache=str(tmp_path / "cache"))
        run(model, samples, tmp_path / f"heads{len(samples)}", cfg, progress=False, log=lambda *_: None)
    assert computed == [8, 3]


def test_select_prompts_reads_several_files_in_order(tmp_path):
    from spectrt.calibration.prompts import select_prompts

    a, b, out = tmp_path / "a.jsonl", tmp_path / "b.jsonl", tmp_path / "out.jsonl"
    a.write_text('{"prompt": "one"}\n{"prompt": "two"}\n')
    b.write_text('{"prompt": "three"}\n')
    out.write_text('{"prompt": "two"}\n')
    assert select_prompts([a, b]) == (["one", "two", "three"], "")
    assert select_prompts([a, b], limit=2)[0] == ["one", "two"]
    assert select_prompts([a, b], exclude=[out])[0] == ["one", "three"]
    assert select_prompts(a)[0] == ["one", "two"]
    with pytest.raises(SpectrtError, match="limit must be at least 1"):
        select_prompts([a, b], limit=0)


def test_training_on_a_trimmed_vocabulary(tiny, tmp_path):
    """--train-vocab: the heads learn over the kept rows of the LM head only; a target outside them counts
    for nothing in the loss and as a miss in the accuracy (as a trimmed export drafts)."""
    from spectrt.calibration.distill import _head_loss

    model, _ = tiny
    samples = _pattern_samples(48)
    pattern = [5 + 7 * j for j in range(16)]
    dropped = pattern[3]
    kept = torch.tensor([t for t in pattern if t != dropped] + [1, 2, 200, 201])
    train_idx, held_idx = split_samples(len(samples), 0.25, 0)
    train = compute_hidden(model, [samples[i] for i in train_idx], progress=False)
    held = compute_hidden(model, [samples[i] for i in held_idx], progress=False)
    lm_weight = model.get_output_embeddings().weight.detach()
    heads = MedusaHeads(MedusaConfig(2, 1, 64, VOCAB, "2"))
    # the loss over the kept rows: cross-entropy of the trimmed logits, rows whose target was dropped ignored
    remap = torch.full((VOCAB,), -1, dtype=torch.long)
    remap[kept] = torch.arange(len(kept))
    tidx = train.targets(2)
    got = _head_loss(heads, train.hidden.float(), tidx, train, lm_weight[kept], "lm", 1.0, remap)
    feats = heads.features(train.hidden.float())
    terms = [[], []]
    for i in range(len(train)):
        for k in range(2):
            j = int(tidx[i, k])
            if j >= 0 and int(train.tokens[j]) != dropped:
                logp = torch.log_softmax(feats[i, k] @ lm_weight[kept].T, -1)
                terms[k].append(-logp[int(remap[train.tokens[j]])])
    want = sum(torch.stack(t).mean() for t in terms) / 2
    assert torch.allclose(got, want, atol=1e-4), (got, want)

    cfg = DistillConfig(heads=2, epochs=6, lr=3e-2, batch_size=64, seed=0, train_vocab=len(kept))
    before = evaluate(heads, held, lm_weight[kept], kept=kept)
    train_heads(heads, train, lm_weight[kept], cfg, progress=False, heldout=held, log=lambda *_: None, kept=kept)
    after = evaluate(heads, held, lm_weight[kept], kept=kept)
    assert after[0]["top1"] > before[0]["top1"] + 0.3, (before, after)
    gold = held.tokens[held.targets(2)[:, 0].clamp(min=0)][held.targets(2)[:, 0] >= 0]
    assert after[0]["top1"] <= float((gold != dropped).float().mean()) + 1e-6  # the dropped token is never drafted


def test_train_vocab_is_checked(tiny, tmp_path):
    from spectrt.calibration.config import HydraDistillConfig
    from spectrt.calibration.distill import train_vocab_ids

    model, tok = tiny
    with pytest.raises(SpectrtError, match="--lm-head shared"):
        DistillConfig(train_vocab=8, lm_head="own").validate()
    with pytest.raises(SpectrtError, match="at least 1"):
        DistillConfig(train_vocab=0).validate()
    with pytest.raises(SpectrtError, match="--lm-head shared"):
        HydraDistillConfig(arch="hydra++", train_vocab=8, lm_head="own").validate()
    with pytest.raises(SpectrtError, match="needs a VocabTrim ranking"):
        train_vocab_ids(model, tok, DistillConfig(train_vocab=8))
    bad = tmp_path / "v.json"
    bad.write_text('{"format": "spectrt-vocabtrim/1", "vocab_size": 999, "kept_ids": [1, 2]}')
    with pytest.raises(SpectrtError, match="vocabulary of 999"):
        train_vocab_ids(model, tok, DistillConfig(train_vocab=8, vocab=str(bad)))
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"format": "spectrt-vocabtrim/1", "vocab_size": VOCAB, "kept_ids": [7, 5, 9, 2],
                                "counts": [9, 7, 3, 0], "special_ids": [2], "generated_tokens": 19}))
    assert train_vocab_ids(model, tok, DistillConfig(train_vocab=2, vocab=str(good))).tolist() == [7, 5, 2]
    with pytest.raises(SpectrtError, match="token ids must lie"):
        distill_samples(model, _pattern_samples(8), tmp_path / "o", DistillConfig(heads=1, epochs=1),
                        progress=False, log=lambda *_: None, kept=[VOCAB + 3])


def test_copy_tasks_are_built_from_training_answers_only(tiny, tmp_path, monkeypatch):
    """--copy-tasks: copy-style prompts around the base's answers to training-split prompts (never held-out
    ones), answered by the base through the shared cache, trained on only."""
    from spectrt.calibration import distill as d

    model, tok = tiny
    monkeypatch.setattr(d, "COPY_MIN_TOKENS", 3)
    cfg = DistillConfig(heads=2, epochs=1, batch_size=64, holdout=0.25, max_new_tokens=12, copy_tasks=5,
                        cache_dir=str(tmp_path / "cache"))
    prompts = _prompts(8)
    samples, _, _ = d.base_responses(model, tok, prompts, cfg, progress=False, log=lambda *_: None)
    extra = d.copy_task_responses(model, tok, samples, cfg, progress=False, log=lambda *_: None)
    assert len(extra) == 5 and all(r for _, r in extra)
    train_idx, held_idx = split_samples(len(samples), cfg.holdout, cfg.seed)
    texts = [tok.decode(samples[i][1], skip_special_tokens=True).strip() for i in range(len(samples))]
    for ids, _ in extra:  # each prompt wraps a training answer, never a held-out one
        prompt = tok.decode(ids, skip_special_tokens=True)
        assert any(texts[i] in prompt for i in train_idx if len(samples[i][1]) >= 3)
        assert not any(texts[i] and texts[i] in prompt and texts[i] not in [texts[j] for j in train_idx]
                       for i in held_idx)
    # cached: a second call generates nothing new
    cache = next((tmp_path / "cache").glob("generations-*.jsonl"))
    size = cache.stat().st_size
    assert d.copy_task_responses(model, tok, samples, cfg, progress=False, log=lambda *_: None) == extra
    assert cache.stat().st_size == size
    report = d.distill(model, tok, prompts, tmp_path / "heads", cfg, progress=False, log=lambda *_: None)
    assert report["train"]["copy_tasks"] == 5 and report["heldout"]["prompts"] == 2
    assert d.copy_task_responses(model, tok, samples, DistillConfig(copy_tasks=0), log=lambda *_: None) == []
    with pytest.raises(SpectrtError, match="--copy-tasks must be at least 0"):
        DistillConfig(copy_tasks=-1).validate()
