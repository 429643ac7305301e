"""Classifier heads trained on cached embeddings, all scikit-learn estimators.

Each head takes ``X`` of shape ``(n_samples, n_features)`` (float embeddings from
the cache) and ``y`` of shape ``(n_samples,)`` (any hashable labels), picks its
hyper-parameter on a validation split, and exposes its fitted state as plain
numpy arrays plus a JSON-able dict, so it can be stored without pickle::

    head = HEADS["logreg"]().fit(X, y)
    arrays, meta = head.get_state()            # e.g. safetensors.numpy.save_file(arrays, ...) + json.dumps(meta)
    head = from_state(arrays, meta)            # or LogisticProbe.from_state(arrays, meta)
    head.predict(X_test)

The shared machinery of the three heads (state format, label encoding,
validation split, device and thread handling) lives in :mod:`.base`;
the heads themselves are in :mod:`.logreg`, :mod:`.mlp` and :mod:`.knn`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from ..errors import HeadError
from .base import STATE_FORMAT, Head
from .knn import KNNHead
from .logreg import LogisticProbe
from .mlp import MLPHead

# Registry: name used on the command line -> head class; each is a scikit-learn classifier with
# ``fit(X, y, *, X_val=None, y_val=None)`` and ``get_state()`` / ``from_state(arrays, meta)``.
HEADS: dict[str, type[Head]] = {"logreg": LogisticProbe, "mlp": MLPHead, "knn": KNNHead}


def from_state(arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> Head:
    """Rebuild whichever head ``meta["head"]`` names (see :meth:`Head.from_state`)."""
    by_class = {cls.__name__: cls for cls in HEADS.values()}
    if meta.get("head") not in by_class:
        raise HeadError(f"head state names {meta.get('head')!r}, which is none of {sorted(by_class)}: refit the head")
    return by_class[meta["head"]].from_state(arrays, meta)


__all__ = ["HEADS", "STATE_FORMAT", "Head", "KNNHead", "LogisticProbe", "MLPHead", "from_state"]
