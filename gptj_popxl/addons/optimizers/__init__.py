"""Optimizer step modules."""
from .adam import AdamOptimizerStep

__all__ = ["AdamOptimizerStep"]
