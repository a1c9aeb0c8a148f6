"""Generation against transformers' ``GPTJForCausalLM.generate`` on tiny random checkpoints."""
import numpy as np
import pytest
import torch
import transformers
from transformers.generation.logits_process import (LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper,
                                                    TopPLogitsWarper)

from gptj_popxl import generation, popxl_cpu
from gptj_popxl.model.decode_kernels import product_choices
from gptj_popxl.model.gptj import from_pretrained
from helpers_gptj import tiny_checkpoint

# Left padding: row 0 has two pad tokens, row 1 none, row 2 one.
IDS = np.array([[0, 0, 5, 7, 9], [1, 2, 3, 4, 5], [0, 11, 12, 13, 14]])
MASK = (np.arange(5)[None] >= np.array([[2], [0], [1]])).astype(np.int64)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("gen"), n_positions=32)


@pytest.fixture(scope="module")
def hf(checkpoint):
    return transformers.GPTJForCausalLM.from_pretrained(checkpoint).eval()


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    # Decode runs of 3 (4 without eos) steps, so a few new tokens already span several runs.
    monkeypatch.setattr(generation, "DECODE_CHUNK", 3)
    monkeypatch.setattr(generation, "DECODE_CHUNK_TO_THE_END", 4)


def hf_generate(hf, ids, mask=None, **kw):
    with torch.no_grad():
        mask = np.ones_like(ids) if mask is None else mask
        out = hf.generate(torch.tensor(ids), attention_mask=torch.tensor(mask),
                          do_sample=False, **{"pad_token_id": 0, **kw})
    return out.numpy()


def test_prompt_buckets_pad_a_long_prompt_by_at_most_a_quarter():
    # Powers of two up to 64 columns, then four equal steps per doubling, capped at n_positions.
    lengths = [1, 8, 9, 64, 65, 81, 128, 129, 400, 513]
    assert [generation.prompt_bucket(n, 4096) for n in lengths] == [8, 8, 16, 64, 80, 96, 128, 160, 448, 640]
    assert generation.prompt_bucket(400, 420) == 420
    buckets = {generation.prompt_bucket(n, 4096) for n in range(65, 4097)}
    assert len(buckets) == 4 * 6 and all(generation.prompt_bucket(n, 4096) <= 1.25 * n for n in range(65, 4097))


@pytest.mark.parametrize("length", [70, 100])
def test_long_prompts_in_their_buckets_equal_transformers(tmp_path, length):
    path = tiny_checkpoint(tmp_path, n_positions=128)
    hf_long = transformers.GPTJForCausalLM.from_pretrained(path).eval()
    ids = np.random.default_rng(length).integers(1, 101, size=(2, length))
    np.testing.assert_array_equal(from_pretrained(path).generate(ids, max_new_tokens=6),
                                  hf_generate(hf_long, ids, max_new_tokens=6))


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_greedy_equals_transformers(checkpoint, hf, tp):
    model = from_pretrained(checkpoint, tensor_parallel=tp)
    free = hf_generate(hf, IDS, MASK, max_new_tokens=8)
    np.testing.assert_array_equal(model.generate(IDS, attention_mask=MASK, max_new_tokens=8), free)
    # eos: the token row 0 makes 2nd; rows must finish at different steps for the case to count.
    eos = int(free[0, 6])
    ref = hf_generate(hf, IDS, MASK, max_new_tokens=8, eos_token_id=eos, pad_token_id=99)
    finished = [int(np.argmax(row[5:] == eos)) if (row[5:] == eos).any() else None for row in ref]
    assert finished[0] == 1 and len(set(finished)) > 1
    out = model.generate(IDS, attention_mask=MASK, max_new_tokens=8, eos_token_id=eos, pad_token_id=99)
    np.testing.assert_array_equal(out, ref)


def test_a_list_of_eos_tokens_equals_transformers(checkpoint, hf):
    """eos_token_id as a list: a row finishes on any of them; pads default to the first, as transformers'."""
    model = from_pretrained(checkpoint)
    free = hf_generate(hf, IDS, MASK, max_new_tokens=8)
    eos = [int(free[0, 6]), int(free[1, 7])]  # row 0's 2nd new token, row 1's 3rd
    for pad in (99, None):
        ref = hf_generate(hf, IDS, MASK, max_new_tokens=8, eos_token_id=eos, pad_token_id=pad)
        assert ref[0, 6] == eos[0] and ref[1, 7] == eos[1]  # the rows finish on different eos tokens
        np.testing.assert_array_equal(
            model.generate(IDS, attention_mask=MASK, max_new_tokens=8, eos_token_id=eos, pad_token_id=pad), ref)
    firsts = [hf_generate(hf, IDS[i:i + 1, MASK[i] == 1], max_new_tokens=8, eos_token_id=eos)[0, MASK[i].sum():]
              for i in range(3)]
    got = model.generate_many([IDS[i, MASK[i] == 1] for i in range(3)], max_new_tokens=8, eos_token_id=eos)
    for i, (row, ref) in enumerate(zip(got, firsts)):
        stop = [t for t, token in enumerate(ref) if token in eos]
        np.testing.assert_array_equal(row, ref[: stop[0] + 1] if stop else ref, err_msg=f"prompt {i}")
    with pytest.raises(TypeError, match="eos_token_id must be an int or a list of ints"):
        model.generate(IDS, max_new_tokens=2, eos_token_id=[1.5])


def test_greedy_in_one_run_equals_transformers(checkpoint, hf, monkeypatch):
    monkeypatch.setattr(generation, "DECODE_CHUNK_TO_THE_END", 64)  # the default: 7 decode steps in one run
    model = from_pretrained(checkpoint)
    np.testing.assert_array_equal(model.generate(IDS, attention_mask=MASK, max_new_tokens=8),
                                  hf_generate(hf, IDS, MASK, max_new_tokens=8))


@pytest.mark.parametrize("tp", [1, 2])
def test_float16_greedy_equals_transformers_float16(checkpoint, tp):
    """float16 generation (tp 1: the C++ layer kernels, which compute in float32 between float16
    tensors; tp 2: the graph's float16 ops) gives transformers' float16 greedy tokens."""
    hf16 = transformers.GPTJForCausalLM.from_pretrained(checkpoint, torch_dtype=torch.float16).eval()
    model = from_pretrained(checkpoint, tensor_parallel=tp, dtype="float16")
    np.testing.assert_array_equal(model.generate(IDS, attention_mask=MASK, max_new_tokens=8),
                                  hf_generate(hf16, IDS, MASK, max_new_tokens=8))
    kernels = product_choices(program.ir for program in model.generator.programs)
    assert ({"prefill_layer", "greedy_decode_steps"} <= kernels.keys()) == (tp == 1), kernels
    # The programs hold float16 weights and caches (this prompt's tokens are the same in float32).
    held = {v.name: v.dtype for program in model.generator.programs for v in program.ir._variables
            if v.dtype.is_floating_point}
    assert any("cache" in name for name in held) and set(held.values()) == {popxl_cpu.float16}, held


def test_early_stop_shape(checkpoint, hf):
    model = from_pretrained(checkpoint)
    free = hf_generate(hf, IDS[1:2], max_new_tokens=8)
    eos = int(free[0, 7])  # row's 3rd new token, so generation stops after 3 of 8
    ref = hf_generate(hf, IDS[1:2], max_new_tokens=8, eos_token_id=eos)
    out = model.generate(IDS[1:2], max_new_tokens=8, eos_token_id=eos)
    assert out.shape == ref.shape == (1, 8)
    np.testing.assert_array_equal(out, ref)


@pytest.mark.parametrize("tp", [1, 2])
def test_kv_cache_logits_equal_transformers_past_key_values(checkpoint, hf, tp):
    model = from_pretrained(checkpoint, tensor_parallel=tp)
    steps = 7
    slots = generation.Slots(model.generator, 3, generation.prompt_bucket(5, 32), steps + 1, None,
                             np.random.default_rng(0), with_logits=True)
    slots.start(range(3), IDS, MASK)
    ours = [slots.logits]
    tokens = [np.argmax(slots.logits, -1)]
    while len(ours) < steps + 1:
        new = slots.advance()
        ours.extend(slots.logits[:, j] for j in range(slots.chunk))
        tokens.extend(new[:, j] for j in range(slots.chunk))
    # transformers, step by step with its cache, fed the same tokens.
    mask = torch.tensor(MASK)
    with torch.no_grad():
        positions = torch.tensor(np.where(MASK, MASK.cumsum(1) - 1, 1))
        out = hf(torch.tensor(IDS), attention_mask=mask, position_ids=positions, use_cache=True)
        past, ref = out.past_key_values, [out.logits[:, -1]]
        for t in range(steps):
            mask = torch.cat([mask, torch.ones((3, 1), dtype=mask.dtype)], 1)
            out = hf(torch.tensor(tokens[t])[:, None], attention_mask=mask, past_key_values=past,
                     position_ids=(mask.sum(1, keepdim=True) - 1), use_cache=True)
            past = out.past_key_values
            ref.append(out.logits[:, -1])
    for t in range(steps + 1):
        np.testing.assert_allclose(ours[t], ref[t].numpy(), atol=1e-4, rtol=1e-4, err_msg=f"step {t}")


def warped_probs(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> np.ndarray:
    """transformers' processed sampling distribution: temperature, top-k, top-p, softmax."""
    warpers = LogitsProcessorList([TemperatureLogitsWarper(temperature), TopKLogitsWarper(top_k),
                                   TopPLogitsWarper(top_p)])
    return torch.softmax(warpers(None, logits.float()), dim=-1).numpy()


def hf_next_probs(hf, ids, mask, **warp) -> np.ndarray:
    """Warped next-token probabilities after every position of ``ids`` (batch, seq, vocab)."""
    with torch.no_grad():
        logits = hf(torch.tensor(ids), attention_mask=torch.tensor(mask),
                    position_ids=torch.tensor(np.where(mask, mask.cumsum(1) - 1, 1))).logits
    return np.stack([warped_probs(logits[:, t], **warp) for t in range(ids.shape[1])], axis=1)


@pytest.mark.parametrize("tp", [1, 2])
def test_sampling_limits_equal_greedy(checkpoint, hf, tp):
    model = from_pretrained(checkpoint, tensor_parallel=tp)
    greedy = hf_generate(hf, IDS, MASK, max_new_tokens=6)
    for options in (dict(top_k=1, temperature=0.5), dict(top_p=1e-6), dict(top_k=3, top_p=1e-6, temperature=2.0)):
        out = model.generate(IDS, attention_mask=MASK, max_new_tokens=6, do_sample=True, seed=1, **options)
        np.testing.assert_array_equal(out, greedy, err_msg=str(options))


def test_sampling_defaults_to_transformers_top_k(checkpoint, hf):
    """With no top_k, as transformers' generate: only its default top-k (50 of this model's 101 tokens)."""
    model = from_pretrained(checkpoint)
    rows = 300
    out = model.generate(np.tile(IDS[1], (rows, 1)), max_new_tokens=1, do_sample=True, seed=0)
    with torch.no_grad():  # transformers' warped scores: -inf outside the tokens it may sample
        scores = hf.generate(torch.tensor(IDS[1:2]), attention_mask=torch.ones((1, 5), dtype=torch.long),
                             do_sample=True, max_new_tokens=1, output_scores=True, return_dict_in_generate=True,
                             pad_token_id=0).scores[0][0].numpy()
    allowed = np.isfinite(scores)
    assert allowed.sum() == 50
    assert allowed[out[:, -1]].all()


def test_seed_reproduces_and_tokens_lie_in_transformers_set(checkpoint, hf):
    model = from_pretrained(checkpoint, tensor_parallel=2)
    warp = dict(temperature=0.7, top_k=5, top_p=0.8)
    runs = [model.generate(IDS, attention_mask=MASK, max_new_tokens=7, do_sample=True, seed=s, **warp)
            for s in (3, 3, 4)]
    np.testing.assert_array_equal(runs[0], runs[1])
    assert (runs[0] != runs[2]).any()
    for out in runs[::2]:
        mask = np.concatenate([MASK, np.ones((3, 7), np.int64)], axis=1)
        probs = hf_next_probs(hf, out, mask, **warp)
        for t in range(5, out.shape[1]):
            chosen = probs[np.arange(3), t - 1, out[:, t]]
            assert (chosen > 0).all(), f"step {t - 5}: sampled tokens {out[:, t]} outside transformers' set"


def chi_square_p(counts: np.ndarray, probs: np.ndarray) -> float:
    """p-value of observed ``counts`` under ``probs`` (cells expecting < 5 merged)."""
    expected = probs * counts.sum()
    big = expected >= 5
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    stat = float(((obs - exp) ** 2 / exp).sum())
    return float(torch.special.gammaincc(torch.tensor((len(obs) - 1) / 2.0), torch.tensor(stat / 2.0)))


def test_sampled_frequencies_match_transformers(checkpoint, hf):
    """Many rows of one prompt sample independently: first tokens (prefill) and second tokens
    after the most frequent first one (decode) follow transformers' warped probabilities."""
    model = from_pretrained(checkpoint, tensor_parallel=2)
    warp = dict(temperature=1.5, top_k=8, top_p=0.9)
    rows = 600
    prompt = np.tile(IDS[1], (rows, 1))
    out = model.generate(prompt, max_new_tokens=2, do_sample=True, seed=0, **warp)
    first = out[:, 5]
    probs = hf_next_probs(hf, IDS[1:2], np.ones((1, 5), np.int64), **warp)[0, -1]
    counts = np.bincount(first, minlength=probs.size)
    assert counts[probs == 0].sum() == 0
    assert chi_square_p(counts, probs) > 1e-3
    mode = int(np.argmax(counts))
    after = np.append(IDS[1], mode)[None]
    probs = hf_next_probs(hf, after, np.ones_like(after), **warp)[0, -1]
    counts = np.bincount(out[first == mode, 6], minlength=probs.size)
    assert counts[probs == 0].sum() == 0
    assert chi_square_p(counts, probs) > 1e-3


@pytest.mark.parametrize("tp", [1, 2])
def test_generate_many_equals_one_prompt_at_a_time(checkpoint, hf, tp):
    rng = np.random.default_rng(5)
    prompts = [rng.integers(0, 101, n) for n in (3, 9, 1, 5, 12, 2, 7)]
    eos = 79  # a token the tiny model often emits, so prompts finish at different steps
    ref = []
    for p in prompts:
        new = hf_generate(hf, p[None], max_new_tokens=6, eos_token_id=eos)[0, len(p):]
        ref.append(new[: int(np.argmax(new == eos)) + 1] if (new == eos).any() else new)
    assert len({len(r) for r in ref}) > 2  # slots free up at different times
    model = from_pretrained(checkpoint, tensor_parallel=tp)
    out = model.generate_many(prompts, batch_size=3, max_new_tokens=6, eos_token_id=eos)
    assert len(out) == len(prompts)
    for i, (o, r) in enumerate(zip(out, ref)):
        np.testing.assert_array_equal(o, r, err_msg=f"prompt {i}")


def test_stream_yields_generate_tokens(checkpoint):
    model = from_pretrained(checkpoint)
    full = model.generate(IDS[1:2], max_new_tokens=7)[0, 5:]
    assert list(model.stream(IDS[1], max_new_tokens=7)) == full.tolist()


def test_bad_options_name_the_option(checkpoint):
    model = from_pretrained(checkpoint)
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(IDS, max_new_tokens=0)
    with pytest.raises(ValueError, match="n_positions"):
        model.generate(IDS, max_new_tokens=30)
    with pytest.raises(ValueError, match="top_p"):
        model.generate(IDS, do_sample=True, top_p=1.5)
    with pytest.raises(ValueError, match="attention_mask"):
        model.generate(IDS, attention_mask=MASK[:, ::-1])
    with pytest.raises(ValueError, match="attention_mask must hold only 0 and 1, found 0.5"):
        model.generate(IDS, attention_mask=np.full(IDS.shape, 0.5))
    with pytest.raises(TypeError, match="do_sample must be a bool, got 'no'"):
        model.generate(IDS, do_sample="no")
    with pytest.raises(TypeError, match="pad_token_id must be an int or None, got 'x'"):
        model.generate(IDS, pad_token_id="x", eos_token_id=13)
    for seed in (-1, 1.5):
        with pytest.raises(ValueError, match=f"seed must be an integer >= 0 or None, got {seed}"):
            model.generate(IDS, do_sample=True, seed=seed)
        with pytest.raises(ValueError, match="seed must be"):
            model.generate_many([], seed=seed)
    with pytest.raises(ValueError, match=r"prompts\[1\] must be a non-empty 2-D array .* got shape \(1, 0\)"):
        model.generate_many([IDS[0], []])


@pytest.mark.parametrize("tp", [1, 2])
def test_offload_gives_resident_tokens(checkpoint, tp):
    resident = from_pretrained(checkpoint, tensor_parallel=tp)
    offloaded = from_pretrained(checkpoint, tensor_parallel=tp, offload=True)
    np.testing.assert_array_equal(offloaded.generate(IDS, attention_mask=MASK, max_new_tokens=7),
                                  resident.generate(IDS, attention_mask=MASK, max_new_tokens=7))
    # Layer weights live only in remote buffers: the programs' variables outside them are not layers.
    program = next(iter(offloaded.generator.programs))
    remote = [v.name for v in program.ir.main_graph.variables if v._remote is not None]
    resident = [v.name for v in program.ir.main_graph.variables if v._remote is None]
    assert "layers.1.mlp.fc_in.weight" in remote
    assert not any(name.startswith("layers.") for name in resident)


def test_offloaded_generation_reloads_changed_weights(checkpoint, tmp_path):
    # The one host copy rule with remote buffers: after weights_changed, generation uses the new weights.
    other = tiny_checkpoint(tmp_path, n_positions=32, seed=5)
    model = from_pretrained(checkpoint, tensor_parallel=2, offload=True)
    model.generate(IDS, attention_mask=MASK, max_new_tokens=4)
    model.weights.update(from_pretrained(other, tensor_parallel=2).weights)
    model.weights_changed()
    hf_other = transformers.GPTJForCausalLM.from_pretrained(other).eval()
    np.testing.assert_array_equal(model.generate(IDS, attention_mask=MASK, max_new_tokens=4),
                                  hf_generate(hf_other, IDS, MASK, max_new_tokens=4))


def test_generation_programs_share_their_weights_and_reload_changed_ones(checkpoint, tmp_path):
    # One memory for the weights of every generation program (prefill and decode): on the CPU
    # runtime with one replica they are backed by the model's weight memory, and after
    # weights_changed each still generates with the new weights.
    other = tiny_checkpoint(tmp_path, n_positions=32, seed=5)
    model = from_pretrained(checkpoint)
    held = dict(model.weights)  # arrays a user may still hold once the model's are replaced
    before = {k: v.copy() for k, v in held.items()}
    model.generate(IDS, attention_mask=MASK, max_new_tokens=4)
    programs = list(model.generator.programs)
    assert len(programs) == 2  # the prefill and the decode
    # Every weight variable's device value, in each program's session, is the one memory of its name.
    pointers = [{v.name: p.session._device_tensor(v).data_ptr() for v in p.ir.main_graph.variables
                 if v.name in model.weights} for p in programs]
    assert pointers[0] and pointers[0].keys() <= pointers[1].keys()
    assert all(pointers[1][name] == pointer for name, pointer in pointers[0].items())
    model.weights.update(from_pretrained(other).weights)
    model.weights_changed()
    hf_other = transformers.GPTJForCausalLM.from_pretrained(other).eval()
    np.testing.assert_array_equal(model.generate(IDS, attention_mask=MASK, max_new_tokens=4),
                                  hf_generate(hf_other, IDS, MASK, max_new_tokens=4))
    assert all(np.array_equal(before[k], held[k]) for k in held)  # loading never wrote into them
