"""``gptj-popxl finetune``: fine-tune a GPT-J checkpoint on an MNLI-style data set.

The command resolves its settings (defaults, then ``--config NAME``, then explicit flags),
builds the data (``gptj_popxl.data``) and a ``gptj_popxl.trainer.Trainer``, and runs the
steps with a progress bar. Into ``--output`` it writes:

- ``log.jsonl``: one JSON object per step (step, epoch, batch, loss, learning rate after the
  step, gradient norm before clipping, tokens, tokens/s, elapsed seconds);
- ``checkpoint/``: the latest checkpoint (written atomically by ``Trainer.save``) every
  ``--save-every`` steps, at the end, and when Ctrl-C stops the run; it records the data
  position, so ``--resume OUTPUT/checkpoint`` continues with the very next batch;
- ``loss.png``: the loss curve of the whole run, resumed parts included.

Bad options exit with code 2 and a message naming the option; Ctrl-C exits with 130
after saving.
"""
import argparse
import dataclasses
import json
import math
import os
import signal
import threading
import time
from typing import Any, Dict, Optional

from gptj_popxl.configs import ConfigError, config_names, field_names, load_config
from gptj_popxl.data import BatchStream, DataError, load_mnli_rows, load_tokenizer
from gptj_popxl.model.config import GPTJConfig

LOG_NAME = "log.jsonl"
CHECKPOINT_NAME = "checkpoint"
LOSS_CURVE_NAME = "loss.png"
EXIT_INTERRUPTED = 130

# Settings without --config, and those no config has. ``None`` is resolved from the model or data.
DEFAULTS: Dict[str, Any] = dict(
    sequence_length=None, micro_batch_size=1, gradient_accumulation=None, data_parallel=1, tensor_parallel=1,
    learning_rate=1e-5, warmup_steps=None, lr_schedule="linear", weight_decay=0.0, max_grad_norm=1.0,
    loss_scaling=1.0, dtype="float32", phased=True, attention_serialisation=1, packing=False, seed=0)
# Flags that set what a run trains, hence fixed once it started (refused with --resume).
RUN_SETTINGS = ("config", "steps", "epochs", "split", *DEFAULTS)
# The longest sequence used when neither the flags nor a config set one (run_clm's cap).
MAX_DEFAULT_SEQUENCE_LENGTH = 1024


def _count(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {value}")
    return value


def _positive_int(text: str) -> int:
    return _count(text, 1)


def _non_negative_int(text: str) -> int:
    return _count(text, 0)


def _number(text: str, positive: bool) -> float:
    bound = "> 0" if positive else ">= 0"
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number {bound}, got {text!r}") from None
    if not math.isfinite(value) or not (value > 0 if positive else value >= 0):
        raise argparse.ArgumentTypeError(f"expected a number {bound}, got {value}")
    return value


def _positive_float(text: str) -> float:
    return _number(text, positive=True)


def _non_negative_float(text: str) -> float:
    return _number(text, positive=False)


def _loss_scaling(text: str):
    return text if text == "dynamic" else _positive_float(text)


def add_finetune_parser(commands) -> None:
    """Register the ``finetune`` subcommand on ``commands`` (an ``add_subparsers`` object)."""
    p = commands.add_parser("finetune", help="fine-tune a GPT-J checkpoint on an MNLI-style data set",
                            description="Fine-tune a GPT-J checkpoint on an MNLI-style data set; writes "
                                        "log.jsonl, checkpoint/ and loss.png into --output.")
    p.add_argument("--model", help="Hugging Face GPT-J checkpoint directory (not with --resume)")
    p.add_argument("--data", required=True,
                   help="MNLI data: json/jsonl, csv, parquet, a save_to_disk folder or a cached Hub name[:config]")
    p.add_argument("--output", required=True, help="directory for log.jsonl, checkpoint/ and loss.png")
    p.add_argument("--tokenizer", help="tokenizer directory (default: the --model or --resume directory)")
    p.add_argument("--split", help="split of a save_to_disk folder or cached Hub data set (default: train); "
                   "a single file is the split 'train'")
    p.add_argument("--config", choices=config_names(), help="named config; any flag below overrides its fields")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--steps", type=_positive_int, help="optimizer steps (default: the config's, or 1 epoch)")
    length.add_argument("--epochs", type=_positive_int, help="passes over the data")
    p.add_argument("--sequence-length", type=_positive_int, help="tokens per row (default: min(1024, n_positions))")
    p.add_argument("--micro-batch-size", type=_positive_int)
    p.add_argument("--gradient-accumulation", type=_positive_int,
                   help="micro-batches per step per replica (default: 1, or the config's global batch)")
    p.add_argument("--data-parallel", type=_positive_int)
    p.add_argument("--tensor-parallel", type=_positive_int)
    p.add_argument("--learning-rate", type=_non_negative_float)
    p.add_argument("--warmup-steps", type=_non_negative_int,
                   help="default: 0, or the config's warm-up proportion of the steps")
    p.add_argument("--lr-schedule", choices=("linear", "constant"))
    p.add_argument("--weight-decay", type=_non_negative_float)
    p.add_argument("--max-grad-norm", type=_positive_float)
    p.add_argument("--loss-scaling", type=_loss_scaling, metavar="X|dynamic")
    p.add_argument("--dtype", choices=("float32", "float16"))
    p.add_argument("--attention-serialisation", type=_positive_int)
    p.add_argument("--no-phased", dest="phased", action="store_const", const=False,
                   help="keep weights resident instead of phased execution")
    p.add_argument("--packing", action=argparse.BooleanOptionalAction,
                   help="pack examples run_clm-style (default: --no-packing, one padded example per row)")
    p.add_argument("--save-every", type=_positive_int, help="also checkpoint every N steps")
    p.add_argument("--resume", help="continue the run whose checkpoint is in this directory")
    p.add_argument("--seed", type=_non_negative_int, help="seed of the data order and the trainer (default 0)")


@dataclasses.dataclass
class _Run:
    """Everything a run needs, once the options are resolved and checked."""

    trainer: Any
    batches: Any
    output: str
    save_every: Optional[int]
    data_settings: Dict[str, Any]
    tokenizer: Any  # the one the data was encoded with: checkpoints carry it


def run_finetune(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """Run ``gptj-popxl finetune``; returns the exit code (bad options exit 2 through ``parser.error``)."""
    if os.path.exists(args.output) and not os.path.isdir(args.output):
        parser.error(f"--output {args.output}: exists and is not a directory")
    run = _resume(parser, args) if args.resume else _start(parser, args)
    return _train(run)


def _start(parser: argparse.ArgumentParser, args: argparse.Namespace) -> _Run:
    if args.model is None:
        parser.error("--model is required (unless --resume)")
    try:
        model_config = GPTJConfig.from_pretrained_dir(args.model)
    except (OSError, ValueError) as e:
        parser.error(f"--model {args.model}: {e}")
    settings = resolve_settings(parser, args, model_config)
    tokenizer = _tokenizer(parser, args.tokenizer or args.model, "--tokenizer" if args.tokenizer else "--model")
    batches = _batches(parser, args.data, tokenizer, settings, model_config.vocab_size)
    # Imported only now: the trainer pulls in the whole runtime, and option errors should not wait for it.
    from gptj_popxl.trainer import Trainer, TrainingConfig

    config = TrainingConfig(**training_config_fields(settings, batches.batches_per_epoch))
    try:
        trainer = Trainer(args.model, config)
    except ValueError as e:
        parser.error(f"the training settings do not fit --model {args.model}: {e}")
    return _Run(trainer, batches, args.output, args.save_every,
                dict(packing=settings["packing"], split=settings["split"]), tokenizer)


def resolve_settings(parser: argparse.ArgumentParser, args: argparse.Namespace, model_config: GPTJConfig
                     ) -> Dict[str, Any]:
    """The run's settings: ``DEFAULTS``, then the ``--config`` fields, then the flags given.

    Without ``--gradient-accumulation`` a config's global batch is kept (so ``--data-parallel``
    changes the accumulation); its warm-up proportion is kept in ``warmup_proportion`` for
    ``training_config_fields``. Exits 2 (``parser.error``) on settings that cannot work.
    """
    settings = dict(DEFAULTS, steps=None, epochs=None, split=None, warmup_proportion=0.0)
    given = {k: v for k, v in vars(args).items() if k in settings and v is not None}
    if args.config:
        try:
            named = load_config(args.config, {k: v for k, v in given.items() if k in field_names()})
        except ConfigError as e:
            parser.error(f"--config {args.config}: {e}")
        _check_model_matches(parser, named, model_config, args.model)
        settings.update({k: v for k, v in named.fields().items() if k in settings})
        settings["gradient_accumulation"] = named.gradient_accumulation
    settings.update(given)
    if settings["epochs"] is not None:
        settings["steps"] = None
    settings["gradient_accumulation"] = settings["gradient_accumulation"] or 1
    if settings["sequence_length"] is None:
        settings["sequence_length"] = min(MAX_DEFAULT_SEQUENCE_LENGTH, model_config.n_positions)
    _check_sequence(parser, settings, model_config.n_positions)
    return settings


# Settings handed to ``TrainingConfig`` as they are.
TRAINING_CONFIG_SETTINGS = ("learning_rate", "lr_schedule", "weight_decay", "max_grad_norm", "micro_batch_size",
                            "gradient_accumulation", "data_parallel", "tensor_parallel", "dtype", "loss_scaling",
                            "phased", "attention_serialisation", "seed")


def training_config_fields(settings: Dict[str, Any], batches_per_epoch: int) -> Dict[str, Any]:
    """``TrainingConfig``'s keyword arguments: the step count (``steps``, or ``epochs`` (default 1) of
    ``batches_per_epoch``) and the warm-up (``warmup_steps``, or ``int(steps * warmup_proportion)``)."""
    steps = settings["steps"] or batches_per_epoch * (settings["epochs"] or 1)
    warmup = settings["warmup_steps"]
    if warmup is None:
        warmup = int(steps * settings["warmup_proportion"])
    return dict({k: settings[k] for k in TRAINING_CONFIG_SETTINGS}, total_steps=steps, warmup_steps=warmup)


def _resume(parser: argparse.ArgumentParser, args: argparse.Namespace) -> _Run:
    fixed = [f"--{k.replace('_', '-')}" for k in RUN_SETTINGS if getattr(args, k, None) is not None]
    if args.model is not None:
        fixed.insert(0, "--model")
    if fixed:
        parser.error(f"{', '.join(fixed)}: cannot be set with --resume; the run continues with its saved settings")
    if not os.path.isdir(args.resume):
        parser.error(f"--resume {args.resume}: no such directory")
    from gptj_popxl.trainer import Trainer

    trainer = Trainer.resume(args.resume)
    state = trainer.data_state or {}
    if "packing" not in state or "split" not in state:
        parser.error(f"--resume {args.resume}: the checkpoint has no data position (not written by finetune)")
    config = trainer.config
    # Runs saved before the split was checked recorded "train" for "the data set's one split" too.
    split = None if state["split"] == "train" else state["split"]
    settings = dict(packing=state["packing"], split=split, sequence_length=state["sequence_length"],
                    micro_batch_size=config.micro_batch_size, gradient_accumulation=config.gradient_accumulation,
                    data_parallel=config.data_parallel, seed=config.seed)
    tokenizer = _tokenizer(parser, args.tokenizer or args.resume, "--tokenizer" if args.tokenizer else "--resume")
    batches = _batches(parser, args.data, tokenizer, settings, trainer.model_config.vocab_size)
    try:
        batches.restore(state)
    except DataError as e:
        parser.error(f"--data {args.data} with --resume {args.resume}: {e}")
    return _Run(trainer, batches, args.output, args.save_every, dict(packing=state["packing"], split=split), tokenizer)


def _check_model_matches(parser, named, model_config, model_dir: str) -> None:
    """A named config describes one model shape; refuse a checkpoint of another."""
    differ = [f"{k}={v} (checkpoint: {getattr(model_config, k)})"
              for k, v in dataclasses.asdict(named.model).items() if getattr(model_config, k) != v]
    if differ:
        parser.error(f"--config {named.name} is for another model than --model {model_dir}: {', '.join(differ)}")


def _check_sequence(parser, settings: Dict[str, Any], n_positions: int) -> None:
    length = settings["sequence_length"]
    if length > n_positions:
        parser.error(f"--sequence-length {length} exceeds the model's n_positions ({n_positions})")
    if length < 2:
        parser.error("--sequence-length must be at least 2: the loss predicts each next token")
    if length % settings["attention_serialisation"]:
        parser.error(f"--attention-serialisation {settings['attention_serialisation']} must divide the "
                     f"sequence length {length}")


def _tokenizer(parser, path: str, option: str):
    try:
        return load_tokenizer(path)
    except ValueError as e:
        parser.error(f"{option}: {e}")


def _batches(parser, data: str, tokenizer, settings: Dict[str, Any], vocab_size: int):
    try:
        rows = load_mnli_rows(data, tokenizer, settings["sequence_length"], settings["packing"], settings["split"])
        largest = int(rows.input_ids.max())
        if largest >= vocab_size:
            raise DataError(f"{data}: token id {largest} is outside the model's vocabulary of {vocab_size}; "
                            f"is the tokenizer the model's?")
        return BatchStream(rows, settings["micro_batch_size"], settings["gradient_accumulation"],
                           settings["data_parallel"], settings["seed"], where=data)
    except DataError as e:
        parser.error(f"--data {e}")


def _train(run: _Run) -> int:
    """The step loop: progress bar, log, periodic and final checkpoints; Ctrl-C stops after the current step."""
    from tqdm.auto import tqdm

    trainer, total = run.trainer, run.trainer.config.total_steps
    os.makedirs(run.output, exist_ok=True)
    log_path = os.path.join(run.output, LOG_NAME)
    checkpoint = os.path.join(run.output, CHECKPOINT_NAME)
    saved_at = None
    if trainer.step_count:
        _drop_records_after(log_path, trainer.step_count)
    with _StopOnInterrupt() as stop, open(log_path, "a" if trainer.step_count else "w") as log, \
            tqdm(total=total, initial=trainer.step_count, unit="step", dynamic_ncols=True) as bar:
        start = time.perf_counter()
        while trainer.step_count < total and not stop.requested:
            batch = next(run.batches)
            began = time.perf_counter()
            loss = trainer.step(batch.input_ids, batch.labels)
            now = time.perf_counter()
            record = dict(step=trainer.step_count, epoch=batch.epoch, batch=batch.index, loss=float(loss),
                          learning_rate=float(trainer.learning_rate), grad_norm=float(trainer.grad_norm),
                          tokens=batch.tokens, tokens_per_s=batch.tokens / (now - began), elapsed_s=now - start)
            log.write(json.dumps(record) + "\n")
            log.flush()
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['learning_rate']:.3g}",
                            gnorm=f"{record['grad_norm']:.3g}", tok_s=f"{record['tokens_per_s']:.0f}")
            if run.save_every and trainer.step_count % run.save_every == 0:
                _save(run, checkpoint)
                saved_at = trainer.step_count
    if saved_at != trainer.step_count:
        _save(run, checkpoint)
    curve = write_loss_curve(log_path, os.path.join(run.output, LOSS_CURVE_NAME))
    if stop.requested:
        print(f"interrupted after step {trainer.step_count}; checkpoint: {checkpoint} "
              f"(continue with --resume {checkpoint})")
        return EXIT_INTERRUPTED
    print(f"{trainer.step_count} steps done\n  log: {log_path}\n  checkpoint: {checkpoint}\n  loss curve: {curve}")
    return 0


def _drop_records_after(log_path: str, step: int) -> None:
    """Cut the log back to the checkpoint a run resumes from: steps logged after it (before a crash) are
    run again, and a line cut short by the crash is dropped. Replaced in one step."""
    if not os.path.isfile(log_path):
        return
    with open(log_path, encoding="utf-8") as f:
        lines = f.readlines()

    def before_checkpoint(line: str) -> bool:
        try:
            return json.loads(line)["step"] <= step
        except (ValueError, KeyError, TypeError):
            return False

    kept = [line if line.endswith("\n") else line + "\n" for line in lines if before_checkpoint(line)]
    if kept != lines:
        partial = log_path + ".partial"
        with open(partial, "w", encoding="utf-8") as f:
            f.writelines(kept)
        os.replace(partial, log_path)


def _save(run: _Run, checkpoint: str) -> None:
    run.trainer.save(checkpoint, data_state={**run.batches.state(), **run.data_settings}, tokenizer=run.tokenizer)


class _StopOnInterrupt:
    """While active, the first Ctrl-C only asks the loop to stop (and save); a second one interrupts at once."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def _handle(self, signum, frame) -> None:
        self.requested = True
        signal.signal(signal.SIGINT, self._previous)
        print("\nCtrl-C: stopping after this step and saving a checkpoint (Ctrl-C again to abort)", flush=True)

    def __enter__(self) -> "_StopOnInterrupt":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None and not self.requested:
            signal.signal(signal.SIGINT, self._previous)


def write_loss_curve(log_path: str, png_path: str) -> str:
    """Plot the per-step loss of a ``log.jsonl`` into ``png_path`` (matplotlib, no display needed); return it."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    steps, losses = [], []
    with open(log_path) as f:
        for line in f:
            record = json.loads(line)
            steps.append(record["step"])
            losses.append(record["loss"])
    figure = Figure(figsize=(6, 4))
    FigureCanvasAgg(figure)
    axes = figure.subplots()
    axes.plot(steps, losses)
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.set_title("fine-tuning loss")
    axes.grid(True, alpha=0.3)
    figure.savefig(png_path, dpi=100)
    return png_path
