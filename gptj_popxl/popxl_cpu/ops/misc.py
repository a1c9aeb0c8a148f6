"""popxl.ops: misc ops."""
__all__ = []
