"""Metrics as pure functions of labels and probabilities, and the plain-words diagnosis."""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.metrics import balanced_accuracy_score, confusion_matrix, f1_score, recall_score, top_k_accuracy_score


def classification_metrics(y_true: np.ndarray, proba: np.ndarray, classes: np.ndarray) -> dict[str, Any]:
    """Accuracy, balanced accuracy, macro-F1, top-5, per-class recall and the confusion matrix.

    Args:
        y_true: (N,) labels, in the same label space as ``classes``.
        proba: (N, C) class probabilities, columns ordered as ``classes``.
        classes: (C,) the head's classes.
    """
    y_true = np.asarray(y_true)
    predicted = np.asarray(classes)[np.argmax(proba, axis=1)]
    labels = list(classes)
    k = min(5, len(labels) - 1) if len(labels) > 2 else 1
    top_k = (
        float(top_k_accuracy_score(y_true, proba, k=k, labels=labels)) if len(labels) > 2 else float(np.mean(predicted == y_true))
    )
    recall = recall_score(y_true, predicted, labels=labels, average=None, zero_division=0)
    return {
        "n": int(len(y_true)),
        "accuracy": float(np.mean(predicted == y_true)),
        "balanced_accuracy": float(balanced_accuracy_score(y_true, predicted)),
        "macro_f1": float(f1_score(y_true, predicted, labels=labels, average="macro", zero_division=0)),
        f"top{k}_accuracy": top_k,
        "per_class_recall": {str(c): float(r) for c, r in zip(labels, recall)},
        "confusion_matrix": confusion_matrix(y_true, predicted, labels=labels).tolist(),
    }


def diagnose(train_accuracy: float, val_accuracy: float, *, chance: float) -> str:
    """A plain-words reading of the train/validation gap, and the likely next step."""
    gap = train_accuracy - val_accuracy
    if val_accuracy < chance + 0.1 * (1 - chance):
        return (
            "barely above chance: check the labels, or the backbone does not see what separates these classes; "
            "try another backbone (embedpipe bench) or fine-tune (embedpipe fine-tune)"
        )
    if gap > 0.15:
        return (
            f"overfitting (train {train_accuracy:.1%} vs validation {val_accuracy:.1%}): more labelled images, "
            "stronger regularisation, or a smaller head help more than fine-tuning"
        )
    if train_accuracy < 0.9:
        return (
            f"underfitting (train {train_accuracy:.1%}): the frozen features do not separate the classes; "
            "fine-tuning the top blocks at a low learning rate (embedpipe fine-tune) is the likely next step"
        )
    return f"healthy: train {train_accuracy:.1%}, validation {val_accuracy:.1%}"
