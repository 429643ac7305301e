"""Files that are whole or absent, and the one JSON conversion every stored document uses.

A file is written to a temporary name, fsync'd and renamed into place, so a crash leaves the old
file or the new one, never half of either.
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from pathlib import Path
from collections.abc import Callable
from typing import Any, BinaryIO


def fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (best effort: some filesystems cannot fsync a folder)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def temporary_name(path: Path) -> Path:
    """A hidden name beside ``path`` that no other writer picks; housekeeping removes leftovers by its prefix."""
    return path.with_name(f".tmp-{uuid.uuid4().hex}-{path.name}")


def write_atomically(path: Path, data: bytes | Callable[[BinaryIO], object]) -> None:
    """Write ``data`` to ``path`` so that a crash leaves the old file or the new one, never half of either.

    ``data`` is the bytes, or a function that writes them to the open file (large files, streamed).

    Raises:
        OSError: the write failed (full disk, permissions); the temporary file is gone and
            ``path`` is as it was. Callers turn it into their own error saying what to do.
    """
    tmp = temporary_name(path)
    try:
        with open(tmp, "wb") as handle:
            if callable(data):
                data(handle)
            else:
                handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)


def jsonable(value: Any) -> Any:
    """``json.dumps(default=...)`` for what embedpipe stores: numpy and torch scalars and arrays, paths, tuples."""
    if hasattr(value, "tolist") and callable(value.tolist):  # numpy scalars and arrays, torch tensors
        return value.tolist()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def json_bytes(data: Any, *, indent: int | None = 2) -> bytes:
    """``data`` as UTF-8 JSON with a final newline, through :func:`jsonable`."""
    return (json.dumps(data, indent=indent, default=jsonable) + "\n").encode()
