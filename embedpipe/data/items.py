"""Where an item's bytes come from, for items that are not plain files.

A plain image file is a path, hashed and decoded from disk, and stays that way (a dataset of plain
files is a column of paths plus one stat key per file). Every other kind of item (a tar member, a
row of an Arrow or Parquet table, a URL) is named by a locator string, such as
``/data/shard-000003.tar::cls/0001.jpg`` or ``https://host/a.jpg``, and read through a
:class:`Reader`: its bytes are what is hashed (so the digest is the same sha256 a file of those
bytes gets, and the cache rows are shared) and what is decoded.

A reader also gives each item a stat key, the four int64 fields the file index compares
(size, mtime_ns, ctime_ns, inode), taken from the container the item lives in: a tar member's is
its shard's, a table row's its data file's. While that key is unchanged, and not racily close to
when the item was hashed, the digest is trusted. An item with nothing to stat (a URL in a
manifest) gets :func:`untrusted_key`, whose timestamp is now: it is fetched and hashed on every run.

Readers hold plain data only (strings, arrays, options) and open files lazily, once per process
and thread, so they pickle into DataLoader workers.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Sequence
from typing import Any, overload

import numpy as np

from .strings import PackedStrings

STAT_WIDTH = 4  # size, mtime_ns, ctime_ns, inode: the file index's stat key


def file_key(path: str) -> tuple[int, int, int, int]:
    """A local file's stat key (raises OSError when it cannot be stat'ed)."""
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino


def untrusted_key() -> tuple[int, int, int, int]:
    """A stat key that is never trusted: its timestamps are now, so the item is hashed again every run."""
    now = time.time_ns()
    return 0, now, now, 0


class Reader:
    """How one source reads its items: the bytes and the stat key of a dataset row.

    Rows are positions in the :class:`~.records.Dataset` the reader belongs to. Subclasses set
    :attr:`kind` and implement :meth:`name`, :meth:`read` and :meth:`stat_keys`; per-process
    state (open files, cached tables) lives in ``self._local`` and is dropped when pickled.
    """

    kind = "items"

    def name(self, row: int, relpath: str) -> str:
        """The item's locator: shown in messages, and its key in the file index."""
        raise NotImplementedError

    def read(self, row: int, relpath: str) -> bytes:
        """The item's bytes. Raises OSError (naming the item) when they cannot be read."""
        raise NotImplementedError

    def stat_keys(self, rows: np.ndarray, relpaths: Sequence[str]) -> np.ndarray:
        """int64 ``(len(rows), 4)`` change keys. Raises :class:`~embedpipe.errors.DataError` naming a missing container."""
        raise NotImplementedError

    def groups(self, rows: np.ndarray) -> np.ndarray | None:
        """The container each row is read from (a tar shard), so ranks share out whole containers; None: rows stand alone."""
        return None

    @property
    def _state(self) -> threading.local:
        local = self.__dict__.get("_local")
        if local is None:
            local = self.__dict__["_local"] = threading.local()
        return local

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "_local"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)


class ItemColumn(Sequence[str]):
    """A read-only column of item locators, each readable as bytes through its :class:`Reader`.

    ``column[i]`` is the i-th locator (made when read), ``column.read(i)`` its bytes and
    ``column.stat_keys()`` the change key of every item. Slicing and :meth:`take` give columns.
    """

    __slots__ = ("reader", "relpaths", "rows")

    def __init__(self, reader: Reader, relpaths: Sequence[str], rows: np.ndarray | None = None) -> None:
        self.reader, self.relpaths = reader, relpaths
        self.rows = np.arange(len(relpaths), dtype=np.int64) if rows is None else rows

    def __len__(self) -> int:
        return len(self.relpaths)

    @overload
    def __getitem__(self, index: int) -> str: ...

    @overload
    def __getitem__(self, index: slice) -> ItemColumn: ...

    def __getitem__(self, index: int | slice) -> str | ItemColumn:
        if isinstance(index, slice):
            return self.take(range(len(self))[index])
        return self.reader.name(int(self.rows[index]), self.relpaths[index])

    def take(self, positions: Sequence[int]) -> ItemColumn:
        """The items at ``positions`` (in this column), as a column of their own."""
        positions = np.asarray(positions, dtype=np.int64)
        relpaths = self.relpaths
        taken = relpaths.take(positions) if isinstance(relpaths, PackedStrings) else [relpaths[i] for i in positions.tolist()]
        return ItemColumn(self.reader, taken, self.rows[positions])

    def read(self, index: int) -> bytes:
        return self.reader.read(int(self.rows[index]), self.relpaths[index])

    def stat_keys(self) -> np.ndarray:
        return self.reader.stat_keys(self.rows, self.relpaths)

    def groups(self, positions: np.ndarray) -> np.ndarray | None:
        """The container of each item at ``positions`` (see :meth:`Reader.groups`)."""
        return self.reader.groups(self.rows[np.asarray(positions, dtype=np.int64)])
