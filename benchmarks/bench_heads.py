"""Fit time and accuracy of the heads against scikit-learn, as ratios measured side by side.

One process, one synthetic dataset per size (``--sizes``, training rows x
features, ``--classes`` classes, a separate test set), and every variant run
once per repetition in alternating order (A B C ... then ... C B A), so
compared variants run next to each other on the same data; a summary ratio is
the median of the per-repetition ratios. The data are hard on purpose: class
means plus isotropic noise scaled so that a linear probe scores about 60% on
the test set, the regime where solvers differ (easy data converge in a few
iterations whatever the solver).

Measured, at each size:

1. one fit at a fixed C (``--C``), where the solvers must agree:
   ``sklearn``: plain ``StandardScaler`` + ``LogisticRegression(C, solver="lbfgs",
   max_iter=1000, tol)``, as a user would write it; ``probe_sklearn`` and
   ``probe_torch``: ``LogisticProbe(Cs=[C], solver=...)``. Each reports seconds,
   L-BFGS iterations, the objective at its solution
   (:func:`embedpipe.heads.logreg.objective`, float64) and test accuracy.
2. the C sweep (45 values in [1e-6, 1e5], Kornblith et al.): ``sklearn``:
   one ``LogisticRegression`` per C from scratch (no warm start) on the same
   stratified split the probe uses, best validation accuracy (ties: lower
   log-loss, the probe's rule), refit on train + validation; ``probe_sklearn``
   and ``probe_torch``: ``LogisticProbe(solver=...).fit``. The plain sweep
   stops after the C at which it passes ``--baseline-sweep-budget`` seconds;
   its time is then a lower bound and the ratio an upper bound (marked ``<=``).
3. ``MLPHead`` fit and predict, 4. ``KNNHead`` fit and predict, with defaults.

Goals (from the issue): per fit, the torch solver <= 0.7x scikit-learn's time on
CPU (<= 0.1x on a GPU) at equal objective (relative difference <= 1e-3) and
accuracy (within 0.5 points); the full sweep at 50000x2048x100 under 60 s on two
CPU cores, about a second on an H100 (checked as <= 1.5 s).

With ``--diagnose``, extra rows say where the time goes: the torch solver alone
and plain scikit-learn at 1 and 2 threads, in float32 and float64; the cost of
one loss-and-gradient evaluation in each library; the one-off cost of a first
fit in a fresh process; and the per-fit ratio against scikit-learn at its
fastest thread count and dtype (the stricter reading of the goal). At large
sizes only the 1-thread float32 fits run, once.

Repetitions: ``--repeats`` for everything, except at large sizes (``--large-repeats``
for the sweeps, the MLP and the kNN; the single fits still run ``--repeats`` times).

Threads: both libraries get ``--threads`` (default: every core of the affinity
mask) through ``torch.set_num_threads`` and ``threadpoolctl``; the probes get
``n_jobs=--threads``. A sample counts as clean when other processes kept at most
``--max-contention`` cores busy while it ran (read from /proc/stat); summaries
use the clean repetitions when there are any, and the table says how many.

Output: a table on stdout and a JSON list of flat records (one per sample, one
per summary row, one per diagnostic) in benchmarks/results/heads-<machine>.json;
every record carries the machine, library versions, device, threads and size.
A failing variant becomes a record with its error and the run goes on.

Example::

    python benchmarks/bench_heads.py                                   # both sizes, about 12 minutes on 2 quiet cores
    python benchmarks/bench_heads.py --sizes 10000x512 --repeats 5 --diagnose
    python benchmarks/bench_heads.py --sizes 50000x2048 --parts fit,sweep --device cuda
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from _harness import REPO, Harness, Selection, add_sampling_options, med, results_path
from _harness import machine_info as harness_machine_info

import scipy  # noqa: E402
import sklearn  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from sklearn.exceptions import ConvergenceWarning  # noqa: E402
from sklearn.linear_model import LogisticRegression  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402
from threadpoolctl import threadpool_info, threadpool_limits  # noqa: E402

from embedpipe.heads import KNNHead, LogisticProbe, MLPHead  # noqa: E402
from embedpipe.heads.base import stratified_split  # noqa: E402
from embedpipe.heads.logreg import _TorchLBFGS, c_grid, objective  # noqa: E402
from embedpipe.machine import available_cores, resolve_device  # noqa: E402

# Goals from the issue. Per fit: time ratio torch / plain scikit-learn, at equal objective and accuracy.
FIT_RATIO_GOAL = {"cpu": 0.7, "cuda": 0.1}
OBJECTIVE_REL_TOL = 1e-3  # |objective_torch / objective_sklearn - 1|
ACCURACY_POINTS_TOL = 0.5  # |test accuracy difference| in percentage points
# The full sweep: seconds, at SWEEP_GOAL_SIZE or larger ("two CPU cores": checked when --threads is 2).
SWEEP_SECONDS_GOAL = {"cpu": 60.0, "cuda": 1.5}  # "about a second on an H100"
SWEEP_GOAL_SIZE = (50_000, 2048)
# Sizes with at least this many training values (rows x features) run --large-repeats times.
LARGE_VALUES = 50_000 * 1024
# Noise that puts a linear probe at ~60% test accuracy with 100 training rows per class at 512
# features; it grows with sqrt(features) (the distance between random class means does).
NOISE_AT_512 = 6.5


# --------------------------------------------------------------------------- environment


def machine_info(device: torch.device, threads: int) -> dict[str, Any]:
    """The machine (``_harness.machine_info``), the thread cap of every variant, and both BLAS libraries."""
    blas = sorted({f"{p['internal_api']} {p['version']}" for p in threadpool_info() if p["user_api"] == "blas"})
    return harness_machine_info(
        str(device), threads=threads, sklearn=sklearn.__version__, scipy=scipy.__version__,
        numpy_blas=", ".join(blas), torch_blas="mkl" if torch.backends.mkl.is_available() else "other",
    )


@contextlib.contextmanager
def threads_capped(n: int) -> Iterator[None]:
    """torch's and the BLAS/OpenMP pools' threads set to ``n`` for the block (the plain scikit-learn variants)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        with threadpool_limits(limits=n):
            yield
    finally:
        torch.set_num_threads(before)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------- data


@dataclass
class Data:
    """One synthetic problem: training and test embeddings, float32, labels int64 in [0, classes)."""

    name: str
    X: np.ndarray
    y: np.ndarray
    X_test: np.ndarray
    y_test: np.ndarray
    noise: float


def parse_size(text: str) -> tuple[int, int]:
    rows, _, features = text.lower().partition("x")
    try:
        return int(rows), int(features)
    except ValueError:
        raise SystemExit(f"--sizes: {text!r} is not ROWSxFEATURES, e.g. 10000x512") from None


def make_data(rows: int, features: int, classes: int, *, test_rows: int, noise: float | None, seed: int = 0) -> Data:
    """Gaussian classes: means ~ N(0, I), each example its class mean plus N(0, noise^2 I); balanced classes."""
    noise = NOISE_AT_512 * math.sqrt(features / 512) if noise is None else noise
    rng = np.random.default_rng(seed)
    means = rng.standard_normal((classes, features), dtype=np.float32)
    y = rng.permutation(np.arange(rows + test_rows) % classes)
    X = means[y]
    X += np.float32(noise) * rng.standard_normal(X.shape, dtype=np.float32)
    return Data(f"{rows}x{features}", X[:rows], y[:rows], X[rows:], y[rows:], noise)


# --------------------------------------------------------------------------- the benchmark


class Bench(Harness):
    """The data of the size being measured; the harness holds the records (their ``common``: machine and size)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.device = torch.device(resolve_device(args.device))
        self.threads = args.threads or available_cores()
        self.info = machine_info(self.device, self.threads)
        super().__init__(self.info, max_contention=args.max_contention, max_wait=args.max_wait, retries=args.retries)
        self.data: Data | None = None

    def sample(self, measurement: str, variant: str, rep: int, fn: Callable[[], dict[str, Any]]) -> None:
        """:meth:`Harness.sample`, with the scikit-learn ConvergenceWarnings the sample raised counted in it."""

        def counted() -> dict[str, Any]:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", ConvergenceWarning)
                values = fn()
            values["convergence_warnings"] = sum(issubclass(w.category, ConvergenceWarning) for w in caught)
            return values

        super().sample(measurement, variant, rep, counted)

    def show(self, measurement: str, variant: str, rep: int, values: dict[str, Any]) -> None:
        shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in values.items()}
        print(f"  {self.common['size']} {measurement} {variant} rep {rep}: {shown}", file=sys.stderr, flush=True)

    # ----------------------------------------------------------------- logistic regression

    def sklearn_fit(self, C: float, dtype: type = np.float32) -> dict[str, Any]:
        """Plain scikit-learn at one C, on all training rows (float32 embeddings stay float32, as a user's would)."""
        d = self.data
        with threads_capped(self.threads):
            start = time.perf_counter()
            X = d.X.astype(dtype, copy=False)
            scaler = StandardScaler().fit(X)
            Z = scaler.transform(X)
            model = LogisticRegression(C=C, solver="lbfgs", max_iter=1000, tol=self.args.tol).fit(Z, d.y)
            seconds = time.perf_counter() - start
            return {
                "seconds": seconds,
                "C": C,
                "n_iter": int(model.n_iter_[0]),
                "objective": objective(Z, d.y, model.coef_, model.intercept_, C=C),
                "test_acc": float(model.score(scaler.transform(d.X_test), d.y_test)),
            }

    def probe(self, solver: str, Cs: Any) -> LogisticProbe:
        return LogisticProbe(Cs, solver=solver, tol=self.args.tol, device=str(self.device), n_jobs=self.threads)

    def probe_fit(self, solver: str, C: float) -> dict[str, Any]:
        d = self.data
        start = time.perf_counter()
        probe = self.probe(solver, [C]).fit(d.X, d.y)
        seconds = time.perf_counter() - start
        with threads_capped(self.threads):
            return {
                "seconds": seconds,
                "C": C,
                "n_iter": int(probe.n_iter_),
                "objective": probe.objective(d.X, d.y),
                "test_acc": float(probe.score(d.X_test, d.y_test)),
            }

    def sklearn_sweep(self) -> dict[str, Any]:
        """The sweep as a user would write it: one LogisticRegression per C from scratch, then a refit."""
        d = self.data
        Cs = c_grid(self.args.Cs)
        budget = self.args.baseline_sweep_budget
        with threads_capped(self.threads):
            start = time.perf_counter()
            train, val = stratified_split(d.y, np.unique(d.y), val_fraction=0.2, random_state=0)  # the probe's split
            scaler = StandardScaler().fit(d.X[train])
            Z, Z_val, y, y_val = scaler.transform(d.X[train]), scaler.transform(d.X[val]), d.y[train], d.y[val]
            best, best_key, done, iters = None, None, 0, []
            for C in Cs:
                model = LogisticRegression(C=C, solver="lbfgs", max_iter=1000, tol=self.args.tol).fit(Z, y)
                scores = model.decision_function(Z_val)
                accuracy = float(np.mean(np.argmax(scores, axis=1) == y_val))
                log_loss = float(np.mean(_log_loss(scores, y_val)))
                if best_key is None or (accuracy, -log_loss) > best_key:
                    best, best_key = float(C), (accuracy, -log_loss)
                done += 1
                iters.append(int(model.n_iter_[0]))
                if budget is not None and time.perf_counter() - start > budget:
                    break
            scaler = StandardScaler().fit(d.X)
            Z_all = scaler.transform(d.X)
            model = LogisticRegression(C=best, solver="lbfgs", max_iter=1000, tol=self.args.tol).fit(Z_all, d.y)
            seconds = time.perf_counter() - start
            return {
                "seconds": seconds,
                "n_Cs": done,
                "truncated": done < len(Cs),
                "C_": best,
                "val_acc": best_key[0],
                "n_iter_total": sum(iters) + int(model.n_iter_[0]),
                "objective": objective(Z_all, d.y, model.coef_, model.intercept_, C=best),
                "test_acc": float(model.score(scaler.transform(d.X_test), d.y_test)),
            }

    def probe_sweep(self, solver: str) -> dict[str, Any]:
        d = self.data
        start = time.perf_counter()
        probe = self.probe(solver, self.args.Cs).fit(d.X, d.y)
        seconds = time.perf_counter() - start
        with threads_capped(self.threads):
            return {
                "seconds": seconds,
                "n_Cs": len(probe.val_scores_),
                "truncated": False,
                "C_": probe.C_,
                "val_acc": probe.val_scores_[probe.C_],
                "objective": probe.objective(d.X, d.y),
                "test_acc": float(probe.score(d.X_test, d.y_test)),
            }

    # ----------------------------------------------------------------- MLP and kNN

    def other_head(self, head: MLPHead | KNNHead) -> dict[str, Any]:
        d = self.data
        start = time.perf_counter()
        head.fit(d.X, d.y)
        fit_seconds = time.perf_counter() - start
        start = time.perf_counter()
        predicted = head.predict(d.X_test)
        predict_seconds = time.perf_counter() - start
        values = {
            "seconds": fit_seconds + predict_seconds,
            "fit_seconds": fit_seconds,
            "predict_seconds": predict_seconds,
            "test_acc": float(np.mean(predicted == d.y_test)),
        }
        if isinstance(head, MLPHead):
            values.update(epochs=len(head.history_), best_epoch=head.best_epoch_)
        else:
            values.update(k=head.k_)
        return values

    # ----------------------------------------------------------------- diagnostics

    def torch_solver(self, *, threads: int, dtype: torch.dtype) -> dict[str, Any]:
        """The torch solver alone (no input checks), at one C, with the given threads and dtype."""
        d, C = self.data, self.args.C
        with threads_capped(threads):
            start = time.perf_counter()
            scaler = StandardScaler().fit(d.X)
            Z = scaler.transform(d.X)
            solver = _TorchLBFGS(
                Z, d.y, n_classes=self.args.classes, class_weights=None, max_iter=1000, tol=self.args.tol,
                device=self.device, dtype=dtype,
            )
            coef, intercept, n_iter = solver.solve(C, None)
            seconds = time.perf_counter() - start
            scores = scaler.transform(d.X_test) @ coef.T + intercept
            return {
                "seconds": seconds,
                "C": C,
                "n_iter": n_iter,
                "objective": objective(Z, d.y, coef, intercept, C=C),
                "test_acc": float(np.mean(np.argmax(scores, axis=1) == d.y_test)),
                "diag_threads": threads,
                "dtype": str(dtype).removeprefix("torch."),
            }

    def eval_costs(self, threads: int) -> dict[str, Any]:
        """Milliseconds per loss-and-gradient evaluation: torch float32/float64 and scikit-learn's own (float64)."""
        from sklearn._loss.loss import HalfMultinomialLoss
        from sklearn.linear_model._linear_loss import LinearModelLoss

        d, C, K = self.data, self.args.C, self.args.classes
        Z = StandardScaler().fit_transform(d.X)
        out: dict[str, Any] = {"diag_threads": threads}

        def per_call(fn: Callable[[], Any], n: int = 5) -> float:
            fn()
            start = time.perf_counter()
            for _ in range(n):
                fn()
            sync(self.device)
            return (time.perf_counter() - start) / n * 1e3

        with threads_capped(threads):
            for dtype in (torch.float32, torch.float64):
                solver = _TorchLBFGS(
                    Z, d.y, n_classes=K, class_weights=None, max_iter=1, tol=0, device=self.device, dtype=dtype
                )
                x = torch.zeros(K * (Z.shape[1] + 1), dtype=dtype, device=self.device)
                W, b = solver._split(x)
                name = str(dtype).removeprefix("torch.")
                out[f"torch_{name}_loss_grad_ms"] = per_call(lambda: solver._evaluate(x, C))
                out[f"torch_{name}_matmul_ms"] = per_call(lambda: torch.addmm(b, solver.Z, W.T))
                scores = torch.addmm(b, solver.Z, W.T)
                out[f"torch_{name}_cross_entropy_ms"] = per_call(
                    lambda: F.cross_entropy(scores, solver.y, reduction="sum")
                )
            # What LogisticRegression(solver="lbfgs") evaluates: everything in X's dtype (sklearn >= 1.8 keeps float32).
            loss = LinearModelLoss(base_loss=HalfMultinomialLoss(n_classes=K), fit_intercept=True)
            for dtype in (np.float32, np.float64):
                Zd = Z.astype(dtype, copy=False)
                coef = np.zeros((K, Z.shape[1] + 1), dtype=dtype, order="F").ravel(order="F")
                sw = np.full(len(d.y), 1.0 / len(d.y), dtype=dtype)
                yd = d.y.astype(dtype)
                name = np.dtype(dtype).name
                out[f"sklearn_{name}_loss_grad_ms"] = per_call(
                    lambda: loss.loss_gradient(
                        coef, Zd, yd, sample_weight=sw, l2_reg_strength=1.0 / (C * len(d.y)), n_threads=threads
                    )
                )
                W = np.zeros((K, Z.shape[1]), dtype=dtype)
                out[f"numpy_{name}_matmul_ms"] = per_call(lambda: Zd @ W.T)
        return out

    # ----------------------------------------------------------------- the run

    def units(self, rep: int, *, heavy: bool) -> list[Callable[[], None]]:
        """This repetition's samples in order; compared variants sit next to each other.

        ``heavy``: include the sweeps, the MLP and the kNN (fewer repetitions at large sizes).
        """
        parts = self.args.parts if heavy else self.args.parts & {"fit"}
        C = self.args.C
        units: list[Callable[[], None]] = []
        if "fit" in parts:
            units += [
                lambda: self.sample("fit", "sklearn", rep, lambda: self.sklearn_fit(C)),
                lambda: self.sample("fit", "probe_torch", rep, lambda: self.probe_fit("torch", C)),
                lambda: self.sample("fit", "probe_sklearn", rep, lambda: self.probe_fit("sklearn", C)),
            ]
        if "sweep" in parts:
            units += [
                lambda: self.sample("sweep", "sklearn", rep, self.sklearn_sweep),
                lambda: self.sample("sweep", "probe_torch", rep, lambda: self.probe_sweep("torch")),
                lambda: self.sample("sweep", "probe_sklearn", rep, lambda: self.probe_sweep("sklearn")),
            ]
        heads = {"mlp": ("MLPHead", MLPHead), "knn": ("KNNHead", KNNHead)}
        for part, (name, cls) in heads.items():
            if part in parts:
                head = lambda cls=cls: cls(device=str(self.device), n_jobs=self.threads)  # noqa: E731
                units.append(lambda p=part, n=name, h=head: self.sample(p, n, rep, lambda: self.other_head(h())))
        return units

    def diagnose(self, rep: int, *, light: bool) -> list[Callable[[], None]]:
        """Where the torch solver's time goes: threads 1 and 2, float32 and float64, next to the plain fit.

        ``light`` (large sizes): only both libraries in float32 at 1 thread, in the first repetition.
        """
        units: list[Callable[[], None]] = []

        def add(measurement: str, variant: str, fn: Callable[[], dict[str, Any]]) -> None:
            units.append(lambda: self.sample(measurement, variant, rep, fn))

        if light:
            if rep == 0:
                add("diag_fit", "torch_solver_float32_threads1",
                    lambda: self.torch_solver(threads=1, dtype=torch.float32))
                add("diag_fit", "sklearn_float32_threads1", lambda: self._sklearn_threads(1, np.float32))
            return units
        thread_counts = sorted({1, min(2, self.info["cores"])})
        for threads in thread_counts:
            for dtype in (torch.float32, torch.float64):
                name = f"torch_solver_{str(dtype).removeprefix('torch.')}_threads{threads}"
                add("diag_fit", name, lambda t=threads, dt=dtype: self.torch_solver(threads=t, dtype=dt))
            for dtype in (np.float32, np.float64):
                name = f"sklearn_{np.dtype(dtype).name}_threads{threads}"
                add("diag_fit", name, lambda t=threads, dt=dtype: self._sklearn_threads(t, dt))
        if rep == 0:
            for threads in thread_counts:
                add("diag_eval", f"eval_costs_threads{threads}", lambda t=threads: self.eval_costs(t))
            for solver in ("torch", "sklearn"):
                add("diag_fresh", f"first_fit_fresh_process_{solver}", lambda s=solver: self.fresh_process(s))
        return units

    def _sklearn_threads(self, threads: int, dtype: type) -> dict[str, Any]:
        saved, self.threads = self.threads, threads
        try:
            return {**self.sklearn_fit(self.args.C, dtype), "diag_threads": threads, "dtype": np.dtype(dtype).name}
        finally:
            self.threads = saved

    def fresh_process(self, solver: str) -> dict[str, Any]:
        """A LogisticProbe's first and second fit in a new process (2000x64, 10 classes): the one-off start-up cost."""
        code = (
            "import json, sys, time, numpy as np\n"
            f"sys.path.insert(0, {str(REPO)!r})\n"
            "started = time.perf_counter()\n"
            "from embedpipe.heads import LogisticProbe\n"
            "imported = time.perf_counter() - started\n"
            "X = np.random.default_rng(0).standard_normal((2000, 64), dtype=np.float32)\n"
            "y = np.arange(2000) % 10\n"
            "times = []\n"
            "for _ in range(2):\n"
            "    t = time.perf_counter()\n"
            f"    probe = LogisticProbe([1.0], solver={solver!r}, device={str(self.device)!r}, n_jobs={self.threads})\n"
            "    probe.fit(X, y)\n"
            "    times.append(time.perf_counter() - t)\n"
            "result = {'import_seconds': imported, 'first_fit_seconds': times[0], 'second_fit_seconds': times[1]}\n"
            "print(json.dumps(result))\n"
        )
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        values = json.loads(done.stdout.strip().splitlines()[-1])
        values["seconds"] = values["first_fit_seconds"] - values["second_fit_seconds"]
        return values

    def warm_up(self) -> None:
        """First calls pay for library loading, thread pools and CUDA contexts; not part of any sample."""
        d = self.data
        X, y = d.X[:2000], d.y[:2000]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for solver in ("torch", "sklearn"):
                self.probe(solver, [1.0]).set_params(max_iter=3).fit(X, y)
            with threads_capped(self.threads):
                LogisticRegression(max_iter=3).fit(StandardScaler().fit_transform(X), y)
            MLPHead(max_epochs=1, device=str(self.device), n_jobs=self.threads).fit(X, y)
            KNNHead(k=5, device=str(self.device), n_jobs=self.threads).fit(X, y).predict(X[:100])

    def run(self, sizes: list[tuple[int, int]]) -> None:
        for rows, features in sizes:
            started = time.perf_counter()
            d = self.data = make_data(
                rows, features, self.args.classes, test_rows=self.args.test_rows, noise=self.args.noise
            )
            large = rows * features >= LARGE_VALUES
            repeats = self.args.repeats
            heavy_repeats = min(repeats, self.args.large_repeats) if large else repeats
            self.common = {
                **self.info,
                "size": d.name,
                "n_train": rows,
                "n_test": len(d.y_test),
                "n_features": features,
                "n_classes": self.args.classes,
                "noise": d.noise,
                "tol": self.args.tol,
                "repeats": repeats,
                "heavy_repeats": heavy_repeats,
            }
            print(f"{d.name}: {repeats} repetitions of the fits, {heavy_repeats} of the rest", file=sys.stderr)
            self.warm_up()
            for rep in range(repeats):
                units = self.units(rep, heavy=rep < heavy_repeats)
                if self.args.diagnose:
                    units += self.diagnose(rep, light=large)
                self.run_interleaved(units, rep)
            self.diag("size_seconds", time.perf_counter() - started, "s")
        self.common = self.info
        self.diag("waited_for_quiet_seconds", self.waited, "s")


def _log_loss(scores: np.ndarray, y: np.ndarray) -> np.ndarray:
    top = scores.max(axis=1, keepdims=True)
    return np.log(np.exp(scores - top).sum(axis=1)) + top[:, 0] - scores[np.arange(len(y)), y]


# --------------------------------------------------------------------------- summary


def summarize(bench: Bench, sizes: list[tuple[int, int]]) -> list[list[str]]:
    """Summary records (appended to bench.records) and the rows of the printed table.

    Columns: size, row, value, ratio (median of per-repetition ratios), goal, result, clean reps.
    """
    rows: list[list[str]] = []
    kind = "cuda" if bench.device.type == "cuda" else "cpu"

    def row(size: str, text: str, value: str, *, name: str = "", ratio: float | None = None, ratio_text: str = "",
            goal: str = "", passed: bool | None = None, sel: Selection | None = None, **extra: Any) -> None:
        result = "" if passed is None else ("pass" if passed else "FAIL")
        rows.append([size, text, value, ratio_text or (f"{ratio:.3f}" if ratio is not None else ""), goal, result,
                     sel.label() if sel else ""])
        if name:
            bench.record("summary", name, size=size, ratio=ratio, goal=goal or None, passed=passed,
                         clean_reps=sel.clean if sel else None, complete_reps=sel.complete if sel else None, **extra)

    def secs(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.2f} s"

    def pct(v: float | None) -> str:
        return "n/a" if v is None else f"{100 * v:.2f}%"

    for rows_n, features in sizes:
        size = f"{rows_n}x{features}"
        fit = bench.select("sklearn", "probe_torch", "probe_sklearn", size=size, measurement="fit")
        if fit.complete:
            goal = FIT_RATIO_GOAL[kind]
            ratio = fit.median(lambda g: g["probe_torch"]["seconds"] / g["sklearn"]["seconds"])
            obj = fit.median(lambda g: g["probe_torch"]["objective"] / g["sklearn"]["objective"] - 1.0)
            acc = fit.median(lambda g: 100 * (g["probe_torch"]["test_acc"] - g["sklearn"]["test_acc"]))
            equal = obj is not None and acc is not None
            equal = equal and abs(obj) <= OBJECTIVE_REL_TOL and abs(acc) <= ACCURACY_POINTS_TOL
            row(size, f"fit C={bench.args.C:g}: sklearn LogisticRegression", secs(fit.value("sklearn", "seconds")),
                sel=fit)
            iters = [fit.value(v, "n_iter") for v in ("sklearn", "probe_torch")]
            row(size, "  iterations sklearn / probe_torch", " / ".join(f"{i:.0f}" for i in iters))
            row(size, "  probe_torch / sklearn time", secs(fit.value("probe_torch", "seconds")), name="fit_ratio_torch",
                ratio=ratio, goal=f"<= {goal}", passed=None if ratio is None else ratio <= goal and equal, sel=fit)
            row(size, "  probe_torch objective rel. diff", f"{obj:+.2e}" if obj is not None else "n/a",
                name="fit_objective_rel_diff", ratio=obj, ratio_text=" ", goal=f"|x| <= {OBJECTIVE_REL_TOL:g}",
                passed=None if obj is None else abs(obj) <= OBJECTIVE_REL_TOL, sel=fit)
            row(size, "  probe_torch test acc diff (points)", f"{acc:+.2f}" if acc is not None else "n/a",
                name="fit_accuracy_diff_points", ratio=acc, ratio_text=" ", goal=f"|x| <= {ACCURACY_POINTS_TOL}",
                passed=None if acc is None else abs(acc) <= ACCURACY_POINTS_TOL, sel=fit,
                test_acc_sklearn=fit.value("sklearn", "test_acc"), test_acc_torch=fit.value("probe_torch", "test_acc"))
            # The stricter reading: scikit-learn at its fastest thread count and dtype (the --diagnose rows).
            plain = [r for r in bench.samples_where(size=size)
                     if (r["measurement"] == "fit" and r["variant"] == "sklearn")
                     or (r["measurement"] == "diag_fit" and r["variant"].startswith("sklearn_"))]
            if any(r["measurement"] == "diag_fit" for r in plain):
                by_variant: dict[str, list[float]] = {}
                for r in plain:
                    by_variant.setdefault(f"{r['measurement']}:{r['variant']}", []).append(r["seconds"])
                fastest_name, fastest = min(((k, med(v)) for k, v in by_variant.items()), key=lambda kv: kv[1])
                torch_s = fit.value("probe_torch", "seconds")
                r = torch_s / fastest if torch_s and fastest else None
                row(size, f"  probe_torch / fastest sklearn ({fastest_name.split(':')[1]})", secs(fastest),
                    name="fit_ratio_torch_vs_fastest_sklearn", ratio=r, goal=f"<= {goal}",
                    passed=None if r is None else r <= goal and equal, fastest_sklearn=fastest_name)
            r = fit.median(lambda g: g["probe_sklearn"]["seconds"] / g["sklearn"]["seconds"])
            row(size, "  probe_sklearn / sklearn time", secs(fit.value("probe_sklearn", "seconds")),
                name="fit_ratio_probe_sklearn", ratio=r, sel=fit)
            row(size, "  test acc sklearn / probe_torch",
                " / ".join(pct(fit.value(v, "test_acc")) for v in ("sklearn", "probe_torch")))
        sweep = bench.select("sklearn", "probe_torch", "probe_sklearn", size=size, measurement="sweep")
        if sweep.complete:
            truncated = any(g["sklearn"].get("truncated") for g in sweep.reps)
            n_cs = sweep.value("sklearn", "n_Cs")
            ratio = sweep.median(lambda g: g["probe_torch"]["seconds"] / g["sklearn"]["seconds"])
            stopped = f" (stopped after {n_cs:.0f} Cs)" if truncated else ""
            row(size, f"sweep {bench.args.Cs} Cs: sklearn, one fit per C{stopped}",
                ("> " if truncated else "") + secs(sweep.value("sklearn", "seconds")), sel=sweep)
            row(size, "  probe_torch / sklearn time", secs(sweep.value("probe_torch", "seconds")),
                name="sweep_ratio_torch", ratio=ratio,
                ratio_text=("<= " if truncated else "") + (f"{ratio:.3f}" if ratio is not None else "n/a"),
                sel=sweep, baseline_truncated=truncated)
            r = sweep.median(lambda g: g["probe_torch"]["seconds"] / g["probe_sklearn"]["seconds"])
            row(size, "  probe_torch / probe_sklearn time", secs(sweep.value("probe_sklearn", "seconds")),
                name="sweep_ratio_torch_vs_probe_sklearn", ratio=r, sel=sweep)
            torch_s = sweep.value("probe_torch", "seconds")
            if rows_n >= SWEEP_GOAL_SIZE[0] and features >= SWEEP_GOAL_SIZE[1]:
                goal = SWEEP_SECONDS_GOAL[kind]
                on_goal_hw = kind == "cuda" or bench.threads == 2
                row(size, f"  probe_torch sweep seconds ({'GPU' if kind == 'cuda' else f'{bench.threads} threads'})",
                    secs(torch_s), name="sweep_seconds_torch", ratio=torch_s, goal=f"<= {goal:g} s",
                    passed=None if torch_s is None or not on_goal_hw else torch_s <= goal, sel=sweep)
            c_text = " / ".join(f"{sweep.value(v, 'C_'):.3g}" for v in ("sklearn", "probe_torch", "probe_sklearn"))
            row(size, "  chosen C sklearn / probe_torch / probe_sklearn", c_text)
            acc = sweep.median(lambda g: 100 * (g["probe_torch"]["test_acc"] - g["sklearn"]["test_acc"]))
            row(size, "  test acc sklearn / probe_torch / probe_sklearn",
                " / ".join(pct(sweep.value(v, "test_acc")) for v in ("sklearn", "probe_torch", "probe_sklearn")),
                name="sweep_accuracy_diff_points", ratio=acc, ratio_text=f"{acc:+.2f} pt" if acc is not None else "",
                goal=f"|x| <= {ACCURACY_POINTS_TOL}", sel=sweep,
                # a cut-short plain sweep chose from fewer Cs: no verdict
                passed=None if acc is None or truncated else abs(acc) <= ACCURACY_POINTS_TOL)
        ref = sweep.value("probe_torch", "seconds") if sweep.complete else None
        for measurement, variant in (("mlp", "MLPHead"), ("knn", "KNNHead")):
            sel = bench.select(variant, size=size, measurement=measurement)
            if not sel.complete:
                continue
            if measurement == "mlp":
                extra = f", {sel.value(variant, 'epochs'):.0f} epochs"
            else:
                extra = f", k={sel.value(variant, 'k'):.0f}"
            r = sel.value(variant, "seconds") / ref if ref else None
            row(size, f"{variant} fit + predict (acc {pct(sel.value(variant, 'test_acc'))}{extra}) / torch sweep",
                f"{secs(sel.value(variant, 'fit_seconds'))} + {secs(sel.value(variant, 'predict_seconds'))}",
                name=f"{measurement}_seconds_vs_torch_sweep", ratio=r, sel=sel, test_acc=sel.value(variant, "test_acc"))
        final = bench.samples_where(size=size)
        for r in final:
            if r["measurement"] == "diag_fresh":
                row(size, f"diag {r['variant']}: first - second fit (import {r['import_seconds']:.1f} s)",
                    f"{r['first_fit_seconds']:.2f} - {r['second_fit_seconds']:.2f} s")
        diag = [r for r in final if r["measurement"] == "diag_fit"]
        for variant in dict.fromkeys(r["variant"] for r in diag):
            s = [r for r in diag if r["variant"] == variant]
            row(size, f"diag {variant} ({s[0]['n_iter']} it, obj {s[0]['objective']:.7f})",
                secs(med(r["seconds"] for r in s)))
        for r in final:
            if r["measurement"] == "diag_eval":
                for lib, dtype in itertools.product(("torch", "sklearn"), ("float32", "float64")):
                    matmul = r[f"{lib}_{dtype}_matmul_ms" if lib == "torch" else f"numpy_{dtype}_matmul_ms"]
                    row(size, f"diag one loss+gradient, {lib} {dtype}, {r['diag_threads']} threads (of it: X @ W.T)",
                        f"{r[f'{lib}_{dtype}_loss_grad_ms']:.1f} ms ({matmul:.1f})")
    return rows


HEADER = ["size", "measurement", "value", "ratio", "goal", "result", "clean reps"]


def title(bench: Bench) -> list[str]:
    info = bench.info
    return [
        f"embedpipe heads benchmark: {bench.args.classes} classes, tol {bench.args.tol:g}, medians over repetitions",
        f"machine: {info['cpu']}, {info['cores']} cores{', ' + info['gpu'] if info['gpu'] else ''}; "
        f"device {info['device']}, "
        f"{bench.threads} threads; torch {info['torch']} ({info['torch_blas']}), scikit-learn {info['sklearn']}, "
        f"numpy {info['numpy']} ({info['numpy_blas']})",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add("--sizes", default="10000x512,50000x2048",
        help="training ROWSxFEATURES, comma-separated (default: %(default)s)")
    add("--classes", type=int, default=100, help="classes (default: %(default)s)")
    add("--test-rows", type=int, default=10_000, help="rows of the separate test set (default: %(default)s)")
    add("--noise", type=float, default=None,
        help=f"noise std (default: {NOISE_AT_512} * sqrt(features / 512): about 60%% test accuracy)")
    add("--large-repeats", type=int, default=1,
        help=f"repetitions of the sweeps, MLP and kNN at sizes of {LARGE_VALUES:.2g}+ training values; "
        "the single fits still run --repeats times (default: %(default)s)")
    add("--device", default="auto", help="torch device of the heads: auto (default: the GPU if any), cpu, cuda")
    add("--threads", type=int, default=None, help="CPU threads for every variant (default: all cores)")
    add("--C", type=float, default=0.01, help="C of the single fits, near the sweep's choice (default: %(default)s)")
    add("--Cs", type=int, default=45, help="C values in the sweep (default: %(default)s)")
    add("--tol", type=float, default=1e-4, help="L-BFGS gradient tolerance, both libraries (default: %(default)s)")
    add("--baseline-sweep-budget", type=float, default=240.0,
        help="seconds after which the plain scikit-learn sweep stops; its time is then a lower bound "
        "(default: %(default)s)")
    add("--parts", default="fit,sweep,mlp,knn", help="what to measure (default: %(default)s)")
    add("--diagnose", action="store_true",
        help="add where-the-time-goes rows at sizes below the large ones (threads, dtype, per-evaluation cost)")
    add_sampling_options(parser, what="heads", max_wait=300.0)
    add("--retries", type=int, default=1,
        help="times a sample that other processes disturbed runs again (default: %(default)s)")
    args = parser.parse_args(argv)
    args.parts = set(args.parts.split(","))
    sizes = [parse_size(s) for s in args.sizes.split(",") if s]

    started = time.perf_counter()
    bench = Bench(args)
    out = results_path("heads", bench.info, out=args.out)
    bench.run(sizes)
    bench.finish(title(bench), HEADER, summarize(bench, sizes), started=started, out=out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
