"""Folder trees: one sub-folder per class (ImageFolder), optionally under train/ val/ test/, or a folder of unlabelled images."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from ..errors import DataError
from .records import IMAGE_EXTENSIONS, SPLITS, UNLABELLED, Dataset, is_utf8, make_dataset

logger = logging.getLogger(__name__)


_SUFFIXES = tuple(IMAGE_EXTENSIONS)


def is_image(name: str) -> bool:
    return name.lower().endswith(_SUFFIXES) and not name.startswith(".")  # one C call per name: 100k names in 30 ms


def visible_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def images_under(folder: str, prefix: str = "") -> list[str]:
    """Relative paths (``prefix`` + forward-slash path) of the image files below ``folder``, recursively.

    ``os.scandir`` and plain strings, no ``Path`` per file: listing 100k files this way costs about
    what ``find`` does. Hidden entries are skipped; symlinked folders are followed.
    """
    found: list[str] = []
    pending = [(folder, prefix)]
    seen: set[tuple[int, int]] = set()  # (device, inode) of each folder listed: a symlink loop is listed once
    while pending:
        directory, rel = pending.pop()
        try:
            st = os.stat(directory)
            if (st.st_dev, st.st_ino) in seen:
                logger.warning("%s was already listed (a symlink loop, or two links to one folder): skipped", directory)
                continue
            seen.add((st.st_dev, st.st_ino))
            entries = list(os.scandir(directory))
        except OSError as error:
            raise DataError(f"cannot list {directory} ({error.strerror}): check it exists and is readable") from None
        for entry in entries:
            name = entry.name
            if name.startswith("."):
                continue
            if entry.is_dir():  # symlinks are followed: a dataset is what its paths name
                pending.append((entry.path, f"{rel}{name}/"))
            elif is_image(name):
                found.append(rel + name)
    found.sort()
    return found


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
    per_class = {d.name: images_under(str(d), f"{d.name}/") for d in subdirs}
    # A class whose folder name is not UTF-8 cannot be named in the export: its images are rejected (ledgered).
    unnamed = [relpath for name, images in per_class.items() if not is_utf8(name) for relpath in images]
    class_names = tuple(name for name, images in per_class.items() if images and is_utf8(name))
    if class_names:
        if loose:
            raise DataError(
                f"{root} holds both class folders and {len(loose)} loose images (e.g. {loose[0].name}): "
                "move the loose images into a class folder, or point at a folder of only unlabelled images"
            )
        groups = [(per_class[name], label, None) for label, name in enumerate(class_names)]
        return make_dataset(root, "folder", [*groups, (unnamed, UNLABELLED, None)], class_names=class_names)
    return make_dataset(root, "unlabelled", [(images_under(str(root)), UNLABELLED, None)])


def load_split_folders(root: Path, split_dirs: list[Path]) -> Dataset:
    found: dict[tuple[str, str], list[str]] = {}
    for split_dir in split_dirs:
        loose = [p for p in split_dir.iterdir() if p.is_file() and is_image(p.name)]
        if loose:
            raise DataError(
                f"{split_dir} holds images outside class folders (e.g. {loose[0].name}): "
                "put them in a sub-folder named after their class"
            )
        for class_dir in visible_dirs(split_dir):
            found[split_dir.name, class_dir.name] = images_under(str(class_dir), f"{split_dir.name}/{class_dir.name}/")
    class_names = tuple(sorted({name for (_, name), images in found.items() if images and is_utf8(name)}))
    index = {name: label for label, name in enumerate(class_names)}
    groups = [(images, index.get(name, UNLABELLED), split_name.lower()) for (split_name, name), images in found.items() if images]
    return make_dataset(root, "split-folder", groups, class_names=class_names, split_source="given")
