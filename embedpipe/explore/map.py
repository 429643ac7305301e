"""The map stage: every row of an exported file as a point in 2-D, coloured by label, shaped by split.

>>> result = map_embeddings("cache/elpv-tf_efficientnet_lite0-c29b2595c6b7.h5", out="reports/elpv-map")
>>> result.coordinates                 # float64 (N, 2); also out/map.png, out/map.html, out/map.csv

The projection sees the embeddings the way the neighbour search and the audit do: rows are
L2-normalised first (so distances are cosine distances), and **not** standardised per feature.

- ``pca`` (the default): scikit-learn's ``PCA(n_components=2)`` of the normalised rows, solved
  exactly (``svd_solver="covariance_eigh"``: a D x D covariance and its eigenvectors, exact and
  fast when N >> D); each axis's sign is scikit-learn's ``svd_flip`` convention, so a file always
  gives the same picture. The axes' shares of the variance are reported.
- ``umap``: ``umap.UMAP(n_components=2, metric="cosine", random_state=seed)`` (the ``umap``
  extra): neighbourhoods rather than variance, better at showing clusters, slower, and its
  distances between clusters mean little.

What is written:

- ``map.png``: the scatter (matplotlib, Agg), one colour per class, one marker per split;
- ``map.html``: one self-contained page (inline CSS and SVG, no script, no network): the points
  placed over an SVG frame; hovering a point shows its image (scaled to :data:`THUMB_PX` px and
  inlined) and its path. Only ``thumbnails`` points (a seeded sample, :data:`THUMBNAILS` by
  default) carry an image, so the page stays a few MB whatever N is; the others show their path,
  label and split in the hover title;
- ``map.csv``: ``row, path, label, split, x, y``.
"""

from __future__ import annotations

import csv
import io
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .._atomic import write_atomically
from ..errors import ExploreError
from ..extraction import load
from ._extras import require
from .knn import normalize

logger = logging.getLogger(__name__)

METHODS = ("pca", "umap")
# Points whose hover shows their image: a 64 px JPEG is 2-3 kB inlined, so 2,000 keep the page near 5 MB.
THUMBNAILS = 2000
THUMB_PX = 64  # big enough to recognise an image at a glance, small enough for thousands on one page
MAP_PNG = "map.png"
MAP_HTML = "map.html"
MAP_CSV = "map.csv"
# Marker of each split on the PNG (the HTML page draws the same shapes in CSS).
SPLIT_MARKERS = {"train": "o", "val": "s", "test": "^", "": "o"}


@dataclass
class MapResult:
    """What :func:`map_embeddings` projected, and where it wrote it."""

    source: str
    method: str  # pca or umap
    coordinates: np.ndarray  # float64 (N, 2)
    paths: list[str]
    labels: list[str]  # class name of each row ("" when unlabelled)
    splits: list[str]  # split of each row ("" when the file has none)
    explained_variance: list[float] | None  # pca: the share of the variance along each axis
    thumbnails: list[int] = field(default_factory=list)  # rows whose hover shows their image on the page
    seconds: float = 0.0  # of the projection alone
    meta: dict[str, Any] = field(default_factory=dict)  # the file's metadata (backbone, dataset root, classes)
    out: Path | None = None


def project(X: np.ndarray, *, method: str = "pca", seed: int = 0) -> tuple[np.ndarray, list[float] | None]:
    """2-D coordinates of the L2-normalised rows of ``X``.

    Args:
        X: (N, D) float array, N >= 3.
        method: ``pca`` or ``umap`` (the ``umap`` extra).
        seed: UMAP's random state (PCA is deterministic).

    Returns:
        ``(coordinates float64 (N, 2), the axes' shares of the variance for PCA, else None)``.
    """
    if method not in METHODS:
        raise ExploreError(f"unknown map method {method!r}: use one of {', '.join(METHODS)}")
    if len(X) < 3:
        raise ExploreError(f"{len(X)} rows: a map needs at least 3")
    rows = normalize(X)
    if method == "umap":
        umap = require("umap")
        reducer = umap.UMAP(n_components=2, metric="cosine", random_state=seed, n_neighbors=min(15, len(X) - 1))
        return np.asarray(reducer.fit_transform(rows), dtype=np.float64), None
    from sklearn.decomposition import PCA

    pca = PCA(n_components=2, svd_solver="covariance_eigh")
    coordinates = pca.fit_transform(rows.astype(np.float64))
    return coordinates, [float(v) for v in pca.explained_variance_ratio_]


def map_embeddings(
    embeddings: str | Path,
    *,
    out: str | Path | None = None,
    method: str = "pca",
    output: str = "embeddings",
    thumbnails: int = THUMBNAILS,
    seed: int = 0,
) -> MapResult:
    """Project an exported file's rows to 2-D; write ``map.png``, ``map.html`` and ``map.csv`` into ``out``.

    Args:
        embeddings: a file written by :func:`embedpipe.extract`.
        out: folder for the files; None writes nothing.
        method: ``pca`` (default) or ``umap`` (the ``umap`` extra); see the module docstring.
        output: which stored output to map.
        thumbnails: at most this many points (a sample drawn with ``seed``) show their image on hover.
        seed: for the thumbnail sample and UMAP.
    """
    if thumbnails < 0:
        raise ExploreError(f"--thumbnails {thumbnails} must be 0 or more")
    X, y, meta = load(embeddings, output=output)
    started = time.perf_counter()
    coordinates, variance = project(X, method=method, seed=seed)
    seconds = time.perf_counter() - started
    classes = meta["class_names"]
    labels = [classes[v] if v >= 0 and classes else "" for v in y.tolist()]
    splits = [str(s) for s in meta["split"]] if meta["split"] is not None else [""] * len(X)
    rng = np.random.default_rng(seed)
    shown = sorted(rng.choice(len(X), size=min(thumbnails, len(X)), replace=False).tolist())
    result = MapResult(source=str(embeddings), method=method, coordinates=coordinates, paths=list(meta["paths"]), labels=labels,
                       splits=splits, explained_variance=variance, thumbnails=shown, seconds=seconds, meta=meta)
    if out is not None:
        write_map(result, Path(out))
    return result


def class_colours(labels: list[str]) -> dict[str, str]:
    """Each class (in first-seen order, sorted) -> a hex colour: tab10, tab20 beyond 10 classes, cycling beyond 20."""
    import matplotlib
    from matplotlib.colors import to_hex

    names = sorted(set(labels))
    cmap = matplotlib.colormaps["tab10" if len(names) <= 10 else "tab20"]
    return {name: to_hex(cmap(i % cmap.N)) for i, name in enumerate(names)}


def axis_names(result: MapResult) -> tuple[str, str]:
    if result.explained_variance is None:
        return f"{result.method.upper()} 1", f"{result.method.upper()} 2"
    first, second = result.explained_variance
    return f"PC 1 ({first:.1%} of the variance)", f"PC 2 ({second:.1%})"


def plot_map(result: MapResult, path: Path) -> Path:
    """The scatter as a PNG: colour by class, marker by split, one legend for each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    colours = class_colours(result.labels)
    labels, splits = np.array(result.labels), np.array(result.splits)
    xy = result.coordinates
    fig, ax = plt.subplots(figsize=(8.5, 6.5))
    size = float(np.clip(12000 / max(len(xy), 1), 5, 40))  # smaller points as they crowd
    for split in dict.fromkeys(result.splits):
        for name, colour in colours.items():
            keep = (labels == name) & (splits == split)
            if keep.any():
                ax.scatter(xy[keep, 0], xy[keep, 1], s=size, c=colour, marker=SPLIT_MARKERS.get(split, "o"), alpha=0.7,
                           edgecolors="black" if split == "test" else "none", linewidths=0.4)
    handles = [Line2D([], [], marker="o", linestyle="", color=c, label=n or "(unlabelled)") for n, c in colours.items()]
    first = ax.legend(handles=handles, title="class", fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False)
    ax.add_artist(first)
    present = [s for s in ("train", "val", "test") if s in result.splits]
    if present:
        shapes = [Line2D([], [], marker=SPLIT_MARKERS[s], linestyle="", color="grey", markeredgecolor="black" if s == "test" else "grey",
                         label=s) for s in present]
        ax.legend(handles=shapes, title="split", fontsize=8, loc="lower left", bbox_to_anchor=(1.01, 0), frameon=False)
    x_name, y_name = axis_names(result)
    ax.set_xlabel(x_name)
    ax.set_ylabel(y_name)
    ax.set_title(f"{Path(result.source).name}: {len(xy)} images, {result.meta.get('backbone', '')} embeddings, {result.method.upper()}",
                 fontsize=10)
    ax.grid(True, alpha=0.25)
    fig.savefig(path, dpi=110, bbox_inches="tight", bbox_extra_artists=[first], metadata={"Software": None})
    plt.close(fig)
    return path


def write_map(result: MapResult, out: Path) -> None:
    """``out/map.png``, ``out/map.html`` and ``out/map.csv``."""
    from .pages import map_page

    result.out = out
    try:
        out.mkdir(parents=True, exist_ok=True)
        table = io.StringIO(newline="")
        writer = csv.writer(table)
        writer.writerow(("row", "path", "label", "split", "x", "y"))
        for row, (path, label, split, (x, y)) in enumerate(zip(result.paths, result.labels, result.splits, result.coordinates.tolist())):
            writer.writerow((row, path, label, split, f"{x:.6g}", f"{y:.6g}"))
        write_atomically(out / MAP_CSV, table.getvalue().encode())
        plot_map(result, out / MAP_PNG)
        write_atomically(out / MAP_HTML, map_page(result, colours=class_colours(result.labels), axes=axis_names(result),
                                                  thumb_px=THUMB_PX).encode())
    except OSError as error:
        raise ExploreError(f"cannot write the map to {out} ({error.strerror or error}): pick another --out") from None
