"""Linear probe: multinomial logistic regression with C chosen on a validation split.

The protocol of Kornblith, Shlens & Le, "Do Better ImageNet Models Transfer
Better?" (CVPR 2019): standardised features, L2-regularised multinomial
logistic regression fitted by L-BFGS, the regularisation strength C picked from
45 log-spaced values in [1e-6, 1e5] by validation accuracy, then a refit on
train + validation at the chosen C.

Both solvers minimise scikit-learn's objective for ``LogisticRegression(C=C)``,
scaled by the total sample weight ``S`` (``n_samples`` without class weights)::

    (1/S) * sum_i s_i * log_loss_i  +  1/(2*C*S) * ||W||^2      (intercepts unpenalised)

so at equal C they reach the same optimum. The C path runs from small to large C,
each fit warm-started from the previous one, the first from the C -> 0 optimum
(zero weights, intercepts at the log class frequencies). ``solver="torch"`` runs a full-batch
L-BFGS written on torch tensors (on the GPU when there is one; its curvature memory also carries
along the C path, see :class:`_TorchLBFGS`); ``solver="sklearn"`` runs
``sklearn.linear_model.LogisticRegression(solver="lbfgs")``. Binary problems use
the binomial loss with one weight vector, as scikit-learn does, so ``coef_`` is
``(1, n_features)`` there and ``(n_classes, n_features)`` otherwise.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy.special import expit, softmax
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import normalize as l2_normalize

from ..errors import HeadError
from .base import Head, torch_device, stratified_split, torch_threads

logger = logging.getLogger(__name__)

NORMALIZATIONS = ("standard", "l2", "none")
SOLVERS = ("torch", "sklearn")


def c_grid(Cs: int | Any) -> np.ndarray:
    """The C values to try, ascending: ``Cs`` log-spaced in [1e-6, 1e5] (Kornblith et al.) or the given values."""
    if isinstance(Cs, (int, np.integer)):
        if Cs < 1:
            raise HeadError(f"Cs={Cs} must be at least 1 (the number of C values to try): try 45")
        return np.logspace(-6, 5, int(Cs))
    grid = np.unique(np.asarray(Cs, dtype=np.float64).ravel())
    if grid.size == 0 or not np.all(np.isfinite(grid) & (grid > 0)):
        raise HeadError(f"Cs={Cs!r} must be positive finite numbers, or an int: try 45")
    return grid


class LogisticProbe(Head):
    """Multinomial logistic regression on embeddings, C chosen on validation (the linear-probe protocol).

    Args:
        Cs: the C values to try, or their number, log-spaced in [1e-6, 1e5]. The default 45
            is Kornblith et al.'s grid. One value skips validation and fits on all data
            (``X_val`` included).
        normalize: ``"standard"`` (zero mean, unit variance per feature, as Kornblith et al.),
            ``"l2"`` (unit-norm rows) or ``"none"``.
        solver: ``"torch"`` (full-batch L-BFGS, GPU when available) or ``"sklearn"``
            (``LogisticRegression(solver="lbfgs")``); both minimise the same objective.
        class_weight: ``None``, ``"balanced"`` or a dict label -> weight; weights each
            example's loss, as in scikit-learn.
        val_fraction: share of each class held out to choose C when ``X_val`` is not given.
            0.2: a validation set large enough to rank 45 Cs while keeping most data for training.
        random_state: seed of that split, so repeated fits choose the same C.
        max_iter: L-BFGS iterations per C. 1000: a bound that warm-started fits never reach on
            non-separable data; it only caps the nearly unregularised large-C end.
        tol: stop when the largest absolute gradient entry of the objective is below this.
            1e-4: scikit-learn's default, on the same (per-sample) scale. The torch solver also
            waits until its step predicts the objective within 0.01% of its minimum, which a
            small gradient alone did not ensure (0.1-0.2% left at 50k x 2048 x 100). On (nearly) separable data this is loose at large C, where gradients are
            tiny: warm-started fits there take 0 iterations; pass e.g. 1e-6 for tighter optima.
        device: torch device for the torch solver; ``"auto"`` is the GPU when torch sees one.
        n_jobs: CPU threads for torch and BLAS (``None``: the cores other processes leave idle).

    Attributes:
        classes_: ``(n_classes,)`` the labels, sorted.
        n_features_in_: embedding width D.
        C_: the chosen C.
        val_scores_: dict C -> validation accuracy, ascending C (empty with a single C).
        val_losses_: dict C -> validation log-loss (breaks ties in accuracy).
        coef_: ``(n_classes, D)`` float, or ``(1, D)`` for two classes; applies to the
            normalised features (see ``mean_``/``scale_``).
        intercept_: ``(n_classes,)`` or ``(1,)``.
        mean_, scale_: ``(D,)`` the standardisation (only with ``normalize="standard"``).
        n_iter_: L-BFGS iterations of the final fit.
    """

    _state_arrays = ("coef_", "intercept_", "mean_", "scale_")
    _state_values = ("C_", "val_scores_", "val_losses_", "n_iter_")

    def __init__(
        self,
        Cs: int | list[float] = 45,
        *,
        normalize: str = "standard",
        solver: str = "torch",
        class_weight: None | str | dict[Any, float] = None,
        val_fraction: float = 0.2,
        random_state: int | None = 0,
        max_iter: int = 1000,
        tol: float = 1e-4,
        device: str = "auto",
        n_jobs: int | None = None,
    ) -> None:
        self.Cs = Cs
        self.normalize = normalize
        self.solver = solver
        self.class_weight = class_weight
        self.val_fraction = val_fraction
        self.random_state = random_state
        self.max_iter = max_iter
        self.tol = tol
        self.device = device
        self.n_jobs = n_jobs

    def fit(self, X: Any, y: Any, *, X_val: Any = None, y_val: Any = None) -> LogisticProbe:
        """Choose C on validation, then refit on train + validation at that C.

        Args:
            X: ``(n_samples, D)`` float embeddings.
            y: ``(n_samples,)`` labels of any sortable type.
            X_val, y_val: an explicit validation set, ``(n_val, D)`` and ``(n_val,)``; without
                them a stratified ``val_fraction`` of ``X`` is held out (2+ examples per class needed).

        Returns:
            self, fitted.
        """
        if self.normalize not in NORMALIZATIONS:
            raise HeadError(f"normalize={self.normalize!r} is not one of {NORMALIZATIONS}")
        if self.solver not in SOLVERS:
            raise HeadError(f"solver={self.solver!r} is not one of {SOLVERS}")
        X, y, X_val, y_val = self._check_fit_input(X, y, X_val, y_val)
        Cs = c_grid(self.Cs)
        for name in ("mean_", "scale_"):
            self.__dict__.pop(name, None)
        init = None
        self.val_scores_: dict[float, float] = {}
        self.val_losses_: dict[float, float] = {}
        with torch_threads(self.n_jobs):
            if len(Cs) > 1:
                if X_val is None:
                    train, val = stratified_split(
                        y, self.classes_, val_fraction=self.val_fraction, random_state=self.random_state
                    )
                    X_train, y_train, X_val, y_val = X[train], y[train], X[val], y[val]
                else:
                    X_train, y_train = X, y
                self.C_, init = self._sweep(Cs, X_train, y_train, X_val, y_val)
                X, y = np.concatenate([X_train, X_val]), np.concatenate([y_train, y_val])
            else:
                self.C_ = float(Cs[0])
                if X_val is not None:  # nothing to choose: fit on everything
                    X, y = np.concatenate([X, X_val]), np.concatenate([y, y_val])
            solver = self._solver(self._fit_normalizer(X), y)
            if init is None:
                init = _prior_start(y, len(self.classes_), X.shape[1], self._class_weights(y))
            self.coef_, self.intercept_, self.n_iter_ = solver.solve(self.C_, init)
        return self

    def _sweep(
        self, Cs: np.ndarray, X: np.ndarray, y: np.ndarray, X_val: np.ndarray, y_val: np.ndarray
    ) -> tuple[float, tuple[np.ndarray, np.ndarray]]:
        """Fit along ``Cs`` (ascending, each warm-started from the last); fill ``val_scores_`` and ``val_losses_``.

        The best C has the highest validation accuracy; ties, common on easy problems and at
        the degenerate small-C end, go to the lowest validation log-loss.

        Returns:
            ``(C, (coef, intercept))``: the best C and its solution, to warm-start the final refit.
        """
        solver = self._solver(self._fit_normalizer(X), y)
        Z_val = self._transform(X_val)
        state = _prior_start(y, len(self.classes_), X.shape[1], self._class_weights(y))
        best, best_key = None, None
        for C in Cs:
            coef, intercept, n_iter = solver.solve(float(C), state)
            state = coef, intercept
            scores = Z_val @ coef.T + intercept
            accuracy = float(np.mean(_argmax(scores) == y_val))
            loss = float(np.mean(_log_loss(scores.astype(np.float64), y_val)))
            self.val_scores_[float(C)], self.val_losses_[float(C)] = accuracy, loss
            logger.debug("C=%.3g: validation accuracy %.4f, log-loss %.4f (%d iterations)", C, accuracy, loss, n_iter)
            if best_key is None or (accuracy, -loss) > best_key:
                best, best_key = (float(C), state), (accuracy, -loss)
        return best

    def _solver(self, Z: torch.Tensor, y: np.ndarray) -> _TorchLBFGS | _SklearnLBFGS:
        """A solver over ``Z``, the normalised features :meth:`_fit_normalizer` returned."""
        weights = self._class_weights(y)
        kwargs = dict(n_classes=len(self.classes_), class_weights=weights, max_iter=self.max_iter, tol=self.tol)
        if self.solver == "sklearn":
            return _SklearnLBFGS(Z.numpy(), y, **kwargs)
        return _TorchLBFGS(Z, y, device=Z.device, **kwargs)

    def _fit_normalizer(self, X: np.ndarray) -> torch.Tensor:
        """Set ``mean_`` and ``scale_`` (``normalize="standard"``) as ``StandardScaler`` does, but in torch.

        Returns:
            ``X`` normalised, with one copy of it: float32 on the torch solver's device, or in ``X``'s
            dtype on the CPU for the sklearn solver (``StandardScaler`` plus a move took 1.2 s at
            50k x 2048 on 2 cores, ``torch.var_mean`` alone 1.0 s; this takes 0.3 s).
        """
        on_torch = self.solver == "torch"
        Z = torch.as_tensor(X, device=torch_device(self.device) if on_torch else "cpu")
        if self.normalize == "standard":
            mean = Z.mean(dim=0)
            Z = Z - mean
            sum_sq = torch.zeros_like(mean)
            for start in range(0, len(Z), 8192):  # in slices: no second (n, D) temporary
                sum_sq += Z[start : start + 8192].square().sum(dim=0)
            scale = (sum_sq / max(len(Z), 1)).sqrt_()
            # A constant feature keeps scale 1, as in StandardScaler (dividing by ~0 would blow it up).
            scale[scale <= 10 * torch.finfo(scale.dtype).eps * mean.abs().clamp_min(1.0)] = 1.0
            Z.div_(scale)
            self.mean_, self.scale_ = mean.cpu().numpy().astype(X.dtype), scale.cpu().numpy().astype(X.dtype)
        elif self.normalize == "l2":
            Z = F.normalize(Z, dim=1)
        return Z.to(torch.float32) if on_torch else Z

    def _check_state(self) -> None:
        if self.normalize not in ("standard", "l2", "none"):
            raise HeadError(f"head state's normalize {self.normalize!r} is not standard, l2 or none: refit the head")
        rows, width = (1 if len(self.classes_) == 2 else len(self.classes_)), self.n_features_in_
        self._expect_array("coef_", (rows, width))
        self._expect_array("intercept_", (rows,))
        if self.normalize == "standard":
            self._expect_array("mean_", (width,))
            if not self._expect_array("scale_", (width,)).all():
                raise HeadError("head state's 'scale' array has zeros, which would divide by zero: refit the head")

    def _transform(self, X: np.ndarray) -> np.ndarray:
        """``X`` ``(n, D)`` in the space ``coef_`` applies to."""
        if self.normalize == "standard":
            return (X - self.mean_) / self.scale_
        if self.normalize == "l2":
            return l2_normalize(X)
        return X

    def decision_function(self, X: Any) -> np.ndarray:
        """Logits: ``(n_samples, n_classes)``, or ``(n_samples,)`` for two classes (positive: ``classes_[1]``)."""
        scores = self._transform(self._check_predict_input(X)) @ self.coef_.T + self.intercept_
        return scores[:, 0] if scores.shape[1] == 1 else scores

    def _proba(self, X: np.ndarray) -> np.ndarray:
        scores = self._transform(X) @ self.coef_.T + self.intercept_
        if scores.shape[1] == 1:
            p = expit(scores[:, 0])
            return np.stack([1.0 - p, p], axis=1)
        return softmax(scores, axis=1)

    def objective(self, X: Any, y: Any) -> float:
        """The fitted objective on ``(X, y)`` (normalised as in fit, class weights from ``y``), in float64.

        Equal to scikit-learn's ``LogisticRegression`` objective divided by ``C * S``; useful to
        compare solvers.
        """
        Z = self._transform(self._check_predict_input(X)).astype(np.float64)
        y_enc = np.searchsorted(self.classes_, np.asarray(y))
        return objective(Z, y_enc, self.coef_, self.intercept_, C=self.C_, class_weights=self._class_weights(y_enc))


def objective(
    Z: np.ndarray,
    y: np.ndarray,
    coef: np.ndarray,
    intercept: np.ndarray,
    *,
    C: float,
    class_weights: np.ndarray | None = None,
) -> float:
    """scikit-learn's logistic objective over the total sample weight S, in float64.

    ``(1/S) sum_i s_i log_loss_i + ||coef||^2 / (2 C S)``, with ``s_i = class_weights[y_i]`` (1 if None).

    Args:
        Z: ``(n, D)`` features as the model sees them.
        y: ``(n,)`` int class indices.
        coef: ``(K, D)``, or ``(1, D)`` for the binomial loss.
        intercept: ``(K,)`` or ``(1,)``.
    """
    Z, coef, intercept = (np.asarray(a, dtype=np.float64) for a in (Z, coef, intercept))
    s = np.ones(len(y)) if class_weights is None else np.asarray(class_weights, dtype=np.float64)[y]
    loss = _log_loss(Z @ coef.T + intercept, y)
    S = s.sum()
    return float((s * loss).sum() / S + (coef**2).sum() / (2.0 * C * S))


def _log_loss(scores: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per-example log-loss ``(n,)`` of ``(n, K)`` logits, or ``(n, 1)`` binomial logits, for class indices ``y``."""
    if scores.shape[1] == 1:
        z = scores[:, 0]
        return np.logaddexp(0.0, z) - (y == 1) * z
    top = scores.max(axis=1, keepdims=True)
    lse = np.log(np.exp(scores - top).sum(axis=1)) + top[:, 0]
    return lse - scores[np.arange(len(y)), y]


def _prior_start(
    y: np.ndarray, n_classes: int, n_features: int, class_weights: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """The optimum as C -> 0: zero weights, intercepts at the (weighted) log class frequencies.

    Starting a C path here matters at the small-C end. There the penalty makes the weights
    far stiffer than the intercepts (curvature ``1/(C*S)`` against ``p*(1-p)``), and
    L-BFGS from zero intercepts spent tens of iterations per C learning the class
    frequencies that this start gives exactly.

    Returns:
        ``(coef, intercept)``: ``(K, D)`` zeros and ``(K,)`` centred log frequencies, or
        ``(1, D)`` and ``(1,)`` (the log-odds) for two classes; float64.
    """
    mass = np.bincount(y, weights=None if class_weights is None else class_weights[y], minlength=n_classes)
    log_mass = np.log(np.maximum(mass, np.finfo(np.float64).tiny))
    if n_classes == 2:
        return np.zeros((1, n_features)), np.array([log_mass[1] - log_mass[0]])
    return np.zeros((n_classes, n_features)), log_mass - log_mass.mean()


def _argmax(scores: np.ndarray) -> np.ndarray:
    """Predicted class indices from ``(n, K)`` logits or ``(n, 1)`` binomial logits."""
    return (scores[:, 0] > 0).astype(np.int64) if scores.shape[1] == 1 else np.argmax(scores, axis=1)


class _TorchLBFGS:
    """Full-batch L-BFGS on scikit-learn's objective, data moved to the device once for a whole C path.

    Hand-written rather than ``torch.optim.LBFGS`` for three reasons measured on 50k x 2048 x 100
    (2 CPU cores): the loss and its gradient come from two matrix products and no autograd graph;
    a step without curvature history is the exact minimiser of the quadratic model along the
    direction (one extra half-evaluation) instead of ``torch.optim.LBFGS``'s 1/|g|_1 probe that
    spent 5 extra evaluations per fit bracketing the step; and the curvature pairs carry over
    from one C to the next. That last one is exact: the penalty is quadratic, so changing C
    shifts every pair's gradient difference by ``s_W * (1/C' - 1/C) / S``.
    """

    history_size = 10  # scipy's L-BFGS-B default (maxcor), as in scikit-learn
    armijo = 1e-4  # sufficient-decrease constant c1, the usual choice
    # Hager & Zhang's approximate Wolfe condition: near the optimum a float32 objective cannot
    # resolve the decrease a step makes, so also accept a step that does not raise it beyond this.
    f_noise = 1e-6
    gap_rtol = 1e-4  # stop only when the objective is predicted within 0.01% of its minimum

    def __init__(
        self,
        Z: np.ndarray,
        y: np.ndarray,
        *,
        n_classes: int,
        class_weights: np.ndarray | None,
        max_iter: int,
        tol: float,
        device: torch.device,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.dtype = dtype
        self.device = device
        self.Z = torch.as_tensor(Z, dtype=self.dtype, device=device)
        self.y = torch.as_tensor(y, dtype=torch.int64, device=device)
        self.binary = n_classes == 2
        self.n_out = 1 if self.binary else n_classes
        n = len(y)
        if class_weights is None:
            sample_weight = torch.ones(n, dtype=self.dtype, device=device)
        else:
            sample_weight = torch.as_tensor(class_weights, dtype=self.dtype, device=device)[self.y]
        self.total = float(sample_weight.double().sum())
        self.row_weight = (sample_weight / self.total).unsqueeze(1)  # s_i / S, (n, 1)
        self.rows = torch.arange(n, device=device)
        self.max_iter = max_iter
        self.tol = tol
        self._pairs: list[tuple[torch.Tensor, torch.Tensor]] = []  # (s, y) curvature pairs, newest last
        self._x: torch.Tensor | None = None  # the last solution, where the pairs were gathered
        self._C: float | None = None

    # -- the objective, on a flat parameter vector x = [W.ravel(), b]

    def _split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        D = self.Z.shape[1]
        return x[: self.n_out * D].view(self.n_out, D), x[self.n_out * D :]

    def _evaluate(self, x: torch.Tensor, C: float) -> tuple[float, torch.Tensor, torch.Tensor]:
        """``(objective, gradient, probabilities)`` at ``x``; probabilities ``(n, K)`` (``(n, 1)`` binomial)."""
        W, b = self._split(x)
        scores = torch.addmm(b, self.Z, W.T)
        if self.binary:
            z = scores[:, 0]
            losses = F.softplus(z) - (self.y == 1) * z
            proba = torch.sigmoid(scores)
            residual = proba - (self.y == 1).unsqueeze(1).to(self.dtype)
        else:
            lse = torch.logsumexp(scores, dim=1, keepdim=True)
            losses = lse[:, 0] - scores[self.rows, self.y]
            proba = torch.exp(scores.sub_(lse))
            residual = proba.clone()
            residual[self.rows, self.y] -= 1.0
        residual.mul_(self.row_weight)
        penalty = 1.0 / (C * self.total)
        # The sums in float64: the line search compares objectives that differ in the 7th digit.
        f = float((losses.double() * self.row_weight[:, 0].double()).sum()) + 0.5 * penalty * float(W.double().square().sum())
        grad = torch.empty_like(x)
        grad_W, grad_b = self._split(grad)
        torch.addmm(W, residual.T, self.Z, beta=penalty, out=grad_W)
        torch.sum(residual, dim=0, out=grad_b)
        return f, grad, proba

    def _curvature(self, x: torch.Tensor, direction: torch.Tensor, proba: torch.Tensor, C: float) -> float:
        """``d' H d``: the objective's second derivative along ``direction`` at ``x`` (one product with Z)."""
        dW, db = self._split(direction)
        u = torch.addmm(db, self.Z, dW.T)
        if self.binary:
            per_row = proba * (1.0 - proba) * u.square()
        else:
            pu = proba * u
            per_row = (pu * u).sum(1, keepdim=True) - pu.sum(1, keepdim=True).square()
        data = float((per_row * self.row_weight).double().sum())
        return data + float(dW.double().square().sum()) / (C * self.total)

    def _direction(self, grad: torch.Tensor) -> torch.Tensor:
        """``-H grad`` by the two-loop recursion over the stored pairs."""
        q = grad.neg()
        alphas = []
        for s, y in reversed(self._pairs):
            alpha = float(s @ q) / float(y @ s)
            q.add_(y, alpha=-alpha)
            alphas.append(alpha)
        s, y = self._pairs[-1]
        q.mul_(float(y @ s) / float(y @ y))
        for (s, y), alpha in zip(self._pairs, reversed(alphas)):
            beta = float(y @ q) / float(y @ s)
            q.add_(s, alpha=alpha - beta)
        return q

    def _carry_pairs(self, x: torch.Tensor, C: float) -> None:
        """Keep the curvature pairs when this fit starts where the last one ended; adjust them to the new C."""
        if self._x is None or self._C is None or not torch.equal(x, self._x):
            self._pairs = []
            return
        shift = (1.0 / C - 1.0 / self._C) / self.total
        n_W = self.n_out * self.Z.shape[1]
        for s, y in self._pairs:
            y[:n_W].add_(s[:n_W], alpha=shift)
        self._pairs = [(s, y) for s, y in self._pairs if float(y @ s) > 0]

    def solve(
        self, C: float, init: tuple[np.ndarray, np.ndarray] | None
    ) -> tuple[np.ndarray, np.ndarray, int]:
        """Minimise at ``C`` from ``init`` (zeros if None); returns ``(coef, intercept, n_iter)`` as numpy."""
        D = self.Z.shape[1]
        if init is None:
            x = torch.zeros(self.n_out * (D + 1), dtype=self.dtype, device=self.device)
        else:
            W0 = torch.as_tensor(init[0], dtype=self.dtype, device=self.device).reshape(-1)
            b0 = torch.as_tensor(init[1], dtype=self.dtype, device=self.device).reshape(-1)
            x = torch.cat([W0, b0])
        self._carry_pairs(x, C)
        f, grad, proba = self._evaluate(x, C)
        n_iter = 0
        while True:
            if self._pairs:
                direction, step = self._direction(grad), 1.0
            else:  # no curvature yet: steepest descent, to the minimum of the local quadratic model
                direction = grad.neg()
                step = float(grad @ grad) / max(self._curvature(x, direction, proba, C), 1e-30)
            slope = float(grad @ direction)
            if slope >= 0:
                if not self._pairs:  # the gradient is exactly zero: already at the optimum
                    break
                self._pairs = []  # not a descent direction (rounding): forget the history, go downhill
                continue
            # Converged when the gradient is small (scikit-learn's test) and the step's predicted
            # decrease says the objective is within gap_rtol of its optimum: a max-abs gradient of
            # 1e-4 alone left 0.1-0.2% of the objective on 50k x 2048 x 100 at C = 0.01. The floor of
            # 1 (as scipy's ftol) keeps separable data, whose objective tends to 0 at large C, finite.
            if float(grad.abs().max()) <= self.tol and -0.5 * slope * step <= self.gap_rtol * max(abs(f), 1.0):
                break
            if n_iter >= self.max_iter:
                warnings.warn(
                    f"L-BFGS did not converge in max_iter={self.max_iter} iterations at C={C:.3g}: "
                    f"raise max_iter or tol (now {self.tol:g}); with normalize=\"none\", standardise the features",
                    ConvergenceWarning,
                    stacklevel=3,
                )
                break
            for _ in range(30):  # backtracking, with the quadratic interpolation of the 1-D objective
                x_new = x + step * direction
                f_new, grad_new, proba_new = self._evaluate(x_new, C)
                if f_new <= f + self.armijo * step * slope or f_new <= f + self.f_noise * abs(f):
                    break
                step *= max(0.1, min(0.5, -slope * step / (2.0 * (f_new - f - slope * step))))
            else:
                logger.debug("line search made no progress at C=%.3g after %d iterations", C, n_iter)
                break
            s, y = x_new - x, grad_new - grad
            if float(y @ s) > 1e-10 * float(y @ y):
                self._pairs = (self._pairs + [(s, y)])[-self.history_size :]
            x, f, grad, proba = x_new, f_new, grad_new, proba_new
            n_iter += 1
        self._x, self._C = x, C
        W, b = self._split(x)
        return W.cpu().numpy().copy(), b.cpu().numpy().copy(), n_iter


class _SklearnLBFGS:
    """scikit-learn's ``LogisticRegression(solver="lbfgs")`` behind the same ``solve`` as the torch solver."""

    def __init__(
        self,
        Z: np.ndarray,
        y: np.ndarray,
        *,
        n_classes: int,
        class_weights: np.ndarray | None,
        max_iter: int,
        tol: float,
    ) -> None:
        self.Z, self.y = Z, y
        self.n_classes = n_classes
        self.class_weight = None if class_weights is None else dict(enumerate(class_weights.tolist()))
        self.max_iter = max_iter
        self.tol = tol

    def solve(
        self, C: float, init: tuple[np.ndarray, np.ndarray] | None
    ) -> tuple[np.ndarray, np.ndarray, int]:
        """Minimise at ``C`` from ``init`` (zeros if None); returns ``(coef, intercept, n_iter)``."""
        model = LogisticRegression(
            C=C,
            solver="lbfgs",
            max_iter=self.max_iter,
            tol=self.tol,
            class_weight=self.class_weight,
            warm_start=init is not None,
        )
        if init is not None:
            model.coef_, model.intercept_ = init[0].astype(np.float64), init[1].astype(np.float64)
        model.fit(self.Z, self.y)
        return model.coef_, model.intercept_, int(model.n_iter_[0])
