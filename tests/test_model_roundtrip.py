"""HF checkpoint -> our variables in a Session -> read back -> HF checkpoint, loaded by transformers unchanged."""
import numpy as np
import pytest
import torch
import transformers

import gptj_popxl
from gptj_popxl.model.hf_mapping import popxl_param_shapes, popxl_to_hf, save_hf_checkpoint
from helpers_gptj import tiny_checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("roundtrip"), seed=21)


def read_back(model, batch=1, seq=4):
    """Our parameters as held by a session that has run, in our layout (``hf_to_popxl``'s shapes)."""
    model.logits(np.zeros((batch, seq), np.int64))
    program = model.program("logits", batch, seq)
    named = program.variables.to_dict()
    data = program.session.get_tensors_data(list(named.values()))
    shapes = popxl_param_shapes(model.config, model.tensor_parallel)
    # With one shard a sharded variable has no group axis on the host; our layout keeps it.
    return {name: data[t].reshape(shapes[name]) for name, t in named.items()}


@pytest.mark.parametrize("tp, dtype", [(1, "float32"), (2, "float32"), (4, "float32"), (2, "float16")])
def test_roundtrip_through_session_variables(ckpt, tmp_path, tp, dtype):
    model = gptj_popxl.from_pretrained(ckpt, tensor_parallel=tp, dtype=dtype)
    hf_sd = popxl_to_hf(read_back(model), model.config, tp)
    out = tmp_path / "out"
    save_hf_checkpoint(out, model.config, hf_sd)

    original = transformers.GPTJForCausalLM.from_pretrained(ckpt).state_dict()
    reloaded = transformers.GPTJForCausalLM.from_pretrained(out, dtype=getattr(torch, dtype)).state_dict()
    assert sorted(reloaded) == sorted(original)
    for name, value in original.items():
        expected = value.to(getattr(torch, dtype))  # float16 keeps the float16-rounded weights exactly
        assert reloaded[name].dtype == expected.dtype, name
        assert torch.equal(reloaded[name], expected), name


def test_reloaded_checkpoint_gives_the_same_logits(ckpt, tmp_path):
    model = gptj_popxl.from_pretrained(ckpt, tensor_parallel=2)
    out = tmp_path / "again"
    save_hf_checkpoint(out, model.config, popxl_to_hf(read_back(model), model.config, 2))
    ids = np.random.default_rng(1).integers(0, model.config.vocab_size, size=(2, 5))
    np.testing.assert_array_equal(gptj_popxl.from_pretrained(out, tensor_parallel=2).logits(ids), model.logits(ids))
