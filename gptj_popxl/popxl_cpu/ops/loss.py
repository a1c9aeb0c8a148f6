"""popxl.ops: loss ops."""
__all__ = []
