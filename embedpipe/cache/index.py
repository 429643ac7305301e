"""The file index: each image file's content hash, remembered by stat so unchanged files are not re-read.

A file's hash is trusted while its stat key (size, mtime and ctime in nanoseconds, inode) is what it
was when it was hashed, as git's index does. ctime cannot be set back by ``touch -d``, ``cp -p`` or
``rsync -t``, so an in-place rewrite that restores the mtime is still seen. An entry whose mtime or
ctime is not safely older than the moment it was hashed is "racily clean" (the file may have
changed within the same timestamp tick) and is hashed again. Each row also carries a short hash
binding its digest to its path and stat key, so digests swapped between rows, or edited, are not
trusted either; an index SQLite cannot read is moved aside and rebuilt by hashing.

Items that are not files (tar members, table rows, URLs: :class:`~embedpipe.data.items.ItemColumn`)
go through the same index under their locator, with the stat key their reader gives (their
container's) and the sha256 of the bytes it reads, so an image has one digest however it is stored.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from ..config import sha256_file
from ..data.filestat import MISSING, stat_many
from ..data.items import ItemColumn
from ..errors import CacheError, DataError
from .layout import INDEX_FILE, RAW_DIGEST_DTYPE, raw_digests

logger = logging.getLogger(__name__)

Progress = Callable[[int], None]
_HASH_SLICE = 2048  # files looked up, hashed and saved to the index at a time (bounded memory)
# Timestamps within this much of the hash are not trusted: FAT and some network filesystems keep
# mtimes to 2 s, so a change within that window after hashing may leave every stat field equal.
RACY_NS = 2_000_000_000
STAT_FIELDS = ("size", "mtime_ns", "ctime_ns", "inode")
# The table's name carries its layout's version: an index written by an older embedpipe (another
# table, other columns) is simply not read, and its files are hashed once more.
TABLE = "stats_v2"


def stat_files(paths: Sequence[str]) -> np.ndarray:
    """The stat key of each file: int64 ``(N, 4)`` of size, mtime_ns, ctime_ns, inode.

    An :class:`~embedpipe.data.items.ItemColumn` gives its items' keys (its containers' stats).

    Raises:
        CacheError: a file is missing or unreadable, named in the message.
        DataError: an item's container (a shard, a table file, an object) is missing.
    """
    if isinstance(paths, ItemColumn):
        return paths.stat_keys()
    stats = stat_many(paths)
    if (missing := np.flatnonzero(stats[:, 0] == MISSING)).size:
        path = paths[int(missing[0])]
        try:
            os.stat(path)  # again, for the reason
            reason = "it changed while read"
        except OSError as error:
            reason = error.strerror
        raise CacheError(f"cannot read {path} ({reason}): check it exists and is readable")
    return stats[:, 1:].copy()


def trusted(stats: np.ndarray, hashed_ns: np.ndarray | int) -> np.ndarray:
    """Which stat keys are safely older than the moment their file was hashed (not racily clean)."""
    return np.maximum(stats[:, 1], stats[:, 2]) < np.asarray(hashed_ns) - RACY_NS


def _row_check(path: str, *fields: object) -> str:
    """Binds a row's digest to its path and stat key: rows whose digests were swapped or edited are hashed again."""
    return hashlib.sha256("\0".join(map(str, (path, *fields))).encode("utf-8", "surrogateescape")).hexdigest()[:16]


def _sha256_item(items: ItemColumn, i: int) -> str:
    """Hex sha256 of an item's bytes: the digest a file holding them gets."""
    try:
        return hashlib.sha256(items.read(i)).hexdigest()
    except OSError as error:  # the message names the item (a URL, a shard member)
        raise DataError(f"cannot read {error}: check it exists and is reachable") from None


class FileIndex:
    """Remembers each file's content hash under its stat key, in SQLite (``files.sqlite``)."""

    def __init__(self, cache_dir: str | Path) -> None:
        self.path = Path(cache_dir) / INDEX_FILE

    def _connect(self) -> sqlite3.Connection:
        connection = sqlite3.connect(self.path, timeout=120)
        connection.execute(
            f"CREATE TABLE IF NOT EXISTS {TABLE} (path TEXT PRIMARY KEY, size INTEGER, mtime_ns INTEGER, "
            "ctime_ns INTEGER, inode INTEGER, hashed_ns INTEGER, digest TEXT, row_check TEXT)"
        )
        return connection

    def _quarantine(self, error: sqlite3.DatabaseError) -> None:
        """Move an unreadable index aside (it only saves hashing, so nothing is lost) and say so."""
        aside = self.path.with_name(f"{self.path.name}.damaged-{time.time_ns()}")
        try:
            os.replace(self.path, aside)
        except OSError as move:
            raise CacheError(f"file index {self.path} is unreadable ({error}) and cannot be moved aside ({move.strerror}): "
                             "delete it; it is rebuilt by hashing") from None
        logger.warning("file index %s was unreadable (%s): moved to %s; files are hashed again", self.path, error, aside.name)

    def digests(self, paths: Sequence[str | os.PathLike[str]], *, stats: np.ndarray | None = None, threads: int = 4,
                progress: Progress | None = None) -> np.ndarray:
        """sha256 of each file's bytes, ``RAW_DIGEST_DTYPE`` ``(N,)``; only new, changed or racily clean files are read.

        Args:
            paths: the files.
            stats: their stat keys when the caller has them (:func:`stat_files`), else they are taken here.

        Files go through in slices (look up, hash the stale ones, save), so memory holds one slice's
        bookkeeping, not the whole dataset's, and a killed scan keeps what it hashed.

        Raises:
            CacheError: a file vanished while scanning, or the index cannot be read or written.
        """
        if not isinstance(paths, (Sequence, ItemColumn)) or not all(isinstance(p, str) for p in paths[:1]):
            paths = [os.fspath(p) for p in paths]
        stats = stat_files(paths) if stats is None else stats
        for attempt in (1, 2):
            try:
                return self._digests(paths, stats, threads, progress)
            except sqlite3.OperationalError as error:
                raise CacheError(f"cannot use file index {self.path} ({error}): free disk space or check permissions") from None
            except sqlite3.DatabaseError as error:  # damaged bytes: "file is not a database", "malformed"
                if attempt == 2 or not self.path.exists():
                    raise CacheError(f"file index {self.path} is unreadable ({error}): delete it; it is rebuilt by hashing") from None
                self._quarantine(error)
        raise AssertionError("unreachable")

    def _digests(self, paths: Sequence[str], stats: np.ndarray, threads: int, progress: Progress | None) -> np.ndarray:
        result = np.empty(len(paths), dtype=RAW_DIGEST_DTYPE)
        connection = self._connect()
        try:
            with ThreadPoolExecutor(max_workers=threads) as pool:
                for start in range(0, len(paths), _HASH_SLICE):
                    end = start + _HASH_SLICE
                    result[start:end] = raw_digests(self._slice_digests(connection, pool, paths[start:end], stats[start:end], progress))
        except OSError as error:
            raise CacheError(f"cannot read {error.filename} ({error.strerror}): check it exists and is readable") from None
        finally:
            connection.close()
        return result

    def _slice_digests(self, connection: sqlite3.Connection, pool: ThreadPoolExecutor, paths: Sequence[str], stats: np.ndarray,
                       progress: Progress | None) -> list[str]:
        known: dict[str, tuple[int, int, int, int, int, str, str]] = {}
        for start in range(0, len(paths), 900):  # SQLite caps bound parameters
            chunk = paths[start : start + 900]
            query = ("SELECT path, size, mtime_ns, ctime_ns, inode, hashed_ns, digest, row_check "
                     f"FROM {TABLE} "
                     f"WHERE path IN ({','.join('?' * len(chunk))})")
            for path, *entry in connection.execute(query, chunk):
                if all(type(value) is int for value in entry[:5]):  # an edited row of another type is only stale
                    known[path] = tuple(entry)
        keys = stats.tolist()
        result: list[str | None] = []
        stale: list[int] = []
        failed_checks = 0
        for i, (path, key) in enumerate(zip(paths, keys)):
            entry = known.get(path)
            if entry is not None and list(entry[:4]) == key and max(key[1], key[2]) < entry[4] - RACY_NS:
                if entry[6] == _row_check(path, *entry[:6]):
                    result.append(entry[5])
                    continue
                failed_checks += 1
            result.append(None)
            stale.append(i)
        if failed_checks:
            logger.warning("%d entries of %s fail their check (edited or swapped digests): those files are hashed again",
                           failed_checks, self.path)
        if progress and len(paths) > len(stale):
            progress(len(paths) - len(stale))
        if stale:
            logger.debug("hashing %d new, changed or racily clean files", len(stale))
        rows = []
        hash_one = (lambda i: _sha256_item(paths, i)) if isinstance(paths, ItemColumn) else (lambda i: sha256_file(paths[i]))
        for i, digest in zip(stale, pool.map(hash_one, stale)):
            result[i] = digest
            row = (paths[i], *keys[i], time.time_ns(), digest)
            rows.append((*row, _row_check(*row)))
            if progress:
                progress(1)
        self._save(connection, rows)
        return result  # type: ignore[return-value]

    def problems(self) -> list[str]:
        """What is wrong with the index, reading every row; empty when it is sound (or absent: it only saves hashing)."""
        if not self.path.exists():
            return []
        try:
            # Not read-only: after a killed writer SQLite must roll its hot journal back before reading,
            # which is its normal recovery, not damage (read-only, it reports "readonly database").
            connection = sqlite3.connect(self.path, timeout=120)
            try:
                check = connection.execute("PRAGMA integrity_check").fetchone()[0]
                if check != "ok":
                    raise sqlite3.DatabaseError(check)
                tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type='table'")}
                count, bad, first_bad = 0, 0, ""
                if TABLE in tables:
                    # Row by row from the cursor, not fetchall: a million rows as Python tuples are 500 MB.
                    for row in connection.execute(f"SELECT * FROM {TABLE}"):
                        count += 1
                        if len(row) != 8 or row[7] != _row_check(*row[:7]):
                            bad, first_bad = bad + 1, first_bad or str(row[0])
            finally:
                connection.close()
        except sqlite3.DatabaseError as error:
            return [f"unreadable ({error}): the next extract moves it aside and hashes the images again"]
        if bad:
            return [f"{bad} of {count} rows fail their check (edited or swapped digests, e.g. {first_bad}): "
                    "the next extract hashes those files again"]
        return []

    def _save(self, connection: sqlite3.Connection, rows: list[tuple[object, ...]]) -> None:
        if not rows:
            return
        try:
            with connection:
                connection.executemany(f"INSERT OR REPLACE INTO {TABLE} VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)
        except sqlite3.OperationalError as error:  # full disk, read-only folder, a lock held too long
            raise CacheError(f"cannot update {self.path} ({error}): free disk space or check permissions") from None
