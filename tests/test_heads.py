"""Heads: they learn, they match independent computations, they round-trip without pickle.

Fast by design (small synthetic embeddings): the whole file runs in well under a minute
on two cores. The timing comparison of the solvers lives outside the test suite.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.datasets import make_blobs
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss, recall_score
from sklearn.preprocessing import StandardScaler
from sklearn.utils.estimator_checks import parametrize_with_checks

from embedpipe.errors import EmbedpipeError, HeadError
from embedpipe.heads import HEADS, STATE_FORMAT, KNNHead, LogisticProbe, MLPHead, from_state
from embedpipe.heads.logreg import objective

# Small settings that keep each fit in milliseconds; every head still has to learn.
FAST = {
    "logreg": {"Cs": 8, "max_iter": 200},
    "mlp": {"hidden": 64, "max_epochs": 40, "patience": 5},
    "knn": {},
}


def blobs(n: int, *, centers: int = 5, features: int = 64, std: float = 1.0, seed: int = 0):
    """``(X, y)`` Gaussian blobs: ``(n, features)`` float32 and ``(n,)`` int labels."""
    X, y = make_blobs(n_samples=n, centers=centers, n_features=features, cluster_std=std, random_state=seed)
    return X.astype(np.float32), y


def overlapping(n: int, *, classes: int, features: int, noise: float, seed: int):
    """``(X, y)`` class means plus large noise: not separable, so every C has a finite optimum."""
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(classes, features))
    y = rng.permutation(np.arange(n) % classes)
    return (means[y] + rng.normal(scale=noise, size=(n, features))).astype(np.float32), y


def make(name: str, **params):
    return HEADS[name](**{**FAST[name], **params})


# --- learning ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(HEADS))
def test_head_learns_separable_blobs(name: str) -> None:
    X, y = blobs(750, std=4.0)
    head = make(name).fit(X[:500], y[:500])
    assert head.score(X[500:], y[500:]) > 0.95
    proba = head.predict_proba(X[500:])
    assert proba.shape == (250, 5)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("name", sorted(HEADS))
def test_string_labels_round_trip(name: str) -> None:
    X, y = blobs(300, centers=3, features=16, std=2.0, seed=1)
    names = np.array(["cat", "dog", "eel"])[y]
    head = make(name).fit(X[:200], names[:200])
    assert head.classes_.tolist() == ["cat", "dog", "eel"]
    predicted = head.predict(X[200:])
    assert predicted.dtype.kind == "U"
    assert set(predicted) <= {"cat", "dog", "eel"}
    assert np.mean(predicted == names[200:]) > 0.9


@pytest.mark.parametrize("name", sorted(HEADS))
def test_binary_problem_keeps_two_probability_columns(name: str) -> None:
    X, y = blobs(200, centers=2, features=8, std=2.0, seed=2)
    head = make(name).fit(X, y)
    assert head.predict_proba(X).shape == (200, 2)
    assert head.score(X, y) > 0.9


# --- the linear probe against scikit-learn --------------------------------------------------


@pytest.mark.parametrize("classes", [2, 4])
@pytest.mark.parametrize("class_weight", [None, "balanced"])
def test_torch_solver_matches_sklearn_at_fixed_C(classes: int, class_weight: str | None) -> None:
    X, y = overlapping(600, classes=classes, features=20, noise=2.0, seed=3)
    if class_weight:
        keep = (y != 0) | (np.arange(len(y)) % 3 == 0)  # make class 0 a minority
        X, y = X[keep], y[keep]
    C = 0.05
    probe = LogisticProbe(Cs=[C], solver="torch", class_weight=class_weight, tol=1e-6, device="cpu").fit(X, y)
    Z = StandardScaler().fit_transform(X.astype(np.float64))
    reference = LogisticRegression(C=C, tol=1e-10, max_iter=10_000, class_weight=class_weight).fit(Z, y)

    assert np.mean(probe.predict(X) == reference.predict(Z)) >= 0.99
    weights = None
    if class_weight:
        weights = len(y) / (classes * np.bincount(y))
    ours = objective(Z, y, probe.coef_, probe.intercept_, C=C, class_weights=weights)
    theirs = objective(Z, y, reference.coef_, reference.intercept_, C=C, class_weights=weights)
    assert abs(ours - theirs) <= 1e-3 * abs(theirs)
    assert ours == pytest.approx(probe.objective(X, y), rel=1e-5)
    assert probe.coef_.shape == reference.coef_.shape
    scale = np.abs(reference.coef_).max()
    np.testing.assert_allclose(probe.coef_, reference.coef_, atol=2e-3 * scale)
    np.testing.assert_allclose(
        probe.intercept_ - probe.intercept_.mean(),
        reference.intercept_ - reference.intercept_.mean(),
        atol=2e-3 * max(1.0, np.abs(reference.intercept_).max()),
    )


def test_curvature_carried_along_the_C_path_reaches_each_cold_optimum() -> None:
    """Pairs kept from the previous C (shifted by the penalty change) must not bias the next solution."""
    X, y = overlapping(800, classes=5, features=24, noise=2.5, seed=7)
    Z = StandardScaler().fit_transform(X.astype(np.float64))
    Cs = np.logspace(-3, 2, 6)
    solver = LogisticProbe(Cs=list(Cs), solver="torch", tol=1e-6, device="cpu")
    solver.classes_ = np.unique(y)
    path = solver._solver(solver._fit_normalizer(X), y)
    state = None
    for C in Cs:
        coef, intercept, _ = path.solve(float(C), state)
        state = coef, intercept
        cold = LogisticRegression(C=C, tol=1e-10, max_iter=10_000).fit(Z, y)
        ours = objective(Z, y, coef, intercept, C=C)
        theirs = objective(Z, y, cold.coef_, cold.intercept_, C=C)
        assert ours == pytest.approx(theirs, rel=1e-4), C
    assert len(path._pairs) > 0  # the pairs were really carried, not dropped


def test_a_start_at_the_exact_optimum_stops_at_once() -> None:
    """Constant features, balanced binary labels: the prior start has a gradient of exactly zero."""
    X, y = np.zeros((20, 3), dtype=np.float32), np.arange(20) % 2
    probe = LogisticProbe(Cs=[1.0], solver="torch", device="cpu").fit(X, y)
    assert probe.n_iter_ == 0
    np.testing.assert_array_equal(probe.predict_proba(X), np.full((20, 2), 0.5))


def test_sklearn_solver_is_sklearn() -> None:
    X, y = overlapping(400, classes=3, features=10, noise=2.0, seed=4)
    X = X.astype(np.float64)  # float64 in, float64 solve: both reach tol=1e-8
    probe = LogisticProbe(Cs=[0.3], solver="sklearn", tol=1e-8).fit(X, y)
    Z = StandardScaler().fit_transform(X)
    reference = LogisticRegression(C=0.3, tol=1e-8).fit(Z, y)  # from zeros; the probe starts at the class priors
    np.testing.assert_allclose(probe.coef_, reference.coef_, atol=1e-5)


def test_both_solvers_choose_C_and_agree_on_accuracy() -> None:
    X, y = overlapping(4000, classes=6, features=32, noise=3.5, seed=5)
    train, test = slice(0, 1000), slice(1000, None)
    scores = {}
    for solver in ("torch", "sklearn"):
        probe = LogisticProbe(Cs=12, solver=solver, device="cpu").fit(X[train], y[train])
        assert len(probe.val_scores_) == 12 and probe.C_ in probe.val_scores_
        scores[solver] = probe.score(X[test], y[test])
    assert 0.5 < scores["torch"] < 0.95  # a problem where C matters
    assert abs(scores["torch"] - scores["sklearn"]) <= 0.005


def test_explicit_validation_set_is_used_then_refit_on() -> None:
    X, y = overlapping(600, classes=3, features=10, noise=2.0, seed=6)
    probe = LogisticProbe(Cs=5).fit(X[:400], y[:400], X_val=X[400:], y_val=y[400:])
    Z_val = StandardScaler().fit(X[:400]).transform(X[400:])
    assert len(probe.val_scores_) == 5
    # refit on train + validation: its standardisation covers all 600 rows
    np.testing.assert_allclose(probe.mean_, X.mean(axis=0), rtol=1e-4, atol=1e-5)
    assert Z_val.shape == (200, 10)


def test_one_example_class_is_a_clear_error() -> None:
    X, y = blobs(41, centers=2, features=4, seed=7)
    y = np.where(np.arange(41) == 40, 7, y)
    for head in (LogisticProbe(), MLPHead()):
        with pytest.raises(HeadError, match=r"class 7 has 1 example; a validation split needs at least 2 per class"):
            head.fit(X, y)
    assert issubclass(HeadError, EmbedpipeError) and HeadError.exit_code == 6
    LogisticProbe(Cs=[1.0]).fit(X, y)  # a single C needs no validation split
    KNNHead().fit(X, y)  # leave-one-out needs none either


@pytest.mark.parametrize(
    "head",
    [LogisticProbe(Cs=[1.0], solver="torch"), LogisticProbe(Cs=[1.0], solver="sklearn"), make("mlp")],
    ids=["logreg-torch", "logreg-sklearn", "mlp"],
)
def test_balanced_class_weight_raises_minority_recall(head) -> None:
    X, y = overlapping(3000, classes=2, features=8, noise=1.5, seed=8)
    keep = (y == 1) | (np.arange(len(y)) % 10 == 0)  # class 0 at ~1 in 11
    X, y = X[keep], y[keep]
    X_test, y_test = overlapping(2000, classes=2, features=8, noise=1.5, seed=8)  # same means, balanced
    plain = clone(head).fit(X, y)
    balanced = clone(head).set_params(class_weight="balanced").fit(X, y)
    recall_plain = recall_score(y_test, plain.predict(X_test), pos_label=0)
    recall_balanced = recall_score(y_test, balanced.predict(X_test), pos_label=0)
    assert recall_balanced > recall_plain + 0.05


# --- MLP ------------------------------------------------------------------------------------


def test_mlp_early_stopping_restores_best_epoch() -> None:
    rng = np.random.default_rng(9)
    X = rng.normal(size=(300, 32)).astype(np.float32)
    y = (X[:, 0] > 0).astype(int)
    y = np.where(rng.random(300) < 0.3, 1 - y, y)  # 30% flipped labels: a big net will memorise them
    head = MLPHead(hidden=512, dropout=0.0, lr=3e-3, weight_decay=0.0, batch_size=32, patience=8, max_epochs=100)
    head.fit(X[:200], y[:200], X_val=X[200:], y_val=y[200:])
    history = head.history_
    best = history[head.best_epoch_]
    assert best["val_loss"] == min(row["val_loss"] for row in history)
    assert len(history) == head.best_epoch_ + 1 + head.patience  # stopped by patience, not max_epochs
    assert history[-1]["val_loss"] > best["val_loss"] * 1.05  # the loss did rise
    restored = log_loss(y[200:], head.predict_proba(X[200:]), labels=[0, 1])
    assert restored == pytest.approx(best["val_loss"], rel=1e-4)
    assert restored != pytest.approx(history[-1]["val_loss"], rel=1e-2)


def test_mlp_is_deterministic_given_random_state() -> None:
    X, y = blobs(300, centers=3, features=16, std=3.0, seed=10)
    a = make("mlp", random_state=3).fit(X, y).predict_proba(X)
    b = make("mlp", random_state=3).fit(X, y).predict_proba(X)
    c = make("mlp", random_state=4).fit(X, y).predict_proba(X)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


# --- kNN ------------------------------------------------------------------------------------


def brute_force_knn(train: np.ndarray, labels: np.ndarray, queries: np.ndarray, k: int, T: float, n: int):
    """DINO's weighted vote in plain numpy, float64, one query at a time."""
    train = train / np.linalg.norm(train, axis=1, keepdims=True)
    out = []
    for q in queries / np.linalg.norm(queries, axis=1, keepdims=True):
        sims = train.astype(np.float64) @ q
        nearest = np.argsort(-sims)[:k]
        votes = np.zeros(n)
        np.add.at(votes, labels[nearest], np.exp(sims[nearest] / T))
        out.append(votes / votes.sum())
    return np.array(out)


def test_knn_equals_brute_force() -> None:
    rng = np.random.default_rng(11)
    X, y = rng.normal(size=(60, 8)), rng.integers(0, 4, 60)
    queries = rng.normal(size=(20, 8))
    head = KNNHead(k=7, temperature=0.1).fit(X, y)
    expected = brute_force_knn(X, y, queries, 7, 0.1, 4)
    np.testing.assert_allclose(head.predict_proba(queries), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(head.predict(queries), np.argmax(expected, axis=1))


def test_knn_chooses_k_by_leave_one_out() -> None:
    X, y = blobs(80, centers=3, features=6, std=4.0, seed=12)
    head = KNNHead(k_grid=(1, 3, 9, 200), val_fraction=1.0).fit(X, y)
    assert sorted(head.val_scores_) == [1, 3, 9, 79]  # 200 clipped to the 79 other examples
    for k, score in head.val_scores_.items():
        proba = [brute_force_knn(np.delete(X, i, 0), np.delete(y, i), X[i : i + 1], k, 0.07, 3)[0] for i in range(80)]
        assert score == pytest.approx(np.mean(np.argmax(proba, axis=1) == y))
    assert head.val_scores_[head.k_] == max(head.val_scores_.values())


# --- state without pickle, sklearn contract --------------------------------------------------


@pytest.mark.parametrize("name", sorted(HEADS))
@pytest.mark.parametrize("labels", ["int", "str"])
def test_state_round_trip_gives_identical_probabilities(name: str, labels: str) -> None:
    from safetensors.numpy import load, save

    X, y = blobs(200, centers=3, features=8, std=3.0, seed=13)
    if labels == "str":
        y = np.array(["a", "b", "é"])[y]
    head = make(name, class_weight={y[0]: 2.0}) if name != "knn" else make(name)
    head.fit(X, y)
    arrays, meta = head.get_state()
    assert all(isinstance(a, np.ndarray) and a.dtype.kind in "fiu" for a in arrays.values())
    arrays, meta = load(save(arrays)), json.loads(json.dumps(meta))
    restored = from_state(arrays, meta)
    assert type(restored) is type(head)
    assert restored.get_params() == head.get_params()
    np.testing.assert_array_equal(restored.predict_proba(X), head.predict_proba(X))
    np.testing.assert_array_equal(restored.predict(X), head.predict(X))
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)  # the npz route works too
    buffer.seek(0)
    again = type(head).from_state(dict(np.load(buffer)), meta)
    np.testing.assert_array_equal(again.predict_proba(X), head.predict_proba(X))


def test_state_of_another_format_or_head_is_refused() -> None:
    X, y = blobs(60, centers=2, features=4, seed=14)
    arrays, meta = KNNHead().fit(X, y).get_state()
    with pytest.raises(HeadError, match="format"):
        KNNHead.from_state(arrays, {**meta, "format": STATE_FORMAT + 1})
    with pytest.raises(HeadError, match="KNNHead"):
        MLPHead.from_state(arrays, meta)


@pytest.mark.parametrize("name", sorted(HEADS))
def test_clone_and_params(name: str) -> None:
    head = make(name, random_state=5) if name != "knn" else make(name, k=3)
    params = head.get_params()
    copy = clone(head)
    assert copy.get_params() == params and copy is not head
    X, y = blobs(60, centers=2, features=4, seed=15)
    head.fit(X, y)
    assert not hasattr(clone(head), "classes_")
    with pytest.raises(TypeError):
        HEADS[name](None, None)  # everything after the first parameter is keyword-only


# Checks that cannot apply, with the reason; everything else in check_estimator must pass.
EXPECTED_FAILED_CHECKS: dict[str, dict[str, str]] = {}


@parametrize_with_checks(
    [
        LogisticProbe(Cs=4, max_iter=100, device="cpu"),
        MLPHead(hidden=32, max_epochs=60, patience=10, device="cpu"),
        KNNHead(k_grid=(1, 5), device="cpu"),
    ],
    expected_failed_checks=lambda estimator: EXPECTED_FAILED_CHECKS.get(type(estimator).__name__, {}),
)
def test_sklearn_estimator_contract(estimator, check) -> None:
    check(estimator)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_matches_cpu() -> None:
    X, y = overlapping(2000, classes=5, features=32, noise=2.0, seed=16)
    cpu = LogisticProbe(Cs=[0.1], device="cpu", tol=1e-6).fit(X, y)
    gpu = LogisticProbe(Cs=[0.1], device="cuda", tol=1e-6).fit(X, y)
    assert np.mean(cpu.predict(X) == gpu.predict(X)) >= 0.99
    np.testing.assert_allclose(gpu.objective(X, y), cpu.objective(X, y), rtol=1e-4)
    for name in ("mlp", "knn"):
        assert make(name, device="cuda").fit(X, y).score(X, y) > 0.5
