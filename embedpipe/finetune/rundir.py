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


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, Any]) -> None:
    """A safetensors file whose header carries ``metadata`` (each value JSON-encoded), written atomically."""
    from safetensors.torch import save

    plain = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    atomic_write(path, save(plain, metadata={k: json.dumps(v, default=jsonable) for k, v in metadata.items()}))


def load_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a file written by :func:`save_tensors`: ``(tensors, metadata)``; never unpickles."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), framework="pt") as handle:
            raw = handle.metadata() or {}
        return load_file(str(path)), {k: json.loads(v) for k, v in raw.items()}
    except Exception as error:  # safetensors raises its own errors, OS and JSON ones
        raise FineTuneError(f"{path} is not a readable checkpoint ({type(error).__name__}: {error}): start a new run with another --out") from None


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
    try:
        epochs = [json.loads(line) for line in (folder / METRICS_JSONL).read_text().splitlines() if line.strip()]
        summary = json.loads((folder / SUMMARY_FILE).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise FineTuneError(f"{folder} is not a readable fine-tune run ({error}): pass a folder written by "
                            f"`embedpipe fine-tune --out` ({METRICS_JSONL} and {SUMMARY_FILE})") from None
    return epochs, summary
