"""popxl.ops: where ops."""
__all__ = []
