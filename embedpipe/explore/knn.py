"""Exact cosine top-k on arrays: the one search every explore stage (neighbours, audit) runs.

Rows are L2-normalised, so a dot product is the cosine similarity. The (queries x bank) similarity
matrix is never held whole: queries go in blocks sized so that one block of similarities takes
about :data:`BLOCK_BYTES`, and only each block's top k is kept, so memory is
``O(bank + block + queries x k)`` whatever the sizes. On CUDA (fp16) and on CPUs with native bf16,
the block product runs in low precision and is made exact again:

1. the low-precision block picks ``k + margin`` candidates per query;
2. the candidates are re-scored in fp32, and the top k of those are returned;
3. a bound proves, query by query, that no row outside the candidates could have beaten the k-th:
   for unit rows rounded to a format with unit roundoff ``u``, a low-precision dot product is within
   ``eps = 2u + u^2 + D * 2^-24`` of the fp32 one (input rounding, plus fp32 accumulation), so a row
   left out scores at most ``lowest candidate's low-precision score + eps``. Queries the bound
   cannot certify are searched again in fp32.

So every precision returns the fp32 answer; bf16 only changes how fast it comes. Ties are broken
towards the lower row index, as a stable sort does.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

from ..errors import ExploreError

logger = logging.getLogger(__name__)

# One block of float32 similarities: large enough that each block is one efficient matrix product
# (the benchmark's 100k x 1280 search reaches the plain matmul's rate at this size), small enough
# for any laptop or GPU.
BLOCK_BYTES = 256 * 2**20
# Extra candidates the low-precision pass keeps per query beyond k, for the fp32 re-scoring.
# 16: bf16 similarities of unit rows are off by at most ~0.008, so a handful of rows can swap across
# the k-th place; 16 covers that for all but the most crowded queries, which the bound sends to fp32.
MARGIN = 16
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_UNIT_ROUNDOFF = {"bf16": 2.0**-8, "fp16": 2.0**-11}


@dataclass
class Search:
    """What :func:`search` found, and how."""

    similarities: np.ndarray  # float32 (q, k): cosine similarity, most similar first
    indices: np.ndarray  # int64 (q, k): bank rows
    precision: str  # of the block products: fp32, bf16 or fp16 (the results are fp32-exact either way)
    device: str
    rechecked: int = 0  # queries the bound could not certify, searched again in fp32


def normalize(X: np.ndarray) -> np.ndarray:
    """Rows of ``X`` (n, D) scaled to unit L2 norm, as float32; zero rows stay zero."""
    X = np.asarray(X, dtype=np.float32)
    norms = np.linalg.norm(X, axis=1, keepdims=True)
    return X / np.maximum(norms, np.finfo(np.float32).tiny)


def resolve_search_precision(precision: str, device: str) -> str:
    """``auto``: fp16 on CUDA, bf16 on CPUs with native bf16, fp32 elsewhere.

    fp16 rather than bf16 on CUDA: unit rows cannot overflow it and its 8x finer rounding lets the
    bound certify nearly every query (on ELPV's Lite0 embeddings, where a row's nearest neighbours
    lie within 0.01 of each other, bf16 left 417 of 2,624 queries to re-search and fp16 none).
    """
    from ..machine import cpu_has_native_bf16

    if precision not in PRECISIONS:
        raise ExploreError(f"unknown precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    if precision != "auto":
        return precision
    if device.startswith("cuda"):
        return "fp16"
    return "bf16" if device == "cpu" and cpu_has_native_bf16() else "fp32"


def search(
    queries: np.ndarray,
    bank: np.ndarray,
    k: int,
    *,
    exclude_self: bool = False,
    device: str = "auto",
    precision: str = "auto",
    block_bytes: int = BLOCK_BYTES,
) -> Search:
    """The ``k`` most cosine-similar bank rows of each query, exactly.

    Args:
        queries: (q, D) float array; rows need not be normalised.
        bank: (n, D) float array of the same width.
        k: neighbours per query: at most n (n - 1 with ``exclude_self``).
        exclude_self: queries are the bank itself (q == n); row i never matches itself.
        device: ``auto`` (the GPU when there is one), ``cpu``, ``cuda``...
        precision: of the block products (``auto``, ``fp32``, ``bf16``, ``fp16``); see the module docstring.
        block_bytes: memory of one block of float32 similarities.

    Returns:
        A :class:`Search` with (q, k) similarities (float32) and indices (int64).
    """
    import torch

    from ..machine import resolve_device

    queries, bank = check_arrays(queries, bank, k, exclude_self=exclude_self)
    device = resolve_device(device)
    precision = resolve_search_precision(precision, device)
    q_t = torch.from_numpy(normalize(queries)).to(device)
    b_t = q_t if exclude_self else torch.from_numpy(normalize(bank)).to(device)
    n = len(b_t)
    low = None if precision == "fp32" else b_t.to(torch.bfloat16 if precision == "bf16" else torch.float16)
    wanted = k if low is None else min(n - int(exclude_self), k + MARGIN)
    # A block's similarities (q x n), and in low precision its candidates' rows too (q x wanted x D), fit block_bytes.
    block = max(1, block_bytes // (4 * max(1, n, 0 if low is None else wanted * q_t.shape[1])))
    sims = np.empty((len(q_t), k), dtype=np.float32)
    idx = np.empty((len(q_t), k), dtype=np.int64)
    rechecked = 0
    with torch.inference_mode():
        for start in range(0, len(q_t), block):
            q = q_t[start : start + block]
            self_rows = torch.arange(start, start + len(q), device=device) if exclude_self else None
            if low is None:
                s, i = _top(q @ b_t.T, k, self_rows)
            else:
                s, i, unsure = _top_low_precision(q, b_t, low, k, wanted, self_rows, precision)
                if unsure.any():  # the bound could not certify these queries: search them again in fp32
                    rechecked += int(unsure.sum())
                    rows = unsure.nonzero().squeeze(1)
                    s[rows], i[rows] = _top(q[rows] @ b_t.T, k, None if self_rows is None else self_rows[rows])
            sims[start : start + len(q)] = s.float().cpu().numpy()
            idx[start : start + len(q)] = i.cpu().numpy()
    if rechecked:
        logger.info("%d of %d queries re-searched in fp32 (the %s bound could not certify them)", rechecked, len(q_t), precision)
    return Search(similarities=sims, indices=idx, precision=precision, device=device, rechecked=rechecked)


def check_arrays(queries: np.ndarray, bank: np.ndarray, k: int, *, exclude_self: bool) -> tuple[np.ndarray, np.ndarray]:
    """The two arrays, after refusing shapes that do not match and a k the bank cannot give."""
    queries, bank = np.asarray(queries), np.asarray(bank)
    if queries.ndim != 2 or bank.ndim != 2 or queries.shape[1] != bank.shape[1]:
        raise ExploreError(f"queries {queries.shape} and bank {bank.shape} must be 2-D arrays of the same width")
    if exclude_self and len(queries) != len(bank):
        raise ExploreError("exclude_self needs the queries to be the bank itself")
    limit = len(bank) - int(exclude_self)
    if not 1 <= k <= limit:
        raise ExploreError(f"k={k} neighbours asked for, but only {limit} rows can be neighbours: pass --k between 1 and {limit}")
    return queries, bank


def _top(block, k: int, self_rows):  # noqa: ANN001, ANN202 - torch tensors; torch is imported lazily
    """Top k of a (q, n) similarity block, ties to the lower index; the query's own row excluded."""
    import torch

    if self_rows is not None:
        block[torch.arange(len(block), device=block.device), self_rows] = -math.inf
    values, indices = block.topk(k, dim=1)
    return _tie_order(values, indices)


def _tie_order(values, indices):  # noqa: ANN001, ANN202
    """Reorder each row by (similarity descending, index ascending): equal similarities come in row order."""
    import torch

    order = torch.argsort(indices, dim=1, stable=True)  # index ascending ...
    values, indices = values.gather(1, order), indices.gather(1, order)
    order = torch.argsort(-values, dim=1, stable=True)  # ... then similarity descending, keeping that order on ties
    return values.gather(1, order), indices.gather(1, order)


def _top_low_precision(q, bank, low, k: int, wanted: int, self_rows, precision: str):  # noqa: ANN001, ANN202
    """Candidates from a bf16/fp16 block, re-scored in fp32; also which queries the error bound leaves unsure."""
    import torch

    block = (q.to(low.dtype) @ low.T).float()
    if self_rows is not None:
        block[torch.arange(len(block), device=block.device), self_rows] = -math.inf
    low_values, candidates = block.topk(wanted, dim=1)
    del block
    exact = torch.einsum("qd,qmd->qm", q, bank[candidates])  # fp32 re-scoring of the candidates
    values, order = exact.topk(k, dim=1)
    values, indices = _tie_order(values, candidates.gather(1, order))
    u = _UNIT_ROUNDOFF[precision]
    eps = 2 * u + u * u + q.shape[1] * 2.0**-24
    # A row outside the candidates scored at most the lowest candidate's low-precision value, so its
    # fp32 similarity is at most that + eps; the answer is certain when the k-th is above it. When the
    # candidates are every other row, nothing was left out.
    everything = wanted >= bank.shape[0] - int(self_rows is not None)
    unsure = (values[:, -1] <= low_values[:, -1] + eps) & (not everything)
    return values, indices, unsure
