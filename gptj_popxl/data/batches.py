"""Token rows for causal-LM training, and the global batches the Trainer consumes.

Two ways to turn examples into rows of ``sequence_length`` tokens:

- **packed** (transformers' ``run_clm``): every example's ids are concatenated in data-set
  order and cut into blocks of ``sequence_length``, dropping the remainder; the labels are
  a copy of the inputs, since the model shifts them inside.
- **padded**: one example per row, right-padded with the pad token (eos when the tokenizer
  has none). The labels are the inputs with the prompt and the padding set to ``-100``,
  so only the target (label word and eos) counts in the loss.

``BatchStream`` then serves global batches epoch after epoch in a seeded order, and
records its position so a resumed run continues with the very next batch.
"""
import dataclasses
import hashlib
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np

from .loading import DataError

IGNORE_INDEX = -100


@dataclasses.dataclass(frozen=True)
class TokenRows:
    """Training rows: ``input_ids`` and ``labels``, both int64 arrays of shape ``(rows, sequence_length)``."""

    input_ids: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def sequence_length(self) -> int:
        return self.input_ids.shape[1]

    def fingerprint(self) -> str:
        """A short hash of the rows, to tell at resume whether the data is still the same."""
        digest = hashlib.sha256(self.input_ids.tobytes())
        digest.update(self.labels.tobytes())
        return digest.hexdigest()[:16]


Example = Tuple[Sequence[int], Sequence[int]]  # (prompt ids, target ids)


def packed_rows(examples: Sequence[Example], sequence_length: int, where: str) -> TokenRows:
    """``run_clm``'s grouping: concatenate all examples and cut into ``sequence_length`` blocks.

    Raises:
        DataError: the data holds fewer tokens than one block.
    """
    tokens = np.fromiter((t for prompt, target in examples for t in (*prompt, *target)), dtype=np.int64)
    blocks = len(tokens) // sequence_length
    if blocks == 0:
        raise DataError(f"{where}: its {len(tokens)} tokens do not fill one block of sequence_length "
                        f"{sequence_length}")
    input_ids = tokens[:blocks * sequence_length].reshape(blocks, sequence_length)
    return TokenRows(input_ids, input_ids.copy())


def padded_rows(examples: Sequence[Example], sequence_length: int, pad_token_id: int, where: str) -> TokenRows:
    """One example per row, right-padded with ``pad_token_id``; only target positions keep their labels.

    Right padding needs no attention mask: under causal attention no real token sees the padding.

    Raises:
        DataError: an example (prompt, label word and eos) longer than ``sequence_length``,
            naming its row.
    """
    input_ids = np.full((len(examples), sequence_length), pad_token_id, dtype=np.int64)
    labels = np.full((len(examples), sequence_length), IGNORE_INDEX, dtype=np.int64)
    for row, (prompt, target) in enumerate(examples):
        end = len(prompt) + len(target)
        if end > sequence_length:
            raise DataError(f"{where}: row {row}: the prompt is {len(prompt)} tokens, {end} with its target, "
                            f"longer than sequence_length {sequence_length}")
        input_ids[row, :end] = (*prompt, *target)
        labels[row, len(prompt):end] = target
    return TokenRows(input_ids, labels)


@dataclasses.dataclass(frozen=True)
class GlobalBatch:
    """One optimizer step's rows, and where in the data they come from."""

    input_ids: np.ndarray
    labels: np.ndarray
    epoch: int
    index: int

    @property
    def tokens(self) -> int:
        return self.input_ids.size


class BatchStream:
    """Global batches of ``rows`` for ``micro_batch_size * gradient_accumulation * data_parallel`` rows a step.

    **Order.** Epoch ``e`` visits the rows in a permutation drawn from ``(seed, e)``; it is cut
    into ``batches_per_epoch = len(rows) // global_batch_size`` global batches and the rows
    left over are skipped in that epoch (a different set each epoch).

    **Data-parallel sharding.** The rows of a global batch are ordered
    ``(data_parallel, gradient_accumulation, micro_batch_size)``: replica ``r`` owns the
    contiguous block ``replica_rows(r)``, and inside it micro-batch ``m`` of the accumulation
    is rows ``m * micro_batch_size ... (m + 1) * micro_batch_size - 1``. Each replica thus sees
    distinct rows of the epoch's permutation.

    **Position.** ``state()`` is a JSON-able dict with the (epoch, index) of the next batch and
    what the order depends on; ``restore`` checks those and continues from there.
    """

    def __init__(self, rows: TokenRows, micro_batch_size: int, gradient_accumulation: int, data_parallel: int,
                 seed: int, where: str = "the data set") -> None:
        self.rows = rows
        self.micro_batch_size = micro_batch_size
        self.gradient_accumulation = gradient_accumulation
        self.data_parallel = data_parallel
        self.seed = seed
        self.global_batch_size = micro_batch_size * gradient_accumulation * data_parallel
        self.batches_per_epoch = len(rows) // self.global_batch_size
        if self.batches_per_epoch == 0:
            raise DataError(f"{where}: {len(rows)} rows, fewer than one global batch of {self.global_batch_size} "
                            f"(micro_batch_size {micro_batch_size} x gradient_accumulation "
                            f"{gradient_accumulation} x data_parallel {data_parallel})")
        self.epoch = 0
        self.index = 0
        self._fingerprint = rows.fingerprint()
        self._order_epoch = -1
        self._order = np.empty(0, dtype=np.int64)

    def order(self, epoch: int) -> np.ndarray:
        """The permutation of row numbers that ``epoch`` visits."""
        if epoch != self._order_epoch:
            self._order = np.random.default_rng([self.seed, epoch]).permutation(len(self.rows))
            self._order_epoch = epoch
        return self._order

    def replica_rows(self, replica: int) -> slice:
        """The rows of a global batch that data-parallel ``replica`` trains on."""
        if not 0 <= replica < self.data_parallel:
            raise ValueError(f"replica {replica} is outside data_parallel {self.data_parallel}")
        per_replica = self.micro_batch_size * self.gradient_accumulation
        return slice(replica * per_replica, (replica + 1) * per_replica)

    def __iter__(self) -> "BatchStream":
        return self

    def __next__(self) -> GlobalBatch:
        """The next global batch; the position moves past it."""
        start = self.index * self.global_batch_size
        picked = self.order(self.epoch)[start:start + self.global_batch_size]
        batch = GlobalBatch(self.rows.input_ids[picked], self.rows.labels[picked], self.epoch, self.index)
        self.index += 1
        if self.index == self.batches_per_epoch:
            self.epoch, self.index = self.epoch + 1, 0
        return batch

    def state(self) -> Dict[str, Any]:
        """The position of the next batch, plus what the order depends on (checked by ``restore``)."""
        return dict(epoch=self.epoch, index=self.index, seed=self.seed, global_batch_size=self.global_batch_size,
                    data_parallel=self.data_parallel, rows=len(self.rows), sequence_length=self.rows.sequence_length,
                    fingerprint=self._fingerprint)

    def restore(self, state: Dict[str, Any]) -> None:
        """Continue from a ``state()``; the data, seed and batch layout must be the ones it was taken with.

        Raises:
            DataError: a field differs (it is named), or the position is outside an epoch.
        """
        mine = self.state()
        changed = [f"{key} {state.get(key)!r} -> {mine[key]!r}" for key in mine
                   if key not in ("epoch", "index") and state.get(key) != mine[key]]
        if changed:
            raise DataError("cannot resume the data position: " + "; ".join(changed))
        epoch, index = state.get("epoch"), state.get("index")
        if not (isinstance(epoch, int) and epoch >= 0 and isinstance(index, int)
                and 0 <= index < self.batches_per_epoch):
            raise DataError(f"cannot resume the data position: epoch {epoch!r}, index {index!r} is not a batch of "
                            f"an epoch of {self.batches_per_epoch}")
        self.epoch, self.index = epoch, index


def build_rows(examples: List[Example], sequence_length: int, packing: bool, pad_token_id: int,
               where: str) -> TokenRows:
    """``packed_rows`` or ``padded_rows`` of ``examples``."""
    if packing:
        return packed_rows(examples, sequence_length, where)
    return padded_rows(examples, sequence_length, pad_token_id, where)
