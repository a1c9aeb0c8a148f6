"""popxl.ops: dynamic ops."""
__all__ = []
