"""Datasets for fine-tuning and validation (``gptj_popxl.data``).

The MNLI text-to-text format of the reference app lives in ``gptj_popxl.data.mnli``.
"""
from .mnli import LABEL_WORDS, mnli_prompt, mnli_text

__all__ = ["LABEL_WORDS", "mnli_prompt", "mnli_text"]
