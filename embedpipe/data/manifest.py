"""Manifests: a CSV or Parquet table of ``path[,label][,split]``, or a Parquet table with an ``image`` column of bytes.

Paths relative to the manifest must stay inside its folder; absolute URLs (``http(s)://``,
``s3://``, ``file://``) are allowed anywhere, which is how a manifest points at images on a web
server or in a bucket. A manifest of local files only is plain files (their fast path); one with
URLs, or one that is itself behind a URL, reads its images through :class:`ManifestReader`.
"""

from __future__ import annotations

import csv
import io
import os
import posixpath
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataError
from .items import Reader, file_key, untrusted_key
from .records import SPLITS, Dataset, label_codes
from .remote import is_url, local_path, read_url
from .table import TableReader, open_parquet



class ManifestReader(Reader):
    """Rows of a manifest: each a path relative to ``base`` (a folder or a URL prefix) or an absolute URL."""

    kind = "manifest"

    def __init__(self, base: str, storage_options: dict[str, Any] | None = None) -> None:
        self.base, self.storage_options = base, dict(storage_options or {})

    def name(self, row: int, relpath: str) -> str:
        return relpath if is_url(relpath) else f"{self.base}/{relpath}"

    def read(self, row: int, relpath: str) -> bytes:
        name = self.name(row, relpath)
        if is_url(name):
            return read_url(name, self.storage_options)
        with open(name, "rb") as handle:
            return handle.read()

    def stat_keys(self, rows: np.ndarray, relpaths: Sequence[str]) -> np.ndarray:
        keys = np.empty((len(rows), 4), dtype=np.int64)
        for i, (row, relpath) in enumerate(zip(rows.tolist(), relpaths)):
            name = self.name(row, relpath)
            path = local_path(name) if is_url(name) else name
            if path is None:  # nothing to stat behind a URL: fetched and hashed every run
                keys[i] = untrusted_key()
                continue
            try:
                keys[i] = file_key(path)
            except OSError as error:
                raise DataError(f"cannot read {name} ({error.strerror}): check it exists and is readable") from None
        return keys


def load_csv(manifest: str | Path, *, storage_options: dict[str, Any] | None = None) -> Dataset:
    """A CSV manifest (a local file, or a URL fetched whole)."""
    try:
        if isinstance(manifest, Path):
            with manifest.open(newline="", encoding="utf-8-sig") as handle:
                columns, rows = _csv_rows(handle, manifest)
        else:
            text = _fetch(manifest, storage_options).decode("utf-8-sig")
            columns, rows = _csv_rows(io.StringIO(text, newline=""), manifest)
    except (UnicodeDecodeError, csv.Error) as error:
        raise DataError(f"{manifest} is not a readable CSV file ({error}): save it as UTF-8 CSV with a header row") from None
    if "path" not in columns:
        raise DataError(
            f"{manifest} has no 'path' column (columns: {', '.join(columns) or 'none'}): "
            "the header must be path,label[,split]"
        )
    places = [f"line {line}" for line in range(2, len(rows) + 2)]
    where = [f"{manifest}:{line}" for line in range(2, len(rows) + 2)]
    labels = [row.get("label") for row in rows] if "label" in columns else None
    splits = [row.get("split", "") for row in rows] if "split" in columns else None
    return _from_paths(manifest, [row.get("path", "") for row in rows], labels, splits, (places, where), storage_options)


def _csv_rows(handle: Iterable[str], manifest: str | Path) -> tuple[list[str], list[dict[str, str]]]:
    reader = csv.DictReader(handle)
    columns = [c.strip().lower() for c in (reader.fieldnames or [])]
    rows = []
    for row in reader:
        if None in row:  # DictReader files surplus fields under the key None, as a list
            raise DataError(
                f"{manifest}:{reader.line_num}: more fields than the header names: "
                "quote paths or labels that contain commas"
            )
        rows.append({(k or "").strip().lower(): (v or "").strip() for k, v in row.items()})
    return columns, rows


def _fetch(url: str, storage_options: dict[str, Any] | None) -> bytes:
    try:
        return read_url(url, storage_options)
    except OSError as error:
        raise DataError(f"cannot read manifest {error}: check the URL, the endpoint and the credentials") from None


def load_parquet(manifest: str | Path, *, storage_options: dict[str, Any] | None = None) -> Dataset:
    """A Parquet manifest: ``path[,label][,split]`` like a CSV one, or an ``image`` column holding the images' bytes."""
    parquet = open_parquet(str(manifest), storage_options)
    names = {name.lower(): name for name in parquet.schema_arrow.names}
    if "image" not in names and "path" not in names:
        raise DataError(f"{manifest} has no 'path' or 'image' column (columns: {', '.join(names) or 'none'}): "
                        "give it path[,label][,split], or image[,label][,split] with the images' bytes")
    wanted = [names[c] for c in ("path", "label", "split") if c in names and not (c == "path" and "image" in names)]
    table = parquet.read(columns=wanted)
    column = {c: table.column(names[c]).to_pylist() for c in ("path", "label", "split") if names.get(c) in wanted}
    n = parquet.metadata.num_rows
    labels, splits = column.get("label"), column.get("split")
    if splits is not None:
        splits = ["" if s is None else str(s).strip() for s in splits]
    if labels is not None:
        labels = [v.strip() if isinstance(v, str) else v for v in labels]
    if "image" not in names:
        places = [f"row {i}" for i in range(n)]
        return _from_paths(manifest, ["" if p is None else str(p).strip() for p in column["path"]], labels, splits,
                           (places, [f"{manifest} {place}" for place in places]), storage_options)
    width = len(str(max(n - 1, 0)))
    relpaths = tuple(f"row:{i:0{width}d}" for i in range(n))  # zero-padded: sorted is the table's order
    reader = TableReader((str(manifest),), np.array([0, n], dtype=np.int64), names["image"], storage_options=storage_options)
    return _dataset(manifest, relpaths, labels, splits, [f"{manifest} row {i}" for i in range(n)], reader)


def _from_paths(manifest: str | Path, raw_paths: list[str], labels: list[Any] | None, splits: list[str] | None,
                located: tuple[list[str], list[str]], storage_options: dict[str, Any] | None) -> Dataset:
    """Rows of paths (relative to the manifest, or URLs), checked, sorted by path, as a dataset.

    Args:
        located: each row's place (``line 2``, ``row 0``) and its place in messages (``manifest.csv:2``).
    """
    places, where = located
    remote = not isinstance(manifest, Path)
    base = str(manifest).rsplit("/", 1)[0] if remote else str(manifest.parent)
    relpaths: list[str] = []
    missing: list[str] = []
    urls = remote
    for i, raw in enumerate(raw_paths):
        if not raw:
            raise DataError(f"{where[i]}: empty path: fill it in or delete the row")
        if is_url(raw):
            urls = True
            path = local_path(raw)
            if path is not None and not os.path.isfile(path):
                missing.append(f"{raw} ({places[i]})")
            relpaths.append(raw)
            continue
        relpath = _confined(raw, base, where[i], remote)
        if not remote and not os.path.isfile(os.path.join(base, relpath)):
            missing.append(f"{raw} ({places[i]})")
        relpaths.append(relpath)
    if missing:
        raise DataError(
            f"{manifest}: {len(missing)} listed file(s) do not exist, e.g. {missing[0]}: fix the paths (relative to the manifest) or remove those rows"
        )
    seen: dict[str, int] = {}
    for relpath in relpaths:
        seen[relpath] = seen.get(relpath, 0) + 1
    duplicates = [p for p, n in seen.items() if n > 1]
    if duplicates:
        raise DataError(f"{manifest}: {duplicates[0]} is listed {seen[duplicates[0]]} times: list each image once")
    reader = ManifestReader(base, storage_options) if urls else None
    return _dataset(manifest, relpaths, labels, splits, where, reader)


def _confined(raw: str, base: str, where: str, remote: bool) -> str:
    """A relative path as stored (forward slashes, normalised), refused when it leaves the manifest's folder."""
    if remote:
        relpath = posixpath.normpath(raw.replace("\\", "/"))
        escapes = relpath == ".." or relpath.startswith(("../", "/"))
    else:
        # Confined by its text, as a remote path is: ``..`` and absolute paths are refused, symlinks inside
        # the folder are followed (they are the folder owner's, not the manifest author's), as in folder trees.
        relpath = Path(os.path.relpath(os.path.normpath(os.path.join(base, raw)), base)).as_posix()
        escapes = relpath in ("..", ".") or relpath.startswith("../")
    if escapes:
        raise DataError(
            f"{where}: path {raw!r} escapes the manifest's folder {base}: "
            "keep images inside it and use paths relative to the manifest, or give a full URL"
        )
    return relpath


def _dataset(manifest: str | Path, relpaths: Sequence[str], labels: list[Any] | None, splits: list[str] | None,
             where: list[str], reader: Reader | None) -> Dataset:
    if labels is not None:
        for i, label in enumerate(labels):
            if label is None or label == "":
                raise DataError(f"{where[i]}: empty label: fill it in, or drop the label column for unlabelled data")
    codes = {name: i for i, name in enumerate(SPLITS)}
    split_codes = np.full(len(relpaths), -1, dtype=np.int8)
    if splits is not None:
        for i, split in enumerate(splits):
            if split.lower() not in codes:
                raise DataError(f"{where[i]}: split {split!r} is not one of {', '.join(SPLITS)}")
            split_codes[i] = codes[split.lower()]
    label_array, class_names = label_codes(labels if labels is not None else [None] * len(relpaths), str(manifest))
    names = list(relpaths)
    if any(a > b for a, b in zip(names, names[1:])):
        order = np.array(sorted(range(len(names)), key=names.__getitem__), dtype=np.int64)
        names = [names[i] for i in order.tolist()]
        label_array, split_codes = label_array[order], split_codes[order]
        if isinstance(reader, TableReader):
            reader = reader.reordered(order)
    return Dataset(root=manifest, layout="manifest", relpaths=tuple(names), labels=label_array, split_codes=split_codes,
                   class_names=class_names, split_source="given" if splits is not None else "none", reader=reader)
