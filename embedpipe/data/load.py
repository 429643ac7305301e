"""One entry point for every source kind: :func:`load_dataset` looks at the source and picks the reader."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import numpy as np

from ..config import SplitConfig
from ..errors import DataError
from .folder import load_folder
from .hf import is_saved_dataset
from .records import IMAGE_EXTENSIONS, PARQUET_SUFFIXES, Dataset, stratified_split
from .remote import is_url, local_path

# Each reader other than the folder's is imported when its kind is read: a cache hit on a folder
# (the command's whole cost a stat per file) does not pay for tarfile, csv or Arrow.

logger = logging.getLogger(__name__)

KINDS = "a folder of images, a CSV or Parquet manifest, .tar shards or a saved Hugging Face dataset"


def load_dataset(source: str | Path, *, split: SplitConfig | None = None,
                 storage_options: dict[str, Any] | None = None, seed_split: bool = True) -> Dataset:
    """Read a folder tree, a manifest, tar shards or a saved Hugging Face dataset, local or behind a URL.

    Args:
        source: a folder; a ``.csv`` or ``.parquet`` manifest; a ``.tar`` shard, a glob or a brace
            pattern of them; a folder written by ``save_to_disk``; or any of these files as a
            ``file://``, ``http(s)://`` or ``s3://`` URL.
        split: how to split labelled images that come without a split; the
            default :class:`SplitConfig` when None. Unlabelled data is not split.
        storage_options: passed to fsspec for URLs (e.g. ``{"endpoint_url": "http://localhost:9000"}`` for S3).
        seed_split: make the seeded split here; False leaves it to :func:`with_seeded_split`
            (the extract stage reuses the last run's split when the rows are the same).

    Raises:
        DataError: the source is missing, empty or malformed.
    """
    text = str(source)
    if is_url(text) and local_path(text) is None:
        dataset = _load_remote(text, storage_options)
        shown: str | Path = text
    else:
        path = Path(local_path(text) or source).expanduser()
        dataset = _load_local(path, storage_options)
        shown = dataset.root
    if not len(dataset):
        raise DataError(
            f"no images found in {shown} (looked for {', '.join(sorted(IMAGE_EXTENSIONS))}): "
            "check the path, or the layout described in the README"
        )
    logger.info("%s: %d images, %d classes, layout %s", shown, len(dataset), len(dataset.class_names), dataset.layout)
    return with_seeded_split(dataset, split) if seed_split else dataset


def needs_seeded_split(dataset: Dataset) -> bool:
    """Labelled images that came without a split are split from a seed."""
    return dataset.labelled and not dataset.has_split


def with_seeded_split(dataset: Dataset, split: SplitConfig | None, *, known: np.ndarray | None = None) -> Dataset:
    """The dataset with its seeded split (see :func:`stratified_split`), when it needs one.

    Args:
        known: the split codes already made for these same rows, labels and ``split`` (a cache
            listing's), used instead of hashing every path again.
    """
    if not needs_seeded_split(dataset):
        return dataset
    split = split or SplitConfig()
    codes = known if known is not None else stratified_split(dataset.relpaths, dataset.labels, split)
    return dataclasses.replace(dataset, split_codes=codes, split_source="seeded", split_config=split)


def _load_local(source: Path, storage_options: dict[str, Any] | None) -> Dataset:
    if not source.exists():
        from .tar import is_shard_source, load_tar

        if is_shard_source(str(source)):
            return load_tar(str(source.absolute()), storage_options=storage_options)
        raise DataError(f"{source} does not exist: pass {KINDS}")
    source = source.resolve()
    if source.is_file():
        suffix = source.suffix.lower()
        if suffix == ".csv":
            from .manifest import load_csv

            return load_csv(source)
        if suffix in PARQUET_SUFFIXES:
            from .manifest import load_parquet

            return load_parquet(source)
        if suffix == ".tar":
            from .tar import load_tar

            return load_tar(str(source))
        raise DataError(f"{source} is a file but not a .csv manifest, a Parquet manifest or a .tar shard: pass {KINDS}")
    if is_saved_dataset(source):
        from .hf import load_hf

        return load_hf(source)
    return load_folder(source)


def _load_remote(url: str, storage_options: dict[str, Any] | None) -> Dataset:
    from .manifest import load_csv, load_parquet
    from .tar import is_shard_source, load_tar

    lowered = url.lower().split("?", 1)[0]
    if lowered.endswith(".csv"):
        return load_csv(url, storage_options=storage_options)
    if lowered.endswith(PARQUET_SUFFIXES):
        return load_parquet(url, storage_options=storage_options)
    if is_shard_source(lowered):
        return load_tar(url, storage_options=storage_options)
    raise DataError(f"{url}: a URL source must be a .csv or .parquet manifest, or .tar shards (a shard, a glob or a "
                    "brace pattern); copy folders and saved datasets to local disk first")
