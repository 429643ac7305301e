"""The embedding cache: content-addressed, crash-safe, self-describing. The only h5py importer.

Layout of a cache folder::

    files.sqlite                  path -> (size, mtime, inode) -> sha256 of the file's bytes
    store/<key>/config.json       the EmbeddingConfig whose hash is <key>
    store/<key>/shards/*.h5       committed rows: image digest -> outputs, or a decode error
    store/<key>/.lock             one writer per store at a time (flock)
    <dataset>-<backbone>-<id>.h5  exported files: one dataset, in its order, for users

Crash safety does not rely on HDF5 surviving an unclean close (it does not:
a SIGKILLed h5py writer left an unreadable file in 43 of 43 trials). A shard
is built in memory, written with plain file I/O to a temporary name, fsync'd
and renamed into place, so a shard either exists whole or not at all, and a
full disk fails the write cleanly. Exports are rebuilt from shards at will and
are written the same way (temporary file, fsync, rename).

Images are keyed by the hash of their bytes, so renaming or moving files
computes nothing and datasets that share images share rows. Hashes are
remembered per (path, size, mtime, inode), as git's index does, so unchanged
files are only stat'ed.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import logging
import os
import shutil
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from ._atomic import fsync_dir as _fsync_dir
from ._atomic import write_atomically
from .config import CACHE_FORMAT, OUTPUT_EMBEDDING, EmbeddingConfig, canonical_json, sha256_file
from .errors import CacheError

logger = logging.getLogger(__name__)

FILE_KIND = "embedpipe-embeddings"
SHARD_KIND = "embedpipe-shard"
DIGEST_DTYPE = "S64"  # hex sha256
CHUNK_ROWS = 4096  # chunks of >= 1024 rows read 3x faster than 256-row ones
COMPACT_SHARDS = 64  # merge small shards once this many accumulate...
COMPACT_ROWS = 65536  # ...into shards of at most this many rows (bounded memory)
_STR = h5py.string_dtype()

Progress = Callable[[int], None]
_HASH_SLICE = 2048  # files stat'ed, hashed and saved to the index at a time (bounded memory)


def dataset_name_for(output: str) -> str:
    """HDF5 dataset name of an output: the pooled embedding is stored as ``embeddings``."""
    return "embeddings" if output == OUTPUT_EMBEDDING else output


# --------------------------------------------------------------------------- files


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a crash leaves the old file or the new one, never half."""
    try:
        write_atomically(path, data)
    except OSError as error:
        raise CacheError(
            f"could not write {path} ({error.strerror or error}): free disk space or pick another --cache-dir; "
            "finished work is kept and the next run resumes"
        ) from None


class FileIndex:
    """Remembers each file's content hash under its (size, mtime_ns, inode), in SQLite."""

    def __init__(self, cache_dir: Path) -> None:
        self.path = cache_dir / "files.sqlite"

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


# --------------------------------------------------------------------------- store


@dataclass
class StoreIndex:
    """Where each digest's rows are: ``rows[digest] = (shard, row)``; ``errors[digest] = reason``."""

    rows: dict[bytes, tuple[Path, int]]
    errors: dict[bytes, str]
    shards: list[Path]

    def __contains__(self, digest: bytes) -> bool:
        return digest in self.rows or digest in self.errors


class Store:
    """All rows ever computed under one :class:`EmbeddingConfig`, as committed shards."""

    def __init__(self, cache_dir: str | Path, config: EmbeddingConfig) -> None:
        self.config = config
        self.key = config.key()
        self.root = Path(cache_dir) / "store" / self.key[:24]
        self.shard_dir = self.root / "shards"
        self._config_file = self.root / "config.json"
        self.written: set[Path] = set()  # shards this process committed (compaction under torchrun)

    def create(self) -> None:
        try:
            self.shard_dir.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise CacheError(f"cannot create {self.shard_dir} ({error.strerror}): pick a writable --cache-dir") from None
        expected = {"format": CACHE_FORMAT, "key": self.key, "config": self.config.to_dict()}
        if self._config_file.exists():
            try:
                found = json.loads(self._config_file.read_text())
            except (OSError, ValueError):
                found = None
            if found != json.loads(canonical_json(expected)):
                raise CacheError(
                    f"{self.root} holds another configuration or format (found {str(found)[:80]}): "
                    f"delete that folder (embedpipe cache rm {self.key[:12]}) and rerun"
                )
        else:
            _atomic_write_bytes(self._config_file, canonical_json(expected).encode())

    @contextlib.contextmanager
    def lock(self, *, wait: bool = True) -> Iterator[None]:
        """Hold the store's writer lock; a second writer waits (or fails when ``wait`` is False)."""
        self.create()
        handle = open(self.root / ".lock", "a+")
        try:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if not wait:
                    raise CacheError(
                        f"another embedpipe process is writing to {self.root}: wait for it to finish, or use another --cache-dir"
                    ) from None
                logger.warning("another embedpipe process is extracting into %s; waiting for it", self.root)
                fcntl.flock(handle, fcntl.LOCK_EX)
            # Holding the lock, any temporary file here belongs to a writer that died.
            for tmp in self.shard_dir.glob(".tmp-*"):
                tmp.unlink(missing_ok=True)
            yield
        finally:
            handle.close()

    def shards(self) -> list[Path]:
        if not self.shard_dir.is_dir():
            return []
        return sorted(p for p in self.shard_dir.glob("*.h5") if not p.name.startswith("."))

    def index(self) -> StoreIndex:
        """Read every committed shard's digests (not its data)."""
        rows: dict[bytes, tuple[Path, int]] = {}
        errors: dict[bytes, str] = {}
        shards = self.shards()
        for shard in shards:
            try:
                with h5py.File(shard, "r") as f:
                    for row, digest in enumerate(f["digests"][:].tolist()):
                        rows.setdefault(digest, (shard, row))
                    if "errors" in f:
                        for digest, reason in zip(f["errors/digests"][:].tolist(), f["errors/reasons"].asstr()[:]):
                            errors.setdefault(digest, reason)
            except (OSError, KeyError) as error:
                raise CacheError(
                    f"cache shard {shard} is unreadable ({error}): delete it; only its rows are recomputed"
                ) from None
        return StoreIndex(rows=rows, errors=errors, shards=shards)

    def write_shard(
        self,
        digests: Sequence[bytes],
        outputs: dict[str, np.ndarray],
        errors: Sequence[tuple[bytes, str]] = (),
    ) -> Path | None:
        """Commit rows atomically; returns the shard path (None when there was nothing to write)."""
        if not len(digests) and not errors:
            return None
        data = _shard_bytes(digests, outputs, errors, self.config)
        path = self.shard_dir / f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.h5"
        _atomic_write_bytes(path, data)
        self.written.add(path)
        return path

    def compact(self, *, force: bool = False, own: bool = False) -> None:
        """Merge small shards into larger ones; crash-safe (duplicates are harmless, losses impossible).

        Args:
            force: merge as soon as two small shards exist, not only once many have piled up.
            own: only shards this process wrote, so ranks writing into one store at once
                never merge (and delete) a shard another rank is still reading.
        """
        small = [p for p in self.shards() if (not own or p in self.written) and _shard_rows(p) < COMPACT_ROWS // 2]
        if len(small) < (2 if force else COMPACT_SHARDS):
            return
        groups: list[list[Path]] = [[]]
        total = 0
        for shard in small:
            rows = _shard_rows(shard)
            if groups[-1] and total + rows > COMPACT_ROWS:
                groups.append([])
                total = 0
            groups[-1].append(shard)
            total += rows
        for group in groups:
            if len(group) < 2:
                continue
            digests: list[bytes] = []
            parts: dict[str, list[np.ndarray]] = {}
            errors: list[tuple[bytes, str]] = []
            for shard in group:
                with h5py.File(shard, "r") as f:
                    digests.extend(f["digests"][:].tolist())
                    for output in self.config.outputs:
                        parts.setdefault(output, []).append(f[dataset_name_for(output)][:])
                    if "errors" in f:
                        errors.extend(zip(f["errors/digests"][:].tolist(), f["errors/reasons"].asstr()[:]))
            merged = {name: np.concatenate(arrays) for name, arrays in parts.items()}
            self.write_shard(digests, merged, errors)
            for shard in group:  # only after the merged shard is durable
                shard.unlink(missing_ok=True)
                self.written.discard(shard)
        _fsync_dir(self.shard_dir)

    def width(self, index: StoreIndex, output: str) -> int:
        """Width D of an output, from the first shard that holds rows (0 when none does)."""
        for shard in index.shards:
            with h5py.File(shard, "r") as f:
                data = f[dataset_name_for(output)]
                if data.shape[0]:
                    return int(data.shape[1])
        return 0

    def read_rows(
        self, index: StoreIndex, digests: Sequence[bytes], output: str, *, files: dict[Path, h5py.File] | None = None
    ) -> np.ndarray:
        """Rows for ``digests`` (all present in ``index``), in that order, in the stored dtype.

        Args:
            files: open shard handles to reuse across calls (the caller closes them);
                without it each shard is opened and closed here.
        """
        by_shard: dict[Path, list[tuple[int, int]]] = {}
        for position, digest in enumerate(digests):
            shard, row = index.rows[digest]
            by_shard.setdefault(shard, []).append((row, position))
        result: np.ndarray | None = None
        for shard, pairs in by_shard.items():
            rows = np.array([r for r, _ in pairs])
            positions = np.array([p for _, p in pairs])
            with contextlib.ExitStack() as stack:
                if files is None:
                    f = stack.enter_context(h5py.File(shard, "r"))
                else:
                    f = files[shard] if shard in files else files.setdefault(shard, h5py.File(shard, "r"))
                stored = f[dataset_name_for(output)]
                if result is None:
                    result = np.empty((len(digests), stored.shape[1]), dtype=stored.dtype)
                wanted = np.unique(rows)  # h5py wants increasing, unique indices
                if wanted[-1] - wanted[0] < 4 * len(wanted):
                    block = stored[wanted[0] : wanted[-1] + 1]  # one contiguous read beats fancy indexing
                    result[positions] = block[rows - wanted[0]]
                else:
                    block = stored[wanted]
                    result[positions] = block[np.searchsorted(wanted, rows)]
        if result is None:
            raise CacheError("internal: no rows requested")
        return result


def _shard_bytes(
    digests: Sequence[bytes], outputs: dict[str, np.ndarray], errors: Sequence[tuple[bytes, str]], config: EmbeddingConfig
) -> bytes:
    buffer = io.BytesIO()
    with h5py.File(buffer, "w") as f:
        f.attrs["kind"] = SHARD_KIND
        f.attrs["format_version"] = CACHE_FORMAT
        f.attrs["cache_key"] = config.key()
        f.create_dataset("digests", data=np.array(digests, dtype=DIGEST_DTYPE))
        for output in config.outputs:
            array = outputs.get(output, np.empty((0, 0), dtype=np.float32)).astype(config.dtype)
            f.create_dataset(dataset_name_for(output), data=array, fletcher32=bool(array.size), chunks=bool(array.size) or None)
        if errors:
            f.create_dataset("errors/digests", data=np.array([d for d, _ in errors], dtype=DIGEST_DTYPE))
            f.create_dataset("errors/reasons", data=[r for _, r in errors], dtype=_STR)
    return buffer.getvalue()


def _shard_rows(path: Path) -> int:
    try:
        with h5py.File(path, "r") as f:
            return int(f["digests"].shape[0])
    except (OSError, KeyError):
        return COMPACT_ROWS  # unreadable: leave it for verify to report


# --------------------------------------------------------------------------- exported files


@dataclass
class ExportRequest:
    """What goes into one exported file: a dataset's rows in its order, plus its description."""

    paths: list[str]  # relative paths, in dataset order
    labels: np.ndarray  # int64, -1 when unlabelled
    split: list[str] | None
    digests: list[bytes]
    attrs: dict[str, Any]  # JSON-able metadata: class names, dataset, versions...


def export_name(dataset_name: str, backbone: str, fingerprint: str) -> str:
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in dataset_name) or "dataset"
    return f"{safe}-{backbone}-{fingerprint[:12]}.h5"


def read_attrs(path: Path) -> dict[str, Any] | None:
    """An exported file's attributes, decoded; None when it is missing or unreadable."""
    try:
        with h5py.File(path, "r") as f:
            return {k: _decode_attr(v) for k, v in f.attrs.items()}
    except (OSError, KeyError):
        return None


def _decode_attr(value: Any) -> Any:
    if isinstance(value, bytes):
        value = value.decode()
    if isinstance(value, str) and value[:1] in "[{":
        with contextlib.suppress(ValueError):
            return json.loads(value)
    if isinstance(value, np.generic):
        return value.item()
    return value


def write_export(path: Path, store: Store, index: StoreIndex, request: ExportRequest) -> None:
    """Write the exported file atomically, streaming rows chunk by chunk.

    Images whose decoding failed are left out of the arrays and listed under
    ``errors/``, so every row stays aligned with its path.
    """
    ok = [i for i, d in enumerate(request.digests) if d in index.rows]
    failed = [i for i, d in enumerate(request.digests) if d not in index.rows]
    row_bytes = sum(
        store.width(index, output) * np.dtype(store.config.dtype).itemsize for output in store.config.outputs
    )
    needed = len(ok) * (row_bytes + 200) + (1 << 20)
    free = shutil.disk_usage(path.parent).free
    if needed > free:
        raise CacheError(
            f"not enough disk space for {path.name} (needs about {needed >> 20} MiB, {free >> 20} MiB free): "
            "free some space and rerun; the computed embeddings are kept"
        )
    tmp = path.with_name(f".tmp-{uuid.uuid4().hex}-{path.name}")
    shard_files: dict[Path, h5py.File] = {}  # kept open across chunks: one open per shard, not per chunk
    try:
        with h5py.File(tmp, "w") as f:
            for key, value in request.attrs.items():
                f.attrs[key] = value if isinstance(value, (int, float, str)) else canonical_json(value)
            n = len(ok)
            for output in store.config.outputs:
                width = store.width(index, output)
                out = f.create_dataset(
                    dataset_name_for(output),
                    shape=(n, width),
                    dtype=store.config.dtype,
                    chunks=(max(1, min(n, CHUNK_ROWS)), width) if n else None,
                    fletcher32=bool(n),
                )
                for start in range(0, n, CHUNK_ROWS):
                    chunk = ok[start : start + CHUNK_ROWS]
                    digests = [request.digests[i] for i in chunk]
                    out[start : start + len(chunk)] = store.read_rows(index, digests, output, files=shard_files)
            f.create_dataset("labels", data=request.labels[ok].astype(np.int64))
            f.create_dataset("paths", data=[request.paths[i] for i in ok], dtype=_STR)
            f.create_dataset("digests", data=np.array([request.digests[i] for i in ok], dtype=DIGEST_DTYPE))
            if request.split is not None:
                f.create_dataset("split", data=[request.split[i] for i in ok], dtype=_STR)
            errors = f.create_group("errors")
            errors.create_dataset("paths", data=[request.paths[i] for i in failed], dtype=_STR)
            errors.create_dataset(
                "reasons", data=[index.errors.get(request.digests[i], "not computed") for i in failed], dtype=_STR
            )
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as error:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise CacheError(
            f"could not write {path} ({error}): free disk space or pick another --cache-dir; the computed embeddings are kept"
        ) from None
    finally:
        for handle in shard_files.values():
            handle.close()


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


def read_export(path: str | Path, *, outputs: Iterable[str] | None = None, dtype: Any = np.float32) -> Loaded:
    """Read an exported file; raises CacheError when it is not one or is of another format version."""
    path = Path(path)
    if not path.is_file():
        raise CacheError(f"{path} does not exist: pass a file printed by `embedpipe extract` (see `embedpipe cache ls`)")
    try:
        with h5py.File(path, "r") as f:
            attrs = {k: _decode_attr(v) for k, v in f.attrs.items()}
            _check_kind(path, attrs)
            names = [dataset_name_for(o) for o in attrs["outputs"]] if outputs is None else list(outputs)
            missing = [n for n in names if n not in f]
            if missing:
                raise CacheError(f"{path} has no {missing[0]!r} dataset (it has {', '.join(f.keys())}): pick one of those")
            arrays = {name: f[name][:].astype(dtype) for name in names}
            split = f["split"].asstr()[:] if "split" in f else None
            return Loaded(
                arrays=arrays,
                labels=f["labels"][:],
                paths=list(f["paths"].asstr()[:]),
                split=np.asarray(split) if split is not None else None,
                digests=[d.decode() for d in f["digests"][:].tolist()],
                attrs=attrs,
                errors=list(zip(f["errors/paths"].asstr()[:], f["errors/reasons"].asstr()[:])),
            )
    except OSError as error:
        raise CacheError(f"{path} is not a readable HDF5 file ({error}): rerun `embedpipe extract` to rebuild it") from None


def _check_kind(path: Path, attrs: dict[str, Any]) -> None:
    if attrs.get("kind") != FILE_KIND:
        raise CacheError(f"{path} is not an embedpipe embeddings file: pass a file printed by `embedpipe extract`")
    if attrs.get("format_version") != CACHE_FORMAT:
        raise CacheError(
            f"{path} has cache format {attrs.get('format_version')}, this embedpipe reads {CACHE_FORMAT}: "
            "rerun `embedpipe extract` to rebuild it"
        )


# --------------------------------------------------------------------------- housekeeping


def list_exports(cache_dir: str | Path) -> list[tuple[Path, dict[str, Any] | None]]:
    """Exported files in a cache folder with their attributes (None when unreadable)."""
    folder = Path(cache_dir)
    if not folder.is_dir():
        return []
    return [(p, read_attrs(p)) for p in sorted(folder.glob("*.h5")) if not p.name.startswith(".")]


def list_stores(cache_dir: str | Path) -> list[tuple[Path, dict[str, Any] | None, int]]:
    """Stores in a cache folder: (folder, its config.json, number of rows)."""
    folder = Path(cache_dir) / "store"
    if not folder.is_dir():
        return []
    result = []
    for root in sorted(p for p in folder.iterdir() if p.is_dir()):
        try:
            config = json.loads((root / "config.json").read_text())
        except (OSError, ValueError):
            config = None
        rows = sum(_shard_rows(p) for p in (root / "shards").glob("*.h5") if not p.name.startswith("."))
        result.append((root, config, rows))
    return result


def verify_export(path: str | Path) -> list[str]:
    """Problems found in an exported file, reading every byte (checksums included); empty when sound."""
    path = Path(path)
    problems: list[str] = []
    try:
        with h5py.File(path, "r") as f:
            attrs = {k: _decode_attr(v) for k, v in f.attrs.items()}
            try:
                _check_kind(path, attrs)
            except CacheError as error:
                return [str(error)]
            n = f["paths"].shape[0]
            for name in ["labels", "digests", *[dataset_name_for(o) for o in attrs["outputs"]]] + (["split"] if "split" in f else []):
                if name not in f:
                    problems.append(f"missing dataset {name!r}")
                    continue
                if f[name].shape[0] != n:
                    problems.append(f"{name} has {f[name].shape[0]} rows, paths has {n}")
            for output in attrs["outputs"]:
                data = f[dataset_name_for(output)]
                for start in range(0, data.shape[0], CHUNK_ROWS):
                    block = data[start : start + CHUNK_ROWS]  # fletcher32 checks every chunk read
                    if not np.isfinite(block).all():
                        problems.append(f"{dataset_name_for(output)} has non-finite values near row {start}")
                        break
            classes = attrs.get("class_names") or []
            labels = f["labels"][:]
            if len(labels) and (labels.max() >= max(len(classes), 0) or labels.min() < -1):
                problems.append(f"labels outside 0..{len(classes) - 1}")
    except (OSError, KeyError) as error:
        problems.append(f"unreadable: {error}")
    return problems


def verify_store(root: Path) -> list[str]:
    """Problems found in a store's shards, reading every byte."""
    problems = []
    for shard in sorted((root / "shards").glob("*.h5")):
        if shard.name.startswith("."):
            continue  # a dead writer's temporary file: never read, removed by the next extract
        try:
            with h5py.File(shard, "r") as f:
                n = f["digests"].shape[0]
                for name, data in f.items():
                    if isinstance(data, h5py.Dataset) and data.shape and data.shape[0] not in (n, 0):
                        problems.append(f"{shard.name}: {name} has {data.shape[0]} rows, digests has {n}")
                    elif isinstance(data, h5py.Dataset) and data.size:
                        data[...]
        except (OSError, KeyError) as error:
            problems.append(f"{shard.name}: unreadable ({error}); delete it and rerun extract")
    return problems


def remove_tmp_files(cache_dir: str | Path) -> int:
    """Delete temporary files left by killed writers; returns how many."""
    count = 0
    for tmp in Path(cache_dir).rglob(".tmp-*"):
        with contextlib.suppress(OSError):
            tmp.unlink()
            count += 1
    return count
