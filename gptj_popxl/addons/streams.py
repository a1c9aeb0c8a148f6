"""Named host streams: ``InputStreams(x=((2, 4), popxl.float32))`` then ``ops.host_load(inputs.x)``."""
from collections import OrderedDict

from ..backend import popxl


class _Streams(OrderedDict):
    _make = None

    def __init__(self, **streams):
        super().__init__()
        for name, (shape, dtype) in streams.items():
            self[name] = type(self)._make(shape, dtype, name=name)

    @classmethod
    def from_streams(cls, streams):
        """Existing streams (an iterable of popxl streams) keyed by their ``tensor_id``."""
        self = cls()
        for stream in streams:
            self[stream.tensor_id] = stream
        return self

    def __getattr__(self, name: str):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"{type(self).__name__} has no stream {name!r}; streams: {list(self)}") from None


class InputStreams(_Streams):
    """Host-to-device streams by name, each given as ``(shape, dtype)``."""
    _make = staticmethod(popxl.h2d_stream)


class OutputStreams(_Streams):
    """Device-to-host streams by name, each given as ``(shape, dtype)``."""
    _make = staticmethod(popxl.d2h_stream)
