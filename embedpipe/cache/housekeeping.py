"""Housekeeping of a cache folder: list, describe, verify and remove what is in it.

These read the layout of :mod:`embedpipe.cache.layout` and nothing else does from outside this package.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from ..config import sha256_file
from ..errors import CacheError
from .export import UNREADABLE, check_export, first_line, read_export, verify_export
from .index import FileIndex
from .hdf5 import checksum_problems, read_attrs
from .layout import QUARANTINE_DIR, SHARD_DIR, STORE_CONFIG, STORE_DIR, TMP_PREFIX, visible_h5
from .listing import LISTING_DIR, Listings
from .store import shard_rows

logger = logging.getLogger(__name__)


def list_exports(cache_dir: str | Path) -> list[tuple[Path, dict[str, Any] | None]]:
    """Exported files in a cache folder with their attributes (None when unreadable)."""
    return [(p, read_attrs(p)) for p in visible_h5(Path(cache_dir))]


def list_stores(cache_dir: str | Path) -> list[tuple[Path, dict[str, Any] | None, int]]:
    """Stores in a cache folder: (folder, its config.json, number of rows)."""
    folder = Path(cache_dir) / STORE_DIR
    if not folder.is_dir():
        return []
    result = []
    for root in sorted(p for p in folder.iterdir() if p.is_dir()):
        try:
            config = json.loads((root / STORE_CONFIG).read_text())
        except (OSError, ValueError):
            config = None
        rows = sum(shard_rows(p) for p in visible_h5(root / SHARD_DIR))
        result.append((root, config, rows))
    return result


def verify_store(root: Path) -> list[str]:
    """Problems found in a store: its config.json, and each shard's rows read whole against their checksums."""
    problems: list[str] = []
    config: Any = None
    try:
        config = json.loads((root / STORE_CONFIG).read_text())
        if not isinstance(config, dict) or not str(config.get("key", "")).startswith(root.name):
            problems.append(f"{STORE_CONFIG} does not describe this store (key {root.name}): the next extract rewrites it")
    except FileNotFoundError:
        problems.append(f"{STORE_CONFIG} is missing: the next extract writes it again")
    except (OSError, ValueError) as error:
        problems.append(f"{STORE_CONFIG} is unreadable ({first_line(error)}): the next extract rewrites it")
    for shard in visible_h5(root / SHARD_DIR):  # a dead writer's temporary file is never read
        try:
            with h5py.File(shard, "r") as f:
                n = f["digests"].shape[0]
                found = [f"{name} has {data.shape[0]} rows, digests has {n}" for name, data in f.items()
                         if isinstance(data, h5py.Dataset) and data.shape and data.shape[0] not in (n, 0)]
                if not found and _key_of(config) and f.attrs.get("cache_key") != _key_of(config):
                    found.append("was written under another embedding config")
                found = found or checksum_problems(f)  # reads every byte: Fletcher-32 per chunk, then sha256 per dataset
        except (*UNREADABLE, TypeError, AttributeError) as error:
            found = [f"unreadable ({first_line(error)})"]
        problems += [f"{SHARD_DIR}/{shard.name}: {p}: the next extract moves it aside and recomputes its rows" for p in found]
    if aside := visible_h5(root / QUARANTINE_DIR):
        logger.warning("%s holds %d damaged shard(s) moved aside (their rows were recomputed): delete them when done looking",
                       root / QUARANTINE_DIR, len(aside))
    return problems


def _key_of(config: Any) -> str | None:
    return config.get("key") if isinstance(config, dict) and isinstance(config.get("key"), str) else None


def remove_tmp_files(cache_dir: str | Path) -> int:
    """Delete temporary files left by killed writers; returns how many."""
    count = 0
    for tmp in Path(cache_dir).rglob(TMP_PREFIX + "*"):
        with contextlib.suppress(OSError):
            tmp.unlink()
            count += 1
    return count


def _describe_export(path: Path) -> dict[str, Any]:
    """One ``cache ls`` row: what the file holds, or the one-line reason it cannot be used."""
    try:
        with h5py.File(path, "r") as f:
            attrs = check_export(f, path)
    except CacheError as error:
        return {"path": str(path), "error": str(error).removeprefix(f"{path} ")}
    except UNREADABLE as error:
        return {"path": str(path), "error": f"not a readable HDF5 file ({first_line(error)})"}
    return {
        "path": str(path),
        "dataset": attrs["dataset"].get("root", ""),
        "backbone": attrs.get("backbone"),
        "rows": attrs["dataset"].get("num_images"),
        "dims": attrs["dims"],
        "bytes": path.stat().st_size,
    }


def cache_list(cache_dir: str | Path = "cache") -> dict[str, list[dict[str, Any]]]:
    """Exported files and stores in a cache folder, as plain dicts; a file that fails :func:`check_export` is a row with its error."""
    exports = [_describe_export(path) for path in visible_h5(Path(cache_dir))]
    stores = [
        {
            "path": str(root),
            "key": root.name,
            "backbone": (config or {}).get("config", {}).get("backbone"),
            "weights": (config or {}).get("config", {}).get("weights"),
            "rows": rows,
            "bytes": sum(p.stat().st_size for p in root.rglob("*") if p.is_file()),
        }
        for root, config, rows in list_stores(cache_dir)
    ]
    return {"exports": exports, "stores": stores}


def cache_info(path: str | Path) -> dict[str, Any]:
    """An exported file's metadata, its shape and its error ledger."""
    loaded = read_export(path, outputs=[])
    info = dict(loaded.attrs)
    info["rows"] = len(loaded.paths)
    info["errors"] = [{"path": p, "reason": r} for p, r in loaded.errors]
    if loaded.split is not None:
        names, counts = np.unique(loaded.split, return_counts=True)
        info["split_counts"] = {str(n): int(c) for n, c in zip(names, counts)}
    return info


def cache_verify(target: str | Path, *, check_files: bool = False) -> list[str]:
    """Problems in an exported file or a whole cache folder; empty when all is sound.

    Args:
        target: an exported ``.h5`` file, or a cache folder (every export and store).
        check_files: also re-hash the dataset's image files and report those that changed.
    """
    target = Path(target)
    if not target.exists():
        raise CacheError(f"{target} does not exist: pass an exported .h5 file or a cache folder")
    problems: list[str] = []
    files = [p for p, _ in list_exports(target)] if target.is_dir() else [target]
    for file in files:
        problems += [f"{file}: {p}" for p in verify_export(file)]
        if check_files and not problems:
            loaded = read_export(file, outputs=[])
            root_text = loaded.attrs["dataset"].get("root")
            if not isinstance(root_text, str):
                problems.append(f"{file}: its dataset attribute names no root folder, so its images cannot be checked")
                continue
            root = Path(root_text)
            root = root.parent if root.is_file() else root
            for rel, digest in zip(loaded.paths, loaded.digests):
                source = root / rel
                if not source.is_file():
                    problems.append(f"{file}: source image {source} is gone")
                elif sha256_file(source) != digest:
                    problems.append(f"{file}: source image {source} changed since extraction; rerun extract")
    if target.is_dir():
        stores = list_stores(target)
        for root, _, _ in stores:
            problems += [f"{root}: {p}" for p in verify_store(root)]
        index = FileIndex(target)
        if stores and not index.path.exists():
            problems.append(f"{index.path} is missing: the next extract hashes every image again")
        problems += [f"{index.path}: {p}" for p in index.problems()]
        problems += [f"{target / LISTING_DIR}/{p}" for p in Listings(target).problems()]
    return problems


def cache_remove(targets: list[str], *, cache_dir: str | Path = "cache", everything: bool = False) -> list[str]:
    """Delete exported files, stores (by key prefix or backbone name) or the whole cache; returns what went.

    Raises:
        CacheError: a target matches nothing, so a typo never passes silently.
    """
    cache_dir = Path(cache_dir)
    removed: list[str] = []
    if everything:
        if cache_dir.is_dir():
            shutil.rmtree(cache_dir)
            removed.append(str(cache_dir))
        return removed
    for target in targets:
        matched = False
        path = Path(target)
        if path.suffix == ".h5" and path.is_file():
            path.unlink()
            removed.append(str(path))
            continue
        for export, attrs in list_exports(cache_dir):
            if attrs and attrs.get("backbone") == target:
                export.unlink()
                removed.append(str(export))
                matched = True
        for root, config, _ in list_stores(cache_dir):
            backbone = (config or {}).get("config", {}).get("backbone")
            if root.name.startswith(target) or backbone == target:
                shutil.rmtree(root)
                removed.append(str(root))
                matched = True
        if not matched:
            raise CacheError(f"nothing in {cache_dir} matches {target!r}: see `embedpipe cache ls` for files and keys")
    removed += [f"{n} temporary file(s)"] if (n := remove_tmp_files(cache_dir)) else []
    return removed
