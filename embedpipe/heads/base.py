"""What the three heads share: the Head base class, its state format, the validation split, threads and devices."""


from __future__ import annotations

import contextlib
import inspect
import os
import time
from collections.abc import Iterator, Mapping
from typing import Any, ClassVar, TypeVar

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils import check_random_state
from sklearn.utils.class_weight import compute_class_weight
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_array, check_is_fitted, validate_data
from threadpoolctl import threadpool_limits

from ..errors import HeadError
from ..machine import available_cores, resolve_device

# Version of the (arrays, meta) pair written by ``Head.get_state``; bump it on any
# change that an older reader would misread.
STATE_FORMAT = 1

# Bounds on a saved head's state, checked before anything is allocated from it.
MAX_FEATURES = 1 << 17  # 131072: 16x the widest pooled timm embedding
MAX_CLASSES = 1 << 16
_SAFE_LABEL_KINDS = "iufU"  # what classes_dtype may be (besides "object"): numbers and unicode

# Input dtypes kept as they are; anything else (float16 caches, ints) becomes float32, the first:
# embeddings carry no float64 precision, and a float64 copy of a large cache would double its memory.
_FLOATS = [np.float32, np.float64]


def torch_device(device: str | torch.device) -> torch.device:
    """A head's ``device`` parameter as a torch device, resolved as everywhere (:func:`embedpipe.machine.resolve_device`)."""
    return torch.device(resolve_device(str(device)))


# How long a measurement of idle cores is reused: repeated small fits (a C sweep, a test
# suite) should not each pay the sampling window.
_FREE_CORES_TTL_S = 5.0
_FREE_CORES_WINDOW_S = 0.05  # 5 jiffies per core at USER_HZ=100: enough to tell a busy core from an idle one
_free_cores_cache: tuple[float, int] | None = None


def _cpu_times() -> tuple[int, int]:
    """``(idle, total)`` jiffies of all CPUs from ``/proc/stat``."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    return fields[3] + fields[4], sum(fields[:8])  # idle + iowait; guest time is already in user


def free_cores() -> int:
    """Cores of this process's affinity mask that other processes leave idle, at least 1.

    Measured from ``/proc/stat`` over a short window and reused for a few seconds. OpenMP
    threads spin at barriers, so a torch op with one thread per core runs several times
    slower when another process holds one of those cores; using only the idle ones avoids
    that. Falls back to :func:`available_cores` where ``/proc/stat`` does not exist.
    """
    global _free_cores_cache
    cores = available_cores()
    now = time.monotonic()
    if _free_cores_cache is not None and now - _free_cores_cache[0] < _FREE_CORES_TTL_S:
        return min(cores, _free_cores_cache[1])
    try:
        idle0, total0 = _cpu_times()
        time.sleep(_FREE_CORES_WINDOW_S)
        idle1, total1 = _cpu_times()
    except (OSError, ValueError, IndexError):
        return cores
    machine = os.cpu_count() or cores
    idle_share = (idle1 - idle0) / max(1, total1 - total0)
    free = max(1, min(cores, round(idle_share * machine)))
    _free_cores_cache = (now, free)
    return free


@contextlib.contextmanager
def torch_threads(n_jobs: int | None) -> Iterator[int]:
    """Run the block with torch's and the BLAS libraries' threads capped, then restore the caller's settings.

    Args:
        n_jobs: threads; ``None`` means the idle cores (:func:`free_cores`), a negative
            value counts back from all cores like joblib (``-1`` = all, ``-2`` = all but one).

    Yields:
        The number of threads set.
    """
    cores = available_cores()
    if n_jobs is None:
        n = free_cores()
    elif n_jobs < 0:
        n = max(1, cores + 1 + n_jobs)
    else:
        n = max(1, min(int(n_jobs), cores))
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        with threadpool_limits(limits=n):  # numpy's BLAS, used by the sklearn solver and by predict
            yield n
    finally:
        torch.set_num_threads(before)


def show(label: Any) -> str:
    """A label as users wrote it: ``7`` or ``'cat'``, not ``np.int64(7)`` or ``np.str_('cat')``."""
    return repr(label.item() if isinstance(label, np.generic) else label)


def stratified_split(
    y: np.ndarray, classes: np.ndarray, *, val_fraction: float, random_state: Any
) -> tuple[np.ndarray, np.ndarray]:
    """A deterministic stratified train/validation split of encoded labels.

    Every class keeps at least one example on each side: ``round(n_c * val_fraction)``
    clipped to ``[1, n_c - 1]`` go to validation.

    Args:
        y: ``(n_samples,)`` int class indices into ``classes``.
        classes: ``(n_classes,)`` the original labels, for error messages.
        val_fraction: share of each class that goes to validation, in (0, 1).
        random_state: seed or ``RandomState`` (scikit-learn convention).

    Returns:
        ``(train_idx, val_idx)``, two sorted int64 index arrays.

    Raises:
        HeadError: a class has a single example, so it cannot be on both sides.
    """
    if not 0.0 < val_fraction < 1.0:
        raise HeadError(f"val_fraction={val_fraction!r} must be between 0 and 1 (exclusive): try 0.2")
    counts = np.bincount(y, minlength=len(classes))
    for c in np.flatnonzero(counts < 2):
        raise HeadError(
            f"class {show(classes[c])} has {counts[c]} example; a validation split needs at least 2 per class: "
            "add examples or drop the class"
        )
    rng = check_random_state(random_state)
    val = []
    for c in range(len(classes)):
        members = np.flatnonzero(y == c)
        n_val = int(np.clip(round(len(members) * val_fraction), 1, len(members) - 1))
        val.append(rng.permutation(members)[:n_val])
    val_idx = np.sort(np.concatenate(val))
    train_mask = np.ones(len(y), dtype=bool)
    train_mask[val_idx] = False
    return np.flatnonzero(train_mask), val_idx


def _to_json(value: Any) -> Any:
    """Parameters as JSON values; dicts become ``{"__dict__": [[key, value], ...]}`` so non-str keys survive."""
    if isinstance(value, Mapping):
        return {"__dict__": [[_to_json(k), _to_json(v)] for k, v in value.items()]}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_to_json(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def _from_json(value: Any) -> Any:
    if isinstance(value, dict) and set(value) == {"__dict__"}:
        return {_from_json(k): _from_json(v) for k, v in value["__dict__"]}
    if isinstance(value, list):
        return [_from_json(v) for v in value]
    return value


H = TypeVar("H", bound="Head")


class Head(ClassifierMixin, BaseEstimator):
    """What the three heads share: label encoding, input checks, class weights and the state format.

    Subclasses implement ``fit`` and ``_proba`` (``predict_proba`` on validated input),
    and say which fitted attributes make up their state.
    """

    # Fitted ndarray attributes stored by ``get_state`` (without their trailing "_" as keys);
    # those absent on a fitted head (e.g. ``mean_`` when not standardising) are skipped.
    _state_arrays: ClassVar[tuple[str, ...]] = ()
    # Fitted JSON-able attributes stored in ``meta["fitted"]``.
    _state_values: ClassVar[tuple[str, ...]] = ()

    # --- fitting helpers -------------------------------------------------------------

    def _check_fit_input(
        self, X: Any, y: Any, X_val: Any = None, y_val: Any = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
        """Validate inputs and set ``classes_`` and ``n_features_in_``.

        Returns:
            ``(X, y, X_val, y_val)``: float32/float64 arrays of shape ``(n, n_features_in_)``
            and int64 class indices into ``classes_``; the validation pair is ``None``
            when not given.
        """
        X, y = validate_data(self, X, y, dtype=_FLOATS)
        check_classification_targets(y)
        classes, y_enc = np.unique(y, return_inverse=True)
        if len(classes) < 2:
            raise HeadError(
                f"a classifier needs at least 2 classes, but y has 1 class ({show(classes[0])}): "
                "add examples of another class"
            )
        self.classes_ = classes
        if (X_val is None) != (y_val is None):
            raise HeadError("pass both X_val and y_val, or neither")
        if X_val is None:
            return X, y_enc.astype(np.int64), None, None
        X_val = validate_data(self, X_val, dtype=_FLOATS, reset=False)
        y_val = check_array(y_val, ensure_2d=False, dtype=None)
        if len(y_val) != len(X_val):
            raise HeadError(f"X_val has {len(X_val)} rows but y_val has {len(y_val)}: pass one label per row")
        unseen = np.setdiff1d(y_val, classes)
        if len(unseen):
            raise HeadError(
                f"y_val has labels that y lacks: {unseen[:5].tolist()}; add training examples of them or drop them"
            )
        return X, y_enc.astype(np.int64), X_val.astype(X.dtype, copy=False), np.searchsorted(classes, y_val)

    def _class_weights(self, y: np.ndarray) -> np.ndarray | None:
        """Per-class weights ``(n_classes,)`` for ``class_weight`` on encoded labels ``y``, or ``None``.

        ``"balanced"`` is computed from the ``y`` given (each fit on a subset re-balances on that subset),
        as scikit-learn does.
        """
        class_weight = getattr(self, "class_weight", None)
        if class_weight is None:
            return None
        n = len(self.classes_)
        if isinstance(class_weight, Mapping):
            unknown = set(class_weight) - set(self.classes_.tolist())
            if unknown:
                raise HeadError(
                    f"class_weight names labels that y lacks: {sorted(map(str, unknown))[:5]}; use labels from y"
                )
            return np.array([float(class_weight.get(c, 1.0)) for c in self.classes_.tolist()])
        if class_weight != "balanced":
            raise HeadError(f"class_weight={class_weight!r} is not one of None, 'balanced' or a dict label -> weight")
        present = np.unique(y)
        weights = np.ones(n)
        weights[present] = compute_class_weight("balanced", classes=present, y=y)
        return weights

    # --- prediction --------------------------------------------------------------------

    def _check_predict_input(self, X: Any) -> np.ndarray:
        check_is_fitted(self)
        return validate_data(self, X, dtype=_FLOATS, reset=False)

    def predict_proba(self, X: Any) -> np.ndarray:
        """Class probabilities.

        Args:
            X: ``(n_samples, n_features_in_)`` embeddings.

        Returns:
            ``(n_samples, n_classes)`` float array whose rows sum to 1, columns in ``classes_`` order.
        """
        return self._proba(self._check_predict_input(X))

    def predict(self, X: Any) -> np.ndarray:
        """The most probable class of each row, as the original labels: ``(n_samples,)`` of ``classes_.dtype``."""
        proba = self.predict_proba(X)
        return self.classes_[np.argmax(proba, axis=1)]

    def _proba(self, X: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    # --- state without pickle ----------------------------------------------------------

    def _state_extra_arrays(self) -> dict[str, np.ndarray]:
        """Arrays beyond ``_state_arrays`` (a dict attribute such as the MLP's ``weights_``)."""
        return {}

    def _restore_extra_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        """Inverse of ``_state_extra_arrays``; receives the arrays not claimed by ``_state_arrays``."""

    def get_state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """The fitted head as plain arrays and a JSON-able dict, enough to predict without pickle.

        Returns:
            ``(arrays, meta)``. ``arrays`` maps names to C-contiguous numeric numpy arrays
            (ready for ``safetensors.numpy.save_file`` or ``np.savez``). ``meta`` holds
            ``format`` (:data:`STATE_FORMAT`), ``head`` (the class name), ``params``
            (``get_params()``), ``classes`` and ``classes_dtype`` (labels of any type),
            ``n_features_in`` and ``fitted`` (the head's JSON-able fitted values).
        """
        check_is_fitted(self)
        arrays = {
            name.rstrip("_"): np.ascontiguousarray(getattr(self, name))
            for name in self._state_arrays
            if hasattr(self, name)
        }
        arrays.update(self._state_extra_arrays())
        meta = {
            "format": STATE_FORMAT,
            "head": type(self).__name__,
            "params": {name: _to_json(value) for name, value in self.get_params(deep=False).items()},
            "classes": self.classes_.tolist(),  # ints, floats or str: scikit-learn refuses bytes labels
            "classes_dtype": self.classes_.dtype.str if self.classes_.dtype != object else "object",
            "n_features_in": int(self.n_features_in_),
            "fitted": {name: _to_json(getattr(self, name)) for name in self._state_values},
        }
        return arrays, meta

    @classmethod
    def from_state(cls: type[H], arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> H:
        """Rebuild a fitted head from :meth:`get_state`'s output; ``predict`` then gives identical results.

        Everything is checked before it is used: the meta's keys and types, the parameters the
        class takes, and each array's dtype, shape (against ``n_features_in`` and the classes)
        and finiteness.

        Raises:
            HeadError: ``meta`` is of another format version, describes another head, or does
                not fit its arrays (one line saying which part).
        """
        if not isinstance(meta, Mapping):
            raise HeadError(f"head state is a {type(meta).__name__}, not a mapping: save what get_state() returns")
        if meta.get("format") != STATE_FORMAT:
            raise HeadError(
                f"head state has format {meta.get('format')!r}, this embedpipe reads format {STATE_FORMAT}: "
                "refit the head with this version"
            )
        if meta.get("head") != cls.__name__:
            raise HeadError(f"head state is for {meta.get('head')!r}, not {cls.__name__}: load it with that class")
        missing = {"params", "classes", "classes_dtype", "n_features_in", "fitted"} - set(meta)
        if missing:
            raise HeadError(f"head state lacks {sorted(missing)}: save what get_state() returns, all of it")
        classes = _check_state_meta(cls, meta)
        params = {name: _from_json(value) for name, value in meta["params"].items()}
        for name, parameter in inspect.signature(cls.__init__).parameters.items():
            if isinstance(parameter.default, tuple) and isinstance(params.get(name), list):
                params[name] = tuple(params[name])  # JSON has no tuples
        unknown = set(params) - set(cls._get_param_names())
        if unknown:
            raise HeadError(f"head state has parameters {sorted(unknown)} that {cls.__name__} does not take: refit the head")
        head = cls(**params)
        head.classes_ = classes
        head.n_features_in_ = int(meta["n_features_in"])
        for name, value in meta["fitted"].items():
            setattr(head, name, _from_json(value))
        rest = dict(arrays)
        for name in cls._state_arrays:
            if name.rstrip("_") in rest:
                setattr(head, name, np.asarray(rest.pop(name.rstrip("_"))))
        head._restore_extra_arrays(rest)
        device, n_jobs = getattr(head, "device", "cpu"), getattr(head, "n_jobs", None)
        if not isinstance(device, str) or not (n_jobs is None or (isinstance(n_jobs, int) and not isinstance(n_jobs, bool))):
            raise HeadError(f"head state's device {device!r} or n_jobs {n_jobs!r} is not a device name and a thread count: refit the head")
        head._check_state()
        return head

    # --- checks of a restored state ------------------------------------------------------

    def _check_state(self) -> None:
        """Refuse a restored state that ``predict`` could not use; subclasses check their own arrays and values."""

    def _expect_array(self, name: str, shape: tuple[int, ...], *, kinds: str = "f") -> np.ndarray:
        """The fitted array ``name``, checked to be numeric of a kind in ``kinds``, of ``shape`` and finite."""
        array = getattr(self, name, None)
        if not isinstance(array, np.ndarray):
            raise HeadError(f"head state has no {name.rstrip('_')!r} array: refit the head")
        if array.dtype.kind not in kinds:
            raise HeadError(f"head state's {name.rstrip('_')!r} array is {array.dtype}, not a {'float' if kinds == 'f' else 'integer'} array: refit the head")
        if array.shape != shape:
            raise HeadError(
                f"head state's {name.rstrip('_')!r} array has shape {array.shape}, but {len(self.classes_)} classes and "
                f"{self.n_features_in_} features need {shape}: refit the head"
            )
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            raise HeadError(f"head state's {name.rstrip('_')!r} array holds NaN or infinite values: refit the head")
        return array


def _check_state_meta(cls: type, meta: Mapping[str, Any]) -> np.ndarray:
    """The types in a state's meta, and its classes as an array (bounded before it is built)."""
    if not isinstance(meta["params"], dict) or not isinstance(meta["fitted"], dict):
        raise HeadError("head state's params and fitted values must be JSON objects: refit the head")
    unknown = set(meta["fitted"]) - set(cls._state_values)
    if unknown:
        raise HeadError(f"head state has fitted values {sorted(unknown)} that {cls.__name__} does not store: refit the head")
    n_features = meta["n_features_in"]
    if not isinstance(n_features, int) or isinstance(n_features, bool) or not 1 <= n_features <= MAX_FEATURES:
        raise HeadError(f"head state's n_features_in {n_features!r} is not a width from 1 to {MAX_FEATURES}: refit the head")
    labels = meta["classes"]
    if (not isinstance(labels, list) or not 2 <= len(labels) <= MAX_CLASSES
            or not all(isinstance(c, (str, int, float)) and not isinstance(c, bool) for c in labels)):
        raise HeadError(f"head state's classes must be a list of 2 to {MAX_CLASSES} labels: refit the head")
    dtype_text = meta["classes_dtype"]
    try:
        dtype = np.dtype(dtype_text) if dtype_text != "object" else np.dtype(object)
    except TypeError:
        dtype = None
    if not isinstance(dtype_text, str) or dtype is None or (dtype.kind not in _SAFE_LABEL_KINDS + "O") or dtype.itemsize > 4096:
        raise HeadError(f"head state's classes_dtype {dtype_text!r} is not a label dtype (numbers, text): refit the head")
    try:
        classes = np.asarray(labels, dtype=dtype)
        repeated = len(np.unique(classes)) != len(classes)
    except (TypeError, ValueError, OverflowError):
        raise HeadError(f"head state's classes do not fit their dtype {dtype_text!r}: refit the head") from None
    if repeated or (classes.dtype.kind == "f" and not np.isfinite(classes).all()):
        raise HeadError("head state's classes repeat or are not finite: refit the head")
    return classes
