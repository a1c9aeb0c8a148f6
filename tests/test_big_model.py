"""GPT-J larger than memory, scaled down: random sharded checkpoints written shard by shard, weights
converted layer by layer, and offloaded generation from memory-mapped remote buffers, checked
against transformers and against the in-memory path."""
import json
import os

import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers

from gptj_popxl import cli
from gptj_popxl.backend import popxl
from gptj_popxl.model.gptj import from_pretrained
from gptj_popxl.model.hf_mapping import SAFETENSORS_INDEX_FILE, hf_to_popxl, load_hf_state_dict
from gptj_popxl.model.weight_cache import load_layerwise
from gptj_popxl.random_checkpoint import write_random_checkpoint
from helpers_gptj import tiny_config

PROMPT = np.array([[3, 1, 4, 1, 5]])
NEW_TOKENS = 6


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """A tiny random checkpoint written by ``random-checkpoint`` (float32, one shard per layer)."""
    path = tmp_path_factory.mktemp("big") / "gptj"
    assert cli.main(["random-checkpoint", "--config", _config_file(tmp_path_factory), "--dtype", "float32",
                     "--output", str(path), "--seed", "3"]) == 0
    return str(path)


def _config_file(tmp_path_factory) -> str:
    file = tmp_path_factory.mktemp("config") / "config.json"
    file.write_text(json.dumps(tiny_config(n_positions=32).to_hf_dict()))
    return str(file)


def _hf_greedy(path, dtype=torch.float32) -> np.ndarray:
    hf = transformers.GPTJForCausalLM.from_pretrained(path, dtype=dtype).eval()
    with torch.no_grad():
        return hf.generate(torch.tensor(PROMPT), attention_mask=torch.ones_like(torch.tensor(PROMPT)),
                           max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0).numpy()


def test_random_checkpoint_is_sharded_and_loads_in_transformers(sharded):
    with open(os.path.join(sharded, SAFETENSORS_INDEX_FILE)) as f:
        weight_map = json.load(f)["weight_map"]
    config = tiny_config(n_positions=32)
    assert len(set(weight_map.values())) == config.n_layer + 2
    layer_1 = {name for name, file in weight_map.items() if file == weight_map["transformer.h.1.ln_1.weight"]}
    assert layer_1 == {name for name in weight_map if name.startswith("transformer.h.1.")}
    hf, info = transformers.GPTJForCausalLM.from_pretrained(sharded, output_loading_info=True)
    assert not any(info.values()), info
    stored = safetensors.numpy.load_file(os.path.join(sharded, weight_map["transformer.h.1.mlp.fc_in.weight"]))
    np.testing.assert_array_equal(hf.transformer.h[1].mlp.fc_in.weight.detach().numpy(),
                                  stored["transformer.h.1.mlp.fc_in.weight"])
    weight = stored["transformer.h.1.mlp.fc_in.weight"]
    assert abs(weight.std() * np.sqrt(config.n_embd) - 1) < 0.1  # std 1/sqrt(fan_in)


def test_layerwise_load_equals_whole_conversion(sharded):
    config = tiny_config(n_positions=32)
    whole = hf_to_popxl(load_hf_state_dict(sharded), config, 2, np.float16)
    layerwise = load_layerwise(sharded, config, 2, np.float16)
    assert whole.keys() == layerwise.keys()
    for name in whole:
        np.testing.assert_array_equal(layerwise[name], whole[name], err_msg=name)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_memory_mapped_offload_gives_in_memory_and_transformers_tokens(sharded, tmp_path, dtype):
    cache = tmp_path / "cache"
    offloaded = from_pretrained(sharded, dtype=dtype, offload=True, offload_cache_dir=cache)
    in_memory = from_pretrained(sharded, dtype=dtype)
    tokens = offloaded.generate(PROMPT, max_new_tokens=NEW_TOKENS)
    np.testing.assert_array_equal(tokens, in_memory.generate(PROMPT, max_new_tokens=NEW_TOKENS))
    if dtype == "float32":
        np.testing.assert_array_equal(tokens, _hf_greedy(sharded))
    # Every decoder weight is a view of the cache files, and the programs' remote buffers are those files.
    assert isinstance(offloaded.weights["layers.1.attn.qkv.weight"], np.memmap)
    stacked = offloaded.layer_storage["attn.qkv.weight"]
    assert os.path.dirname(stacked.filename) == str(cache)
    for program in offloaded.generator.programs:
        buffers = {b.tensor_shape: b for b in program.ir._remote_buffers}
        storage = program.session._rt.remote[buffers[stacked.shape[2:]].remote_buffer_id]
        assert storage.data_ptr() == stacked.ctypes.data


def test_offload_cache_never_replaces_a_directory_of_other_data(sharded):
    before = sorted(os.listdir(sharded))
    with pytest.raises(FileExistsError, match="it is not empty and holds no meta.json"):
        from_pretrained(sharded, offload=True, offload_cache_dir=sharded)
    assert sorted(os.listdir(sharded)) == before
    with pytest.raises(ValueError, match="offload_cache_dir .* needs offload=True"):
        from_pretrained(sharded, offload_cache_dir=sharded)


def test_offload_cache_is_written_once(sharded, tmp_path):
    cache = tmp_path / "cache"
    from_pretrained(sharded, offload=True, offload_cache_dir=cache)
    written = os.stat(cache / "meta.json").st_mtime_ns
    again = from_pretrained(sharded, offload=True, offload_cache_dir=cache)
    assert os.stat(cache / "meta.json").st_mtime_ns == written
    # Writes to the weights (copy-on-write maps) never reach the cache files.
    again.weights["ln_f.bias"][...] = 7
    assert not (np.load(cache / "ln_f.bias.npy") == 7).any()


def test_back_remote_buffer_keeps_entries_in_the_memmap(tmp_path):
    file = np.lib.format.open_memmap(tmp_path / "buffer.npy", mode="w+", dtype=np.float32, shape=(3, 1, 2, 2))
    file[...] = np.arange(12, dtype=np.float32).reshape(3, 1, 2, 2)
    ir = popxl.Ir()
    with ir.main_graph:
        buffer = popxl.remote_buffer((2, 2), popxl.float32, entries=3)
        popxl.back_remote_buffer(buffer, file)
        loaded = popxl.ops.remote_load(buffer, 2)
        popxl.ops.remote_store(buffer, 0, loaded + 1)
        out = popxl.d2h_stream((2, 2), popxl.float32, "out")
        popxl.ops.host_store(out, loaded)
    with popxl.Session(ir, "cpu") as session:
        result = session.run()[out]
    np.testing.assert_array_equal(result, np.arange(8, 12).reshape(2, 2))
    np.testing.assert_array_equal(file[0, 0], np.arange(8, 12).reshape(2, 2) + 1)
    with ir.main_graph:
        other = popxl.remote_buffer((2, 3), popxl.float32, entries=3)
        with pytest.raises(ValueError, match=r"3 entries x 1 replicas x \(2, 3\)"):
            popxl.back_remote_buffer(other, file)


def test_generate_cli_prompt_ids_offload(sharded, tmp_path, capsys):
    ids = ",".join(map(str, PROMPT[0]))
    assert cli.main(["generate", "--model", sharded, "--offload", "--offload-dir", str(tmp_path / "cache"),
                     "--prompt-ids", ids, "--max-new-tokens", str(NEW_TOKENS)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert json.loads(lines[0])["generated_ids"] == _hf_greedy(sharded)[0, PROMPT.shape[1]:].tolist()
    assert "tokens/s" in lines[1] and "peak memory" in lines[1]
    with pytest.raises(SystemExit):
        cli.main(["generate", "--model", sharded, "--prompt-ids", "1,x"])
    with pytest.raises(SystemExit):
        cli.main(["generate", "--model", sharded, "--offload-dir", str(tmp_path), "--prompt-ids", "1"])
    before = sorted(os.listdir(sharded))
    with pytest.raises(SystemExit):  # the checkpoint's own folder is not an offload cache: left alone
        cli.main(["generate", "--model", sharded, "--offload", "--offload-dir", sharded, "--prompt-ids", "1"])
    assert sorted(os.listdir(sharded)) == before
    assert "--offload-dir: refusing to replace" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["random-checkpoint", "--config", "gpt-j-600b", "--output", str(tmp_path / "x")])
