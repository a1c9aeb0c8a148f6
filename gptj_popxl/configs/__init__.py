"""Named configurations (``gptj_popxl/configs/NAME.yml``), the reference app's among them.

A file has three sections:

- ``model``: the GPT-J shape, in ``GPTJConfig`` field names;
- ``training``: sequence length, global batch, steps, learning rate and its warm-up proportion
  and schedule, weight decay, and the rows' layout (``packing``);
- ``execution``: micro-batch, data and tensor parallel, loss scaling, attention
  serialisation, dtype.

``load_config(name, overrides)`` reads one; an override is keyed by the field's name (field
names are unique across sections). Unknown names and fields are errors listing the valid ones.
"""
import dataclasses
import os
from typing import Any, Dict, List, Mapping, Optional, Union

from gptj_popxl.model.config import is_finite_number

_DIR = os.path.dirname(os.path.abspath(__file__))


@dataclasses.dataclass(frozen=True)
class ModelSection:
    """The GPT-J shape the config is for (``GPTJConfig`` field names)."""

    n_layer: int
    n_embd: int
    n_head: int
    rotary_dim: int
    vocab_size: int


@dataclasses.dataclass(frozen=True)
class TrainingSection:
    """What the optimisation does, independent of how it is laid out on devices."""

    sequence_length: int
    global_batch_size: int
    steps: int
    learning_rate: float
    warmup_proportion: float
    lr_schedule: str
    weight_decay: float
    # Rows pack examples end to end (the reference app's layout: no padding, the prompt in the loss),
    # or hold one padded example each with only its label word and eos in the loss.
    packing: bool


@dataclasses.dataclass(frozen=True)
class ExecutionSection:
    """How a step is laid out: micro-batches, replicas, precision."""

    micro_batch_size: int
    data_parallel: int
    tensor_parallel: int
    loss_scaling: Union[float, str]
    attention_serialisation: int
    dtype: str


_SECTIONS = {"model": ModelSection, "training": TrainingSection, "execution": ExecutionSection}
_CHOICES = {"lr_schedule": ("linear", "constant"), "dtype": ("float32", "float16")}


class ConfigError(ValueError):
    """An unknown config name or field, or a value of the wrong kind."""


@dataclasses.dataclass(frozen=True)
class NamedConfig:
    """One named config: its ``model``, ``training`` and ``execution`` sections."""

    name: str
    model: ModelSection
    training: TrainingSection
    execution: ExecutionSection

    @property
    def gradient_accumulation(self) -> int:
        """Micro-batches accumulated per step per replica: global batch / (micro-batch x data parallel)."""
        per_pass = self.execution.micro_batch_size * self.execution.data_parallel
        return self.training.global_batch_size // per_pass

    @property
    def warmup_steps(self) -> int:
        """``int(steps * warmup_proportion)``, as the reference app rounds it."""
        return int(self.training.steps * self.training.warmup_proportion)

    def fields(self) -> Dict[str, Any]:
        """Every field of the three sections, keyed by its (unique) name."""
        return {k: v for section in _SECTIONS for k, v in dataclasses.asdict(getattr(self, section)).items()}

    def gptj_config(self, **overrides):
        """A ``GPTJConfig`` of this config's model section (plus ``overrides``, e.g. ``n_positions``)."""
        from gptj_popxl.model.config import GPTJConfig

        return GPTJConfig(**{**dataclasses.asdict(self.model), **overrides})


def config_names() -> List[str]:
    """The names of the configs shipped in ``gptj_popxl/configs``."""
    return sorted(f[:-len(".yml")] for f in os.listdir(_DIR) if f.endswith(".yml"))


def field_names() -> List[str]:
    """Every field a config has, across its sections."""
    return [f.name for section in _SECTIONS.values() for f in dataclasses.fields(section)]


def load_config(name: str, overrides: Optional[Mapping[str, Any]] = None) -> NamedConfig:
    """The config ``name`` with ``overrides`` (field name -> value) applied.

    Raises:
        ConfigError: an unknown name, section or field (the valid ones are listed), a missing
            field, a value of the wrong kind, or a global batch that micro-batch x data
            parallel does not divide.
    """
    import yaml

    if name not in config_names():
        raise ConfigError(f"unknown config {name!r}; valid names: {', '.join(config_names())}")
    path = os.path.join(_DIR, f"{name}.yml")
    with open(path) as f:
        raw = yaml.safe_load(f) or {}
    unknown = sorted(set(raw) - set(_SECTIONS))
    if unknown:
        raise ConfigError(f"{path}: unknown section(s) {unknown}; valid sections: {', '.join(_SECTIONS)}")
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(field_names()))
    if unknown:
        raise ConfigError(f"unknown config field(s) {unknown}; valid fields: {', '.join(field_names())}")
    sections = {}
    for section, cls in _SECTIONS.items():
        given = dict(raw.get(section) or {})
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(given) - set(valid))
        if unknown:
            raise ConfigError(f"{path}: unknown field(s) {unknown} in {section}; valid fields: {', '.join(valid)}")
        given.update({k: v for k, v in overrides.items() if k in valid})
        missing = [k for k in valid if k not in given]
        if missing:
            raise ConfigError(f"{path}: {section} is missing field(s) {missing}")
        for field, value in given.items():
            _check_value(f"{name}.{section}.{field}", field, value)
        sections[section] = cls(**given)
    config = NamedConfig(name=name, **sections)
    execution, training = config.execution, config.training
    if training.global_batch_size % (execution.micro_batch_size * execution.data_parallel):
        raise ConfigError(f"{name}: global_batch_size {training.global_batch_size} is not a multiple of "
                          f"micro_batch_size {execution.micro_batch_size} x data_parallel {execution.data_parallel}")
    return config


def _check_value(where: str, field: str, value: Any) -> None:
    if field in _CHOICES:
        if value not in _CHOICES[field]:
            raise ConfigError(f"{where} must be one of {', '.join(_CHOICES[field])}, got {value!r}")
    elif field == "packing":
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
    elif field == "loss_scaling":
        if value != "dynamic" and not (is_finite_number(value) and value > 0):
            raise ConfigError(f"{where} must be a positive number or 'dynamic', got {value!r}")
    elif field in ("learning_rate", "warmup_proportion", "weight_decay"):
        if not (is_finite_number(value) and value >= 0):
            raise ConfigError(f"{where} must be a number >= 0, got {value!r}")
    elif not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        raise ConfigError(f"{where} must be an integer >= 1, got {value!r}")


__all__ = ["ConfigError", "ExecutionSection", "ModelSection", "NamedConfig", "TrainingSection", "config_names",
           "field_names", "load_config"]
