"""A synthetic MNLI-style data set whose label follows from a rule a tiny model can learn.

Sentences are ``{subject} {verb} {object}`` over a small vocabulary. Given a premise, the
hypothesis and label are:

- **entailment (0):** the hypothesis is the premise itself;
- **contradiction (2):** the premise negated: ``{subject} never {verb} {object}``;
- **neutral (1):** an unrelated sentence: subject, verb and object all differ from the premise's.

The premises are split between training and validation, so validation asks the model to
apply the rule to sentences it has never seen, not to recall them.
"""
import itertools
import json
import os
from typing import Dict, List, Tuple

import numpy as np

from .mnli import LABEL_WORDS

NOUNS: Tuple[str, ...] = ("cat", "dog", "fox", "owl", "bee", "ant", "elk", "yak")
VERBS: Tuple[str, ...] = ("sees", "likes", "eats", "hears", "helps", "finds")
NEGATION = "never"
SPLITS: Tuple[str, ...] = ("train", "validation")

Sentence = Tuple[str, str, str]


def _premises(seed: int, validation_fraction: float) -> Dict[str, List[Sentence]]:
    """Every sentence with two different nouns, shuffled by ``seed`` and split between ``SPLITS``."""
    sentences = [(s, v, o) for s, v, o in itertools.product(NOUNS, VERBS, NOUNS) if s != o]
    order = np.random.default_rng(seed).permutation(len(sentences))
    held_out = max(1, int(round(len(sentences) * validation_fraction)))
    return {"validation": [sentences[i] for i in order[:held_out]],
            "train": [sentences[i] for i in order[held_out:]]}


def _hypothesis(premise: Sentence, label: int, rng: np.random.Generator) -> str:
    subject, verb, obj = premise
    word = LABEL_WORDS[label]
    if word == "entailment":
        return " ".join(premise)
    if word == "contradiction":
        return f"{subject} {NEGATION} {verb} {obj}"
    other_subject = rng.choice([n for n in NOUNS if n != subject])
    other_verb = rng.choice([v for v in VERBS if v != verb])
    other_object = rng.choice([n for n in NOUNS if n not in (obj, other_subject)])
    return f"{other_subject} {other_verb} {other_object}"


def synthetic_mnli(size: int, split: str = "train", seed: int = 0, validation_fraction: float = 0.2) -> List[dict]:
    """``size`` examples of ``split`` as GLUE-MNLI rows: ``{"premise", "hypothesis", "label"}``.

    Labels are balanced (``size // 3`` or one more of each) and in random order. The same
    ``seed`` and ``validation_fraction`` give the same premise split for both ``SPLITS``.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    premises = _premises(seed, validation_fraction)[split]
    rng = np.random.default_rng([seed, SPLITS.index(split)])
    labels = rng.permutation(np.arange(size) % len(LABEL_WORDS))
    rows = []
    for label in labels.tolist():
        premise = premises[rng.integers(len(premises))]
        rows.append(dict(premise=" ".join(premise), hypothesis=_hypothesis(premise, label, rng), label=label))
    return rows


def write_synthetic_mnli(directory: str, train_size: int = 3000, validation_size: int = 300, seed: int = 0,
                         validation_fraction: float = 0.2) -> Dict[str, str]:
    """Write ``train.jsonl`` and ``validation.jsonl`` of ``synthetic_mnli`` under ``directory``.

    Returns the path of each split's file, keyed by split.
    """
    os.makedirs(directory, exist_ok=True)
    paths = {}
    for split, size in zip(SPLITS, (train_size, validation_size)):
        paths[split] = os.path.join(os.fspath(directory), f"{split}.jsonl")
        with open(paths[split], "w") as f:
            for row in synthetic_mnli(size, split, seed, validation_fraction):
                f.write(json.dumps(row) + "\n")
    return paths
