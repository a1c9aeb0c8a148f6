"""``gptj-popxl plan``: shape-only programs, parameter count, FLOPs and collective bytes from formulas."""
import json

import numpy as np
import pytest
import torch
import transformers
from torch.utils.flop_counter import FlopCounterMode

from gptj_popxl.backend import popxl
from gptj_popxl.cli import main
from gptj_popxl.configs import load_config
from gptj_popxl.plan import GC200_MEMORY_BYTES, generation_plan, make_plan, parameter_count

PLAN_FIELDS = ("parameters", "replicas", "tensor_parallel", "data_parallel", "peak_device_bytes_per_replica",
               "remote_bytes_per_replica", "device_memory_bytes_per_replica", "fits", "phases")


def hf_parameter_count(name: str) -> int:
    hf = _hf_meta_model(load_config(name).gptj_config(), torch.float32)
    return sum(p.numel() for p in hf.parameters())


@pytest.mark.parametrize("name", ["tiny", "gptj_6B_1024_pod16"])
def test_parameter_count_matches_transformers(name):
    assert parameter_count(load_config(name).gptj_config()) == hf_parameter_count(name)


def test_plan_json_of_tiny(capsys):
    assert main(["plan", "--config", "tiny", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    for field in PLAN_FIELDS:
        assert field in plan, field
    named = load_config("tiny")
    m, ex = named.model, named.execution
    assert (plan["replicas"], plan["tensor_parallel"], plan["data_parallel"]) == (8, 4, 2)
    assert plan["parameters"] == hf_parameter_count("tiny")
    assert plan["device_memory_bytes_per_replica"] == GC200_MEMORY_BYTES
    assert plan["peak_device_bytes_per_replica"] == max(p["peak_device_bytes"] for p in plan["phases"])
    assert plan["fits"] is True
    assert plan["remote_bytes_per_replica"] > 0
    generation = plan["generation"]
    assert generation["batch"] == ex.micro_batch_size
    assert generation["max_new_tokens"] == named.training.sequence_length // 2
    for program in ("prefill", "decode"):
        for field in ("peak_device_bytes_per_replica", "remote_bytes_per_replica", "kv_cache_bytes_per_replica",
                      "flops_per_token_per_replica", "collective_bytes_per_replica", "fits"):
            assert field in generation[program], (program, field)

    # One replica's decoder forward, from the model's shapes: its four weight matmuls on its tensor
    # shard, plus scores and weighted values of its heads; then the two all-reduces of each layer's
    # (micro-batch, seq, n_embd) float32 partial sums, and the all-gather of its input's 1 / tp slices.
    tp, seq, steps = ex.tensor_parallel, named.training.sequence_length, named.gradient_accumulation
    e, inner, head_dim = m.n_embd, 4 * m.n_embd, m.n_embd // m.n_head
    tokens = steps * ex.micro_batch_size * seq
    weight_flops = 2 * tokens * (3 * e * e + e * e + 2 * e * inner) // tp
    attention_flops = 2 * 2 * steps * ex.micro_batch_size * seq * seq * head_dim * (m.n_head // tp)
    decoder = next(p for p in plan["phases"] if p["name"] == "decoder_fwd")
    assert decoder["flops"] == m.n_layer * (weight_flops + attention_flops)
    hidden_bytes = ex.micro_batch_size * seq * e * 4
    assert decoder["collective_bytes"] == m.n_layer * steps * (2 * hidden_bytes + hidden_bytes // tp)


def test_shape_only_program_holds_no_weight_data():
    """Every variable of the 6B-shaped plan keeps one broadcast value, never a materialised array."""
    from gptj_popxl.programs.common import shape_only_weights
    from gptj_popxl.programs.execution import ExecutionConfig
    from gptj_popxl.programs.inference import build_logits

    config = load_config("gptj_6B_1024_pod16").gptj_config(n_positions=16)
    program = build_logits(config, ExecutionConfig(tensor_parallel=16, dtype="float16"),
                           shape_only_weights(config, 16), 1, 16, attach=False)
    assert program.session is None
    weights = program.variables.to_dict().values()
    assert len(weights) == 8 * config.n_layer + 5
    assert all(not any(v._data.strides) for v in weights)


def test_broadcast_variable_data_is_copied_and_runs():
    """The runtime keeps a broadcast value as it is, yet a session sees the value and later changes
    of the source do not reach the variable (popxl copies variable data)."""
    source = np.array(3.0, np.float32)
    ir = popxl.Ir()
    with ir.main_graph:
        v = popxl.variable(np.broadcast_to(source, (4, 5)), popxl.float16, "v")
    source[...] = 7.0
    with popxl.Session(ir, "cpu") as session:
        np.testing.assert_array_equal(session.get_tensor_data(v), np.full((4, 5), 3.0, np.float16))
        session.write_variable_data(v, np.ones((4, 5), np.float16))
        np.testing.assert_array_equal(session.get_tensor_data(v), np.ones((4, 5), np.float16))


@pytest.mark.parametrize("name", ["gptj_6B_1024_pod16", "gptj_6B_1024_pod64"])
def test_6b_configs_fit_a_gc200(name):
    plan = make_plan(name)
    named = load_config(name)
    assert plan["replicas"] == named.execution.tensor_parallel * named.execution.data_parallel
    assert plan["phased"] is True
    assert plan["fits"] is True
    assert plan["peak_device_bytes_per_replica"] < GC200_MEMORY_BYTES
    generation = plan["generation"]
    assert generation["offload"] is True
    for program in ("prefill", "decode"):
        assert generation[program]["fits"] is True
    # Decoding keeps one layer's weights and the KV cache on the device: less than a training phase.
    assert generation["decode"]["peak_device_bytes_per_replica"] < plan["peak_device_bytes_per_replica"]


def _program_still_trying_its_ways():
    """A live session of another program whose decode op has timed none of its ways yet."""
    from gptj_popxl.model.decode_kernels import streamed_matmul
    ir = popxl.Ir()
    with ir.main_graph:
        streamed_matmul(popxl.variable(np.ones((2, 8), np.float32)), popxl.variable(np.ones((8, 4), np.float32)))
    return popxl.Session(ir)


def test_bench_json_of_tiny(tmp_path, capsys):
    out = tmp_path / "bench.json"
    other = _program_still_trying_its_ways()  # bench reports and waits for its own programs only
    assert main(["bench", "--config", "tiny", "--steps", "1", "--json", str(out), "--layers", "1",
                 "--tensor-parallel", "2", "--data-parallel", "1", "--gradient-accumulation", "1",
                 "--new-tokens", "2", "--no-phased"]) == 0
    result = json.loads(out.read_text())
    settings = result["settings"]
    assert (settings["tensor_parallel"], settings["data_parallel"], settings["phased"]) == (2, 1, False)
    assert (settings["n_layer"], settings["rows_per_step"], settings["prompt_length"]) == (1, 1, 6)
    assert settings["parameters"] == hf_parameter_count("tiny") - _layer_parameters("tiny")
    for side in ("ours", "transformers"):
        for key in ("train_tokens_per_s", "prefill_tokens_per_s", "decode_tokens_per_s"):
            assert result[side][key] > 0
    for key, ratio in result["ratios"].items():
        assert ratio == pytest.approx(result["ours"][key] / result["transformers"][key])
    # Tensor parallel decodes with streamed_matmul (decode_layer and greedy_head need one shard).
    ways = result["decode_products"]["streamed_matmul"]
    streamed = {f"streamed on {n} thread{'s' * (n > 1)}" for n in (1, torch.get_num_threads())}
    assert set(ways) <= {"blas", *streamed} and sum(ways.values()) > 0  # settled before the timed calls
    assert "train" in capsys.readouterr().out
    del other


def test_take_turns_alternates_the_sides_and_reverses_every_other_round():
    from gptj_popxl.bench import take_turns
    calls = []
    times = take_turns({"ours": lambda: calls.append("ours"), "peer": lambda: calls.append("peer")},
                       rounds=4, calls_per_turn=2)
    assert calls == ["ours"] * 2 + ["peer"] * 4 + ["ours"] * 4 + ["peer"] * 4 + ["ours"] * 2
    assert {side: t.shape for side, t in times.items()} == {"ours": (4,), "peer": (4,)}
    assert all((t >= 0).all() for t in times.values())


def _layer_parameters(name: str) -> int:
    """One decoder layer of GPT-J: two LayerNorm vectors, q, k, v, out, and the MLP (4x) with biases."""
    e = load_config(name).model.n_embd
    return 2 * e + 4 * e * e + 2 * 4 * e * e + 4 * e + e


def test_bench_refuses_the_6b_model(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--config", "gptj_6B_1024_pod16"])
    assert exit_info.value.code == 2
    assert "--layers" in capsys.readouterr().err


def test_phased_activations_are_sliced_over_tensor_parallel():
    """x and dx: (layers + 1) rows of every micro-batch's hidden states, a 1 / tp slice on each shard."""
    from gptj_popxl.programs.common import shape_only_weights
    from gptj_popxl.programs.execution import ExecutionConfig
    from gptj_popxl.programs.phased import build_phased_training_step
    from gptj_popxl.programs.training import OptimizerConstants

    named = load_config("tiny")
    m, seq, tp, steps = named.model, named.training.sequence_length, 4, 3
    config = named.gptj_config(n_positions=seq)
    ex = ExecutionConfig(tensor_parallel=tp, gradient_accumulation=steps, phased=True)
    step = build_phased_training_step(config, ex, shape_only_weights(config, tp), seq,
                                      OptimizerConstants(0.9, 0.999, 1e-6, 0.0, 1.0, False), attach=False)
    remote = step.memory_report().remote_bytes
    assert remote["activations"] == 2 * (m.n_layer + 1) * steps * seq * m.n_embd * 4 // tp
    # Every buffer has a kind; "io": each micro-batch's input ids and labels, its loss seed and its loss.
    assert set(remote) == {"io", "activations", "weights", "optimizer", "gradients"}
    assert remote["io"] == steps * (2 * seq * 4 + 2 * 4)


def _hf_meta_model(config, dtype):
    """transformers' GPT-J of ``config`` on the meta device (shapes only), eager attention as ours."""
    hf_config = transformers.GPTJConfig(**config.to_hf_dict())
    with torch.device("meta"):
        return transformers.GPTJForCausalLM._from_config(hf_config, attn_implementation="eager", dtype=dtype)


def _cache_bytes(cache) -> int:
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


@pytest.mark.parametrize("tp, dtype", [(2, "float16"), (2, "float32"), (1, "float32")])
def test_generation_plan_matches_transformers_on_the_meta_device(tp, dtype):
    """KV-cache bytes and matmul FLOPs per token of the prefill and decode programs, per replica,
    against transformers' model run on the meta device (its cache tensors and a FLOP counter), / tp."""
    from gptj_popxl.programs.common import shape_only_weights
    from gptj_popxl.programs.execution import ExecutionConfig

    batch, new_tokens = 2, 6
    config = load_config("tiny").gptj_config(n_positions=16)
    ex = ExecutionConfig(tensor_parallel=tp, dtype=dtype, phased=True)
    plan = generation_plan(config, ex, shape_only_weights(config, tp), batch, new_tokens)
    # 10 prompt tokens are padded to the next bucket (16); 5 decode steps (the prefill makes the first)
    # in one run of 5, on 16 + 5 cache columns.
    assert (plan["prompt_length"], plan["decode_chunk"], plan["cache_length"]) == (16, 5, 21)
    prompt, cache_len = plan["prompt_length"], plan["cache_length"]
    prefill, decode = plan["prefill"], plan["decode"]

    hf = _hf_meta_model(config, getattr(torch, dtype))
    with torch.device("meta"):
        with FlopCounterMode(display=False) as counter:
            out = hf(torch.zeros((batch, prompt), dtype=torch.long), use_cache=True, logits_to_keep=1)
        assert prefill["kv_cache_bytes_per_replica"] == _cache_bytes(out.past_key_values) // tp
        assert prefill["flops_per_token_per_replica"] == counter.get_total_flops() / (batch * prompt * tp)

        past = hf(torch.zeros((batch, cache_len - 1), dtype=torch.long), use_cache=True, logits_to_keep=1)
        with FlopCounterMode(display=False) as counter:
            out = hf(torch.zeros((batch, 1), dtype=torch.long), past_key_values=past.past_key_values, use_cache=True)
        assert decode["kv_cache_bytes_per_replica"] == _cache_bytes(out.past_key_values) // tp
        assert decode["flops_per_token_per_replica"] == counter.get_total_flops() / (batch * tp)
    assert decode["tokens_per_run"] == batch * plan["decode_chunk"]
    assert decode["flops_per_replica"] == decode["flops_per_token_per_replica"] * decode["tokens_per_run"]
    # Offloaded: every decoder layer's weights are in remote buffers, 1 / tp of each on a replica.
    e = config.n_embd
    layer_weights = (2 * e + 4 * e * e + 2 * 4 * e * e + 4 * e + e) * np.dtype(dtype).itemsize
    for program in (prefill, decode):
        remote = program["remote_bytes_per_replica"]
        assert config.n_layer * layer_weights // tp <= remote <= config.n_layer * layer_weights


@pytest.mark.parametrize("option, value", [("--max-new-tokens", "1"), ("--max-new-tokens", "8"),
                                           ("--generate-batch", "0")])
def test_plan_refuses_bad_generation_options(option, value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["plan", "--config", "tiny", option, value])
    assert exit_info.value.code == 2
    assert option[2:].replace("-", "_") in capsys.readouterr().err
