"""popxl.ops: random ops."""
__all__ = []
