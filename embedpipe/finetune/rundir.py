"""A fine-tune run folder: its files, checkpoints, metrics and curves, written atomically and read back.

::

    config.json          the options, backbone, embedding config, data and versions the run started with
    best.safetensors     the best epoch's weights (timm key names: ``embedpipe extract --weights``)
    last.safetensors     model, optimizer and the loop's JSON state after the last finished epoch (``--resume``)
    metrics.jsonl/.csv   one record per epoch
    summary.json         what the run did: best and stopped epoch, val/test metrics, peak memory, how to extract
    curves.png           loss and accuracy against epoch
    head/                the trained classifier as a saved head (``embedpipe predict``)

Everything is written atomically (temporary file, fsync, ``os.replace``), so a run killed at any
moment leaves the previous checkpoint loadable. Checkpoints are safetensors: loading never unpickles.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .._atomic import json_bytes, jsonable, write_atomically
from ..errors import FineTuneError

STATE_FORMAT = "embedpipe-finetune"
STATE_VERSION = 1  # bump when last.safetensors changes meaning, so an older run is refused, not misread
BEST_FILE = "best.safetensors"
LAST_FILE = "last.safetensors"
CONFIG_FILE = "config.json"
METRICS_JSONL = "metrics.jsonl"
METRICS_CSV = "metrics.csv"
SUMMARY_FILE = "summary.json"
CURVES_FILE = "curves.png"
HEAD_DIR = "head"

METRIC_KEYS = ("phase", "epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "head_lr", "seconds", "improved")


def check_out_folder(out: Path, *, resume: bool) -> None:
    """Refuse to overwrite a run without ``resume``, and to resume where there is nothing to resume."""
    if resume and not (out / LAST_FILE).is_file():
        raise FineTuneError(f"nothing to resume in {out} (no {LAST_FILE}): run without --resume")
    if not resume and ((out / LAST_FILE).exists() or (out / SUMMARY_FILE).exists()):
        raise FineTuneError(f"{out} already holds a run: pass --resume to continue it, or another --out")



def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` so that a crash leaves the old file or the new one, never half of either."""
    try:
        write_atomically(path, data)
    except OSError as error:
        raise FineTuneError(f"could not write {path} ({error.strerror or error}): free disk space or pick another --out") from None


def write_json(path: Path, data: Any) -> None:
    atomic_write(path, json_bytes(data))


CHECKSUM_KEY = "sha256"  # header entry: digest of every tensor and the rest of the header


def tensors_digest(tensors: dict[str, torch.Tensor], header: dict[str, str]) -> str:
    """sha256 over the header's JSON strings and each tensor's name, dtype, shape and bytes (sorted by name)."""
    import hashlib

    digest = hashlib.sha256(json.dumps({k: v for k, v in header.items() if k != CHECKSUM_KEY}, sort_keys=True).encode())
    for name in sorted(tensors):
        tensor = tensors[name].detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, Any]) -> None:
    """A safetensors file whose header carries ``metadata`` (each value JSON-encoded) and a checksum, written atomically."""
    from safetensors.torch import save

    plain = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    header = {k: json.dumps(v, default=jsonable) for k, v in metadata.items()}
    header[CHECKSUM_KEY] = json.dumps(tensors_digest(plain, header))
    atomic_write(path, save(plain, metadata=header))


def load_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a file written by :func:`save_tensors`: ``(tensors, metadata)``; never unpickles.

    Raises:
        FineTuneError: unreadable, or changed since it was written (a checksum that does not match).
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), framework="pt") as handle:
            raw = handle.metadata() or {}
        tensors = load_file(str(path))
        metadata = {k: json.loads(v) for k, v in raw.items()}
    except Exception as error:  # safetensors raises its own errors, OS and JSON ones
        message = str(error).splitlines()[0] if str(error) else ""
        raise FineTuneError(f"{path} is not a readable checkpoint ({type(error).__name__}: {message}): start a new run with another --out") from None
    stored = metadata.pop(CHECKSUM_KEY, None)  # checkpoints written before checksums have none
    if stored is not None and stored != tensors_digest(tensors, raw):
        raise FineTuneError(f"{path} changed since it was written (its checksum does not match): start a new run with another --out")
    return tensors, metadata


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def check_state_dict(tensors: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], where: Path) -> None:
    """Refuse a checkpoint whose tensors are not the model's: other names, shapes, dtypes, or non-finite values.

    Raises:
        FineTuneError: one line naming the first tensor that does not fit.
    """
    missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or extra:
        which = f"lacks {missing[0]!r}" if missing else f"has {extra[0]!r}, which the model does not"
        raise FineTuneError(f"{where} {which} ({len(missing)} missing, {len(extra)} unknown tensors): start a new run with another --out")
    for name, tensor in tensors.items():
        want = expected[name]
        if tensor.shape != want.shape or tensor.dtype != want.dtype:
            raise FineTuneError(f"{where} holds {name} as {tensor.dtype} {tuple(tensor.shape)}, the model's is "
                                f"{want.dtype} {tuple(want.shape)}: start a new run with another --out")
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise FineTuneError(f"{where} holds NaN or infinite values in {name}: start a new run with another --out")


_STATE_TYPES = {  # run-state field -> the check its value must pass
    "history": lambda v: isinstance(v, list) and all(_is_record(r) for r in v),
    "initial": lambda v: v is None or (isinstance(v, dict) and _number(v.get("val_loss")) and _number(v.get("val_acc"))),
    "best": lambda v: is_best_record(v),
    "phase_index": _whole, "phase_epoch": _whole, "bad_epochs": _whole, "step": _whole,
    "phase_finished": lambda v: isinstance(v, bool),
    "memory": lambda v: isinstance(v, dict) and all(isinstance(k, str) and _number(n) for k, n in v.items()),
    "phase_log": lambda v: isinstance(v, list) and all(isinstance(r, dict) and isinstance(r.get("phase"), str)
                                                       and _number(r.get("peak_memory_bytes")) for r in v),
    "elapsed": _number,
    "skipped": lambda v: isinstance(v, dict) and all(isinstance(k, str) and isinstance(r, str) for k, r in v.items()),
}


def is_best_record(value: Any) -> bool:
    """A run's ``best``: empty, or its epoch, phase, val_loss and val_acc."""
    return isinstance(value, dict) and (not value or (_whole(value.get("epoch")) and isinstance(value.get("phase"), str)
                                                      and _number(value.get("val_loss")) and _number(value.get("val_acc"))))


def _is_record(record: Any) -> bool:
    return (isinstance(record, dict) and isinstance(record.get("phase"), str) and _whole(record.get("epoch"))
            and all(_number(record.get(k)) for k in ("train_loss", "train_acc", "val_loss", "val_acc", "lr", "head_lr", "seconds"))
            and isinstance(record.get("improved"), bool))


def _is_metrics_line(record: Any) -> bool:
    """A ``metrics.jsonl`` line as readers take it: an object whose fields, those present, have their types."""
    if not isinstance(record, dict):
        return False
    checks = {"phase": lambda v: isinstance(v, str), "epoch": _whole, "improved": lambda v: isinstance(v, bool)}
    return all(checks.get(k, lambda v: v is None or _number(v))(record[k]) for k in METRIC_KEYS if k in record)


def check_run_state(meta: dict[str, Any], where: Path, *, phases: int) -> None:
    """Refuse a ``last.safetensors`` header the loop could not resume from: every field it reads, with its type.

    Args:
        meta: the header's metadata (:func:`load_tensors`), format already checked.
        phases: how many phases this run's config plans (``phase_index`` must not pass it).

    Raises:
        FineTuneError: one line naming the first field that does not fit.
    """
    state = meta.get("state")
    if not isinstance(meta.get("identity"), dict) or not isinstance(state, dict):
        raise FineTuneError(f"{where} has no identity or state object in its header: start a new run with another --out")
    for name, check in _STATE_TYPES.items():
        if name == "skipped" and name not in state:
            continue  # older runs did not record skipped images
        if name not in state or not check(state[name]):
            raise FineTuneError(f"{where} has a run state whose {name!r} is missing or of the wrong type: start a new run with another --out")
    if state["phase_index"] > phases or len(state["history"]) > 100_000:
        raise FineTuneError(f"{where} is at phase {state['phase_index']} of a run with {phases}: start a new run with another --out")
    optimizer = meta.get("optimizer")
    if (not isinstance(optimizer, dict) or not isinstance(optimizer.get("param_groups"), list)
            or not all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in optimizer["param_groups"])
            or not isinstance(optimizer.get("state"), dict)
            or not all(isinstance(v, dict) and str(k).isdigit() for k, v in optimizer["state"].items())
            or not isinstance(meta.get("scaler"), dict)):
        raise FineTuneError(f"{where} has no optimizer state and gradient scaler in its header: start a new run with another --out")


def write_metrics(out: Path, history: Sequence[dict[str, Any]]) -> None:
    """``metrics.jsonl`` and ``metrics.csv``: one record per finished epoch."""
    lines = "".join(json.dumps(record) + "\n" for record in history)
    atomic_write(out / METRICS_JSONL, lines.encode())
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(METRIC_KEYS), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    atomic_write(out / METRICS_CSV, buffer.getvalue().encode())


def plot_curves(
    history: Sequence[dict[str, Any]],
    best_epoch: int,
    path: Path,
    *,
    initial: dict[str, Any] | None = None,
    stop_reason: str | None = None,
) -> None:
    """Train/val loss and accuracy against epoch: phase changes dashed, the best epoch starred, the early stop dotted."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    figure = Figure(figsize=(10, 4), dpi=100)
    epochs = [r["epoch"] for r in history]
    for axis_index, (metric, title) in enumerate((("loss", "cross-entropy"), ("acc", "accuracy"))):
        axis = figure.add_subplot(1, 2, axis_index + 1)
        axis.plot(epochs, [r[f"train_{metric}"] for r in history], "o-", label="train", markersize=3)
        val_x, val_y = epochs, [r[f"val_{metric}"] for r in history]
        if initial:
            val_x, val_y = [0, *val_x], [initial[f"val_{metric}"], *val_y]
        axis.plot(val_x, val_y, "s-", label="val", markersize=3)
        if initial and not initial.get("candidate", True):
            axis.plot([0], [initial[f"val_{metric}"]], "o", mfc="none", color="grey", markersize=9,
                      label="epoch 0: the probe (val in-sample)")
        for previous, current in zip(history, history[1:]):
            if previous["phase"] != current["phase"]:
                axis.axvline(previous["epoch"] + 0.5, color="grey", linestyle="--", linewidth=0.8)
        best_y = next((y for x, y in zip(val_x, val_y) if x == best_epoch), None)
        if best_y is not None:
            axis.axvline(best_epoch, color="tab:red", linewidth=0.8)
            axis.plot([best_epoch], [best_y], "*", color="tab:red", markersize=12, label=f"best (epoch {best_epoch})")
        if stop_reason and history:
            axis.axvline(history[-1]["epoch"], color="black", linestyle=":", linewidth=0.8, label=f"stopped ({stop_reason})")
        axis.set_xlabel("epoch")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.set_title(title)
        axis.legend(fontsize=8)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    atomic_write(path, buffer.getvalue())


def read_run(folder: str | Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """A finished run folder's ``metrics.jsonl`` (one dict per epoch) and ``summary.json``.

    Raises:
        FineTuneError: the folder lacks them or they are unreadable.
    """
    folder = Path(folder)
    hint = f"pass a folder written by `embedpipe fine-tune --out` ({METRICS_JSONL} and {SUMMARY_FILE})"
    try:
        epochs = [json.loads(line) for line in (folder / METRICS_JSONL).read_text().splitlines() if line.strip()]
        summary = json.loads((folder / SUMMARY_FILE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise FineTuneError(f"{folder} is not a readable fine-tune run ({error}): {hint}") from None
    bad = next((i for i, record in enumerate(epochs) if not _is_metrics_line(record)), None)
    if bad is not None:
        raise FineTuneError(f"{folder / METRICS_JSONL} line {bad + 1} is not an epoch record ({', '.join(METRIC_KEYS)}): {hint}")
    if not isinstance(summary, dict):
        raise FineTuneError(f"{folder / SUMMARY_FILE} is not a JSON object: {hint}")
    typed = {"best_epoch": lambda v: v is None or _whole(v), "seconds": lambda v: v is None or _number(v),
             "peak_memory_bytes": lambda v: v is None or _number(v), "stop_reason": lambda v: v is None or isinstance(v, str),
             "test": lambda v: v is None or isinstance(v, dict), "val": lambda v: v is None or isinstance(v, dict),
             "initial": lambda v: v is None or isinstance(v, dict), "best": lambda v: v is None or isinstance(v, dict)}
    wrong = next((k for k, check in typed.items() if not check(summary.get(k))), None)
    if wrong is not None:
        raise FineTuneError(f"{folder / SUMMARY_FILE} has a {wrong!r} of the wrong type ({summary[wrong]!r:.40}): {hint}")
    for split in ("test", "val"):
        metrics = summary.get(split) or {}
        if not all(_number(metrics.get(k)) or metrics.get(k) is None for k in ("accuracy", "balanced_accuracy", "macro_f1", "n")):
            raise FineTuneError(f"{folder / SUMMARY_FILE} has {split} metrics that are not numbers: {hint}")
    return epochs, summary
