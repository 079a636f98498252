"""Hydra / Hydra++ end to end on tiny models: export + validation, memmapped embeddings, speculative == AR."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spectrt.export.exporter import ExportOptions, export_model
from spectrt.runtime.artifact import load_artifact
from spectrt.runtime.session import SessionConfig, SpecSession
from spectrt.runtime.tree import Tree

PROMPTS = ["hello world", "the quick brown fox", "1 2 3 4", "once upon a time", "abc def ghi", "x y z"]


def random_hydra(path, arch="mlp", shared=False, hidden=64, vocab=256, heads=3, layers=2, seed=0, base_config=None,
                 std=0.2):
    import torch

    from spectrt.export.hydra import HydraConfig, HydraHeads, prefix_dims, save_hydra

    torch.manual_seed(seed)
    pdims = prefix_dims(base_config) if arch == "prefix-mlp" else None
    h = HydraHeads(HydraConfig(num_heads=heads, num_layers=layers, hidden_size=hidden,
                               vocab_size=None if shared else vocab, arch=arch, shared_lm_head=shared, prefix=pdims))
    with torch.no_grad():
        for p in h.parameters():
            p.normal_(0, std)
    save_hydra(h, path)
    return path


@pytest.fixture(scope="module")
def llama_config(tiny_models):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(tiny_models["llama"])


@pytest.fixture(scope="module")
def vocab_file(tiny_models, tmp_path_factory):
    from spectrt.calibration.vocab import calibrate_vocab
    from spectrt.export.sources import load_hf

    model, tok = load_hf(str(tiny_models["llama"]), progress=lambda *_: None)
    root = tmp_path_factory.mktemp("hvocab")
    calibrate_vocab(model, tok, PROMPTS, root / "vocab.json", size=256, max_new_tokens=24,
                    cache_path=root / "gen.jsonl", progress=False, source="test")
    return root / "vocab.json"


# (arch, shared LM head, VocabTrim size or None)
VARIANTS = {"hydra-own": ("mlp", False, None), "hydra-shared-trim": ("mlp", True, 40),
            "hydra++-shared": ("prefix-mlp", True, None), "hydra++-own-trim": ("prefix-mlp", False, 24)}


@pytest.fixture(scope="module", params=list(VARIANTS))
def hydra_export(request, tiny_models, llama_config, vocab_file, tmp_path_factory):
    arch, shared, trim = VARIANTS[request.param]
    root = tmp_path_factory.mktemp(request.param)
    heads = random_hydra(root / "heads", arch, shared, base_config=llama_config, layers=3 if shared else 2)
    opts = ExportOptions(max_context=256, heads=str(heads), topk=6, tree="14")
    if trim:
        opts.vocab, opts.vocab_size = str(vocab_file), trim
    return request.param, export_model(str(tiny_models["llama"]), root / "art", opts, progress=lambda *_: None)


def test_manifest_graphs_and_validation(hydra_export):
    name, out = hydra_export
    arch, shared, trim = VARIANTS[name]
    art = load_artifact(out)
    d = art.draft
    assert d.kind == "hydra" and d.arch == arch and d.num_heads == 3 and d.topk == 6
    assert d.shared_lm_head == shared and len(d.tree) == 13
    graphs = set(art.manifest.graphs)
    assert {"hydra_head.0", "hydra_head.1", "hydra_head.2"} <= graphs
    assert ("hydra_prefix" in graphs) == (arch == "prefix-mlp")
    assert ("draft_lm_head" in graphs) == shared
    assert ("hydra_lm_head.2" in graphs) == (not shared)
    assert (d.vocab_trim is not None) == bool(trim)
    if trim:
        assert d.lm_head_rows == d.vocab_trim.size >= trim
    checks = {c.check: c for c in art.manifest.validation}
    assert all(c.ok for c in checks.values())
    assert "hydra head 2 features" in checks and "hydra head 2 top-k scores" in checks
    assert checks["embedding memmap rows"].max_abs == 0.0
    assert ("hydra prefix context (2 chunks)" in checks) == (arch == "prefix-mlp")


def test_no_graph_holds_the_vocabulary_embedding(hydra_export):
    """Path embeddings are inputs: no hydra graph carries the embedding table (nor its prefix layer's copy)."""
    import onnx
    from onnx import numpy_helper

    from spectrt.runtime.hydra import EmbeddingTable

    _, out = hydra_export
    art = load_artifact(out)
    table = np.asarray(EmbeddingTable.of(art).table)
    for g in art.manifest.graphs:
        if g.startswith("hydra_head") or g == "hydra_prefix":
            m = onnx.load(str(art.graph_path(g)))
            for t in m.graph.initializer:
                a = numpy_helper.to_array(t)
                assert not (a.shape == table.shape and np.array_equal(a, table)), (g, t.name)
                assert not (a.shape == table.T.shape and np.array_equal(a, table.T)), (g, t.name)


def test_embedding_memmap_matches_base_embedding(hydra_export, tiny_models):
    import torch
    from transformers import AutoModelForCausalLM

    from spectrt.runtime.hydra import EmbeddingTable

    _, out = hydra_export
    art = load_artifact(out)
    emb = EmbeddingTable.of(art)
    assert isinstance(emb.table, np.memmap) and emb.table.mode == "r"
    ref = AutoModelForCausalLM.from_pretrained(tiny_models["llama"], dtype=torch.float32).get_input_embeddings()
    ids = np.array([[0, 5, 255], [17, 17, 3]])
    np.testing.assert_array_equal(emb(ids), ref.weight.detach().numpy()[ids])


@pytest.mark.parametrize("prompt", PROMPTS[:2])
def test_spec_equals_ar(hydra_export, prompt):
    _, out = hydra_export
    res = {}
    for mode in ("ar", "spec"):
        with SpecSession(out, SessionConfig(mode=mode)) as s:
            res[mode] = s.generate(s.codec.encode(prompt), 40)
    assert res["spec"].tokens == res["ar"].tokens
    assert res["spec"].stop_reason == res["ar"].stop_reason


def test_several_prompts_in_one_session(hydra_export):
    """Hydra++ state restarts with every prompt (prefix cache), and prefill longer than a chunk works."""
    _, out = hydra_export
    long = " ".join(PROMPTS)  # > prefill chunk 16 below
    with SpecSession(out, SessionConfig(mode="ar")) as s:
        ar = [s.generate(s.codec.encode(p), 30).tokens for p in (long, PROMPTS[0], long)]
    with SpecSession(out, SessionConfig(prefill_chunk=16)) as s:
        spec = [s.generate(s.codec.encode(p), 30).tokens for p in (long, PROMPTS[0], long)]
    assert spec == ar


def _paths(depth_ranks):
    """Hypothesis tree: a list of rank paths closed under prefixes."""
    paths = set()
    for p in depth_ranks:
        for d in range(1, len(p) + 1):
            paths.add(tuple(p[:d]))
    return [list(p) for p in paths]


@settings(max_examples=3, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(st.lists(st.integers(0, 5), min_size=1, max_size=3), min_size=1, max_size=6),
       st.sampled_from(PROMPTS))
def test_random_trees_spec_equals_ar(hydra_export, tmp_path_factory, ranks, prompt):
    import json

    _, out = hydra_export
    tree = Tree.from_paths(_paths(ranks))
    f = tmp_path_factory.mktemp("tree") / "tree.json"
    f.write_text(json.dumps(tree.to_json()))
    with SpecSession(out, SessionConfig(mode="ar")) as s:
        ar = s.generate(s.codec.encode(prompt), 24).tokens
    with SpecSession(out, SessionConfig(tree=str(f))) as s:
        assert s.generate(s.codec.encode(prompt), 24).tokens == ar
