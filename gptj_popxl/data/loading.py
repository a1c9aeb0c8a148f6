"""Reading a data set from local storage through ``datasets``; nothing is ever downloaded.

``PATH`` may be a json/jsonl, csv or parquet file, a folder written by
``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``, or the name of a Hub data set
(``name`` or ``name:config``, e.g. ``nyu-mll/glue:mnli``) that is already in the local
``datasets`` cache.
"""
import contextlib
import os
from typing import Iterator, Optional

# File suffix -> the ``datasets`` builder that reads it.
_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


class DataError(ValueError):
    """A data set that cannot be used as given; the message names the file and, where it applies, the row."""


def load_local_dataset(path: str, split: Optional[str] = None):
    """The ``split`` of the data set at ``path`` as a ``datasets.Dataset``.

    A ``save_to_disk`` folder holding a ``DatasetDict`` and a cached Hub data set are indexed by
    ``split`` (default ``"train"``). A single file is one split, ``"train"``, as ``datasets`` names
    it; a folder holding one ``Dataset`` is its own split (``"train"`` when it has no name). For these
    a ``split`` that names another is an error rather than ignored.

    Raises:
        DataError: unknown file type, missing split, a Hub name that is not cached, or an
            empty data set.
    """
    import datasets

    path = os.fspath(path)
    if os.path.isfile(path):
        suffix = os.path.splitext(path)[1].lower()
        if suffix not in _FILE_BUILDERS:
            raise DataError(f"{path}: unsupported file type {suffix!r}; expected one of {sorted(_FILE_BUILDERS)}")
        if os.path.getsize(path) == 0:
            raise DataError(f"{path}: the data set is empty (an empty file)")
        if split not in (None, "train"):
            raise DataError(f"{path}: a single file is one split, 'train'; it has no split {split!r}")
        try:
            with _quiet_datasets():
                dataset = datasets.load_dataset(_FILE_BUILDERS[suffix], data_files=path, split="train")
        except (ValueError, StopIteration, datasets.exceptions.DatasetGenerationError) as e:
            raise DataError(f"{path}: the data set is empty or not valid {suffix[1:]}: {e}") from None
    elif os.path.isdir(path):
        try:
            with _quiet_datasets():
                dataset = datasets.load_from_disk(path)
        except FileNotFoundError as e:
            raise DataError(f"{path}: not a folder written by save_to_disk ({e})") from None
        dataset = _pick_split(dataset, split, path)
    elif os.path.splitext(path)[1].lower() in _FILE_BUILDERS:
        raise DataError(f"{path}: no such file or directory")
    else:
        dataset = _load_cached_hub_dataset(path, split or "train")
    if len(dataset) == 0:
        raise DataError(f"{path}: the data set is empty")
    return dataset


def _pick_split(dataset, split: Optional[str], where: str):
    import datasets

    if isinstance(dataset, datasets.DatasetDict):
        split = split or "train"
        if split not in dataset:
            raise DataError(f"{where}: no split {split!r}; it has {sorted(dataset)}")
        return dataset[split]
    own = str(dataset.split) if dataset.split is not None else "train"
    if split not in (None, own):
        raise DataError(f"{where}: holds one data set, split {own!r}; it has no split {split!r}")
    return dataset


def _load_cached_hub_dataset(name: str, split: str):
    """A Hub data set from the local cache only (the builder ``load_dataset`` itself uses offline)."""
    from datasets.packaged_modules.cache.cache import Cache

    repo_id, _, config_name = name.partition(":")
    try:
        builder = Cache(dataset_name=repo_id.split("/")[-1], repo_id=repo_id, config_name=config_name or None,
                        version="auto", hash="auto")
    except (ValueError, FileNotFoundError) as e:
        raise DataError(f"{name}: not a local file or folder, and not in the local datasets cache "
                        f"(nothing is downloaded): {e}") from None
    try:
        with _quiet_datasets():
            return builder.as_dataset(split=split)
    except (ValueError, KeyError) as e:
        raise DataError(f"{name} (from the local datasets cache): {e}") from None


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[None]:
    """``datasets`` without its progress bars while loading (they would break the CLI's own bar)."""
    import datasets

    enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if enabled:
            datasets.enable_progress_bars()
