"""Programs built from the model's layers."""
