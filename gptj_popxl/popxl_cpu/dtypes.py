"""popxl dtypes, each tied to its numpy and torch counterparts."""
from typing import Any, Dict

import numpy as np
import torch


class dtype:
    """A tensor element type (popxl's ``popxl.dtype``)."""

    _by_name: Dict[str, "dtype"] = {}

    def __init__(self):
        raise TypeError("popxl dtypes are predefined (popxl.float32, popxl.int32, ...)")

    @classmethod
    def _create(cls, name: str, np_type, torch_type, is_int: bool, is_signed: bool) -> "dtype":
        self = object.__new__(cls)
        self._name = name
        self._np = np.dtype(np_type) if np_type is not None else None
        self._torch = torch_type
        self._is_int = is_int
        self._is_signed = is_signed
        cls._by_name[name] = self
        return self

    @property
    def name(self) -> str:
        return self._name

    @property
    def is_complex(self) -> bool:
        return False

    @property
    def is_floating_point(self) -> bool:
        return not self._is_int and self._name != "bool"

    @property
    def is_int(self) -> bool:
        return self._is_int

    @property
    def is_signed(self) -> bool:
        return self._is_signed

    def as_numpy(self) -> np.dtype:
        if self._np is None:
            raise TypeError(f"popxl.{self._name} has no numpy equivalent")
        return self._np

    def as_torch(self) -> torch.dtype:
        return self._torch

    @classmethod
    def from_name(cls, name: str) -> "dtype":
        try:
            return cls._by_name[name]
        except KeyError:
            raise ValueError(f"unknown popxl dtype name {name!r}") from None

    @classmethod
    def as_dtype(cls, type_value: Any) -> "dtype":
        """Converts a popxl/numpy/torch dtype, python type or name to a popxl dtype."""
        if isinstance(type_value, dtype):
            return type_value
        if isinstance(type_value, str):
            return cls.from_name(type_value)
        if isinstance(type_value, torch.dtype):
            for d in cls._by_name.values():
                if d._torch == type_value:
                    return d
        else:
            if type_value is float:
                return float32
            if type_value is int:
                return int32
            if type_value is bool:
                return bool_
            np_type = np.dtype(type_value)
            for d in cls._by_name.values():
                if d._np == np_type:
                    return d
        raise TypeError(f"{type_value!r} has no popxl dtype")

    def __repr__(self) -> str:
        return f"popxl.{self._name}"

    def __reduce__(self):
        return (dtype.from_name, (self._name,))


bool_ = dtype._create("bool", np.bool_, torch.bool, False, False)
int8 = dtype._create("int8", np.int8, torch.int8, True, True)
uint8 = dtype._create("uint8", np.uint8, torch.uint8, True, False)
int16 = dtype._create("int16", np.int16, torch.int16, True, True)
uint16 = dtype._create("uint16", np.uint16, torch.uint16, True, False)
int32 = dtype._create("int32", np.int32, torch.int32, True, True)
uint32 = dtype._create("uint32", np.uint32, torch.uint32, True, False)
int64 = dtype._create("int64", np.int64, torch.int64, True, True)
uint64 = dtype._create("uint64", np.uint64, torch.uint64, True, False)
float16 = dtype._create("float16", np.float16, torch.float16, False, True)
float32 = dtype._create("float32", np.float32, torch.float32, False, True)
float64 = dtype._create("float64", np.float64, torch.float64, False, True)
# Without a numpy type; kept so programs naming them import.
bfloat16 = dtype._create("bfloat16", None, torch.bfloat16, False, True)

half = float16
float = float32
double = float64
bool = bool_  # noqa: A001 - popxl exports the dtype as popxl.bool

__all__ = [
    "dtype", "bool", "bool_", "int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64",
    "float16", "float32", "float64", "bfloat16", "half", "float", "double",
]
