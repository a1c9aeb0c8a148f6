"""popxl.ops.var_updates: in-place variable updates."""
