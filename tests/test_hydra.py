"""Hydra heads: public-format IO (aliased keys, reference checkpoints), bad input, the drafting plan."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from spectrt.export.hydra import (HYDRA_FILE, HYDRA_FILE_PT, is_hydra_checkpoint,
                                  load_hydra, prefix_dims, save_hydra)
from spectrt.runtime.errors import SpectrtError
from spectrt.runtime.hydra import draft_plan
from spectrt.runtime.tree import Tree
from tests.test_hydra_export import random_hydra

H, V = 32, 50


def _base_config():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=V, hidden_size=H, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                       num_key_value_heads=2, rms_norm_eps=1e-5)


class RefResBlock(nn.Module):
    """The reference ResBlock, rebuilt here to write a reference-layout checkpoint by hand."""

    def __init__(self, hidden, num_condition=0):
        super().__init__()
        self.linear = nn.Linear(hidden * (num_condition + 1), hidden)
        self.res_connection = nn.Linear(hidden * (num_condition + 1), hidden) if num_condition else nn.Identity()

    def forward(self, x):
        return self.res_connection(x) + nn.functional.silu(self.linear(x))


class RefHydraPrefixMLP(nn.Module):
    """Module tree of the reference ``HydraPrefixMLP`` (grounded): list-multiplied blocks, Dropout + Linear LM
    heads with bias, and a one-layer transformers ``LlamaModel`` (with its unused embedding table) as prefix."""

    def __init__(self, heads, layers, config, prefix=True):
        super().__init__()
        from transformers import LlamaModel

        torch.manual_seed(1)
        if prefix:
            self.prefix_embeding_layer = LlamaModel(config)
        self.hydra_mlp = nn.ModuleList([
            nn.Sequential(nn.Dropout(0.0), RefResBlock(H, i + 1), *([nn.Dropout(0.0), RefResBlock(H)] * (layers - 1)))
            for i in range(heads)])
        self.hydra_lm_head = nn.ModuleList([nn.Sequential(nn.Dropout(0.0), nn.Linear(H, V)) for _ in range(heads)])
        with torch.no_grad():
            for p in self.parameters():
                p.normal_(0, 0.3)

    def forward(self, hidden, path_emb):  # hidden [B, T, H], path_emb [B, T, K, H] -> logits per head
        ctx = self.prefix_embeding_layer(inputs_embeds=hidden).last_hidden_state if hasattr(
            self, "prefix_embeding_layer") else hidden
        return [self.hydra_lm_head[i](self.hydra_mlp[i](torch.cat([ctx, path_emb[..., :i + 1, :].flatten(-2)], -1)))
                for i in range(len(self.hydra_mlp))]


def _reference_dir(tmp_path, prefix=True, layers=3, heads=3, fmt="pt"):
    if prefix:
        ref = RefHydraPrefixMLP(heads, layers, _base_config(), prefix).eval()
    else:  # the reference HydraMLP: no Dropout, first block at index 0, bare Linear LM heads
        from tests.test_reference_layouts import RefHydraMLP

        torch.manual_seed(1)
        ref = RefHydraMLP(layers, heads, _base_config()).eval()
        with torch.no_grad():
            for p in ref.parameters():
                p.normal_(0, 0.3)
    d = tmp_path / "ref"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({
        "hydra_num_heads": heads, "hydra_num_layers": layers, "hydra_head_arch": "prefix-mlp" if prefix else "mlp",
        "grounded_heads": True, "hidden_state_offset": 0, "base_model_name_or_path": "tiny"}))
    if fmt == "pt":
        torch.save(ref.state_dict(), d / HYDRA_FILE_PT)  # aliased keys: one storage under several names
    else:
        from safetensors.torch import save_model

        save_model(ref, str(d / HYDRA_FILE))  # drops the aliases: some keys are missing
    return ref, d


def _compare(ref, heads, config):
    torch.manual_seed(2)
    hidden, pe = torch.randn(2, 7, H), torch.randn(2, 7, heads.num_heads, H)
    with torch.no_grad():
        want = ref(hidden, pe)
        if heads.config.arch == "prefix-mlp":
            from transformers import LlamaModel

            rope = LlamaModel(config).rotary_emb
            heads.prefix_embeding_layer.set_rope(rope.inv_freq, rope.attention_scaling)
        ctx = heads.context(hidden)
        for i in range(heads.num_heads):
            got = heads.logits(i, heads.features(i, ctx, pe[..., :i + 1, :]))
            torch.testing.assert_close(got, want[i], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
@pytest.mark.parametrize("prefix", [True, False])
def test_import_reference_checkpoint(tmp_path, fmt, prefix):
    ref, d = _reference_dir(tmp_path, prefix=prefix, fmt=fmt)
    sd = ref.state_dict()
    a, b = (3, 5) if prefix else (1, 2)  # the plain blocks, one module under two keys
    assert sd[f"hydra_mlp.0.{a}.linear.weight"].data_ptr() == sd[f"hydra_mlp.0.{b}.linear.weight"].data_ptr()
    assert is_hydra_checkpoint(d)
    heads = load_hydra(d, base_config=_base_config())
    c = heads.config
    assert (c.num_heads, c.num_layers, c.hidden_size, c.vocab_size) == (3, 3, H, V)
    assert c.arch == ("prefix-mlp" if prefix else "mlp") and not c.shared_lm_head
    assert not any("embed_tokens" in k for k in heads.state_dict())  # the unused table is dropped
    _compare(ref, heads, _base_config())


def test_round_trip_public_format(tmp_path):
    ref, d = _reference_dir(tmp_path)
    heads = load_hydra(d, base_config=_base_config())
    out = save_hydra(heads, tmp_path / "saved")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["hydra_num_heads"] == 3 and cfg["hydra_head_arch"] == "prefix-mlp" and cfg["grounded_heads"] is True
    pt = torch.load(out / HYDRA_FILE_PT, weights_only=True)
    assert set(pt) == set(heads.reference_state_dict())  # all reference keys, aliases included, sharing one storage
    assert "prefix_embeding_layer.layers.0.self_attn.rotary_emb.inv_freq" in pt  # persistent in the reference
    assert pt["hydra_mlp.1.3.linear.weight"].data_ptr() == pt["hydra_mlp.1.5.linear.weight"].data_ptr()
    assert "hydra_lm_head.2.1.bias" in pt and "prefix_embeding_layer.norm.weight" in pt
    for only in (HYDRA_FILE, HYDRA_FILE_PT):  # each file alone loads to the same module (no config needed)
        single = tmp_path / f"only-{only}"
        single.mkdir()
        (single / only).write_bytes((out / only).read_bytes())
        (single / "config.json").write_text((out / "config.json").read_text())
        again = load_hydra(single)
        for k, v in heads.state_dict().items():
            torch.testing.assert_close(again.state_dict()[k], v)
    _compare(ref, load_hydra(out), _base_config())


def test_shared_lm_head_round_trip(tmp_path):
    d = random_hydra(tmp_path / "h", "mlp", shared=True, hidden=H, vocab=V, layers=1)
    heads = load_hydra(d)
    assert heads.config.shared_lm_head and heads.config.num_layers == 1 and heads.lm_head(0) is None
    with pytest.raises(SpectrtError, match="base_lm_weight"):
        heads.logits(0, torch.zeros(H))


def test_differing_aliases_refused(tmp_path):
    ref, d = _reference_dir(tmp_path, prefix=False)
    sd = {k: v.clone() for k, v in ref.state_dict().items()}
    sd["hydra_mlp.0.2.linear.weight"] += 1  # reference mlp layout: plain blocks at 1, 2
    torch.save(sd, d / HYDRA_FILE_PT)
    with pytest.raises(SpectrtError, match="shares these blocks"):
        load_hydra(d)


def test_weights_only_refusal(tmp_path):
    ref, d = _reference_dir(tmp_path, prefix=False)
    torch.save({"state": dict(ref.state_dict()), "callback": RefResBlock(2)}, d / HYDRA_FILE_PT)  # a pickled module
    with pytest.raises(SpectrtError, match="refusing to load a pickle"):
        load_hydra(d)


@pytest.mark.parametrize("edit,match", [
    ({"hydra_head_arch": "cross-attn"}, r"unsupported hydra_head_arch 'cross-attn' \(supported: mlp, prefix-mlp\)"),
    ({"grounded_heads": False}, "only grounded"),
    ({"hidden_state_offset": 2}, "hidden_state_offset 2"),
    ({"hydra_num_heads": 5}, "config says 5 heads"),
])
def test_bad_configs(tmp_path, edit, match):
    _, d = _reference_dir(tmp_path, prefix=False)
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(edit)
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(SpectrtError, match=match):
        load_hydra(d)


def test_prefix_mlp_without_prefix_weights(tmp_path):
    ref, d = _reference_dir(tmp_path, prefix=True)
    sd = {k: v for k, v in ref.state_dict().items() if ".layers.0.self_attn" not in k}
    torch.save(sd, d / HYDRA_FILE_PT)
    with pytest.raises(SpectrtError, match="lack prefix layer weights"):
        load_hydra(d, base_config=_base_config())


def test_prefix_dims_needed(tmp_path):
    _, d = _reference_dir(tmp_path, prefix=True)
    with pytest.raises(SpectrtError, match="base model's config"):
        load_hydra(d)  # reference config.json has no attention dims, and no base config given


def test_prefix_layer_equals_transformers_llama_layer():
    """Our PrefixLayer (used for export validation and training) == the reference LlamaModel(1 layer)."""
    from transformers import LlamaModel

    from spectrt.export.hydra import PrefixLayer

    cfg = _base_config()
    ref = LlamaModel(cfg).eval()
    mine = PrefixLayer(H, prefix_dims(cfg))
    mine.load_state_dict({k: v for k, v in ref.state_dict().items() if not k.startswith("embed_tokens")})
    x = torch.randn(2, 9, H)
    with torch.no_grad():
        torch.testing.assert_close(mine(x)[0], ref(inputs_embeds=x).last_hidden_state, atol=1e-5, rtol=1e-5)
        out, kv = mine(x[:, :4])  # KV continuation == one pass
        torch.testing.assert_close(torch.cat([out, mine(x[:, 4:], past=kv)[0]], 1), mine(x)[0], atol=1e-5, rtol=1e-5)


def test_draft_plan():
    tree = Tree.from_paths([[0], [1], [2], [0, 0], [0, 1], [1, 0], [0, 0, 0]])
    plan = draft_plan(tree)
    assert len(plan) == 3
    # depth-first nodes: 1:[0] 2:[0,0] 3:[0,0,0] 4:[0,1] 5:[1] 6:[1,0] 7:[2]
    assert plan[0].front.tolist() == [0] and plan[0].kids.tolist() == [1, 5, 7]
    assert plan[1].front.tolist() == [1, 5]  # node 7 (rank 2) has no children: not drafted
    assert plan[1].ancestors.tolist() == [[0, 1], [0, 5]] and plan[1].kids.tolist() == [2, 4, 6]
    assert plan[2].front.tolist() == [2] and plan[2].ancestors.tolist() == [[0, 1, 2]]
    for p in plan:
        assert (tree.parent[p.kids] == p.front[p.kid_row]).all() and (tree.rank[p.kids] == p.kid_rank).all()
    assert draft_plan(Tree.chain(0)) == []


def cli(*args):
    r = subprocess.run([sys.executable, "-m", "spectrt", *map(str, args)], capture_output=True, text=True)
    return r.returncode, r.stderr.strip()


@pytest.mark.parametrize("kw,match", [({"hidden": 32}, "hidden size 32"), ({"vocab": 300}, "300")])
def test_export_mismatched_heads(tiny_models, tmp_path, kw, match):
    heads = random_hydra(tmp_path / "heads", "mlp", **kw)
    rc, err = cli("export", "-m", tiny_models["llama"], "--heads", heads, "-o", tmp_path / "out")
    assert rc != 0 and "Traceback" not in err and match in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_export_unsupported_arch(tiny_models, tmp_path):
    heads = random_hydra(tmp_path / "heads", "mlp", hidden=64, vocab=256)
    cfg = json.loads((heads / "config.json").read_text())
    cfg["hydra_head_arch"] = "eagle-attn"
    (heads / "config.json").write_text(json.dumps(cfg))
    rc, err = cli("export", "-m", tiny_models["llama"], "--heads", heads, "-o", tmp_path / "out")
    assert rc != 0 and "supported: mlp, prefix-mlp" in err and len(err.splitlines()) == 1


def test_memmap_rss(tmp_path):
    """Rows read through the memmap cost no anonymous memory (file pages are clean, shared, reclaimable);
    a materialized copy of the table would cost all of it."""
    from spectrt.runtime.artifact import EmbeddingRef
    from spectrt.runtime.hydra import EmbeddingTable

    rows, width = 32768, 256  # 32 MiB fp32 table
    data = tmp_path / "base.onnx.data"
    with open(data, "wb") as f:
        f.write(b"\0" * 4096)
        np.random.default_rng(0).standard_normal((rows, width), dtype=np.float32).tofile(f)

    info = EmbeddingRef("embed_tokens", data.name, 4096, rows * width * 4, (rows, width), "float32")

    def anon_kib():
        return int(next(l for l in open("/proc/self/status") if l.startswith("RssAnon")).split()[1])

    emb = EmbeddingTable(tmp_path, info)
    before = anon_kib()
    got = emb(np.arange(0, rows, 64))  # 512 rows all over the table
    grown = anon_kib() - before
    want = np.fromfile(data, np.float32, offset=4096).reshape(rows, width)[::64]
    np.testing.assert_array_equal(got, want)
    assert grown < 2 * 1024  # the 512 gathered rows (512 KiB), not the 32 MiB table
    before = anon_kib()
    copy = np.array(emb.table)  # what a second in-process copy of the table would cost
    assert anon_kib() - before > 30 * 1024 and copy.shape == (rows, width)


@pytest.mark.parametrize("arch,bf16", [("hydra", False), ("hydra++", False), ("hydra++", True)])
def test_distill_hydra(tiny_models, tmp_path, arch, bf16):
    """Training on the base's own generations: the loss goes down, the report has per-head accuracy, the
    heads load back in the public format and export."""
    from spectrt.calibration.distill_hydra import HydraDistillConfig, distill_hydra_samples
    from spectrt.calibration.generations import generate_responses
    from spectrt.export.sources import load_hf

    model, tok = load_hf(str(tiny_models["llama"]), progress=lambda *_: None)
    prompts = [f"prompt {i} " + "abcdefghij"[i % 10] * (i % 5 + 1) for i in range(8)]
    samples = generate_responses(model, tok, prompts, 24, tmp_path / "gen.jsonl", progress=False)
    cfg = HydraDistillConfig(arch=arch, heads=2, layers=2, epochs=3, lr=3e-3, batch_size=96, half=False,
                             holdout=0.25, cache_dir=str(tmp_path / "cache"), bf16=bf16)
    rep = distill_hydra_samples(model, samples, tmp_path / "heads", cfg, progress=False, log=lambda *a: None)
    assert rep["loss"] == ("teacher" if arch == "hydra++" else "lm")
    assert rep["lm_head_dtype"] == ("bfloat16" if bf16 else "float32")
    losses = [h["train_loss"] for h in rep["history"]]
    assert losses[-1] < losses[0]
    assert [h["head"] for h in rep["heads"]] == [0, 1] and all(0 <= h["top1"] <= h["top5"] <= 1 for h in rep["heads"])
    heads = load_hydra(tmp_path / "heads", base_config=model.config)
    assert heads.config.arch == ("prefix-mlp" if arch == "hydra++" else "mlp") and heads.config.shared_lm_head
    assert (tmp_path / "heads" / "report.json").is_file()


def test_distill_cli_arch_choices(tmp_path):
    rc, err = cli("distill", "-m", "x", "--prompts", "p.jsonl", "-o", tmp_path / "o", "--arch", "eagle")
    assert rc != 0 and "hydra++" in err


@pytest.mark.parametrize("arch", ["hydra", "hydra++"])
def test_distill_hydra_on_a_trimmed_vocabulary(tiny_models, tmp_path, arch):
    """--train-vocab for Hydra: trained over the kept LM-head rows (lm: targets outside them ignored; teacher:
    the base's distribution over them); the reported accuracy drafts from those rows only."""
    from spectrt.calibration.distill_hydra import HydraDistillConfig, distill_hydra_samples, evaluate, load_data
    from spectrt.calibration.generations import generate_responses
    from spectrt.export.sources import load_hf

    model, tok = load_hf(str(tiny_models["llama"]), progress=lambda *_: None)
    prompts = [f"prompt {i} " + "abcdefghij"[i % 10] * (i % 5 + 1) for i in range(8)]
    samples = generate_responses(model, tok, prompts, 24, tmp_path / "gen.jsonl", progress=False)
    seen = sorted({t for _, r in samples for t in r})
    kept = seen[1:] + [0]  # one answer token left out: never a target, never drafted
    cfg = HydraDistillConfig(arch=arch, heads=2, layers=2, epochs=3, lr=3e-3, batch_size=96, half=False,
                             holdout=0.25, cache_dir=str(tmp_path / "cache"), train_vocab=len(kept))
    rep = distill_hydra_samples(model, samples, tmp_path / "heads", cfg, progress=False, log=lambda *a: None,
                                kept=kept, extra=samples[:2])
    assert rep["train_vocab"]["size"] == len(kept)
    assert rep["train"]["copy_tasks"] == 2 and rep["heldout"]["prompts"] == 2  # extra samples: trained on only
    losses = [h["train_loss"] for h in rep["history"]]
    assert losses[-1] < losses[0]
    assert all(0 <= h["top1"] <= h["top5"] <= 1 for h in rep["heads"])
    with pytest.raises(SpectrtError, match="token ids must lie"):
        distill_hydra_samples(model, samples, tmp_path / "bad", cfg, progress=False, log=lambda *a: None,
                              kept=[10 ** 6])
    assert not (tmp_path / "bad").exists()
