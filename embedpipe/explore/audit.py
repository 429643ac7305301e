"""The audit stage: duplicates, train/test leakage, likely label errors and outliers, from one exported file.

>>> result = audit("cache/elpv-tf_efficientnet_lite0-c29b2595c6b7.h5", out="reports/elpv-audit")
>>> result.leakage, result.label_issues[:5]      # also out/audit.json and out/audit.html

How each finding is made:

- **exact duplicates**: rows whose image files have the same sha256 (the file's ``digests``).
- **near duplicates**: the exact top-k graph (:mod:`.knn`), every edge with cosine similarity
  ``>= threshold`` joined into groups (union-find); exact duplicates are in them too.
- **leakage**: a duplicate group whose rows lie in more than one split: the same image is trained
  on and scored on, and every test number is inflated.
- **label issues**: cleanlab's ``find_label_issues`` and ``get_label_quality_scores``, fed
  out-of-fold class probabilities of the logreg head (stratified folds: no row is scored by a
  model that saw its label).
- **outliers**: cleanlab's ``OutOfDistribution`` feature score (average cosine distance to the k
  nearest neighbours, scaled by its median), fed the same exact graph instead of its own search.

The label-issue and outlier scores need the ``cleanlab`` extra; without it the audit still finds
duplicates and leakage and says what it skipped.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .._atomic import json_bytes, write_atomically
from ..errors import ExploreError
from ..extraction import load
from ._extras import available, require
from .knn import search

logger = logging.getLogger(__name__)

# Cosine similarity at and above which two rows are called near duplicates. Measured with the default
# backbone (tf_efficientnet_lite0) on 56 quarter-tiles of 14 scikit-image photos with 96 planted copies
# (JPEG re-encoded at quality 70, resized to 80%, mirrored, 4 px cropped from each side; the data of
# tests/test_explore.py): at 0.90 the audit found 96.9% of the copies at 95.9% precision. Images that
# differ only in noise (ELPV's blank cells, patches of one texture) score higher
# than that when they are distinct; the audit reports the dataset's nearest-neighbour similarities and
# warns when a group grows too large to be copies (AuditResult.chained).
DUPLICATE_THRESHOLD = 0.90
# Two rows in different splits are joined from this similarity up: a missed leak inflates every test
# number, a false alarm costs a look. On the same 96 copies 0.85 found every one (90.2% precision).
LEAKAGE_THRESHOLD = 0.85
NEIGHBOURS = 10  # the graph's k: cleanlab's default for its outlier score, and enough to join duplicate groups
FOLDS = 5  # out-of-fold probabilities for the label-issue scores
OUTLIER_SHARE = 0.01  # the outliers listed: the lowest-scoring 1% (at least 10)
# A duplicate group this large (at least CHAIN_ROWS rows and CHAIN_SHARE of the file) is not copies: the
# threshold joins distinct images, as on ELPV's cells, where one group at 0.90 held 2,210 of 2,624.
CHAIN_ROWS = 20
CHAIN_SHARE = 0.05
AUDIT_FORMAT_VERSION = 1
AUDIT_JSON = "audit.json"
AUDIT_HTML = "audit.html"


@dataclass
class Group:
    """Rows that hold the same image, or nearly."""

    rows: list[int]
    paths: list[str]
    splits: list[str]
    labels: list[str]
    exact: bool  # every row has the same file digest
    min_similarity: float  # the weakest edge that joined the group
    leakage: bool  # the rows span more than one split
    label_conflict: bool  # the rows carry different labels


@dataclass
class LabelIssue:
    row: int
    path: str
    split: str
    given: str
    suggested: str  # the class the out-of-fold probabilities favour
    quality: float  # cleanlab's label quality score in [0, 1], low = likely wrong
    given_probability: float
    suggested_probability: float


@dataclass
class Outlier:
    row: int
    path: str
    split: str
    label: str
    score: float  # cleanlab's OOD score in [0, 1], low = atypical
    mean_distance: float  # mean cosine distance to its k nearest neighbours


@dataclass
class AuditResult:
    """What :func:`audit` found (every list is ranked, most important first)."""

    source: str
    rows: int
    threshold: float
    leakage_threshold: float
    duplicates: list[Group]  # near-duplicate groups, exact ones included
    exact_duplicates: int  # rows that repeat another row's file bytes
    leakage: list[Group]  # the duplicate groups that span splits
    label_issues: list[LabelIssue]
    outliers: list[Outlier]
    nearest_similarity: dict[str, float]  # quantiles of each row's similarity to its nearest neighbour
    skipped: dict[str, str] = field(default_factory=dict)  # check -> why it did not run
    seconds: dict[str, float] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)  # the file's metadata (backbone, dataset root, classes)
    out: Path | None = None

    def chained(self) -> int:
        """The size of the largest duplicate group when it is too large to be copies (:func:`chained`), else 0."""
        return chained([len(g.rows) for g in self.duplicates], self.rows)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("meta")
        data.update(chained=self.chained(), format="embedpipe-audit", format_version=AUDIT_FORMAT_VERSION, out=str(self.out) if self.out else None,
                    backbone=self.meta.get("backbone"), cache_key=self.meta.get("cache_key"),
                    dataset_root=(self.meta.get("dataset") or {}).get("root"))
        return data


def audit(
    embeddings: str | Path,
    *,
    out: str | Path | None = None,
    threshold: float = DUPLICATE_THRESHOLD,
    leakage_threshold: float = LEAKAGE_THRESHOLD,
    k: int = NEIGHBOURS,
    folds: int = FOLDS,
    seed: int = 0,
    output: str = "embeddings",
    device: str = "auto",
    thumbnails: int = 64,
) -> AuditResult:
    """Find duplicates, leakage across splits, likely label errors and outliers in an exported file.

    Args:
        embeddings: a file written by :func:`embedpipe.extract`.
        out: folder for ``audit.json`` and ``audit.html``; None writes nothing.
        threshold: cosine similarity at and above which two rows are near duplicates (see
            :data:`DUPLICATE_THRESHOLD` for how the default was measured).
        leakage_threshold: the same for two rows in different splits (:data:`LEAKAGE_THRESHOLD`);
            never above ``threshold``.
        k: neighbours per row in the graph (duplicate groups, outlier scores).
        folds: stratified folds for the out-of-fold probabilities.
        seed: the folds' shuffling seed.
        output: which stored output to audit.
        device: for the neighbour search and the logreg folds.
        thumbnails: findings per section shown with images in ``audit.html`` (all are in ``audit.json``).
    """
    for name, value in (("threshold", threshold), ("leakage-threshold", leakage_threshold)):
        if not 0 < value <= 1:
            raise ExploreError(f"--{name} {value} is not a cosine similarity in (0, 1]: e.g. {DUPLICATE_THRESHOLD}")
    leakage_threshold = min(leakage_threshold, threshold)
    X, y, meta = load(embeddings, output=output)
    if len(X) < 3:
        raise ExploreError(f"{embeddings} has {len(X)} rows: an audit needs at least 3")
    k = min(k, len(X) - 1)
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    graph = search(X, X, k, exclude_self=True, device=device)
    seconds["neighbours"] = time.perf_counter() - started
    classes = meta["class_names"]
    names = [classes[v] if v >= 0 and classes else "" for v in y.tolist()]
    splits = list(meta["split"]) if meta["split"] is not None else [""] * len(X)
    groups = duplicate_groups(graph.similarities, graph.indices, meta["digests"], threshold=threshold, splits=splits,
                              leakage_threshold=leakage_threshold)
    duplicates = [_group(g, s, meta, names, splits) for g, s in groups]
    duplicates.sort(key=lambda g: (not g.leakage, not g.exact, -g.min_similarity, g.rows[0]))
    skipped: dict[str, str] = {}
    label_issues: list[LabelIssue] = []
    outliers: list[Outlier] = []
    if not available("cleanlab"):
        why = "cleanlab is not installed: pip install 'embedpipe[cleanlab]'"
        skipped.update(label_issues=why, outliers=why)
    else:
        started = time.perf_counter()
        outliers = find_outliers(graph.similarities, graph.indices, meta["paths"], splits, names)
        seconds["outliers"] = time.perf_counter() - started
        started = time.perf_counter()
        try:
            label_issues = find_label_issues(X, y, meta["paths"], splits, classes, folds=folds, seed=seed, device=device)
        except ExploreError as why:
            skipped["label_issues"] = str(why)
        seconds["label_issues"] = time.perf_counter() - started
    quantiles = np.quantile(graph.similarities[:, 0], [0.01, 0.5, 0.99]) if len(X) else np.zeros(3)
    result = AuditResult(
        source=str(embeddings), rows=len(X), threshold=threshold, leakage_threshold=leakage_threshold, duplicates=duplicates,
        exact_duplicates=sum(_repeats(g, meta) for g in duplicates),
        leakage=[g for g in duplicates if g.leakage], label_issues=label_issues, outliers=outliers,
        nearest_similarity={"p1": float(quantiles[0]), "median": float(quantiles[1]), "p99": float(quantiles[2])},
        skipped=skipped, seconds=seconds, meta=meta,
    )
    if out is not None:
        write_audit(result, Path(out), thumbnails=thumbnails)
    return result


def chained(sizes: list[int], rows: int) -> int:
    """The largest group's size when it is too large to be copies (at least :data:`CHAIN_ROWS` rows and
    :data:`CHAIN_SHARE` of ``rows``): the threshold then joins distinct images and should be raised. 0 otherwise."""
    largest = max(sizes, default=0)
    return largest if largest >= max(CHAIN_ROWS, CHAIN_SHARE * rows) else 0


def _repeats(group: Group, meta: dict[str, Any]) -> int:
    """Rows of the group whose file bytes another row of it already has."""
    return len(group.rows) - len({meta["digests"][r] for r in group.rows})


def duplicate_groups(sims: np.ndarray, idx: np.ndarray, digests: list[str], *, threshold: float,
                     splits: list[str] | None = None, leakage_threshold: float | None = None) -> list[tuple[list[int], float]]:
    """Groups of rows joined by an edge of similarity >= ``threshold`` or by the same file digest.

    Args:
        sims, idx: (n, k) the exact neighbour graph (each row's neighbours, itself excluded).
        digests: (n,) sha256 of each row's file.
        splits: (n,) each row's split; with ``leakage_threshold``, rows of different splits join
            from that similarity up instead.

    Returns:
        ``[(sorted rows, weakest joining similarity)]`` for every group of two or more rows, in
        order of their first row. Same-digest rows join at similarity 1.0 even when the graph's k
        is smaller than their number.
    """
    n = len(digests)
    parent = list(range(n))
    weakest = [1.0] * n

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    def join(a: int, b: int, s: float) -> None:
        ra, rb = find(a), find(b)
        low = min(weakest[ra], weakest[rb], s)
        if ra != rb:
            parent[rb] = ra
        weakest[ra] = low

    first: dict[str, int] = {}
    for row, digest in enumerate(digests):
        if digest in first:
            join(first[digest], row, 1.0)
        else:
            first[digest] = row
    low = threshold if leakage_threshold is None or splits is None else min(threshold, leakage_threshold)
    rows, cols = np.nonzero(sims >= low)
    for a, j in zip(rows.tolist(), cols.tolist()):
        b, s = int(idx[a, j]), float(sims[a, j])
        if s >= threshold or splits[a] != splits[b]:  # below threshold only across splits
            join(a, b, s)
    members: dict[int, list[int]] = {}
    for row in range(n):
        members.setdefault(find(row), []).append(row)
    return [(m, min(weakest[find(m[0])], 1.0)) for m in members.values() if len(m) > 1]


def _group(rows: list[int], weakest: float, meta: dict[str, Any], names: list[str], splits: list[str]) -> Group:
    digests = {meta["digests"][r] for r in rows}
    return Group(rows=rows, paths=[meta["paths"][r] for r in rows], splits=[splits[r] for r in rows],
                 labels=[names[r] for r in rows], exact=len(digests) == 1, min_similarity=round(weakest, 6),
                 leakage=len({splits[r] for r in rows} - {""}) > 1, label_conflict=len({names[r] for r in rows}) > 1)


class _Graph:
    """The ``NearestNeighbors`` interface cleanlab's ``OutOfDistribution`` calls, over a graph already computed."""

    metric = "cosine"

    def __init__(self, distances: np.ndarray, indices: np.ndarray) -> None:
        self.distances, self.indices = distances, indices
        self.n_neighbors = distances.shape[1]

    def kneighbors(self, X: np.ndarray | None = None, n_neighbors: int | None = None,
                   return_distance: bool = True) -> tuple[np.ndarray, np.ndarray]:
        if X is not None and len(X) != len(self.distances):
            raise ExploreError("the precomputed neighbour graph only answers for the rows it was built on")
        return self.distances, self.indices


def find_outliers(sims: np.ndarray, idx: np.ndarray, paths: list[str], splits: list[str], names: list[str]) -> list[Outlier]:
    """cleanlab's feature OOD score from the exact graph; the lowest :data:`OUTLIER_SHARE` (at least 10), lowest first."""
    outlier = require("cleanlab.outlier")
    distances = np.clip(1.0 - sims.astype(np.float64), 0.0, 2.0)
    ood = outlier.OutOfDistribution(params={"knn": _Graph(distances, idx)})
    # score() with the graph's own rows as features: cleanlab asks the graph, which answers for those rows.
    scores = ood.score(features=np.zeros((len(sims), 1)))
    listed = max(10, int(round(OUTLIER_SHARE * len(sims))))
    order = np.argsort(scores, kind="stable")[: min(listed, len(sims))]
    mean = distances.mean(axis=1)
    return [Outlier(row=int(r), path=paths[r], split=splits[r], label=names[r], score=round(float(scores[r]), 6),
                    mean_distance=round(float(mean[r]), 6)) for r in order]


def out_of_fold_probabilities(X: np.ndarray, y: np.ndarray, *, folds: int, seed: int, device: str = "auto") -> np.ndarray:
    """(n, C) class probabilities of each row from a logreg head fitted on the other folds (stratified).

    Raises:
        ExploreError: a class has fewer rows than two folds need.
    """
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    from ..heads import LogisticProbe

    counts = np.bincount(y)
    smallest = int(counts[counts > 0].min())
    if smallest < 2:
        raise ExploreError(f"a class has only {smallest} labelled row: label issues need at least 2 per class")
    cv = StratifiedKFold(n_splits=min(folds, smallest), shuffle=True, random_state=seed)
    return cross_val_predict(LogisticProbe(random_state=seed, device=device), X, y, cv=cv, method="predict_proba")


def find_label_issues(X: np.ndarray, y: np.ndarray, paths: list[str], splits: list[str], classes: list[str], *,
                      folds: int, seed: int, device: str = "auto") -> list[LabelIssue]:
    """cleanlab's label issues among the labelled rows, ranked by its label quality score (lowest first)."""
    cleanlab_filter = require("cleanlab.filter")
    rank = require("cleanlab.rank")
    labelled = np.flatnonzero(y >= 0)
    if not len(classes) or len(np.unique(y[labelled])) < 2:
        raise ExploreError("label issues need a labelled file with at least two classes")
    present = np.unique(y[labelled])  # cleanlab wants labels 0..C-1 of the classes present
    remap = {c: i for i, c in enumerate(present.tolist())}
    labels = np.array([remap[v] for v in y[labelled].tolist()])
    probs = out_of_fold_probabilities(X[labelled], labels, folds=folds, seed=seed, device=device)
    issues = cleanlab_filter.find_label_issues(labels, probs, return_indices_ranked_by="self_confidence")
    quality = rank.get_label_quality_scores(labels, probs)
    found = []
    for i in sorted(issues.tolist(), key=lambda i: (quality[i], i)):
        row = int(labelled[i])
        best = int(np.argmax(probs[i]))
        found.append(LabelIssue(row=row, path=paths[row], split=splits[row], given=classes[present[labels[i]]],
                                suggested=classes[present[best]], quality=round(float(quality[i]), 6),
                                given_probability=round(float(probs[i, labels[i]]), 6),
                                suggested_probability=round(float(probs[i, best]), 6)))
    return found


def write_audit(result: AuditResult, out: Path, *, thumbnails: int = 64) -> None:
    """``out/audit.json`` (every finding) and ``out/audit.html`` (the page, images inlined)."""
    from .pages import audit_page

    result.out = out
    try:
        out.mkdir(parents=True, exist_ok=True)
        write_atomically(out / AUDIT_JSON, json_bytes(result.to_dict()))
        write_atomically(out / AUDIT_HTML, audit_page(result, thumbnails=thumbnails).encode())
    except OSError as error:
        raise ExploreError(f"cannot write the audit to {out} ({error.strerror or error}): pick another --out") from None
