"""Fine-tuning GPT-J: ``TrainingConfig`` and ``Trainer`` (one optimizer step per ``step`` call).

The step runs on the device as one popxl program (``programs.training``); the host keeps the
step counter, the learning-rate schedule (transformers' linear or constant schedule with warmup)
and, with ``loss_scaling="dynamic"``, the loss scale as ``torch.amp.GradScaler`` does.
"""
import dataclasses
import json
import math
import os
import shutil
from typing import Any, Dict, Optional, Union

import numpy as np
import safetensors.numpy

from gptj_popxl.checkpoint import PathLike, atomic_directory, read_json
from gptj_popxl.model.config import GPTJConfig, is_finite_number, is_positive_int
from gptj_popxl.model.gptj import GPTJ, _check_ids, load_weights
from gptj_popxl.model.hf_mapping import popxl_to_hf, write_hf_files
from gptj_popxl.model.layers import IGNORE_INDEX
from gptj_popxl.popxl_cpu.memory import MemoryReport
from gptj_popxl.programs.execution import DTYPES, ExecutionConfig
from gptj_popxl.programs.phased import build_phased_training_step
from gptj_popxl.programs.training import OptimizerConstants, TrainingProgram, build_training_step

LR_SCHEDULES = ("linear", "constant")
TRAINER_STATE_FILE = "trainer_state.json"
OPTIMIZER_STATE_FILE = "optimizer_state.safetensors"
# Files of a Hugging Face tokenizer that ``save`` copies from the source checkpoint.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "added_tokens.json", "chat_template.jinja")
# torch.amp.GradScaler's defaults.
DYNAMIC_INITIAL_SCALE = 2.0 ** 16
DYNAMIC_GROWTH_INTERVAL = 2000
STATE_FORMAT = 1


@dataclasses.dataclass(frozen=True)
class TrainingConfig:
    """Hyper-parameters and execution of a fine-tuning run.

    Attributes:
        learning_rate: peak learning rate.
        lr_schedule: "linear" (``get_linear_schedule_with_warmup``) or "constant"
            (``get_constant_schedule_with_warmup``).
        warmup_steps, total_steps: of the schedule.
        weight_decay, beta1, beta2, eps: AdamW's (``torch.optim.AdamW``); no decay on biases and
            LayerNorm weights.
        max_grad_norm: gradients are clipped to this global L2 norm (``clip_grad_norm_``).
        micro_batch_size, gradient_accumulation, data_parallel, tensor_parallel: a step takes
            ``micro_batch_size * gradient_accumulation * data_parallel`` rows.
        dtype: "float32" or "float16" (float16 keeps float32 master weights and moments).
        loss_scaling: a static scale, or "dynamic" (``torch.amp.GradScaler``'s rules).
        phased: run the step as phases with weights and optimizer state in remote buffers.
        attention_serialisation: query blocks the attention is computed in.
        seed: seed of the run (the model has no dropout; recorded for the data order).
    """

    learning_rate: float = 1e-5
    lr_schedule: str = "linear"
    warmup_steps: int = 0
    total_steps: int = 1000
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-6
    max_grad_norm: float = 1.0
    micro_batch_size: int = 1
    gradient_accumulation: int = 1
    data_parallel: int = 1
    tensor_parallel: int = 1
    dtype: str = "float32"
    loss_scaling: Union[float, str] = 1.0
    phased: bool = True
    attention_serialisation: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        def need(ok: bool, name: str, what: str) -> None:
            if not ok:
                raise ValueError(f"TrainingConfig.{name} must be {what}, got {getattr(self, name)!r}")

        need(is_finite_number(self.learning_rate) and self.learning_rate >= 0, "learning_rate", "a number >= 0")
        need(self.lr_schedule in LR_SCHEDULES, "lr_schedule", f"one of {LR_SCHEDULES}")
        need(isinstance(self.warmup_steps, int) and not isinstance(self.warmup_steps, bool)
             and self.warmup_steps >= 0, "warmup_steps", "an integer >= 0")
        need(is_positive_int(self.total_steps), "total_steps", "an integer >= 1")
        need(is_finite_number(self.weight_decay) and self.weight_decay >= 0, "weight_decay", "a number >= 0")
        for name in ("beta1", "beta2"):
            need(is_finite_number(getattr(self, name)) and 0 <= getattr(self, name) < 1, name, "a number in [0, 1)")
        need(is_finite_number(self.eps) and self.eps > 0, "eps", "a number > 0")
        need(is_finite_number(self.max_grad_norm) and self.max_grad_norm > 0, "max_grad_norm", "a number > 0")
        need(self.loss_scaling == "dynamic" or (is_finite_number(self.loss_scaling) and self.loss_scaling > 0),
             "loss_scaling", 'a finite number > 0 or "dynamic"')
        need(self.dtype in DTYPES, "dtype", f"one of {sorted(DTYPES)}")
        need(isinstance(self.seed, int) and not isinstance(self.seed, bool) and self.seed >= 0, "seed",
             "an integer >= 0")
        try:
            self.execution()
        except ValueError as e:
            raise ValueError(f"TrainingConfig.{e}") from None

    def execution(self) -> ExecutionConfig:
        """The execution config of the training program."""
        return ExecutionConfig(tensor_parallel=self.tensor_parallel, data_parallel=self.data_parallel,
                               dtype=self.dtype, attention_serialisation=self.attention_serialisation,
                               micro_batch_size=self.micro_batch_size,
                               gradient_accumulation=self.gradient_accumulation, phased=self.phased)

    @property
    def global_batch_rows(self) -> int:
        """Rows of one step's batch."""
        return self.micro_batch_size * self.gradient_accumulation * self.data_parallel

    def lr_at(self, step: int) -> float:
        """Learning rate of optimizer step ``step`` (0-based), as transformers' schedules give it."""
        if step < self.warmup_steps:
            return self.learning_rate * step / max(1, self.warmup_steps)
        if self.lr_schedule == "constant":
            return self.learning_rate
        return self.learning_rate * max(0.0, (self.total_steps - step) / max(1, self.total_steps - self.warmup_steps))


class Trainer:
    """Fine-tunes a local Hugging Face GPT-J checkpoint. See ``TrainingConfig``.

    Attributes:
        config: the ``TrainingConfig``.
        model_config: the model's ``GPTJConfig``.
        step_count: ``step`` calls, skipped ones included.
        optimizer_steps: updates applied (AdamW's bias-correction step ``t``); a step skipped for
            inf/NaN gradients under dynamic loss scaling is not one. The learning-rate schedule is at
            this position: transformers' Trainer steps its scheduler only after an update that was
            not skipped.
        learning_rate: the learning rate of the last step (before any: of the first).
        grad_norm: the last step's global gradient norm, unscaled, before clipping (None before any).
        loss_scale: the current loss scale.
        data_state: what ``save`` stored with ``data_state`` (None when absent).
    """

    def __init__(self, model_dir: PathLike, cfg: TrainingConfig):
        if not isinstance(cfg, TrainingConfig):
            raise TypeError(f"cfg must be a TrainingConfig, got {type(cfg).__name__}")
        self.config = cfg
        self.model_dir = os.fspath(model_dir)
        self.model_config = GPTJConfig.from_pretrained_dir(model_dir)
        execution = cfg.execution()
        weights = load_weights(model_dir, self.model_config, dataclasses.replace(execution, dtype="float32"))
        # The one host copy of the weights (float32 masters); programs write back into it.
        self._model = GPTJ(self.model_config, weights, execution=ExecutionConfig(
            tensor_parallel=cfg.tensor_parallel, dtype=cfg.dtype, attention_serialisation=cfg.attention_serialisation))
        self._constants = OptimizerConstants(cfg.beta1, cfg.beta2, cfg.eps, cfg.weight_decay, cfg.max_grad_norm,
                                             skip_nonfinite=cfg.loss_scaling == "dynamic")
        self._program: Optional[TrainingProgram] = None
        self._seq: Optional[int] = None
        self._host_state: Dict[str, Dict[str, np.ndarray]] = {}
        self._device_ahead = False
        self.step_count = 0
        self.optimizer_steps = 0
        self.loss_scale = DYNAMIC_INITIAL_SCALE if cfg.loss_scaling == "dynamic" else float(cfg.loss_scaling)
        self.growth_tracker = 0
        self.learning_rate = cfg.lr_at(0)
        self.grad_norm: Optional[float] = None
        self.data_state: Optional[dict] = None

    # --- training
    def step(self, input_ids: np.ndarray, labels: np.ndarray) -> float:
        """One optimizer step on one global batch; returns its loss before the update.

        Args:
            input_ids: integer array ``(micro_batch_size * gradient_accumulation * data_parallel, seq)``.
            labels: same shape; transformers' convention (shifted inside, -100 ignored).

        Returns:
            The mean token cross entropy over the non-ignored tokens of the whole batch.
        """
        cfg = self.config
        ids = _check_ids("input_ids", input_ids, self.model_config, allow_ignore=False)
        lab = _check_ids("labels", labels, self.model_config, allow_ignore=True)
        rows = cfg.global_batch_rows
        if ids.shape[0] != rows:
            raise ValueError(f"input_ids has shape {ids.shape}: a step takes micro_batch_size * gradient_accumulation "
                             f"* data_parallel = {cfg.micro_batch_size} * {cfg.gradient_accumulation} * "
                             f"{cfg.data_parallel} = {rows} rows")
        if lab.shape != ids.shape:
            raise ValueError(f"labels shape {lab.shape} differs from input_ids shape {ids.shape}")
        seq = ids.shape[1]
        if seq < 2 or seq % cfg.attention_serialisation:
            raise ValueError(f"input_ids has shape {ids.shape}: the sequence length must be >= 2 and divisible by "
                             f"attention_serialisation ({cfg.attention_serialisation})")
        tokens = int(np.count_nonzero(lab[:, 1:] != IGNORE_INDEX))
        if tokens == 0:
            raise ValueError(f"labels (shape {lab.shape}) ignore every token: the loss is undefined")

        lr = cfg.lr_at(self.optimizer_steps)
        t = self.optimizer_steps + 1
        bias_correction2_sqrt = math.sqrt(1 - cfg.beta2 ** t)
        scalars = {"loss_weight": 1.0 / tokens, "loss_scaling": self.loss_scale,
                   "inverse_loss_scaling": 1.0 / self.loss_scale, "decay_factor": 1 - lr * cfg.weight_decay,
                   "update_scale": -lr / (1 - cfg.beta1 ** t) * bias_correction2_sqrt,
                   "scaled_eps": cfg.eps * bias_correction2_sqrt}
        out = self._program_for(seq).run(ids, lab, scalars)
        self._device_ahead = True
        self._model.weights_ahead_in(self._sync_host)  # a handle on the model pulls them before its next use
        finite = bool(out["finite"])
        if finite or not self._constants.skip_nonfinite:
            self.optimizer_steps += 1
        if cfg.loss_scaling == "dynamic":
            self._update_loss_scale(finite)
        self.step_count += 1
        self.learning_rate = lr
        self.grad_norm = out["grad_norm"]
        return out["loss"]

    def _update_loss_scale(self, finite: bool) -> None:
        # torch.amp.GradScaler.update: halve and restart on overflow, double after growth_interval good steps.
        if not finite:
            self.loss_scale *= 0.5
            self.growth_tracker = 0
            return
        self.growth_tracker += 1
        if self.growth_tracker == DYNAMIC_GROWTH_INTERVAL:
            self.loss_scale *= 2.0
            self.growth_tracker = 0

    def _program_for(self, seq: int) -> TrainingProgram:
        """The step program for sequences of ``seq``, carrying the state over from another length's."""
        if self._seq != seq:
            self._sync_host()
            build = build_phased_training_step if self.config.phased else build_training_step
            program = build(self.model_config, self.config.execution(), self._model.weights, seq, self._constants)
            if self._host_state:
                program.load_state(self._host_state)
            self._program, self._seq = program, seq
        return self._program

    def _sync_host(self) -> None:
        """Bring the host copies (weights, moments) up to date with the device."""
        if self._program is not None and self._device_ahead:
            self._host_state = self._program.state_to_host()
            self._device_ahead = False  # first: reading the model's weights below calls back here
            self._model.weights.update(self._host_state["weights"])
            self._model.weights_changed()

    @property
    def model(self) -> GPTJ:
        """The model with the current weights (``logits``, ``loss_and_grads``)."""
        self._sync_host()
        return self._model

    @property
    def weights(self) -> Dict[str, np.ndarray]:
        """The current float32 weights in our layout (the one host copy)."""
        return self.model.weights

    # --- checkpoints
    def save(self, out_dir: PathLike, *, data_state: Optional[dict] = None, tokenizer=None) -> None:
        """Write a checkpoint to ``out_dir`` atomically: ``config.json`` and ``model.safetensors`` (float32,
        Hugging Face names and shapes: transformers loads it as is), a tokenizer, and the trainer state
        (config, counters, loss scale, AdamW moments and ``data_state``, a JSON-able dict).

        ``tokenizer``: the transformers tokenizer the training data was encoded with, saved by its
        ``save_pretrained``; without it the source checkpoint's tokenizer files are copied."""
        if data_state is not None and not isinstance(data_state, dict):
            raise TypeError(f"data_state must be a dict or None, got {type(data_state).__name__}")
        try:
            data_json = json.dumps(data_state)
        except (TypeError, ValueError) as e:
            raise ValueError(f"data_state must be JSON-serialisable: {e}") from None
        self._sync_host()
        tp = self.config.tensor_parallel
        hf = popxl_to_hf(self._model.weights, self.model_config, tp)
        state = {"format": STATE_FORMAT, "training_config": dataclasses.asdict(self.config),
                 "step_count": self.step_count, "optimizer_steps": self.optimizer_steps,
                 "loss_scale": self.loss_scale, "growth_tracker": self.growth_tracker,
                 "learning_rate": self.learning_rate, "grad_norm": self.grad_norm,
                 "data_state": json.loads(data_json)}
        moments = {f"{kind}/{name}": np.ascontiguousarray(a)
                   for kind in ("first_order", "second_order") for name, a in self._host_state.get(kind, {}).items()}
        with atomic_directory(out_dir, "config.json") as tmp:
            write_hf_files(tmp, self.model_config, hf)
            self._keep_source_config_keys(os.path.join(tmp, "config.json"))
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            else:
                for name in TOKENIZER_FILES:
                    source = os.path.join(self.model_dir, name)
                    if os.path.isfile(source):
                        shutil.copyfile(source, os.path.join(tmp, name))
            if moments:
                safetensors.numpy.save_file(moments, os.path.join(tmp, OPTIMIZER_STATE_FILE))
            with open(os.path.join(tmp, TRAINER_STATE_FILE), "w", encoding="utf-8") as f:
                json.dump(state, f, indent=2)

    def _keep_source_config_keys(self, config_file: str) -> None:
        """Add the source ``config.json``'s other keys (token ids, dropout, ...) to ours. Its dtype is
        replaced by the saved weights' float32: transformers loads a checkpoint in its config's dtype."""
        source = os.path.join(self.model_dir, "config.json")
        with open(source, encoding="utf-8") as f:
            merged = json.load(f)
        for key in ("dtype", "torch_dtype"):
            if key in merged:
                merged[key] = "float32"
        with open(config_file, encoding="utf-8") as f:
            merged.update(json.load(f))
        with open(config_file, "w", encoding="utf-8") as f:
            json.dump(merged, f, indent=2, sort_keys=True)

    @classmethod
    def resume(cls, directory: PathLike) -> "Trainer":
        """A trainer continuing from a ``save`` checkpoint: same config, counters, loss scale, weights and
        optimizer moments, so further steps give the same bits as an uninterrupted run.

        Raises:
            FileNotFoundError: ``directory`` has no trainer state.
            ValueError: the state is unreadable or of another format.
        """
        file = os.path.join(os.fspath(directory), TRAINER_STATE_FILE)
        state = read_json(file, f"no {TRAINER_STATE_FILE} in {os.fspath(directory)}: not a Trainer checkpoint")
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise ValueError(f"{file}: unknown trainer state format (expected format {STATE_FORMAT})")
        trainer = cls(directory, TrainingConfig(**state["training_config"]))
        for name in ("step_count", "optimizer_steps", "loss_scale", "growth_tracker", "learning_rate", "grad_norm",
                     "data_state"):
            setattr(trainer, name, state[name])
        moments_file = os.path.join(os.fspath(directory), OPTIMIZER_STATE_FILE)
        if os.path.isfile(moments_file):
            host = {"weights": dict(trainer._model.weights), "first_order": {}, "second_order": {}}
            for key, a in safetensors.numpy.load_file(moments_file).items():
                kind, name = key.split("/", 1)
                host[kind][name] = a
            trainer._host_state = host
        return trainer

    def memory_report(self, seq: Optional[int] = None) -> MemoryReport:
        """Static per-replica, per-phase device memory of the step program (``popxl_cpu.memory``): peak
        device bytes from the liveness of the lowered ops, remote-buffer bytes, and per phase the bytes of
        weights, gradients, optimizer state and activations.

        Args:
            seq: sequence length of the program; default the last step's (required before any step).
        """
        if seq is None:
            if self._seq is None:
                raise ValueError("memory_report needs seq before the first step (the program depends on it)")
            seq = self._seq
        return self._program_for(seq).memory_report()
