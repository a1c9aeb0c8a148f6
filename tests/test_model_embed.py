"""Our decoder-block graph called with ops.call from a user's own popxl program, against HF's GPTJBlock.

The user program makes its own Ir, h2d/d2h streams, variables (from our factories, filled with
a HF checkpoint's weights) and Session; the only things it takes from us are the block module
and the weight layout.
"""
import numpy as np
import pytest
import torch
import transformers

from gptj_popxl.backend import ops, popxl
from gptj_popxl.model.config import GPTJConfig
from gptj_popxl.model.gptj import create_variables
from gptj_popxl.model.hf_mapping import hf_to_popxl
from gptj_popxl.model.layers import DecoderBlock, tp_groups
from helpers_gptj import tiny_checkpoint

BATCH, SEQ = 2, 6


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    path = tiny_checkpoint(tmp_path_factory.mktemp("embed"), seed=11, n_layer=1)
    return transformers.GPTJForCausalLM.from_pretrained(path, attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(5)
    hidden = rng.normal(size=(BATCH, SEQ, 36)).astype(np.float32)
    # Rows start at different positions, as a continuation would.
    positions = np.stack([np.arange(SEQ) + 3, np.arange(SEQ) + 9]).astype(np.int32)
    return hidden, positions


def hf_block_output(hf_model, hidden, positions):
    mask = torch.full((SEQ, SEQ), torch.finfo(torch.float32).min).triu(1)[None, None]
    with torch.no_grad():
        out = hf_model.transformer.h[0](torch.from_numpy(hidden), attention_mask=mask,
                                        position_ids=torch.from_numpy(positions).long())
    return (out[0] if isinstance(out, tuple) else out).numpy()


def run_user_program(hf_model, hidden, positions, tp, dp=1):
    """Our block in a user program with ``tp * dp`` replicas; ``hidden``/``positions`` carry a leading
    axis of one entry per data-parallel copy. Returns the output of every replica."""
    config = GPTJConfig.from_hf_dict(hf_model.config.to_dict())
    weights = hf_to_popxl({k: v.numpy() for k, v in hf_model.state_dict().items()}, config, tp)
    replicas = tp * dp

    ir = popxl.Ir(replication=replicas)
    with ir.main_graph:
        x_stream = popxl.h2d_stream(hidden.shape[1:], popxl.float32, "hidden")
        pos_stream = popxl.h2d_stream(positions.shape[1:], popxl.int32, "positions")
        x, pos = ops.host_load(x_stream), ops.host_load(pos_stream)
        facts, block = DecoderBlock(config, tp_groups(ir, tp)).create_graph(x, pos)
        (y,) = block.bind(create_variables(facts, weights, prefix="layers.0.")).call(x, pos)
        y_stream = popxl.d2h_stream(y.shape, y.dtype, "out")
        ops.host_store(y_stream, y)

    def per_replica(a):
        # The tensor-parallel group of a data-parallel copy is `tp` consecutive replicas.
        return np.repeat(a, tp, axis=0) if replicas > 1 else a[0]
    with popxl.Session(ir) as session:
        out = session.run({x_stream: per_replica(hidden), pos_stream: per_replica(positions)})[y_stream]
    return out if replicas > 1 else out[None]


@pytest.mark.parametrize("tp,dp", [(1, 1), (2, 1), (4, 1), (1, 2), (2, 2)])
def test_block_in_user_program_matches_hf_block(hf_model, inputs, tp, dp):
    hidden, positions = inputs
    # Each data-parallel copy gets its own batch.
    hiddens = np.stack([hidden * (1 + d) for d in range(dp)])
    positionss = np.stack([positions + d for d in range(dp)])
    out = run_user_program(hf_model, hiddens, positionss, tp, dp)
    assert out.shape == (tp * dp,) + hidden.shape
    for r, replica in enumerate(out):  # every shard ends with its copy's full hidden states
        expected = hf_block_output(hf_model, hiddens[r // tp], positionss[r // tp])
        np.testing.assert_allclose(replica, expected, rtol=0, atol=1e-5)


def test_create_variables_names_missing_and_misshapen_weights(hf_model):
    config = GPTJConfig.from_hf_dict(hf_model.config.to_dict())
    weights = hf_to_popxl({k: v.numpy() for k, v in hf_model.state_dict().items()}, config, 2)
    ir = popxl.Ir(replication=2)
    with ir.main_graph:
        x = popxl.variable(np.zeros((1, 2, 36), np.float32))
        pos = popxl.variable(np.zeros((1, 2), np.int32))
        facts, _ = DecoderBlock(config, tp_groups(ir, 2)).create_graph(x, pos)
        with pytest.raises(KeyError, match=r"no weights for variable 'layers.0.ln_1.weight'"):
            create_variables(facts, {k: v for k, v in weights.items() if k != "layers.0.ln_1.weight"},
                             prefix="layers.0.")
        bad = dict(weights, **{"layers.0.mlp.fc_in.bias": np.zeros((50,), np.float32)})
        with pytest.raises(ValueError, match=r"'layers.0.mlp.fc_in.bias' have shape \(50,\); variable needs \(2, 25\)"):
            create_variables(facts, bad, prefix="layers.0.")


def test_tp_groups_needs_a_divisor_of_the_replication_factor():
    ir = popxl.Ir(replication=4)
    with pytest.raises(ValueError, match=r"tensor-parallel degree 3 must be a positive divisor of .* 4"):
        tp_groups(ir, 3)
    groups = tp_groups(ir, 2)  # 2 shards x 2 data-parallel copies
    assert groups.sharded.assignment == [0, 1, 0, 1]
    assert groups.tp_group.assignment == [0, 0, 1, 1]
