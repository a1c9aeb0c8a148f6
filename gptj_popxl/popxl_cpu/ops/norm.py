"""popxl.ops: norm ops."""
__all__ = []
