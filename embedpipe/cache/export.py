"""Exported files: one dataset's rows in its order, with the metadata that describes them.

An export is rebuilt from the store at will and written like a shard (temporary file, fsync,
rename). Its metadata is an :class:`ExportMeta`, written here as HDF5 attributes (JSON where
structured) and read back by :func:`read_export`; a file of another ``format_version`` is refused.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from .._atomic import fsync_dir, temporary_name
from .._columns import narrow
from ..config import CACHE_FORMAT, EmbeddingConfig, canonical_json
from ..errors import CacheError
from ..machine import versions
from ..data import SPLITS
from ..data.strings import PackedStrings
from .hdf5 import ATTRIBUTES, STR_DTYPE, attributes_digest, checksum_problems, decode_attr, feed_values, read_checksums
from .layout import CHUNK_ROWS, DIGEST_DTYPE, FILE_KIND, RAW_DIGEST_DTYPE, as_raw_digests, dataset_name_for, hex_digests
from .store import Store, StoreIndex


@dataclass(frozen=True)
class ExportMeta:
    """What an exported file says about itself besides its rows (the README's attribute table).

    ``kind``, ``format_version``, the config's parts, ``dims`` (read from the store) and the
    library ``versions`` are added when the file is written, so no caller can get them wrong.
    """

    config: EmbeddingConfig
    dataset_fingerprint: str  # hash of every row, label, split and the config: the cache-hit test
    backbone_spec: dict[str, Any]  # how to rebuild this backbone (predict, fine-tune)
    class_names: tuple[str, ...]
    dataset: dict[str, Any]  # root, layout, split source and config, number of images
    split_seed: int  # -1 when the split came with the data

    def attrs(self, dims: dict[str, int]) -> dict[str, Any]:
        config = self.config
        return {
            "kind": FILE_KIND,
            "format_version": CACHE_FORMAT,
            "cache_key": config.key(),
            "dataset_fingerprint": self.dataset_fingerprint,
            "embedding_config": config.to_dict(),
            "backbone_spec": self.backbone_spec,
            "backbone": config.backbone,
            "weights": config.weights,
            "preprocess": config.preprocess.to_dict(),
            "outputs": list(config.outputs),
            "precision": config.precision,
            "dtype": config.dtype,
            "dims": dims,
            "class_names": list(self.class_names),
            "dataset": self.dataset,
            "split_seed": self.split_seed,
            "versions": versions(),
        }


@dataclass(frozen=True)
class SplitColumn:
    """Each row's split as its code into SPLITS (a byte a row, not a ``str`` reference: 8 MB at 1M rows)."""

    codes: np.ndarray  # int8 (N,), a dataset's split_codes; -1: no split (written as "")

    def texts(self, rows: np.ndarray) -> list[str]:
        names = (*SPLITS, "")  # code -1 -> the last entry
        return [names[code] for code in self.codes[rows].tolist()]


@dataclass
class ExportRequest:
    """What goes into one exported file: a dataset's rows in its order, plus its description."""

    paths: Sequence[str]  # relative paths, in dataset order (a dataset's PackedStrings)
    labels: np.ndarray  # int64, -1 when unlabelled
    split: SplitColumn | None
    digests: np.ndarray  # RAW_DIGEST_DTYPE (N,): each image's content digest (written as hex)
    meta: ExportMeta
    rejected: tuple[tuple[str, str], ...] = ()  # (path, reason) of files the dataset could not take in, ledgered last


def export_name(dataset_name: str, backbone: str, fingerprint: str) -> str:
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in dataset_name) or "dataset"
    return f"{safe}-{backbone}-{fingerprint[:12]}.h5"


def write_export(path: Path, store: Store, index: StoreIndex, request: ExportRequest) -> None:
    """Write the exported file atomically, streaming rows chunk by chunk.

    ``index`` is :meth:`Store.index` of ``request.digests``.

    Images whose decoding failed are left out of the arrays and listed under
    ``errors/``, so every row stays aligned with its path.
    """
    digests = as_raw_digests(request.digests)
    stored = index.stored()
    ok, failed = narrow(np.flatnonzero(stored), len(stored)), np.flatnonzero(~stored)
    dims = {output: store.width(index, output) for output in store.config.outputs}
    row_bytes = sum(dims.values()) * np.dtype(store.config.dtype).itemsize
    needed = len(ok) * (row_bytes + 200) + (1 << 20)
    free = shutil.disk_usage(path.parent).free
    if needed > free:
        raise CacheError(
            f"not enough disk space for {path.name} (needs about {needed >> 20} MiB, {free >> 20} MiB free): "
            "free some space and rerun; the computed embeddings are kept"
        )
    tmp = temporary_name(path)
    shard_files: dict[Path, h5py.File] = {}  # kept open across chunks: one open per shard, not per chunk
    try:
        with h5py.File(tmp, "w") as f:
            for key, value in request.meta.attrs(dims).items():
                f.attrs[key] = value if isinstance(value, (int, float, str)) else canonical_json(value)
            n = len(ok)
            sums = {name: hashlib.sha256() for name in (*(dataset_name_for(o) for o in store.config.outputs), *CHECKSUMMED)}
            for output in store.config.outputs:
                width = dims[output]
                out = f.create_dataset(
                    dataset_name_for(output),
                    shape=(n, width),
                    dtype=store.config.dtype,
                    chunks=(max(1, min(n, CHUNK_ROWS)), width) if n else None,
                    fletcher32=bool(n),
                )
                for start in range(0, n, CHUNK_ROWS):
                    # Hashed as written: the block is in the dataset's dtype, so these are the bytes the file
                    # stores (reading them back to hash cost a second pass over every row).
                    block = np.ascontiguousarray(store.read_rows(index, ok[start : start + CHUNK_ROWS], output, files=shard_files),
                                                 dtype=out.dtype)
                    out[start : start + len(block)] = block
                    sums[dataset_name_for(output)].update(block.data)
            _write_column(f, "labels", np.asarray(request.labels, dtype=np.int64), ok, sums["labels"])
            _write_column(f, "digests", digests, ok, sums["digests"])
            reasons = [index.errors.get(bytes(digests[i]), "not computed") for i in failed.tolist()] + [reason for _, reason in request.rejected]
            _write_column(f, "errors/reasons", reasons, np.arange(len(reasons)), sums["errors/reasons"])
            _write_column(f, "paths", request.paths, ok, sums["paths"])
            if request.split is not None:
                _write_column(f, "split", request.split, ok, sums["split"])
            else:
                del sums["split"]
            ledger = [*(request.paths[i] for i in failed.tolist()), *(path for path, _ in request.rejected)]
            _write_column(f, "errors/paths", ledger, np.arange(len(ledger)), sums["errors/paths"])
            del sums[ATTRIBUTES]  # hashed below, once every attribute is written
            f.attrs["checksums"] = canonical_json({**{name: digest.hexdigest() for name, digest in sums.items()},
                                                   ATTRIBUTES: attributes_digest(f)})
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as error:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise CacheError(
            f"could not write {path} ({error}): free disk space or pick another --cache-dir; the computed embeddings are kept"
        ) from None
    except BaseException:  # a shard that cannot be read back (ShardReadError), an interrupt: no half file left
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    finally:
        for handle in shard_files.values():
            handle.close()


# Every dataset of an export besides the outputs carries a sha256 in the ``checksums`` attribute, the
# outputs too (their chunks also carry HDF5's Fletcher-32). A flipped byte in a label, a path or a
# digest is found when the file is opened, not only by ``cache verify``.
CHECKSUMMED = ("labels", "paths", "digests", "split", "errors/paths", "errors/reasons", ATTRIBUTES)


def _write_column(f: h5py.File, name: str, values: Any, rows: np.ndarray, digest: Any) -> None:
    """A dataset of ``values[rows]``, written in chunks so no full copy is held, and fed to ``digest`` as written.

    An array is numeric (its own dtype) or raw digests (written as hex); anything else is text
    (UTF-8): a :class:`PackedStrings`, a :class:`SplitColumn` or a list of ``str``. ``digest`` gets
    each block through :func:`.hdf5.feed_values`, as the readers' checksums will, so the checksum
    costs no second pass over the file.
    """
    raw = isinstance(values, np.ndarray) and values.dtype == RAW_DIGEST_DTYPE
    numeric = isinstance(values, np.ndarray) and not raw
    data = f.create_dataset(name, shape=(len(rows),), dtype=DIGEST_DTYPE if raw else values.dtype if numeric else STR_DTYPE)
    whole = numeric and len(rows) == len(values)  # every row kept: slices, not gathered copies
    for start in range(0, len(rows), CHUNK_ROWS):
        part = rows[start : start + CHUNK_ROWS]
        if raw:
            block = hex_digests(values[part])
        elif numeric:
            block = values[start : start + len(part)] if whole else values[part]
        elif isinstance(values, SplitColumn):
            block = values.texts(part)
        else:
            block = values.take(part).tolist() if isinstance(values, PackedStrings) else [values[i] for i in part.tolist()]
        data[start : start + len(part)] = block
        feed_values(digest, block, text=not numeric)  # hex digests are fixed-width text to HDF5


def column_problems(f: h5py.File, *, outputs: bool) -> list[str]:
    """Datasets whose bytes differ from the ``checksums`` the file was written with (the outputs when ``outputs``)."""
    return checksum_problems(f, only=None if outputs else CHECKSUMMED)


@dataclass
class Loaded:
    """An exported file read into memory."""

    arrays: dict[str, np.ndarray]  # "embeddings", "logits", "stageN": float32 (N, D)
    labels: np.ndarray  # int64 (N,), -1 when unlabelled
    paths: list[str]
    split: np.ndarray | None  # str (N,)
    digests: list[str]  # sha256 of each image file's bytes
    attrs: dict[str, Any]
    errors: list[tuple[str, str]]


# What h5py and numpy raise on damaged bytes: OSError mostly, RuntimeError for a damaged attribute table,
# KeyError/ValueError for damaged object headers, UnicodeDecodeError for text that is not UTF-8.
UNREADABLE = (OSError, RuntimeError, KeyError, ValueError, UnicodeDecodeError)


def first_line(error: BaseException) -> str:
    return (str(error).splitlines() or [type(error).__name__])[0]


CHECK_ROWS = 65536  # labels and split names checked this many rows at a time (bounded memory)
REBUILD = "delete it and rerun `embedpipe extract` to rebuild it from the cache"
_TEXT_KINDS = "OSU"  # numpy kinds h5py gives string datasets: vlen object, fixed bytes, fixed unicode


class _Bad(Exception):
    """One schema problem of an opened export, without the path (callers add it)."""


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_attrs(attrs: dict[str, Any]) -> None:
    """The attributes the readers use, with their types (the README's attribute table)."""
    if attrs.get("kind") != FILE_KIND:
        raise _Bad("is not an embedpipe embeddings file: pass a file printed by `embedpipe extract`")
    version = attrs.get("format_version")
    if not _int(version):
        raise _Bad(f"has format_version {version!r} of type {type(version).__name__}, not an integer: {REBUILD}")
    if version != CACHE_FORMAT:
        raise _Bad(f"has cache format {version}, this embedpipe reads {CACHE_FORMAT}: rerun `embedpipe extract` to rebuild it")
    outputs = attrs.get("outputs")
    if not isinstance(outputs, list) or not outputs or not all(isinstance(o, str) and o for o in outputs):
        raise _Bad(f"has outputs {outputs!r}, not a list of output names: {REBUILD}")
    dims = attrs.get("dims")
    if not isinstance(dims, dict) or set(dims) != set(outputs) or not all(_int(v) and v >= 0 for v in dims.values()):
        raise _Bad(f"has dims {dims!r}, not a width (a whole number) for each of its outputs {outputs}: {REBUILD}")
    classes = attrs.get("class_names")
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        raise _Bad(f"has class_names {classes!r}, not a list of names: {REBUILD}")
    if len(set(classes)) != len(classes):
        raise _Bad(f"has repeated class_names {classes}: {REBUILD}")
    for name, kind in (("cache_key", str), ("dataset_fingerprint", str), ("embedding_config", dict), ("dataset", dict)):
        if not isinstance(attrs.get(name), kind):
            raise _Bad(f"has no {name} {kind.__name__} attribute (it has {attrs.get(name)!r}): {REBUILD}")


def _dataset(f: h5py.File, name: str, *, kinds: str, ndim: int, rows: int | None) -> h5py.Dataset:
    """``f[name]``, checked to be a dataset of ``ndim`` dimensions, a numpy kind in ``kinds`` and ``rows`` rows."""
    data = f.get(name)
    if not isinstance(data, h5py.Dataset):
        raise _Bad(f"has no {name!r} dataset (it has {', '.join(f.keys()) or 'none'}): {REBUILD}")
    if len(data.shape) != ndim:
        raise _Bad(f"has a {name!r} dataset of shape {data.shape}, not {ndim}-D: {REBUILD}")
    text = kinds == "OU"
    if (text and h5py.check_string_dtype(data.dtype) is None) or data.dtype.kind not in kinds or (
        kinds == "S" and data.dtype.itemsize != 64
    ):
        raise _Bad(f"has a {name!r} dataset of dtype {data.dtype}, not the one embedpipe writes: {REBUILD}")
    if rows is not None and data.shape[0] != rows:
        raise _Bad(f"has {data.shape[0]} rows of {name!r} but {rows} paths: {REBUILD}")
    return data


def _check_file(f: h5py.File, path: Path) -> dict[str, Any]:
    """Schema of an opened export: its attributes, and every dataset's shape and dtype, all before any row is read.

    Every dataset is bounded by the file's own size (embedpipe writes no compression), so a
    file that declares more rows than it holds is refused before anything is allocated.

    Returns:
        The decoded attributes.
    """
    attrs = {k: decode_attr(v) for k, v in f.attrs.items()}
    _check_attrs(attrs)
    n = _dataset(f, "paths", kinds="OU", ndim=1, rows=None).shape[0]
    _dataset(f, "labels", kinds="iu", ndim=1, rows=n)
    _dataset(f, "digests", kinds="S", ndim=1, rows=n)
    if "split" in f:
        _dataset(f, "split", kinds="OU", ndim=1, rows=n)
    for output in attrs["outputs"]:
        data = _dataset(f, dataset_name_for(output), kinds="f", ndim=2, rows=n)
        if data.shape[1] != attrs["dims"][output]:
            raise _Bad(f"has {data.shape[1]} columns of {dataset_name_for(output)!r} but dims says {attrs['dims'][output]}: {REBUILD}")
    errors = _dataset(f, "errors/paths", kinds="OU", ndim=1, rows=None).shape[0]
    _dataset(f, "errors/reasons", kinds="OU", ndim=1, rows=errors)
    size = path.stat().st_size
    for name, data in _datasets(f):
        if data.size * data.dtype.itemsize > size:
            raise _Bad(f"declares {data.size} values of {name!r}, more than its {size} bytes hold: {REBUILD}")
    return attrs


def _datasets(group: h5py.Group, prefix: str = "") -> list[tuple[str, h5py.Dataset]]:
    found = []
    for name, item in group.items():
        if isinstance(item, h5py.Dataset):
            found.append((prefix + name, item))
        elif isinstance(item, h5py.Group):
            found += _datasets(item, prefix + name + "/")
    return found


def _check_values(labels: np.ndarray, split: np.ndarray | None, classes: list[str]) -> None:
    """Labels are -1 (unlabelled) or a class index; split names are train, val or test."""
    if len(labels) and (labels.min() < -1 or labels.max() >= len(classes)):
        raise _Bad(f"has labels from {labels.min()} to {labels.max()}, outside -1..{len(classes) - 1} "
                   f"({len(classes)} class_names): {REBUILD}")
    if split is not None and len(split):
        unknown = sorted(set(np.unique(split).tolist()) - set(SPLITS))
        if unknown:
            raise _Bad(f"has split names {unknown[:3]} besides {', '.join(SPLITS)}: {REBUILD}")


def check_export(f: h5py.File, path: str | Path) -> dict[str, Any]:
    """Validate an opened export: attributes and their types, every dataset's shape and dtype, labels and splits.

    The one schema check of the read side: :func:`read_export`, :func:`verify_export` and
    ``cache ls`` call it. Reads only metadata and the small columns (labels, split).

    Returns:
        The decoded attributes.

    Raises:
        CacheError: one line naming the file, what is wrong with it and what to do.
    """
    path = Path(path)
    try:
        attrs = _check_file(f, path)
        for start in range(0, f["labels"].shape[0], CHECK_ROWS):  # a block at a time: a million split names are 60 MB as str
            split = f["split"].asstr()[start : start + CHECK_ROWS] if "split" in f else None
            _check_values(f["labels"][start : start + CHECK_ROWS], split, attrs["class_names"])
    except _Bad as problem:
        raise CacheError(f"{path} {problem}") from None
    return attrs


def read_export(path: str | Path, *, outputs: Iterable[str] | None = None, dtype: Any = np.float32) -> Loaded:
    """Read an exported file, validated first (:func:`check_export`) and its rows checked finite.

    Raises:
        CacheError: not an export, another format version, a schema the readers cannot trust,
            non-finite embeddings, or unreadable bytes.
    """
    path = Path(path)
    if path.is_dir():
        raise CacheError(f"{path} is a folder, not an exported file: pass one of the .h5 files in it (see `embedpipe cache ls --cache-dir {path}`)")
    if not path.is_file():
        raise CacheError(f"{path} does not exist: pass a file printed by `embedpipe extract` (see `embedpipe cache ls`)")
    try:
        with h5py.File(path, "r") as f:
            attrs = check_export(f, path)
            names = [dataset_name_for(o) for o in attrs["outputs"]] if outputs is None else list(outputs)
            stored = [dataset_name_for(o) for o in attrs["outputs"]]
            missing = [n for n in names if n not in stored]
            if missing:
                raise CacheError(f"{path} has no {missing[0]!r} output (it has {', '.join(stored)}): pick one of those")
            expected = read_checksums(f) or {}  # none at all is reported by column_problems below
            arrays = {}
            for name in names:
                stored_rows = f[name][:]
                array = arrays[name] = stored_rows.astype(dtype)
                if not np.isfinite(array).all():
                    row = int(np.flatnonzero(~np.isfinite(array).all(axis=1))[0])
                    raise CacheError(f"{path} has non-finite {name} (first at row {row}): {REBUILD}")
                # Read whole anyway, so its sha256 costs little: rows swapped or edited through h5py
                # (which keeps HDF5's own Fletcher-32 valid) are refused here too, not only by `cache verify`.
                if name in expected and hashlib.sha256(np.ascontiguousarray(stored_rows).data).hexdigest() != expected[name]:
                    raise CacheError(f"{path}: {name} does not match its checksum: {REBUILD}")
            damaged = column_problems(f, outputs=False)
            if damaged:
                raise CacheError(f"{path}: {damaged[0]}: {REBUILD}")
            split = f["split"].asstr()[:] if "split" in f else None
            return Loaded(
                arrays=arrays,
                labels=f["labels"][:].astype(np.int64),
                paths=list(f["paths"].asstr()[:]),
                split=np.asarray(split) if split is not None else None,
                digests=[d.decode("ascii", "replace") for d in f["digests"][:].tolist()],
                attrs=attrs,
                errors=list(zip(f["errors/paths"].asstr()[:], f["errors/reasons"].asstr()[:])),
            )
    except UNREADABLE as error:
        raise CacheError(f"{path} is not a readable HDF5 file ({first_line(error)}): {REBUILD}") from None


def read_ledger(path: str | Path) -> list[tuple[str, str]]:
    """An exported file's error ledger, (relative path, reason) per image that could not be decoded, read alone."""
    try:
        with h5py.File(path, "r") as f:
            return list(zip(f["errors/paths"].asstr()[:], f["errors/reasons"].asstr()[:]))
    except (*UNREADABLE, KeyError) as error:
        raise CacheError(f"{path} is not a readable HDF5 file ({first_line(error)}): {REBUILD}") from None


def verify_export(path: str | Path) -> list[str]:
    """Problems found in an exported file, reading every byte (checksums included); empty when sound."""
    path = Path(path)
    try:
        with h5py.File(path, "r") as f:
            try:
                attrs = check_export(f, path)
            except CacheError as error:
                return [str(error).removeprefix(f"{path} ")]
            problems: list[str] = []
            for output in attrs["outputs"]:
                data = f[dataset_name_for(output)]
                for start in range(0, data.shape[0], CHUNK_ROWS):
                    block = data[start : start + CHUNK_ROWS]  # fletcher32 checks every chunk read
                    if not np.isfinite(block).all():
                        problems.append(f"{dataset_name_for(output)} has non-finite values near row {start}")
                        break
            return problems + column_problems(f, outputs=True)
    except UNREADABLE as error:
        return [f"unreadable: {first_line(error)}"]
