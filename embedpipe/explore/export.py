"""Hand an exported file's embeddings to other tools: Parquet, NumPy, a FAISS index, a Lance table.

Every format holds the same rows in the file's order, and the file's metadata travels with them:

============  =====================================================================================
format        what is written
============  =====================================================================================
``parquet``   one file: ``row, path, label, class, split, digest`` and ``embedding`` as a
              fixed-size list of float32 (pyarrow reads ``fixed_size_list<float>[D]`` back; pandas a
              column of arrays; DuckDB ``FLOAT[]``); the metadata as JSON under the schema metadata
              key ``embedpipe``
``npy``       ``OUT.npy``: float32 (N, D); ``OUT.json``: the metadata and the rows (path, label, ...)
``faiss``     ``OUT.faiss``: an exact inner-product index of the L2-normalised rows (cosine), whose
              ids are the row numbers (``IndexIDMap2`` over ``IndexFlatIP``); ``OUT.json`` as for npy
``lance``     a Lance dataset folder with the Parquet columns and the same schema metadata
============  =====================================================================================

The metadata is ``{"format": "embedpipe-export", "format_version": 1, "source": ..., "output": ...,
"attrs": <the file's attributes>}``; a reader that finds another ``format_version`` should refuse
the file. Float16 storage is widened to float32 exactly, so every format holds the values
:func:`embedpipe.load` returns, bit for bit. Each file (or folder) is written under a temporary name
and renamed into place, so a crash leaves no half-written export.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .._atomic import fsync_dir, json_bytes, jsonable, temporary_name, write_atomically
from ..errors import ExploreError
from ..extraction import load
from ._extras import require
from .knn import normalize

FORMATS = ("parquet", "npy", "faiss", "lance")
EXPORT_FORMAT = "embedpipe-export"
EXPORT_FORMAT_VERSION = 1  # bump when a column or the metadata changes meaning
METADATA_KEY = "embedpipe"  # the Parquet/Lance schema metadata key holding the JSON metadata
COLUMNS = ("row", "path", "label", "class", "split", "digest")  # then "embedding"


@dataclass
class Exported:
    """What :func:`export` wrote."""

    format: str
    paths: list[Path]  # the files (or the Lance folder) written
    rows: int
    dims: int


def export(embeddings: str | Path, to: str, out: str | Path, *, output: str = "embeddings") -> Exported:
    """Write an exported file's rows, embeddings and metadata in another format.

    Args:
        embeddings: a file written by :func:`embedpipe.extract`.
        to: ``parquet``, ``npy``, ``faiss`` or ``lance`` (see the module docstring).
        out: the file to write (``.parquet``, ``.npy``, ``.faiss``) or the Lance folder; a sidecar
            ``.json`` goes beside ``npy`` and ``faiss`` outputs.
        output: which stored output (``embeddings``, ``logits``, ``stageN``).

    Raises:
        ExploreError: an unknown format, or the extra it needs is not installed.
    """
    if to not in FORMATS:
        raise ExploreError(f"unknown export format {to!r}: use one of {', '.join(FORMATS)}")
    X, y, meta = load(embeddings, output=output)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = _rows(y, meta)
    metadata = {"format": EXPORT_FORMAT, "format_version": EXPORT_FORMAT_VERSION, "source": str(Path(embeddings).resolve()),
                "output": output, "attrs": {k: v for k, v in meta.items() if k not in ("paths", "split", "digests", "errors")}}
    try:
        if to == "parquet":
            paths = [_write_parquet(out, X, rows, metadata)]
        elif to == "lance":
            paths = [_write_lance(out, X, rows, metadata)]
        elif to == "npy":
            paths = [_write_npy(out.with_suffix(".npy"), X), _write_sidecar(out.with_suffix(".json"), rows, metadata)]
        else:
            paths = [_write_faiss(out.with_suffix(".faiss"), X), _write_sidecar(out.with_suffix(".json"), rows, metadata)]
    except OSError as error:
        raise ExploreError(f"cannot write {out} ({error.strerror or error}): free some space or pick another OUT") from None
    return Exported(format=to, paths=paths, rows=len(X), dims=X.shape[1])


def _rows(y: np.ndarray, meta: dict[str, Any]) -> dict[str, list[Any]]:
    classes = meta["class_names"]
    split = meta["split"]
    return {
        "row": list(range(len(y))),
        "path": list(meta["paths"]),
        "label": y.tolist(),
        "class": [classes[v] if v >= 0 and classes else "" for v in y.tolist()],
        "split": list(split) if split is not None else [""] * len(y),
        "digest": list(meta["digests"]),
    }


def _metadata_json(metadata: dict[str, Any]) -> str:
    return json.dumps(metadata, sort_keys=True, default=jsonable)


def arrow_table(X: np.ndarray, rows: dict[str, list[Any]], metadata: dict[str, Any]) -> Any:
    """The rows as a pyarrow Table: the :data:`COLUMNS`, then ``embedding`` as ``fixed_size_list<float32>[D]``."""
    pa = require("pyarrow")
    X = np.ascontiguousarray(X, dtype=np.float32)
    embedding = pa.FixedSizeListArray.from_arrays(pa.array(X.reshape(-1), type=pa.float32()), X.shape[1])
    types = {"row": pa.int64(), "path": pa.string(), "label": pa.int64(), "class": pa.string(), "split": pa.string(),
             "digest": pa.string()}
    columns = [pa.array(rows[c], type=types[c]) for c in COLUMNS] + [embedding]
    schema = pa.schema([pa.field(c, types[c]) for c in COLUMNS] + [pa.field("embedding", embedding.type)],
                       metadata={METADATA_KEY: _metadata_json(metadata)})
    return pa.Table.from_arrays(columns, schema=schema)


def _write_parquet(out: Path, X: np.ndarray, rows: dict[str, list[Any]], metadata: dict[str, Any]) -> Path:
    table = arrow_table(X, rows, metadata)
    pq = require("pyarrow.parquet")
    tmp = temporary_name(out)
    try:
        pq.write_table(table, tmp)
        _fsync(tmp)
        os.replace(tmp, out)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()
    fsync_dir(out.parent)
    return out


def _write_lance(out: Path, X: np.ndarray, rows: dict[str, list[Any]], metadata: dict[str, Any]) -> Path:
    lance = require("lance")
    table = arrow_table(X, rows, metadata)
    tmp = temporary_name(out)
    try:
        lance.write_dataset(table, str(tmp))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    fsync_dir(out.parent)
    return out


def _write_npy(out: Path, X: np.ndarray) -> Path:
    import io

    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(X, dtype=np.float32))
    write_atomically(out, buffer.getvalue())
    return out


def _write_sidecar(out: Path, rows: dict[str, list[Any]], metadata: dict[str, Any]) -> Path:
    write_atomically(out, json_bytes({**metadata, "rows": rows}))
    return out


def _write_faiss(out: Path, X: np.ndarray) -> Path:
    faiss = require("faiss")
    index = faiss.IndexIDMap2(faiss.IndexFlatIP(X.shape[1]))
    index.add_with_ids(normalize(X), np.arange(len(X), dtype=np.int64))
    write_atomically(out, faiss.serialize_index(index).tobytes())
    return out


def _fsync(path: Path) -> None:
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The metadata of an export written by :func:`export` (a ``.parquet`` file, a Lance folder, or a sidecar ``.json``).

    Raises:
        ExploreError: not an embedpipe export, or of another format version.
    """
    path = Path(path)
    if path.suffix == ".parquet":
        data = json.loads(require("pyarrow.parquet").read_schema(path).metadata[METADATA_KEY.encode()])
    elif path.is_dir():
        data = json.loads(require("lance").dataset(str(path)).schema.metadata[METADATA_KEY.encode()])
    else:
        data = json.loads(path.with_suffix(".json").read_text())
    if data.get("format") != EXPORT_FORMAT or data.get("format_version") != EXPORT_FORMAT_VERSION:
        raise ExploreError(f"{path} is not an embedpipe export of format version {EXPORT_FORMAT_VERSION}: export it again")
    return data
