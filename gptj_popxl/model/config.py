"""GPT-J model hyper-parameters and their tensor-parallel layout."""
import dataclasses
import math
import os
from typing import Any, Dict, Mapping, Optional, Union

from gptj_popxl import addons
from gptj_popxl.checkpoint import read_json

_SUPPORTED_ACTIVATION = "gelu_new"


def is_positive_int(value: Any) -> bool:
    """Whether ``value`` is an ``int`` >= 1 (bool is an int subclass, but True as a count is a bug, not a 1)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def is_finite_number(value: Any) -> bool:
    """Whether ``value`` is a finite ``int`` or ``float`` (not a bool): an infinite or NaN setting would
    train silently wrong."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_positive_int(name: str, value: Any) -> None:
    if not is_positive_int(value):
        raise ValueError(f"GPTJConfig.{name} must be a positive integer, got {value!r}")


@dataclasses.dataclass(frozen=True)
class GPTJConfig:
    """Hyper-parameters of a GPT-J causal language model.

    Field names and defaults follow ``transformers.GPTJConfig`` (the defaults are
    GPT-J 6B's), so a Hugging Face ``config.json`` maps onto it directly.

    Attributes:
        vocab_size: number of token embeddings / logits.
        n_positions: maximum sequence length (size of the rotary table).
        n_embd: hidden size.
        n_layer: number of transformer blocks.
        n_head: number of attention heads; must divide ``n_embd``.
        rotary_dim: leading features of each head that get rotary position
            embedding. ``None`` means the whole head (``head_dim``) and is replaced
            by that value on construction. Must be even and at most ``head_dim``.
        n_inner: MLP hidden size; ``None`` means ``4 * n_embd`` (see ``inner_size``).
        layer_norm_epsilon: epsilon of every LayerNorm.
        activation_function: MLP activation; only ``"gelu_new"`` (tanh-approximated
            GELU, GPT-J's) is supported.
        tie_word_embeddings: must be False; GPT-J has a separate ``lm_head``.
    """

    vocab_size: int = 50400
    n_positions: int = 2048
    n_embd: int = 4096
    n_layer: int = 28
    n_head: int = 16
    rotary_dim: Optional[int] = 64
    n_inner: Optional[int] = None
    layer_norm_epsilon: float = 1e-5
    activation_function: str = _SUPPORTED_ACTIVATION
    tie_word_embeddings: bool = False

    def __post_init__(self) -> None:
        for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
            _check_positive_int(name, getattr(self, name))
        if self.n_embd % self.n_head:
            raise ValueError(
                f"GPTJConfig.n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})"
            )
        if self.rotary_dim is None:
            object.__setattr__(self, "rotary_dim", self.head_dim)
        _check_positive_int("rotary_dim", self.rotary_dim)
        # Rotary embedding rotates feature pairs, so it needs an even count within a head.
        if self.rotary_dim % 2 or self.rotary_dim > self.head_dim:
            raise ValueError(
                f"GPTJConfig.rotary_dim ({self.rotary_dim}) must be even and at most "
                f"head_dim ({self.head_dim})"
            )
        if self.n_inner is not None:
            _check_positive_int("n_inner", self.n_inner)
        if not (is_finite_number(self.layer_norm_epsilon) and self.layer_norm_epsilon > 0):
            raise ValueError(
                f"GPTJConfig.layer_norm_epsilon must be a finite positive number, got {self.layer_norm_epsilon!r}"
            )
        if self.activation_function != _SUPPORTED_ACTIVATION:
            raise ValueError(
                f"GPTJConfig.activation_function must be {_SUPPORTED_ACTIVATION!r}, "
                f"got {self.activation_function!r}"
            )
        if self.tie_word_embeddings:
            raise ValueError("GPTJConfig.tie_word_embeddings must be False: GPT-J has an untied lm_head")

    @property
    def head_dim(self) -> int:
        """Features per attention head (``n_embd // n_head``)."""
        return self.n_embd // self.n_head

    @property
    def inner_size(self) -> int:
        """MLP hidden size: ``n_inner``, or ``4 * n_embd`` when that is None."""
        return 4 * self.n_embd if self.n_inner is None else self.n_inner

    @classmethod
    def from_hf_dict(cls, hf: Mapping[str, Any]) -> "GPTJConfig":
        """Build from a Hugging Face GPT-J config dict (e.g. a parsed ``config.json``).

        Keys that are not fields (dropout rates, token ids, ...) are ignored; missing
        fields take transformers' defaults.

        Raises:
            ValueError: ``model_type`` is present and not ``"gptj"``, or a value is invalid.
        """
        model_type = hf.get("model_type", "gptj")
        if model_type != "gptj":
            raise ValueError(f"expected a GPT-J config (model_type 'gptj'), got model_type {model_type!r}")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in hf.items() if k in names})

    @classmethod
    def from_pretrained_dir(cls, path: Union[str, "os.PathLike[str]"]) -> "GPTJConfig":
        """Read ``config.json`` from a local Hugging Face checkpoint directory.

        Raises:
            FileNotFoundError: there is no ``config.json`` in ``path``.
            ValueError: the file is not valid JSON or not a valid GPT-J config.
        """
        file = os.path.join(os.fspath(path), "config.json")
        hf = read_json(file, f"no config.json in checkpoint directory {os.fspath(path)}")
        if not isinstance(hf, dict):
            raise ValueError(f"{file} must hold a JSON object, got {type(hf).__name__}")
        try:
            return cls.from_hf_dict(hf)
        except (TypeError, ValueError) as e:
            raise ValueError(f"invalid GPT-J config in {file}: {e}") from e

    def to_hf_dict(self) -> Dict[str, Any]:
        """A dict accepted by ``transformers.GPTJConfig(**d)``, ready for ``config.json``.

        ``rotary_dim`` is always written as an integer: transformers' GPT-J treats a
        ``None`` rotary_dim as ``n_embd`` wide, not ``head_dim``.
        """
        hf = {"model_type": "gptj", "architectures": ["GPTJForCausalLM"]}
        hf.update(dataclasses.asdict(self))
        return hf


@dataclasses.dataclass(frozen=True)
class TPLayout:
    """How a model is split over ``tp`` tensor-parallel shards.

    Heads, MLP columns and vocabulary entries are padded up to a multiple of ``tp``
    (padding goes at the end, so the last shard(s) hold it) and each shard owns one
    contiguous block of ``*_per_shard`` of them.
    """

    tp: int
    heads_padded: int
    heads_per_shard: int
    inner_padded: int
    inner_per_shard: int
    vocab_padded: int
    vocab_per_shard: int


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def tp_layout(config: GPTJConfig, tp: int) -> TPLayout:
    """The tensor-parallel layout of ``config`` over ``tp`` shards.

    Raises:
        ValueError: ``tp`` is not an integer >= 1.
    """
    if not is_positive_int(tp):
        raise ValueError(f"tensor-parallel degree tp must be an integer >= 1, got {tp!r}")
    heads = _round_up(config.n_head, tp)
    inner = _round_up(config.inner_size, tp)
    # The embedding layer's shard size: popxl-addons rounds it up to a multiple of 16 where ours does
    # not, so under the SDK the whole model follows its layer's layout.
    vocab = addons.layers.Embedding.get_vocab_shard_size(config.vocab_size, tp) * tp
    return TPLayout(
        tp=tp,
        heads_padded=heads,
        heads_per_shard=heads // tp,
        inner_padded=inner,
        inner_per_shard=inner // tp,
        vocab_padded=vocab,
        vocab_per_shard=vocab // tp,
    )
