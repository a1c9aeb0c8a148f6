"""Atomic writing of files and checkpoint directories.

Everything is first written to a hidden temporary sibling of the target (same
parent directory, hence same filesystem), flushed to disk, and only then renamed
into place, so a crash or an exception never leaves a half-written file or
checkpoint at the target path.
"""
import contextlib
import json
import os
import secrets
import shutil
from typing import Iterator, Union

PathLike = Union[str, "os.PathLike[str]"]


def _sibling_name(path: str, tag: str) -> str:
    """A fresh hidden name next to ``path``, e.g. ``dir/.ckpt.tmp-1a2b...``."""
    parent, name = os.path.split(path)
    return os.path.join(parent, f".{name}.{tag}-{secrets.token_hex(8)}")


def _fsync_path(path: str) -> None:
    # Directories must be opened read-only to be fsynced; that works for files too.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: str) -> None:
    """fsync every file and directory under ``root`` (bottom-up), then ``root``."""
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for name in filenames:
            _fsync_path(os.path.join(dirpath, name))
        for name in dirnames:
            _fsync_path(os.path.join(dirpath, name))
    _fsync_path(root)


def _remove(path: str) -> None:
    if os.path.islink(path) or not os.path.isdir(path):
        os.unlink(path)
    else:
        shutil.rmtree(path)


@contextlib.contextmanager
def atomic_directory(path: PathLike, marker: str) -> Iterator[str]:
    """Build a directory in a temporary sibling and swap it into ``path`` on success.

    Yields the temporary directory's path; write the directory's contents there,
    ``marker`` among them: the file every directory of this kind holds. When the
    ``with`` block completes, everything in it is fsynced and it is renamed to
    ``path``. An existing directory at ``path`` is replaced only when it is empty or
    holds ``marker`` (an earlier directory of the same kind), never a directory of
    other data; it is first moved aside and deleted only after the new one is in
    place. If the block raises, the temporary directory is removed and an existing
    ``path`` is left untouched.

    A crash between the two renames of a replacement leaves the previous
    directory at a hidden ``.<name>.old-*`` sibling, never a partial one at ``path``.

    Raises:
        NotADirectoryError: ``path`` exists and is not a directory.
        FileExistsError: ``path`` is a non-empty directory without ``marker``.
    """
    path = os.path.abspath(os.fspath(path))
    if os.path.lexists(path) and not os.path.isdir(path):
        raise NotADirectoryError(f"cannot write a checkpoint directory at {path}: it exists and is not a directory")
    if os.path.isdir(path) and os.listdir(path) and not os.path.lexists(os.path.join(path, marker)):
        raise FileExistsError(f"refusing to replace {path}: it is not empty and holds no {marker}, so it is not a "
                              f"directory of the kind being written; choose a new or empty directory")
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = _sibling_name(path, "tmp")
    # os.mkdir (not mkdtemp's 0o700) so the final directory gets umask-derived permissions.
    os.mkdir(tmp, 0o777)
    try:
        yield tmp
        _fsync_tree(tmp)
        if os.path.lexists(path):
            old = _sibling_name(path, "old")
            os.rename(path, old)
            try:
                os.rename(tmp, path)
            except BaseException:
                os.rename(old, path)
                raise
            # Make the swap durable before deleting the only other copy.
            _fsync_path(parent)
            _remove(old)
        else:
            os.rename(tmp, path)
        _fsync_path(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_json(file: str, missing: str):
    """The JSON value in ``file``.

    Raises:
        FileNotFoundError: there is no ``file`` (with the message ``missing``).
        ValueError: the file is not valid JSON.
    """
    if not os.path.isfile(file):
        raise FileNotFoundError(missing)
    with open(file, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{file} is not valid JSON: {e}") from None
