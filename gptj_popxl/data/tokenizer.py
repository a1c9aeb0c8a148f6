"""Tokenizers: the one next to a checkpoint, or a small BPE trained locally."""
import os
from typing import Iterable

EOS_TOKEN = "<|endoftext|>"
# A folder holds a tokenizer when it has one of these (fast tokenizer, GPT-2 BPE, SentencePiece).
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer.model")


def load_tokenizer(path: str, needs_eos: bool = True):
    """``transformers.AutoTokenizer`` from a local folder (a checkpoint or a tokenizer folder).

    ``needs_eos``: refuse a tokenizer without an eos token (MNLI targets end with one; free generation
    runs to its length without).

    Raises:
        ValueError: the folder holds no tokenizer files, or (``needs_eos``) a tokenizer without an eos token.
    """
    import transformers

    # Without its files transformers would build an empty tokenizer from config.json alone.
    if not any(os.path.isfile(os.path.join(path, name)) for name in TOKENIZER_FILES):
        raise ValueError(f"{path}: no tokenizer files in it (one of {', '.join(TOKENIZER_FILES)})")
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(os.fspath(path), local_files_only=True)
    except (OSError, ValueError, TypeError) as e:
        raise ValueError(f"{path}: no tokenizer could be loaded from it ({e})") from None
    if needs_eos and tokenizer.eos_token_id is None:
        raise ValueError(f"{path}: the tokenizer has no eos token; the MNLI target ends with one")
    return tokenizer


def train_bpe_tokenizer(texts: Iterable[str], path: str, vocab_size: int = 128):
    """Train a byte-level BPE tokenizer (GPT-2 style) on ``texts`` and save it at ``path``.

    Its alphabet is the characters of ``texts`` (not all 256 bytes), so a vocabulary of a
    hundred or so tokens suffices for a small corpus. ``<|endoftext|>`` is its eos (and bos /
    unk) special token and, as with GPT-J, it has no pad token. The folder is written with
    ``PreTrainedTokenizerFast.save_pretrained``, so ``AutoTokenizer`` loads it.

    Returns the ``PreTrainedTokenizerFast``.
    """
    import tokenizers
    import transformers

    bpe = tokenizers.Tokenizer(tokenizers.models.BPE())
    bpe.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS_TOKEN],
                                             show_progress=False)
    bpe.train_from_iterator(texts, trainer=trainer)
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS_TOKEN, bos_token=EOS_TOKEN,
                                                     unk_token=EOS_TOKEN)
    tokenizer.save_pretrained(os.fspath(path))
    return tokenizer
