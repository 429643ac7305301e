"""Weighted cosine k-nearest-neighbours, the evaluation of DINO (Caron et al., 2021).

Features are L2-normalised, so the dot product is the cosine similarity. Each
of a query's k most similar training examples votes for its class with weight
``exp(similarity / T)``; the class probabilities are the normalised vote mass.
Similarities are computed in torch in blocks of queries, so memory stays at
about ``_BLOCK_BYTES`` whatever the sizes, on the GPU when there is one.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from sklearn.utils import check_random_state

from ..errors import HeadError
from .base import Head, torch_device, torch_threads

logger = logging.getLogger(__name__)

# Size of one (queries x training examples) float32 similarity block: small enough for any
# GPU or laptop, large enough that each block is one efficient matrix product.
_BLOCK_BYTES = 256 * 2**20


def l2_normalize(X: np.ndarray) -> np.ndarray:
    """Rows of ``X`` ``(n, D)`` scaled to unit norm, as float32 (zero rows stay zero)."""
    X = np.asarray(X, dtype=np.float32)
    norms = np.linalg.norm(X, axis=1, keepdims=True)
    return X / np.maximum(norms, np.finfo(np.float32).tiny)


def top_k(
    queries: torch.Tensor, bank: torch.Tensor, k: int, *, exclude: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` most similar bank rows of each query, most similar first.

    Args:
        queries: ``(q, D)`` unit rows.
        bank: ``(n, D)`` unit rows, on the same device.
        k: neighbours per query, at most ``n`` (``n - 1`` with ``exclude``).
        exclude: ``(q,)`` int64 bank index each query must not match (itself, for leave-one-out).

    Returns:
        ``(similarities, indices)``, both ``(q, k)``: float32 and int64.
    """
    block = max(1, _BLOCK_BYTES // (4 * max(1, len(bank))))
    sims, idx = [], []
    for start in range(0, len(queries), block):
        s = queries[start : start + block] @ bank.T
        if exclude is not None:
            s[torch.arange(len(s), device=s.device), exclude[start : start + block]] = -float("inf")
        top = s.topk(k, dim=1)
        sims.append(top.values)
        idx.append(top.indices)
    if not sims:
        return queries.new_zeros((0, k)), torch.zeros((0, k), dtype=torch.int64, device=queries.device)
    return torch.cat(sims), torch.cat(idx)


def vote(sims: torch.Tensor, labels: torch.Tensor, n_classes: int, temperature: float) -> torch.Tensor:
    """Class probabilities ``(q, n_classes)`` from neighbours' similarities and labels, both ``(q, k)``.

    Weights are ``exp(sim / T)``; they are computed as ``exp((sim - max_sim) / T)``, which
    the normalisation makes identical, so that a small T cannot overflow float32.
    """
    weights = torch.exp((sims - sims[:, :1]) / temperature)
    votes = torch.zeros(len(sims), n_classes, dtype=weights.dtype, device=weights.device)
    votes.scatter_add_(1, labels, weights)
    return votes / votes.sum(dim=1, keepdim=True)


class KNNHead(Head):
    """Cosine kNN with temperature-weighted votes (DINO's k-NN evaluation).

    Args:
        k: neighbours per query; ``None`` chooses it from ``k_grid`` on validation.
        k_grid: the values to try, each clipped to the number of training examples.
            DINO reports 10 and 20; the grid brackets them.
        temperature: T in ``exp(sim / T)``. 0.07: DINO's value.
        val_fraction: when ``X_val`` is not given, the share of training examples used as
            leave-one-out queries (each searched among all other training examples) to choose k;
            it caps that search at ``val_fraction`` of an all-pairs pass.
        random_state: seed choosing those queries.
        device: ``"auto"`` (GPU when torch sees one), ``"cpu"``, ``"cuda"``, ...
        n_jobs: CPU threads for torch and BLAS (``None``: the cores other processes leave idle).

    Attributes:
        classes_: ``(n_classes,)`` the labels, sorted.
        n_features_in_: embedding width D.
        features_: ``(n_train, D)`` float32 unit rows, the training set (plus ``X_val`` if given).
        labels_: ``(n_train,)`` int64 indices into ``classes_``.
        k_: the number of neighbours used.
        val_scores_: dict k -> validation accuracy (empty when ``k`` is given).
    """

    _state_arrays = ("features_", "labels_")
    _state_values = ("k_", "val_scores_")

    def __init__(
        self,
        k: int | None = None,
        *,
        k_grid: Sequence[int] = (1, 5, 10, 20, 50, 100),
        temperature: float = 0.07,
        val_fraction: float = 0.2,
        random_state: int | None = 0,
        device: str = "auto",
        n_jobs: int | None = None,
    ) -> None:
        self.k = k
        self.k_grid = k_grid
        self.temperature = temperature
        self.val_fraction = val_fraction
        self.random_state = random_state
        self.device = device
        self.n_jobs = n_jobs

    def fit(self, X: Any, y: Any, *, X_val: Any = None, y_val: Any = None) -> KNNHead:
        """Store the normalised training set; choose k on validation unless ``k`` is given.

        Args:
            X: ``(n_samples, D)`` float embeddings.
            y: ``(n_samples,)`` labels of any sortable type.
            X_val, y_val: an explicit validation set, ``(n_val, D)`` and ``(n_val,)``, searched
                against ``X`` to choose k and then added to the stored set. Without them, k is
                chosen by leave-one-out on a ``val_fraction`` sample of ``X``.

        Returns:
            self, fitted.
        """
        if not self.temperature > 0:
            raise HeadError(f"temperature={self.temperature!r} must be positive: try 0.07")
        X, y, X_val, y_val = self._check_fit_input(X, y, X_val, y_val)
        bank, labels = l2_normalize(X), y
        self.val_scores_: dict[int, float] = {}
        if self.k is not None:
            if int(self.k) < 1:
                raise HeadError(f"k={self.k!r} must be at least 1: try 10, or None to choose it")
            self.k_ = int(self.k)
        else:
            self.k_ = self._choose_k(bank, labels, X_val, y_val)
        if X_val is not None:
            bank, labels = np.concatenate([bank, l2_normalize(X_val)]), np.concatenate([labels, y_val])
        self.features_, self.labels_ = bank, labels.astype(np.int64)
        self.k_ = min(self.k_, len(bank))
        return self

    def _choose_k(
        self, bank: np.ndarray, labels: np.ndarray, X_val: np.ndarray | None, y_val: np.ndarray | None
    ) -> int:
        """Fill ``val_scores_`` over ``k_grid`` (clipped to the bank) and return the best k, the smallest on ties."""
        if X_val is not None:
            queries, truth, exclude = l2_normalize(X_val), y_val, None
            n_bank = len(bank)
        else:
            if not 0.0 < self.val_fraction <= 1.0:
                raise HeadError(f"val_fraction={self.val_fraction!r} must be in (0, 1]: try 0.2")
            n_queries = max(1, round(self.val_fraction * len(bank)))
            picked = np.sort(check_random_state(self.random_state).permutation(len(bank))[:n_queries])
            queries, truth, exclude = bank[picked], labels[picked], picked
            n_bank = len(bank) - 1
        if n_bank < 1:
            raise HeadError("choosing k needs at least 2 training examples: add examples or pass k")
        grid = sorted({min(int(k), n_bank) for k in self.k_grid if int(k) >= 1})
        if not grid:
            raise HeadError(f"k_grid={self.k_grid!r} has no value >= 1: try (1, 5, 10, 20, 50, 100)")
        device = torch_device(self.device)
        with torch_threads(self.n_jobs), torch.inference_mode():
            bank_t = torch.as_tensor(bank, device=device)
            sims, idx = top_k(
                torch.as_tensor(queries, device=device),
                bank_t,
                grid[-1],
                exclude=None if exclude is None else torch.as_tensor(exclude, device=device),
            )
            neighbour_labels = torch.as_tensor(labels, device=device)[idx]
            truth_t = torch.as_tensor(truth, device=device)
            for k in grid:
                proba = vote(sims[:, :k], neighbour_labels[:, :k], len(self.classes_), self.temperature)
                self.val_scores_[k] = float((proba.argmax(dim=1) == truth_t).float().mean())
        best = max(self.val_scores_, key=self.val_scores_.get)
        logger.debug("kNN validation accuracy by k: %s; chose k=%d", self.val_scores_, best)
        return best

    def _check_state(self) -> None:
        features = getattr(self, "features_", None)
        rows = features.shape[0] if isinstance(features, np.ndarray) and features.ndim == 2 else 0
        if rows < 1:
            raise HeadError("head state has no 'features' array of stored rows (n, D): refit the head")
        self._expect_array("features_", (rows, self.n_features_in_))
        labels = self._expect_array("labels_", (rows,), kinds="iu")
        if labels.min() < 0 or labels.max() >= len(self.classes_):
            raise HeadError(f"head state's labels are outside 0..{len(self.classes_) - 1}: refit the head")
        k = getattr(self, "k_", None)
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= rows:
            raise HeadError(f"head state's k {k!r} is not a number of neighbours from 1 to {rows}: refit the head")
        if not isinstance(self.temperature, (int, float)) or not 0 < self.temperature < float("inf"):
            raise HeadError(f"head state's temperature {self.temperature!r} is not a positive number: refit the head")

    def _proba(self, X: np.ndarray) -> np.ndarray:
        device = torch_device(self.device)
        with torch_threads(self.n_jobs), torch.inference_mode():
            bank = torch.as_tensor(self.features_, device=device)
            sims, idx = top_k(torch.as_tensor(l2_normalize(X), device=device), bank, self.k_)
            labels = torch.as_tensor(self.labels_, device=device)[idx]
            return vote(sims, labels, len(self.classes_), self.temperature).cpu().numpy()
