"""MNLI as text to text, in the reference app's prompt format.

An example reads ``mnli hypothesis: {hypothesis} premise: {premise} target: {word}<|endoftext|>``;
the prompt is everything up to and including ``target:``, and the model completes it with
`` {word}`` and the end-of-text token.
"""
from typing import List, Tuple

import numpy as np

from .loading import DataError

# GLUE MNLI's label ids, in order.
LABEL_WORDS: Tuple[str, ...] = ("entailment", "neutral", "contradiction")


def mnli_prompt(premise: str, hypothesis: str) -> str:
    """The prompt the model completes with a label word."""
    return f"mnli hypothesis: {hypothesis} premise: {premise} target:"


def mnli_text(premise: str, hypothesis: str, label: int, eos_token: str) -> str:
    """The full training text of an example: prompt, a space, the label word, then ``eos_token``."""
    return f"{mnli_prompt(premise, hypothesis)} {LABEL_WORDS[label]}{eos_token}"


# GLUE MNLI's columns, the ones an MNLI data set must have.
MNLI_COLUMNS: Tuple[str, ...] = ("premise", "hypothesis", "label")


def mnli_columns(dataset, where: str) -> Tuple[List[str], List[str], List[int]]:
    """The checked ``premise``, ``hypothesis`` and ``label`` columns of an MNLI ``dataset``.

    Args:
        dataset: a ``datasets.Dataset`` (or any sequence of dicts) with ``MNLI_COLUMNS``.
        where: the file or name the data came from, for error messages.

    Raises:
        DataError: a missing column, an empty data set, an empty premise or hypothesis, or a
            label that is not 0, 1 or 2; rows are counted from 0.
    """
    if len(dataset) == 0:
        raise DataError(f"{where}: the data set is empty")
    columns = list(dataset.column_names) if hasattr(dataset, "column_names") else list(dataset[0])
    missing = [c for c in MNLI_COLUMNS if c not in columns]
    if missing:
        raise DataError(f"{where}: missing column(s) {missing}; MNLI needs {list(MNLI_COLUMNS)}, found {columns}")
    if hasattr(dataset, "column_names"):
        premises, hypotheses, labels = (list(dataset[c]) for c in MNLI_COLUMNS)
    else:
        premises, hypotheses, labels = ([row[c] for row in dataset] for c in MNLI_COLUMNS)
    for row, (premise, hypothesis, label) in enumerate(zip(premises, hypotheses, labels)):
        for column, text in (("premise", premise), ("hypothesis", hypothesis)):
            if not isinstance(text, str) or not text.strip():
                raise DataError(f"{where}: row {row}: {column} must be non-empty text, got {text!r}")
        if not _is_label(label):
            raise DataError(f"{where}: row {row}: label must be 0, 1 or 2 ({', '.join(LABEL_WORDS)}), got {label!r}")
    return premises, hypotheses, [int(label) for label in labels]


def encode_mnli(dataset, tokenizer, where: str) -> List[Tuple[List[int], List[int]]]:
    """Token ids of every example of an MNLI ``dataset``, as ``(prompt_ids, target_ids)`` pairs.

    ``prompt_ids`` is the tokenized ``mnli_prompt`` (what validation feeds the model);
    ``target_ids`` is the tokenized `` {label word}`` followed by the tokenizer's eos id. Their
    concatenation is the tokenization of ``mnli_text`` for byte-level BPE tokenizers such as
    GPT-J's, whose pre-tokenizer splits before every space.

    Raises:
        DataError: as ``mnli_columns``, or a tokenizer without an eos token.
    """
    premises, hypotheses, labels = mnli_columns(dataset, where)
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no eos token; the MNLI target ends with one")
    prompts = tokenizer([mnli_prompt(p, h) for p, h in zip(premises, hypotheses)])["input_ids"]
    words = tokenizer([f" {word}" for word in LABEL_WORDS], add_special_tokens=False)["input_ids"]
    return [(list(prompt), list(words[label]) + [tokenizer.eos_token_id]) for prompt, label in zip(prompts, labels)]


def _is_label(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and 0 <= value < len(LABEL_WORDS)
