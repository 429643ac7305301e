"""Exported files: one dataset's rows in its order, with the metadata that describes them.

An export is rebuilt from the store at will and written like a shard (temporary file, fsync,
rename). Its metadata is an :class:`ExportMeta`, written here as HDF5 attributes (JSON where
structured) and read back by :func:`read_export`; a file of another ``format_version`` is refused.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from .._atomic import fsync_dir, temporary_name
from ..config import CACHE_FORMAT, EmbeddingConfig, canonical_json
from ..errors import CacheError
from ..machine import versions
from .layout import CHUNK_ROWS, DIGEST_DTYPE, FILE_KIND, STR_DTYPE, dataset_name_for, decode_attr
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


@dataclass
class ExportRequest:
    """What goes into one exported file: a dataset's rows in its order, plus its description."""

    paths: list[str]  # relative paths, in dataset order
    labels: np.ndarray  # int64, -1 when unlabelled
    split: list[str] | None
    digests: np.ndarray  # S64 (N,): each image's content digest
    meta: ExportMeta


def export_name(dataset_name: str, backbone: str, fingerprint: str) -> str:
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in dataset_name) or "dataset"
    return f"{safe}-{backbone}-{fingerprint[:12]}.h5"


def write_export(path: Path, store: Store, index: StoreIndex, request: ExportRequest) -> None:
    """Write the exported file atomically, streaming rows chunk by chunk.

    Images whose decoding failed are left out of the arrays and listed under
    ``errors/``, so every row stays aligned with its path.
    """
    digests = np.asarray(request.digests, dtype=DIGEST_DTYPE)
    stored = index.has_rows(digests)
    ok, failed = np.flatnonzero(stored), np.flatnonzero(~stored)
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
                    chunk = ok[start : start + CHUNK_ROWS]
                    out[start : start + len(chunk)] = store.read_rows(index, digests[chunk], output, files=shard_files)
            f.create_dataset("labels", data=np.asarray(request.labels)[ok].astype(np.int64))
            f.create_dataset("paths", data=[request.paths[i] for i in ok.tolist()], dtype=STR_DTYPE)
            f.create_dataset("digests", data=digests[ok])
            if request.split is not None:
                f.create_dataset("split", data=[request.split[i] for i in ok.tolist()], dtype=STR_DTYPE)
            errors = f.create_group("errors")
            errors.create_dataset("paths", data=[request.paths[i] for i in failed.tolist()], dtype=STR_DTYPE)
            errors.create_dataset(
                "reasons", data=[index.errors.get(digests[i], "not computed") for i in failed.tolist()], dtype=STR_DTYPE
            )
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
            attrs = {k: decode_attr(v) for k, v in f.attrs.items()}
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


def verify_export(path: str | Path) -> list[str]:
    """Problems found in an exported file, reading every byte (checksums included); empty when sound."""
    path = Path(path)
    problems: list[str] = []
    try:
        with h5py.File(path, "r") as f:
            attrs = {k: decode_attr(v) for k, v in f.attrs.items()}
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


