"""Graph transforms."""
from .autodiff import ExpectedConnection, ExpectedConnectionType, GradGraphInfo, autodiff
from .passes import decompose_sum, io_tile_exchange, merge_exchange

__all__ = ["autodiff", "GradGraphInfo", "ExpectedConnection", "ExpectedConnectionType", "decompose_sum",
           "merge_exchange", "io_tile_exchange"]
