"""Numpy helpers for the per-image columns every stage holds: positions, runs, and the order of 32-byte digests.

Kept below both the data sources and the cache (numpy only), since both use them: the cache sorts
image digests to search its shards and to embed each image once, the seeded split sorts the sha256
of each path, packed strings and the store lookup both expand runs into positions.
"""

from __future__ import annotations

import numpy as np

RAW_DIGEST_DTYPE = np.dtype("V32")  # one sha256 as raw bytes (half its hex); numpy compares them byte by byte
_KEY_ROWS = 65536  # digests keyed at a time


def narrow(positions: np.ndarray, rows: int) -> np.ndarray:
    """Positions into ``rows`` rows as int32 while they fit: half of numpy's int64, for arrays held beside a dataset's columns."""
    return positions.astype(np.int32) if rows < 2**31 else positions


def run_positions(lengths: np.ndarray) -> np.ndarray:
    """Each element's position within its run, for consecutive runs of these lengths (int64)."""
    return np.arange(int(lengths.sum()), dtype=np.int64) - np.repeat(np.cumsum(lengths) - lengths, lengths)


def digest_keys(digests: np.ndarray) -> np.ndarray:
    """The first 8 bytes of each digest (``V32``) as a uint64, most significant first: sorted digests give sorted keys."""
    keys = np.empty(len(digests), dtype=np.uint64)
    for start in range(0, len(digests), _KEY_ROWS):  # a block at a time: the scratch stays small
        part = np.ascontiguousarray(digests[start : start + _KEY_ROWS], dtype=RAW_DIGEST_DTYPE)
        keys[start : start + len(part)] = np.ascontiguousarray(part.view(np.uint8).reshape(-1, 32)[:, :8]).view(">u8").ravel()
    return keys


def digest_order(digests: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``np.argsort(digests, kind="stable")`` of ``V32`` digests, narrowed (:func:`narrow`), and their keys in that order.

    By 64-bit key first (numpy sorts uint64 3x faster than 32-byte values), then, by whole digest,
    the rare runs of equal keys whose digests differ (a digest given twice is a run too, already in order).
    """
    keys = digest_keys(digests)
    order = narrow(np.argsort(keys, kind="stable"), len(digests))
    keys = keys[order]
    equal = np.flatnonzero(keys[1:] == keys[:-1])
    differ = equal[digests[order[equal]] != digests[order[equal + 1]]]
    for key in np.unique(keys[differ]):  # a run per key that distinct digests share
        lo, hi = int(np.searchsorted(keys, key, "left")), int(np.searchsorted(keys, key, "right"))
        run = order[lo:hi]
        order[lo:hi] = run[np.argsort(digests[run], kind="stable")]
    return order, keys
