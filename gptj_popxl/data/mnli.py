"""MNLI as text to text, in the reference app's prompt format.

An example reads ``mnli hypothesis: {hypothesis} premise: {premise} target: {word}<|endoftext|>``;
the prompt is everything up to and including ``target:``, and the model completes it with
`` {word}`` and the end-of-text token.
"""
from typing import Tuple

# GLUE MNLI's label ids, in order.
LABEL_WORDS: Tuple[str, ...] = ("entailment", "neutral", "contradiction")


def mnli_prompt(premise: str, hypothesis: str) -> str:
    """The prompt the model completes with a label word."""
    return f"mnli hypothesis: {hypothesis} premise: {premise} target:"


def mnli_text(premise: str, hypothesis: str, label: int, eos_token: str) -> str:
    """The full training text of an example: prompt, a space, the label word, then ``eos_token``."""
    return f"{mnli_prompt(premise, hypothesis)} {LABEL_WORDS[label]}{eos_token}"
