"""The dataset itself: ordered rows held as columns (names, labels, split codes), and the seeded split.

Every source kind (:mod:`.folder`, :mod:`.manifest`, :mod:`.tar`, :mod:`.hf`) ends in a
:class:`Dataset`. Plain image files stay plain: their rows are relative paths and nothing else.
Items that are not files (tar members, table rows, URLs) carry a :class:`~.items.Reader` that
says where each one's bytes come from.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import posixpath
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, overload

import numpy as np

from .._columns import RAW_DIGEST_DTYPE, digest_order
from ..config import SplitConfig
from ..errors import DataError
from .items import ItemColumn, Reader
from .strings import PackedStrings

logger = logging.getLogger(__name__)

PARQUET_SUFFIXES = (".parquet", ".pq")  # a Parquet manifest or table
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

    def take(self, rows: Sequence[int] | np.ndarray) -> PathColumn:
        """The paths at ``rows`` (positions in this column), as a column of their own."""
        relpaths = self.relpaths
        if isinstance(relpaths, PackedStrings):
            return PathColumn(self.base, relpaths.take(rows))
        return PathColumn(self.base, [relpaths[i] for i in np.asarray(rows).tolist()])


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

    A dataset of N images costs its relative paths (packed: their UTF-8 bytes and an int64 offset
    each), N int64 labels and N int8 split codes; :attr:`records` builds one :class:`Record` per
    image only when asked for.
    """

    root: Path | str  # the folder, the manifest file, the shard pattern; a str when it is a URL
    layout: str  # "folder", "split-folder", "manifest", "unlabelled", "tar" or "hf"
    relpaths: PackedStrings  # sorted; relative to :attr:`base`, forward slashes; or item locators (any sequence is packed)
    labels: np.ndarray  # int64 (N,), UNLABELLED when unlabelled
    split_codes: np.ndarray  # int8 (N,): -1 no split, else an index into SPLITS
    class_names: tuple[str, ...] = ()
    split_source: str = "none"  # "given" (folders or manifest), "seeded" or "none"
    split_config: SplitConfig | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    # Where each row's bytes come from when they are not the file base/relpath (tar members,
    # table rows, URLs); None for plain files, whose fast path is a list of paths and stat keys.
    reader: Reader | None = None
    title: str = ""  # the short name, when the root's own name is not it (a shard pattern, a URL)
    # Files found but not taken in, as (path shown with \x escapes, reason): names that are not valid
    # UTF-8, which no export column, index or JSON could store; they go to the error ledger.
    rejected: tuple[tuple[str, str], ...] = ()
    # Plain files' stat keys (size, mtime_ns, ctime_ns, inode; int64 (N, 4)) as they were when listed,
    # so the cache's change test needs no second stat per file; None when not taken (or not files).
    stats: np.ndarray | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.relpaths, PackedStrings):
            object.__setattr__(self, "relpaths", PackedStrings.pack(self.relpaths))

    def __len__(self) -> int:
        return len(self.relpaths)

    @property
    def base(self) -> Path:
        """The folder the relative paths start from: the root folder, or the manifest's folder."""
        return Path(self.root).parent if self.layout == "manifest" else Path(self.root)

    @property
    def paths(self) -> PathColumn | ItemColumn:
        """Each image's path as text (or, for items that are not files, its locator), made when read.

        Plain files give a :class:`PathColumn` (no string or ``Path`` kept per image); other kinds an
        :class:`~.items.ItemColumn` whose ``read(i)`` returns the bytes and ``stat_keys()`` the change keys.
        """
        if self.reader is not None:
            return ItemColumn(self.reader, self.relpaths)
        return PathColumn(str(self.base), self.relpaths)

    @property
    def splits(self) -> list[str | None]:
        """The split of each image (None where there is none)."""
        names = (*SPLITS, None)  # code -1 -> None
        return [names[code] for code in self.split_codes.tolist()]

    @functools.cached_property
    def records(self) -> tuple[Record, ...]:
        if self.reader is not None:
            return tuple(Record(path=Path(name), relpath=relpath, label=label, split=split)
                         for name, relpath, label, split in zip(self.paths, self.relpaths, self.labels.tolist(), self.splits))
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
        if self.title:
            return self.title
        root = Path(self.root) if isinstance(self.root, Path) else Path(posixpath.normpath(self.root.split("://", 1)[-1]))
        if self.layout != "manifest":
            return root.name
        return root.parent.name if root.stem.lower() == "manifest" else root.stem

    def describe(self) -> dict[str, Any]:
        """What is stored with the cache to say which dataset this was."""
        described = {
            "root": str(self.root),
            "layout": self.layout,
            "num_images": len(self),
            "class_names": list(self.class_names),
            "split_source": self.split_source,
            "split_config": self.split_config.to_dict() if self.split_config else None,
        }
        if self.reader is not None:  # plain files' metadata stays what it was
            described["kind"] = self.reader.kind
        return described


NOT_UTF8 = "its name is not valid UTF-8 (shown with \\x escapes): rename it to embed it"


def is_utf8(name: str) -> bool:
    """Whether a name from the file system is valid UTF-8 (Python holds invalid bytes as surrogates)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def shown(name: str) -> str:
    """A file-system name as valid text: bytes that are not UTF-8 shown as ``\\xNN``."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def make_dataset(root: Path | str, layout: str, groups: list[tuple[Sequence[str], int, str | None]], *,
                 stats: np.ndarray | None = None, **kw: Any) -> Dataset:
    """A dataset from groups of relative paths that share a label and a split, sorted by path.

    Each group (a list of ``str`` or a :class:`PackedStrings`) must be sorted already (a folder listing
    is). Columns are built straight from the groups (no tuple per image), and groups that follow
    each other in order are not sorted again. ``stats``, the stat keys taken while listing (a row per
    path, in the groups' order), follow the rows.
    """
    codes = {name: i for i, name in enumerate(SPLITS)}
    rejected = [*kw.pop("rejected", ())]
    counts = [len(paths) for paths, _, _ in groups]
    labels = np.repeat(np.array([label for _, label, _ in groups], dtype=np.int64), counts)
    split_codes = np.repeat(np.array([codes.get(split, -1) for _, _, split in groups], dtype=np.int8), counts)
    packed = [PackedStrings.pack(paths) for paths, _, _ in groups]
    relpaths = PackedStrings.concat(packed)
    if not all(group.is_utf8() for group in packed):  # one check per group, not per path
        every = relpaths.tolist()
        keep = np.array([is_utf8(relpath) for relpath in every], dtype=bool)
        rejected += [(shown(relpath), NOT_UTF8) for relpath, kept in zip(every, keep.tolist()) if not kept]
        relpaths = PackedStrings.pack([relpath for relpath, kept in zip(every, keep.tolist()) if kept])
        labels, split_codes = labels[keep], split_codes[keep]
        stats = stats[keep] if stats is not None else None
    del packed
    if rejected:
        kw["rejected"] = tuple(sorted(rejected))
    # Each group is sorted (a folder listing is): the rows are in order when the groups' ends are.
    ends = [(paths[0], paths[-1]) for paths, _, _ in groups if len(paths)]
    if any(a[1] > b[0] for a, b in zip(ends, ends[1:])):
        every = relpaths.tolist()
        order = np.array(sorted(range(len(every)), key=every.__getitem__), dtype=np.int64)
        relpaths = relpaths.take(order)
        labels, split_codes = labels[order], split_codes[order]
        stats = stats[order] if stats is not None else None
    return Dataset(root=root, layout=layout, relpaths=relpaths, labels=labels, split_codes=split_codes, stats=stats, **kw)


_RANK_ROWS = 65536  # paths hashed into one bytes object at a time (2 MiB of digests)


def stratified_split(relpaths: Sequence[str], labels: np.ndarray, config: SplitConfig) -> np.ndarray:
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
    # Each row's rank as its raw sha256, ordered by digest_order (numpy compares them byte by byte as
    # sorted() compares the digests: 10x faster than a Python sort with a key function at 100k rows).
    ranks = np.empty(len(relpaths), dtype=RAW_DIGEST_DTYPE)
    prefix, sha256 = f"{config.seed}:".encode(), hashlib.sha256
    for start in range(0, len(relpaths), _RANK_ROWS):  # sha256 of "seed:relpath", joined a block at a time (2x a row at a time)
        part = relpaths[start : start + _RANK_ROWS]
        hashed = b"".join([sha256(prefix + relpath.encode()).digest() for relpath in part])
        ranks[start : start + len(part)] = np.frombuffer(hashed, dtype=RAW_DIGEST_DTYPE)
    labels = np.asarray(labels)
    codes = np.zeros(len(relpaths), dtype=np.int8)  # train
    train, val, test = (SPLITS.index(name) for name in ("train", "val", "test"))
    for label in np.unique(labels).tolist():
        rows = np.flatnonzero(labels == label)
        members = rows[digest_order(ranks[rows])[0]]
        n = len(members)
        n_test = min(round(n * config.test_fraction), n - 1)
        n_val = min(round(n * config.val_fraction), n - 1 - n_test)
        codes[members[:n_test]] = test
        codes[members[n_test : n_test + n_val]] = val
        codes[members[n_test + n_val :]] = train
    return codes


def label_codes(values: Sequence[object], where: str) -> tuple[np.ndarray, tuple[str, ...]]:
    """Per-row labels as int64 codes and the class names, from labels read out of a source.

    Integer labels keep their numbers (class ``k`` is named ``"k"``, names run 0..max) so a head
    predicts the dataset's own class ids; text labels are numbered in sorted order, as a CSV
    manifest's are. All None: unlabelled.

    Raises:
        DataError: some rows have a label and others not, labels mix numbers and text, or a number is negative.
    """
    given = [v for v in values if v is not None]
    if not given:
        return np.full(len(values), UNLABELLED, dtype=np.int64), ()
    if len(given) < len(values):
        row = next(i for i, v in enumerate(values) if v is None)
        raise DataError(f"{where}: row {row} has no label but others do: label every image, or none")
    if all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in given):
        labels = np.asarray(given, dtype=np.int64)
        if labels.min() < 0:
            raise DataError(f"{where}: label {int(labels.min())} is negative: class numbers start at 0")
        return labels, tuple(str(k) for k in range(int(labels.max()) + 1))
    if not all(isinstance(v, str) for v in given):
        raise DataError(f"{where}: labels mix numbers and text: use one or the other")
    class_names = tuple(sorted(set(given)))
    index = {name: i for i, name in enumerate(class_names)}
    return np.fromiter((index[v] for v in given), dtype=np.int64, count=len(given)), class_names
