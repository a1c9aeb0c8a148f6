"""Our GPT-J against Hugging Face transformers on tiny random checkpoints, plus the API's errors and the CLI.

The reference numbers come from ``transformers.GPTJForCausalLM`` run here (eager attention),
never from our own earlier outputs. The tiny configs pad heads, MLP columns and vocabulary
at tp = 2 and 4 (see ``helpers_gptj.TINY``) and use rotary_dim < head_dim.
"""
import numpy as np
import pytest
import torch
import transformers

import gptj_popxl
from gptj_popxl import cli, golden
from gptj_popxl.model.config import tp_layout
from gptj_popxl.model.hf_mapping import hf_param_names, popxl_param_shapes
from gptj_popxl.programs.execution import ExecutionConfig
from helpers_gptj import TINY, tiny_checkpoint, tiny_config

hf_reference = golden.hf_logits_loss_grads  # transformers' logits, loss and parameter gradients

BATCH, SEQ = 2, 8
# The stated float16 tolerances (both models run in float16): logits relative to max |logits|
# (5e-3), the loss absolute (1e-3), gradients relative to each gradient's max |value| (1e-2).
F16 = golden.TOLERANCES["float16"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("ckpt"), seed=3)


@pytest.fixture(scope="module")
def tokens():
    rng = np.random.default_rng(7)
    ids = rng.integers(0, TINY["vocab_size"], size=(BATCH, SEQ))
    labels = ids.copy()
    labels[0, 2] = labels[0, 5] = labels[1, 7] = -100  # the ignore path, including a last position
    return ids, labels


@pytest.fixture(scope="module")
def hf32(ckpt, tokens):
    return hf_reference(ckpt, *tokens)


def max_rel(a, b):
    return np.max(np.abs(a - b)) / np.max(np.abs(b))


def assert_matches(ours, ref, logits_atol, loss_atol, grad_rel, logits_rel=False):
    (logits, loss, grads), (ref_logits, ref_loss, ref_grads) = ours, ref
    assert logits.shape == ref_logits.shape and logits.dtype == np.float32
    err = max_rel(logits, ref_logits) if logits_rel else np.max(np.abs(logits - ref_logits))
    assert err <= logits_atol, f"logits error {err}"
    assert abs(loss - ref_loss) <= loss_atol, (loss, ref_loss)
    assert sorted(grads) == sorted(ref_grads)
    for name, g in ref_grads.items():
        assert grads[name].shape == g.shape, name
        assert max_rel(grads[name], g) <= grad_rel, (name, max_rel(grads[name], g))


def ours(path, ids, labels, **kwargs):
    model = gptj_popxl.from_pretrained(path, **kwargs)
    return (model.logits(ids), *model.loss_and_grads(ids, labels))


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_float32_matches_hf(ckpt, tokens, hf32, tp):
    assert_matches(ours(ckpt, *tokens, tensor_parallel=tp), hf32, 1e-4, 1e-5, 1e-3)


def test_the_model_follows_popxl_addons_vocabulary_shards(ckpt, tokens, hf32, monkeypatch):
    """Under the SDK, popxl-addons' Embedding rounds a vocabulary shard up to a multiple of 16 rows (ours
    does not): the model's layout follows its embedding layer, so it still matches transformers."""
    def addons_shard_size(vocab_size, n_shards):
        return 16 * -(-(-(-vocab_size // n_shards)) // 16)
    monkeypatch.setattr(gptj_popxl.addons.layers.Embedding, "get_vocab_shard_size", staticmethod(addons_shard_size))
    model = gptj_popxl.from_pretrained(ckpt, tensor_parallel=2)
    assert tp_layout(model.config, 2).vocab_per_shard == 64  # 101 tokens: 51 rows a shard rounded up
    assert_matches((model.logits(tokens[0]), *model.loss_and_grads(*tokens)), hf32, 1e-4, 1e-5, 1e-3)


def test_replicated_gradients_agree_on_every_shard(ckpt, tokens):
    model = gptj_popxl.from_pretrained(ckpt, tensor_parallel=4)
    out = model.program("loss_and_grads", BATCH, SEQ).run(input_ids=tokens[0], labels=tokens[1])
    np.testing.assert_array_equal(out["loss"], np.full(4, out["loss"][0]))
    replicated = [n for n, shape in popxl_param_shapes(model.config, 4).items() if shape[0] != 4]
    assert "ln_f.weight" in replicated and "layers.1.mlp.fc_out.bias" in replicated
    for name in replicated:
        for replica in out[name][1:]:
            np.testing.assert_array_equal(replica, out[name][0], err_msg=name)


def test_uneven_shapes_and_full_rotary(tmp_path):
    # head_dim 8 fully rotated; at tp=4 the last shard holds only padding heads (3 -> 4) and padding
    # vocabulary entries (5 -> 8).
    path = tiny_checkpoint(tmp_path, vocab_size=5, n_embd=24, n_head=3, rotary_dim=8, n_inner=30, n_layer=1)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 5, size=(3, 5))
    ref = hf_reference(path, ids, ids)
    for tp in (2, 4):
        assert_matches(ours(path, ids, ids, tensor_parallel=tp), ref, 1e-4, 1e-5, 1e-3)


def test_ignore_index_skips_labels(ckpt, tokens):
    ids, labels = tokens
    model = gptj_popxl.from_pretrained(ckpt, tensor_parallel=2)
    all_ignored_but_one = np.full_like(labels, -100)
    all_ignored_but_one[1, 3] = labels[1, 3]
    loss, grads = model.loss_and_grads(ids, all_ignored_but_one)
    ref_loss = hf_reference(ckpt, ids, all_ignored_but_one)[1]
    assert abs(loss - ref_loss) <= 1e-5
    # Position 2 predicts token 3 of row 1 only: the head's gradient touches row 1, token 2's hidden state.
    logits = model.logits(ids)[1, 2]
    p = np.exp(logits - logits.max())
    p /= p.sum()
    expected_bias_grad = p - np.eye(TINY["vocab_size"])[labels[1, 3]]
    np.testing.assert_allclose(grads["lm_head.bias"], expected_bias_grad, atol=1e-6)


@pytest.mark.parametrize("tp", [1, 2])
def test_float16_matches_hf(ckpt, tokens, tp):
    ref = hf_reference(ckpt, *tokens, dtype="float16")
    assert_matches(ours(ckpt, *tokens, tensor_parallel=tp, dtype="float16"), ref,
                   F16.logits, F16.loss, F16.grads, logits_rel=True)


def test_attention_serialisation_gives_the_same_numbers(ckpt, tokens, hf32):
    plain = ours(ckpt, *tokens, tensor_parallel=2)
    blocked = ours(ckpt, *tokens, tensor_parallel=2, attention_serialisation=4)
    np.testing.assert_allclose(blocked[0], plain[0], rtol=0, atol=1e-6)
    assert abs(blocked[1] - plain[1]) <= 1e-6
    for name in plain[2]:
        np.testing.assert_allclose(blocked[2][name], plain[2][name], rtol=0, atol=1e-6, err_msg=name)
    assert_matches(blocked, hf32, 1e-4, 1e-5, 1e-3)


def test_programs_are_compiled_once_per_kind_and_shape(ckpt, tokens):
    ids, labels = tokens
    model = gptj_popxl.from_pretrained(ckpt)
    first = model.program("logits", BATCH, SEQ)
    np.testing.assert_array_equal(model.logits(ids), model.logits(ids))
    assert model.program("logits", BATCH, SEQ) is first
    assert model.program("logits", 1, 4) is not first
    assert model.program("loss_and_grads", BATCH, SEQ) is not first
    # A shorter sequence is a new program and agrees with the longer one on the shared prefix (causality).
    np.testing.assert_allclose(model.logits(ids[:1, :4]), model.logits(ids)[:1, :4], atol=1e-5)


def test_programs_of_every_kind_and_shape_keep_one_copy_of_the_weights(ckpt, tokens, hf32, tmp_path):
    # On the CPU runtime with one replica the logits and loss programs of every shape, and the
    # generation programs, hold their weights in the model's one weight memory; after
    # weights_changed each computes with the new weights.
    ids, labels = tokens
    model = gptj_popxl.from_pretrained(ckpt)
    assert_matches((model.logits(ids), *model.loss_and_grads(ids, labels)), hf32, 1e-4, 1e-5, 1e-3)
    model.logits(ids[:1, :4])
    model.generate(ids[:1, :4], max_new_tokens=2)
    programs = [model.program("logits", BATCH, SEQ), model.program("logits", 1, 4),
                model.program("loss_and_grads", BATCH, SEQ), *model.generator.programs]
    for program in programs:
        held = {v.name: program.session._device_tensor(v) for v in program.ir.main_graph.variables
                if v.name in model.weights}
        assert held, program
        for name, device in held.items():
            memory = model.weight_memory(name, tuple(device.shape[1:]), device.numpy().dtype)
            assert device.data_ptr() == memory.ctypes.data, name
    written = []  # (program, variable names) of every write of weights into a session
    for program in programs:
        def write(data, program=program, inner=program.session.write_variables_data):
            written.append((program, sorted(v.name for v in data)))
            inner(data)
        program.session.write_variables_data = write
    other = tiny_checkpoint(tmp_path, seed=5)
    model.weights.update(gptj_popxl.from_pretrained(other).weights)
    model.weights_changed()
    assert_matches((model.logits(ids), *model.loss_and_grads(ids, labels)), hf_reference(other, ids, labels),
                   1e-4, 1e-5, 1e-3)
    model.logits(ids[:1, :4])
    np.testing.assert_array_equal(model.generate(ids[:1, :4], max_new_tokens=2),
                                  gptj_popxl.from_pretrained(other).generate(ids[:1, :4], max_new_tokens=2))
    # The new weights were copied into the shared memory once, not once per program.
    names = [name for _, loaded in written for name in loaded]
    assert sorted(names) == sorted(set(names)) and set(names) == set(model.weights)


# ----------------------------------------------------------------------------- input validation


@pytest.fixture(scope="module")
def model(ckpt):
    return gptj_popxl.from_pretrained(ckpt, tensor_parallel=2)


@pytest.mark.parametrize("ids, error, match", [
    (np.zeros((2, 4), np.float32), TypeError, r"input_ids must be an integer array, got dtype float32"),
    (np.zeros(4, np.int64), ValueError, r"input_ids must be a non-empty 2-D array .* shape \(4,\)"),
    (np.zeros((2, 0), np.int64), ValueError, r"input_ids must be a non-empty 2-D.*\(2, 0\)"),
    (np.zeros((1, TINY["n_positions"] + 1), np.int64), ValueError, r"sequence length 17 exceeds .*n_positions \(16\)"),
    (np.array([[0, 101]]), ValueError, r"input_ids \(shape \(1, 2\)\) must hold values in \[0, 101\); found 101"),
    (np.array([[0, -100]]), ValueError, r"input_ids .* found -100 at \(0, 1\)"),
])
def test_logits_rejects_bad_input_ids(model, ids, error, match):
    with pytest.raises(error, match=match):
        model.logits(ids)


def test_loss_rejects_bad_labels(model):
    ids = np.zeros((2, 4), np.int64)
    with pytest.raises(ValueError, match=r"labels shape \(2, 3\) differs from input_ids shape \(2, 4\)"):
        model.loss_and_grads(ids, np.zeros((2, 3), np.int64))
    with pytest.raises(ValueError, match=r"labels .* \[0, 101\) or -100; found -5 at \(1, 2\)"):
        model.loss_and_grads(ids, np.where(np.arange(8).reshape(2, 4) == 6, -5, 0))
    with pytest.raises(TypeError, match=r"labels must be an integer array"):
        model.loss_and_grads(ids, ids.astype(np.float64))
    with pytest.raises(ValueError, match=r"needs seq >= 2"):
        model.loss_and_grads(ids[:, :1], ids[:, :1])


def test_from_pretrained_rejects_bad_options(ckpt, tmp_path):
    with pytest.raises(ValueError, match=r"tensor_parallel must be an integer >= 1, got 0"):
        gptj_popxl.from_pretrained(ckpt, tensor_parallel=0)
    with pytest.raises(ValueError, match=r"dtype must be one of \['float16', 'float32'\], got 'bfloat16'"):
        gptj_popxl.from_pretrained(ckpt, dtype="bfloat16")
    with pytest.raises(FileNotFoundError, match=r"no config.json"):
        gptj_popxl.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"attention_serialisation must be an integer >= 1, got 0"):
        gptj_popxl.from_pretrained(ckpt, attention_serialisation=0)
    model = gptj_popxl.from_pretrained(ckpt, attention_serialisation=3)
    with pytest.raises(ValueError, match=r"3 query blocks must be a positive divisor of the sequence length 8"):
        model.logits(np.zeros((1, 8), np.int64))
    with pytest.raises(ValueError, match=r"program kind must be one of \['logits', 'loss_and_grads'\], got 'train'"):
        model.program("train", 1, 3)
    with pytest.raises(ValueError, match=r"batch=1, seq=17\): .* seq <= n_positions \(16\)"):
        model.program("logits", 1, 17)
    with pytest.raises(ValueError, match=r"tensor_parallel=2 disagree\(s\) with execution .*tensor_parallel=4"):
        gptj_popxl.from_pretrained(ckpt, tensor_parallel=2, execution=ExecutionConfig(tensor_parallel=4))


# ----------------------------------------------------------------------------- golden report and CLI


def test_random_checkpoint_leaves_no_parameter_at_its_initial_value(ckpt):
    model = transformers.GPTJForCausalLM.from_pretrained(ckpt)
    for name, p in model.named_parameters():
        assert p.std() > 0.05 and not torch.all(p == 1), name


def test_random_checkpoint_replaces_an_existing_directory_whole(tmp_path):
    path = tmp_path / "ckpt"
    path.mkdir()
    (path / "pytorch_model.bin").write_bytes(b"stale")
    with pytest.raises(FileExistsError, match="holds no config.json"):  # not a checkpoint: left alone
        golden.random_hf_checkpoint(path, tiny_config(n_layer=1), seed=1)
    (path / "config.json").write_text("{}")
    golden.random_hf_checkpoint(path, tiny_config(n_layer=1), seed=1)
    assert not (path / "pytorch_model.bin").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temporary sibling left behind
    transformers.GPTJForCausalLM.from_pretrained(path)


def test_compare_with_hf_reports_every_tensor(ckpt):
    report = golden.compare_with_hf(ckpt, batch=2, seq=8, execution=ExecutionConfig(tensor_parallel=2))
    assert report.tensor_parallel == 2
    assert [r.name for r in report.rows] == ["logits", "loss"] + hf_param_names(tiny_config())
    assert report.passed, report.table()
    assert report.row("logits").max_abs <= 1e-4
    assert report.table().splitlines()[-1] == "PASS"


def test_error_row_measures():
    row = golden.error_row("g", np.array([1.0, 2.5]), np.array([1.0, 2.0]), "rel", 0.3)
    assert (row.max_abs, row.max_rel, row.passed) == (0.5, 0.25, True)
    assert not golden.error_row("g", np.array([np.nan]), np.array([1.0]), "abs", 1.0).passed
    with pytest.raises(ValueError, match=r"our shape \(2,\) differs from the reference shape \(3,\)"):
        golden.error_row("g", np.zeros(2), np.zeros(3), "abs", 1.0)


def test_cli_golden_passes_and_prints_a_table(ckpt, capsys):
    assert cli.main(["golden", "--model", ckpt, "--tensor-parallel", "2", "--seq", "8"]) == 0
    out = capsys.readouterr().out
    assert "lm_head.bias" in out and out.strip().endswith("PASS")


def test_cli_golden_fails_past_tolerance(ckpt, capsys, monkeypatch):
    monkeypatch.setitem(golden.TOLERANCES, "float32", golden.Tolerances(logits=0.0, loss=0.0, grads=0.0))
    assert cli.main(["golden", "--model", ckpt, "--seq", "4"]) == 1
    assert "FAIL" in capsys.readouterr().out


@pytest.mark.parametrize("args, match", [
    (["--model", "/nonexistent/dir"], r"--model /nonexistent/dir: no such directory"),
    (["--tensor-parallel", "0"], r"--tensor-parallel: expected an integer >= 1, got 0"),
    (["--dtype", "bfloat16"], r"--dtype: invalid choice: 'bfloat16'"),
    (["--seq", "17"], r"--seq 17 exceeds the model's n_positions \(16\)"),
    (["--seq", "6", "--attention-serialisation", "4"], r"--attention-serialisation 4 must divide"),
])
def test_cli_rejects_bad_options(ckpt, capsys, args, match):
    argv = ["golden"] + (args if args[0] == "--model" else ["--model", ckpt] + args)
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    assert __import__("re").search(match, capsys.readouterr().err)


def test_cli_model_dir_without_config(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["golden", "--model", str(tmp_path)])
    assert e.value.code == 2 and "no config.json" in capsys.readouterr().err
