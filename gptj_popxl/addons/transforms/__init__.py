"""Graph transforms of popxl-addons."""
from .autodiff import AccumulatingGradGraphInfo, autodiff, autodiff_with_accumulation

__all__ = ["autodiff", "autodiff_with_accumulation", "AccumulatingGradGraphInfo"]
