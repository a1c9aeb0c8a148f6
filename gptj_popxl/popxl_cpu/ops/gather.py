"""popxl.ops: gather ops."""
__all__ = []
