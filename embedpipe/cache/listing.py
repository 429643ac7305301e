"""Listing snapshots: what a dataset looked like when it was last exported, so a rerun costs what a stat costs.

After every extraction the cache keeps, per (dataset, embedding config), the dataset's rows (relative
paths, labels, split codes), each file's stat key and content digest, and the export they made. A
rerun lists and stats the files and compares: when every row, label and stat key is the same, and no
timestamp is racily close to when the snapshot was taken, the export is up to date and nothing is
hashed, imported or opened. Rows whose stat key still matches lend their digest to the next run, so
adding 1% new images hashes 1% of the files.

A snapshot is one ``.npz`` of plain arrays (read with ``allow_pickle=False``: it cannot run code),
with a sha256 over its arrays; a damaged or foreign one is ignored and rebuilt, never trusted.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any
from pathlib import Path

import numpy as np

from .._atomic import write_atomically
from ..config import CACHE_FORMAT, canonical_json, digest_of
from ..data.strings import PackedStrings
from .index import trusted
from .layout import RAW_DIGEST_DTYPE, as_raw_digests

logger = logging.getLogger(__name__)

LISTING_DIR = "listings"
SNAPSHOT_FORMAT = 2  # 2: digests held raw (32 bytes), not as hex
_ARRAYS = ("paths_blob", "paths_offsets", "labels", "split_codes", "stats", "digests", "export_stat", "errors_blob",
           "errors_offsets", "meta")


def hash_columns(digest: Any, columns: Iterable[np.ndarray]) -> Any:
    """Feed arrays' raw bytes to a hashlib object, without copying them; returns it."""
    for column in columns:
        digest.update(np.ascontiguousarray(column).data)
    return digest


def _new_checksum() -> Any:
    """A snapshot's checksum before its arrays' bytes are fed to it, in ``_ARRAYS`` order."""
    return hashlib.sha256("\0".join(_ARRAYS).encode())


def _checksum(arrays: dict[str, np.ndarray]) -> str:
    return hash_columns(_new_checksum(), (arrays[name] for name in _ARRAYS)).hexdigest()


@dataclass
class Snapshot:
    """A dataset's rows and files as they were exported (all arrays in dataset order)."""

    paths_blob: np.ndarray  # relative paths, packed (:class:`~embedpipe.data.strings.PackedStrings`): compared as bytes for a hit
    paths_offsets: np.ndarray
    labels: np.ndarray  # int64 (N,)
    split_codes: np.ndarray  # int8 (N,)
    stats: np.ndarray  # int64 (N, 4): size, mtime_ns, ctime_ns, inode
    digests: np.ndarray  # RAW_DIGEST_DTYPE (N,)
    taken_ns: int  # when the files were hashed: newer timestamps are racily clean
    export: str  # file name of the export, in the cache folder
    export_stat: np.ndarray  # int64 (4,): the export's stat key when it was written
    dims: dict[str, int]
    errors: list[tuple[str, str]]  # the export's ledger: (relative path, reason)

    @property
    def relpaths(self) -> PackedStrings:
        return PackedStrings(self.paths_blob, self.paths_offsets)


class Listings:
    """The snapshots of one cache folder (``cache/listings/<key>.npz``)."""

    def __init__(self, cache_dir: str | Path) -> None:
        self.folder = Path(cache_dir) / LISTING_DIR

    @staticmethod
    def key(source: str, split: dict[str, object] | None, config_key: str) -> str:
        """Which snapshot a dataset and embedding config use: its source path, split settings and config key."""
        return digest_of({"format": SNAPSHOT_FORMAT, "cache": CACHE_FORMAT, "source": source, "split": split, "config": config_key})

    def path(self, key: str) -> Path:
        return self.folder / f"{key[:32]}.npz"

    def read(self, key: str) -> Snapshot | None:
        """The snapshot under ``key``; None when there is none, or it is damaged or of another format."""
        if not self.path(key).exists():
            return None
        arrays = _load(self.path(key))
        if arrays is None:
            logger.warning("listing snapshot %s is damaged: ignored, and written again", self.path(key))
            return None
        try:
            meta = json.loads(arrays["meta"].tobytes().decode("utf-8"))
            if meta["format"] != SNAPSHOT_FORMAT or meta["key"] != key or arrays["digests"].dtype != RAW_DIGEST_DTYPE:
                return None
            errors = PackedStrings(arrays["errors_blob"], arrays["errors_offsets"]).tolist()
            return Snapshot(paths_blob=arrays["paths_blob"], paths_offsets=arrays["paths_offsets"],
                            labels=arrays["labels"], split_codes=arrays["split_codes"], stats=arrays["stats"],
                            digests=arrays["digests"], taken_ns=int(meta["taken_ns"]),
                            export=str(meta["export"]), export_stat=arrays["export_stat"],
                            dims={str(k): int(v) for k, v in meta["dims"].items()}, errors=list(zip(errors[0::2], errors[1::2])))
        except (ValueError, TypeError, KeyError, AttributeError):
            return None

    def problems(self) -> list[str]:
        """Snapshots that cannot be read or fail their checksum (the next extract ignores and rewrites them)."""
        found = []
        for path in sorted(self.folder.glob("*.npz")) if self.folder.is_dir() else []:
            if not _sound(path):
                found.append(f"{path.name}: damaged listing snapshot: the next extract ignores it and writes it again")
        return found

    def write(self, key: str, *, relpaths: PackedStrings, labels: np.ndarray, split_codes: np.ndarray,
              stats: np.ndarray, digests: np.ndarray, taken_ns: int, export: Path, dims: dict[str, int],
              errors: list[tuple[str, str]]) -> None:
        """Remember a dataset's rows as just exported. Best effort: a snapshot that cannot be written only costs speed."""
        errors_packed = PackedStrings.pack([text for pair in errors for text in pair])
        arrays = {
            "paths_blob": relpaths.blob, "paths_offsets": relpaths.offsets, "labels": np.asarray(labels, dtype=np.int64), "split_codes": split_codes,
            "stats": stats, "digests": as_raw_digests(digests), "export_stat": export_stat(export),
            "errors_blob": errors_packed.blob, "errors_offsets": errors_packed.offsets,
            "meta": np.frombuffer(canonical_json({"format": SNAPSHOT_FORMAT, "key": key, "taken_ns": taken_ns,
                                                  "export": export.name, "dims": dims}).encode(), dtype=np.uint8),
        }
        arrays["checksum"] = np.frombuffer(_checksum(arrays).encode(), dtype=np.uint8)
        with contextlib.suppress(OSError):
            self.folder.mkdir(parents=True, exist_ok=True)
            write_atomically(self.path(key), lambda handle: np.savez(handle, **arrays))  # streamed: no copy in memory


def _load(path: Path) -> dict[str, np.ndarray] | None:
    """A snapshot file's arrays; None when it cannot be read or fails its checksum."""
    try:
        with np.load(path, allow_pickle=False) as stored:
            arrays = {name: stored[name] for name in (*_ARRAYS, "checksum")}
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError):
        return None
    return arrays if arrays["checksum"].tobytes().decode("ascii", "replace") == _checksum(arrays) else None


_READ_BYTES = 1 << 22  # read into the checksum this much at a time


def _sound(path: Path) -> bool:
    """Whether a snapshot file reads back whole and matches its checksum, as :func:`_load` decides,
    but read a block at a time: ``cache verify`` holds 4 MiB of it, not the whole listing (about
    140 bytes an image)."""
    try:
        with zipfile.ZipFile(path) as archive:
            digest = _new_checksum()
            for name in _ARRAYS:
                with archive.open(f"{name}.npy") as member:
                    version = np.lib.format.read_magic(member)
                    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                    shape, fortran_order, dtype = read_header(member)
                    if fortran_order or dtype.hasobject:  # never written so; the checksum is of C-order bytes
                        return _load(path) is not None
                    left = math.prod(shape) * dtype.itemsize
                    while left:
                        block = member.read(min(left, _READ_BYTES))
                        if not block:
                            return False  # truncated
                        digest.update(block)
                        left -= len(block)
                    if member.read(1):  # also reaches the member's end, where zipfile checks its CRC
                        return False
            with archive.open("checksum.npy") as member:
                expected = np.load(member, allow_pickle=False)
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError):
        return False
    return expected.tobytes().decode("ascii", "replace") == digest.hexdigest()


def export_stat(path: Path) -> np.ndarray:
    """The stat key of an export file (zeros when it is missing)."""
    try:
        st = os.stat(path)
    except OSError:
        return np.zeros(4, dtype=np.int64)
    return np.array([st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino], dtype=np.int64)


def unchanged_rows(snapshot: Snapshot, relpaths: PackedStrings, stats: np.ndarray) -> np.ndarray | None:
    """For each of today's rows, the snapshot row it can take its digest from (-1: hash it again); None without a snapshot.

    A row keeps its digest when the same relative path had the same stat key when the snapshot was
    taken and that key was not racily close to it.
    """
    rows = relpaths.rows_in(snapshot.relpaths)
    known = rows >= 0
    same = np.zeros(len(relpaths), dtype=bool)
    same[known] = (snapshot.stats[rows[known]] == stats[known]).all(axis=1) & trusted(stats[known], snapshot.taken_ns)
    rows[~same] = -1
    return rows


def same_rows(snapshot: Snapshot, relpaths: PackedStrings, labels: np.ndarray) -> bool:
    """Whether today's relative paths and labels are the snapshot's, in the same order."""
    return relpaths == snapshot.relpaths and np.array_equal(snapshot.labels, labels)


def is_hit(snapshot: Snapshot, split_codes: np.ndarray, stats: np.ndarray, export: Path) -> bool:
    """For rows that are the snapshot's (:func:`same_rows`): whether their splits and files are those the
    snapshot's export was made from, and the export is untouched."""
    return (np.array_equal(snapshot.split_codes, split_codes)
            and np.array_equal(snapshot.stats, stats) and bool(trusted(stats, snapshot.taken_ns).all())
            and np.array_equal(snapshot.export_stat, export_stat(export)) and bool(snapshot.export_stat[0]))
