"""Images stored in the rows of Arrow or Parquet files: a Hugging Face dataset's column, a Parquet ``image`` column.

An image cell is the bytes themselves or, as the ``datasets`` Image feature stores it, a struct
``{bytes, path}`` (the path read when the bytes are empty). A row's stat key is its data file's:
while that file is unchanged, so is every row in it. Arrow files are memory-mapped; a Parquet file
is read one row group at a time per thread, kept while consecutive rows fall in it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import DataError
from .items import Reader, file_key
from .remote import filesystem, is_url, local_path, stat_object

PARQUET_EXTRA = 'pip install -c constraints.txt "embedpipe[parquet]"'


def _pyarrow(name: str) -> Any:
    try:
        import pyarrow
        import pyarrow.parquet  # noqa: F401  (the submodule, loaded for callers)
    except ImportError:
        raise DataError(f"reading {name} needs pyarrow, which is not installed: {PARQUET_EXTRA}") from None
    return pyarrow


def _binary(name: str, storage_options: dict[str, Any] | None) -> Any:
    """A local path, or an open fsspec file, for a table file."""
    if not is_url(name):
        return name
    path = local_path(name)
    if path is not None:
        return path
    fs, inner = filesystem(name, storage_options)
    return fs.open(inner, "rb")


def open_parquet(name: str, storage_options: dict[str, Any] | None = None) -> Any:
    """A ``pyarrow.parquet.ParquetFile``.

    Raises:
        DataError: pyarrow is missing, or the file is missing or not Parquet; named in the message.
    """
    pa = _pyarrow(name)
    try:
        return pa.parquet.ParquetFile(_binary(name, storage_options))
    except FileNotFoundError:
        raise DataError(f"{name} does not exist: check the path or URL") from None
    except (OSError, pa.ArrowException) as error:
        raise DataError(f"{name} is not a readable Parquet file ({error}): write it with pyarrow or pandas") from None


def arrow_rows(name: str) -> int:
    """Rows in an Arrow IPC stream file (as ``datasets`` writes them), memory-mapped, nothing copied."""
    pa = _pyarrow(name)
    with pa.memory_map(name) as source:
        return pa.ipc.open_stream(source).read_all().num_rows


def image_bytes(value: Any, where: str, folder: str) -> bytes:
    """The image bytes of one cell: bytes, or a ``{bytes, path}`` struct (its path relative to ``folder`` when not absolute).

    Raises:
        OSError: the cell holds neither bytes nor a readable path.
    """
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
        if data is None and path:
            with open(path if os.path.isabs(path) else os.path.join(folder, path), "rb") as handle:
                return handle.read()
        value = data
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    raise OSError(f"{where}: the row holds no image bytes")


class TableReader(Reader):
    """Image cells of one column over a sequence of table files, rows numbered across the files in order."""

    kind = "table"

    def __init__(self, files: Sequence[str], starts: np.ndarray, column: str, *, arrow: bool = False,
                 table_rows: np.ndarray | None = None, prefix: str | None = None,
                 storage_options: dict[str, Any] | None = None) -> None:
        """
        Args:
            files: the data files (paths or URLs), in row order.
            starts: int64 (len(files) + 1,): the first row of each file, then the total.
            column: the image column.
            arrow: Arrow IPC stream files (``datasets``); else Parquet.
            table_rows: int64 (N,): each dataset row's row across the files; None when they are the same.
            prefix: what locators start with (``prefix::relpath``); the first file when None.
        """
        self.files, self.starts, self.column, self.arrow = tuple(files), starts, column, arrow
        self.table_rows, self.prefix = table_rows, prefix if prefix is not None else files[0]
        self.storage_options = dict(storage_options or {})

    def reordered(self, order: np.ndarray) -> TableReader:
        """The same cells, for a dataset whose row i is this reader's row ``order[i]``."""
        rows = order if self.table_rows is None else self.table_rows[order]
        return TableReader(self.files, self.starts, self.column, arrow=self.arrow, table_rows=rows, prefix=self.prefix,
                           storage_options=self.storage_options)

    def name(self, row: int, relpath: str) -> str:
        return f"{self.prefix}::{relpath}"

    def _locate(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(file index, row within the file) of dataset rows."""
        table_rows = rows if self.table_rows is None else self.table_rows[rows]
        files = np.searchsorted(self.starts, table_rows, side="right") - 1
        return files, table_rows - self.starts[files]

    def stat_keys(self, rows: np.ndarray, relpaths: Sequence[str]) -> np.ndarray:
        keys = np.empty((len(self.files), 4), dtype=np.int64)
        for i, name in enumerate(self.files):
            if is_url(name) and local_path(name) is None:
                keys[i] = stat_object(name, self.storage_options)
                continue
            try:
                keys[i] = file_key(local_path(name) or name)
            except OSError as error:
                raise DataError(f"cannot read {name} ({error.strerror}): check it exists and is readable") from None
        return keys[self._locate(np.asarray(rows, dtype=np.int64))[0]]

    def read(self, row: int, relpath: str) -> bytes:
        files, within = self._locate(np.array([row], dtype=np.int64))
        f, r = int(files[0]), int(within[0])
        value = self._arrow_cell(f, r) if self.arrow else self._parquet_cell(f, r)
        name = self.files[f]
        return image_bytes(value, self.name(row, relpath), os.path.dirname(local_path(name) or name))

    def _arrow_cell(self, f: int, r: int) -> Any:
        state = self._state
        tables = state.__dict__.setdefault("tables", {})
        if f not in tables:
            pa = _pyarrow(self.files[f])
            source = _binary(self.files[f], self.storage_options)
            stream = pa.memory_map(source) if isinstance(source, str) else source
            tables[f] = pa.ipc.open_stream(stream).read_all().column(self.column)
        return tables[f][r].as_py()

    def _parquet_cell(self, f: int, r: int) -> Any:
        state = self._state
        group = getattr(state, "group", None)  # (file, first row, last row + 1, column values)
        if group is None or group[0] != f or not group[1] <= r < group[2]:
            files = state.__dict__.setdefault("parquet", {})
            if f not in files:
                files[f] = open_parquet(self.files[f], self.storage_options)
            parquet = files[f]
            sizes = [parquet.metadata.row_group(g).num_rows for g in range(parquet.num_row_groups)]
            ends = np.cumsum(sizes)
            g = int(np.searchsorted(ends, r, side="right"))
            values = parquet.read_row_group(g, columns=[self.column]).column(0)
            group = state.group = (f, int(ends[g] - sizes[g]), int(ends[g]), values)
        return group[3][r - group[1]].as_py()
