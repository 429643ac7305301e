"""Image sources -> an ordered dataset, held as columns (relative paths, labels, split codes).

Three layouts are understood:

* a folder tree with one sub-folder per class (ImageFolder), optionally with
  ``train/``, ``val/`` and ``test/`` folders on top;
* a CSV manifest with columns ``path,label[,split]``, paths relative to it;
* a plain folder of unlabelled images.

Records are sorted by path so the order never depends on the file system.
When labelled images come with no split, a deterministic stratified split is
made from a seed (see :func:`stratified_split`).
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import hashlib
import logging
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Sequence
from typing import Any, overload

import numpy as np

from .config import SplitConfig
from .errors import DataError

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
SPLITS = ("train", "val", "test")
UNLABELLED = -1


class PathColumn(Sequence[str]):
    """A read-only sequence of absolute paths, ``base/relpath``, each built when it is read."""

    __slots__ = ("base", "relpaths")

    def __init__(self, base: str, relpaths: Sequence[str]) -> None:
        self.base, self.relpaths = base, relpaths

    def __len__(self) -> int:
        return len(self.relpaths)

    @overload
    def __getitem__(self, index: int) -> str: ...

    @overload
    def __getitem__(self, index: slice) -> list[str]: ...

    def __getitem__(self, index: int | slice) -> str | list[str]:
        if isinstance(index, slice):
            return [f"{self.base}/{relpath}" for relpath in self.relpaths[index]]
        return f"{self.base}/{self.relpaths[index]}"


@dataclass(frozen=True, slots=True)
class Record:
    """One image of a dataset (a view of one row of :class:`Dataset`'s columns)."""

    path: Path  # absolute
    relpath: str  # relative to the dataset root, with forward slashes; what is stored
    label: int = UNLABELLED
    split: str | None = None


@dataclass(frozen=True)
class Dataset:
    """An ordered list of images with their labels and splits, held as columns.

    A dataset of N images costs its relative paths (one ``str`` each), N int64 labels and N int8
    split codes; :attr:`records` builds one :class:`Record` per image only when asked for.
    """

    root: Path  # the folder, or the manifest file
    layout: str  # "folder", "split-folder", "manifest" or "unlabelled"
    relpaths: tuple[str, ...]  # sorted; relative to :attr:`base`, forward slashes
    labels: np.ndarray  # int64 (N,), UNLABELLED when unlabelled
    split_codes: np.ndarray  # int8 (N,): -1 no split, else an index into SPLITS
    class_names: tuple[str, ...] = ()
    split_source: str = "none"  # "given" (folders or manifest), "seeded" or "none"
    split_config: SplitConfig | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.relpaths)

    @property
    def base(self) -> Path:
        """The folder the relative paths start from: the root folder, or the manifest's folder."""
        return self.root.parent if self.layout == "manifest" else self.root

    @property
    def paths(self) -> PathColumn:
        """Absolute path of each image, as text, made when read (no string or ``Path`` kept per image)."""
        return PathColumn(str(self.base), self.relpaths)

    @property
    def splits(self) -> list[str | None]:
        """The split of each image (None where there is none)."""
        names = (*SPLITS, None)  # code -1 -> None
        return [names[code] for code in self.split_codes.tolist()]

    @functools.cached_property
    def records(self) -> tuple[Record, ...]:
        base = self.base
        return tuple(Record(path=base / relpath, relpath=relpath, label=label, split=split)
                     for relpath, label, split in zip(self.relpaths, self.labels.tolist(), self.splits))

    @property
    def labelled(self) -> bool:
        return bool(self.class_names)

    @property
    def has_split(self) -> bool:
        return bool((self.split_codes >= 0).any())

    @property
    def name(self) -> str:
        """Short name for file names: the folder, or the manifest (its folder when it is called manifest.csv)."""
        if self.layout != "manifest":
            return self.root.name
        return self.root.parent.name if self.root.stem.lower() == "manifest" else self.root.stem

    def describe(self) -> dict[str, Any]:
        """What is stored with the cache to say which dataset this was."""
        return {
            "root": str(self.root),
            "layout": self.layout,
            "num_images": len(self),
            "class_names": list(self.class_names),
            "split_source": self.split_source,
            "split_config": self.split_config.to_dict() if self.split_config else None,
        }


def _dataset(root: Path, layout: str, groups: list[tuple[list[str], int, str | None]], **kw: Any) -> Dataset:
    """A dataset from groups of relative paths that share a label and a split, sorted by path.

    Columns are built straight from the groups (no tuple per image), and a listing that is already
    in order, as a folder tree's usually is, is not sorted again.
    """
    codes = {name: i for i, name in enumerate(SPLITS)}
    relpaths = [relpath for paths, _, _ in groups for relpath in paths]
    counts = [len(paths) for paths, _, _ in groups]
    labels = np.repeat(np.array([label for _, label, _ in groups], dtype=np.int64), counts)
    split_codes = np.repeat(np.array([codes.get(split, -1) for _, _, split in groups], dtype=np.int8), counts)
    if any(a > b for a, b in zip(relpaths, relpaths[1:])):
        order = np.array(sorted(range(len(relpaths)), key=relpaths.__getitem__), dtype=np.int64)
        relpaths = [relpaths[i] for i in order.tolist()]
        labels, split_codes = labels[order], split_codes[order]
    return Dataset(root=root, layout=layout, relpaths=tuple(relpaths), labels=labels, split_codes=split_codes, **kw)


def _is_image(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS and not name.startswith(".")


def _visible_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _images_under(folder: str, prefix: str = "") -> list[str]:
    """Relative paths (``prefix`` + forward-slash path) of the image files below ``folder``, recursively.

    ``os.scandir`` and plain strings, no ``Path`` per file: listing 100k files this way costs about
    what ``find`` does. Hidden entries are skipped; symlinked folders are followed.
    """
    found: list[str] = []
    pending = [(folder, prefix)]
    while pending:
        directory, rel = pending.pop()
        try:
            entries = list(os.scandir(directory))
        except OSError as error:
            raise DataError(f"cannot list {directory} ({error.strerror}): check it exists and is readable") from None
        for entry in entries:
            name = entry.name
            if name.startswith("."):
                continue
            if entry.is_dir():
                pending.append((entry.path, f"{rel}{name}/"))
            elif _is_image(name):
                found.append(rel + name)
    found.sort()
    return found


def load_dataset(source: str | Path, *, split: SplitConfig | None = None) -> Dataset:
    """Read a folder tree, CSV manifest or plain folder of images.

    Args:
        source: a folder, or a ``.csv`` manifest.
        split: how to split labelled images that come without a split; the
            default :class:`SplitConfig` when None. Unlabelled data is not split.

    Raises:
        DataError: the source is missing, empty or malformed.
    """
    source = Path(source).expanduser()
    if not source.exists():
        raise DataError(f"{source} does not exist: pass a folder of images or a CSV manifest")
    source = source.resolve()
    if source.is_file():
        if source.suffix.lower() != ".csv":
            raise DataError(f"{source} is a file but not a .csv manifest: pass a folder of images or a CSV manifest")
        dataset = _load_manifest(source)
    else:
        dataset = _load_folder(source)
    if not len(dataset):
        raise DataError(
            f"no images found in {source} (looked for {', '.join(sorted(IMAGE_EXTENSIONS))}): "
            "check the path, or the layout described in the README"
        )
    if dataset.labelled and not dataset.has_split:
        split = split or SplitConfig()
        dataset = dataclasses.replace(dataset, split_codes=stratified_split(dataset.relpaths, dataset.labels, split),
                                      split_source="seeded", split_config=split)
    logger.info("%s: %d images, %d classes, layout %s", source, len(dataset), len(dataset.class_names), dataset.layout)
    return dataset


def _load_folder(root: Path) -> Dataset:
    subdirs = _visible_dirs(root)
    split_dirs = [d for d in subdirs if d.name.lower() in SPLITS]
    loose = sorted(p for p in root.iterdir() if p.is_file() and _is_image(p.name))
    if split_dirs:
        others = [d.name for d in subdirs if d.name.lower() not in SPLITS]
        if others:
            raise DataError(
                f"{root} mixes split folders ({', '.join(d.name for d in split_dirs)}) with other folders "
                f"({', '.join(others[:3])}): put every class folder inside train/, val/ or test/"
            )
        if loose:
            raise DataError(
                f"{root} holds {len(loose)} loose images (e.g. {loose[0].name}) beside its split folders: "
                "move them into a class folder inside train/, val/ or test/"
            )
        return _load_split_folders(root, split_dirs)
    per_class = {d.name: _images_under(str(d), f"{d.name}/") for d in subdirs}
    class_names = tuple(name for name, images in per_class.items() if images)
    if class_names:
        if loose:
            raise DataError(
                f"{root} holds both class folders and {len(loose)} loose images (e.g. {loose[0].name}): "
                "move the loose images into a class folder, or point at a folder of only unlabelled images"
            )
        groups = [(per_class[name], label, None) for label, name in enumerate(class_names)]
        return _dataset(root, "folder", groups, class_names=class_names)
    return _dataset(root, "unlabelled", [(_images_under(str(root)), UNLABELLED, None)])


def _load_split_folders(root: Path, split_dirs: list[Path]) -> Dataset:
    found: dict[tuple[str, str], list[str]] = {}
    for split_dir in split_dirs:
        loose = [p for p in split_dir.iterdir() if p.is_file() and _is_image(p.name)]
        if loose:
            raise DataError(
                f"{split_dir} holds images outside class folders (e.g. {loose[0].name}): "
                "put them in a sub-folder named after their class"
            )
        for class_dir in _visible_dirs(split_dir):
            found[split_dir.name, class_dir.name] = _images_under(str(class_dir), f"{split_dir.name}/{class_dir.name}/")
    class_names = tuple(sorted({name for (_, name), images in found.items() if images}))
    index = {name: label for label, name in enumerate(class_names)}
    groups = [(images, index[name], split_name.lower()) for (split_name, name), images in found.items() if images]
    return _dataset(root, "split-folder", groups, class_names=class_names, split_source="given")


def _load_manifest(manifest: Path) -> Dataset:
    root = manifest.parent
    try:
        with manifest.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            columns = [c.strip().lower() for c in (reader.fieldnames or [])]
            rows = []
            for row in reader:
                if None in row:  # DictReader files surplus fields under the key None, as a list
                    raise DataError(
                        f"{manifest}:{reader.line_num}: more fields than the header names: "
                        "quote paths or labels that contain commas"
                    )
                rows.append({(k or "").strip().lower(): (v or "").strip() for k, v in row.items()})
    except (UnicodeDecodeError, csv.Error) as error:
        raise DataError(f"{manifest} is not a readable CSV file ({error}): save it as UTF-8 CSV with a header row") from None
    if "path" not in columns:
        raise DataError(
            f"{manifest} has no 'path' column (columns: {', '.join(columns) or 'none'}): "
            "the header must be path,label[,split]"
        )
    has_labels = "label" in columns
    has_split = "split" in columns
    records: list[tuple[Path, str, str | None, str | None]] = []
    missing: list[str] = []
    for line, row in enumerate(rows, start=2):
        raw = row.get("path", "")
        if not raw:
            raise DataError(f"{manifest}:{line}: empty path: fill it in or delete the row")
        path = (root / raw).resolve()
        if not path.is_relative_to(root):
            raise DataError(
                f"{manifest}:{line}: path {raw!r} escapes the manifest's folder {root}: "
                "keep images inside it and use paths relative to the manifest"
            )
        if not path.is_file():
            missing.append(f"{raw} (line {line})")
            continue
        label = row.get("label") if has_labels else None
        if has_labels and not label:
            raise DataError(f"{manifest}:{line}: empty label: fill it in, or drop the label column for unlabelled data")
        split = row.get("split", "").lower() if has_split else None
        if has_split and split not in SPLITS:
            raise DataError(f"{manifest}:{line}: split {row.get('split')!r} is not one of {', '.join(SPLITS)}")
        records.append((path, path.relative_to(root).as_posix(), label, split))
    if missing:
        raise DataError(
            f"{manifest}: {len(missing)} listed file(s) do not exist, e.g. {missing[0]}: fix the paths (relative to the manifest) or remove those rows"
        )
    seen: dict[str, int] = {}
    for _, relpath, _, _ in records:
        seen[relpath] = seen.get(relpath, 0) + 1
    duplicates = [p for p, n in seen.items() if n > 1]
    if duplicates:
        raise DataError(f"{manifest}: {duplicates[0]} is listed {seen[duplicates[0]]} times: list each image once")
    class_names = tuple(sorted({label for _, _, label, _ in records if label is not None}))
    index = {name: i for i, name in enumerate(class_names)}
    groups = [([relpath], index[label] if label is not None else UNLABELLED, split) for _, relpath, label, split in records]
    return _dataset(manifest, "manifest", groups, class_names=class_names, split_source="given" if has_split else "none")


def _rank(seed: int, relpath: str) -> bytes:
    return hashlib.sha256(f"{seed}:{relpath}".encode()).digest()


def stratified_split(relpaths: tuple[str, ...], labels: np.ndarray, config: SplitConfig) -> np.ndarray:
    """Assign train/val/test per class, deterministically from ``config.seed``; int8 codes into SPLITS.

    Within each class, images are ordered by a hash of (seed, relative path) and
    the first ``round(n * test_fraction)`` go to test, the next
    ``round(n * val_fraction)`` to val, the rest to train. Hashing rather than
    shuffling keeps an image's split stable when other images are added.
    A class too small to spare an image keeps it in train.
    """
    if not 0 <= config.val_fraction < 1 or not 0 <= config.test_fraction < 1:
        raise DataError("val and test fractions must be in [0, 1): pass e.g. --val-fraction 0.1 --test-fraction 0.2")
    if config.val_fraction + config.test_fraction >= 1:
        raise DataError("val + test fractions leave no training images: make them sum to less than 1")
    by_class: dict[int, list[int]] = defaultdict(list)
    for row, label in enumerate(labels.tolist()):
        by_class[label].append(row)
    codes = np.zeros(len(relpaths), dtype=np.int8)  # train
    train, val, test = (SPLITS.index(name) for name in ("train", "val", "test"))
    for members in by_class.values():
        members.sort(key=lambda row: _rank(config.seed, relpaths[row]))
        n = len(members)
        n_test = min(round(n * config.test_fraction), n - 1)
        n_val = min(round(n * config.val_fraction), n - 1 - n_test)
        codes[members[:n_test]] = test
        codes[members[n_test : n_test + n_val]] = val
        codes[members[n_test + n_val :]] = train
    return codes
