"""Data sets for fine-tuning and validation (``gptj_popxl.data``).

- ``loading``: any local data set through ``datasets`` (json/jsonl, csv, parquet, a
  ``save_to_disk`` folder, or a Hub data set already in the local cache).
- ``mnli``: MNLI as text to text, the reference app's prompt format.
- ``batches``: packed or padded token rows, and ``BatchStream``, the seeded, data-parallel
  sharded and resumable global batches the Trainer consumes.
- ``tokenizer``: the checkpoint's tokenizer, or a small BPE trained locally.
- ``synthetic``: an MNLI-style data set with a rule-determined label that a tiny model can learn.

Typical use::

    tokenizer = load_tokenizer(model_dir)
    rows = load_mnli_rows("train.jsonl", tokenizer, sequence_length=64, packing=False)
    batches = BatchStream(rows, micro_batch_size=1, gradient_accumulation=4, data_parallel=2, seed=0)
    batch = next(batches)   # batch.input_ids, batch.labels: (8, 64) int64
"""
from typing import Optional

from .batches import IGNORE_INDEX, BatchStream, GlobalBatch, TokenRows, build_rows, packed_rows, padded_rows
from .loading import DataError, load_local_dataset
from .mnli import LABEL_WORDS, MNLI_COLUMNS, encode_mnli, mnli_columns, mnli_prompt, mnli_text
from .synthetic import synthetic_mnli, write_synthetic_mnli
from .tokenizer import EOS_TOKEN, load_tokenizer, train_bpe_tokenizer


def load_mnli_rows(path: str, tokenizer, sequence_length: int, packing: bool,
                   split: Optional[str] = None) -> TokenRows:
    """The MNLI data set at ``path`` (see ``load_local_dataset``) as training rows.

    Padded rows pad with the tokenizer's pad token, or its eos token when it has none.

    Raises:
        DataError: naming ``path`` and the row at fault (see ``encode_mnli`` and ``padded_rows``).
    """
    where = str(path)
    examples = encode_mnli(load_local_dataset(path, split), tokenizer, where)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return build_rows(examples, sequence_length, packing, pad, where)


__all__ = [
    "BatchStream", "DataError", "EOS_TOKEN", "GlobalBatch", "IGNORE_INDEX", "LABEL_WORDS", "MNLI_COLUMNS",
    "TokenRows", "build_rows", "encode_mnli", "load_local_dataset", "load_mnli_rows", "load_tokenizer",
    "mnli_columns", "mnli_prompt", "mnli_text", "packed_rows", "padded_rows", "synthetic_mnli", "train_bpe_tokenizer",
    "write_synthetic_mnli",
]
