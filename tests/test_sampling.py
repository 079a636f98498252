"""The sampling primitives that make speculative sampling exact: a counter-based random number per
(seed, position), the processed distribution, and inverse-CDF draws."""
from __future__ import annotations

import numpy as np
import pytest

from spectrt.runtime.errors import SpectrtError
from spectrt.runtime.sampling import SamplingConfig, probabilities, sample, uniform


def test_uniform_is_a_pure_function_of_seed_and_position():
    assert uniform(7, 3) == uniform(7, 3)
    us = [uniform(1, p) for p in range(20000)]
    assert all(0 <= u < 1 for u in us)
    assert abs(np.mean(us) - 0.5) < 0.01 and abs(np.var(us) - 1 / 12) < 0.005
    assert len({uniform(s, 0) for s in range(1000)}) == 1000  # seeds differ
    assert uniform(2**64 - 1, 10**9) < 1


def test_temperature_top_k_top_p():
    logits = np.array([1.0, 3.0, 2.0, 3.0, -1.0])
    p = probabilities(logits, SamplingConfig(temperature=1.0))
    ref = np.exp(logits - logits.max())
    assert np.allclose(p, ref / ref.sum())
    p = probabilities(logits, SamplingConfig(temperature=1.0, top_k=2))  # the two 3.0s
    assert np.allclose(p, [0, 0.5, 0, 0.5, 0])
    p = probabilities(logits, SamplingConfig(temperature=1.0, top_k=1))  # a tie at the cut keeps the lower id
    assert np.allclose(p, [0, 1, 0, 0, 0])
    full = ref / ref.sum()
    p = probabilities(logits, SamplingConfig(temperature=1.0, top_p=0.5))  # 0.41 + 0.41 >= 0.5: two tokens
    assert np.count_nonzero(p) == 2 and np.isclose(p.sum(), 1) and p[1] == p[3]
    p = probabilities(logits, SamplingConfig(temperature=1.0, top_p=full[1] - 1e-9))
    assert np.allclose(p, [0, 1, 0, 0, 0])
    cold = probabilities(logits, SamplingConfig(temperature=0.01))
    assert cold[1] == pytest.approx(0.5) and cold[3] == pytest.approx(0.5)


def test_top_p_beyond_the_first_candidates_is_exact():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=5000) * 0.01  # nearly flat: 256 candidates hold ~5 % of the mass
    p = probabilities(logits, SamplingConfig(temperature=1.0, top_p=0.9))
    order = np.lexsort((np.arange(5000), -logits))
    e = np.exp(logits - logits.max())
    full = e / e.sum()
    keep = order[:int(np.searchsorted(np.cumsum(full[order]), 0.9)) + 1]
    assert set(np.flatnonzero(p)) == set(keep.tolist()) and np.isclose(p.sum(), 1)


def test_sample_follows_the_distribution():
    logits = np.log(np.array([0.1, 0.0001, 0.6, 0.3]))
    cfg = SamplingConfig(temperature=1.0, seed=3)
    draws = np.bincount([sample(logits, cfg, pos) for pos in range(20000)], minlength=4) / 20000
    assert np.allclose(draws, np.exp(logits) / np.exp(logits).sum(), atol=0.015)
    assert sample(logits, SamplingConfig(temperature=1.0, top_k=1, seed=9), 5) == 2
    assert [sample(logits, cfg, p) for p in range(50)] == [sample(logits, cfg, p) for p in range(50)]


@pytest.mark.parametrize("kw, message", [({"temperature": -1}, "temperature"), ({"temperature": float("nan")}, "temperature"),
                                         ({"top_k": -1}, "top-k"), ({"top_p": 0}, "top-p"), ({"top_p": 1.5}, "top-p"),
                                         ({"seed": -1}, "seed")])
def test_bad_settings(kw, message):
    with pytest.raises(SpectrtError, match=message):
        SamplingConfig(**kw)


# ------------------------------------------------------------------------------------ exactness in decoding

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from spectrt.runtime.artifact import load_artifact  # noqa: E402
from spectrt.runtime.generate import Decoder  # noqa: E402
from spectrt.runtime.ort_runner import OrtBaseRunner  # noqa: E402
from spectrt.runtime.session import SessionConfig, SpecSession  # noqa: E402
from spectrt.runtime.tree import Tree  # noqa: E402
from tests.test_speculative import PROMPT, OracleDrafter, closed_tree, paths_strategy  # noqa: E402


@pytest.fixture(scope="module")
def llama(tiny_exports):
    return load_artifact(tiny_exports["llama"])


def decode(art, cfg, n, tree=None, reference=None, p=0.0, seed=0, eos=(), max_context=None):
    with OrtBaseRunner(art, max_q=max(16, tree.size if tree else 1), max_context=max_context) as base:
        drafter = OracleDrafter(base, reference, p, seed, tree) if tree is not None else None
        return Decoder(base, drafter, eos, prefill_chunk=16, sampling=cfg).generate(PROMPT, n)


def test_sampling_samples_and_temperature_zero_is_greedy(llama):
    greedy = decode(llama, SamplingConfig(), 40).tokens
    runs = [decode(llama, SamplingConfig(temperature=1.0, seed=s), 40).tokens for s in range(4)]
    assert len({tuple(r) for r in runs}) == 4 and all(r != greedy for r in runs)
    assert decode(llama, SamplingConfig(temperature=1.0, seed=2), 40).tokens == runs[2]  # seeded: reproducible
    assert decode(llama, SamplingConfig(temperature=1.0, top_k=1, seed=5), 40).tokens == greedy


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(paths=paths_strategy, p=st.floats(0.3, 1.0), seed=st.integers(0, 2**32), temperature=st.sampled_from([0.7, 1.0, 1.5]),
       top_k=st.sampled_from([0, 5, 40]), top_p=st.sampled_from([1.0, 0.9, 0.5]), n=st.integers(1, 90))
def test_speculative_sampling_equals_ar_sampling(llama, paths, p, seed, temperature, top_k, top_p, n):
    """Any tree, any drafter quality: seeded speculative sampling == seeded AR sampling, token for token."""
    cfg = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    ar = decode(llama, cfg, n).tokens
    reference = PROMPT + ar + [0] * 8  # the drafter's oracle: the AR sample itself
    tree = closed_tree(paths)
    spec = decode(llama, cfg, n, tree=tree, reference=reference, p=p, seed=seed)
    assert spec.tokens == ar
    if p == 1.0 and n > 8 and 0 in tree.children[0]:  # the oracle puts the truth at rank 0
        assert spec.tau > 1  # the oracle's nodes are accepted under sampling too


def test_sampled_acceptance_goes_through_non_first_children(llama):
    """The sampled token sits at rank 1 of a two-way tree: the walk must take the second child."""
    cfg = SamplingConfig(temperature=1.0, seed=11)
    ar = decode(llama, cfg, 30).tokens
    tree = Tree.from_paths([[0], [1], [1, 0], [1, 1]])

    class Rank1(OracleDrafter):  # the truth at rank 1, a wrong token at rank 0
        def fill(self, root, hidden, tree):
            tokens = super().fill(root, hidden, tree)
            for node in range(1, tree.size):
                i = self.seen + int(tree.depth[node])
                truth = self.ref[i] if i < len(self.ref) else 0
                tokens[node] = truth if tree.rank[node] == 1 else (truth + 7) % 256
            return tokens

    with OrtBaseRunner(llama, max_q=16) as base:
        spec = Decoder(base, Rank1(base, PROMPT + ar + [0] * 8, 1.0, 0, tree), prefill_chunk=16,
                       sampling=cfg).generate(PROMPT, 30)
    assert spec.tokens == ar and spec.tau > 2


def test_session_sampling_on_a_medusa_export(medusa_export):
    """Through SpecSession (the API and CLI path): seeded spec == seeded AR, and differs from greedy."""
    out = {}
    for mode in ("ar", "spec"):
        for temperature in (0.0, 0.8):
            cfg = SessionConfig(mode=mode, sampling=SamplingConfig(temperature=temperature, top_p=0.95, seed=3))
            with SpecSession(medusa_export, cfg) as s:
                out[mode, temperature] = s.generate(s.codec.encode("hello world"), 40).tokens
    assert out["ar", 0.8] == out["spec", 0.8] and out["ar", 0.0] == out["spec", 0.0]
    assert out["ar", 0.8] != out["ar", 0.0]


def test_cli_generate_and_bench_sample_exactly(medusa_export, tmp_path, capsys):
    import json

    from spectrt.cli import main

    texts = {}
    for mode in ("ar", "spec"):
        assert main(["generate", str(medusa_export), "-p", "hello", "-n", "24", "--mode", mode, "--temperature", "0.9",
                     "--top-p", "0.9", "--seed", "7", "--json"]) == 0
        texts[mode] = json.loads(capsys.readouterr().out)["text"]
    assert texts["ar"] == texts["spec"]
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "hello world"}\n{"prompt": "the quick brown fox", "category": "qa"}\n')
    out = tmp_path / "bench.json"
    assert main(["bench", str(medusa_export), "--prompts", str(prompts), "-n", "16", "--temperature", "1.0",
                 "--seed", "1", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["mismatches"] == 0 and report["sampling"]["temperature"] == 1.0
    assert "sampling: temperature 1.0" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--temperature", "-1"], "--temperature must be at least 0, not -1"),
    (["--top-p", "0"], "--top-p"),
    (["--top-k", "-2"], "--top-k must be at least 0, not -2"),
    (["--seed", "-1"], "--seed"),
])
def test_cli_bad_sampling_options(medusa_export, capsys, argv, message):
    from spectrt.cli import main

    assert main(["generate", str(medusa_export), "-p", "hi", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err


def test_typical_acceptance_is_opt_in_lossy_and_accepts_more(medusa_export, tmp_path, capsys):
    """Medusa's typical acceptance: more tokens per step than exact sampling on the same drafts, reproducible
    for a seed; refused without sampling; bench labels it lossy and does not fail on its mismatches."""
    from spectrt.cli import main

    exact, typical = SamplingConfig(temperature=1.0, seed=2), SamplingConfig(temperature=1.0, seed=2, typical=True)
    res = {}
    for name, cfg in (("exact", exact), ("typical", typical), ("again", typical)):
        with SpecSession(medusa_export, SessionConfig(mode="spec", sampling=cfg)) as s:
            res[name] = s.generate(s.codec.encode("hello world"), 60)
    assert res["typical"].tau > res["exact"].tau and res["typical"].tokens == res["again"].tokens
    with pytest.raises(SpectrtError, match="typical acceptance needs sampling"):
        SamplingConfig(typical=True)
    assert main(["generate", str(medusa_export), "-p", "hi", "--typical"]) == 2
    capsys.readouterr()
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "hello world"}\n{"prompt": "the quick brown fox"}\n')
    assert main(["bench", str(medusa_export), "--prompts", str(prompts), "-n", "16", "--temperature", "1.0",
                 "--typical"]) == 0
    assert "typical acceptance: LOSSY" in capsys.readouterr().out


def test_generate_takes_a_messages_json(medusa_export, tmp_path, capsys):
    """`generate --messages FILE` renders the conversation with the chat template, like the API does."""
    import json

    from spectrt.cli import main
    from spectrt.runtime.api import load

    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"}]
    f = tmp_path / "m.json"
    f.write_text(json.dumps({"messages": chat}))
    assert main(["generate", str(medusa_export), "--messages", str(f), "-n", "12", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    with load(medusa_export) as model:
        assert out["text"] == model.generate(chat, 12).text
    f.write_text("[not json")
    assert main(["generate", str(medusa_export), "--messages", str(f)]) == 2
    assert "cannot read a messages JSON" in capsys.readouterr().err
    assert main(["generate", str(medusa_export), "--messages", str(f), "-p", "x"]) == 2
