"""The store: every row ever computed under one embedding config, as committed, crash-safe shards.

A shard is built in memory, written with plain file I/O to a temporary name, fsync'd and renamed
into place, so it exists whole or not at all, and a full disk fails the write cleanly. HDF5 itself
does not survive an unclean close (a SIGKILLed h5py writer left an unreadable file in 43 of 43
trials), so nothing here depends on it. Small shards are merged (compacted) as they pile up.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import logging
import os
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from .._atomic import fsync_dir, temporary_name
from ..config import CACHE_FORMAT, EmbeddingConfig, canonical_json
from ..errors import CacheError
from .index import RACY_NS, stat_files
from .hdf5 import STR_DTYPE, checksum_problems, column_checksums
from .layout import (CHECKED_FILE, CHUNK_ROWS, QUARANTINE_DIR, COMPACT_ROWS, COMPACT_SHARDS, DIGEST_DTYPE, SHARD_DIR, SHARD_KIND, STORE_CONFIG,
                     TMP_PREFIX, dataset_name_for, store_root, visible_h5, write_or_fail)

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


_LOOKUP_ROWS = 65536  # digests looked up at a time
BINARY_DTYPE = "S32"  # a sha256 as its 32 bytes: how the store index holds digests (half the hex's 64)
_NIBBLE = np.full(256, 255, dtype=np.uint8)  # 255: not a lowercase hex digit
_NIBBLE[np.frombuffer(b"0123456789abcdef", dtype=np.uint8)] = np.arange(16, dtype=np.uint8)


def digest_bytes(digests: np.ndarray) -> np.ndarray:
    """Hex digests (S64, lowercase, as stored) as their 32 bytes (S32), in the same order.

    Raises:
        ValueError: a digest that is not 64 lowercase hex digits (a damaged or foreign shard).
    """
    chars = np.ascontiguousarray(digests, dtype=DIGEST_DTYPE).view(np.uint8).reshape(-1, 64)
    nibbles = _NIBBLE[chars]
    if len(nibbles) and int(nibbles.max()) == 255:
        raise ValueError("a digest that is not 64 lowercase hex digits")
    return np.ascontiguousarray((nibbles[:, 0::2] << 4) | nibbles[:, 1::2]).view(BINARY_DTYPE).ravel()


def digest_keys(binary: np.ndarray) -> np.ndarray:
    """The first 64 bits of each binary digest (S32) as a uint64: sorted digests give sorted keys."""
    words = np.ascontiguousarray(binary, dtype=BINARY_DTYPE).view(np.uint8).reshape(-1, 32)[:, :8]
    return np.ascontiguousarray(words).view(">u8").ravel().astype(np.uint64)


@dataclass
class StoreIndex:
    """Where each digest's row is, as sorted columns (no Python object per row): 48 bytes a row.

    ``digests`` holds every stored digest once, as its 32 bytes, sorted; ``shard[i]`` (an index into
    ``shards``) and ``row[i]`` locate ``digests[i]``. Lookups take hex digests (S64), as the rest of the
    cache holds them. Images that failed to decode are in ``errors`` (hex digest -> reason).
    """

    digests: np.ndarray  # S32 (M,), sorted, unique
    shard: np.ndarray  # int32 (M,)
    row: np.ndarray  # int32 (M,): a shard holds at most COMPACT_ROWS rows
    errors: dict[bytes, str]
    shards: list[Path]
    keys: np.ndarray = field(init=False, repr=False)  # uint64 (M,): each digest's first 64 bits, sorted with them

    def __post_init__(self) -> None:
        self.keys = digest_keys(self.digests)

    def failed(self, digests: np.ndarray) -> np.ndarray | None:
        """Which of ``digests`` (S64) failed to decode when they were computed; None when none ever did."""
        if not self.errors:
            return None
        known = np.sort(np.array(list(self.errors), dtype=DIGEST_DTYPE))
        failed = np.empty(len(digests), dtype=bool)
        for start in range(0, len(digests), _LOOKUP_ROWS):  # a block at a time: no bytes object per row
            part = np.asarray(digests[start : start + _LOOKUP_ROWS], dtype=DIGEST_DTYPE)
            at = np.minimum(np.searchsorted(known, part), len(known) - 1)
            failed[start : start + len(part)] = known[at] == part
        return failed

    def _positions(self, digests: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        at = np.empty(len(digests), dtype=np.int64)
        found = np.empty(len(digests), dtype=bool)
        for start in range(0, len(digests), _LOOKUP_ROWS):  # a block at a time: the keys' scratch stays small
            part = slice(start, start + _LOOKUP_ROWS)
            at[part], found[part] = self._block_positions(digest_bytes(digests[part]))
        return at, found

    def _block_positions(self, digests: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # ``digests`` binary (S32). Searched by 64-bit key (16x faster than comparing the digests), then the whole digest compared.
        keys = digest_keys(digests)
        at = np.searchsorted(self.keys, keys)
        found = at < len(self.digests)
        found[found] = self.digests[at[found]] == digests[found]
        # Two digests may share their first 64 bits (odds about N^2 / 2^65: one in 10^5 at 10M images);
        # then the row asked for can sit further on in the run of equal keys.
        for i in np.flatnonzero(~found & (at < len(self.keys))).tolist():
            j = int(at[i])
            while j < len(self.keys) and self.keys[j] == keys[i]:
                if self.digests[j] == digests[i]:
                    at[i], found[i] = j, True
                    break
                j += 1
        return at, found

    def has_rows(self, digests: np.ndarray) -> np.ndarray:
        """Which of ``digests`` (S64) have a stored row: bool, same shape."""
        return self._positions(digests)[1]

    def locate(self, digests: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(shard index, row)`` of each of ``digests``, all of which must have rows."""
        at, found = self._positions(digests)
        if not found.all():
            raise CacheError("internal: rows asked for digests the store does not hold")
        return self.shard[at], self.row[at]

    def __contains__(self, digest: bytes) -> bool:
        return digest in self.errors or bool(self.has_rows(np.array([digest], dtype=DIGEST_DTYPE))[0])


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

    def index(self) -> StoreIndex:
        """Read every committed shard's digests (not its data) into sorted columns."""
        parts: list[np.ndarray] = []
        errors: dict[bytes, str] = {}
        kept: list[Path] = []
        for shard in self.shards():
            kept.append(shard)
            try:
                with h5py.File(shard, "r") as f:
                    _row_layout(f, self.config)
                    digests = digest_bytes(f["digests"][:])
                    if f.attrs.get("cache_key") != self.key:
                        raise ValueError("written under another embedding config")
                    shard_errors = list(zip(f["errors/digests"][:].tolist(), f["errors/reasons"].asstr()[:])) if "errors" in f else []
                    self._check(shard, f)
                parts.append(digests)
                for digest, reason in shard_errors:
                    errors.setdefault(digest, reason)
                continue
            except DAMAGED as error:
                self.quarantine(shard, error)
                kept.pop()
        shards = kept
        self.save_checked()
        lengths = [len(p) for p in parts]
        starts = np.cumsum([0, *lengths])
        every = np.empty(int(starts[-1]), dtype=BINARY_DTYPE)
        for i, part in enumerate(parts):  # each shard's part freed once copied: one copy of the digests at a time
            every[starts[i] : starts[i + 1]] = part
            parts[i] = every[:0]
        del parts
        # A digest stored twice (compaction writes the merged shard before deleting the small ones) is
        # read from its first shard in name order, as a stable sort keeps it first among equals. The
        # digests are then sorted in place (not gathered through the order: a second copy).
        order = np.argsort(every, kind="stable")
        every.sort()
        first = np.ones(len(every), dtype=bool)  # the first of each run of equal digests (one sort, not np.unique's second)
        np.not_equal(every[1:], every[:-1], out=first[1:])
        chosen = order if first.all() else order[first]
        del order
        shard = (np.searchsorted(starts, chosen, side="right") - 1).astype(np.int32)  # row positions -> shard, row
        return StoreIndex(digests=every if first.all() else every[first], shard=shard,
                          row=(chosen - starts[shard]).astype(np.int32), errors=errors, shards=shards)

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
        digests: Sequence[bytes],
        outputs: dict[str, np.ndarray],
        errors: Sequence[tuple[bytes, str]] = (),
    ) -> Path | None:
        """Commit rows atomically; returns the shard path (None when there was nothing to write)."""
        if not len(digests) and not errors:
            return None
        data = _shard_bytes(digests, outputs, errors, self.config)
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

    def read_rows(
        self, index: StoreIndex, digests: np.ndarray, output: str, *, files: dict[Path, h5py.File] | None = None
    ) -> np.ndarray:
        """Rows for ``digests`` (S64, all with rows in ``index``), in that order, in the stored dtype.

        Args:
            files: open shard handles to reuse across calls (the caller closes them);
                without it each shard is opened and closed here.
        """
        shard_ids, rows = index.locate(digests)
        result: np.ndarray | None = None
        for shard_id in np.unique(shard_ids).tolist():
            shard = index.shards[shard_id]
            positions = np.flatnonzero(shard_ids == shard_id)
            wanted_rows = rows[positions]
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
                result = np.empty((len(digests), block.shape[1]), dtype=block.dtype)
            result[positions] = block
        if result is None:
            raise CacheError("internal: no rows requested")
        return result


def _shard_bytes(
    digests: Sequence[bytes], outputs: dict[str, np.ndarray], errors: Sequence[tuple[bytes, str]], config: EmbeddingConfig
) -> bytes:
    buffer = io.BytesIO()
    with h5py.File(buffer, "w") as f:
        _stamp(f, config)
        f.create_dataset("digests", data=np.array(digests, dtype=DIGEST_DTYPE))
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
    """A new shard's error ledger, then the checksums of everything in it (rows swapped or edited that HDF5's own checks miss)."""
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


