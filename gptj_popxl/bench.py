"""``gptj-popxl bench``: throughput of a named config, ours against transformers, in one run.

On a random-weight checkpoint of the config's shape (``--layers`` keeps the first N layers), it
times on this CPU:

- the training step: our ``Trainer`` (tensor and data parallel, phased or resident, micro-batch,
  gradient accumulation and dtype as resolved from the config and flags, as ``finetune`` does)
  against transformers' ``GPTJForCausalLM`` with ``torch.optim.AdamW``, the same rows and tokens
  (the micro-batches accumulated the same way, data-parallel copies as more rows);
- prefill: generating one token after a prompt, ``micro_batch_size`` rows;
- decode: the tokens after the first, from a timed generation of ``--new-tokens`` minus the prefill.

Each is run once first (our programs compile on first use; that time is reported as ``first_*_s``),
then ``--steps`` times with ours and transformers taking turns, and the median counts (the machine
may be shared: turns put a busy spell on both sides). The ratio is ours / transformers in tokens
per second.
Models above ``MAX_PARAMETERS`` are refused: the CPU would need tens of GB for the 6B configs.
"""
import argparse
import dataclasses
import json
import os
import tempfile
import time
from typing import Any, Callable, Dict

import numpy as np

from gptj_popxl.configs import ConfigError, config_names
from gptj_popxl.finetune import _positive_int
from gptj_popxl.model.decode_kernels import product_choices
from gptj_popxl.plan import parameter_count, settings_of

# The largest model (parameters, unpadded) bench builds; ``--layers`` makes a config smaller.
MAX_PARAMETERS = 300_000_000
DEFAULT_NEW_TOKENS = 8
# Flags that override the config's or finetune's settings (finetune's option names).
OVERRIDES = ("sequence_length", "micro_batch_size", "gradient_accumulation", "data_parallel", "tensor_parallel",
             "dtype", "attention_serialisation", "phased")


def add_bench_parser(commands) -> None:
    """Register the ``bench`` subcommand on ``commands`` (an ``add_subparsers`` object)."""
    p = commands.add_parser("bench", help="training, prefill and decode tokens/s: ours against transformers",
                            description="Times the training step, prefill and decode of a named config on a "
                                        "random-weight model, ours and transformers', on this CPU.")
    p.add_argument("--config", required=True, choices=config_names(), help="named config")
    p.add_argument("--steps", type=_positive_int, default=3, help="timed repetitions of each measurement")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON to FILE")
    p.add_argument("--layers", type=_positive_int, help="keep only this many decoder layers")
    p.add_argument("--new-tokens", type=_positive_int,
                   help=f"tokens generated for the decode timing (default: {DEFAULT_NEW_TOKENS}, at most half the "
                        f"sequence); the prompt is the rest of the sequence")
    p.add_argument("--sequence-length", type=_positive_int)
    p.add_argument("--micro-batch-size", type=_positive_int)
    p.add_argument("--gradient-accumulation", type=_positive_int)
    p.add_argument("--data-parallel", type=_positive_int)
    p.add_argument("--tensor-parallel", type=_positive_int)
    p.add_argument("--dtype", choices=("float32", "float16"))
    p.add_argument("--attention-serialisation", type=_positive_int)
    p.add_argument("--no-phased", dest="phased", action="store_const", const=False,
                   help="keep weights resident instead of phased execution")


def resolve(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Dict[str, Any]:
    """The benchmark's settings (``plan.settings_of`` of the config and flags); exits 2 on bad ones."""
    overrides = {k: getattr(args, k) for k in OVERRIDES if getattr(args, k, None) is not None}
    try:
        settings = settings_of(args.config, overrides)
    except ConfigError as e:
        parser.error(f"--config {args.config}: {e}")
    model = settings["model"]
    if args.layers is not None:
        model = dataclasses.replace(model, n_layer=args.layers)
    settings["model"] = model
    seq = settings["sequence_length"]
    if seq < 2:
        parser.error("--sequence-length must be at least 2: the loss predicts each next token")
    if seq % settings["attention_serialisation"]:
        parser.error(f"--attention-serialisation {settings['attention_serialisation']} must divide the sequence "
                     f"length {seq}")
    new = args.new_tokens or min(DEFAULT_NEW_TOKENS, seq // 2)
    # The prompt fills the rest of the sequence, in whole attention blocks.
    blocks = settings["attention_serialisation"]
    prompt = (seq - new) // blocks * blocks
    if prompt < 1:
        parser.error(f"--new-tokens {new}: leaves no prompt of a multiple of the attention serialisation "
                     f"{blocks} in the sequence length {seq}")
    count = parameter_count(model)
    if count > MAX_PARAMETERS:
        parser.error(f"--config {args.config}: {count:,} parameters is more than bench builds on a CPU "
                     f"({MAX_PARAMETERS:,}); use --layers to keep fewer layers, or `gptj-popxl plan` for the "
                     f"memory plan of the full model")
    settings.update(parameters=count, steps=args.steps, new_tokens=new, prompt_length=prompt)
    return settings


# Most untimed calls of ours, after the first, while its decode ops still time their ways (``Fastest``).
SETTLE_CALLS = 32


def _decode_products(model) -> Dict[str, Dict[str, int]]:
    """How the decode ops of ``model``'s generation programs form their products (``product_choices``)."""
    return product_choices(program.ir for program in model.generator.programs)


def take_turns(calls: Dict[str, Callable[[], Any]], rounds: int, calls_per_turn: int = 1) -> Dict[str, np.ndarray]:
    """Per side (``calls`` by side), the seconds per call of each of ``rounds`` turns: in every round
    each side makes ``calls_per_turn`` calls, timed together, the order of the sides reversed every
    other round, so that a busy spell of a shared machine falls on both sides instead of on
    whichever side was running then. Round ``i`` of two sides is a pair: their ratio cancels a slow
    drift of the machine's speed."""
    times = {side: [] for side in calls}
    order = list(calls)
    for round_ in range(rounds):
        for side in order if round_ % 2 == 0 else order[::-1]:
            start = time.perf_counter()
            for _ in range(calls_per_turn):
                calls[side]()
            times[side].append((time.perf_counter() - start) / calls_per_turn)
    return {side: np.array(seconds) for side, seconds in times.items()}


def _time_sides(calls: Dict[str, Callable[[], Any]], steps: int,
                settled: Callable[[], bool] = lambda: True) -> Dict[str, Dict[str, float]]:
    """Per side (``calls`` by side), the seconds of a first call and the median of ``steps`` more
    (``take_turns``). After the first calls, ours runs untimed until ``settled()`` (at most
    ``SETTLE_CALLS`` times; its decode ops still timing their ways)."""
    timings = {}
    for side, call in calls.items():
        start = time.perf_counter()
        call()
        timings[side] = {"first": time.perf_counter() - start}
    for _ in range(SETTLE_CALLS):
        if settled():
            break
        calls["ours"]()
    for side, seconds in take_turns(calls, steps).items():
        timings[side]["median"] = float(np.median(seconds))
    return timings


def training_steps(s: Dict[str, Any], path: str, ids: np.ndarray) -> Dict[str, Callable[[], float]]:
    """One training step on ``ids`` (the global batch) of ours (``Trainer`` with the settings ``s``)
    and of transformers (``GPTJForCausalLM`` in ``s["dtype"]`` with ``torch.optim.AdamW``, the
    micro-batches of ``micro_batch_size * data_parallel`` rows accumulated, then clipped), both
    loaded from the checkpoint ``path``: callables by side, each returning the loss."""
    import torch
    import transformers

    import gptj_popxl
    from gptj_popxl.trainer import TrainingConfig

    trainer = gptj_popxl.Trainer(path, TrainingConfig(
        micro_batch_size=s["micro_batch_size"], gradient_accumulation=s["gradient_accumulation"],
        data_parallel=s["data_parallel"], tensor_parallel=s["tensor_parallel"], dtype=s["dtype"],
        phased=s["phased"], attention_serialisation=s["attention_serialisation"], loss_scaling=s["loss_scaling"]))
    hf = transformers.GPTJForCausalLM.from_pretrained(path, attn_implementation="eager",
                                                      dtype=getattr(torch, s["dtype"])).train()
    opt = torch.optim.AdamW(hf.parameters(), lr=1e-5, eps=1e-6)
    per_micro = s["micro_batch_size"] * s["data_parallel"]
    micro_ids = [torch.from_numpy(ids[k:k + per_micro]) for k in range(0, len(ids), per_micro)]

    def hf_step() -> float:
        opt.zero_grad()
        total = 0.0
        for micro in micro_ids:
            loss = hf(micro, labels=micro).loss / len(micro_ids)
            loss.backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
        opt.step()
        return total

    return {"ours": lambda: trainer.step(ids, ids), "transformers": hf_step}


def run_bench(s: Dict[str, Any]) -> Dict[str, Any]:
    """Time training, prefill and decode (see the module docstring); returns the JSON-ready results."""
    import torch
    import transformers

    import gptj_popxl
    from gptj_popxl.golden import random_hf_checkpoint

    config, steps, seq = s["model"], s["steps"], s["sequence_length"]
    torch_dtype = getattr(torch, s["dtype"])
    rows = s["micro_batch_size"] * s["gradient_accumulation"] * s["data_parallel"]
    rng = np.random.default_rng(0)
    ids = rng.integers(0, config.vocab_size, size=(rows, seq))
    prompt = rng.integers(0, config.vocab_size, size=(s["micro_batch_size"], s["prompt_length"]))
    results: Dict[str, Dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="gptj-popxl-bench-") as tmp:
        path = random_hf_checkpoint(os.path.join(tmp, "model"), config, seed=0)
        train = _time_sides(training_steps(s, path, ids), steps)
        hf = transformers.GPTJForCausalLM.from_pretrained(path, attn_implementation="eager", dtype=torch_dtype).eval()
        model = gptj_popxl.from_pretrained(path, tensor_parallel=s["tensor_parallel"], dtype=s["dtype"],
                                           attention_serialisation=s["attention_serialisation"])
        new = s["new_tokens"]

        def hf_generate(n: int):
            with torch.no_grad():
                t = torch.from_numpy(prompt)
                return hf.generate(t, attention_mask=torch.ones_like(t), do_sample=False, max_new_tokens=n,
                                   min_new_tokens=n, pad_token_id=0)

        def settled() -> bool:
            return not any("trying" in ways for ways in _decode_products(model).values())

        prefill = _time_sides({"ours": lambda: model.generate(prompt, max_new_tokens=1),
                               "transformers": lambda: hf_generate(1)}, steps, settled)
        generate = _time_sides({"ours": lambda: model.generate(prompt, max_new_tokens=new),
                                "transformers": lambda: hf_generate(new)}, steps, settled)
        timings = {side: {"train": train[side], "prefill": prefill[side], "generate": generate[side]}
                   for side in ("ours", "transformers")}
        products = _decode_products(model)
    batch = s["micro_batch_size"]
    for side, t in timings.items():
        decode_s = max(t["generate"]["median"] - t["prefill"]["median"], 1e-9)
        results[side] = {
            "train_step_s": t["train"]["median"], "first_train_step_s": t["train"]["first"],
            "train_tokens_per_s": rows * seq / t["train"]["median"],
            "prefill_s": t["prefill"]["median"], "first_prefill_s": t["prefill"]["first"],
            "prefill_tokens_per_s": batch * s["prompt_length"] / t["prefill"]["median"],
            "decode_tokens_per_s": batch * (new - 1) / decode_s if new > 1 else None,
            "first_generate_s": t["generate"]["first"]}
    ratios = {k: (results["ours"][k] / results["transformers"][k]
                  if results["ours"][k] and results["transformers"][k] else None)
              for k in ("train_tokens_per_s", "prefill_tokens_per_s", "decode_tokens_per_s")}
    settings = {k: s[k] for k in ("parameters", "steps", "new_tokens", "prompt_length", "sequence_length",
                                  *OVERRIDES[1:])}
    settings.update(n_layer=config.n_layer, n_embd=config.n_embd, vocab_size=config.vocab_size,
                    rows_per_step=rows, replicas=s["tensor_parallel"] * s["data_parallel"])
    return {"config": s["config"], "settings": settings, "ours": results["ours"],
            "transformers": results["transformers"], "ratios": ratios, "decode_products": products}


def format_bench(result: Dict[str, Any]) -> str:
    """The results as a table: tokens/s of each side and ours / transformers."""
    st = result["settings"]
    lines = [f"config {result['config']}: {st['n_layer']} layers, hidden {st['n_embd']}, vocab {st['vocab_size']} "
             f"({st['parameters']:,} parameters); tp {st['tensor_parallel']} x dp {st['data_parallel']}, "
             f"{'phased' if st['phased'] else 'resident'}, {st['dtype']}, micro-batch {st['micro_batch_size']} x "
             f"{st['gradient_accumulation']}, sequence {st['sequence_length']}; prompt {st['prompt_length']}, "
             f"{st['new_tokens']} new tokens; median of {st['steps']} runs, the two sides in turns",
             f"{'tokens/s':<12}{'ours':>14}{'transformers':>14}{'ratio':>8}"]
    for label, key in (("train", "train_tokens_per_s"), ("prefill", "prefill_tokens_per_s"),
                       ("decode", "decode_tokens_per_s")):
        ours, peer, ratio = result["ours"][key], result["transformers"][key], result["ratios"][key]
        cells = [f"{v:>14,.1f}" if v is not None else f"{'-':>14}" for v in (ours, peer)]
        lines.append(f"{label:<12}{cells[0]}{cells[1]}{(f'{ratio:.2f}x' if ratio else '-'):>8}")
    o = result["ours"]
    lines.append(f"our first calls (compile included, not in the medians): train step {o['first_train_step_s']:.2f} s, "
                 f"prefill {o['first_prefill_s']:.2f} s, generate {o['first_generate_s']:.2f} s")
    if result["decode_products"]:
        lines.append("decode kernels' products (ways chosen by timing, ops): " + "; ".join(
            f"{op} " + ", ".join(f"{way} x{n}" for way, n in ways.items())
            for op, ways in sorted(result["decode_products"].items())))
    return "\n".join(lines)


def run_bench_command(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """Run ``gptj-popxl bench``; bad settings exit 2 through ``parser.error``."""
    settings = resolve(parser, args)
    settings["config"] = args.config
    try:
        result = run_bench(settings)
    except ValueError as e:
        parser.error(f"bench --config {args.config}: {e}")
    print(format_bench(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


__all__ = ["MAX_PARAMETERS", "add_bench_parser", "format_bench", "resolve", "run_bench", "run_bench_command", "take_turns"]
