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
the heads themselves are in :mod:`.logreg`, :mod:`.mlp` and :mod:`.knn`; the name -> class
registry in :mod:`.registry`. The stage that uses them on exported files (``fit_head``,
``evaluate``, ``predict``) is :mod:`.stage`, and a saved head's folder format :mod:`.headfile`.
"""

from __future__ import annotations

from .base import STATE_FORMAT, Head
from .headfile import HeadInfo, load_head, save_head
from .knn import KNNHead
from .logreg import LogisticProbe
from .mlp import MLPHead
from .registry import HEADS, from_state
from .stage import FitResult, Prediction, evaluate, few_shot_indices, fit_head, predict

__all__ = ["HEADS", "STATE_FORMAT", "FitResult", "Head", "HeadInfo", "KNNHead", "LogisticProbe", "MLPHead", "Prediction",
           "evaluate", "few_shot_indices", "fit_head", "from_state", "load_head", "predict", "save_head"]
