"""Bookkeeping for ``embedpipe bench``: named backbone lists, run ids, record fields, results files.

The grid itself runs in :mod:`.grid`; the tables, plots and HTML are in :mod:`.report`. A bench writes one flat record per run
(backbone x head x shots x seed), one per failure, one warning per backbone whose test split
repeats its train split (leakage), and one summary per (backbone, head, shots) over seeds, to
``results.json`` and ``results.csv``. Each backbone's rows also carry its features' retrieval
quality (kNN recall@1, recall@5, mAP@R of the test split against train), measured once per backbone.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .._atomic import write_atomically
from ..config import BackboneSpec, EmbeddingConfig, SplitConfig, digest_of
from ..errors import BenchError, ExploreError, FineTuneError
from ..finetune import read_run

logger = logging.getLogger(__name__)

# Bump when the meaning of a stored record changes; a results.json of another version is not reused.
BENCH_FORMAT = 1
RESULTS_JSON = "results.json"
RESULTS_CSV = "results.csv"
REPORT_HTML = "report.html"
FINETUNE_DIR = "finetune"  # copies of fine-tune run folders shown in the report (metrics.jsonl, summary.json)
BACKBONE_LISTS = Path(__file__).with_name("backbones.json")  # package data: named lists ship with the wheel
ALL = "all"  # shots: every training image
SCRATCH = "scratch"  # the head name of --baseline scratch rows (same architecture trained from random init)
# How many images to time a cached backbone on, so a cache hit still reports images/s and memory.
THROUGHPUT_SAMPLE = 64


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
    """The named lists in ``embedpipe/bench/backbones.json`` (or ``path``): name -> timm model names."""
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


def feature_quality(X: np.ndarray, labels: np.ndarray, meta: dict[str, Any], *, device: str,
                    leakage_threshold: float | None) -> tuple[dict[str, Any], Any]:
    """A backbone's retrieval fields and its train/test leakage check, from its exported file (once per backbone).

    Returns:
        ``(fields every run record of the backbone carries, the explore.Leakage found)``; the retrieval
        fields are None when the file has no labelled test and train rows.
    """
    from ..explore import RECALL_AT, retrieval_quality, split_leakage

    split = meta["split"] if meta["split"] is not None else np.array([""] * len(X), dtype=object)
    test, train = split == "test", split == "train"
    fields: dict[str, Any] = {"knn_recall_at_1": None, "knn_recall_at_5": None, "knn_map_at_r": None, "knn_queries": None}
    try:
        quality = retrieval_quality(X[test], labels[test], X[train], labels[train], ks=RECALL_AT, device=device)
    except ExploreError as why:
        logger.info("no retrieval quality: %s", why)
    else:
        fields.update(knn_recall_at_1=quality.recall[1], knn_recall_at_5=quality.recall[5], knn_map_at_r=quality.map_at_r,
                      knn_queries=quality.queries)
    leakage = split_leakage(X, meta["digests"], split, threshold=leakage_threshold, device=device)
    fields["leakage_check"] = leakage.describe()
    return fields, leakage


def leakage_record(base: dict[str, Any], leakage: Any, paths: list[str]) -> dict[str, Any] | None:
    """The warning record of a backbone whose test split repeats its train split, or None when it does not."""
    if not leakage.exact and not leakage.near:
        return None
    pairs = [(a, b, "identical file") for a, b in leakage.exact] + [(a, b, f"cosine {s:.3f}") for a, b, s in leakage.near]
    examples = "; ".join(f"{paths[a]} = {paths[b]} ({how})" for a, b, how in pairs[:5]) + ("; ..." if len(pairs) > 5 else "")
    return {**base, "record": "warning", "warning": "leakage", "created": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()),
            "run_id": "", "head": None, "shots": None, "seed": None, "error": None,
            "message": f"{leakage.found()}: the test numbers are inflated; remove the copies from test (or train) and rerun",
            "exact_pairs": len(leakage.exact), "near_pairs": len(leakage.near), "near_threshold": leakage.threshold,
            "examples": examples}


def head_protocol(kind: str, params: dict[str, Any]) -> dict[str, str]:
    """How a head was set up, in words: its normalisation, C grid and settings (defaults merged with ``params``)."""
    from ..heads import HEADS
    from ..heads.logreg import c_grid

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
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise BenchError(f"{path} is not a list of bench records: delete it and rerun the bench")
    formats = {r.get("bench_format") for r in records}
    if formats - {BENCH_FORMAT} or not all(type(r.get("bench_format")) is int for r in records):
        raise BenchError(f"{path} holds bench format {sorted(map(str, formats))}, this embedpipe writes {BENCH_FORMAT}: "
                         "rerun the bench into a new --out folder")
    for number, record in enumerate(records):
        problem = _record_problem(record)
        if problem:
            raise BenchError(f"{path} record {number} {problem}: delete the file and rerun the bench, or fix that record")
    return records


# What each field of a stored record must be (the report reads them all); other fields must be plain JSON scalars.
_NUMBERS = {"accuracy", "balanced_accuracy", "macro_f1", "val_accuracy", "train_accuracy", "majority_accuracy", "fit_seconds",
            "extract_images_per_second", "extract_seconds", "peak_memory_bytes", "n_train", "n_test", "n_val", "n_classes",
            "embedding_dim", "param_count", "train_per_class", "n_seeds", "epochs", "knn_recall_at_1", "knn_recall_at_5",
            "knn_map_at_r", "knn_queries", "exact_pairs", "near_pairs", "near_threshold"}
_TEXTS = {"backbone", "head", "run_id", "session", "created", "error", "error_type", "chosen", "weights", "precision", "preprocess",
          "normalisation", "split", "dataset", "source", "head_protocol", "c_grid", "head_normalisation", "selection", "head_params",
          "device", "throughput_source", "peak_memory_kind", "embeddings_file", "stop_reason", "run_dir", "leakage_check", "warning",
          "message", "examples"}
_REQUIRED = {"run": ("backbone", "head", "shots", "seed", "run_id"), "summary": ("backbone", "head", "shots"), "error": ("error",),
             "warning": ("backbone", "warning", "message")}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _record_problem(record: dict[str, Any]) -> str | None:
    """Why a stored record cannot be reported on (a field missing or of the wrong type), or None."""
    kind = record.get("record")
    if kind not in _REQUIRED:
        return f"is of kind {kind!r}, not run, summary, warning or error"
    missing = [k for k in _REQUIRED[kind] if record.get(k) is None]
    if missing:
        return f"({kind}) lacks {missing[0]!r}"
    for key, value in record.items():
        if key == "shots":
            ok = value is None or value == ALL or (type(value) is int and value >= 1)
        elif key == "seed":
            ok = value is None or (type(value) is int and value >= 0)
        elif key in ("seeds", "run_ids", "class_names"):
            ok = isinstance(value, list) and all((type(v) is int) if key == "seeds" else isinstance(v, str) for v in value)
        elif key == "confusion_matrix":
            ok = value is None or (isinstance(value, list) and all(
                isinstance(row, list) and len(row) == len(value) and all(type(v) is int for v in row) for row in value))
        elif key in _NUMBERS or key.endswith(("_mean", "_std")):
            ok = value is None or _is_number(value)
        elif key in _TEXTS:
            ok = value is None or isinstance(value, str)
        else:
            ok = value is None or isinstance(value, (str, int, float, bool))
        if not ok:
            return f"has {key} {value!r:.40} of the wrong type"
    return None


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


def read_finetune_run(folder: str | Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """A fine-tune run folder's epochs and summary (:func:`embedpipe.finetune.read_run`), for the bench and its report.

    Raises:
        BenchError: the folder lacks them or they are unreadable.
    """
    try:
        return read_run(folder)
    except FineTuneError as error:
        raise BenchError(str(error)) from None
