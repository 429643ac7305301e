"""Bookkeeping for ``embedpipe bench``: named backbone lists, run ids, cost measurements, results files.

The grid itself runs in :func:`embedpipe.pipeline.bench`; the tables, plots and
HTML are in :mod:`embedpipe.report`. A bench writes one flat record per run
(backbone x head x shots x seed), one per failure, and one summary per
(backbone, head, shots) over seeds, to ``results.json`` and ``results.csv``.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import platform
import re
import subprocess
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ._atomic import write_atomically
from .config import BackboneSpec, EmbeddingConfig, SplitConfig, digest_of
from .errors import EmbedpipeError

# Bump when the meaning of a stored record changes; a results.json of another version is not reused.
BENCH_FORMAT = 1
RESULTS_JSON = "results.json"
RESULTS_CSV = "results.csv"
REPORT_HTML = "report.html"
FINETUNE_DIR = "finetune"  # copies of fine-tune run folders shown in the report (metrics.jsonl, summary.json)
BACKBONE_LISTS = Path(__file__).resolve().parents[1] / "benchmarks" / "backbones.json"
ALL = "all"  # shots: every training image
SCRATCH = "scratch"  # the head name of --baseline scratch rows (same architecture trained from random init)
# How many images to time a cached backbone on, so a cache hit still reports images/s and memory.
THROUGHPUT_SAMPLE = 64


class BenchError(EmbedpipeError):
    """A bench cannot start: bad grid, unknown backbone list, results of another format."""

    exit_code = 7


# --------------------------------------------------------------------------- the grid


def parse_shots(values: Sequence[str | int | None]) -> list[int | str]:
    """``["1", "5", "all"]`` -> ``[1, 5, "all"]``, in the given order, without repeats."""
    shots: list[int | str] = []
    for value in values:
        if value is None or str(value).strip().lower() == ALL:
            shots.append(ALL)
            continue
        try:
            number = int(value)
        except ValueError:
            raise BenchError(f"--shots {value!r} is neither a number nor 'all': e.g. --shots 1,5,10,all") from None
        if number < 1:
            raise BenchError(f"--shots {number} must be at least 1 image per class")
        shots.append(number)
    if not shots:
        raise BenchError("no --shots given: e.g. --shots 1,5,10,all")
    return list(dict.fromkeys(shots))


def backbone_lists(path: str | Path | None = None) -> dict[str, list[str]]:
    """The named lists in ``benchmarks/backbones.json`` (or ``path``): name -> timm model names."""
    path = Path(path) if path else BACKBONE_LISTS
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise BenchError(f"cannot read backbone lists from {path} ({error}): fix the file or pass --backbones a,b,c") from None
    return {k: list(v) for k, v in data.items() if not k.startswith("_")}


def resolve_backbones(text: str | Sequence[str], *, lists_file: str | Path | None = None) -> list[str]:
    """A comma list of names, where a name may also be a named list (``small``, ``offline``...)."""
    items = text.split(",") if isinstance(text, str) else list(text)
    named = backbone_lists(lists_file)
    names: list[str] = []
    for item in (i.strip() for i in items):
        if not item:
            continue
        names.extend(named.get(item, [item]))
    if not names:
        raise BenchError(f"no backbones given: pass --backbones a,b or a named list ({', '.join(named) or 'none found'})")
    return list(dict.fromkeys(names))


def run_key(*, source: str, spec: BackboneSpec, split: SplitConfig, head: str, params: dict[str, Any],
            shots: int | str, seed: int) -> str:
    """The id of one grid cell: changes whenever anything that decides its numbers does."""
    return digest_of(
        {"format": BENCH_FORMAT, "source": source, "spec": spec.to_dict(), "split": split.to_dict(), "head": head,
         "params": params, "shots": shots, "seed": seed}
    )[:16]


def session_id() -> str:
    """Names one bench invocation; every record it writes carries it (so a resumed row shows where it came from)."""
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + "-" + os.urandom(3).hex()


# --------------------------------------------------------------------------- record fields


def backbone_record(config: EmbeddingConfig, labels: np.ndarray, meta: dict[str, Any], split: SplitConfig) -> dict[str, Any]:
    """The protocol fields one backbone's rows share: weights, preprocessing, normalisation, split sizes, classes.

    Args:
        config: the resolved embedding config.
        labels: int64 (N,) labels of the exported file; meta: its metadata (``embedpipe.load``).
        split: the split asked for (used where the data came without one).
    """
    p = config.preprocess
    column = meta["split"]
    counts = {s: int((column == s).sum()) for s in ("train", "val", "test")}
    test = labels[column == "test"]
    source = (meta.get("dataset") or {}).get("split_source", "")
    how = f"seeded split (val {split.val_fraction:g}, test {split.test_fraction:g}, seed {split.seed})" if source == "seeded" else f"{source} split"
    return {
        "weights": config.weights,
        "precision": config.precision,
        "preprocess": f"{p.input_size[1]}x{p.input_size[2]} {p.interpolation}, crop_pct {p.crop_pct:g} ({p.crop_mode})",
        "normalisation": "mean (" + ", ".join(f"{v:.3f}" for v in p.mean) + "), std (" + ", ".join(f"{v:.3f}" for v in p.std) + ")",
        "split": f"{how}: train {counts['train']} / val {counts['val']} / test {counts['test']}",
        "n_classes": len(meta["class_names"]),
        "class_names": [str(c) for c in meta["class_names"]],
        "n_val": counts["val"],
        "majority_accuracy": float(np.bincount(test).max() / len(test)) if len(test) else None,
        "selection": "among each head's own training rows only (see each head's settings); the val split is not used "
                     "for fitting (its accuracy is reported as val_accuracy)",
    }


def head_protocol(kind: str, params: dict[str, Any]) -> dict[str, str]:
    """How a head was set up, in words: its normalisation, C grid and settings (defaults merged with ``params``)."""
    from .heads import HEADS
    from .heads.logreg import c_grid

    merged = {**HEADS[kind]().get_params(), **params}
    out = {"head_normalisation": "", "c_grid": "", "head_protocol": ""}
    if kind == "logreg":
        grid = c_grid(merged["Cs"])
        out["head_normalisation"] = {"standard": "standardised per feature (train mean and std)", "l2": "L2-normalised rows",
                                     "none": "not normalised"}.get(merged["normalize"], str(merged["normalize"]))
        out["c_grid"] = f"{len(grid)} values log-spaced {grid.min():.0e}..{grid.max():.0e}" if len(grid) > 1 else f"C={grid[0]:g}"
        out["head_protocol"] = (f"multinomial logistic regression ({merged['solver']} L-BFGS), features {out['head_normalisation']}, "
                                f"C from {out['c_grid']} on a {merged['val_fraction']:g} hold-out, then refit")
    elif kind == "knn":
        k = (f"k={merged['k']}" if merged["k"] else
             f"k from {tuple(merged['k_grid'])} by leave-one-out on a {merged['val_fraction']:g} share of the training rows")
        out["head_protocol"] = f"cosine kNN, votes weighted exp(similarity / {merged['temperature']:g}); {k}"
    elif kind == "mlp":
        out["head_protocol"] = (f"MLP hidden {merged['hidden']}, dropout {merged['dropout']:g}, {merged['optimizer']} lr {merged['lr']:g}, "
                                f"weight decay {merged['weight_decay']:g}, up to {merged['max_epochs']} epochs, early stopping "
                                f"(patience {merged['patience']}) on a {merged['val_fraction']:g} hold-out, best epoch kept, no refit")
    return out


def fit_metrics(metrics: dict[str, dict[str, Any]], chosen: dict[str, Any], *, n_train: int, fit_seconds: float,
                classes: np.ndarray) -> dict[str, Any]:
    """A run's result fields from a fitted head's metrics (see :func:`embedpipe.pipeline.fit_head`)."""
    test, val, train = metrics.get("test", {}), metrics.get("val", {}), metrics["train"]
    words = {"best_epoch": "epoch"}
    return {
        "error": None,
        "accuracy": test.get("accuracy"),
        "balanced_accuracy": test.get("balanced_accuracy"),
        "macro_f1": test.get("macro_f1"),
        "val_accuracy": val.get("accuracy"),
        "train_accuracy": train["accuracy"],
        "n_train": n_train,
        "n_test": test.get("n", 0),
        "chosen": ", ".join(f"{words.get(k, k)}={v:.3g}" if isinstance(v, float) else f"{words.get(k, k)}={v}"
                            for k, v in chosen.items()) or "fixed",
        "fit_seconds": fit_seconds,
        "confusion_matrix": test.get("confusion_matrix"),
        "class_names": [str(c) for c in classes],
    }


def finetune_record(run_dir: str | Path) -> dict[str, Any]:
    """The result fields of a fine-tune run folder (its ``summary.json``): test accuracy, kept epoch, cost."""
    from .report import read_finetune_run

    epochs, summary = read_finetune_run(run_dir)
    test = summary.get("test") or {}
    return {"error": None, "accuracy": test.get("accuracy"), "balanced_accuracy": test.get("balanced_accuracy"),
            "macro_f1": test.get("macro_f1"), "n_test": test.get("n"), "chosen": f"epoch={summary.get('best_epoch')}",
            "fit_seconds": summary.get("seconds"), "peak_memory_bytes": summary.get("peak_memory_bytes"), "epochs": len(epochs),
            "stop_reason": summary.get("stop_reason"), "run_dir": str(run_dir)}


def scratch_record(common: dict[str, Any], *, spec: BackboneSpec, split: SplitConfig, shots: int | str, seed: int,
                   run_dir: str | Path, error: BaseException | None = None) -> dict[str, Any]:
    """One ``--baseline scratch`` row: the architecture trained from random init on ``shots`` labels per class.

    Args:
        common: the fields every record of the bench carries (format, session, dataset, source, environment).
        run_dir: the fine-tune run folder it trained into (read when ``error`` is None).
        error: what stopped that run, if anything.
    """
    record = {**common, "record": "run", "created": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()), "backbone": spec.name,
              "pretrained": False, "head": SCRATCH, "shots": shots, "seed": seed,
              "run_id": run_key(source=common["source"], spec=spec, split=split, head=SCRATCH, params={}, shots=shots, seed=seed)}
    if error is not None:
        return {**record, "record": "error", "error": str(error).splitlines()[0] if str(error) else type(error).__name__,
                "error_type": type(error).__name__}
    return {**record, **finetune_record(run_dir)}


# --------------------------------------------------------------------------- costs


class PeakMemory:
    """Peak memory while a block runs: CUDA allocator peak on a GPU, else the rise of this process's RSS.

    The CPU figure samples ``/proc/self/statm`` every 20 ms (Linux; None elsewhere), so it covers the
    forward pass's activations and the model weights, not the DataLoader workers' decoding buffers.
    """

    def __init__(self, device: str) -> None:
        self.device = device
        self.peak_bytes: int | None = None
        self.kind = "cuda_max_allocated" if device.startswith("cuda") else "rss_increase"
        self._stop = threading.Event()

    @staticmethod
    def _rss() -> int | None:
        try:
            return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            return None

    def __enter__(self) -> PeakMemory:
        if self.kind == "cuda_max_allocated":
            import torch

            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        self._base = self._rss()
        self._peak = self._base
        if self._base is not None:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            rss = self._rss()
            if rss is not None and self._peak is not None and rss > self._peak:
                self._peak = rss

    def __exit__(self, *exc: Any) -> None:
        if self.kind == "cuda_max_allocated":
            import torch

            self.peak_bytes = int(torch.cuda.max_memory_allocated(self.device))
            return
        if self._base is None:
            return
        self._stop.set()
        self._thread.join()
        rss = self._rss() or 0
        self.peak_bytes = max(self._peak or 0, rss) - self._base


# --------------------------------------------------------------------------- environment


def environment(device: str) -> dict[str, Any]:
    """What a results file must name: CPU/GPU, cores, library versions, git commit."""
    from importlib.metadata import PackageNotFoundError, version

    from . import __version__

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        found = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
        cpu = found[1].strip() if found else cpu
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    gpu = ""
    if device.startswith("cuda"):
        import torch

        gpu = torch.cuda.get_device_name(device)
    info: dict[str, Any] = {"cpu": cpu, "cores": cores, "gpu": gpu, "device": device, "python": platform.python_version(),
                            "embedpipe": __version__}
    for package in ("torch", "timm", "scikit-learn", "numpy"):
        try:
            info[package.replace("-", "")] = version(package)
        except PackageNotFoundError:
            info[package.replace("-", "")] = "not installed"
    commit = ""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        done = subprocess.run(["git", "-C", str(Path(__file__).parent), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=5)
        commit = done.stdout.strip() if done.returncode == 0 else ""
    info["git_commit"] = commit
    info["machine"] = machine_slug(info)
    return info


def machine_slug(info: dict[str, Any]) -> str:
    """``cpu-amd-epyc-2c`` or ``gpu-nvidia-h100-80gb-hbm3-16c``, as benchmarks/bench_heads.py names results files."""
    name = info.get("gpu") or info.get("cpu") or ""
    name = re.sub(r"\((r|tm)\)|cpu|processor|@.*$|\d+-core", "", name, flags=re.I)
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"
    return f"{'gpu' if info.get('gpu') else 'cpu'}-{slug}-{info.get('cores', 0)}c"


# --------------------------------------------------------------------------- results files


def read_results(out: str | Path) -> list[dict[str, Any]]:
    """The records of ``out/results.json``; empty when there is none.

    Raises:
        BenchError: the file is unreadable or of another bench format.
    """
    path = Path(out) / RESULTS_JSON
    if not path.is_file():
        return []
    try:
        records = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise BenchError(f"{path} is unreadable ({error}): delete it, or rerun the bench without --skip-existing") from None
    if not isinstance(records, list):
        raise BenchError(f"{path} is not a list of bench records: delete it and rerun the bench")
    formats = {r.get("bench_format") for r in records}
    if formats - {BENCH_FORMAT}:
        raise BenchError(f"{path} holds bench format {sorted(map(str, formats))}, this embedpipe writes {BENCH_FORMAT}: "
                         "rerun the bench into a new --out folder")
    return records


def _csv_cell(value: Any) -> Any:
    if isinstance(value, (list, dict)):
        return json.dumps(value, separators=(",", ":"))
    return "" if value is None else value


def write_results(out: str | Path, records: list[dict[str, Any]]) -> None:
    """``results.json`` (a list of flat records) and ``results.csv`` (the same, one row each), written atomically."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_atomically(out / RESULTS_JSON, (json.dumps(records, indent=1, default=str) + "\n").encode())
    columns: dict[str, None] = {}
    for record in records:
        columns.update(dict.fromkeys(record))
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=list(columns))
    writer.writeheader()
    writer.writerows({k: _csv_cell(record.get(k)) for k in columns} for record in records)
    write_atomically(out / RESULTS_CSV, table.getvalue().encode())
