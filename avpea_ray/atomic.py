"""Atomic local file writes: the one helper both the storage layer and the adapter files use.

A file is written under a hidden temporary name beside its final name, flushed to disk and
moved over the final name with `os.replace`, so a reader sees either the old file or all of
the new one, never a half-written file. This module imports nothing of the package.
"""
from __future__ import annotations

import os
import tempfile
from typing import Callable


def fsync_dir(directory: str) -> None:
    """Persist a rename: fsync the directory entry (best effort, not on every OS)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def temp_path(final_path: str) -> str:
    """A fresh temporary file beside `final_path`, named `.<name>.tmp-XXXXXXXX` (hidden).

    Writers that are killed leave such files behind; the shard writer removes its own on
    its next successful run.
    """
    directory = os.path.dirname(os.path.abspath(final_path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(final_path)}.tmp-", dir=directory)
    os.close(fd)
    return tmp


def publish(tmp_path: str, final_path: str) -> None:
    """Atomically move a finished temp file to its final name (same directory)."""
    os.replace(tmp_path, final_path)
    fsync_dir(os.path.dirname(os.path.abspath(final_path)))


def _fsync_file(path: str) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def remove_quietly(path: str) -> None:
    """Delete a file; a missing one is not an error."""
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Produce the file at `path` atomically.

    Args:
        path: the final local path.
        write: writes the complete content to the temporary path it is given.
    """
    final = os.fspath(path)
    tmp = temp_path(final)
    try:
        write(tmp)
        _fsync_file(tmp)
        publish(tmp, final)
    except BaseException:
        remove_quietly(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to the local file `path` atomically (see `atomic_write`)."""
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    atomic_write(path, write)
