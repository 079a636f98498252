"""Medusa heads: the module, save/load round trips, reference-format and Medusa-2 imports, refusals."""
from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from spectrt.export.medusa import (HEADS_FILE, MedusaConfig, MedusaHeads, check_compatible, load_medusa,
                                   save_medusa)
from spectrt.runtime.errors import SpectrtError

H, V = 16, 40


def _random_heads(shared: bool, K: int = 3, L: int = 2, seed: int = 0) -> MedusaHeads:
    torch.manual_seed(seed)
    heads = MedusaHeads(MedusaConfig(K, L, H, V, shared, "tiny-base"))
    with torch.no_grad():
        for p in heads.parameters():
            p.normal_(0, 0.2)
    return heads.eval()


def _reference_forward(state: dict, h: int, L: int, x: torch.Tensor, lm: torch.Tensor) -> torch.Tensor:
    """What the reference Medusa head computes, written out from the key layout."""
    for l in range(L):
        x = x + F.silu(x @ state[f"{h}.{l}.linear.weight"].T + state[f"{h}.{l}.linear.bias"])
    return x @ lm.T


def test_untrained_heads_are_identity():
    heads = MedusaHeads(MedusaConfig(3, 2, H, V, shared_lm_head=True))
    x = torch.randn(5, H)
    feats = heads.features(x)
    assert feats.shape == (5, 3, H)
    assert torch.equal(feats, x[:, None, :].expand(5, 3, H))
    w = torch.randn(V, H)
    assert torch.allclose(heads.logits(x, w), (x @ w.T)[:, None, :].expand(5, 3, V))


@pytest.mark.parametrize("shared", [False, True])
def test_round_trip(tmp_path, shared):
    heads = _random_heads(shared)
    w = torch.randn(V, H)
    x = torch.randn(2, 7, H)
    out = save_medusa(heads, tmp_path / "heads")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", HEADS_FILE]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["medusa_num_heads"] == 3 and cfg["medusa_num_layers"] == 2 and cfg["shared_lm_head"] is shared
    assert "version" not in cfg  # spectrt's old "v1"/"v2" names are gone from what it writes
    loaded = load_medusa(out)
    assert loaded.config == heads.config
    for (k1, v1), (k2, v2) in zip(heads.state_dict().items(), loaded.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2)
    base_w = w if shared else None
    assert torch.allclose(heads.logits(x, base_w), loaded.logits(x, base_w))
    assert loaded.logits(x, base_w).shape == (2, 7, 3, V)

    # fp16 on disk: same keys, half the bytes, close weights
    save_medusa(heads, tmp_path / "half", half=True)
    half = load_medusa(tmp_path / "half")
    assert half.config == heads.config
    assert torch.allclose(heads.logits(x, base_w), half.logits(x, base_w), atol=5e-2, rtol=1e-2)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "half" / HEADS_FILE), "pt") as f:
        keys = set(f.keys())
        assert all(f.get_tensor(k).dtype == torch.float16 for k in keys)
    expected = {f"{h}.{l}.linear.{p}" for h in range(3) for l in range(2) for p in ("weight", "bias")}
    if not shared:
        expected |= {f"{h}.2.weight" for h in range(3)}
    assert keys == expected


def test_shared_lm_head_logits_need_base_lm_head():
    heads = _random_heads(True)
    with pytest.raises(SpectrtError, match="base_lm_weight"):
        heads.logits(torch.randn(1, H))


def test_shared_as_own_lm_heads_for_reference_tools():
    from spectrt.export.medusa import to_v1, with_own_lm_heads

    heads = _random_heads(True)
    w = torch.randn(V, H)
    own = with_own_lm_heads(heads, w)
    assert not own.config.shared_lm_head and own.config.vocab_size == V
    assert set(own.reference_state_dict()) == set(heads.reference_state_dict()) | {f"{h}.2.weight" for h in range(3)}
    x = torch.randn(4, H)
    assert torch.allclose(own.logits(x), heads.logits(x, w), atol=1e-5)
    with pytest.raises(SpectrtError, match="hidden size"):
        with_own_lm_heads(heads, torch.randn(V, H + 1))
    assert to_v1 is with_own_lm_heads  # the deprecated name still works


def test_legacy_version_values_still_accepted():
    """spectrt called shared-LM-head heads "v2" (not the paper's Medusa-2): old spellings keep working."""
    for legacy, shared in (("2", True), (2, True), ("v2", True), ("1", False), (1, False), ("v1", False)):
        assert MedusaConfig(2, 1, H, V, legacy).shared_lm_head is shared
        assert MedusaConfig(2, 1, H, V, version=legacy).shared_lm_head is shared
    assert MedusaConfig(2, 1, H, V, True).version == "2" and MedusaConfig(2, 1, H, V, False).version == "1"
    assert MedusaConfig(2, 1, H, V, version="1") == MedusaConfig(2, 1, H, V, shared_lm_head=False)
    with pytest.raises(SpectrtError, match="contradicts"):
        MedusaConfig(2, 1, H, V, shared_lm_head=True, version="1")
    with pytest.raises(SpectrtError, match="'1' \\(own LM heads\\) or '2' \\(shared LM head\\)"):
        MedusaConfig(2, 1, H, V, "3")
    with pytest.raises(SpectrtError, match="own LM heads need a vocab_size"):
        MedusaConfig(2, 1, H, None, False)


def test_save_keeps_other_files_and_replaces_heads(tmp_path):
    out = tmp_path / "heads"
    save_medusa(_random_heads(True, seed=0), out)
    (out / "README.md").write_text("notes")
    second = _random_heads(True, K=4, seed=1)
    save_medusa(second, out)
    assert (out / "README.md").read_text() == "notes"
    assert load_medusa(out).config.num_heads == 4
    assert [p.name for p in tmp_path.iterdir()] == ["heads"]  # no temp dirs left behind


def test_import_reference_pt_with_under_reported_config(tmp_path):
    K, L = 5, 1
    torch.manual_seed(1)
    state = {}
    for h in range(K):
        state[f"{h}.0.linear.weight"] = torch.randn(H, H) * 0.1
        state[f"{h}.0.linear.bias"] = torch.randn(H) * 0.1
        state[f"{h}.{L}.weight"] = torch.randn(V, H)
    torch.save(state, tmp_path / "medusa_lm_head.pt")
    # released configs list fewer heads than the checkpoint holds
    (tmp_path / "config.json").write_text(json.dumps(
        {"medusa_num_heads": 2, "medusa_num_layers": 1, "base_model_name_or_path": "lmsys/vicuna-7b-v1.3"}))
    heads = load_medusa(tmp_path)
    assert heads.config.num_heads == K and heads.config.num_layers == L
    assert not heads.config.shared_lm_head and heads.config.vocab_size == V and heads.config.hidden_size == H
    assert heads.config.base_model_name_or_path == "lmsys/vicuna-7b-v1.3"
    x = torch.randn(3, H)
    got = heads.logits(x)
    for h in range(K):
        assert torch.allclose(got[:, h], _reference_forward(state, h, L, x, state[f"{h}.{L}.weight"]), atol=1e-5)
    # a file path works as well as the directory
    assert load_medusa(tmp_path / "medusa_lm_head.pt").config.num_heads == K
    # and heads written here can be read back as the reference key layout by a plain torch/safetensors user
    save_medusa(heads, tmp_path / "out")
    from safetensors.torch import load_file

    assert set(load_file(str(tmp_path / "out" / HEADS_FILE))) == set(state)


@pytest.mark.parametrize("with_lm_heads", [True, False])
def test_import_medusa2_full_checkpoint(tmp_path, with_lm_heads):
    K, L = 4, 2
    torch.manual_seed(2)
    base = {"model.embed_tokens.weight": torch.randn(V, H), "model.norm.weight": torch.ones(H),
            "model.layers.0.mlp.up_proj.weight": torch.randn(2 * H, H), "lm_head.weight": torch.randn(V, H)}
    medusa = {}
    for h in range(K):
        for l in range(L):
            medusa[f"medusa_head.{h}.{l}.linear.weight"] = torch.randn(H, H) * 0.1
            medusa[f"medusa_head.{h}.{l}.linear.bias"] = torch.randn(H) * 0.1
        if with_lm_heads:
            medusa[f"medusa_head.{h}.{L}.weight"] = torch.randn(V, H)
    # sharded like save_pretrained: medusa weights split across two files next to base weights
    names = sorted(medusa)
    shard1 = {**base, **{k: medusa[k] for k in names[: len(names) // 2]}}
    shard2 = {k: medusa[k] for k in names[len(names) // 2:]}
    save_file(shard1, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file(shard2, str(tmp_path / "model-00002-of-00002.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(
        {"architectures": ["MedusaModel"], "hidden_size": H, "vocab_size": V, "medusa_num_heads": 3,
         "medusa_num_layers": L, "base_model_name_or_path": "base"}))
    heads = load_medusa(tmp_path)
    assert heads.config.num_heads == K and heads.config.num_layers == L
    assert heads.config.shared_lm_head is not with_lm_heads
    assert heads.config.vocab_size == V  # from the config when the heads share the base LM head
    x = torch.randn(2, H)
    lm = base["lm_head.weight"]
    got = heads.logits(x, None if with_lm_heads else lm)
    ref = {k[len("medusa_head."):]: v for k, v in medusa.items()}
    for h in range(K):
        head_lm = ref[f"{h}.{L}.weight"] if with_lm_heads else lm
        assert torch.allclose(got[:, h], _reference_forward(ref, h, L, x, head_lm), atol=1e-5)


def test_full_checkpoint_as_pytorch_bin(tmp_path):
    state = {"model.embed_tokens.weight": torch.randn(V, H)}
    for h in range(2):
        state[f"base_model.medusa_head.{h}.0.linear.weight"] = torch.zeros(H, H)
        state[f"base_model.medusa_head.{h}.0.linear.bias"] = torch.zeros(H)
    torch.save(state, tmp_path / "pytorch_model.bin")
    heads = load_medusa(tmp_path)
    assert heads.config.num_heads == 2 and heads.config.shared_lm_head and heads.config.vocab_size is None


class _Evil:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def _full_state(seed: int, K: int = 2, prefix: str = "medusa_head.") -> dict:
    """A Medusa-2 style full checkpoint: base weights next to ``medusa_head.{h}.0...`` keys."""
    torch.manual_seed(seed)
    state = {"model.embed_tokens.weight": torch.randn(V, H)}
    for h in range(K):
        state[f"{prefix}{h}.0.linear.weight"] = torch.randn(H, H)
        state[f"{prefix}{h}.0.linear.bias"] = torch.randn(H)
    return state


def _assert_heads_equal(heads: MedusaHeads, state: dict) -> None:
    got = heads.state_dict()
    want = {k: v for k, v in state.items() if k.startswith("medusa_head.")}
    assert sorted(got) == sorted(want)
    for k, v in want.items():
        assert torch.equal(got[k], v), k


def test_safetensors_preferred_over_pytorch_bin(tmp_path):
    """A folder with both model.safetensors and pytorch_model.bin (as save_pretrained(safe_serialization=...)
    twice leaves it) loads the safetensors, like transformers; the pickle is never opened."""
    safe = _full_state(seed=1)
    save_file(safe, str(tmp_path / "model.safetensors"))
    marker = tmp_path / "pwned"
    torch.save({**_full_state(seed=2), "x": _Evil(str(marker))}, tmp_path / "pytorch_model.bin")
    heads = load_medusa(tmp_path)
    _assert_heads_equal(heads, safe)
    assert not marker.exists()


def test_sharded_safetensors_index_wins(tmp_path):
    state = _full_state(seed=3, K=3)
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[:4], "model-00002-of-00002.safetensors": names[4:]}
    for fname, keys in shards.items():
        save_file({k: state[k] for k in keys}, str(tmp_path / fname))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: fname for fname, keys in shards.items() for k in keys}}))
    save_file(_full_state(seed=4, K=3), str(tmp_path / "stale-model.safetensors"))  # not in the index
    torch.save(_full_state(seed=5, K=3), tmp_path / "pytorch_model.bin")
    _assert_heads_equal(load_medusa(tmp_path), state)
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(SpectrtError, match="model-00002-of-00002.safetensors missing"):
        load_medusa(tmp_path)


@pytest.mark.parametrize("weights", ["model.safetensors", "pytorch_model.bin", "medusa_lm_head.safetensors"])
def test_trainer_output_folder(tmp_path, weights):
    """A transformers.Trainer checkpoint folder: the heads next to training_args.bin (a pickled dataclass
    that weights_only refuses), optimizer.pt, scheduler.pt, rng_state.pth, trainer_state.json."""
    state = _full_state(seed=6)
    if weights.endswith(".safetensors"):
        save_file(state if weights == "model.safetensors" else
                  {k[len("medusa_head."):]: v for k, v in state.items() if k.startswith("medusa_head.")},
                  str(tmp_path / weights))
    else:
        torch.save(state, tmp_path / weights)
    marker = tmp_path / "pwned"
    torch.save(_Evil(str(marker)), tmp_path / "training_args.bin")
    torch.save({"state": {0: {"exp_avg": torch.zeros(H)}}, "param_groups": [{"lr": 1e-3, "params": [0]}]},
               tmp_path / "optimizer.pt")
    torch.save({"last_epoch": 3, "_step_count": 4}, tmp_path / "scheduler.pt")
    torch.save({"python": _Evil(str(marker)), "cpu": torch.zeros(4, dtype=torch.uint8)}, tmp_path / "rng_state.pth")
    torch.save({"cpu": torch.zeros(4, dtype=torch.uint8)}, tmp_path / "rng_state_1.pth")
    (tmp_path / "trainer_state.json").write_text(json.dumps({"global_step": 4, "log_history": []}))
    heads = load_medusa(tmp_path)
    _assert_heads_equal(heads, state)
    assert not marker.exists()


def test_weights_only_still_applies_to_loaded_pickles(tmp_path):
    """The file selection skips trainer leftovers, but a weight pickle it does pick is still weights_only."""
    marker = tmp_path / "pwned"
    torch.save({**_full_state(seed=7), "x": _Evil(str(marker))}, tmp_path / "pytorch_model.bin")
    torch.save({"last_epoch": 3}, tmp_path / "scheduler.pt")
    with pytest.raises(SpectrtError, match="pytorch_model.bin: refusing"):
        load_medusa(tmp_path)
    assert not marker.exists()


def test_conflicting_duplicate_weights_name_the_files(tmp_path):
    save_file(_full_state(seed=8), str(tmp_path / "a.safetensors"))
    save_file(_full_state(seed=9), str(tmp_path / "b.safetensors"))
    with pytest.raises(SpectrtError, match=r"appears twice with different values \(in a.safetensors and "
                                           r"b.safetensors\)"):
        load_medusa(tmp_path)


def test_refuses_pickle_with_code(tmp_path):
    marker = tmp_path / "pwned"
    state = {"0.0.linear.weight": torch.zeros(H, H), "0.0.linear.bias": torch.zeros(H), "x": _Evil(str(marker))}
    torch.save(state, tmp_path / "medusa_lm_head.pt")
    with pytest.raises(SpectrtError, match="refusing"):
        load_medusa(tmp_path)
    assert not marker.exists()


def test_corrupt_and_missing(tmp_path):
    with pytest.raises(SpectrtError, match="no such"):
        load_medusa(tmp_path / "nope")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / HEADS_FILE).write_bytes(b"\x00garbage" * 10)
    with pytest.raises(SpectrtError, match="corrupt"):
        load_medusa(tmp_path / "bad")
    (tmp_path / "badpt").mkdir()
    (tmp_path / "badpt" / "medusa_lm_head.pt").write_bytes(b"not a zip or pickle")
    with pytest.raises(SpectrtError, match="corrupt"):
        load_medusa(tmp_path / "badpt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SpectrtError, match="no medusa_lm_head"):
        load_medusa(tmp_path / "empty")
    (tmp_path / "base").mkdir()
    save_file({"model.embed_tokens.weight": torch.zeros(V, H)}, str(tmp_path / "base" / "model.safetensors"))
    with pytest.raises(SpectrtError, match="no medusa head weights"):
        load_medusa(tmp_path / "base")
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "config.json").write_text("{not json")
    save_file({"0.0.linear.weight": torch.zeros(H, H), "0.0.linear.bias": torch.zeros(H)},
              str(tmp_path / "cfg" / HEADS_FILE))
    with pytest.raises(SpectrtError, match="config"):
        load_medusa(tmp_path / "cfg")


@pytest.mark.parametrize("mutate, message", [
    (lambda s: s.update({"1.0.linear.weight": torch.zeros(H + 1, H + 1), "1.0.linear.bias": torch.zeros(H + 1)}),
     "hidden size"),
    (lambda s: s.update({"1.0.linear.bias": torch.zeros(H + 2)}), "inconsistent shapes"),
    (lambda s: s.pop("1.0.linear.bias"), "lacks"),
    (lambda s: s.pop("2.1.weight"), "different layout"),
    (lambda s: s.update({"2.1.weight": torch.zeros(V + 3, H)}), "LM head"),
    (lambda s: s.update({"4.0.linear.weight": torch.zeros(H, H)}), "not 0"),
])
def test_inconsistent_shapes(tmp_path, mutate, message):
    state = _random_heads(False, K=3, L=1).reference_state_dict()
    state = {k: v.clone() for k, v in state.items()}
    mutate(state)
    save_file(state, str(tmp_path / HEADS_FILE))
    with pytest.raises(SpectrtError, match=message):
        load_medusa(tmp_path)


def test_check_compatible():
    own = _random_heads(False)
    check_compatible(own, H, V)
    with pytest.raises(SpectrtError, match="hidden size 16, the base model has 32"):
        check_compatible(own, 32, V)
    with pytest.raises(SpectrtError, match="predict 40 tokens.*has 41"):
        check_compatible(own, H, V + 1)
    shared = MedusaHeads(MedusaConfig(2, 1, H, None, shared_lm_head=True))
    check_compatible(shared, H, 12345)  # vocabulary unknown: taken from the base
    with pytest.raises(SpectrtError, match="hidden size"):
        check_compatible(shared, H * 2, 12345)


def test_distill_lm_head_option_and_deprecated_version(tmp_path):
    """``spectrt distill --lm-head shared|own``; the old ``--version 2|1`` still maps onto it, with a note."""
    from click.testing import CliRunner

    from spectrt.cli import cli
    from spectrt.commands.distill import command, config_from_options

    def config(*argv):
        ctx = command.make_context("distill", ["-m", "M", "--prompts", "P", "-o", "O", *argv])
        opts = {k: v for k, v in ctx.params.items() if k not in ("model", "prompts", "output", "quiet")}
        return config_from_options(**opts)

    assert config().lm_head == "shared" and config().shared_lm_head and config().version is None
    assert config("--lm-head", "own").shared_lm_head is False
    assert config("--version", "1").lm_head == "own" and config("--version", "2").lm_head == "shared"
    assert config("--arch", "hydra++", "--version", "1").lm_head == "own"
    assert config("--version", "1", "--lm-head", "own").lm_head == "own"
    with pytest.raises(SpectrtError, match="contradicts --lm-head shared"):
        config("--version", "1", "--lm-head", "shared")
    assert "--version" not in CliRunner().invoke(cli, ["distill", "--help"]).output  # hidden, deprecated
    result = CliRunner().invoke(cli, ["distill", "-m", "M", "--prompts", str(tmp_path / "none.jsonl"), "-o",
                                      str(tmp_path / "o"), "--version", "2"])
    assert result.exit_code != 0 and "--version 2 is deprecated, use --lm-head shared" in result.output
