"""Reading and checking embedpipe's HDF5 files (shards and exports): attributes and checksums.

The names and sizes they use are :mod:`.layout`'s.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from .layout import CHUNK_ROWS

STR_DTYPE = h5py.string_dtype()


def decode_attr(value: Any) -> Any:
    """An HDF5 attribute as Python: JSON text parsed, bytes decoded, numpy scalars unwrapped."""
    if isinstance(value, bytes):
        value = value.decode()
    if isinstance(value, str) and value[:1] in "[{":
        with contextlib.suppress(ValueError):
            return json.loads(value)
    if isinstance(value, np.generic):
        return value.item()
    return value


def read_attrs(path: Path) -> dict[str, Any] | None:
    """An HDF5 file's attributes, decoded; None when it is missing or unreadable."""
    try:
        with h5py.File(path, "r") as f:
            return {k: decode_attr(v) for k, v in f.attrs.items()}
    except (OSError, KeyError, RuntimeError, ValueError, UnicodeDecodeError):  # what h5py raises on damaged bytes
        return None


def feed_values(digest: Any, block: Any, *, text: bool) -> None:
    """Feed one non-empty block of a dataset's values to ``digest`` as its checksum takes them: numbers
    as their raw bytes, texts (``str``, or ``bytes`` as h5py reads them) as UTF-8 with a NUL after each.

    The one encoding rule, for the writer (values as written) and the readers (values as read back).
    """
    if not text:
        digest.update(np.ascontiguousarray(block).data)
        return
    values = block.tolist() if isinstance(block, np.ndarray) else block
    if isinstance(values[0], str):
        digest.update("\0".join(values).encode() + b"\0")  # UTF-8 is NUL-free, so the join encodes as the parts do
    else:
        digest.update(b"\0".join(map(bytes, values)) + b"\0")  # each value and a NUL, joined in C


def column_digest(data: h5py.Dataset, digest: Any) -> Any:
    """Feed a dataset's values to ``digest`` in chunks (:func:`feed_values`)."""
    text = h5py.check_string_dtype(data.dtype) is not None
    for start in range(0, data.shape[0], CHUNK_ROWS):
        block = data[start : start + CHUNK_ROWS]
        feed_values(digest, block, text=text)
        del block  # freed before the next block is read: one block in memory, not two
    return digest


ATTRIBUTES = "@attributes"  # the checksums entry for the file's attributes (every one but ``checksums``)


def attributes_digest(f: h5py.File) -> str:
    """Hex sha256 of a file's attributes as read back (decoded, canonical JSON), ``checksums`` left out."""
    from ..config import canonical_json

    attrs = {name: decode_attr(value) for name, value in f.attrs.items() if name != "checksums"}
    return hashlib.sha256(canonical_json({k: _plain(v) for k, v in attrs.items()}).encode()).hexdigest()


def _plain(value: Any) -> Any:
    return value.tolist() if isinstance(value, np.ndarray) else value


def column_checksums(f: h5py.File, names: list[str]) -> str:
    """The ``checksums`` attribute for these datasets of ``f`` and its attributes: canonical JSON of name -> hex sha256."""
    from ..config import canonical_json

    sums = {name: column_digest(f[name], hashlib.sha256()).hexdigest() for name in names if name in f}
    return canonical_json({**sums, ATTRIBUTES: attributes_digest(f)})


def read_checksums(f: h5py.File) -> dict[str, str] | None:
    """The ``checksums`` attribute (name -> hex sha256); None when it is missing or damaged."""
    try:
        found = json.loads(f.attrs["checksums"])
    except (KeyError, ValueError, TypeError):
        return None
    if not isinstance(found, dict) or not all(isinstance(v, str) for v in found.values()):
        return None
    return found


def checksum_problems(f: h5py.File, *, only: Any = None) -> list[str]:
    """Datasets whose bytes differ from the ``checksums`` attribute ``f`` was written with (those in ``only`` when given)."""
    expected = read_checksums(f)
    if expected is None:
        return ["has no readable checksums (written by an older embedpipe, or damaged)"]
    problems = []
    for name, want in expected.items():
        if only is not None and name not in only:
            continue
        if name == ATTRIBUTES:
            if attributes_digest(f) != want:
                problems.append("its attributes do not match their checksum")
            continue
        if name not in f or not isinstance(f[name], h5py.Dataset) or not f[name].shape or column_digest(f[name], hashlib.sha256()).hexdigest() != want:
            problems.append(f"{name} does not match its checksum")
    return problems
