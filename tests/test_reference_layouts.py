"""Hydra checkpoints in the reference implementation's exact key layout, in both directions.

The reference is zankner/Hydra (``hydra/model/hydra_heads/prefix_mlp_head.py``, ``.../mlp_head.py``,
``hydra/model/hydra_model.py``, ``hydra/train/train.py``). It saves ``torch.save(hydra_head.state_dict(),
"hydra_lm_head.pt")`` and loads with ``hydra_head.load_state_dict(sd, strict=False)``: a key it does not expect
is silently ignored and leaves that weight untrained, so the layout has to be exact. The modules below are a
small, faithful re-creation of the reference's *module trees* (names, nesting, list-multiplied aliases, bias
flags, initialisation from the base LM head), written from that source for these tests; they are not the
reference's code. The one thing rebuilt on top of today's transformers is the prefix layer: the reference copies
transformers 4.31's ``LlamaModel``, whose ``layers.0.self_attn.rotary_emb.inv_freq`` is a *persistent* buffer;
today's ``LlamaModel`` keeps the rotary table at the top level, non-persistent, so a 4.31-style ``rotary_emb``
holding a persistent ``inv_freq`` is attached under ``self_attn`` (unused by the forward, like the saved
buffer in practice: both compute the same table from the config).

* arch ``mlp`` (``HydraMLP``): ``hydra_mlp.{i} = Sequential(ResBlock(H, i + 1), *[ResBlock(H)] * (L - 1))`` -
  no Dropout, first block at index 0; ``hydra_lm_head.{i} = Linear(H, V)`` (bare, with bias).
* arch ``prefix-mlp`` (``HydraPrefixMLP``): ``hydra_mlp.{i} = Sequential(Dropout, ResBlock(H, i + 1),
  *[Dropout, ResBlock(H)] * (L - 1))``; ``hydra_lm_head.{i} = Sequential(Dropout, Linear(H, V))``;
  ``prefix_embeding_layer = LlamaModel(base config, 1 layer)`` (4.31).
* both: ``res_connection`` exists only on the first (input-reducing) block; per-head LM weights start as a copy of
  the base's ``lm_head`` (``lm_head_init_weight``), biases at ``nn.Linear``'s default init.
"""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from spectrt.export.hydra import (HYDRA_FILE, HYDRA_FILE_PT, HydraConfig, HydraHeads, load_hydra, prefix_dims,
                                  save_hydra)
from spectrt.runtime.errors import SpectrtError

H, V, K, L = 32, 50, 3, 3
PREFIX_431_KEYS = {"embed_tokens.weight", "norm.weight", "layers.0.self_attn.rotary_emb.inv_freq",
                   *(f"layers.0.{k}" for k in ("self_attn.q_proj.weight", "self_attn.k_proj.weight",
                                               "self_attn.v_proj.weight", "self_attn.o_proj.weight",
                                               "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
                                               "input_layernorm.weight", "post_attention_layernorm.weight"))}


def base_config():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=V, hidden_size=H, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                       num_key_value_heads=2, rms_norm_eps=1e-5)


# ------------------------------------------------------------------------ re-creation of the reference modules

class RefResBlock(nn.Module):
    def __init__(self, hidden_size, num_condition=0):
        super().__init__()
        self.linear = nn.Linear(hidden_size * (num_condition + 1), hidden_size)
        if num_condition > 0:
            self.res_connection = nn.Linear(hidden_size * (num_condition + 1), hidden_size)
        else:
            self.res_connection = nn.Identity()
        torch.nn.init.zeros_(self.linear.weight)
        self.act = nn.SiLU()

    def forward(self, x):
        return self.res_connection(x) + self.act(self.linear(x))


class RefRotaryEmbedding431(nn.Module):
    """transformers 4.31 ``LlamaRotaryEmbedding``'s state: ``register_buffer("inv_freq", inv_freq)`` (persistent)."""

    def __init__(self, dim, base=10000.0):
        super().__init__()
        self.register_buffer("inv_freq", 1.0 / (base ** (torch.arange(0, dim, 2).float() / dim)))


def ref_prefix_layer(config):
    """``LlamaModel(config with num_hidden_layers=1)`` with the 4.31 state-dict layout."""
    from copy import deepcopy

    from transformers import LlamaModel

    cfg = deepcopy(config)
    cfg.num_hidden_layers = 1
    model = LlamaModel(cfg)
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    model.layers[0].self_attn.rotary_emb = RefRotaryEmbedding431(head_dim, getattr(cfg, "rope_theta", 10000.0))
    assert set(model.state_dict()) == PREFIX_431_KEYS
    return model


class RefHydraMLP(nn.Module):
    """Reference ``HydraMLP`` (grounded heads)."""

    def __init__(self, hydra_num_layers, hydra_num_heads, base_config, lm_head_init_weight=None):
        super().__init__()
        hidden, vocab = base_config.hidden_size, base_config.vocab_size
        self.hydra_mlp = nn.ModuleList([
            nn.Sequential(RefResBlock(hidden, i + 1), *([RefResBlock(hidden)] * (hydra_num_layers - 1)))
            for i in range(hydra_num_heads)])
        self.hydra_lm_head = nn.ModuleList([nn.Linear(hidden, vocab) for _ in range(hydra_num_heads)])
        if lm_head_init_weight is not None:
            for i in range(hydra_num_heads):
                self.hydra_lm_head[i].weight.data[:] = lm_head_init_weight[:]

    def context(self, hidden):
        return hidden

    def forward(self, hidden, path_emb):
        """hidden [B, T, H], path_emb [B, T, K, H] (the embeddings of the drafted path) -> logits per head."""
        ctx = self.context(hidden)
        return [self.hydra_lm_head[i](self.hydra_mlp[i](torch.cat([ctx, path_emb[..., :i + 1, :].flatten(-2)], -1)))
                for i in range(len(self.hydra_mlp))]


class RefHydraPrefixMLP(RefHydraMLP):
    """Reference ``HydraPrefixMLP`` (grounded heads)."""

    def __init__(self, hydra_num_layers, hydra_num_heads, base_config, lm_head_init_weight=None, dropout_rate=0.0):
        nn.Module.__init__(self)
        hidden, vocab = base_config.hidden_size, base_config.vocab_size
        self.prefix_embeding_layer = ref_prefix_layer(base_config)
        self.hydra_mlp = nn.ModuleList([
            nn.Sequential(nn.Dropout(dropout_rate), RefResBlock(hidden, i + 1),
                          *([nn.Dropout(dropout_rate), RefResBlock(hidden)] * (hydra_num_layers - 1)))
            for i in range(hydra_num_heads)])
        self.hydra_lm_head = nn.ModuleList([nn.Sequential(nn.Dropout(dropout_rate), nn.Linear(hidden, vocab))
                                            for _ in range(hydra_num_heads)])
        if lm_head_init_weight is not None:
            for i in range(hydra_num_heads):
                self.hydra_lm_head[i][1].weight.data[:] = lm_head_init_weight[:]

    def context(self, hidden):
        return self.prefix_embeding_layer(inputs_embeds=hidden)[0]


def reference_module(arch, lm_head_init_weight=None):
    cls = RefHydraMLP if arch == "mlp" else RefHydraPrefixMLP
    return cls(L, K, base_config(), lm_head_init_weight=lm_head_init_weight)


def reference_config(arch):
    """What the reference's ``HydraConfig.save_pretrained`` writes (its own keys + PretrainedConfig's)."""
    return {"hydra_num_heads": K, "hydra_num_layers": L, "hydra_head_arch": arch, "base_model_name_or_path": "tiny",
            "grounded_heads": True, "hidden_state_offset": 0, "transformers_version": "4.31.0"}


# ------------------------------------------------------------------------------------------------- helpers

def _inputs():
    g = torch.Generator().manual_seed(2)
    return torch.randn(2, 7, H, generator=g), torch.randn(2, 7, K, H, generator=g)


def _spectrt_logits(heads, hidden, pe, lm_weight=None):
    ctx = heads.context(hidden)
    return [heads.logits(i, heads.features(i, ctx, pe[..., :i + 1, :]), lm_weight) for i in range(heads.num_heads)]


def _assert_same(ref, heads, lm_weight=None):
    hidden, pe = _inputs()
    with torch.no_grad():
        want, got = ref.eval()(hidden, pe), _spectrt_logits(heads.eval(), hidden, pe, lm_weight)
    for w, g in zip(want, got):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)


def _random_reference(arch, seed=1):
    torch.manual_seed(seed)
    ref = reference_module(arch)
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.3)
    return ref.eval()


def _random_spectrt(arch, shared=False, vocab=V, seed=3):
    torch.manual_seed(seed)
    heads = HydraHeads(HydraConfig(num_heads=K, num_layers=L, hidden_size=H, vocab_size=vocab, arch=arch,
                                   shared_lm_head=shared, prefix=prefix_dims(base_config()) if arch != "mlp" else None))
    with torch.no_grad():
        for p in heads.parameters():
            p.normal_(0, 0.3)
    return heads.eval()


def _write_reference(ref, arch, d, fmt="pt"):
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps(reference_config(arch)))
    if fmt == "pt":
        torch.save(ref.state_dict(), d / HYDRA_FILE_PT)  # what the reference's trainer does
    else:
        from safetensors.torch import save_model

        save_model(ref, str(d / HYDRA_FILE))  # aliases dropped
    return d


# ------------------------------------------------------------------------------------ the fixtures' layout

def test_reference_key_layout():
    """The fixtures themselves: the exact keys (and aliases) of the reference modules."""
    sd = reference_module("mlp").state_dict()
    assert {k for k in sd if k.startswith("hydra_mlp.0.")} == {
        "hydra_mlp.0.0.linear.weight", "hydra_mlp.0.0.linear.bias", "hydra_mlp.0.0.res_connection.weight",
        "hydra_mlp.0.0.res_connection.bias", "hydra_mlp.0.1.linear.weight", "hydra_mlp.0.1.linear.bias",
        "hydra_mlp.0.2.linear.weight", "hydra_mlp.0.2.linear.bias"}
    assert sd["hydra_mlp.0.1.linear.weight"].data_ptr() == sd["hydra_mlp.0.2.linear.weight"].data_ptr()
    assert {k for k in sd if k.startswith("hydra_lm_head.0")} == {"hydra_lm_head.0.weight", "hydra_lm_head.0.bias"}
    sd = reference_module("prefix-mlp").state_dict()
    assert {k for k in sd if k.startswith("hydra_mlp.0.")} == {
        "hydra_mlp.0.1.linear.weight", "hydra_mlp.0.1.linear.bias", "hydra_mlp.0.1.res_connection.weight",
        "hydra_mlp.0.1.res_connection.bias", "hydra_mlp.0.3.linear.weight", "hydra_mlp.0.3.linear.bias",
        "hydra_mlp.0.5.linear.weight", "hydra_mlp.0.5.linear.bias"}
    assert {k for k in sd if k.startswith("hydra_lm_head.0")} == {"hydra_lm_head.0.1.weight", "hydra_lm_head.0.1.bias"}
    assert {k[len("prefix_embeding_layer."):] for k in sd if k.startswith("prefix_embeding_layer.")} == PREFIX_431_KEYS


# ------------------------------------------------------------------------------------ reference -> spectrt

@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
@pytest.mark.parametrize("arch", ["mlp", "prefix-mlp"])
def test_reference_checkpoint_loads(tmp_path, arch, fmt):
    ref = _random_reference(arch)
    d = _write_reference(ref, arch, tmp_path / "ref", fmt)
    heads = load_hydra(d, base_config=base_config())
    c = heads.config
    assert (c.arch, c.num_heads, c.num_layers, c.hidden_size, c.vocab_size, c.shared_lm_head) == (arch, K, L, H, V, False)
    _assert_same(ref, heads)


@pytest.mark.parametrize("key", ["prefix_embeding_layer.layers.0.self_attn.rotary_emb.inv_freq",  # transformers 4.31
                                 "prefix_embeding_layer.rotary_emb.inv_freq"])  # later layouts, if ever persistent
def test_reference_inv_freq_is_dropped_and_shape_checked(tmp_path, key):
    ref = _random_reference("prefix-mlp")
    sd = dict(ref.state_dict())
    sd[key] = torch.rand(4)
    d = _write_reference(ref, "prefix-mlp", tmp_path / "ref")
    torch.save(sd, d / HYDRA_FILE_PT)
    _assert_same(ref, load_hydra(d, base_config=base_config()))  # the table comes from the base config
    sd[key] = torch.ones(3)
    torch.save(sd, d / HYDRA_FILE_PT)
    with pytest.raises(SpectrtError, match=r"rotary_emb\.inv_freq has shape \(3,\), expected \[4\]") as e:
        load_hydra(d, base_config=base_config())
    assert len(str(e.value).splitlines()) == 1


def test_inv_freq_without_prefix_layer_refused(tmp_path):
    ref = _random_reference("mlp")
    d = _write_reference(ref, "mlp", tmp_path / "ref")
    torch.save({**ref.state_dict(), "prefix_embeding_layer.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(4)},
               d / HYDRA_FILE_PT)
    with pytest.raises(SpectrtError, match="arch mlp has no prefix layer"):
        load_hydra(d)


@pytest.mark.parametrize("key", ["hydra_mlp.0.0.norm.weight", "hydra_lm_head.0.2.weight",
                                 "prefix_embeding_layer.layers.1.mlp.up_proj.weight",
                                 "prefix_embeding_layer.layers.0.self_attn.q_proj.bias"])
def test_unknown_keys_refused(tmp_path, key):
    ref = _random_reference("prefix-mlp")
    sd = {**ref.state_dict(), key: torch.zeros(2)}
    d = _write_reference(ref, "prefix-mlp", tmp_path / "ref")
    torch.save(sd, d / HYDRA_FILE_PT)
    with pytest.raises(SpectrtError) as e:
        load_hydra(d, base_config=base_config())
    msg = str(e.value)
    assert len(msg.splitlines()) == 1 and (key in msg or key.removeprefix("prefix_embeding_layer.") in msg)


def test_mlp_layout_errors_name_the_file_keys(tmp_path):
    """Errors about a reference ``mlp`` file name its own indices (no Dropout offset)."""
    ref = _random_reference("mlp")
    sd = {**ref.state_dict(), "hydra_mlp.1.3.linear.weight": torch.zeros(H, H)}  # a 4th block, unlike the others
    d = _write_reference(ref, "mlp", tmp_path / "ref")
    torch.save(sd, d / HYDRA_FILE_PT)
    with pytest.raises(SpectrtError, match="differs from hydra_mlp.1.1"):
        load_hydra(d)


# ------------------------------------------------------------------------------------ spectrt -> reference

@pytest.mark.parametrize("arch", ["mlp", "prefix-mlp"])
def test_saved_heads_load_into_reference(tmp_path, arch):
    heads = _random_spectrt(arch)
    out = save_hydra(heads, tmp_path / "saved")
    cfg = json.loads((out / "config.json").read_text())
    for k, v in reference_config(arch).items():
        if k not in ("base_model_name_or_path", "transformers_version"):
            assert cfg[k] == v, k
    sd = torch.load(out / HYDRA_FILE_PT, weights_only=True)
    ref = reference_module(arch)
    if arch == "mlp":
        ref.load_state_dict(sd, strict=True)
    else:  # strict except the reference's unused vocabulary table, which spectrt never writes
        missing, unexpected = ref.load_state_dict(sd, strict=False)
        assert unexpected == [] and missing == ["prefix_embeding_layer.embed_tokens.weight"]
    _assert_same(ref, heads)
    # the safetensors file holds the same tensors minus the aliases
    from safetensors.torch import load_file

    st = load_file(str(out / HYDRA_FILE))
    assert set(st) < set(sd) and all(torch.equal(st[k], sd[k]) for k in st)


@pytest.mark.parametrize("arch", ["mlp", "prefix-mlp"])
def test_saved_shared_lm_head_heads_in_reference(tmp_path, arch):
    """The reference has per-head LM heads initialised from the base's LM head; spectrt writes zero biases for
    heads that share it, so the reference (strict=False) computes exactly the shared head, and spectrt reads the
    file back as shared."""
    heads = _random_spectrt(arch, shared=True)
    lm = torch.randn(V, H)
    out = save_hydra(heads, tmp_path / "saved")
    sd = torch.load(out / HYDRA_FILE_PT, weights_only=True)
    ref = reference_module(arch, lm_head_init_weight=lm)
    missing, unexpected = ref.load_state_dict(sd, strict=False)
    lm_w = [f"hydra_lm_head.{i}.weight" if arch == "mlp" else f"hydra_lm_head.{i}.1.weight" for i in range(K)]
    assert unexpected == [] and sorted(missing) == sorted(
        lm_w + ([] if arch == "mlp" else ["prefix_embeding_layer.embed_tokens.weight"]))
    _assert_same(ref, heads, lm)
    again = load_hydra(out)
    assert again.config.shared_lm_head and again.config.vocab_size == V
    _assert_same(ref, again, lm)


def test_saved_shared_heads_without_vocab(tmp_path):
    heads = _random_spectrt("mlp", shared=True, vocab=None)
    out = save_hydra(heads, tmp_path / "saved")
    assert not any(k.startswith("hydra_lm_head") for k in torch.load(out / HYDRA_FILE_PT, weights_only=True))
    assert load_hydra(out).config.shared_lm_head


def test_nonzero_bias_without_weight_refused(tmp_path):
    ref = _random_reference("mlp")
    sd = {k: v for k, v in ref.state_dict().items() if not k.endswith("lm_head.1.weight")}
    d = _write_reference(ref, "mlp", tmp_path / "ref")
    torch.save(sd, d / HYDRA_FILE_PT)
    with pytest.raises(SpectrtError, match=r"hydra_lm_head\.1 weight has shape None"):
        load_hydra(d)


# ------------------------------------------------------------------------------------ backward compatibility

@pytest.mark.parametrize("arch", ["mlp", "prefix-mlp"])
def test_old_spectrt_checkpoints_still_load(tmp_path, arch):
    """spectrt before this layout fix wrote every arch in the Dropout layout (``hydra_mlp.{i}.1.*``,
    ``hydra_lm_head.{i}.1.*``), without the prefix layer's ``inv_freq``: those files keep loading."""
    from safetensors.torch import save_file

    heads = _random_spectrt(arch)
    d = tmp_path / "old"
    d.mkdir()
    old = dict(heads.state_dict())  # the old on-disk keys == the module's own
    assert "hydra_mlp.0.1.res_connection.weight" in old and "hydra_lm_head.0.1.weight" in old
    torch.save(old, d / HYDRA_FILE_PT)
    seen, unique = set(), {}
    for k, v in old.items():
        if v.data_ptr() not in seen:
            seen.add(v.data_ptr())
            unique[k] = v.contiguous()
    save_file(unique, str(d / HYDRA_FILE))
    (d / "config.json").write_text(json.dumps({
        "hydra_num_heads": K, "hydra_num_layers": L, "hydra_head_arch": arch, "grounded_heads": True,
        "hidden_state_offset": 0, "hidden_size": H, "vocab_size": V, "shared_lm_head": False,
        "prefix": heads.config.prefix, "format": "spectrt-hydra/1 (reference hydra_lm_head keys)"}))
    for name in (HYDRA_FILE, HYDRA_FILE_PT):
        again = load_hydra(d / name)
        assert again.config.arch == arch and again.config.num_layers == L
        for k, v in heads.state_dict().items():
            torch.testing.assert_close(again.state_dict()[k], v)


def test_shipped_hydra_heads_load():
    from pathlib import Path

    import spectrt

    d = Path(spectrt.__file__).parent / "data" / "heads" / "smollm2-135m-hydra"
    if not (d / HYDRA_FILE).is_file():
        pytest.skip("no shipped hydra heads")
    heads = load_hydra(d)
    assert heads.config.arch == "prefix-mlp" and heads.config.shared_lm_head
