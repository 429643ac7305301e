"""The neighbours stage: the k most similar images of each row of an exported file, or of new images.

>>> found = neighbors("cache/elpv-tf_efficientnet_lite0-c29b2595c6b7.h5", k=5)
>>> found = neighbors("cache/elpv-...h5", query="new-cells/", k=5)   # embedded through the cache first
>>> found.write("neighbours.csv")   # query, rank, neighbor, similarity, label, split

Query images are embedded with the file's own backbone, weights, preprocessing and precision
(:func:`embedpipe.extraction.spec_of`), through the cache, so images already embedded cost nothing.
The search is exact cosine top-k (:mod:`.knn`); ``backend="faiss"`` runs FAISS's exact flat
inner-product index instead (the ``faiss`` extra), which ``benchmarks/bench_neighbors.py`` compares.
"""

from __future__ import annotations

import csv
import io
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .._atomic import json_bytes, write_atomically
from .._progress import ProgressFactory, no_progress
from ..config import RunConfig
from ..errors import ExploreError
from ..extraction import extract, load, spec_of
from ._extras import require
from .knn import Search, check_arrays, normalize, search

BACKENDS = ("torch", "faiss")
COLUMNS = ("query", "rank", "neighbor", "similarity", "label", "split")


@dataclass
class Neighbors:
    """The k nearest rows of an exported file for each query, most similar first."""

    queries: list[str]  # query image paths: the file's own rows, or the query images
    paths: list[str]  # the file's rows, which the indices point into
    indices: np.ndarray  # int64 (q, k)
    similarities: np.ndarray  # float32 (q, k) cosine similarity
    labels: list[str]  # class name of each of the file's rows ("" when unlabelled)
    splits: list[str] | None  # split of each of the file's rows
    backend: str
    precision: str
    device: str
    seconds: float  # of the search alone
    query_file: Path | None = None  # the exported file of the query images, when there were some
    failed: list[tuple[str, str]] = field(default_factory=list)  # query images that could not be decoded

    def records(self) -> list[dict[str, Any]]:
        """One flat record per (query, rank): the :data:`COLUMNS`, rank counted from 1."""
        rows = []
        for query, idx, sims in zip(self.queries, self.indices.tolist(), self.similarities.tolist()):
            for rank, (j, s) in enumerate(zip(idx, sims), start=1):
                rows.append({"query": query, "rank": rank, "neighbor": self.paths[j], "similarity": round(s, 6),
                             "label": self.labels[j], "split": self.splits[j] if self.splits is not None else ""})
        return rows

    def write(self, path: str | Path) -> Path:
        """Write :meth:`records` to ``.csv`` or ``.json`` (chosen by the suffix), atomically."""
        path = Path(path)
        if path.suffix.lower() not in (".csv", ".json"):
            raise ExploreError(f"cannot write neighbours to {path.name}: name a .csv or .json file")
        records = self.records()
        if path.suffix.lower() == ".json":
            data = json_bytes(records)
        else:
            text = io.StringIO()
            writer = csv.DictWriter(text, fieldnames=COLUMNS, lineterminator="\n")
            writer.writeheader()
            writer.writerows(records)
            data = text.getvalue().encode()
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            write_atomically(path, data)
        except OSError as error:
            raise ExploreError(f"cannot write {path} ({error.strerror}): pick another --out") from None
        return path


def neighbors(
    embeddings: str | Path,
    *,
    query: str | Path | None = None,
    k: int = 10,
    backend: str = "torch",
    output: str = "embeddings",
    device: str = "auto",
    precision: str = "auto",
    cache_dir: str | Path = "cache",
    run: RunConfig = RunConfig(),
    progress: ProgressFactory = no_progress,
) -> Neighbors:
    """Exact cosine top-k neighbours among an exported file's rows.

    Args:
        embeddings: a file written by :func:`embedpipe.extract`.
        query: images to search for (folder or CSV manifest, as ``extract`` takes), embedded through
            the cache with the file's own backbone and preprocessing; None: every row of the file,
            each searched among the others.
        k: neighbours per query.
        backend: ``torch`` (blocked matmul, on the GPU when there is one) or ``faiss`` (exact flat index).
        output: which stored output to search (``embeddings``, ``logits``, ``stageN``).
        device: for the torch search (and the query extraction's ``run`` device, when it is ``auto``).
        precision: of the torch block products; results are fp32-exact at any of them (see :mod:`.knn`).
        cache_dir: the cache the query images go through.
        run: how the query images are embedded (device, batch size, workers).
        progress: progress bars for the query extraction.

    Returns:
        A :class:`Neighbors`; ``.records()`` and ``.write(path)`` give the CSV/JSON rows.
    """
    if backend not in BACKENDS:
        raise ExploreError(f"unknown backend {backend!r}: use one of {', '.join(BACKENDS)}")
    bank, y, meta = load(embeddings, output=output)
    if not len(bank):
        raise ExploreError(f"{embeddings} holds no embeddings: extract a dataset with images in it")
    query_file, failed = None, []
    if query is None:
        queries, query_paths = bank, list(meta["paths"])
    else:
        result = extract(query, spec_of(meta), cache_dir=cache_dir, run=run, progress=progress)
        queries, _, query_meta = load(result.path, output=output)
        if query_meta["cache_key"] != meta["cache_key"]:  # spec_of rebuilds the same config; a mismatch is a bug to report
            raise ExploreError(f"{query} embedded under another config than {embeddings}: re-extract {embeddings}")
        query_file, failed, query_paths = result.path, result.failed, list(query_meta["paths"])
    started = time.perf_counter()
    if backend == "faiss":
        found = faiss_search(queries, bank, k, exclude_self=query is None)
    else:
        found = search(queries, bank, k, exclude_self=query is None, device=device, precision=precision)
    seconds = time.perf_counter() - started
    classes = meta["class_names"]
    return Neighbors(
        queries=query_paths, paths=list(meta["paths"]), indices=found.indices, similarities=found.similarities,
        labels=[classes[v] if v >= 0 and classes else "" for v in y.tolist()],
        splits=list(meta["split"]) if meta["split"] is not None else None,
        backend=backend, precision=found.precision, device=found.device, seconds=seconds, query_file=query_file, failed=failed,
    )


def faiss_search(queries: np.ndarray, bank: np.ndarray, k: int, *, exclude_self: bool = False) -> Search:
    """The same exact cosine top-k as :func:`.knn.search`, by FAISS's flat inner-product index (CPU, fp32).

    With ``exclude_self`` each query asks for k + 1 and its own row is dropped (or, when an exact
    duplicate tied it out of the list, the last one).
    """
    faiss = require("faiss")
    queries, bank = check_arrays(queries, bank, k, exclude_self=exclude_self)
    index = faiss.IndexFlatIP(bank.shape[1])
    index.add(normalize(bank))
    sims, idx = index.search(normalize(queries), k + int(exclude_self))
    if exclude_self:
        own = idx == np.arange(len(idx))[:, None]
        own[~own.any(axis=1), -1] = True  # own row not listed: drop the last instead
        keep = ~own
        sims, idx = sims[keep].reshape(len(idx), k), idx[keep].reshape(len(idx), k)
    order = np.lexsort((idx, -sims), axis=-1)  # ties to the lower index, as the torch search does
    return Search(similarities=np.take_along_axis(sims, order, 1).astype(np.float32),
                  indices=np.take_along_axis(idx, order, 1).astype(np.int64), precision="fp32", device="cpu")
