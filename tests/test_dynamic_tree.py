"""Dynamic draft trees (EAGLE-2 style): the draft LM head's top-k log-probabilities, the per-step trees Medusa
and Hydra grow from them under a node budget, and exactness (speculative == autoregressive) on tiny models."""
from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import pytest

from spectrt.runtime.artifact import load_artifact, write_manifest
from spectrt.runtime.drafters import DynamicMedusaDrafter, MergedDrafter, drafter_for
from spectrt.runtime.errors import ArtifactError, SpectrtError
from spectrt.runtime.generate import Decoder
from spectrt.runtime.hydra import DynamicHydraDrafter
from spectrt.runtime.lookup import LookupDrafter
from spectrt.runtime.ort_runner import OrtBaseRunner
from spectrt.runtime.session import SessionConfig, SpecSession
from spectrt.runtime.tree import LOGPROBS, DynamicTree, Tree, best_nodes, subtree
from tests.test_drafting_quality import Observed
from tests.test_speculative import PROMPT

TEXT = "abc abc abc the quick brown fox"


# ----------------------------------------------------------------------------- the graph's log-probabilities

@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("per_head,trim", [(False, False), (False, True), (True, False), (True, True)])
def test_logprobs_are_the_log_softmax_of_the_logits(dtype, per_head, trim):
    """topk_logprobs == numpy log-softmax over the head's (kept) rows at the returned ids, in fp32."""
    import onnxruntime as ort

    from spectrt.export.draft_graphs import build_draft_lm_head_graph

    rng = np.random.default_rng(0)
    V, H, K, k = 60, 16, 3, 5
    w = rng.standard_normal((K, V, H) if per_head else (V, H)).astype(np.float32)
    kept = rng.permutation(V)[:23] if trim else None
    model = build_draft_lm_head_graph(w, K, k, dtype, 17, "test", kept_ids=kept)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    feats = rng.standard_normal((4, K, H)).astype(dtype)
    ids, scores, logprobs = sess.run(["topk_ids", "topk_scores", LOGPROBS], {"head_features": feats})
    assert logprobs.dtype == np.float32 and logprobs.shape == ids.shape == (4, K, k)
    rows = w.astype(dtype).astype(np.float64)
    logits = np.einsum("bkh,kvh->bkv" if per_head else "bkh,vh->bkv", feats.astype(np.float64), rows)  # [B, K, V]
    if trim:
        full = np.full_like(logits, -np.inf)
        full[..., kept] = logits[..., kept]
        logits = full
    m = logits.max(-1, keepdims=True)
    ref = logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))
    atol = 1e-5 if dtype == "float32" else 5e-2  # fp16: the graph's logits are fp16
    np.testing.assert_allclose(logprobs, np.take_along_axis(ref, ids, -1), atol=atol)
    assert (logprobs <= 0).all() and np.all(np.diff(logprobs, axis=-1) <= 1e-6)  # best first
    if trim:
        assert np.isin(ids, kept).all()


def test_exports_validate_the_logprobs(medusa_export, draft_exports):
    checks = {c.check for c in load_artifact(medusa_export).manifest.validation}
    assert "draft top-k log-probs" in checks
    checks = {c.check for c in load_artifact(draft_exports["hydra++"]).manifest.validation}
    assert {"hydra head 0 top-k log-probs", "hydra head 2 top-k log-probs"} <= checks


# ----------------------------------------------------------------------------- choosing nodes

def test_best_nodes_keep_parents_first_on_ties():
    # 0 root; 1, 2 children of 0; 3 child of 1 with the same value as 1 (log-prob 0); 4 child of 2
    parent = np.array([-1, 0, 0, 1, 2])
    logp = np.array([0.0, -1.0, -2.0, -1.0, -2.5])
    assert best_nodes(logp, 3).tolist() == [0, 1, 3]  # the tie 1 / 3 goes to the parent first
    keep = best_nodes(logp, 4)
    assert keep.tolist() == [0, 1, 2, 3]
    assert subtree(parent, keep).parent.tolist() == [-1, 0, 0, 1]
    keep = best_nodes(logp, 5)
    assert subtree(parent, keep).parent.tolist() == [-1, 0, 0, 1, 2]
    assert best_nodes(logp, 1).tolist() == [0]


def test_dynamic_tree_spec_checks():
    with pytest.raises(SpectrtError, match="at least 1 node"):
        DynamicTree(0)
    with pytest.raises(SpectrtError, match="beam"):
        DynamicTree(4, beam=0)


# ----------------------------------------------------------------------------- stub runners (no weights)

class StubGraph:
    """A graph runner stub: ``fn(**inputs) -> outputs``; checks the batch against ``max_batch``."""

    def __init__(self, fn, max_batch: int, outputs=("topk_ids", "topk_scores", LOGPROBS)):
        self.fn, self.max_batch, self.outputs = fn, max_batch, outputs

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def has_output(self, name: str) -> bool:
        return name in self.outputs

    def __call__(self, **inputs):
        assert 1 <= len(next(iter(inputs.values()))) <= self.max_batch
        return self.fn(**inputs)


class StubRunners:
    def __init__(self, graphs: dict):
        self.graphs, self.made = graphs, {}

    def graph(self, name: str, max_batch: int):
        family = name.split(".")[0]
        self.made[name] = max_batch
        return StubGraph(self.graphs[family], max_batch)


def test_medusa_tree_is_from_accuracy_of_the_step_probabilities(medusa_export):
    art = load_artifact(medusa_export)
    K, k = art.draft.num_heads, art.draft.topk
    rng = np.random.default_rng(1)
    probs = rng.dirichlet(np.ones(k), K)  # [K, k]
    order = np.argsort(-probs, axis=1)
    probs = np.take_along_axis(probs, order, 1)  # best first, as TopK returns them
    ids = rng.integers(0, 256, (K, k))

    def lm_head(head_features):
        return {"topk_ids": ids[None], LOGPROBS: np.log(probs)[None].astype(np.float32)}

    runners = StubRunners({"heads": lambda hidden_states: {"head_features": np.zeros((1, K, 4))},
                           "draft_lm_head": lm_head})
    with DynamicMedusaDrafter(art, DynamicTree(9), runners) as d:
        for budget in (1, 2, 5, 9, 50):
            draft = d.draft(7, np.zeros(4), budget)
            n = min(budget, 9)
            want = Tree.from_accuracy(probs.tolist(), n)
            assert draft.tree.paths == want.paths and draft.tree.size == n
            assert draft.tokens[0] == 7
            assert draft.tokens[1:].tolist() == ids[want.depth[1:] - 1, want.rank[1:]].tolist()


@pytest.fixture(scope="module")
def hydra_export(tiny_models, tmp_path_factory):
    """Hydra (mlp heads, sharing the base LM head: one draft_lm_head for every depth), top-6."""
    from spectrt.export.exporter import ExportOptions, export_model
    from tests.test_hydra_export import random_hydra

    root = tmp_path_factory.mktemp("dyn_hydra")
    heads = random_hydra(root / "heads", "mlp", shared=True, layers=2)
    return export_model(str(tiny_models["llama"]), root / "art",
                        ExportOptions(max_context=256, heads=str(heads), topk=6, tree="6"), progress=lambda *_: None)


@pytest.mark.parametrize("n", [2, 5, 12, 30])
def test_hydra_expansion_finds_the_best_nodes(hydra_export, n):
    """With path-independent per-depth distributions and a beam of at least n - 1, EAGLE-2 expansion keeps the
    same n nodes as the exhaustive best-first search (Tree.from_accuracy)."""
    art = load_artifact(hydra_export)
    K, k, H = art.draft.num_heads, art.draft.topk, art.model.hidden
    rng = np.random.default_rng(n)
    probs = -np.sort(-rng.dirichlet(np.ones(k) * 0.5, K), axis=1)  # [K, k], best first
    ids = 10 + np.arange(K * k).reshape(K, k)  # distinct per (depth, rank)
    seen = []

    def head(context, path_embeddings):
        f, depth, h = path_embeddings.shape
        assert context.shape == (f, H) and h == H
        seen.append(f)
        return {"head_features": np.full((f, 1, H), depth - 1, np.float32)}

    def lm_head(head_features):
        d = head_features[:, 0, 0].astype(int)  # the depth the stub head wrote
        return {"topk_ids": ids[d][:, None], LOGPROBS: np.log(probs[d])[:, None].astype(np.float32)}

    runners = StubRunners({"hydra_head": head, "draft_lm_head": lm_head})
    with DynamicHydraDrafter(art, DynamicTree(n, beam=n), runners) as d:
        draft = d.draft(3, np.zeros(H, np.float32), 100)
    want = Tree.from_accuracy(probs.tolist(), n)
    token_paths = lambda tree, tokens: {tuple(tokens[a] for a in anc) for anc in ancestors(tree)}  # noqa: E731
    assert draft.tree.size == n
    assert token_paths(draft.tree, draft.tokens.tolist()) == token_paths(
        want, [3] + ids[want.depth[1:] - 1, want.rank[1:]].tolist())
    assert max(seen) <= n and seen[0] == 1  # depth 0 expands the root alone


def ancestors(tree: Tree) -> list[list[int]]:
    """Per non-root node: its path root..node (node ids, the root excluded)."""
    out = []
    for n in range(1, tree.size):
        path = [n]
        while tree.parent[path[-1]] > 0:
            path.append(int(tree.parent[path[-1]]))
        out.append(path[::-1])
    return out


def test_hydra_beam_bounds_the_frontier(hydra_export):
    art = load_artifact(hydra_export)
    runners = StubRunners({"hydra_head": None, "draft_lm_head": None})
    DynamicHydraDrafter(art, DynamicTree(40, beam=3), runners)
    assert runners.made == {"hydra_head.0": 1, "hydra_head.1": 3, "hydra_head.2": 3, "draft_lm_head": 3}
    runners = StubRunners({"hydra_head": None, "draft_lm_head": None})
    DynamicHydraDrafter(art, DynamicTree(3), runners)  # 2 nodes below the root: 2 depths at most
    assert runners.made == {"hydra_head.0": 1, "hydra_head.1": 2, "draft_lm_head": 2}


# ----------------------------------------------------------------------------- an oracle: acceptance at rank 1

@pytest.fixture(scope="module")
def llama(medusa_export):
    return load_artifact(medusa_export)  # its base graph is the tiny llama's


@pytest.fixture(scope="module")
def reference(llama):
    with OrtBaseRunner(llama, max_q=16) as base:
        return PROMPT + Decoder(base, prefill_chunk=16).generate(PROMPT, 80).tokens


def test_dynamic_tree_accepts_through_rank_one(medusa_export, llama, reference):
    """Head 0 ranks a wrong token first (p 0.5) and the truth second (p 0.4); deeper heads rank the truth
    first (p 0.9). A static chain never accepts; the dynamic tree holds the rank-1 node and accepts it."""
    art = load_artifact(medusa_export)
    K, k = art.draft.num_heads, art.draft.topk
    head0, deeper = np.log([0.5, 0.4] + [0.1 / (k - 2)] * (k - 2)), np.log([0.9] + [0.1 / (k - 1)] * (k - 1))
    with OrtBaseRunner(llama, max_q=16) as base:
        def lm_head(head_features):
            pos = drafter.seen  # the root's position
            truth = [reference[pos + d] if pos + d < len(reference) else 0 for d in range(1, K + 1)]
            ids = np.array([[(t + 1 + r) % 256 for r in range(k)] for t in truth])  # [K, k] all wrong
            ids[0, 1] = truth[0]
            ids[1:, 0] = truth[1:]
            lp = np.stack([head0] + [deeper] * (K - 1)).astype(np.float32)
            return {"topk_ids": ids[None], LOGPROBS: lp[None]}

        runners = StubRunners({"heads": lambda hidden_states: {"head_features": np.zeros((1, K, 4))},
                               "draft_lm_head": lm_head})
        taus = {}
        for n in (2, 5, 8):
            with Observed(DynamicMedusaDrafter(art, DynamicTree(n), runners)) as drafter:
                res = Decoder(base, drafter, prefill_chunk=16).generate(PROMPT, 60)
            assert res.tokens == reference[len(PROMPT):len(PROMPT) + 60]
            taus[n] = res.tau
    # n 2: only head 0's rank 0 (wrong); n 5: [0] [0,0] [0,0,0] [1]: root -> [1], bonus;
    # n 8: [1,0] (0.36) and [1,0,0] (0.324) join: root -> [1] -> [1,0] -> [1,0,0], bonus. [1] sits after
    # the [0] subtree, so each call confirms the last call's path as a chain, and its bonus, and accepts anew
    assert taus[2] == 1.0 and taus[5] > 1.9 and taus[8] > 3.5, taus


# ----------------------------------------------------------------------------- exactness on tiny exports

class Recording(Observed):
    """Wraps a drafter; records each draft's size and the budget it was given."""

    def __init__(self, inner):
        super().__init__(inner)
        self.sizes = []

    def draft(self, root, hidden, budget):
        d = self.inner.draft(root, hidden, budget)
        self.sizes.append((d.tree.size, budget))
        return d


def _exports(medusa_export, draft_exports, hydra_export):
    return {"medusa": medusa_export, "hydra": hydra_export, "hydra++": draft_exports["hydra++"]}


@pytest.mark.parametrize("kind", ["medusa", "hydra", "hydra++"])
@pytest.mark.parametrize("draft", ["heads", "heads+lookup"])
@pytest.mark.parametrize("nodes,max_context", [(2, None), (7, None), (24, None), (24, 70)])
def test_dynamic_spec_equals_ar(medusa_export, draft_exports, hydra_export, kind, draft, nodes, max_context):
    out = _exports(medusa_export, draft_exports, hydra_export)[kind]
    with SpecSession(out, SessionConfig(mode="ar", max_context=max_context, prefill_chunk=16)) as s:
        prompt = s.codec.encode(TEXT)
        first = s.generate(prompt, 40)
        prompt = (prompt + first.tokens[:-8] + prompt)[-50:]  # repeats, so lookup drafts something too
        ar = s.generate(prompt, 60)
    cfg = SessionConfig(tree="dynamic", tree_nodes=nodes, draft=draft, max_context=max_context, prefill_chunk=16)
    with SpecSession(out, cfg) as s:
        assert isinstance(s.tree, DynamicTree) and s.tree.size == nodes
        rec = Recording(s.decoder.drafter)
        s.decoder.drafter = rec
        spec = s.generate(prompt, 60)
    assert spec.tokens == ar.tokens and spec.stop_reason == ar.stop_reason
    assert all(size <= min(budget, rec.max_nodes) for size, budget in rec.sizes)  # merged: + the lookup chain
    if draft == "heads" and max_context is None:  # the heads fill the whole budget every step (what a
        # recheck leaves of it below the rechecked path, Decoder._recheck)
        assert all(size == min(budget, nodes) for size, budget in rec.sizes) and (nodes, nodes) in rec.sizes


def test_merged_dynamic_heads_share_the_budget(medusa_export):
    """heads+lookup under one budget: lookup's chain first, the dynamic tree in the nodes left."""
    art = load_artifact(medusa_export)
    with SpecSession(medusa_export, SessionConfig(mode="ar", prefill_chunk=16)) as s:
        heads = drafter_for(art, DynamicTree(10), s.runners, "heads")
        rec = Recording(heads)
        merged = MergedDrafter([LookupDrafter(max_tokens=3), rec], max_nodes=10)
        with merged:
            dec = Decoder(s.base, merged, s.codec.eos_ids, 16)
            prompt = s.codec.encode("abc abc abc abc abc")
            res = dec.generate(prompt, 40)
        ar = Decoder(s.base, None, s.codec.eos_ids, 16).generate(prompt, 40)
    assert res.tokens == ar.tokens
    assert rec.sizes and all(size == budget for size, budget in rec.sizes)  # whatever lookup left: all used
    assert min(budget for _, budget in rec.sizes) < 10  # lookup took some nodes on some steps


def test_session_tree_options(medusa_export):
    art = load_artifact(medusa_export)
    with SpecSession(medusa_export, SessionConfig(tree="dynamic")) as s:
        assert s.tree == DynamicTree(art.draft.node_budget)
    with pytest.raises(SpectrtError, match="for dynamic trees"):
        SpecSession(medusa_export, SessionConfig(tree_nodes=8))


def test_cli_dynamic_tree(medusa_export, capsys):
    import json

    from spectrt.cli import main

    assert main(["generate", str(medusa_export), "-p", "hi hi hi", "-n", "8", "--tree", "dynamic", "--tree-nodes", "6",
                 "--draft", "heads", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["new_tokens"] == 8
    assert main(["generate", str(medusa_export), "-p", "hi", "--tree-nodes", "6"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "dynamic" in err
    assert main(["generate", str(medusa_export), "-p", "hi", "--tree", "dynamic", "--tree-nodes", "0"]) == 2
    assert "--tree-nodes must be at least 1" in capsys.readouterr().err


# ----------------------------------------------------------------------------- exports made before the output

@pytest.fixture(scope="module")
def old_medusa_export(medusa_export, tmp_path_factory):
    """The Medusa export with its draft LM head rewritten without topk_logprobs (as exports before it were)."""
    import onnx

    from spectrt.export.onnx_graph import save_graph

    root = tmp_path_factory.mktemp("old") / "art"
    shutil.copytree(medusa_export, root)
    model = onnx.load(str(root / "draft_lm_head.onnx"))
    kept = [o for o in model.graph.output if o.name != LOGPROBS]
    del model.graph.output[:]
    model.graph.output.extend(kept)
    m = load_artifact(root).manifest
    (root / "draft_lm_head.onnx.data").unlink(missing_ok=True)
    rec = save_graph(model, root, "draft_lm_head")
    write_manifest(root, dataclasses.replace(m, graphs={**m.graphs, "draft_lm_head": rec}))
    return root


def test_old_export_static_ok_dynamic_refused(old_medusa_export, capsys):
    from spectrt.cli import main

    with SpecSession(old_medusa_export, SessionConfig(mode="ar")) as s:
        prompt = s.codec.encode(TEXT)
        ar = s.generate(prompt, 30)
    with SpecSession(old_medusa_export, SessionConfig(draft="heads")) as s:  # the static tree still works
        assert s.generate(prompt, 30).tokens == ar.tokens
    with pytest.raises(ArtifactError, match=f"no {LOGPROBS} output.*re-export"):
        with SpecSession(old_medusa_export, SessionConfig(tree="dynamic", tree_nodes=4)):
            pass
    assert main(["generate", str(old_medusa_export), "-p", "hi", "--tree", "dynamic"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and LOGPROBS in err


def test_check_reports_the_absent_optional_output(old_medusa_export):
    from spectrt.profiles.check import INFO, check_artifact

    lm = next(g for g in check_artifact(old_medusa_export).graphs if g.name == "draft_lm_head")
    assert not lm.errors
    assert any(f.severity == INFO and LOGPROBS in f.where for f in lm.findings)
