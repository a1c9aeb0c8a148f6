"""The ``gptj-popxl`` command line.

``gptj-popxl golden --model DIR`` compares our model with transformers on a local
checkpoint and exits 1 past tolerance; ``gptj-popxl demo`` runs the mission end to end on
a tiny model (``gptj_popxl.demo``): fine-tune, validate by generation, compare with transformers.
``random-checkpoint`` writes a random GPT-J of any size (``random_checkpoint``);
``validate`` and ``generate`` are in ``generation_cli``. Bad options exit with code 2.
"""
import argparse
import os
import sys
import time
from typing import List, Optional

from gptj_popxl import generation_cli
from gptj_popxl.bench import add_bench_parser, run_bench_command
from gptj_popxl.finetune import add_finetune_parser, run_finetune
from gptj_popxl.golden import compare_with_hf, default_seq
from gptj_popxl.model.config import GPTJConfig
from gptj_popxl.model.gptj import DTYPES
from gptj_popxl.programs.execution import ExecutionConfig
from gptj_popxl.plan import add_plan_parser, run_plan
from gptj_popxl.random_checkpoint import DTYPES as RANDOM_DTYPES
from gptj_popxl.random_checkpoint import NAMED_CONFIGS, resolve_config, write_random_checkpoint


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gptj-popxl", description="GPT-J as popxl graphs")
    commands = parser.add_subparsers(dest="command", required=True)

    golden = commands.add_parser("golden", help="compare with Hugging Face transformers on a local checkpoint")
    golden.add_argument("--model", required=True, help="Hugging Face GPT-J checkpoint directory")
    golden.add_argument("--tensor-parallel", type=_positive_int, default=1, help="tensor-parallel degree")
    golden.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="dtype of both models")
    golden.add_argument("--batch", type=_positive_int, default=2, help="batch size of the random tokens")
    golden.add_argument("--seq", type=_positive_int, default=None,
                        help="sequence length (default: min(16, n_positions))")
    golden.add_argument("--seed", type=int, default=0, help="seed of the random tokens")
    golden.add_argument("--attention-serialisation", type=_positive_int, default=1,
                        help="query blocks the attention is computed in (must divide --seq)")

    demo = commands.add_parser("demo", help="the mission end to end on a tiny model: fine-tune, validate, generate")
    demo.add_argument("--output", default="demo-output", help="directory everything is written to")
    demo.add_argument("--quick", action="store_true", help="the smallest sizes (a smoke test, not the accuracy goal)")
    random = commands.add_parser("random-checkpoint",
                                 help="write a random-weight GPT-J checkpoint as sharded safetensors, shard by shard")
    random.add_argument("--config", required=True,
                        help=f"one of {', '.join(sorted(NAMED_CONFIGS))}, or a GPT-J config.json path")
    random.add_argument("--dtype", choices=RANDOM_DTYPES, default="float16", help="dtype of the stored weights")
    random.add_argument("--output", required=True,
                        help="checkpoint directory to write: new, empty, or a checkpoint (replaced whole)")
    random.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    add_finetune_parser(commands)
    generation_cli.add_parsers(commands, _positive_int)
    add_plan_parser(commands)
    add_bench_parser(commands)
    return parser


def _check_golden_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Reject options the comparison would fail on, before any model is built."""
    if not os.path.isdir(args.model):
        parser.error(f"--model {args.model}: no such directory")
    try:
        config = GPTJConfig.from_pretrained_dir(args.model)
    except (FileNotFoundError, ValueError) as e:
        parser.error(f"--model {args.model}: {e}")
    seq = default_seq(config, args.seq)
    if seq > config.n_positions:
        parser.error(f"--seq {seq} exceeds the model's n_positions ({config.n_positions})")
    if seq < 2:
        parser.error("--seq must be at least 2: the loss predicts each next token")
    if seq % args.attention_serialisation:
        parser.error(f"--attention-serialisation {args.attention_serialisation} must divide the sequence length {seq}")


def _golden(args: argparse.Namespace) -> int:
    execution = ExecutionConfig(tensor_parallel=args.tensor_parallel, dtype=args.dtype,
                                attention_serialisation=args.attention_serialisation)
    report = compare_with_hf(args.model, batch=args.batch, seq=args.seq, seed=args.seed, execution=execution)
    print(report.table())
    return 0 if report.passed else 1


def _random_checkpoint(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    try:
        config = resolve_config(args.config)
    except ValueError as e:
        parser.error(str(e))
    began = time.perf_counter()
    path = write_random_checkpoint(args.output, config, args.dtype, args.seed)
    print(f"wrote {path}: {config.n_layer} layers, hidden {config.n_embd}, {args.dtype}, "
          f"{time.perf_counter() - began:.1f} s")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of ``gptj-popxl``; returns the exit code (0 ok, 1 past tolerance, 2 bad options)."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "golden":
        _check_golden_args(parser, args)
        return _golden(args)
    if args.command == "finetune":
        return run_finetune(parser, args)
    if args.command == "plan":
        return run_plan(parser, args)
    if args.command == "bench":
        return run_bench_command(parser, args)
    if args.command in generation_cli.COMMANDS:
        return generation_cli.main(parser, args)
    if args.command == "random-checkpoint":
        return _random_checkpoint(parser, args)
    from gptj_popxl import demo
    return demo.main(args.output, quick=args.quick)


if __name__ == "__main__":
    sys.exit(main())
