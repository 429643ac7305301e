"""The heads by name: the one registry the CLI, the bench and saved heads look a head up in."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from ..errors import HeadError
from .base import Head
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
