"""Device profiles: YAML loading/validation, TensorRT optimization profiles, memory estimate, CLI."""
from __future__ import annotations

import pytest

from spectrt.cli import main
from spectrt.runtime.artifact import ModelInfo
from spectrt.profiles import (ProfileError, dim_ranges, estimate_memory, list_profiles, load_profile,
                              optimization_profiles, parse_version)
from spectrt.runtime.contract import BASE, DRAFT_LM_HEAD, HEADS

DIMS = {"hidden": 64, "vocab": 1000, "num_layers": 3, "num_heads": 4, "kv_heads": 2, "head_dim": 16, "heads": 4,
        "topk": 8}
GOOD = """\
name: mine
description: test board
device: jetson
compute_capability: "8.7"
tensorrt: "10.3"
precisions: [fp16, fp32]
default_precision: fp16
memory_budget_mb: 4000
max_context: 512
opt_context: 128
max_tree_nodes: 16
opt_tree_nodes: 8
max_prefill_chunk: 32
max_frontier: 8
max_batch: 1
workspace_mb: 512
builder_optimization_level: 3
"""


def test_builtin_profiles_load_and_precisions():
    names = list_profiles()
    assert {"orin-nano-8gb", "orin-nx-16gb", "agx-orin-64gb", "agx-thor", "rtx-4090"} <= set(names)
    for n in names:
        p = load_profile(n)
        assert p.name == n and p.default_precision in p.precisions
        assert parse_version(p.tensorrt) >= (10,)
    for orin in ("orin-nano-8gb", "orin-nx-16gb", "agx-orin-64gb"):
        p = load_profile(orin)
        assert "fp8" not in p.precisions and "fp16" in p.precisions and "int8" in p.precisions
        assert p.compute_capability == "8.7"
    thor = load_profile("agx-thor")
    assert {"fp8", "fp4"} <= set(thor.precisions)


def test_user_yaml_path_and_base_inheritance(tmp_path):
    f = tmp_path / "board.yaml"
    f.write_text(GOOD)
    p = load_profile(f)
    assert p.name == "mine" and p.max_context == 512 and p.precisions == ("fp16", "fp32")
    child = tmp_path / "small.yaml"
    child.write_text("base: orin-nano-8gb\nname: nano-short\nmax_context: 512\n")
    c = load_profile(str(child))
    nano = load_profile("orin-nano-8gb")
    assert c.name == "nano-short" and c.max_context == 512 and c.workspace_mb == nano.workspace_mb


@pytest.mark.parametrize("edit, message", [
    ("max_batch: 1\n", None),
    ("foo: 3\n", "unknown key(s) foo"),
    ("max_context: lots\n", "max_context: expected an integer"),
    ("builder_optimization_level: 9\n", "out of range"),
    ("precisions: [fp16, fp64]\n", "unknown fp64"),
    ("default_precision: int8\n", "not in precisions"),
    ("opt_tree_nodes: 64\n", "opt_tree_nodes (64) must be <= max_tree_nodes"),
    ("device: phone\n", "device: 'phone'"),
    ("tensorrt: \"8.6\"\n", "needs TensorRT 10.x"),
])
def test_validation_errors(tmp_path, edit, message):
    key = edit.split(":")[0]
    text = "".join(line + "\n" for line in GOOD.splitlines() if not line.startswith(key + ":")) + edit
    f = tmp_path / "p.yaml"
    f.write_text(text)
    if message is None:
        assert load_profile(f).max_batch == 1
        return
    with pytest.raises(ProfileError) as e:
        load_profile(f)
    assert message in str(e.value) and str(f) in str(e.value)


def test_missing_key_bad_yaml_unknown_name(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("\n".join(l for l in GOOD.splitlines() if not l.startswith("workspace_mb")))
    with pytest.raises(ProfileError, match="missing key.*workspace_mb"):
        load_profile(f)
    f.write_text("name: [unclosed\n")
    with pytest.raises(ProfileError, match="not valid YAML"):
        load_profile(f)
    with pytest.raises(ProfileError, match="unknown device profile 'nope'.*orin-nano-8gb"):
        load_profile("nope")


def test_base_optimization_profiles_follow_the_contract():
    p = load_profile("orin-nano-8gb")
    profs = optimization_profiles("base", p, DIMS, max_context=512)  # artifact shorter than the device limit
    assert [x.label for x in profs] == ["prefill", "decode"]
    ins, _ = BASE.expand(DIMS)
    for sp in profs:
        assert set(sp.shapes) == {s.name for s in ins}
        for name, (mn, opt, mx) in sp.shapes.items():
            assert len(mn) == len(opt) == len(mx)
            assert all(a <= b <= c for a, b, c in zip(mn, opt, mx)), name
        # KV views: [past, batch, kv_heads, head_dim], past from 0 to ctx - 1
        assert sp.shapes["past_key.2"][0] == (0, 1, 2, 16)
        assert sp.shapes["past_value.0"][2] == (511, 1, 2, 16)
    prefill, decode = profs
    assert prefill.shapes["input_ids"][2] == (1, p.max_prefill_chunk)
    assert decode.shapes["tree_mask"] == ((1, 1, 1), (1, p.opt_tree_nodes, p.opt_tree_nodes),
                                          (1, p.max_tree_nodes, p.max_tree_nodes))
    # without an artifact cap the device's own max context is used
    assert dim_ranges("base", p)[1][1]["past"][2] == p.max_context - 1


def test_frontier_graphs_and_unresolved_dims():
    p = load_profile("agx-thor")
    (h,) = optimization_profiles(HEADS, p, DIMS)
    assert h.label == "frontier" and h.shapes["hidden_states"] == ((1, 64), (1, 64), (p.max_frontier, 64))
    (d,) = optimization_profiles(DRAFT_LM_HEAD, p, DIMS)
    assert d.shapes["head_features"][2] == (p.max_frontier, 4, 64)
    with pytest.raises(ProfileError, match="no value for dim.*heads"):
        optimization_profiles("draft_lm_head", p, {k: v for k, v in DIMS.items() if k != "heads"})


def test_memory_estimate_scales_with_precision():
    p = load_profile("orin-nano-8gb")
    w = 500 << 20
    model = ModelInfo(family="llama", intermediate=128, rms_eps=1e-5, tied_embeddings=True, sliding_window=None,
                      source="test", **{k: DIMS[k] for k in ("hidden", "vocab", "num_layers", "num_heads", "kv_heads",
                                                              "head_dim")})
    fp32 = estimate_memory(p, model, w, "float32", "fp32")
    fp16 = estimate_memory(p, model, w, "float32", "fp16")
    assert fp32["weights_mb"] == pytest.approx(500) and fp16["weights_mb"] == pytest.approx(250)
    kv = 2 * 3 * p.max_context * 2 * 16 * 2 / 2**20
    assert fp16["kv_cache_mb"] == pytest.approx(kv, abs=0.1)
    assert fp16["fits"] and not estimate_memory(p, model, 20 << 30, "float32", "fp16")["fits"]
    # an export with int4/int8 weights already holds its low-bit bytes: no rescaling by precision
    q = estimate_memory(p, model, w, "float32", "int8", quantized=True)
    assert q["weights_mb"] == pytest.approx(500) and estimate_memory(p, model, w, "float32", "int8")["weights_mb"] == \
        pytest.approx(125)


def test_cli_profiles(capsys, tmp_path):
    assert main(["devices"]) == 0
    out = capsys.readouterr().out
    assert "orin-nano-8gb" in out and "agx-thor" in out and "rtx-4090" in out
    assert main(["devices", "agx-thor"]) == 0
    assert "fp4" in capsys.readouterr().out
    assert main(["devices", "no-such-board"]) == 2
    assert "unknown device profile" in capsys.readouterr().err
    from tests.tiny_artifact import write_tiny_artifact

    art = write_tiny_artifact(tmp_path / "tiny")
    assert main(["devices", "orin-nano-8gb", "--artifact", str(art)]) == 0
    out = capsys.readouterr().out
    assert "base.prefill" in out and "base.decode" in out and "memory estimate" in out
