"""The embedding cache: content-addressed, crash-safe, self-describing. The only package that imports h5py.

Layout of a cache folder::

    files.sqlite                  path -> (size, mtime, ctime, inode) -> sha256 of the file's bytes
    store/<key>/config.json       the EmbeddingConfig whose hash is <key>
    store/<key>/shards/*.h5       committed rows: image digest -> outputs, or a decode error
    store/<key>/checked.json      shards whose checksums held, by stat key
    store/<key>/quarantine/       damaged shards moved aside
    store/<key>/.lock             one writer per store at a time (flock)
    listings/*.npz, resolved/     what the cache-hit fast path reads (snapshots, resolved configs)
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

Its rooms: :mod:`.layout` (names and sizes), :mod:`.hdf5` (attributes and checksums of the HDF5
files), :mod:`.index` (the file index), :mod:`.listing` (snapshots for the cache hit), :mod:`.store`
(shards), :mod:`.export` (exported files and their metadata), :mod:`.housekeeping` (ls, info,
verify, rm).
"""

from __future__ import annotations

import importlib
from typing import Any

from .index import FileIndex
from .layout import COMPACT_SHARDS, FILE_KIND, dataset_name_for

# Public name -> its module, imported on first use: these load h5py (about 0.2 s), which the
# cache-hit path never needs (it reads listing snapshots, resolved configs and the file index).
_LAZY = {
    **dict.fromkeys(("ExportMeta", "ExportRequest", "Loaded", "export_name", "read_export", "verify_export", "write_export"), ".export"),
    **dict.fromkeys(("cache_info", "cache_list", "cache_remove", "cache_verify", "list_exports", "list_stores", "remove_tmp_files"),
                    ".housekeeping"),
    "read_attrs": ".hdf5",
    "Store": ".store",
    "StoreIndex": ".store",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "COMPACT_SHARDS",
    "FILE_KIND",
    "ExportMeta",
    "ExportRequest",
    "FileIndex",
    "Loaded",
    "Store",
    "StoreIndex",
    "cache_info",
    "cache_list",
    "cache_remove",
    "cache_verify",
    "dataset_name_for",
    "export_name",
    "list_exports",
    "list_stores",
    "read_attrs",
    "read_export",
    "remove_tmp_files",
    "verify_export",
    "write_export",
]
