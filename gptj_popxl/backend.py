"""The popxl that model code builds with: the Poplar SDK's when importable, else ``popxl_cpu``.

``GPTJ_POPXL_BACKEND=cpu`` forces the CPU runtime; ``=sdk`` requires the SDK and fails without it.
"""
import importlib
import os

_choice = os.environ.get("GPTJ_POPXL_BACKEND", "").strip().lower()
if _choice not in ("", "cpu", "sdk"):
    raise ValueError(f"GPTJ_POPXL_BACKEND must be 'cpu' or 'sdk', got {_choice!r}")


def _load_sdk():
    module = importlib.import_module("popxl")
    # popxl_cpu may stand in for `popxl` when a script runs under `python -m gptj_popxl.popxl_cpu`.
    if getattr(module, "__name__", "") != "popxl" or getattr(module, "IS_POPXL_CPU", False):
        raise ImportError("popxl is the CPU stand-in")
    return module


if _choice == "cpu":
    from . import popxl_cpu as popxl
else:
    try:
        popxl = _load_sdk()
    except ImportError:
        if _choice == "sdk":
            raise ImportError("GPTJ_POPXL_BACKEND=sdk but the Poplar SDK's popxl is not importable") from None
        from . import popxl_cpu as popxl

ops = popxl.ops
IS_CPU = getattr(popxl, "IS_POPXL_CPU", False)
# The CPU runtime's hook for custom ops (``custom_op.CustomOp``); None with the Poplar SDK, whose
# custom ops are PopART C++ ops.
custom_op = popxl.custom_op if IS_CPU else None
# Building the CPU kernels of custom ops for this processor (``native.build``); None with the Poplar SDK.
native = popxl.native if IS_CPU else None

__all__ = ["popxl", "ops", "IS_CPU", "custom_op", "native"]
