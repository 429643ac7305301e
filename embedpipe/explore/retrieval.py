"""Retrieval quality of embeddings: how often a query's nearest bank rows share its class.

>>> quality = retrieval_quality(X_test, y_test, X_train, y_train)
>>> quality.recall[1], quality.recall[5], quality.map_at_r

The definitions are those of metric learning (Musgrave, Belongie and Lim, "A Metric Learning
Reality Check", ECCV 2020), on cosine similarity with the exact search of :mod:`.knn` (ties to the
lower bank row):

- **recall@k**: the share of queries with at least one bank row of their own class among their k
  nearest (recall@1 is 1-nearest-neighbour accuracy);
- **mAP@R**: for a query of class c with R bank rows of class c, the mean over ranks i <= R of
  precision@i at the ranks that hold a row of class c, ``(1/R) * sum_i P@i * rel(i)``: 1.0 only
  when all R rows of its class come first. It rewards a feature space whose classes are compact,
  which recall@k at small k does not see.

Unlabelled rows, and queries whose class has no bank row, are left out (and counted).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import ExploreError
from .knn import search

RECALL_AT = (1, 5)
# Queries searched at once: their (queries x R) neighbour lists take about this much (indices and similarities).
QUERY_BLOCK_BYTES = 256 * 2**20


@dataclass
class Retrieval:
    """What :func:`retrieval_quality` measured."""

    recall: dict[int, float]  # k -> recall@k
    map_at_r: float
    queries: int  # queries scored
    bank: int  # labelled bank rows
    skipped: int  # queries left out: unlabelled, or of a class the bank lacks
    seconds: float


def retrieval_quality(queries: np.ndarray, query_labels: np.ndarray, bank: np.ndarray, bank_labels: np.ndarray, *,
                      ks: Sequence[int] = RECALL_AT, device: str = "auto") -> Retrieval:
    """recall@k for each ``ks`` and mAP@R of ``queries`` against ``bank`` (cosine, exact).

    Args:
        queries: (q, D) float array; query_labels: int (q,), -1 when unlabelled.
        bank: (n, D) float array of the same width; bank_labels: int (n,), -1 when unlabelled.
        ks: the k of each recall@k (a k above the bank's size counts the whole bank).
        device: for the search.

    Raises:
        ExploreError: no labelled bank row, or no query of a class the bank has.
    """
    started = time.perf_counter()
    query_labels, bank_labels = np.asarray(query_labels), np.asarray(bank_labels)
    bank = np.asarray(bank)[bank_labels >= 0]
    bank_labels = bank_labels[bank_labels >= 0]
    if not len(bank):
        raise ExploreError("retrieval quality needs labelled bank rows")
    counts = np.bincount(bank_labels, minlength=max(int(query_labels.max(initial=0)), int(bank_labels.max())) + 1)
    keep = (query_labels >= 0) & (counts[np.maximum(query_labels, 0)] > 0)
    q, labels = np.asarray(queries)[keep], query_labels[keep]
    if not len(q):
        raise ExploreError("retrieval quality needs queries of a class the bank holds")
    relevant = counts[labels]  # R of each query
    k = int(min(len(bank), max(max(ks), int(relevant.max()))))
    hits = {kk: 0 for kk in ks}
    total_ap = 0.0
    block = max(1, QUERY_BLOCK_BYTES // (12 * k))
    for start in range(0, len(q), block):
        found = search(q[start : start + block], bank, k, device=device)
        rel = bank_labels[found.indices] == labels[start : start + block, None]  # (b, k) bool
        for kk in ks:
            hits[kk] += int(rel[:, : min(kk, k)].any(axis=1).sum())
        r = relevant[start : start + block]
        ranks = np.arange(1, k + 1)
        precision = np.cumsum(rel, axis=1) / ranks
        within = ranks[None, :] <= r[:, None]
        total_ap += float(((precision * rel * within).sum(axis=1) / r).sum())
    return Retrieval(recall={kk: hits[kk] / len(q) for kk in ks}, map_at_r=total_ap / len(q), queries=len(q), bank=len(bank),
                     skipped=int((~keep).sum()), seconds=time.perf_counter() - started)
