"""Leakage between two splits: test images that are (nearly) train images, which inflate every test number.

>>> found = split_leakage(X, meta["digests"], meta["split"])
>>> found.exact, found.near, found.inconclusive

- **exact**: a test row whose file has the same sha256 as a train row's (the export's ``digests``):
  always reported, whatever the backbone.
- **near**, when a ``threshold`` is given: a test row whose most similar train row (exact cosine
  search, :mod:`.knn`) is at or above it (the audit's measured :data:`~.audit.LEAKAGE_THRESHOLD`
  suits photos and a pretrained backbone). Reported only when the
  backbone tells the images apart: the check is called inconclusive, and near pairs are not
  reported, when the threshold joins test and train rows into a group too large to be copies (the
  audit's chaining guard, :func:`.audit.chained`) or when the median test row is that similar to some
  train row (then the threshold measures the backbone, not copies: a random-weight network puts
  every pair above 0.99).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .audit import LEAKAGE_THRESHOLD, NEIGHBOURS, chained, duplicate_groups
from .knn import search


@dataclass
class Leakage:
    """What :func:`split_leakage` found; rows are rows of the file."""

    exact: list[tuple[int, int]]  # (test row, train row) with the same file digest
    near: list[tuple[int, int, float]]  # (test row, its most similar train row, cosine), exact pairs excluded
    threshold: float | None  # of the near check; None: not run
    median_similarity: float | None  # of each test row to its most similar train row
    inconclusive: str = ""  # why near pairs are not reported ("" when they are)
    splits: tuple[str, str] = ("test", "train")
    checked: dict[str, int] = field(default_factory=dict)  # rows of each split

    def found(self) -> str:
        """What was found, in one line ("" when nothing was)."""
        a, b = self.splits
        total = self.checked.get(a, 0)
        parts = [f"{a} images with a byte-identical {b} image: {len(self.exact)} of {total}"] if self.exact else []
        if self.near:
            parts.append(f"with a {b} image at cosine >= {self.threshold:g}: {len(self.near)} more")
        return "; ".join(parts)

    def describe(self) -> str:
        """One line: what was checked and found."""
        a, b = self.splits
        parts = [f"{a} images with a byte-identical {b} image: {len(self.exact)} of {self.checked.get(a, 0)}"]
        if self.threshold is None:
            parts.append("near duplicates not checked (no threshold given)")
        elif self.inconclusive:
            parts.append(f"near duplicates (cosine >= {self.threshold:g}) not reported: {self.inconclusive}")
        else:
            parts.append(f"with a {b} image at cosine >= {self.threshold:g}: {len(self.near)} more")
        return "; ".join(parts)


def split_leakage(X: np.ndarray, digests: list[str], splits: np.ndarray | list[str], *, between: tuple[str, str] = ("test", "train"),
                  threshold: float | None = LEAKAGE_THRESHOLD, device: str = "auto") -> Leakage:
    """Rows of split ``between[0]`` that duplicate rows of ``between[1]``, exactly (file digest) or nearly (cosine).

    Args:
        X: (N, D) embeddings of the file's rows.
        digests: (N,) sha256 of each row's file.
        splits: (N,) each row's split.
        between: (the split checked, the split it must not repeat).
        threshold: cosine similarity from which a pair counts as a near duplicate; None checks exact copies only.
        device: for the search.
    """
    splits = np.asarray(splits, dtype=object)
    a_rows, b_rows = np.flatnonzero(splits == between[0]), np.flatnonzero(splits == between[1])
    checked = {between[0]: len(a_rows), between[1]: len(b_rows)}
    first: dict[str, int] = {}
    for row in b_rows.tolist():
        first.setdefault(digests[row], row)
    exact = [(row, first[digests[row]]) for row in a_rows.tolist() if digests[row] in first]
    if threshold is None or not len(a_rows) or not len(b_rows):
        return Leakage(exact=exact, near=[], threshold=None, median_similarity=None, splits=between, checked=checked)
    k = min(NEIGHBOURS, len(b_rows))
    found = search(X[a_rows], X[b_rows], k, device=device)
    median = float(np.median(found.similarities[:, 0]))
    copied = {row for row, _ in exact}
    near = [(int(a_rows[i]), int(b_rows[found.indices[i, 0]]), float(found.similarities[i, 0]))
            for i in np.flatnonzero(found.similarities[:, 0] >= threshold).tolist() if int(a_rows[i]) not in copied]
    # The audit's chaining guard, on the graph of the checked rows' edges into the other split.
    rows = np.concatenate([a_rows, b_rows])
    sims = np.full((len(rows), k), -np.inf, dtype=np.float32)
    idx = np.zeros((len(rows), k), dtype=np.int64)
    sims[: len(a_rows)], idx[: len(a_rows)] = found.similarities, found.indices + len(a_rows)
    groups = duplicate_groups(sims, idx, [digests[r] for r in rows.tolist()], threshold=threshold)
    inconclusive = ""
    if median >= threshold:
        inconclusive = (f"the median {between[0]} image has a {between[1]} image at cosine {median:.3f}, so at this threshold "
                        "the backbone does not tell these images apart")
    elif size := chained([len(g) for g, _ in groups], len(rows)):
        inconclusive = f"the threshold joins {size} of {len(rows)} images into one group, which cannot all be copies"
    return Leakage(exact=exact, near=[] if inconclusive else near, threshold=threshold, median_similarity=median,
                   inconclusive=inconclusive, splits=between, checked=checked)
