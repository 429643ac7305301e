"""The file index: each image file's content hash, remembered by stat so unchanged files are not re-read."""

from __future__ import annotations

import logging
import os
import sqlite3
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..config import sha256_file
from ..errors import CacheError
from .layout import INDEX_FILE

logger = logging.getLogger(__name__)

Progress = Callable[[int], None]
_HASH_SLICE = 2048  # files stat'ed, hashed and saved to the index at a time (bounded memory)


class FileIndex:
    """Remembers each file's content hash under its (size, mtime_ns, inode), in SQLite."""

    def __init__(self, cache_dir: str | Path) -> None:
        self.path = Path(cache_dir) / INDEX_FILE

    def _connect(self) -> sqlite3.Connection:
        try:
            connection = sqlite3.connect(self.path, timeout=120)
            connection.execute(
                "CREATE TABLE IF NOT EXISTS files (path TEXT PRIMARY KEY, size INTEGER, "
                "mtime_ns INTEGER, inode INTEGER, digest TEXT)"
            )
        except sqlite3.DatabaseError as error:
            raise CacheError(f"file index {self.path} is unreadable ({error}): delete it; it is rebuilt by hashing") from None
        return connection

    def digests(self, paths: Sequence[Path], *, threads: int = 4, progress: Progress | None = None) -> list[str]:
        """sha256 of each file's bytes; only new or changed files are read.

        Files go through in slices (stat, look up, hash the stale ones, save), so memory holds
        one slice's bookkeeping, not the whole dataset's, and a killed scan keeps what it hashed.

        Raises:
            CacheError: a file vanished while scanning, or the index cannot be written.
        """
        result: list[str] = []
        connection = self._connect()
        try:
            with ThreadPoolExecutor(max_workers=threads) as pool:
                for start in range(0, len(paths), _HASH_SLICE):
                    result.extend(self._slice_digests(connection, pool, paths[start : start + _HASH_SLICE], progress))
        except OSError as error:
            raise CacheError(f"cannot read {error.filename} ({error.strerror}): check it exists and is readable") from None
        finally:
            connection.close()
        return result

    def _slice_digests(
        self, connection: sqlite3.Connection, pool: ThreadPoolExecutor, paths: Sequence[Path], progress: Progress | None
    ) -> list[str]:
        stats = []
        for path in paths:
            try:
                st = os.stat(path)
            except OSError as error:
                raise CacheError(f"cannot read {path} ({error.strerror}): check it exists and is readable") from None
            stats.append((str(path), st.st_size, st.st_mtime_ns, st.st_ino))
        known: dict[str, tuple[int, int, int, str]] = {}
        keys = [s[0] for s in stats]
        for start in range(0, len(keys), 900):  # SQLite caps bound parameters
            chunk = keys[start : start + 900]
            query = f"SELECT path, size, mtime_ns, inode, digest FROM files WHERE path IN ({','.join('?' * len(chunk))})"
            for path, size, mtime, inode, digest in connection.execute(query, chunk):
                known[path] = (size, mtime, inode, digest)
        result: list[str | None] = []
        stale: list[int] = []
        for i, (path, size, mtime, inode) in enumerate(stats):
            entry = known.get(path)
            if entry is not None and entry[:3] == (size, mtime, inode):
                result.append(entry[3])
            else:
                result.append(None)
                stale.append(i)
        if progress and len(stats) > len(stale):
            progress(len(stats) - len(stale))
        if stale:
            logger.debug("hashing %d new or changed files", len(stale))
        batch = []
        for i, digest in zip(stale, pool.map(lambda i: sha256_file(Path(stats[i][0])), stale)):
            result[i] = digest
            batch.append((*stats[i], digest))
            if progress:
                progress(1)
        self._save(connection, batch)
        return [d for d in result if d is not None]

    def _save(self, connection: sqlite3.Connection, rows: list[tuple[str, int, int, int, str]]) -> None:
        if not rows:
            return
        try:
            with connection:
                connection.executemany("INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?, ?)", rows)
        except sqlite3.Error as error:
            raise CacheError(f"cannot update {self.path} ({error}): free disk space or check permissions") from None


