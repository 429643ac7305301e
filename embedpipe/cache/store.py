"""The store: every row ever computed under one embedding config, as committed, crash-safe shards.

A shard is built in memory, written with plain file I/O to a temporary name, fsync'd and renamed
into place, so it exists whole or not at all, and a full disk fails the write cleanly. HDF5 itself
does not survive an unclean close (a SIGKILLed h5py writer left an unreadable file in 43 of 43
trials), so nothing here depends on it. Small shards are merged (compacted) as they pile up.
"""

from __future__ import annotations

import bisect
import contextlib
import fcntl
import io
import json
import logging
import os
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from .._atomic import fsync_dir, temporary_name
from .._columns import digest_keys, digest_order, run_positions
from ..config import CACHE_FORMAT, EmbeddingConfig, canonical_json
from ..errors import CacheError
from .index import RACY_NS, stat_files
from .hdf5 import STR_DTYPE, checksum_problems, column_checksums
from .layout import (CHECKED_FILE, CHUNK_ROWS, QUARANTINE_DIR, COMPACT_ROWS, COMPACT_SHARDS, DIGEST_DTYPE, RAW_DIGEST_DTYPE, SHARD_DIR, SHARD_KIND,
                     STORE_CONFIG, TMP_PREFIX, as_raw_digests, dataset_name_for, hex_digests, raw_digests, store_root, visible_h5, write_or_fail)

logger = logging.getLogger(__name__)

# What h5py raises on a damaged or foreign shard: bad bytes (OSError, RuntimeError), missing or retyped
# objects (KeyError, TypeError, AttributeError: a group where a dataset should be), bad values (ValueError).
DAMAGED = (OSError, KeyError, RuntimeError, ValueError, TypeError, AttributeError)


class ShardReadError(CacheError):
    """A committed shard's rows cannot be read back (damaged bytes); the extract stage quarantines it and recomputes."""

    def __init__(self, shard: Path, error: BaseException) -> None:
        self.shard, self.error = shard, error
        super().__init__(f"cache shard {shard} is unreadable ({str(error).splitlines()[0] if str(error) else type(error).__name__}): "
                         "rerun `embedpipe extract`, which moves it aside and recomputes its rows")


_LOOKUP_ROWS = 65536  # digests keyed at a time


@dataclass
class StoreIndex:
    """Where the store holds each of some digests (a dataset's, in its order): 8 bytes a row.

    Built by :meth:`Store.index` from every shard's digests, a shard at a time, against the digests
    asked for, so it grows with the dataset, not with the store, and holds no copy of any digest.
    ``shard[i]`` (an index into ``shards``, -1 when no shard holds it) and ``row[i]`` locate the
    ``i``-th digest asked for. Images that failed to decode are in ``errors`` (raw digest bytes -> reason).
    """

    shard: np.ndarray  # int32 (N,), -1: not stored
    row: np.ndarray  # int32 (N,): a shard holds at most COMPACT_ROWS rows
    errors: dict[bytes, str]  # 32-byte sha256 -> reason
    shards: list[Path]

    def stored(self) -> np.ndarray:
        """Which of the digests asked for have a stored row: bool (N,)."""
        return self.shard >= 0

    def failed(self, digests: np.ndarray) -> np.ndarray | None:
        """Which of ``digests`` (``RAW_DIGEST_DTYPE``) failed to decode when they were computed; None when none ever did."""
        if not self.errors:
            return None
        known = np.sort(np.array(list(self.errors), dtype=RAW_DIGEST_DTYPE))
        digests = as_raw_digests(digests)
        failed = np.empty(len(digests), dtype=bool)
        for start in range(0, len(digests), _LOOKUP_ROWS):  # a block at a time: searchsorted's positions stay small
            part = digests[start : start + _LOOKUP_ROWS]
            at = np.minimum(np.searchsorted(known, part), len(known) - 1)
            failed[start : start + len(part)] = known[at] == part
        return failed


class _Wanted:
    """The digests asked of a store, in sorted order, matched against one shard's digests at a time."""

    _PAIRS = 16  # a run of up to this many equal keys is compared pair by pair; a longer one is bisected

    def __init__(self, digests: np.ndarray) -> None:
        self.digests = digests
        self.order, self.keys = digest_order(digests)  # sorted by whole digest, so a run of equal keys can be bisected

    def match(self, stored: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(positions asked, rows of stored)`` of every pair whose whole digests are equal.

        Searched by 64-bit key (faster than comparing 32-byte strings), then the whole digests
        compared. A digest asked for twice (an image at two paths) and digests sharing their first
        64 bits (odds about N^2 / 2^65 for real ones: one in 10^5 at 10M images) make a run of equal
        keys: a short run is compared pair by pair, a long one bisected by whole digest.
        """
        keys = digest_keys(stored)
        # Searched in key order: numpy's binary search starts from the last key's place when keys rise
        # (5x faster at 10M keys asked, where each unsorted search misses the caches on every step).
        by_key = np.argsort(keys)
        first, last = np.empty(len(keys), dtype=np.intp), np.empty(len(keys), dtype=np.intp)
        first[by_key] = np.searchsorted(self.keys, keys[by_key], "left")
        last[by_key] = np.searchsorted(self.keys, keys[by_key], "right")
        counts = last - first
        short = np.where(counts <= self._PAIRS, counts, 0)
        stored_rows = np.repeat(np.arange(len(stored), dtype=np.int64), short)
        asked = self.order[np.repeat(first, short) + run_positions(short)]
        same = self.digests[asked] == stored[stored_rows]
        found_asked, found_rows = [asked[same]], [stored_rows[same]]
        def sorted_digest(i: int) -> bytes:  # the i-th digest asked for, in sorted order
            return bytes(self.digests[self.order[i]])

        for r in np.flatnonzero(counts > self._PAIRS).tolist():
            run = range(int(first[r]), int(last[r]))
            digest = bytes(stored[r])
            lo, hi = bisect.bisect_left(run, digest, key=sorted_digest), bisect.bisect_right(run, digest, key=sorted_digest)
            found_asked.append(self.order[run.start + lo : run.start + hi])
            found_rows.append(np.full(hi - lo, r, dtype=np.int64))
        return np.concatenate(found_asked), np.concatenate(found_rows)


class Store:
    """All rows ever computed under one :class:`EmbeddingConfig`, as committed shards."""

    def __init__(self, cache_dir: str | Path, config: EmbeddingConfig) -> None:
        self.config = config
        self.key = config.key()
        self.root = store_root(cache_dir, self.key)
        self.shard_dir = self.root / SHARD_DIR
        self._config_file = self.root / STORE_CONFIG
        self.written: set[Path] = set()  # shards this process committed (compaction under torchrun)
        self._checked: dict[str, list[int]] | None = None  # shard name -> stat key when its checksums last held
        self._checked_changed = False

    def create(self) -> None:
        try:
            self.shard_dir.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise CacheError(f"cannot create {self.shard_dir} ({error.strerror}): pick a writable --cache-dir") from None
        expected = json.loads(canonical_json({"format": CACHE_FORMAT, "key": self.key, "config": self.config.to_dict()}))
        try:
            found = json.loads(self._config_file.read_text())
        except FileNotFoundError:
            found = expected = None
        except (OSError, ValueError) as error:
            found = f"unreadable ({error})"
        if found == expected and found is not None:
            return
        if isinstance(found, dict) and isinstance(found.get("format"), int) and found["format"] != CACHE_FORMAT:
            raise CacheError(
                f"{self.root} holds cache format {found['format']}, this embedpipe writes format {CACHE_FORMAT}: "
                f"use the embedpipe that wrote it, or delete that folder (embedpipe cache rm {self.key[:12]}) and rerun"
            )
        if found is not None:
            # The folder's name is the key and every shard carries its own cache_key, so a damaged or
            # edited config.json says nothing the shards do not: it is rewritten, not trusted.
            logger.warning("%s was damaged (%s): rewritten from the embedding config", self._config_file, str(found)[:80])
        write_or_fail(self._config_file, canonical_json({"format": CACHE_FORMAT, "key": self.key,
                                                         "config": self.config.to_dict()}).encode())

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
            for tmp in self.shard_dir.glob(TMP_PREFIX + "*"):
                tmp.unlink(missing_ok=True)
            yield
        finally:
            handle.close()

    def shards(self) -> list[Path]:
        return visible_h5(self.shard_dir)

    def index(self, digests: np.ndarray) -> StoreIndex:
        """Where each of ``digests`` (raw, ``RAW_DIGEST_DTYPE``, or hex) is stored, read from every committed shard's digests (not its data).

        A digest stored twice (compaction writes the merged shard before deleting the small ones) is
        read from its first shard in name order. A damaged shard is moved aside (its rows computed again).
        """
        wanted = _Wanted(as_raw_digests(digests))
        shard = np.full(len(digests), -1, dtype=np.int32)
        row = np.zeros(len(digests), dtype=np.int32)
        errors: dict[bytes, str] = {}
        kept: list[Path] = []
        for path in self.shards():
            try:
                with h5py.File(path, "r") as f:
                    _row_layout(f, self.config)
                    stored = raw_digests(f["digests"][:])  # ValueError when not hex: damaged
                    if f.attrs.get("cache_key") != self.key:
                        raise ValueError("written under another embedding config")
                    shard_errors = (list(zip(raw_digests(f["errors/digests"][:]).tolist(), f["errors/reasons"].asstr()[:]))
                                    if "errors" in f else [])
                    self._check(path, f)
                    asked, rows = wanted.match(stored)
            except DAMAGED as error:
                self.quarantine(path, error)
                continue
            new = shard[asked] < 0  # a row already found in an earlier shard keeps it
            # Reversed, so that of a digest twice in one shard (a merge of shards that shared it) the first row is the one kept.
            targets = asked[new][::-1]
            shard[targets], row[targets] = len(kept), rows[new][::-1]
            kept.append(path)
            for digest, reason in shard_errors:
                errors.setdefault(digest, reason)
        self.save_checked()
        return StoreIndex(shard=shard, row=row, errors=errors, shards=kept)

    def _checked_shards(self) -> dict[str, list[int]]:
        if self._checked is None:
            try:
                found = json.loads((self.root / CHECKED_FILE).read_text())
                self._checked = {str(k): [int(x) for x in v] for k, v in found.items()} if isinstance(found, dict) else {}
            except (OSError, ValueError, TypeError, AttributeError):  # missing or damaged: shards are checked again
                self._checked = {}
        return self._checked

    def _check(self, shard: Path, f: h5py.File) -> None:
        """Check a shard's checksums unless they held at its current stat key; raises ValueError when they do not.

        A shard is never modified once committed, so a stat key that still matches means the same bytes
        (an edit changes ctime); HDF5's Fletcher-32 also checks each chunk of rows when it is read.
        """
        key = stat_files([str(shard)])[0].tolist()
        if self._checked_shards().get(shard.name) == key:
            return
        problems = checksum_problems(f)
        if problems:
            raise ValueError(problems[0])
        if max(key[1], key[2]) < time.time_ns() - RACY_NS:  # not racily clean: a change in the same tick stays visible
            self._checked_shards()[shard.name] = key
            self._checked_changed = True

    def save_checked(self) -> None:
        """Remember which shards were checked (best effort: a lost entry costs one more check, never a wrong row)."""
        if self._checked is None or not self._checked_changed:
            return
        names = {p.name for p in self.shards()}
        checked = {name: key for name, key in self._checked.items() if name in names}
        with contextlib.suppress(OSError, CacheError):
            write_or_fail(self.root / CHECKED_FILE, json.dumps(checked, sort_keys=True).encode())
            self._checked_changed = False

    def quarantine(self, shard: Path, error: BaseException) -> None:
        """Move a shard that cannot be read or trusted aside, so its rows are recomputed, and say so."""
        folder = self.root / QUARANTINE_DIR
        try:
            folder.mkdir(exist_ok=True)
            os.replace(shard, folder / shard.name)
        except OSError as move:
            raise CacheError(f"cache shard {shard} is unreadable ({error}) and cannot be moved aside ({move.strerror}): "
                             "delete it; only its rows are recomputed") from None
        logger.warning("cache shard %s is damaged (%s): moved to %s; its rows are computed again", shard.name,
                       str(error).splitlines()[0] if str(error) else type(error).__name__, folder)

    def write_shard(
        self,
        digests: np.ndarray,
        outputs: dict[str, np.ndarray],
        errors: Sequence[tuple[bytes, str]] = (),
    ) -> Path | None:
        """Commit rows atomically; returns the shard path (None when there was nothing to write).

        Args:
            digests: one per row of each output, raw (``RAW_DIGEST_DTYPE``) or hex.
            errors: (digest, reason) of images that failed to decode, the digest raw (32 bytes) or hex.
        """
        if not len(digests) and not errors:
            return None
        hex_errors = list(zip(hex_digests(as_raw_digests([d for d, _ in errors])).tolist(), (r for _, r in errors))) if errors else []
        data = _shard_bytes(hex_digests(as_raw_digests(digests)), outputs, hex_errors, self.config)
        path = self.shard_dir / f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.h5"
        write_or_fail(path, data)
        self.written.add(path)
        # Written from bytes this process holds, so trusted without re-reading them.
        self._checked_shards()[path.name] = stat_files([str(path)])[0].tolist()
        self._checked_changed = True
        return path

    def compact(self, *, force: bool = False, own: bool = False) -> None:
        """Merge small shards into larger ones; crash-safe (duplicates are harmless, losses impossible).

        Args:
            force: merge as soon as two small shards exist, not only once many have piled up.
            own: only shards this process wrote, so ranks writing into one store at once
                never merge (and delete) a shard another rank is still reading.
        """
        small = [p for p in self.shards() if (not own or p in self.written) and shard_rows(p) < COMPACT_ROWS // 2]
        if len(small) < (2 if force else COMPACT_SHARDS):
            self.save_checked()
            return
        groups: list[list[Path]] = [[]]
        total = 0
        for shard in small:
            rows = shard_rows(shard)
            if groups[-1] and total + rows > COMPACT_ROWS:
                groups.append([])
                total = 0
            groups[-1].append(shard)
            total += rows
        for group in groups:
            if len(group) < 2:
                continue
            merged = self._merge(group)
            for shard in merged:  # only after the merged shard is durable
                shard.unlink(missing_ok=True)
                self.written.discard(shard)
        fsync_dir(self.shard_dir)
        self.save_checked()

    def _merge(self, group: list[Path]) -> list[Path]:
        """Write the rows of ``group`` into one new shard, a source shard at a time; returns the shards merged.

        Streamed through h5py into a temporary file (fsync'd, then renamed), so memory holds one
        small shard's rows, not the merged shard's: 65,536 rows of a 1,024-wide float16 output are
        128 MiB. A shard that fails its checks is moved aside first, so its rows are recomputed and
        never copied into a shard with fresh checksums.
        """
        sources: list[tuple[Path, int]] = []
        widths: dict[str, int] = {}
        for shard in group:
            try:
                with h5py.File(shard, "r") as f:
                    self._check(shard, f)
                    n, shard_widths = _row_layout(f, self.config)
                    for output, width in shard_widths.items():
                        widths.setdefault(output, width)
            except DAMAGED as error:
                self.quarantine(shard, error)  # its rows are recomputed; the others are merged
                continue
            sources.append((shard, n))
        if len(sources) < 2:
            return []
        total = sum(n for _, n in sources)
        path = self.shard_dir / f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.h5"
        tmp = temporary_name(path)
        try:
            with h5py.File(tmp, "w") as out:
                _stamp(out, self.config)
                digests = out.create_dataset("digests", shape=(total,), dtype=DIGEST_DTYPE)
                data = {output: out.create_dataset(dataset_name_for(output), shape=(total, widths.get(output, 0)) if total else (0, 0),
                                                   dtype=self.config.dtype, fletcher32=bool(total and widths.get(output)),
                                                   chunks=(min(total, CHUNK_ROWS), widths[output]) if total and widths.get(output) else None)
                        for output in self.config.outputs}
                errors: list[tuple[bytes, str]] = []
                at = 0
                for shard, n in sources:
                    with h5py.File(shard, "r") as f:
                        digests[at : at + n] = f["digests"][:]
                        for output, target in data.items():
                            if n:
                                target[at : at + n] = f[dataset_name_for(output)][:]
                        if "errors" in f:
                            errors += zip(f["errors/digests"][:].tolist(), f["errors/reasons"].asstr()[:])
                    at += n
                _seal(out, self.config, errors)
            with open(tmp, "rb+") as handle:
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except DAMAGED as error:
            with contextlib.suppress(OSError):
                tmp.unlink()
            if isinstance(error, OSError) and not isinstance(error, FileNotFoundError):
                raise CacheError(f"could not write {path} ({error}): free disk space or pick another --cache-dir; "
                                 "finished work is kept and the next run resumes") from None
            return []  # a source changed under us: leave the group as it is
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        fsync_dir(self.shard_dir)
        self.written.add(path)
        self._checked_shards()[path.name] = stat_files([str(path)])[0].tolist()  # checksums made from what we wrote
        self._checked_changed = True
        return [shard for shard, _ in sources]

    def width(self, index: StoreIndex, output: str) -> int:
        """Width D of an output, from the first shard that holds rows (0 when none does)."""
        for shard in index.shards:
            with h5py.File(shard, "r") as f:
                data = f[dataset_name_for(output)]
                if data.shape[0]:
                    return int(data.shape[1])
        return 0

    def read_rows(self, index: StoreIndex, rows: np.ndarray, output: str, *, files: dict[Path, h5py.File] | None = None) -> np.ndarray:
        """The stored ``output`` of the digests at positions ``rows`` of ``index`` (all stored), in that order and the stored dtype.

        Args:
            files: open shard handles to reuse across calls (the caller closes them);
                without it each shard is opened and closed here.
        """
        shard_ids, shard_rows_wanted = index.shard[rows], index.row[rows]
        if len(shard_ids) and int(shard_ids.min()) < 0:
            raise CacheError("internal: rows asked for digests the store does not hold")
        result: np.ndarray | None = None
        for shard_id in np.unique(shard_ids).tolist():
            shard = index.shards[shard_id]
            positions = np.flatnonzero(shard_ids == shard_id)
            wanted_rows = shard_rows_wanted[positions]
            try:
                with contextlib.ExitStack() as stack:
                    if files is None:
                        f = stack.enter_context(h5py.File(shard, "r"))
                    else:
                        f = files[shard] if shard in files else files.setdefault(shard, h5py.File(shard, "r"))
                    stored = f[dataset_name_for(output)]
                    wanted = np.unique(wanted_rows)  # h5py wants increasing, unique indices
                    if wanted[-1] - wanted[0] < 4 * len(wanted):
                        block = stored[wanted[0] : wanted[-1] + 1]  # one contiguous read beats fancy indexing
                        block = block[wanted_rows - wanted[0]]
                    else:
                        block = stored[wanted][np.searchsorted(wanted, wanted_rows)]
            except DAMAGED as error:  # damaged bytes: Fletcher-32, headers
                raise ShardReadError(shard, error) from None
            if not np.isfinite(block).all():
                raise ShardReadError(shard, ValueError(f"non-finite {dataset_name_for(output)} rows"))
            if result is None:
                result = np.empty((len(rows), block.shape[1]), dtype=block.dtype)
            result[positions] = block
        if result is None:
            raise CacheError("internal: no rows requested")
        return result


def _shard_bytes(
    digests: np.ndarray, outputs: dict[str, np.ndarray], errors: Sequence[tuple[bytes, str]], config: EmbeddingConfig
) -> bytes:
    """A shard's file, from its hex digests (``S64``), outputs and (hex digest, reason) errors."""
    buffer = io.BytesIO()
    with h5py.File(buffer, "w") as f:
        _stamp(f, config)
        f.create_dataset("digests", data=np.asarray(digests, dtype=DIGEST_DTYPE))
        for output in config.outputs:
            array = outputs.get(output, np.empty((0, 0), dtype=np.float32)).astype(config.dtype)
            f.create_dataset(dataset_name_for(output), data=array, fletcher32=bool(array.size), chunks=bool(array.size) or None)
        _seal(f, config, errors)
    return buffer.getvalue()


def _stamp(f: h5py.File, config: EmbeddingConfig) -> None:
    """A new shard's attributes: what it is, its format and the config its rows were computed under."""
    f.attrs["kind"] = SHARD_KIND
    f.attrs["format_version"] = CACHE_FORMAT
    f.attrs["cache_key"] = config.key()


def _seal(f: h5py.File, config: EmbeddingConfig, errors: Sequence[tuple[bytes, str]]) -> None:
    """A new shard's error ledger (hex digests, as files hold them), then the checksums of everything in it (rows swapped or edited that HDF5's own checks miss)."""
    if errors:
        f.create_dataset("errors/digests", data=np.array([d for d, _ in errors], dtype=DIGEST_DTYPE))
        f.create_dataset("errors/reasons", data=[r for _, r in errors], dtype=STR_DTYPE)
    names = ["digests", *(dataset_name_for(o) for o in config.outputs), "errors/digests", "errors/reasons"]
    f.attrs["checksums"] = column_checksums(f, names)


def _row_layout(f: h5py.File, config: EmbeddingConfig) -> tuple[int, dict[str, int]]:
    """A shard's row count and each output's width (outputs without rows left out).

    Raises:
        ValueError: the digests are not one column, or an output does not hold one row per digest.
    """
    shape = f["digests"].shape
    if len(shape) != 1:
        raise ValueError(f"digests has shape {shape}, not one column")
    widths = {}
    for output in config.outputs:
        data = f[dataset_name_for(output)].shape
        if len(data) != 2 or data[0] != shape[0]:
            raise ValueError(f"{dataset_name_for(output)} does not hold one row per digest")
        if shape[0]:
            widths[output] = int(data[1])
    return int(shape[0]), widths


def shard_rows(path: Path) -> int:
    try:
        with h5py.File(path, "r") as f:
            return int(f["digests"].shape[0])
    except DAMAGED:
        return COMPACT_ROWS  # unreadable: leave it for verify to report


