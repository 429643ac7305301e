"""Hugging Face datasets written by ``Dataset.save_to_disk`` (a ``Dataset``, or a ``DatasetDict`` of splits).

The listing goes through ``datasets.load_from_disk`` (the ``datasets`` extra); the images are read
straight from the saved Arrow files (:class:`~.table.TableReader`), memory-mapped. The image column
is ``image`` (or the first ``Image`` feature), the label ``label`` (or the first ``ClassLabel``),
whose names become the class names. A ``DatasetDict``'s splits become the split column
(``validation``/``valid``/``dev`` are ``val``); other split names are refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataError
from .records import SPLITS, Dataset, label_codes

DATASETS_EXTRA = 'pip install -c constraints.txt "embedpipe[datasets]"'
MARKERS = ("dataset_dict.json", "state.json")  # what save_to_disk writes at the top of its folder
_SPLIT_NAMES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val", "dev": "val",
                "test": "test", "testing": "test"}


def is_saved_dataset(folder: Path) -> bool:
    return any((folder / marker).is_file() for marker in MARKERS)


def load_hf(root: Path) -> Dataset:
    """A folder written by ``save_to_disk``.

    Raises:
        DataError: ``datasets`` is not installed; no image column; an unknown split name; rows not in their Arrow files.
    """
    from .table import TableReader, arrow_rows  # Arrow, only once a saved dataset is read

    try:
        import datasets
    except ImportError:
        raise DataError(f"{root} is a saved Hugging Face dataset; reading it needs the datasets package: {DATASETS_EXTRA}") from None
    try:
        loaded = datasets.load_from_disk(str(root))
    except (OSError, ValueError) as error:
        raise DataError(f"{root} is not a readable saved dataset ({error}): write it again with save_to_disk") from None
    parts = sorted(loaded.items()) if isinstance(loaded, datasets.DatasetDict) else [(None, loaded)]
    files: list[str] = []
    starts = [0]
    relpaths: list[str] = []
    labels: list[Any] = []
    splits: list[int] = []
    class_names: tuple[str, ...] | None = None
    image_column = None
    for split_name, part in parts:
        split = _split(root, split_name)
        image_column = image_column or _column(part, datasets.Image, "image") or _refuse(root, part)
        label_column = _column(part, datasets.ClassLabel, "label")
        names = [entry["filename"] for entry in part.cache_files]
        counts = [arrow_rows(name) for name in names]
        if sum(counts) != part.num_rows:
            raise DataError(f"{root}: the split {split_name or 'dataset'} has {part.num_rows} rows but its Arrow files "
                            f"{sum(counts)}: save a flattened copy (save_to_disk after flatten_indices)")
        files += names
        starts += list(np.cumsum(counts) + starts[-1])
        width = len(str(max(part.num_rows - 1, 0)))
        prefix = f"{split_name}/" if split_name is not None else ""
        relpaths += [f"{prefix}row:{i:0{width}d}" for i in range(part.num_rows)]
        splits += [SPLITS.index(split) if split else -1] * part.num_rows
        if label_column is None:
            labels += [None] * part.num_rows
            continue
        feature = part.features[label_column]
        if isinstance(feature, datasets.ClassLabel):
            class_names = class_names or tuple(feature.names)
        labels += part.data.table.column(label_column).to_pylist()
    codes, found_names = label_codes(labels, str(root))
    reader = TableReader(files, np.asarray(starts, dtype=np.int64), image_column, arrow=True, prefix=str(root))
    return Dataset(root=root, layout="hf", relpaths=tuple(relpaths), labels=codes, split_codes=np.asarray(splits, dtype=np.int8),
                   class_names=class_names or found_names, split_source="given" if parts[0][0] is not None else "none",
                   reader=reader)


def _split(root: Path, name: str | None) -> str | None:
    if name is None:
        return None
    if name.lower() not in _SPLIT_NAMES:
        raise DataError(f"{root} has a split {name!r}: name its splits train, validation (or val) and test")
    return _SPLIT_NAMES[name.lower()]


def _column(part: Any, kind: type, preferred: str) -> str | None:
    if preferred in part.features and (kind.__name__ != "ClassLabel" or preferred == "label"):
        return preferred
    return next((name for name, feature in part.features.items() if isinstance(feature, kind)), None)


def _refuse(root: Path, part: Any) -> str:
    raise DataError(f"{root} has no image column (columns: {', '.join(part.features)}): "
                    "cast the images to datasets.Image() in a column named image")
