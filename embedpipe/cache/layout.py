"""Names, kinds and sizes of everything in a cache folder, in one place (no h5py: the cache-hit
path reads it without loading HDF5; reading and checking the HDF5 files is :mod:`.hdf5`).

The layout they make up is drawn in :mod:`embedpipe.cache`'s docstring; a writer's file is
``.tmp-*`` until its rename, and a dead writer's is removed by the next one holding the lock.
"""

from __future__ import annotations

from pathlib import Path

from .._atomic import write_atomically
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
DIGEST_DTYPE = "S64"  # hex sha256
CHUNK_ROWS = 4096  # chunks of >= 1024 rows read 3x faster than 256-row ones
COMPACT_SHARDS = 64  # merge small shards once this many accumulate...
COMPACT_ROWS = 65536  # ...into shards of at most this many rows (bounded memory)


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
