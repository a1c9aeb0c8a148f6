"""Tests for GPT-J config, HF checkpoint I/O and the HF <-> TP layout mapping.

Every numerical expectation comes from transformers/torch (or from the layout
spelled out index by index), never from earlier outputs of the code under test.
"""
import json
import os

import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch
import torch
import transformers

from gptj_popxl.backend import popxl
from gptj_popxl.checkpoint import atomic_directory
from gptj_popxl.model.config import GPTJConfig, tp_layout
from gptj_popxl.model.hf_mapping import (
    hf_param_names,
    hf_to_popxl,
    load_hf_state_dict,
    popxl_param_shapes,
    popxl_to_hf,
    save_hf_checkpoint,
)
from gptj_popxl.model.layers import DecoderBlock, Embedding, LMHead, tp_groups

# n_head 6 and n_inner 150 pad at tp=4; vocab 101 pads at tp=2 and tp=4.
HF_KWARGS = dict(
    vocab_size=101, n_positions=64, n_embd=48, n_layer=2, n_head=6, rotary_dim=4, n_inner=150,
    bos_token_id=0, eos_token_id=0,
)
TPS = (1, 2, 4)


@pytest.fixture(scope="module")
def hf_model():
    torch.manual_seed(1234)
    model = transformers.GPTJForCausalLM(transformers.GPTJConfig(**HF_KWARGS)).eval()
    # HF init leaves biases 0 and LayerNorm weights 1; randomise everything so that
    # a swapped or misplaced tensor cannot go unnoticed.
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return model


@pytest.fixture(scope="module")
def hf_sd(hf_model):
    return {k: v.numpy().copy() for k, v in hf_model.state_dict().items()}


@pytest.fixture(scope="module")
def config(hf_model):
    return GPTJConfig.from_hf_dict(hf_model.config.to_dict())


@pytest.fixture(scope="module")
def saved_dir(hf_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("hf") / "single"
    hf_model.save_pretrained(path)
    return path


def assert_state_dicts_equal(actual, expected):
    assert sorted(actual) == sorted(expected)
    for k in expected:
        a, e = np.asarray(actual[k]), np.asarray(expected[k])
        assert a.dtype == e.dtype, k
        np.testing.assert_array_equal(a, e, err_msg=k)


# ----------------------------------------------------------------------------- config


def test_config_from_hf_and_back(hf_model, config):
    assert (config.vocab_size, config.n_positions, config.n_embd, config.n_layer, config.n_head) == (101, 64, 48, 2, 6)
    assert (config.rotary_dim, config.n_inner, config.inner_size, config.head_dim) == (4, 150, 150, 8)
    assert config.layer_norm_epsilon == hf_model.config.layer_norm_epsilon
    hf_cfg = transformers.GPTJConfig(**config.to_hf_dict())
    for key in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "rotary_dim", "n_inner",
                "layer_norm_epsilon", "activation_function", "tie_word_embeddings"):
        assert getattr(hf_cfg, key) == getattr(hf_model.config, key), key
    assert hf_cfg.model_type == "gptj" and hf_cfg.architectures == ["GPTJForCausalLM"]


def test_config_defaults_and_pretrained_dir(saved_dir, config):
    assert GPTJConfig.from_pretrained_dir(saved_dir) == config
    cfg = GPTJConfig.from_hf_dict(dict(vocab_size=11, n_embd=16, n_head=2, n_layer=1, rotary_dim=None, n_inner=None))
    assert cfg.rotary_dim == cfg.head_dim == 8
    assert cfg.inner_size == 64 and cfg.n_inner is None
    # Missing keys take transformers' defaults.
    assert GPTJConfig.from_hf_dict({}) == GPTJConfig.from_hf_dict(transformers.GPTJConfig().to_dict())


@pytest.mark.parametrize("kwargs, match", [
    (dict(n_embd=50, n_head=6), "n_embd .50. must be divisible by n_head .6."),
    (dict(activation_function="relu"), "activation_function must be 'gelu_new'"),
    (dict(rotary_dim=5), "rotary_dim .5. must be even"),
    (dict(tie_word_embeddings=True), "tie_word_embeddings"),
    (dict(n_layer=0), "n_layer must be a positive integer"),
    (dict(layer_norm_epsilon=float("inf")), "layer_norm_epsilon must be a finite positive number, got inf"),
])
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GPTJConfig(**{**dict(vocab_size=101, n_embd=48, n_head=6, rotary_dim=4), **kwargs})


def test_config_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        GPTJConfig.from_pretrained_dir(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 48}))
    with pytest.raises(ValueError, match=r"config.json.*model_type 'gpt2'"):
        GPTJConfig.from_pretrained_dir(tmp_path)


def test_tp_layout(config):
    lay = tp_layout(config, 4)
    assert (lay.tp, lay.heads_padded, lay.heads_per_shard) == (4, 8, 2)
    assert (lay.inner_padded, lay.inner_per_shard) == (152, 38)
    assert (lay.vocab_padded, lay.vocab_per_shard) == (104, 26)
    lay = tp_layout(config, 1)
    assert (lay.heads_padded, lay.inner_padded, lay.vocab_padded) == (6, 150, 101)
    for bad in (0, -1, 1.0, True):
        with pytest.raises(ValueError, match="tp must be an integer >= 1"):
            tp_layout(config, bad)


# ----------------------------------------------------------------------------- loading


def test_load_safetensors(saved_dir, hf_sd, config):
    sd = load_hf_state_dict(saved_dir)
    assert_state_dicts_equal(sd, hf_sd)
    assert sorted(hf_param_names(config)) == sorted(hf_sd)


def test_load_sharded_safetensors(hf_model, hf_sd, tmp_path):
    hf_model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    assert_state_dicts_equal(load_hf_state_dict(tmp_path), hf_sd)


def test_load_torch_bin_skips_buffers(hf_model, hf_sd, tmp_path):
    # transformers 5 only writes safetensors, so write the legacy format directly, with
    # the causal-mask buffers that old GPT-J checkpoints carry.
    sd = dict(hf_model.state_dict())
    sd["transformer.h.0.attn.bias"] = torch.ones(1, 1, 4, 4, dtype=torch.bool)
    sd["transformer.h.0.attn.masked_bias"] = torch.tensor(-1e9)
    torch.save(sd, tmp_path / "pytorch_model.bin")
    assert_state_dicts_equal(load_hf_state_dict(tmp_path), hf_sd)


def _write_sharded_bin(model, path, n_shards=3):
    names = list(model.state_dict())
    weight_map = {}
    for s in range(n_shards):
        shard = f"pytorch_model-{s + 1:05d}-of-{n_shards:05d}.bin"
        part = names[s::n_shards]
        torch.save({n: model.state_dict()[n] for n in part}, path / shard)
        weight_map.update({n: shard for n in part})
    (path / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def test_load_sharded_torch_bin(hf_model, hf_sd, tmp_path):
    _write_sharded_bin(hf_model, tmp_path)
    assert_state_dicts_equal(load_hf_state_dict(tmp_path), hf_sd)


def test_load_keeps_fp16_and_widens_bf16(tmp_path):
    a = torch.randn(3, 5)
    safetensors.torch.save_file({"h": a.half(), "b": a.bfloat16()}, tmp_path / "model.safetensors")
    sd = load_hf_state_dict(tmp_path)
    assert sd["h"].dtype == np.float16 and sd["b"].dtype == np.float32
    np.testing.assert_array_equal(sd["h"], a.half().numpy())
    np.testing.assert_array_equal(sd["b"], a.bfloat16().float().numpy())


class _NotATensor:
    pass


def test_load_torch_bin_refuses_arbitrary_pickles(tmp_path):
    torch.save({"w": _NotATensor()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"pytorch_model\.bin.*weights_only=True"):
        load_hf_state_dict(tmp_path)


def test_load_errors(hf_model, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no weights in checkpoint directory .*model\.safetensors"):
        load_hf_state_dict(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_hf_state_dict(tmp_path / "nope")
    hf_model.save_pretrained(tmp_path, max_shard_size="20KB")
    victim = sorted(tmp_path.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(FileNotFoundError, match=f"shard {victim.name} named in .*model.safetensors.index.json"):
        load_hf_state_dict(tmp_path)


def test_load_error_when_index_lists_absent_tensor(hf_model, tmp_path):
    _write_sharded_bin(hf_model, tmp_path)
    index = json.loads((tmp_path / "pytorch_model.bin.index.json").read_text())
    index["weight_map"]["transformer.h.9.ln_1.weight"] = "pytorch_model-00001-of-00003.bin"
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"transformer\.h\.9\.ln_1\.weight \(in pytorch_model-00001-of-00003\.bin\)"):
        load_hf_state_dict(tmp_path)


# ----------------------------------------------------------------------------- mapping


@pytest.mark.parametrize("tp", TPS)
def test_round_trip_is_bit_identical(hf_sd, config, tp):
    params = hf_to_popxl(hf_sd, config, tp)
    assert {k: v.shape for k, v in params.items()} == popxl_param_shapes(config, tp)
    assert all(v.dtype == np.float32 and v.flags.c_contiguous for v in params.values())
    back = popxl_to_hf(params, config, tp)
    assert list(back) == hf_param_names(config)
    assert_state_dicts_equal(back, hf_sd)
    assert not any(np.shares_memory(b, p) for b in back.values() for p in params.values())
    # Handed over, the results may be views: same values, no copy of a weight that only changes layout.
    handed_over = popxl_to_hf(params, config, tp, copy=False)
    assert_state_dicts_equal(handed_over, hf_sd)
    if tp == 1:
        assert np.shares_memory(handed_over["lm_head.weight"], params["lm_head.weight"])


def test_hf_to_popxl_casts_dtype(hf_sd, config):
    params = hf_to_popxl(hf_sd, config, 2, dtype=np.float16)
    assert all(v.dtype == np.float16 for v in params.values())
    np.testing.assert_array_equal(params["ln_f.bias"], hf_sd["transformer.ln_f.bias"].astype(np.float16))


def _linear(x, w):
    """torch reference: x @ w.T for an HF (out, in) weight."""
    return torch.nn.functional.linear(torch.from_numpy(x), torch.from_numpy(w)).numpy()


@pytest.mark.parametrize("tp", (2, 4))
def test_sharded_attention_matches_torch(hf_model, hf_sd, config, tp):
    params = hf_to_popxl(hf_sd, config, tp)
    lay = tp_layout(config, tp)
    h, d, hps = config.n_head, config.head_dim, lay.heads_per_shard
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, config.n_embd), dtype=np.float32)
    for layer in range(config.n_layer):
        attn = hf_model.transformer.h[layer].attn
        with torch.no_grad():
            ref = {n: getattr(attn, f"{n}_proj")(torch.from_numpy(x)).numpy().reshape(5, h, d) for n in "qkv"}
        qkv = params[f"layers.{layer}.attn.qkv.weight"]
        for s in range(tp):
            y = (x @ qkv[s]).reshape(5, 3, hps, d)
            for j in range(hps):
                head = s * hps + j
                for which, n in enumerate("qkv"):
                    got = y[:, which, j]
                    if head < h:
                        np.testing.assert_allclose(got, ref[n][:, head], rtol=1e-5, atol=1e-5)
                    else:
                        assert not got.any(), f"padded head {head} must be zero"
        # Row-parallel output projection: summing per-shard partial products of the
        # (zero-padded) head outputs gives HF's out_proj.
        a = rng.standard_normal((5, h * d), dtype=np.float32)
        a_padded = np.pad(a, ((0, 0), (0, (lay.heads_padded - h) * d)))
        out_w = params[f"layers.{layer}.attn.out.weight"]
        got = sum(a_padded[:, s * hps * d:(s + 1) * hps * d] @ out_w[s] for s in range(tp))
        with torch.no_grad():
            ref_out = attn.out_proj(torch.from_numpy(a)).numpy()
        np.testing.assert_allclose(got, ref_out, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tp", (2, 4))
def test_sharded_mlp_matches_torch(hf_model, hf_sd, config, tp):
    params = hf_to_popxl(hf_sd, config, tp)
    x = np.random.default_rng(1).standard_normal((5, config.n_embd), dtype=np.float32)
    for layer in range(config.n_layer):
        p = f"layers.{layer}.mlp."
        got = params[p + "fc_out.bias"].copy()
        for s in range(tp):
            pre = torch.from_numpy(x @ params[p + "fc_in.weight"][s] + params[p + "fc_in.bias"][s])
            act = torch.nn.functional.gelu(pre, approximate="tanh").numpy()  # == gelu_new
            got = got + act @ params[p + "fc_out.weight"][s]
        with torch.no_grad():
            ref = hf_model.transformer.h[layer].mlp(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("tp", (2, 4))
def test_sharded_embedding_and_logits_match_torch(hf_model, hf_sd, config, tp):
    params = hf_to_popxl(hf_sd, config, tp)
    vps = tp_layout(config, tp).vocab_per_shard
    ids = np.array([0, 1, 25, 26, 50, 51, 77, 100])
    emb = params["embedding.word.weight"]
    got = np.stack([emb[i // vps, i % vps] for i in ids])
    with torch.no_grad():
        np.testing.assert_array_equal(got, hf_model.transformer.wte(torch.from_numpy(ids)).numpy())

    h = torch.from_numpy(np.random.default_rng(2).standard_normal((5, config.n_embd), dtype=np.float32))
    normed = torch.nn.functional.layer_norm(
        h, (config.n_embd,), torch.from_numpy(params["ln_f.weight"]), torch.from_numpy(params["ln_f.bias"]),
        config.layer_norm_epsilon,
    ).numpy()
    shards = [normed @ params["lm_head.weight"][s] + params["lm_head.bias"][s] for s in range(tp)]
    logits = np.concatenate(shards, axis=-1)
    assert not logits[:, config.vocab_size:].any(), "padded vocab logits must be zero"
    with torch.no_grad():
        ref = hf_model.lm_head(hf_model.transformer.ln_f(h)).numpy()
    np.testing.assert_allclose(logits[:, :config.vocab_size], ref, rtol=1e-5, atol=1e-5)


def test_popxl_to_hf_follows_layout_and_drops_padding(config):
    """Random 'gradients' with non-zero padding, checked against the layout index by index."""
    tp = 4
    lay = tp_layout(config, tp)
    rng = np.random.default_rng(3)
    g = {k: rng.standard_normal(shape).astype(np.float32) for k, shape in popxl_param_shapes(config, tp).items()}
    hf = popxl_to_hf(g, config, tp)
    d, hps, ips, vps = config.head_dim, lay.heads_per_shard, lay.inner_per_shard, lay.vocab_per_shard
    for row in range(config.vocab_size):
        s, j = divmod(row, vps)
        np.testing.assert_array_equal(hf["transformer.wte.weight"][row], g["embedding.word.weight"][s, j])
        np.testing.assert_array_equal(hf["lm_head.weight"][row], g["lm_head.weight"][s, :, j])
        assert hf["lm_head.bias"][row] == g["lm_head.bias"][s, j]
    for layer in range(config.n_layer):
        src, dst = f"layers.{layer}.", f"transformer.h.{layer}."
        for head in range(config.n_head):
            s, j = divmod(head, hps)
            rows = slice(head * d, (head + 1) * d)
            for which, n in enumerate("qkv"):
                cols = slice((which * hps + j) * d, (which * hps + j + 1) * d)
                np.testing.assert_array_equal(
                    hf[dst + f"attn.{n}_proj.weight"][rows], g[src + "attn.qkv.weight"][s][:, cols].T
                )
            np.testing.assert_array_equal(
                hf[dst + "attn.out_proj.weight"][:, rows], g[src + "attn.out.weight"][s][j * d:(j + 1) * d].T
            )
        for unit in range(config.inner_size):
            s, j = divmod(unit, ips)
            np.testing.assert_array_equal(hf[dst + "mlp.fc_in.weight"][unit], g[src + "mlp.fc_in.weight"][s][:, j])
            assert hf[dst + "mlp.fc_in.bias"][unit] == g[src + "mlp.fc_in.bias"][s, j]
            np.testing.assert_array_equal(hf[dst + "mlp.fc_out.weight"][:, unit], g[src + "mlp.fc_out.weight"][s, j])
        for n in ("ln_1.weight", "ln_1.bias", "mlp.fc_out.bias"):
            np.testing.assert_array_equal(hf[dst + n], g[src + n])
    np.testing.assert_array_equal(hf["transformer.ln_f.weight"], g["ln_f.weight"])
    np.testing.assert_array_equal(hf["transformer.ln_f.bias"], g["ln_f.bias"])


@pytest.mark.parametrize("tp", (2, 4))
def test_phase_modules_weight_maps_fit_their_variables(config, tp):
    """Each phase module maps exactly the variables its graph declares: sharded ones (tp replica groups)
    with a leading axis of tp blocks, replicated ones as declared."""
    ir = popxl.Ir(replication=tp)
    with ir.main_graph:
        groups = tp_groups(ir, tp)
        x = popxl.TensorSpec((1, 4, config.n_embd), popxl.float32)
        ids = popxl.TensorSpec((1, 4), popxl.int32)
        offset = popxl.TensorSpec((), popxl.int32)
        for phase, args in ((Embedding(config, groups), (ids, offset)), (DecoderBlock(config, groups), (x, ids)),
                            (LMHead(config, groups), (x,))):
            facts, _ = phase.create_graph(*args)
            declared = {}
            for name, f in facts.to_dict().items():
                sharded = f.replica_grouping is not None and f.replica_grouping.num_groups == tp
                declared[name] = ((tp,) if sharded else ()) + tuple(f.shape)
            assert declared == {m.name: m.shape for m in phase.weight_maps(config, tp)}, type(phase).__name__


def test_mapping_errors_name_the_tensor(hf_sd, config):
    sd = dict(hf_sd)
    del sd["transformer.h.1.mlp.fc_in.bias"]
    with pytest.raises(ValueError, match=r"missing 1 tensor\(s\): transformer\.h\.1\.mlp\.fc_in\.bias"):
        hf_to_popxl(sd, config, 2)
    sd = dict(hf_sd, **{"transformer.h.0.attn.q_proj.weight": np.zeros((48, 40), np.float32)})
    bad_shape = r"transformer\.h\.0\.attn\.q_proj\.weight has shape \(48, 40\), expected \(48, 48\)"
    with pytest.raises(ValueError, match=bad_shape):
        hf_to_popxl(sd, config, 2)
    sd = dict(hf_sd, **{"transformer.h.2.ln_1.weight": np.zeros(48, np.float32)})
    with pytest.raises(ValueError, match=r"unexpected tensor\(s\): transformer\.h\.2\.ln_1\.weight"):
        hf_to_popxl(sd, config, 2)
    params = hf_to_popxl(hf_sd, config, 2)
    wrong_tp = r"tp=4 parameters: tensor embedding\.word\.weight has shape \(2, 51, 48\), expected \(4, 26, 48\)"
    with pytest.raises(ValueError, match=wrong_tp):
        popxl_to_hf(params, config, 4)


@pytest.mark.parametrize("offload", (False, True))
def test_safetensors_with_more_layers_than_the_config_are_refused(saved_dir, tmp_path, offload):
    """Weights for a deeper model under a config.json that names fewer layers: the layer-by-layer path
    (in memory and offloaded) refuses the tensors it has no place for, as ``hf_to_popxl`` does."""
    import gptj_popxl

    shallow = tmp_path / "shallow"
    shallow.mkdir()
    hf_config = json.loads((saved_dir / "config.json").read_text())
    assert hf_config["n_layer"] >= 2
    (shallow / "config.json").write_text(json.dumps(dict(hf_config, n_layer=hf_config["n_layer"] - 1)))
    os.link(saved_dir / "model.safetensors", shallow / "model.safetensors")
    last = hf_config["n_layer"] - 1
    with pytest.raises(ValueError, match=rf"unexpected tensor\(s\): transformer\.h\.{last}\."):
        gptj_popxl.from_pretrained(shallow, offload=offload, offload_cache_dir=tmp_path / "cache" if offload else None)
    if offload:  # also with a cache written while config.json still named every layer
        (shallow / "config.json").write_text(json.dumps(hf_config))
        gptj_popxl.from_pretrained(shallow, offload=True, offload_cache_dir=tmp_path / "cache")
        (shallow / "config.json").write_text(json.dumps(dict(hf_config, n_layer=last)))
        with pytest.raises(ValueError, match=rf"unexpected tensor\(s\): transformer\.h\.{last}\."):
            gptj_popxl.from_pretrained(shallow, offload=True, offload_cache_dir=tmp_path / "cache")


# ----------------------------------------------------------------------------- saving


@pytest.mark.parametrize("safe", (True, False))
def test_save_round_trips_through_transformers(hf_sd, config, tmp_path, safe):
    out = tmp_path / "ckpt"
    save_hf_checkpoint(out, config, popxl_to_hf(hf_to_popxl(hf_sd, config, 4), config, 4), safe_serialization=safe)
    assert (out / ("model.safetensors" if safe else "pytorch_model.bin")).is_file()
    loaded = transformers.GPTJForCausalLM.from_pretrained(out)
    assert_state_dicts_equal({k: v.numpy() for k, v in loaded.state_dict().items()}, hf_sd)
    assert os.listdir(tmp_path) == ["ckpt"]


def _snapshot(path):
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def test_save_replaces_existing_checkpoint(hf_sd, config, tmp_path):
    out = tmp_path / "ckpt"
    save_hf_checkpoint(out, config, hf_sd)
    (out / "stale.txt").write_text("from an older run")
    doubled = {k: v * 2 for k, v in hf_sd.items()}
    save_hf_checkpoint(out, config, doubled)
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
    assert_state_dicts_equal(load_hf_state_dict(out), doubled)
    assert os.listdir(tmp_path) == ["ckpt"]


def test_failed_save_leaves_existing_checkpoint_intact(hf_sd, config, tmp_path, monkeypatch):
    out = tmp_path / "ckpt"
    save_hf_checkpoint(out, config, hf_sd)
    before = _snapshot(out)

    def half_write_then_fail(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\0" * 100)
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.numpy, "save_file", half_write_then_fail)
    with pytest.raises(OSError, match="disk full"):
        save_hf_checkpoint(out, config, {k: v * 2 for k, v in hf_sd.items()})
    assert _snapshot(out) == before
    assert os.listdir(tmp_path) == ["ckpt"]


def test_save_validates_before_writing(hf_sd, config, tmp_path):
    sd = dict(hf_sd)
    del sd["lm_head.bias"]
    with pytest.raises(ValueError, match="lm_head.bias"):
        save_hf_checkpoint(tmp_path / "ckpt", config, sd)
    assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------- atomic helpers


def test_atomic_directory_failure_keeps_old_and_cleans_up(tmp_path):
    target = tmp_path / "d"
    with atomic_directory(target, "a") as tmp:
        with open(os.path.join(tmp, "a"), "w") as f:
            f.write("complete")
    with pytest.raises(RuntimeError):
        with atomic_directory(target, "a") as tmp:
            with open(os.path.join(tmp, "b"), "w") as f:
                f.write("partial")
            raise RuntimeError("boom")
    assert os.listdir(target) == ["a"]
    assert (target / "a").read_text() == "complete"
    assert os.listdir(tmp_path) == ["d"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="file"):
        with atomic_directory(tmp_path / "file", "a"):
            pass


def test_writers_never_replace_a_directory_of_other_data(hf_sd, config, tmp_path):
    """A checkpoint replaces a checkpoint (or an empty directory), never a folder of the user's files."""
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "thesis.tex").write_text("years of work")
    with pytest.raises(FileExistsError, match=r"refusing to replace .*notes: it is not empty and holds no "
                                              r"config.json"):
        save_hf_checkpoint(tmp_path / "notes", config, hf_sd)
    assert os.listdir(tmp_path / "notes") == ["thesis.tex"]
    (tmp_path / "empty").mkdir()
    save_hf_checkpoint(tmp_path / "empty", config, hf_sd)
    save_hf_checkpoint(tmp_path / "empty", config, hf_sd)  # its own output: replaced
    assert "config.json" in os.listdir(tmp_path / "empty")
