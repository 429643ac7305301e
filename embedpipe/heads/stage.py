"""The heads stage: fit a head on an exported file, evaluate a saved head, predict images end to end.

>>> fit = fit_head("cache/elpv-tf_efficientnet_lite0-*.h5", "logreg", out="heads/elpv-logreg")
>>> evaluate("heads/elpv-logreg", "cache/other.h5")
>>> predictions, failed = predict("heads/elpv-logreg", "new-images/")
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .._progress import ProgressFactory, no_progress
from ..config import RunConfig
from ..errors import HeadError
from ..evaluate import classification_metrics, diagnose
from ..extraction import extract, load, spec_of
from .headfile import HeadInfo, load_head, save_head
from .registry import HEADS


@dataclass
class FitResult:
    """What :func:`fit_head` did."""

    head: Any  # the fitted estimator
    kind: str
    out: Path | None
    metrics: dict[str, dict[str, Any]]  # split -> metrics (see embedpipe.evaluate)
    chosen: dict[str, Any]  # the hyper-parameter picked on validation (C, k, best epoch)
    fit_seconds: float
    diagnosis: str
    n_train: int = 0
    n_val: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "out": str(self.out) if self.out else None,
            "metrics": self.metrics,
            "chosen": self.chosen,
            "fit_seconds": self.fit_seconds,
            "diagnosis": self.diagnosis,
            "n_train": self.n_train,
            "n_val": self.n_val,
        }


# Heads whose fit ends with a refit on train + val -> their chosen hyper-parameter, fixed.
_REFIT_ON_VAL: dict[str, Callable[[Any], dict[str, Any]]] = {
    "logreg": lambda head: {"Cs": [head.C_]},
    "knn": lambda head: {"k": head.k_},
}


def few_shot_indices(labels: np.ndarray, shots: int, *, seed: int) -> np.ndarray:
    """``shots`` examples per class (all of a smaller class), chosen by ``seed``; sorted row indices."""
    rng = np.random.default_rng(seed)
    chosen = [rng.permutation(np.flatnonzero(labels == c))[:shots] for c in np.unique(labels)]
    return np.sort(np.concatenate(chosen))


def _chosen(head: Any) -> dict[str, Any]:
    found = {name.rstrip("_"): getattr(head, name) for name in ("C_", "k_", "best_epoch_") if hasattr(head, name)}
    return {k: (v.item() if isinstance(v, np.generic) else v) for k, v in found.items()}


def fit_head(
    embeddings: str | Path,
    kind: str = "logreg",
    *,
    out: str | Path | None = None,
    params: dict[str, Any] | None = None,
    shots: int | None = None,
    seed: int = 0,
    output: str = "embeddings",
    holdout: bool = False,
    loaded: tuple[np.ndarray, np.ndarray, dict[str, Any]] | None = None,
) -> FitResult:
    """Fit a head on an exported file's train split, choose its hyper-parameter on val, report every split.

    Args:
        embeddings: a file written by :func:`extract` (labelled data).
        kind: ``logreg``, ``mlp`` or ``knn`` (:data:`embedpipe.heads.HEADS`).
        out: folder to save the head to (``head.json`` + ``arrays.safetensors``); None to not save.
        params: the head's keyword parameters (e.g. ``{"Cs": 20, "solver": "sklearn"}``).
        shots: keep only this many training images per class (few-shot), chosen by ``seed``.
        seed: few-shot sampling seed.
        output: which stored output to train on.
        holdout: ignore the val split while fitting: the head holds out its own validation share of
            the training rows to choose its hyper-parameter, so it sees no labels but those rows'
            (how ``bench`` counts a label budget); val is then scored as unseen data.
        loaded: what ``load(embeddings, output=output)`` returned, when the caller has it already
            (``bench`` fits many heads on one file and reads it once).
    """
    if kind not in HEADS:
        raise HeadError(f"unknown head {kind!r}: choose one of {', '.join(HEADS)}")
    X, y, meta = load(embeddings, output=output) if loaded is None else loaded
    classes = np.asarray(meta["class_names"])
    if not len(classes) or (y < 0).all():
        raise HeadError(f"{embeddings} holds unlabelled images: extract a labelled dataset (class folders or a manifest with labels)")
    if meta["split"] is None:
        raise HeadError(f"{embeddings} has no split: re-extract it (labelled data gets a seeded split)")
    split = meta["split"]
    names = classes[y]
    parts = {s: np.flatnonzero(split == s) for s in ("train", "val", "test")}
    train = parts["train"]
    if shots is not None:
        if shots < 1:
            raise HeadError(f"--shots must be at least 1, not {shots}")
        train = train[few_shot_indices(y[train], shots, seed=seed)]
    if not len(train):
        raise HeadError(f"{embeddings} has no training rows: check its split (embedpipe cache info)")
    head = HEADS[kind](**(params or {}))
    val = parts["val"]
    started = time.perf_counter()
    if not holdout and len(val) and set(np.unique(names[val])) <= set(np.unique(names[train])):
        head.fit(X[train], names[train], X_val=X[val], y_val=names[val])
    else:
        head.fit(X[train], names[train])  # the head holds out its own validation share
    fit_seconds = time.perf_counter() - started
    metrics = _score(head, kind, X, names, {"train": train, "val": val, "test": parts["test"]}, refit_seen_val=not holdout)
    reference = metrics.get("val") or metrics.get("test") or metrics["train"]
    diagnosis = diagnose(metrics["train"]["accuracy"], reference["accuracy"], chance=1 / len(head.classes_))
    result = FitResult(head=head, kind=kind, out=Path(out) if out else None, metrics=metrics, chosen=_chosen(head),
                       fit_seconds=fit_seconds, diagnosis=diagnosis, n_train=len(train), n_val=len(val))
    if out:
        save_head(out, head, HeadInfo(
            kind=kind, output=output, backbone_spec=meta.get("backbone_spec"), embedding_config=meta["embedding_config"],
            cache_key=meta["cache_key"], class_names=classes.tolist(),
            trained_on={"file": str(Path(embeddings).resolve()), "dataset_fingerprint": meta["dataset_fingerprint"],
                        "rows": int(len(train)), "shots": shots, "seed": seed, "holdout": holdout},
            metrics=metrics, chosen=result.chosen, fit_seconds=fit_seconds,
        ))
    return result


def _score(head: Any, kind: str, X: np.ndarray, names: np.ndarray, parts: dict[str, np.ndarray], *,
           refit_seen_val: bool) -> dict[str, dict[str, Any]]:
    """Metrics of each non-empty split (row indices in ``parts``), val scored as data the head has not seen."""
    from sklearn.base import clone

    metrics = {}
    for name, rows in parts.items():
        if len(rows):
            scorer = head
            if name == "val" and kind in _REFIT_ON_VAL and refit_seen_val:
                # This head refits on train + val, so it has seen val: score val with the same
                # hyper-parameter fitted on train alone.
                scorer = clone(head).set_params(**_REFIT_ON_VAL[kind](head)).fit(X[parts["train"]], names[parts["train"]])
            metrics[name] = classification_metrics(names[rows], scorer.predict_proba(X[rows]), head.classes_)
    return metrics


def _check_same_pipeline(info: dict[str, Any], attrs: dict[str, Any], where: str) -> None:
    if info["cache_key"] != attrs.get("cache_key"):
        ours, theirs = info["embedding_config"], attrs.get("embedding_config") or {}
        differs = [k for k in ours if ours.get(k) != theirs.get(k)]
        raise HeadError(
            f"{where} was made with another backbone or preprocessing than the head expects "
            f"(differs in: {', '.join(differs) or 'format'}; head wants {ours.get('backbone')} {ours.get('weights', '')[:20]}): "
            "extract with the head's backbone options, or fit a head on these embeddings"
        )


def _check_width(head: Any, X: np.ndarray, where: str) -> None:
    if X.shape[1] != head.n_features_in_:
        raise HeadError(f"{where} holds {X.shape[1]}-wide embeddings, the head reads {head.n_features_in_}: "
                        "fit a head on these embeddings, or re-extract them with the head's backbone options")


def evaluate(head_path: str | Path, embeddings: str | Path, *, split: str | None = None) -> dict[str, Any]:
    """Metrics of a saved head on an exported file (one split, or each split it has).

    Raises:
        HeadError: the file was made with another backbone/preprocessing, or has no labels.
    """
    head, info = load_head(head_path)
    X, y, meta = load(embeddings, output=info.get("output", "embeddings"))
    _check_same_pipeline(info, meta, str(embeddings))
    _check_width(head, X, str(embeddings))
    if (y < 0).all():
        raise HeadError(f"{embeddings} has no labels to evaluate against: use `embedpipe predict` for unlabelled images")
    names = np.asarray(meta["class_names"])[y]
    unknown = sorted(set(names) - set(head.classes_.tolist()))
    if unknown:
        raise HeadError(f"{embeddings} has classes the head never saw ({', '.join(unknown[:5])}): fit a head that includes them")
    groups = {"all": np.arange(len(y))} if meta["split"] is None else {s: np.flatnonzero(meta["split"] == s) for s in np.unique(meta["split"])}
    if split is not None:
        if split not in groups:
            raise HeadError(f"{embeddings} has no {split!r} split (it has {', '.join(groups)})")
        groups = {split: groups[split]}
    return {name: classification_metrics(names[rows], head.predict_proba(X[rows]), head.classes_) for name, rows in groups.items() if len(rows)}


@dataclass
class Prediction:
    path: str
    label: str
    top: list[tuple[str, float]]  # (class, probability), most probable first


def predict(
    head_path: str | Path,
    source: str | Path,
    *,
    top_k: int = 3,
    cache_dir: str | Path = "cache",
    run: RunConfig = RunConfig(),
    progress: ProgressFactory = no_progress,
) -> tuple[list[Prediction], list[tuple[str, str]]]:
    """Images -> the head's backbone (through the cache) -> the head -> labels.

    Returns:
        ``(predictions, failed)``: one :class:`Prediction` per decodable image, and the
        (path, reason) of images that could not be read.
    """
    head, info = load_head(head_path)
    # The head's own precision and dtype, so the cache key matches whatever device this runs on.
    result = extract(source, spec_of(info), cache_dir=cache_dir, run=run, progress=progress)
    X, _, meta = load(result.path, output=info.get("output", "embeddings"))
    _check_same_pipeline(info, meta, str(result.path))
    _check_width(head, X, str(result.path))
    proba = head.predict_proba(X) if len(X) else np.empty((0, len(head.classes_)))
    k = max(1, min(top_k, len(head.classes_)))
    order = np.argsort(-proba, axis=1)[:, :k]
    predictions = [
        Prediction(path=p, label=str(head.classes_[o[0]]), top=[(str(head.classes_[j]), float(row[j])) for j in o])
        for p, row, o in zip(meta["paths"], proba, order)
    ]
    return predictions, result.failed
