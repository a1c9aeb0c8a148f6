"""How one of our weights is made from Hugging Face tensors and back, tensor-parallel layout included.

A ``WeightMap`` ties one of our variables (``name``, relative to its phase module) to the HF
tensor(s) it holds (``hf_shapes``, names relative to the module's place in the HF model):
``from_hf`` builds our array from the HF arrays, ``to_hf`` turns an array of our ``shape`` back
into them (padding dropped). The phase modules (``layers.Embedding``, ``DecoderBlock``, ``LMHead``)
list their maps in ``weight_maps``; ``hf_mapping`` composes them into the whole model's.

Our linear weights are ``(in_features, out_features)``, the transpose of torch's. A sharded weight
has a leading axis of ``tp`` blocks; its heads, MLP columns or vocabulary entries are zero-padded up
to a multiple of ``tp`` first (``model.config.tp_layout``).
"""
import dataclasses
from typing import Dict, Tuple, Union

import numpy as np

from gptj_popxl.addons.array_munging import pad_axis, shard, unshard

Shape = Tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Replicated:
    """HF ``hf`` stored as is (the same on every shard)."""

    name: str
    hf: str
    shape: Shape

    @property
    def hf_shapes(self) -> Dict[str, Shape]:
        return {self.hf: self.shape}

    def from_hf(self, a: np.ndarray) -> np.ndarray:
        return a

    def to_hf(self, a: np.ndarray) -> Tuple[np.ndarray, ...]:
        return (a,)


@dataclasses.dataclass(frozen=True)
class Sharded:
    """HF ``hf`` of ``hf_shape`` (transposed first when ``transpose``: a torch linear weight), zero-padded
    along ``axis`` to ``padded`` and cut into ``tp`` contiguous blocks on a new leading axis."""

    name: str
    hf: str
    hf_shape: Shape
    axis: int
    padded: int
    tp: int
    transpose: bool = False

    @property
    def hf_shapes(self) -> Dict[str, Shape]:
        return {self.hf: self.hf_shape}

    @property
    def _stored(self) -> Shape:
        return self.hf_shape[::-1] if self.transpose else self.hf_shape

    @property
    def shape(self) -> Shape:
        block = list(self._stored)
        block[self.axis] = self.padded // self.tp
        return (self.tp,) + tuple(block)

    def from_hf(self, a: np.ndarray) -> np.ndarray:
        return shard(pad_axis(a.T if self.transpose else a, self.padded, self.axis), self.tp, self.axis)

    def to_hf(self, a: np.ndarray) -> Tuple[np.ndarray, ...]:
        size = self._stored[self.axis]
        # One shard is already the whole array: no concatenation copy.
        joined = a[0] if self.tp == 1 else unshard(a, self.axis)
        joined = joined[(slice(None),) * self.axis + (slice(size),)]
        return (joined.T if self.transpose else joined,)


@dataclasses.dataclass(frozen=True)
class FusedHeads:
    """HF ``hfs`` (torch linear weights ``(heads * head_dim, in_features)``, e.g. q, k and v) fused into
    one column-sharded weight: shard ``s`` holds, for heads ``[s * hps, (s + 1) * hps)`` of each
    in turn, every head's ``head_dim`` columns contiguous (heads padded to ``tp * hps``)."""

    name: str
    hfs: Tuple[str, ...]
    in_features: int
    heads: int
    head_dim: int
    heads_per_shard: int
    tp: int

    @property
    def hf_shapes(self) -> Dict[str, Shape]:
        return {hf: (self.heads * self.head_dim, self.in_features) for hf in self.hfs}

    @property
    def shape(self) -> Shape:
        return (self.tp, self.in_features, len(self.hfs) * self.heads_per_shard * self.head_dim)

    def from_hf(self, *ws: np.ndarray) -> np.ndarray:
        e, d, hps, tp = self.in_features, self.head_dim, self.heads_per_shard, self.tp
        # Each (heads * d, e) -> (e, tp, hps, d), stacked -> (e, n, tp, hps, d) -> (tp, e, n, hps, d).
        blocks = [pad_axis(w.T.reshape(e, self.heads, d), tp * hps, 1).reshape(e, tp, hps, d) for w in ws]
        return np.stack(blocks, axis=1).transpose(2, 0, 1, 3, 4).reshape(self.shape)

    def to_hf(self, a: np.ndarray) -> Tuple[np.ndarray, ...]:
        e, d, n = self.in_features, self.head_dim, len(self.hfs)
        # (tp, e, n * hps * d) -> (n, e, tp * hps, d), padded heads dropped -> n of (heads * d, e).
        per_weight = a.reshape(self.tp, e, n, self.heads_per_shard, d).transpose(2, 1, 0, 3, 4)
        heads = per_weight.reshape(n, e, -1, d)[:, :, :self.heads].reshape(n, e, self.heads * d)
        return tuple(w.T for w in heads)


# Any of the maps above: ``name``, ``shape``, ``hf_shapes``, ``from_hf(*hf_arrays)`` and ``to_hf(a)``
# (the HF arrays in ``hf_shapes`` order).
WeightMap = Union[Replicated, Sharded, FusedHeads]
