"""popxl.ops.collectives: collectives across replicas (filled in by the collectives module)."""
