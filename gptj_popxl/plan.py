"""``gptj-popxl plan``: a named config's device-memory plan, from shapes alone.

The training step (phased or resident, as the settings say), the inference forward (logits of
one micro-batch at the training sequence length) and the generation programs (``generate``'s
prefill and decode, with the KV cache, see :func:`generation_plan`) are built as popxl programs
whose variables hold no data (``programs.common.shape_only_weights``) and that get no session: nothing is allocated on
a device and nothing executes. (Making a session would lower each graph into a plan of kernels,
which allocates every variable and remote buffer of every replica; the analysis instead walks the
graphs with the lowering's storage classes, see ``popxl_cpu.memory``.)

Per replica, the report gives the peak device memory (``popxl_cpu.memory``), the remote-buffer
bytes, and per phase: its peak, its matmul FLOPs and the bytes its collectives send. The step-time
estimate divides a replica's matmul FLOPs by an IPU's peak arithmetic rate; it ignores everything
else (exchange, remote-buffer transfers, collectives, non-matmul ops), so it is a lower bound.
"""
import argparse
import dataclasses
import json
from typing import Any, Dict, List, Optional

import numpy as np

from gptj_popxl.configs import ConfigError, config_names, field_names, load_config
from gptj_popxl.model.config import GPTJConfig, is_positive_int

# An IPU's In-Processor Memory: a GC200 has 900 MB (taken as 900 * 10**6 bytes).
GC200_MEMORY_BYTES = 900 * 10 ** 6
# A GC200's peak arithmetic rate by compute dtype (Graphcore's figures).
GC200_PEAK_FLOPS = {"float16": 62.5e12, "float32": 15.6e12}
# The reference app's measured time of one training step of these configs (seconds).
REFERENCE_STEP_SECONDS = {"gptj_6B_1024_pod16": (20.0, 22.0)}
# Collectives that move data between replicas (their first input's bytes are counted as sent).
COLLECTIVES = ("replicated_all_reduce", "replicated_all_reduce_", "replicated_all_gather",
               "replicated_reduce_scatter", "replicated_all_reduce_identical_grad_inputs", "all_reduce",
               "all_reduce_identical_grad_inputs")


def parameter_count(config: GPTJConfig) -> int:
    """Parameters of the model as transformers defines it (no padding for tensor parallel)."""
    e, inner, vocab = config.n_embd, config.inner_size, config.vocab_size
    layer = 2 * e + 4 * e * e + (e * inner + inner) + (inner * e + e)
    return vocab * e + config.n_layer * layer + 2 * e + (e * vocab + vocab)


@dataclasses.dataclass
class PhasePlan:
    """One phase of a program, per replica: peak device bytes, matmul FLOPs, bytes sent by collectives."""

    name: str
    peak_device_bytes: int
    flops: int
    collective_bytes: int


@dataclasses.dataclass
class ProgramPlan:
    """One program's plan, per replica."""

    name: str
    peak_device_bytes: int
    remote_bytes: int
    resident_bytes: int
    flops: int
    phases: List[PhasePlan]


def _bytes(t) -> int:
    return int(np.prod(t.shape, dtype=np.int64)) * np.dtype(t.dtype.as_numpy()).itemsize


class _Counter:
    """Matmul FLOPs and collective bytes of a graph, callees (times their repeat count) included."""

    def __init__(self):
        self.memo: Dict[object, tuple] = {}

    def of_op(self, op) -> tuple:
        name = op.prim.name
        if name == "matmul":
            k = op.inputs[0].shape[-1]
            return 2 * int(np.prod(op.outputs[0].shape, dtype=np.int64)) * k, 0
        if name in COLLECTIVES:
            # A "local" reduce-scatter (replica_sharded_slice) only slices the replica's own value.
            return 0, 0 if op.attrs.get("op") == "local" else _bytes(op.inputs[0])
        times = self.runs(op)
        flops = sent = 0
        for g in op.called_graphs:
            f, s = self.of_graph(g)
            flops, sent = flops + times * f, sent + times * s
        return flops, sent

    @staticmethod
    def runs(op) -> int:
        """How many times ``op`` runs its called graphs."""
        return op.attrs.get("repeat_count", 1) if op.prim.name == "repeat" else 1

    def of_graph(self, graph) -> tuple:
        if graph not in self.memo:
            counts = [self.of_op(op) for op in graph._ops]
            self.memo[graph] = (sum(c[0] for c in counts), sum(c[1] for c in counts))
        return self.memo[graph]


def program_plan(name: str, ir, report) -> ProgramPlan:
    """``ir``'s plan from its ``MemoryReport`` and op shapes. A phase is a graph the main graph
    calls, all its calls together (the largest peak, the FLOPs and bytes of all), in the order of
    first call; the main graph's own ops are a phase ``main``."""
    counter = _Counter()
    phases: Dict[str, PhasePlan] = {}
    for p in report.phases:
        merged = phases.setdefault(p.name, PhasePlan(p.name, 0, 0, 0))
        merged.peak_device_bytes = max(merged.peak_device_bytes, p.peak_bytes)
    main = PhasePlan("main", report.main_peak_bytes, 0, 0)
    for op in ir.main_graph._ops:
        graphs, times = op.called_graphs, counter.runs(op)
        for phase, (flops, sent) in ([(phases[g.name], counter.of_graph(g)) for g in graphs] if graphs
                                     else [(main, counter.of_op(op))]):
            phase.flops += times * flops
            phase.collective_bytes += times * sent
    listed = list(phases.values())
    if main.flops or main.collective_bytes or not listed:
        listed.append(main)
    return ProgramPlan(name, report.peak_device_bytes, sum(report.remote_bytes.values()),
                       sum(report.resident_bytes.values()), sum(p.flops for p in listed), listed)


def generation_plan(config: GPTJConfig, execution, weights, batch: int, max_new_tokens: int) -> Dict[str, Any]:
    """The plan of ``generate``'s programs for ``batch`` prompts of ``n_positions - max_new_tokens``
    tokens: the prefill of the prompts (at their bucketed length, as ``generate`` pads them) and
    one run of the decode, ``chunk`` new tokens per row over the KV cache of ``cache_length``
    columns, both as ``generate`` compiles them (greedy, tensor parallel as ``execution``, no data
    parallel). With ``execution.phased`` the decoder layers are offloaded (``--offload``): their
    weights stay in remote buffers and are loaded one layer at a time, as the phased training step
    does; otherwise they are resident. Per program and replica: its peak, remote bytes, KV-cache
    bytes (the prefill's keys and values out, the decode's cache variables), matmul FLOPs per run
    and per token, and the bytes its collectives send per run.

    Raises:
        ValueError: ``batch`` or ``max_new_tokens`` out of range.
    """
    from gptj_popxl.generation import decode_layout, prompt_bucket
    from gptj_popxl.model.decode_kernels import portable_graphs
    from gptj_popxl.model.gptj import GPTJ
    from gptj_popxl.popxl_cpu.memory import memory_report, tensor_bytes
    from gptj_popxl.programs.execution import ExecutionConfig
    from gptj_popxl.programs.generation import build_decode, build_prefill

    seq = config.n_positions
    if not is_positive_int(batch):
        raise ValueError(f"generate_batch must be an integer >= 1, got {batch!r}")
    if not (is_positive_int(max_new_tokens) and 2 <= max_new_tokens < seq):
        raise ValueError(f"max_new_tokens must be an integer in [2, {seq - 1}] (the sequence length {seq} holds the "
                         f"prompt and the new tokens), got {max_new_tokens!r}")
    prompt = prompt_bucket(seq - max_new_tokens, seq)
    chunk, cache_len = decode_layout(prompt, max_new_tokens)
    model = GPTJ(config, weights, execution=ExecutionConfig(tensor_parallel=execution.tensor_parallel,
                                                            dtype=execution.dtype), offload=execution.phased)
    with portable_graphs():  # the programs an IPU would run, with none of the CPU runtime's C++ ops
        prefill = build_prefill(model, batch, prompt, None, attach=False)
        decode = build_decode(model, batch, prompt, cache_len, chunk, None, attach=False)
    kv_out = sum(tensor_bytes(s) for name, s in prefill.outputs.items() if name[:2] in ("k.", "v."))

    def entry(name, program, tokens, kv_bytes):
        plan = program_plan(name, program.ir, memory_report(program.ir))
        return {"peak_device_bytes_per_replica": plan.peak_device_bytes,
                "remote_bytes_per_replica": plan.remote_bytes,
                "kv_cache_bytes_per_replica": kv_bytes,
                "fits": plan.peak_device_bytes < GC200_MEMORY_BYTES,
                "tokens_per_run": tokens,
                "flops_per_replica": plan.flops,
                "flops_per_token_per_replica": plan.flops / tokens,
                "collective_bytes_per_replica": sum(p.collective_bytes for p in plan.phases)}

    return {"batch": batch, "prompt_length": prompt, "max_new_tokens": max_new_tokens, "decode_chunk": chunk,
            "cache_length": cache_len, "offload": execution.phased,
            "prefill": entry("prefill", prefill, batch * prompt, kv_out),
            "decode": entry("decode", decode, batch * chunk, sum(tensor_bytes(v) for v in decode.cache))}


def settings_of(name: str, overrides: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The settings a plan is made for: finetune's ``DEFAULTS``, the config's fields, then
    ``overrides`` (finetune's setting names, e.g. ``phased``, ``dtype``, ``attention_serialisation``);
    ``model`` is the config's ``GPTJConfig`` at the sequence length."""
    from gptj_popxl.finetune import DEFAULTS

    overrides = dict(overrides or {})
    named = load_config(name, {k: v for k, v in overrides.items() if k in field_names()})
    settings = dict(DEFAULTS)
    settings.update({k: v for k, v in named.fields().items() if k in settings})
    settings["gradient_accumulation"] = named.gradient_accumulation
    settings.update(overrides)
    settings["model"] = named.gptj_config(n_positions=settings["sequence_length"])
    return settings


def make_plan(name: str, overrides: Optional[Dict[str, Any]] = None, *, generate_batch: Optional[int] = None,
              max_new_tokens: Optional[int] = None) -> Dict[str, Any]:
    """The plan of config ``name`` (see the module docstring) as a JSON-ready dict. Generation
    (:func:`generation_plan`) is planned for ``generate_batch`` prompts (default: the micro-batch
    size) and ``max_new_tokens`` (default: half the sequence length).

    Raises:
        ConfigError: an unknown config or field.
        ValueError: settings the programs cannot be built with.
    """
    from gptj_popxl.popxl_cpu.memory import memory_report
    from gptj_popxl.programs.common import shape_only_weights
    from gptj_popxl.programs.execution import ExecutionConfig
    from gptj_popxl.programs.inference import build_logits
    from gptj_popxl.programs.phased import build_phased_training_step
    from gptj_popxl.programs.training import OptimizerConstants, build_training_step

    s = settings_of(name, overrides)
    config: GPTJConfig = s["model"]
    seq = s["sequence_length"]
    if seq % s["attention_serialisation"]:
        raise ValueError(f"attention_serialisation {s['attention_serialisation']} must divide the sequence "
                         f"length {seq}")
    ex = ExecutionConfig(tensor_parallel=s["tensor_parallel"], data_parallel=s["data_parallel"], dtype=s["dtype"],
                         attention_serialisation=s["attention_serialisation"],
                         micro_batch_size=s["micro_batch_size"], gradient_accumulation=s["gradient_accumulation"],
                         phased=s["phased"])
    weights = shape_only_weights(config, ex.tensor_parallel)
    constants = OptimizerConstants(0.9, 0.999, 1e-6, s["weight_decay"], 1.0, s["loss_scaling"] == "dynamic")
    build = build_phased_training_step if ex.phased else build_training_step
    step = build(config, ex, weights, seq, constants, attach=False)
    train = program_plan("training", step.ir, step.memory_report())
    logits = build_logits(config, dataclasses.replace(ex, data_parallel=1, phased=False), weights,
                          ex.micro_batch_size, seq, attach=False)
    infer = program_plan("inference", logits.ir, memory_report(logits.ir))
    generation = generation_plan(config, ex, weights, ex.micro_batch_size if generate_batch is None else generate_batch,
                                 seq // 2 if max_new_tokens is None else max_new_tokens)
    peak_rate = GC200_PEAK_FLOPS[ex.dtype]
    return {
        "config": name,
        "parameters": parameter_count(config),
        "replicas": ex.replicas,
        "tensor_parallel": ex.tensor_parallel,
        "data_parallel": ex.data_parallel,
        "phased": ex.phased,
        "dtype": ex.dtype,
        "sequence_length": seq,
        "micro_batch_size": ex.micro_batch_size,
        "gradient_accumulation": ex.gradient_accumulation,
        "attention_serialisation": ex.attention_serialisation,
        "peak_device_bytes_per_replica": train.peak_device_bytes,
        "remote_bytes_per_replica": train.remote_bytes,
        "device_memory_bytes_per_replica": GC200_MEMORY_BYTES,
        "fits": train.peak_device_bytes < GC200_MEMORY_BYTES,
        "flops_per_replica": train.flops,
        "peak_flops_per_replica": peak_rate,
        "estimated_step_seconds": train.flops / peak_rate,
        "reference_step_seconds": REFERENCE_STEP_SECONDS.get(name),
        "phases": [dataclasses.asdict(p) for p in train.phases],
        "inference": {
            "peak_device_bytes_per_replica": infer.peak_device_bytes,
            "resident_bytes_per_replica": infer.resident_bytes,
            "fits": infer.peak_device_bytes < GC200_MEMORY_BYTES,
            "flops_per_replica": infer.flops,
            "phases": [dataclasses.asdict(p) for p in infer.phases],
        },
        "generation": generation,
    }


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f}"


def format_plan(plan: Dict[str, Any]) -> str:
    """The plan as a table: per training phase, then the totals, the fit and the step-time estimate."""
    lines = [f"config {plan['config']}: {plan['parameters']:,} parameters; {plan['replicas']} replicas = tensor "
             f"parallel {plan['tensor_parallel']} x data parallel {plan['data_parallel']}; "
             f"{'phased' if plan['phased'] else 'resident'}, {plan['dtype']}, sequence {plan['sequence_length']}, "
             f"micro-batch {plan['micro_batch_size']} x {plan['gradient_accumulation']} accumulated, "
             f"attention serialisation {plan['attention_serialisation']}",
             "",
             "training step, per replica (MB = 10**6 bytes):",
             f"{'phase':<26}{'peak MB':>12}{'GFLOP':>14}{'collective MB':>16}"]
    for p in plan["phases"]:
        lines.append(f"{p['name']:<26}{_mb(p['peak_device_bytes']):>12}{p['flops'] / 1e9:>14,.1f}"
                     f"{_mb(p['collective_bytes']):>16}")
    fits = "fits" if plan["fits"] else "does NOT fit"
    lines += ["",
              f"peak device memory: {_mb(plan['peak_device_bytes_per_replica'])} MB of "
              f"{_mb(plan['device_memory_bytes_per_replica'])} MB (GC200 In-Processor Memory): {fits}",
              f"remote buffers: {_mb(plan['remote_bytes_per_replica'])} MB per replica",
              f"estimated step time: {plan['estimated_step_seconds']:.3g} s (estimate: matmul FLOPs per replica "
              f"{plan['flops_per_replica'] / 1e12:,.1f} TFLOP at the GC200's "
              f"{plan['peak_flops_per_replica'] / 1e12:g} TFLOPS {plan['dtype']} peak; a lower bound)"]
    if plan["reference_step_seconds"]:
        low, high = plan["reference_step_seconds"]
        lines.append(f"reference app, measured: {low:g}-{high:g} s per step")
    inf = plan["inference"]
    lines.append(f"inference forward (weights resident, one micro-batch): peak "
                 f"{_mb(inf['peak_device_bytes_per_replica'])} MB per replica: "
                 f"{'fits' if inf['fits'] else 'does NOT fit'}")
    gen = plan["generation"]
    lines += ["",
              f"generation, per replica: {gen['batch']} prompt(s) of {gen['prompt_length']} tokens, "
              f"{gen['max_new_tokens']} new tokens, {gen['decode_chunk']} per decode run over a "
              f"{gen['cache_length']}-column KV cache; decoder layers "
              f"{'offloaded (remote buffers)' if gen['offload'] else 'resident'}:",
              f"{'program':<10}{'peak MB':>10}{'remote MB':>12}{'KV cache MB':>13}{'GFLOP/token':>13}"
              f"{'collective MB/run':>19}  fits"]
    for name in ("prefill", "decode"):
        p = gen[name]
        lines.append(f"{name:<10}{_mb(p['peak_device_bytes_per_replica']):>10}{_mb(p['remote_bytes_per_replica']):>12}"
                     f"{_mb(p['kv_cache_bytes_per_replica']):>13}{p['flops_per_token_per_replica'] / 1e9:>13,.2f}"
                     f"{_mb(p['collective_bytes_per_replica']):>19}  {'yes' if p['fits'] else 'NO'}")
    return "\n".join(lines)


def add_plan_parser(commands) -> None:
    """Register the ``plan`` subcommand on ``commands`` (an ``add_subparsers`` object)."""
    p = commands.add_parser("plan", help="device-memory plan of a named config, from shapes alone",
                            description="Builds the config's training step, inference forward and generation "
                                        "(prefill and decode) from shapes alone (no weights, nothing runs) and "
                                        "reports, per replica, the peak device memory per phase, whether it fits "
                                        "a GC200, FLOPs and collective bytes.")
    p.add_argument("--config", required=True, choices=config_names(), help="named config")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--no-phased", dest="phased", action="store_const", const=False,
                   help="plan the resident training step instead of the phased one")
    p.add_argument("--dtype", choices=("float32", "float16"))
    p.add_argument("--attention-serialisation", type=int, metavar="N")
    p.add_argument("--micro-batch-size", type=int, metavar="N")
    p.add_argument("--generate-batch", type=int, metavar="N",
                   help="prompts the generation programs are planned for (default: the micro-batch size)")
    p.add_argument("--max-new-tokens", type=int, metavar="N",
                   help="new tokens per prompt; the prompt is the rest of the sequence (default: half of it)")


def run_plan(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """Run ``gptj-popxl plan``; bad settings exit 2 through ``parser.error``."""
    overrides = {k: getattr(args, k) for k in ("phased", "dtype", "attention_serialisation", "micro_batch_size")
                 if getattr(args, k) is not None}
    try:
        plan = make_plan(args.config, overrides, generate_batch=args.generate_batch,
                         max_new_tokens=args.max_new_tokens)
    except (ConfigError, ValueError) as e:
        parser.error(f"plan --config {args.config}: {e}")
    print(json.dumps(plan, indent=2) if args.json else format_plan(plan))
    return 0
