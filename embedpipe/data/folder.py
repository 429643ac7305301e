"""Folder trees: one sub-folder per class (ImageFolder), optionally under train/ val/ test/, or a folder of unlabelled images."""

from __future__ import annotations

import bisect
import logging
import os
import stat
from pathlib import Path

import numpy as np

from ..errors import DataError
from .filestat import MISSING, stat_many
from .records import IMAGE_EXTENSIONS, SPLITS, UNLABELLED, Dataset, is_utf8, make_dataset
from .strings import PackedStrings

logger = logging.getLogger(__name__)


_SUFFIXES = tuple(IMAGE_EXTENSIONS)
# A folder opened once and its files stat'ed by name relative to it (fstatat) resolve one path
# component each, not the whole path again.
_BY_FOLDER = os.stat in os.supports_dir_fd and os.listdir in os.supports_fd


def image_flags(names: list[str]) -> list[bool]:
    """Which names are image files (an image suffix, not hidden); one comprehension, no call per name."""
    return [name.lower().endswith(_SUFFIXES) and name[:1] != "." for name in names]


def is_image(name: str) -> bool:
    return image_flags([name])[0]


def visible_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


class Listing:
    """The image files below some folders, with the stat key of each taken as it is listed.

    One ``stat`` per entry (:func:`~.filestat.stat_many`) tells folders from files and gives a file's
    stat key, so listing costs no more than the stat'ing the cache's change test needs anyway (what
    ``find -printf`` does): a 100k-file cache hit lists and stats in about the time ``os.walk`` +
    ``os.stat`` take. Keys are kept as int64 blocks, so a million files hold no Python int each.
    """

    def __init__(self) -> None:
        self._names: list[PackedStrings] = []  # the relative paths of the current add, a block per run of files
        self._blocks: list[np.ndarray] = []
        self._seen: set[tuple[int, int]] = set()  # (device, inode) of each folder listed: a symlink loop is listed once

    def add(self, folder: str, prefix: str = "") -> PackedStrings:
        """Lists the images below ``folder`` (relative paths ``prefix`` + forward-slash path, sorted); returns them.

        Packed a folder at a time, so no ``str`` per path outlives its folder's listing (a million
        paths as ``str`` are about 80 MB; packed, 31 MB). Hidden entries are skipped; symlinked
        folders are followed.

        Raises:
            DataError: a folder cannot be listed or a file in it cannot be stat'ed, named in the message.
        """
        self._names = []
        self._scan(folder, prefix)
        added, self._names = PackedStrings.concat(self._names), []
        return added

    def stats(self) -> np.ndarray:
        """The stat key of every file listed, int64 ``(N, 4)``: size, mtime_ns, ctime_ns, inode (as :func:`~embedpipe.cache.index.stat_files`)."""
        return np.concatenate(self._blocks) if self._blocks else np.empty((0, 4), dtype=np.int64)

    def _scan(self, directory: str, rel: str) -> None:
        try:
            handle: int | str = os.open(directory, os.O_RDONLY | os.O_DIRECTORY) if _BY_FOLDER else directory
        except OSError as error:
            raise DataError(f"cannot list {directory} ({error.strerror}): check it exists and is readable") from None
        try:
            st = os.stat(handle)
            if (st.st_dev, st.st_ino) in self._seen:
                logger.warning("%s was already listed (a symlink loop, or two links to one folder): skipped", directory)
                return
            self._seen.add((st.st_dev, st.st_ino))
            try:
                names = sorted(os.listdir(handle))
            except OSError as error:
                raise DataError(f"cannot list {directory} ({error.strerror}): check it exists and is readable") from None
            del names[bisect.bisect_left(names, ".") : bisect.bisect_left(names, "/")]  # hidden: sorted together, "." < "/"
            stats = stat_many(names, dir_fd=handle) if _BY_FOLDER else stat_many([f"{directory}/{name}" for name in names])
            missing = stats[:, 0] == MISSING
            if missing.any():  # vanished since listed, unreadable, a broken symlink: an error for an image, else not ours
                if bad := [name for name, gone in zip(names, missing.tolist()) if gone and is_image(name)]:
                    raise DataError(f"cannot read {directory}/{bad[0]}: check it exists and is readable (a broken symlink?)")
                names = [name for name, gone in zip(names, missing.tolist()) if not gone]
                stats = stats[~missing]
            is_dir = (stats[:, 0] & 0o170000) == stat.S_IFDIR  # the file-type bits (S_IFMT) of each mode
            if not is_dir.any():  # a folder of files, the usual leaf: no Python work per file beyond its name
                self._add_files(names, stats, rel)
                return
            # Sorted with "/" after a folder's name, then listed depth first: the paths come in the order a
            # sort of the whole relative paths gives ("a-b.png" before "a/x.png"), with no sort of them all.
            keyed = sorted((f"{name}/" if folder else name, row) for row, (name, folder) in enumerate(zip(names, is_dir.tolist())))
            run: list[int] = []  # files between two folders, added together
            for key, row in keyed:
                if key[-1] == "/":
                    self._add_files([names[i] for i in run], stats[run], rel)
                    run = []
                    self._scan(f"{directory}/{names[row]}", rel + key)
                else:
                    run.append(row)
            self._add_files([names[i] for i in run], stats[run], rel)
        finally:
            if _BY_FOLDER:
                os.close(handle)  # type: ignore[arg-type]

    def _add_files(self, names: list[str], stats: np.ndarray, rel: str) -> None:
        images = image_flags(names)  # not is_image per name: a call per file is a tenth of a cache hit's listing
        if all(images):
            self._names.append(PackedStrings.pack(names, prefix=rel))
            self._blocks.append(stats[:, 1:])
        elif any(images):
            self._names.append(PackedStrings.pack([name for name, image in zip(names, images) if image], prefix=rel))
            self._blocks.append(stats[np.asarray(images, dtype=bool), 1:])


def load_folder(root: Path) -> Dataset:
    subdirs = visible_dirs(root)
    split_dirs = [d for d in subdirs if d.name.lower() in SPLITS]
    loose = sorted(p for p in root.iterdir() if p.is_file() and is_image(p.name))
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
        return load_split_folders(root, split_dirs)
    listing = Listing()
    per_class = {d.name: listing.add(str(d), f"{d.name}/") for d in subdirs}
    class_names = tuple(name for name, images in per_class.items() if images and is_utf8(name))
    if class_names:
        if loose:
            raise DataError(
                f"{root} holds both class folders and {len(loose)} loose images (e.g. {loose[0].name}): "
                "move the loose images into a class folder, or point at a folder of only unlabelled images"
            )
        # Groups in the order listed, so the stat keys stay row-aligned (make_dataset sorts both when needed).
        # A class whose folder name is not UTF-8 cannot be named in the export: its images are rejected (ledgered).
        labels = {name: label for label, name in enumerate(class_names)}
        groups = [(images, labels.get(name, UNLABELLED), None) for name, images in per_class.items()]
        return make_dataset(root, "folder", groups, class_names=class_names, stats=listing.stats())
    listing = Listing()
    return make_dataset(root, "unlabelled", [(listing.add(str(root)), UNLABELLED, None)], stats=listing.stats())


def load_split_folders(root: Path, split_dirs: list[Path]) -> Dataset:
    found: dict[tuple[str, str], PackedStrings] = {}
    listing = Listing()
    for split_dir in split_dirs:
        loose = [p for p in split_dir.iterdir() if p.is_file() and is_image(p.name)]
        if loose:
            raise DataError(
                f"{split_dir} holds images outside class folders (e.g. {loose[0].name}): "
                "put them in a sub-folder named after their class"
            )
        for class_dir in visible_dirs(split_dir):
            found[split_dir.name, class_dir.name] = listing.add(str(class_dir), f"{split_dir.name}/{class_dir.name}/")
    class_names = tuple(sorted({name for (_, name), images in found.items() if images and is_utf8(name)}))
    index = {name: label for label, name in enumerate(class_names)}
    groups = [(images, index.get(name, UNLABELLED), split_name.lower()) for (split_name, name), images in found.items()]
    return make_dataset(root, "split-folder", groups, class_names=class_names, split_source="given", stats=listing.stats())
