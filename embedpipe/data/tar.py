"""WebDataset shards: ``.tar`` files read in place, one image per sample.

A source is one shard, a glob (``shards/*.tar``) or a brace pattern (``data-{000000..000099}.tar``,
zero-padded as written; every shard it names must exist). Members are grouped into samples by key,
the member name up to the first dot of its base name (``cls/0001.jpg`` and ``cls/0001.cls`` are
sample ``cls/0001``), as WebDataset does. A sample's image is its ``jpg``/``jpeg``/``png``/``webp``/...
member; its label the integer (or text) in a ``.cls`` member, or ``label`` in a ``.json`` member;
with neither anywhere the shards are unlabelled. Samples without an image are skipped.

Each image is a row named ``<shard>::<member>`` (the shard relative to the pattern's folder), read
by offset from the shard, never extracted. Its stat key is the shard's: while the shard's size,
times and inode are unchanged, none of its members is hashed again.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import posixpath
import re
import tarfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataError
from .items import Reader, file_key
from .records import Dataset, label_codes
from .remote import expand_braces, filesystem, is_url, local_path, stat_object

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({"jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff"})
_WILDCARD = re.compile(r"[*?\[{]")
_BLOCK = 512  # tar's block size


def is_shard_source(source: str) -> bool:
    """Whether a source names tar shards: ends in ``.tar`` (after any pattern) or holds a glob or brace pattern of them."""
    return source.lower().endswith(".tar") or (bool(_WILDCARD.search(source)) and ".tar" in source.lower())


class TarReader(Reader):
    """Members of tar shards, by shard, offset and size."""

    kind = "tar"

    def __init__(self, base: str, shards: Sequence[str], shard_of: np.ndarray, offsets: np.ndarray, sizes: np.ndarray, *,
                 storage_options: dict[str, Any] | None = None) -> None:
        """
        Args:
            base: the folder (or URL prefix) shard names are relative to.
            shards: shard names relative to ``base``.
            shard_of: int32 (N,) each row's shard; offsets, sizes: int64 (N,) its member's data in the shard.
        """
        self.base, self.shards = base, tuple(shards)
        self.shard_of, self.offsets, self.sizes = shard_of, offsets, sizes
        self.storage_options = dict(storage_options or {})

    def shard_name(self, shard: int) -> str:
        return f"{self.base}/{self.shards[shard]}"

    def name(self, row: int, relpath: str) -> str:
        return f"{self.base}/{relpath}"

    def stat_keys(self, rows: np.ndarray, relpaths: Sequence[str]) -> np.ndarray:
        keys = np.stack([shard_key(self.shard_name(s), self.storage_options) for s in range(len(self.shards))]) \
            if self.shards else np.empty((0, 4), dtype=np.int64)
        return keys[self.shard_of[np.asarray(rows, dtype=np.int64)]]

    def groups(self, rows: np.ndarray) -> np.ndarray:
        return self.shard_of[np.asarray(rows, dtype=np.int64)]  # under torchrun a shard is read by one rank

    def read(self, row: int, relpath: str) -> bytes:
        shard, offset, size = int(self.shard_of[row]), int(self.offsets[row]), int(self.sizes[row])
        state = self._state
        if getattr(state, "shard", None) != shard:  # one open shard per thread: rows come shard by shard
            if getattr(state, "handle", None) is not None:
                state.handle.close()
            state.handle, state.shard = _open(self.shard_name(shard), self.storage_options), shard
        try:
            state.handle.seek(offset)
            data = state.handle.read(size)
        except OSError as error:
            raise OSError(f"{self.name(row, relpath)}: {error}") from None
        if len(data) != size:
            raise OSError(f"{self.name(row, relpath)}: truncated ({len(data)} of {size} bytes)")
        return data


def shard_key(name: str, storage_options: dict[str, Any] | None) -> np.ndarray:
    """A shard's stat key. Raises DataError naming a missing shard."""
    path = name if not is_url(name) else local_path(name)
    if path is None:
        return np.asarray(stat_object(name, storage_options), dtype=np.int64)
    try:
        return np.asarray(file_key(path), dtype=np.int64)
    except OSError as error:
        raise DataError(f"shard {name} cannot be read ({error.strerror}): check it exists") from None


def _open(name: str, storage_options: dict[str, Any] | None) -> Any:
    path = name if not is_url(name) else local_path(name)
    if path is not None:
        return open(path, "rb", buffering=0)
    fs, inner = filesystem(name, storage_options)
    return fs.open(inner, "rb")


def resolve_shards(source: str, storage_options: dict[str, Any] | None) -> tuple[str, list[str]]:
    """``(base, shard names relative to it)`` for a shard, glob or brace pattern, sorted.

    Raises:
        DataError: a shard a brace pattern names is missing, or a glob matches nothing.
    """
    remote = is_url(source) and local_path(source) is None
    if not remote and is_url(source):
        source = local_path(source) or source
    cut = _WILDCARD.search(source)
    base = (source[: cut.start()] if cut else source).rpartition("/")[0] or ("/" if source.startswith("/") else ".")
    names = expand_braces(source)
    found: list[str] = []
    for name in names:
        if not _WILDCARD.search(name):
            if len(names) > 1 or not cut:
                shard_key(name, storage_options)  # a missing shard is named here, not found missing later
            found.append(name)
            continue
        if remote:
            fs, inner = filesystem(name, storage_options)
            protocol = source.split("://", 1)[0]
            matched = [f"{protocol}://{m}" for m in fs.glob(inner)]
        else:
            matched = glob.glob(name)
        if not matched:
            raise DataError(f"no shards match {name}: check the pattern")
        found.extend(matched)
    found = sorted(set(found))
    prefix = base.rstrip("/") + "/"
    return base.rstrip("/") or "/", [f[len(prefix):] if f.startswith(prefix) else f for f in found]


def load_tar(source: str, *, storage_options: dict[str, Any] | None = None) -> Dataset:
    """WebDataset shards as a dataset (see the module docstring).

    Raises:
        DataError: a shard is missing, not a tar file, or truncated; a label is unreadable.
    """
    base, shards = resolve_shards(source, storage_options)
    rows: list[tuple[str, int, int, int, Any]] = []  # relpath, shard, offset, size, label
    for index, shard in enumerate(shards):
        name = f"{base}/{shard}"
        with _open(name, storage_options) as handle:
            for member, offset, size, label in _samples(handle, name):
                rows.append((f"{shard}::{member}", index, offset, size, label))
    rows.sort(key=lambda row: row[0])
    labels, class_names = label_codes([row[4] for row in rows], source)
    reader = TarReader(base, shards, np.fromiter((r[1] for r in rows), dtype=np.int32, count=len(rows)),
                       np.fromiter((r[2] for r in rows), dtype=np.int64, count=len(rows)),
                       np.fromiter((r[3] for r in rows), dtype=np.int64, count=len(rows)), storage_options=storage_options)
    root: Path | str = source if is_url(source) and local_path(source) is None else Path(os.path.abspath(local_path(source) or source))
    title = Path(shards[0]).stem if len(shards) == 1 else posixpath.basename(base.rstrip("/")) or "shards"
    return Dataset(root=root, layout="tar", relpaths=tuple(r[0] for r in rows), labels=labels,
                   split_codes=np.full(len(rows), -1, dtype=np.int8), class_names=class_names, reader=reader, title=title)


def _members(handle: Any, name: str) -> list[tuple[str, int, int]]:
    """(member name, data offset, size) of a shard's regular files, in tar order; checks the shard is whole."""
    found: list[tuple[str, int, int]] = []
    try:
        with tarfile.open(fileobj=handle, mode="r:") as tar:
            while (member := tar.next()) is not None:
                tar.members = []  # the listing is kept here, as three numbers per member, not as TarInfo objects
                if member.isfile():
                    found.append((member.name, member.offset_data, member.size))
            end = tar.offset
    except (tarfile.ReadError, EOFError, OSError) as error:
        raise DataError(f"{name} is not a readable tar file ({error}): check the shard, or write it again") from None
    size = handle.seek(0, os.SEEK_END)
    last = max((offset + length for _, offset, length in found), default=0)
    if last > size:
        raise DataError(f"{name} is truncated ({size} bytes; its members run to {last}): copy or write the shard again")
    handle.seek(end)
    rest = handle.read(2 * _BLOCK)
    if rest.strip(b"\0"):  # bytes after the last member that tarfile could not read as a header
        raise DataError(f"{name} is damaged or truncated after its member {found[-1][0] if found else 'list'}: "
                        "copy or write the shard again")
    return found


def _samples(handle: Any, name: str) -> list[tuple[str, int, int, Any]]:
    """(image member, offset, size, label or None) per sample of one shard."""
    groups: dict[str, dict[str, tuple[str, int, int]]] = {}
    for member, offset, size in _members(handle, name):
        directory, _, file = member.rpartition("/")
        stem, dot, suffix = file.partition(".")
        if not dot or file.startswith("."):
            continue
        key = f"{directory}/{stem}" if directory else stem
        groups.setdefault(key, {}).setdefault(suffix.lower(), (member, offset, size))
    samples = []
    skipped = 0
    for key, parts in groups.items():
        image = next((parts[s] for s in parts if s in IMAGE_SUFFIXES), None)
        if image is None:
            skipped += 1
            continue
        samples.append((*image, _label(handle, name, parts)))
    if skipped:
        logger.info("%s: %d samples without an image member skipped", name, skipped)
    return samples


def _label(handle: Any, name: str, parts: dict[str, tuple[str, int, int]]) -> Any:
    """A sample's label from its ``.cls`` (integer or text) or ``.json`` (``{"label": ...}``) member; None without."""
    for suffix in ("cls", "json"):
        if suffix not in parts:
            continue
        member, offset, size = parts[suffix]
        handle.seek(offset)
        text = handle.read(size).decode("utf-8", "replace").strip()
        if suffix == "cls":
            return int(text) if re.fullmatch(r"-?\d+", text) else text
        try:
            value = json.loads(text)
        except ValueError:
            raise DataError(f"{name}::{member} is not valid JSON: write the label as {{\"label\": 3}}") from None
        if isinstance(value, dict) and "label" in value:
            return value["label"]
    return None
