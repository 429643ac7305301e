"""Names, kinds and sizes of everything in a cache folder, in one place (no h5py: the cache-hit
path reads it without loading HDF5; reading and checking the HDF5 files is :mod:`.hdf5`).

The layout they make up is drawn in :mod:`embedpipe.cache`'s docstring; a writer's file is
``.tmp-*`` until its rename, and a dead writer's is removed by the next one holding the lock.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from .._atomic import write_atomically
from .._columns import RAW_DIGEST_DTYPE  # the same sha256 in memory: half the bytes of its hex, held for every image of a run
from ..config import OUTPUT_EMBEDDING
from ..errors import CacheError

FILE_KIND = "embedpipe-embeddings"
SHARD_KIND = "embedpipe-shard"
INDEX_FILE = "files.sqlite"
STORE_DIR = "store"
SHARD_DIR = "shards"
QUARANTINE_DIR = "quarantine"  # store/<key>/quarantine/: damaged shards moved aside, for a look
STORE_CONFIG = "config.json"
CHECKED_FILE = "checked.json"  # store/<key>/checked.json: shards whose checksums held, by stat
TMP_PREFIX = ".tmp-"
DIGEST_DTYPE = "S64"  # hex sha256, as files hold it (shards, exports, the file index)
CHUNK_ROWS = 4096  # chunks of >= 1024 rows read 3x faster than 256-row ones
COMPACT_SHARDS = 64  # merge small shards once this many accumulate...
COMPACT_ROWS = 65536  # ...into shards of at most this many rows (bounded memory)


_DIGEST_BLOCK = 65536  # digests converted at a time: the scratch stays small
_HEX = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)
_NIBBLE = np.full(256, 255, dtype=np.uint8)  # 255: not a lowercase hex digit
_NIBBLE[_HEX] = np.arange(16, dtype=np.uint8)


def raw_digests(hex_digests: object) -> np.ndarray:
    """``RAW_DIGEST_DTYPE`` (N,) of digests given as lowercase hex (``S64`` or ``str``), a block at a time.

    Raises:
        ValueError: a digest that is not 64 lowercase hex digits (a damaged or foreign file).
    """
    digests = np.asarray(hex_digests, dtype=DIGEST_DTYPE)
    raw = np.empty(len(digests), dtype=RAW_DIGEST_DTYPE)
    for start in range(0, len(digests), _DIGEST_BLOCK):
        part = np.ascontiguousarray(digests[start : start + _DIGEST_BLOCK])
        nibbles = _NIBBLE[part.view(np.uint8).reshape(-1, 64)]
        if len(nibbles) and int(nibbles.max()) == 255:
            raise ValueError("a digest that is not 64 lowercase hex digits")
        raw[start : start + len(part)] = np.ascontiguousarray((nibbles[:, 0::2] << 4) | nibbles[:, 1::2]).view(RAW_DIGEST_DTYPE).ravel()
    return raw


def as_raw_digests(digests: object) -> np.ndarray:
    """Digests as ``RAW_DIGEST_DTYPE``: raw ones as they are, hex ones (``S64``, ``str``) decoded.

    The one way in for digests a caller hands over: numpy would otherwise cast hex to ``V32`` by
    keeping its first 32 characters, a silent wrong digest.
    """
    if isinstance(digests, np.ndarray) and digests.dtype == RAW_DIGEST_DTYPE:
        return digests
    if not isinstance(digests, np.ndarray) and len(digests) and isinstance(digests[0], bytes) and len(digests[0]) == 32:  # type: ignore[index, arg-type]
        return np.array(digests, dtype=RAW_DIGEST_DTYPE)
    array = np.asarray(digests)
    if array.dtype.kind not in "SU" and len(array):
        raise TypeError(f"digests as {array.dtype}: give raw sha256 ({RAW_DIGEST_DTYPE}) or lowercase hex")
    return raw_digests(array)


def hex_digests(raw: np.ndarray) -> np.ndarray:
    """``S64`` lowercase hex (N,) of ``RAW_DIGEST_DTYPE`` digests: the form files hold."""
    raw = np.ascontiguousarray(raw, dtype=RAW_DIGEST_DTYPE)
    out = np.empty((len(raw), 64), dtype=np.uint8)
    for start in range(0, len(raw), _DIGEST_BLOCK):
        part = raw[start : start + _DIGEST_BLOCK].view(np.uint8).reshape(-1, 32)
        out[start : start + len(part), 0::2] = _HEX[part >> 4]
        out[start : start + len(part), 1::2] = _HEX[part & 15]
    return out.view(DIGEST_DTYPE).ravel()


def hex_digest_blocks(raw: np.ndarray) -> Iterator[np.ndarray]:
    """:func:`hex_digests` of ``raw`` a block at a time, for a consumer of every row (a hash) that needs no whole hex copy."""
    for start in range(0, len(raw), _DIGEST_BLOCK):
        yield hex_digests(raw[start : start + _DIGEST_BLOCK])


def dataset_name_for(output: str) -> str:
    """HDF5 dataset name of an output: the pooled embedding is stored as ``embeddings``."""
    return "embeddings" if output == OUTPUT_EMBEDDING else output


def store_root(cache_dir: str | Path, key: str) -> Path:
    """The folder of the store whose embedding config hashes to ``key``."""
    return Path(cache_dir) / STORE_DIR / key[:24]


def visible_h5(folder: Path) -> list[Path]:
    """The committed ``.h5`` files in a folder, sorted; a writer's hidden temporary files are not among them."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob("*.h5") if not p.name.startswith("."))


def write_or_fail(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically; a failure is a :class:`CacheError` saying what to do."""
    try:
        write_atomically(path, data)
    except OSError as error:
        raise CacheError(
            f"could not write {path} ({error.strerror or error}): free disk space or pick another --cache-dir; "
            "finished work is kept and the next run resumes"
        ) from None
