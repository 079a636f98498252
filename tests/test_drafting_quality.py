"""Drafting that works, not only drafting that is exact: speculative == AR holds for any drafter, so it cannot
catch a broken one. A tiny Llama follows a deterministic pattern (a cycle of tokens), Medusa, Hydra and
Hydra++ heads are distilled on it with spectrt's own distillation, exported, and every drafter must then
accept well over one token per step; oracle drafters accept through rank > 0 nodes of the real drafters;
a calibrated tree must deliver the tau its calibration expected."""
from __future__ import annotations

import numpy as np
import pytest

from spectrt.runtime.artifact import load_artifact
from spectrt.runtime.corpus import NgramTable
from spectrt.runtime.generate import Decoder
from spectrt.runtime.ort_runner import OrtBaseRunner
from spectrt.runtime.session import SessionConfig, SpecSession
from spectrt.runtime.tree import Tree

torch = pytest.importorskip("torch")

CYCLE = [int(t) for t in np.random.default_rng(7).permutation(np.arange(4, 256))[:24]]  # token -> the next one
HEADS, TOPK, TREE = 3, 4, "8"
PROMPT_LEN, NEW = 16, 64
MIN_TAU = 1.5  # "well over 1"; working drafters reach 2.5-4 here, a broken one ~1


def cycle(start: int, n: int) -> list[int]:
    return [CYCLE[(start + i) % len(CYCLE)] for i in range(n)]


def patterned_base(path):
    """A 2-layer Llama that continues CYCLE from any of its tokens, by construction (no training): attention
    and MLP outputs are zero, so the final hidden state is the current token's (normalised) embedding, and
    the untied LM head's row for the next token is that embedding."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.conftest import _tokenizer

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=3, pad_token_id=1)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        emb = model.model.embed_tokens.weight
        emb.normal_(0, 1)
        model.lm_head.weight.zero_()
        for i, t in enumerate(CYCLE):
            model.lm_head.weight[CYCLE[(i + 1) % len(CYCLE)]] = emb[t]
    model.generation_config.eos_token_id = 3
    model.save_pretrained(path)
    _tokenizer().save_pretrained(path)
    return model


def base_answers(model) -> list[tuple[list[int], list[int]]]:
    """(prompt, greedy continuation) of the base for a cycle prompt from every token of the pattern."""
    samples = []
    for s in range(len(CYCLE)):
        prompt = torch.tensor([cycle(s, 8)])
        with torch.no_grad():
            out = model.generate(prompt, max_new_tokens=32, do_sample=False, pad_token_id=1)
        samples.append((prompt[0].tolist(), out[0, 8:].tolist()))
    assert samples[0][1] == cycle(8, 32), "the base does not follow the pattern"
    return samples


def distill_all(model, root, samples) -> dict:
    """Medusa, Hydra and Hydra++ heads distilled on the base's greedy continuations of cycle prompts."""
    from spectrt.calibration.config import DistillConfig, HydraDistillConfig
    from spectrt.calibration.distill import distill_samples
    from spectrt.calibration.distill_hydra import distill_hydra_samples

    common = dict(heads=HEADS, epochs=4, lr=1e-2, batch_size=64, holdout=0.1, cache_dir=str(root / "cache"),
                  half=False, bf16=False)
    quiet = dict(progress=False, log=lambda *_: None)
    out = {"medusa": root / "medusa", "hydra": root / "hydra", "hydra++": root / "hydra++"}
    distill_samples(model, samples, out["medusa"], DistillConfig(layers=1, **common), **quiet)
    distill_hydra_samples(model, samples, out["hydra"], HydraDistillConfig(arch="hydra", layers=1, **common), **quiet)
    distill_hydra_samples(model, samples, out["hydra++"], HydraDistillConfig(arch="hydra++", layers=1, **common),
                          **quiet)
    return out


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """kind -> export directory of the patterned base with its distilled heads (top-4, an 8-node tree)."""
    import functools

    from spectrt.export import exporter

    root = tmp_path_factory.mktemp("patterned")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: one thread is ~10x faster than two on a busy 2-core machine
    try:
        model = patterned_base(root / "base")
        samples = base_answers(model)
        heads = distill_all(model, root, samples)
        # corpus drafting's table: the base's answers (half of them: the pattern is still covered)
        NgramTable.from_sequences([a for _, a in samples[::2]], 256).save(root / "corpus.npz")
        heads["medusa+corpus"] = heads["medusa"]
        with pytest.MonkeyPatch.context() as mp:  # golden tokens are not what these tests are about: 2, not 32
            mp.setattr(exporter, "make_golden", functools.partial(exporter.make_golden, max_new_tokens=2))
            return {kind: exporter.export_model(str(root / "base"), root / f"export-{kind}", exporter.ExportOptions(
                        max_context=256, heads=str(h), topk=TOPK, tree=TREE, validate=False,
                        corpus=str(root / "corpus.npz") if "corpus" in kind else None), progress=lambda *_: None)
                    for kind, h in heads.items()}
    finally:
        torch.set_num_threads(threads)


def generate(export, **config):
    with SpecSession(export, SessionConfig(**config)) as s:
        return s.generate(cycle(3, PROMPT_LEN), NEW)


@pytest.fixture(scope="module")
def reference(exports):
    res = generate(exports["medusa"], mode="ar")
    assert res.tokens == cycle(3 + PROMPT_LEN, NEW)
    return res.tokens


def _dynamic():
    from spectrt.runtime import tree

    if not hasattr(tree, "TREE_DYNAMIC"):
        pytest.skip("this runtime has no dynamic trees")
    return tree.TREE_DYNAMIC


@pytest.mark.parametrize("kind,draft,dynamic", [
    ("medusa", "heads", False), ("hydra", "heads", False), ("hydra++", "heads", False),
    ("medusa", "lookup", False), ("medusa", "heads+lookup", False),
    ("medusa+corpus", "corpus", False), ("medusa+corpus", "heads+lookup+corpus", True),
    ("medusa", "heads", True), ("hydra", "heads", True), ("hydra++", "heads", True)])
def test_drafter_accepts_well_over_one_token(exports, reference, kind, draft, dynamic):
    config = {"draft": draft}
    if dynamic:
        config.update(tree=_dynamic(), tree_nodes=8)
    res = generate(exports[kind], **config)
    assert res.tokens == reference
    assert res.tau > MIN_TAU, f"{kind} {draft}{' dynamic' if dynamic else ''}: tau {res.tau:.2f}"


# ------------------------------------------------------------------------- oracles through rank > 0 nodes

RANKS = (1, 2, 1)  # the base's token sits at these ranks of heads 0, 1, 2; every rank-0 guess is wrong
ORACLE_TREE = Tree.from_paths([[0], [1], [2], [1, 0], [1, 2], [1, 2, 0], [1, 2, 1], [0, 0]])
SUCCESSOR = {t: CYCLE[(i + 1) % len(CYCLE)] for i, t in enumerate(CYCLE)}
PREDECESSOR = {n: t for t, n in SUCCESSOR.items()}


def ranked(truth: int, depth: int) -> np.ndarray:
    """A top-k list with ``truth`` at rank RANKS[depth] and wrong tokens elsewhere."""
    top = np.array([(truth + 1 + r) % 256 for r in range(TOPK)], np.int64)
    top[RANKS[depth]] = truth
    return top


class _Graph:
    """A stand-in draft graph. Medusa: the LM head puts the base's own token (the reference at the root's
    position) at rank RANKS[depth]. Hydra: the head decodes the path embeddings it is given back to tokens
    (checking its context is the base's state before the root), and the LM head ranks the pattern's successor
    of each path's last token, so a wrong path or context drafts wrong tokens."""

    def __init__(self, oracle, name: str):
        self.oracle, self.name = oracle, name

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def has_output(self, name: str) -> bool:
        return name == "topk_ids"

    def __call__(self, **inputs):
        o = self.oracle
        batch = next(iter(inputs.values())).shape[0]
        if self.name == "heads":
            return {"head_features": np.zeros((batch, HEADS, o.hidden), np.float32)}
        if self.name.startswith("hydra_head"):
            o.depth = int(self.name.split(".")[1])
            path = o.decode(inputs["path_embeddings"])  # [F, depth + 1] token ids
            assert path.shape[1] == o.depth + 1
            assert all(o.decode(inputs["context"][:, None])[:, 0] == [PREDECESSOR.get(int(t)) for t in path[:, 0]])
            o.last = path[:, -1]
            return {"head_features": np.zeros((batch, 1, o.hidden), np.float32)}
        if inputs["head_features"].shape[1] == 1:  # Hydra's LM head, one head per call
            top = np.stack([ranked(SUCCESSOR.get(int(t), 0), o.depth) for t in o.last])[:, None]
            return {"topk_ids": top}
        return {"topk_ids": np.broadcast_to(np.stack([o.top(d) for d in range(HEADS)]), (batch, HEADS, TOPK)).copy()}


class OracleRunners:
    def __init__(self, base, art, reference: list[int]):
        from spectrt.runtime.hydra import EmbeddingTable

        self.base, self.ref, self.hidden, self.depth = base, reference, art.model.hidden, 0
        self.position = lambda: base.past  # the root's position (Observed.seen when the drafter is wrapped)
        self.table = np.asarray(EmbeddingTable.of(art).table) if art.draft.kind == "hydra" else None

    def graph(self, name: str, max_batch: int):
        return _Graph(self, name)

    def top(self, d: int) -> np.ndarray:
        """Medusa head d at this step: the base's token at depth d + 1 below the root at rank RANKS[d]."""
        i = self.position() + d + 1
        return ranked(self.ref[i] if i < len(self.ref) else 0, d)

    def decode(self, vectors: np.ndarray) -> np.ndarray:
        """[..., H] embeddings (or the base's normalised final states) -> the nearest token by cosine."""
        unit = self.table / np.linalg.norm(self.table, axis=1, keepdims=True)
        return np.argmax(vectors.astype(np.float32) @ unit.T, axis=-1)


class Observed:
    """A drafter, counting the tokens the decoder has it observe: every token before the next root (a path it
    drafts past before committing it, in a recheck, is observed and rolled back), so the root's position."""

    def __init__(self, inner):
        self.inner, self.seen = inner, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __enter__(self):
        self.inner.__enter__()
        return self

    def __exit__(self, *exc):
        return self.inner.__exit__(*exc)

    def observe(self, hidden, tokens):
        self.seen += len(tokens)
        self.inner.observe(hidden, tokens)

    def rollback(self, n):
        self.seen -= n
        self.inner.rollback(n)

    def reset(self):
        self.seen = 0
        self.inner.reset()


@pytest.mark.parametrize("kind", ["medusa", "hydra"])
def test_oracle_accepts_through_rank_above_zero(exports, reference, kind):
    """The real Medusa/Hydra drafters fill the tree from top-k lists whose rank-0 guesses are all wrong: only
    the path (1, 2, 1) is right, so every step must accept through it (3 tokens + the bonus)."""
    from spectrt.runtime.drafters import DRAFTERS

    art = load_artifact(exports[kind])
    with OrtBaseRunner(art, max_q=16) as base:
        runners = OracleRunners(base, art, cycle(3, PROMPT_LEN) + reference)
        drafter = Observed(DRAFTERS[art.draft.kind](art, ORACLE_TREE, runners))
        runners.position = lambda: drafter.seen
        with drafter:
            res = Decoder(base, drafter, prefill_chunk=16).generate(cycle(3, PROMPT_LEN), NEW)
    assert res.tokens == reference
    assert res.tau >= 3.5  # 4 per step but the last


# ------------------------------------------------------------------------- a calibrated tree keeps its promise

def test_calibrated_tree_delivers_expected_tau(exports, tmp_path):
    """calibrate tree on the patterned Medusa export (flat verify costs, as on a GPU): it must choose a tree
    deeper than one node and generation with it must reach the tau the replay expected."""
    import shutil

    from spectrt.calibration.acceptance import measure_acceptance
    from spectrt.calibration.trees import fit_tree, write_choice
    from spectrt.profiles.cost import MeasuredCost
    from spectrt.runtime.artifact import TreeCalibration

    export = shutil.copytree(exports["medusa"], tmp_path / "medusa")
    art = load_artifact(export)
    acc = measure_acceptance(export, [cycle(s, 12) for s in range(0, 24, 3)], max_new_tokens=48)
    flat = MeasuredCost({"verify_curve": {"q": [1, 16, 64], "series": [{"past": 0, "median_ms": [10.0, 11.0, 14.0]}]},
                         "points": [{"graph": g, "phase": "frontier", "batch": 1, "median_ms": 0.1}
                                    for g in ("heads", "draft_lm_head")]}, "flat")
    choice = fit_tree(art, acc, flat, draft="heads")
    assert choice.best.nodes >= 4 and choice.tree.max_depth == HEADS
    assert choice.best.tau > 3.0
    write_choice(art, choice, TreeCalibration("measured", "flat", "heads", "8 cycle prompts", acc.positions,
                                              choice.best.tau, choice.best.tok_s, choice.best.speedup))
    draft = load_artifact(export).draft
    assert draft.nodes == choice.tree.size and Tree.from_paths(draft.tree).paths == choice.tree.paths
    res = generate(export, draft="heads")  # the export's calibrated tree is the default
    assert res.tau == pytest.approx(choice.best.tau, rel=0.15)
