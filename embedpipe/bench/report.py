"""Tables, plots and the HTML page of a bench, all rendered from its flat records.

:func:`render` is a pure function of the records in ``results.json`` (and the
fine-tune run folders copied next to them), so ``embedpipe report OUT``
re-renders byte for byte what ``embedpipe bench`` wrote. Plots are PNG files
drawn with matplotlib's Agg backend; the HTML page inlines them as base64 data
URIs with inline CSS and no script, so it opens anywhere without a network.
"""

from __future__ import annotations

import base64
import html
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .records import ALL, FINETUNE_DIR, REPORT_HTML, SCRATCH, read_finetune_run

# Fields a summary copies from its runs (the same for every seed of one backbone x head x shots).
_CONSTANT = ("backbone", "weights", "pretrained", "head", "shots", "embedding_dim", "param_count", "extract_images_per_second",
             "throughput_source", "peak_memory_bytes", "peak_memory_kind", "device", "precision", "n_classes", "n_val", "n_test",
             "dataset", "source", "split", "preprocess", "normalisation", "head_normalisation", "c_grid", "selection",
             "head_params", "head_protocol", "knn_recall_at_1", "knn_recall_at_5", "knn_map_at_r", "knn_queries", "leakage_check")
PLOT_SHOTS = "accuracy_vs_shots.png"
PLOT_PARETO = "accuracy_vs_throughput.png"
PLOT_CONFUSION = "confusion_matrix.png"
POINTS = 100  # accuracy is shown in percentage points on plots and in sentences


@dataclass
class ReportResult:
    """What :func:`render` wrote."""

    html: Path
    plots: dict[str, Path]  # plot name -> PNG file
    summaries: list[dict[str, Any]]
    series: list[tuple[str, str]] = field(default_factory=list)  # (backbone, head) lines drawn on the shots plot
    headline: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- numbers


def _shots_order(shots: Any) -> float:
    return math.inf if shots == ALL else float(shots)


def summarise(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One summary record per (backbone, head, shots): mean and sample std over seeds, in grid order.

    Runs are the records with ``record == "run"`` and no error; the std is 0.0 for a single seed.
    """
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for r in records:
        if r.get("record") == "run" and not r.get("error"):
            groups.setdefault((r["backbone"], r["head"], str(r["shots"])), []).append(r)
    summaries = []
    for runs in groups.values():
        runs = sorted(runs, key=lambda r: r["seed"])
        summary: dict[str, Any] = {"bench_format": runs[0]["bench_format"], "record": "summary", "error": None}
        summary.update({k: runs[0].get(k) for k in _CONSTANT})
        summary["seeds"] = [r["seed"] for r in runs]
        summary["n_seeds"] = len(runs)
        for metric in ("accuracy", "balanced_accuracy", "macro_f1", "val_accuracy", "train_accuracy"):
            values = [r[metric] for r in runs if r.get(metric) is not None]
            summary[f"{metric}_mean"] = statistics.fmean(values) if values else None
            summary[f"{metric}_std"] = statistics.stdev(values) if len(values) > 1 else (0.0 if values else None)
        n_train = [r["n_train"] for r in runs if r.get("n_train") is not None]
        summary["n_train_mean"] = statistics.fmean(n_train) if n_train else None
        summary["train_per_class"] = (summary["n_train_mean"] / max(1, runs[0].get("n_classes") or 1) if n_train
                                      else None if runs[0]["shots"] == ALL else float(runs[0]["shots"]))
        seconds = [r["fit_seconds"] for r in runs if r.get("fit_seconds") is not None]
        summary["fit_seconds_mean"] = statistics.fmean(seconds) if seconds else None
        summary["chosen"] = _chosen_over_seeds([r.get("chosen") or "fixed" for r in runs])
        summary["majority_accuracy"] = runs[0].get("majority_accuracy")
        summary["run_ids"] = [r["run_id"] for r in runs]
        summaries.append(summary)
    # Rows that do not say how many images they trained on (a scratch run on "all") sit where the others with that budget do.
    known = {str(s["shots"]): s["train_per_class"] for s in summaries if s["train_per_class"] is not None}
    for s in summaries:
        if s["train_per_class"] is None:
            s["train_per_class"] = known.get(str(s["shots"]))
    return summaries


def _chosen_over_seeds(chosen: list[str]) -> str:
    """``["C=0.1", "C=1"]`` -> ``"C 0.1, 1"`` (one value per seed, in seed order); mixed keys are joined as they are."""
    pairs = [c.split("=", 1) if c.count("=") == 1 else None for c in chosen]
    if pairs and all(pairs) and len({p[0] for p in pairs}) == 1:
        values = [p[1] for p in pairs]
        return f"{pairs[0][0]} {values[0]}" if len(set(values)) == 1 else f"{pairs[0][0]} {', '.join(values)}"
    return "; ".join(dict.fromkeys(chosen))


def _budget(shots: Any) -> str:
    return "all labels" if shots == ALL else f"{shots} labels per class"


def _pm(mean: float | None, std: float | None) -> str:
    if mean is None:
        return "–"
    return f"{mean:.3f} ± {std:.3f}" if std else f"{mean:.3f}"


def _si(value: float | int | None, unit: str = "") -> str:
    if value is None:
        return "–"
    for threshold, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= threshold:
            return f"{value / threshold:.1f}{suffix}{unit}"
    return f"{value:.0f}{unit}" if isinstance(value, int) or value >= 10 else f"{value:.1f}{unit}"


def _fraction(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def _mib(value: int | None) -> str:
    return "–" if value is None else f"{value / 2**20:.0f} MiB"


TABLE_COLUMNS = ("backbone", "head", "shots", "accuracy", "balanced acc.", "chosen", "R@1", "R@5", "mAP@R", "dim", "params", "img/s",
                 "peak mem.", "fit s")


def table_rows(summaries: Sequence[dict[str, Any]]) -> list[tuple[str, ...]]:
    """The summary table as strings, one row per (backbone, head, shots)."""
    rows = []
    for s in summaries:
        rows.append((
            s["backbone"], s["head"],
            str(s["shots"]) if s["shots"] != ALL else "all" if s["train_per_class"] is None else f"all ({s['train_per_class']:.0f})",
            _pm(s["accuracy_mean"], s["accuracy_std"]), _pm(s["balanced_accuracy_mean"], s["balanced_accuracy_std"]),
            s["chosen"], *(_fraction(s.get(k)) for k in ("knn_recall_at_1", "knn_recall_at_5", "knn_map_at_r")),
            "–" if s["embedding_dim"] is None else str(s["embedding_dim"]), _si(s["param_count"]),
            "–" if s["extract_images_per_second"] is None else f"{s['extract_images_per_second']:.1f}",
            _mib(s["peak_memory_bytes"]), "–" if s["fit_seconds_mean"] is None else f"{s['fit_seconds_mean']:.2f}",
        ))
    return rows


def text_table(summaries: Sequence[dict[str, Any]], errors: Sequence[dict[str, Any]] = (), warnings: Sequence[dict[str, Any]] = ()) -> str:
    """The terminal table (mean ± std over seeds on the test split), then one line per failure and per warning."""
    rows = [TABLE_COLUMNS, *table_rows(summaries)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(TABLE_COLUMNS))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    for e in errors:
        where = " ".join(str(e[k]) for k in ("backbone", "head", "shots", "seed") if e.get(k) not in (None, ""))
        lines.append(f"failed: {where}: {e['error']}")
    lines += [f"warning: {w['backbone']}: {w['message']}" for w in warnings]
    return "\n".join(lines)


def markdown_table(summaries: Sequence[dict[str, Any]], errors: Sequence[dict[str, Any]] = (), warnings: Sequence[dict[str, Any]] = ()) -> str:
    """The summary table in Markdown (for a README), then one line per failure and per warning."""
    rows = [TABLE_COLUMNS, tuple("---:" if c in _NUMERIC else "---" for c in TABLE_COLUMNS), *table_rows(summaries)]
    lines = ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    lines += [f"\nfailed: {e.get('backbone')} {e.get('head') or ''}: {e['error']}" for e in errors]
    lines += [f"\nwarning: {w['backbone']}: {w['message']}" for w in warnings]
    return "\n".join(lines)


def _best(summaries: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    frozen = [s for s in summaries if s["head"] != SCRATCH and s["accuracy_mean"] is not None]
    if not frozen:
        return None
    # Highest mean accuracy; ties go to the one with fewer labels, then the faster backbone.
    return max(frozen, key=lambda s: (round(s["accuracy_mean"], 6), -_shots_order(s["shots"]), s["extract_images_per_second"] or 0))


def headline(summaries: Sequence[dict[str, Any]], errors: Sequence[dict[str, Any]] = (), warnings: Sequence[dict[str, Any]] = ()) -> list[str]:
    """The findings in plain sentences, most important first (plain text; the HTML escapes it)."""
    leaks = [f"Leakage ({w['backbone']}): {w['message']}." for w in warnings if w.get("warning") == "leakage"]
    return leaks + _findings(summaries, errors)


def _findings(summaries: Sequence[dict[str, Any]], errors: Sequence[dict[str, Any]]) -> list[str]:
    scored = [s for s in summaries if s["accuracy_mean"] is not None]
    frozen = [s for s in scored if s["head"] != SCRATCH]
    best = _best(summaries)
    if best is None:
        return ["No run finished: see the failures below."] if errors else ["No results yet."]
    seeds = f"over {best['n_seeds']} seed{'s' if best['n_seeds'] > 1 else ''}"
    std = f" ± {best['accuracy_std'] * POINTS:.1f}" if best["accuracy_std"] else ""
    lines = [
        f"Best: {best['backbone']} + {best['head']} with {_budget(best['shots'])}: test accuracy {best['accuracy_mean'] * POINTS:.1f}%{std} "
        f"(balanced {best['balanced_accuracy_mean'] * POINTS:.1f}%) {seeds}"
        + (f"; always guessing the majority class scores {best['majority_accuracy'] * POINTS:.1f}%." if best.get("majority_accuracy") else ".")
    ]
    # On imbalanced data accuracy rewards the majority class: say when weighting classes equally ranks another row first.
    balanced = [s for s in summaries if s["head"] != SCRATCH and s["balanced_accuracy_mean"] is not None]
    fair = max(balanced, key=lambda s: s["balanced_accuracy_mean"]) if balanced else best
    noise = max(fair["balanced_accuracy_std"] or 0.0, best["balanced_accuracy_std"] or 0.0)
    if fair is not best and fair["balanced_accuracy_mean"] - best["balanced_accuracy_mean"] > max(noise, 0.001):
        lines.append(f"By balanced accuracy (every class weighted equally) the best is {fair['backbone']} + {fair['head']} with "
                     f"{_budget(fair['shots'])}: {fair['balanced_accuracy_mean'] * POINTS:.1f}% (accuracy {fair['accuracy_mean'] * POINTS:.1f}%).")
    # Cost: the fastest backbone within one point of the best at the same label budget.
    close = [s for s in frozen if s["shots"] == best["shots"] and s["accuracy_mean"] >= best["accuracy_mean"] - 0.01
             and s["extract_images_per_second"]]
    if close and best["extract_images_per_second"]:
        fastest = max(close, key=lambda s: s["extract_images_per_second"])
        # Only a clear difference in speed (20%) is worth a sentence; less is within the noise of a shared machine.
        if fastest["backbone"] != best["backbone"] and fastest["extract_images_per_second"] > 1.2 * best["extract_images_per_second"]:
            lines.append(
                f"Cheaper at almost the same accuracy: {fastest['backbone']} + {fastest['head']} scores "
                f"{fastest['accuracy_mean'] * POINTS:.1f}% and extracts {fastest['extract_images_per_second']:.0f} img/s "
                f"against {best['extract_images_per_second']:.0f} img/s."
            )
    # Labels: the best result at the smallest budget, against the best at the largest.
    budgets = sorted({s["shots"] for s in frozen}, key=_shots_order)
    if len(budgets) > 1:
        def top(budget: Any) -> dict[str, Any]:
            return max((s for s in frozen if s["shots"] == budget), key=lambda s: s["accuracy_mean"])

        low, high = top(budgets[0]), top(budgets[-1])
        high_labels = "all labels" if high["shots"] == ALL else f"{high['shots']} per class"
        majority = low.get("majority_accuracy")
        below = (f" (below the {majority * POINTS:.1f}% of always guessing the majority class; balanced accuracy "
                 f"{low['balanced_accuracy_mean'] * POINTS:.1f}%)") if majority and low["accuracy_mean"] < majority else ""
        lines.append(
            f"With {budgets[0]} labels per class the best is {low['backbone']} + {low['head']} at {low['accuracy_mean'] * POINTS:.1f}%{below}, "
            f"{(high['accuracy_mean'] - low['accuracy_mean']) * POINTS:.1f} points below the best with {high_labels}."
        )
    scratch = {(s["backbone"], str(s["shots"])): s for s in scored if s["head"] == SCRATCH}
    for (backbone, shots), s in scratch.items():
        rivals = [f for f in frozen if f["backbone"] == backbone and str(f["shots"]) == shots]
        if rivals:
            f = max(rivals, key=lambda f: f["accuracy_mean"])
            lines.append(
                f"Pretraining buys {(f['accuracy_mean'] - s['accuracy_mean']) * POINTS:+.1f} points on {backbone} with {shots} labels "
                f"per class: frozen features + {f['head']} {f['accuracy_mean'] * POINTS:.1f}% vs trained from scratch {s['accuracy_mean'] * POINTS:.1f}%."
            )
    failed = sorted({e["backbone"] for e in errors if e.get("backbone")})
    if failed:
        lines.append(f"{len(failed)} backbone{'s' if len(failed) > 1 else ''} failed ({', '.join(failed)}): see Failures.")
    return lines


# --------------------------------------------------------------------------- plots


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    fig.savefig(path, dpi=110, bbox_inches="tight", metadata={"Software": None})
    _pyplot().close(fig)
    return path


_MARKERS = {"logreg": "o", "knn": "s", "mlp": "^", SCRATCH: "x"}


def _colours(summaries: Sequence[dict[str, Any]]) -> dict[str, Any]:
    plt = _pyplot()
    backbones = list(dict.fromkeys(s["backbone"] for s in summaries))
    return {b: plt.get_cmap("tab10")(i % 10) for i, b in enumerate(backbones)}


def _majority(summaries: Sequence[dict[str, Any]]) -> float | None:
    return next((s["majority_accuracy"] for s in summaries if s.get("majority_accuracy")), None)


def _clip_percent(ax: Any) -> None:
    low, high = ax.get_ylim()
    ax.set_ylim(max(low, 0), min(high, 101))  # std bars never past 100%


def plot_shots(summaries: Sequence[dict[str, Any]], path: Path) -> tuple[Path, list[tuple[str, str]]]:
    """Test accuracy (mean ± std over seeds) against labelled images per class: one panel per head, one line per backbone.

    ``--baseline scratch`` rows (the same architecture trained from random initialisation) are drawn
    dashed in their backbone's colour on every panel, so each head is compared with training from scratch.

    Returns:
        The PNG path and the (backbone, head) series drawn.
    """
    plt = _pyplot()
    heads = [h for h in dict.fromkeys(s["head"] for s in summaries) if h != SCRATCH] or [SCRATCH]
    fig, axes = plt.subplots(1, len(heads), figsize=(3.2 + 3.3 * len(heads), 4.4), sharey=True, squeeze=False)
    colours = _colours(summaries)
    majority = _majority(summaries)
    series: list[tuple[str, str]] = []
    ticks: dict[float, str] = {}
    for ax, panel in zip(axes[0], heads):
        for backbone in colours:
            for head in (panel, SCRATCH) if panel != SCRATCH else (SCRATCH,):
                points = sorted((s for s in summaries if s["backbone"] == backbone and s["head"] == head
                                 and s["accuracy_mean"] is not None and s["train_per_class"] is not None),
                                key=lambda s: s["train_per_class"])
                if not points:
                    continue
                ax.errorbar([s["train_per_class"] for s in points], [s["accuracy_mean"] * POINTS for s in points],
                            yerr=[(s["accuracy_std"] or 0.0) * POINTS for s in points], color=colours[backbone], capsize=3,
                            marker="x" if head == SCRATCH else "o", markersize=5, linestyle="--" if head == SCRATCH else "-",
                            label=f"{backbone} from scratch" if head == SCRATCH else backbone)
                if (backbone, head) not in series:
                    series.append((backbone, head))
                for s in points:
                    ticks[round(s["train_per_class"], 3)] = "all" if s["shots"] == ALL else str(s["shots"])
        if majority:
            ax.axhline(majority * POINTS, color="grey", linestyle=":", linewidth=1, label="majority class")
        ax.set_title("trained from scratch" if panel == SCRATCH else f"frozen features + {panel}", fontsize=10)
        ax.set_xlabel("labelled training images per class")
        ax.grid(True, alpha=0.3)
    for ax in axes[0]:
        if ticks and min(ticks) > 0:
            ax.set_xscale("log")
        ax.set_xticks(sorted(ticks), [ticks[t] if ticks[t] != "all" else f"all\n(~{t:.0f})" for t in sorted(ticks)])
        ax.minorticks_off()
    _clip_percent(axes[0][0])
    axes[0][0].set_ylabel("test accuracy (%)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    for ax in axes[0][1:]:
        for h, l in zip(*ax.get_legend_handles_labels()):
            if l not in labels:
                handles.append(h)
                labels.append(l)
    fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize=8, frameon=False, bbox_to_anchor=(0.5, -0.02))
    fig.suptitle("How many labels: test accuracy vs labelled images per class (mean ± std over seeds)", fontsize=11)
    fig.tight_layout(rect=(0, 0.04 + 0.035 * ((len(labels) - 1) // 4), 1, 1))
    return _save(fig, path), series


def plot_pareto(summaries: Sequence[dict[str, Any]], path: Path) -> Path | None:
    """Accuracy at the largest label budget against extraction images/s, with the Pareto front drawn."""
    frozen = [s for s in summaries if s["head"] != SCRATCH and s["extract_images_per_second"] and s["accuracy_mean"] is not None]
    if not frozen:
        return None
    budget = max((s["shots"] for s in frozen), key=_shots_order)
    points = [s for s in frozen if s["shots"] == budget]
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8.5, 4.6))
    colours = _colours(summaries)
    for s in points:
        ax.errorbar(s["extract_images_per_second"], s["accuracy_mean"] * POINTS, yerr=(s["accuracy_std"] or 0) * POINTS,
                    color=colours[s["backbone"]], marker=_MARKERS.get(s["head"], "D"), capsize=3, linestyle="none",
                    label=f"{s['backbone']} + {s['head']}")
    # The front: no other point is both faster and more accurate.
    front = sorted((s for s in points if not any(
        o["extract_images_per_second"] >= s["extract_images_per_second"] and o["accuracy_mean"] > s["accuracy_mean"]
        or o["extract_images_per_second"] > s["extract_images_per_second"] and o["accuracy_mean"] >= s["accuracy_mean"]
        for o in points)), key=lambda s: s["extract_images_per_second"])
    ax.plot([s["extract_images_per_second"] for s in front], [s["accuracy_mean"] * POINTS for s in front], color="black",
            linewidth=1, alpha=0.5, label="Pareto front")
    for backbone in dict.fromkeys(s["backbone"] for s in points):
        top = max((s for s in points if s["backbone"] == backbone), key=lambda s: s["accuracy_mean"])
        ax.annotate(backbone, (top["extract_images_per_second"], top["accuracy_mean"] * POINTS), textcoords="offset points",
                    xytext=(6, 6), fontsize=8, color=colours[backbone])
    majority = _majority(summaries)
    if majority:
        ax.axhline(majority * POINTS, color="grey", linestyle=":", linewidth=1, label="majority class")
    rates = [s["extract_images_per_second"] for s in points]
    if max(rates) / min(rates) > 8:  # a log axis only when the speeds span an order of magnitude
        from matplotlib.ticker import NullFormatter, ScalarFormatter

        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlim(min(rates) / 1.4, max(rates) * 1.4)
        ax.set_xlabel("extraction throughput (images/s, log scale)")
    else:
        span = max(rates) - min(rates) or max(rates) * 0.2
        ax.set_xlim(max(0, min(rates) - 0.25 * span), max(rates) + 0.45 * span)
        ax.set_xlabel("extraction throughput (images/s)")
    _clip_percent(ax)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"Quality vs cost ({_budget(budget)}; up and right is better)", fontsize=11)
    ax.grid(True, alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    return _save(fig, path)


def plot_confusion(run: dict[str, Any], path: Path) -> Path:
    """The test confusion matrix of one run: counts, shaded by the row-normalised rate (recall)."""
    import numpy as np

    plt = _pyplot()
    matrix = np.asarray(run["confusion_matrix"], dtype=float)
    names = list(run["class_names"])
    rates = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    size = min(12.0, 2.5 + 0.45 * len(names))
    fig, ax = plt.subplots(figsize=(size + 1, size))
    image = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    if len(names) <= 30:
        for i in range(len(names)):
            for j in range(len(names)):
                ax.text(j, i, f"{matrix[i, j]:.0f}", ha="center", va="center", fontsize=8,
                        color="white" if rates[i, j] > 0.6 else "black")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"{run['backbone']} + {run['head']}, {_budget(run['shots'])}, seed {run['seed']}\n"
                 f"test accuracy {run['accuracy'] * POINTS:.1f}% (n={run['n_test']})", fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    return _save(fig, path)


# --------------------------------------------------------------------------- fine-tune runs


def plot_finetune(name: str, epochs: Sequence[dict[str, Any]], summary: dict[str, Any], path: Path) -> Path:
    """Training and validation loss and accuracy per epoch, with the best (kept) epoch and the stop marked."""
    plt = _pyplot()
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 3.8))
    x = [e.get("epoch", i) for i, e in enumerate(epochs)]
    marks = {key: summary.get(key) for key in ("best_epoch", "stopped_epoch")}
    if any(b <= a for a, b in zip(x, x[1:])):
        # Epochs restart per phase: count rows instead, and put the marks on the last row with that epoch number.
        rows = list(range(1, len(x) + 1))
        marks = {k: next((r for r, e in zip(reversed(rows), reversed(x)) if e == v), None) for k, v in marks.items()}
        x = rows
    for ax, metric, label in ((loss_ax, "loss", "loss"), (acc_ax, "acc", "accuracy")):
        scale = POINTS if metric == "acc" else 1
        for part in ("train", "val"):
            values = [(xi, e.get(f"{part}_{metric}")) for xi, e in zip(x, epochs) if e.get(f"{part}_{metric}") is not None]
            if values:
                ax.plot([v[0] for v in values], [v[1] * scale for v in values], "-", marker=".", label=part)
        phases = [(xi, e.get("phase")) for xi, e in zip(x, epochs)]
        if len({p for _, p in phases}) > 1:
            ax.text(phases[0][0], 0.02, f" {phases[0][1]}", transform=ax.get_xaxis_transform(), fontsize=7, color="grey")
        for (x0, p0), (x1, p1) in zip(phases, phases[1:]):
            if p1 != p0:
                ax.axvline((x0 + x1) / 2, color="grey", linewidth=0.8, linestyle=":")
                ax.text((x0 + x1) / 2, 0.02, f" {p1}", transform=ax.get_xaxis_transform(), fontsize=7, color="grey")
        if marks["best_epoch"] is not None:
            ax.axvline(marks["best_epoch"], color="green", linestyle="--", linewidth=1, label=f"best epoch {summary['best_epoch']} (kept)")
        if marks["stopped_epoch"] is not None:
            ax.axvline(marks["stopped_epoch"], color="red", linestyle=":", linewidth=1,
                       label=f"stopped {summary['stopped_epoch']}" + (f" ({summary['stop_reason']})" if summary.get("stop_reason") else ""))
        ax.set_xlabel("epoch" if x == [e.get("epoch") for e in epochs] else "epoch (counted across phases)")
        ax.set_ylabel(label + (" (%)" if metric == "acc" else ""))
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"fine-tune run {name}", fontsize=10)
    return _save(fig, path)


def finetune_runs(out: Path) -> list[tuple[str, list[dict[str, Any]], dict[str, Any]]]:
    """The fine-tune runs copied into ``out/finetune/<name>/``, by name."""
    root = out / FINETUNE_DIR
    if not root.is_dir():
        return []
    return [(d.name, *read_finetune_run(d)) for d in sorted(root.iterdir()) if d.is_dir()]


# --------------------------------------------------------------------------- HTML

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#1d2430;line-height:1.45}
h1{font-size:1.6em;margin-bottom:.2em}h2{font-size:1.2em;margin-top:1.8em;border-bottom:1px solid #dde;padding-bottom:.2em}
.sub{color:#667;margin-top:0}.lead{background:#f3f7fc;border-left:4px solid #3b7dd8;padding:.6em 1em;margin:1em 0}
.lead li{margin:.25em 0}.lead li:first-child{font-weight:600}
table{border-collapse:collapse;font-size:.86em;width:100%}th,td{padding:.3em .55em;border-bottom:1px solid #e4e6eb;text-align:left;white-space:nowrap}
th{background:#f6f7f9}td.n{text-align:right;font-variant-numeric:tabular-nums}td.w{white-space:normal;min-width:10em}
.scroll{overflow-x:auto}tr.best td{background:#eaf6ea;font-weight:600}
figure{margin:1.2em 0}figure img{max-width:100%;height:auto;border:1px solid #eee}figcaption{color:#556;font-size:.9em}
.err td{color:#a12}.warn{background:#fdf3ec;border-left:4px solid #d8703b;padding:.6em 1em;margin:1em 0}dl{display:grid;grid-template-columns:max-content 1fr;gap:.2em 1em;font-size:.9em}dt{color:#556}dd{margin:0}
code{background:#f3f3f5;padding:0 .25em;border-radius:3px}footer{margin-top:2em;color:#889;font-size:.8em}
"""

_NUMERIC = {"accuracy", "balanced acc.", "R@1", "R@5", "mAP@R", "dim", "params", "img/s", "peak mem.", "fit s"}
_WRAP = {"chosen", "error"}  # long free text: wraps instead of widening the table


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}">'


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], *, highlight: int | None = None, cls: str = "") -> str:
    e = html.escape
    head = "".join(f"<th>{e(h)}</th>" for h in header)
    body = []
    for i, row in enumerate(rows):
        cells = "".join(f'<td class="{"n" if h in _NUMERIC else "w" if h in _WRAP else ""}">{e(c)}</td>' for h, c in zip(header, row))
        body.append(f'<tr{" class=best" if i == highlight else ""}>{cells}</tr>')
    return f'<div class="scroll"><table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table></div>'


def _protocol(summaries: Sequence[dict[str, Any]], runs: Sequence[dict[str, Any]]) -> list[tuple[str, str]]:
    first = runs[0] if runs else {}
    per_backbone = {}
    for s in summaries:
        per_backbone.setdefault(s["backbone"], f"{s['preprocess']}; normalised with {s['normalisation']}; weights {s['weights']}; "
                                              f"{s['precision']} compute on {s['device']}; images/s from the "
                                              f"{s.get('throughput_source') or 'extraction'}"
                                              + (f"; train/test leakage: {s['leakage_check']}" if s.get("leakage_check") else ""))
    items = [
        ("dataset", f"{first.get('dataset', '')} ({first.get('source', '')}), {first.get('n_classes', '?')} classes"),
        ("split", str(first.get("split", ""))),
        ("test set", f"{first.get('n_test', '?')} images, the same for every row; accuracy and balanced accuracy are on it"),
        ("labels", "shots = training images per class drawn from the train split by the seed (all = the whole train split)"),
        ("hyper-parameters", str(first.get("selection", ""))),
        ("seeds", f"{', '.join(map(str, sorted({r['seed'] for r in runs})))}: a seed draws the few-shot sample and seeds the head"),
        ("mean ± std", "sample standard deviation over seeds (0 with one seed)"),
        ("R@1, R@5, mAP@R", "feature quality of the backbone, the same on each of its rows: each labelled test image searched "
                            "among the train images (exact cosine kNN); recall@k = share of test images with an image of their class "
                            "among their k nearest, mAP@R = mean average precision over the first R results, R = the train images "
                            "of that class (Musgrave et al. 2020)"),
        ("throughput", "images/s of the extraction's decode + forward loop (batch size and workers as run); for a backbone "
                       "that came from the cache, timed on a sample of the images"),
        ("peak memory", "peak CUDA allocation on a GPU; on a CPU the rise of the process's resident memory during extraction "
                        "(the first backbone's figure also holds one-off start-up allocations)"),
    ]
    heads = {}
    for r in runs:
        heads.setdefault(r["head"], r.get("head_protocol") or (f"C grid {r['c_grid']}" if r.get("c_grid") else ""))
    items += [(f"head {h}", text) for h, text in heads.items() if text]
    items += [(f"backbone {b}", text) for b, text in per_backbone.items()]
    return items


def _environment(runs: Sequence[dict[str, Any]]) -> list[tuple[str, str]]:
    first = runs[0] if runs else {}
    keys = ("machine", "cpu", "cores", "gpu", "device", "torch", "timm", "scikitlearn", "numpy", "python", "embedpipe", "git_commit")
    shown = {"scikitlearn": "scikit-learn", "git_commit": "git commit"}
    items = [(shown.get(k, k), str(first.get(f"env_{k}", ""))) for k in keys if first.get(f"env_{k}") not in (None, "")]
    sessions = sorted({r["session"] for r in runs})
    dates = sorted(r["created"] for r in runs)
    if dates:
        items.append(("runs", f"{len(runs)} fits from {dates[0]} to {dates[-1]} (UTC), in bench session(s) {', '.join(sessions)}"))
    return items


def _finetune_table(finetunes: Sequence[tuple[str, list[dict[str, Any]], dict[str, Any]]]) -> str:
    rows = []
    for name, epochs, summary in finetunes:
        test = summary.get("test") or {}
        rows.append((name, f"{test.get('accuracy', float('nan')):.3f}", f"{test.get('balanced_accuracy', float('nan')):.3f}",
                     str(summary.get("best_epoch")), str(summary.get("stopped_epoch")), str(summary.get("stop_reason", "")),
                     str(len(epochs)), _mib(summary.get("peak_memory_bytes")), f"{summary.get('seconds', 0):.0f}"))
    return _table(("run", "accuracy", "balanced acc.", "best epoch", "stopped", "stop reason", "epochs", "peak mem.", "seconds"), rows)


def render(out: str | Path, records: Sequence[dict[str, Any]]) -> ReportResult:
    """Write the plots and ``report.html`` into ``out`` from bench records; returns what was written.

    Deterministic: the same records (and fine-tune folders) give the same bytes.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    runs = [r for r in records if r.get("record") == "run" and not r.get("error")]
    errors = [r for r in records if r.get("error")]
    warnings = [r for r in records if r.get("record") == "warning"]
    summaries = summarise(records)
    plots: dict[str, Path] = {}
    series: list[tuple[str, str]] = []
    captions: dict[str, str] = {}
    if summaries:
        plots["shots"], series = plot_shots(summaries, out / PLOT_SHOTS)
        captions["shots"] = ("How many labels: test accuracy as the number of labelled training images per class grows "
                             "(error bars: std over seeds; dashed: trained from scratch; dotted: majority class).")
        if (pareto := plot_pareto(summaries, out / PLOT_PARETO)) is not None:
            plots["pareto"] = pareto
            captions["pareto"] = "Quality against cost: accuracy against extraction images/s; the line joins the runs nothing beats on both."
    best = _best(summaries)
    if best is not None:
        best_runs = [r for r in runs if r["run_id"] in best["run_ids"] and r.get("confusion_matrix")]
        if best_runs:
            # The seed whose accuracy is the median of the best row's seeds: typical, not lucky.
            ordered = sorted(best_runs, key=lambda r: (r["accuracy"], r["seed"]))
            plots["confusion"] = plot_confusion(ordered[(len(ordered) - 1) // 2], out / PLOT_CONFUSION)
            captions["confusion"] = "Confusion matrix of the best row on the test split (the median seed)."
    finetunes = finetune_runs(out)
    for name, epochs, summary in finetunes:
        key = f"finetune {name}"
        plots[key] = plot_finetune(name, epochs, summary, out / f"finetune_{name}.png")
        captions[key] = (f"Fine-tune run {name}: training and validation curves; green: the epoch kept (best validation), "
                         f"red: where training stopped ({summary.get('stop_reason', 'unknown reason')}).")
    lines = headline(summaries, errors, warnings)
    dataset = runs[0]["dataset"] if runs else (errors[0].get("dataset", "") if errors else "")
    e = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1">',
        f"<title>embedpipe bench: {e(dataset)}</title><style>{_CSS}</style></head><body>",
        f"<h1>embedpipe bench: {e(dataset)}</h1>",
        f'<p class="sub">{len({s["backbone"] for s in summaries})} backbones × {len({s["head"] for s in summaries})} heads × '
        f'{len({str(s["shots"]) for s in summaries})} label budgets × {len({r["seed"] for r in runs})} seeds; '
        f"frozen features, one extraction per backbone.</p>",
        '<ul class="lead">' + "".join(f"<li>{e(line)}</li>" for line in lines) + "</ul>",
        *(['<div class="warn"><strong>Warnings</strong><ul>' + "".join(
            f"<li>{e(w['backbone'])}: {e(w['message'])}. Pairs (test = train): {e(w.get('examples') or '')}</li>" for w in warnings)
           + "</ul></div>"] if warnings else []),
        "<h2>Results</h2>",
        "<p>Test split, mean ± std over seeds. <em>chosen</em>: the hyper-parameter each seed picked on its hold-out "
        "(C of logreg, k of knn, the best epoch of mlp). <em>R@1, R@5, mAP@R</em>: the backbone's kNN retrieval quality, "
        "test images searched among the train images (see Protocol).</p>",
        _table(TABLE_COLUMNS, table_rows(summaries), highlight=summaries.index(best) if best in summaries else None),
    ]
    if plots:
        parts.append("<h2>Plots</h2>")
        for key, path in plots.items():
            parts.append(f"<figure>{_img(path, captions[key])}<figcaption>{e(captions[key])}</figcaption></figure>")
    if finetunes:
        parts += ["<h2>Fine-tune runs</h2>", _finetune_table(finetunes)]
    if errors:
        parts.append("<h2>Failures</h2><p>Each failure is a row in results.csv; the rest of the grid ran.</p>")
        rows = [(str(r.get("backbone", "")), str(r.get("head") or "(backbone)"), str(r.get("shots") or ""), str(r.get("seed", "")),
                 str(r.get("error_type", "")), str(r["error"])) for r in errors]
        parts.append(_table(("backbone", "head", "shots", "seed", "type", "error"), rows, cls="err"))
    parts.append("<h2>Protocol</h2><dl>" + "".join(f"<dt>{e(k)}</dt><dd>{e(v)}</dd>" for k, v in _protocol(summaries, runs)) + "</dl>")
    parts.append("<h2>Environment</h2><dl>" + "".join(f"<dt>{e(k)}</dt><dd>{e(v)}</dd>" for k, v in _environment(runs)) + "</dl>")
    parts.append("<footer>Written by <code>embedpipe bench</code>; re-render with <code>embedpipe report "
                 f"{e(out.name)}</code>. Data: results.csv, results.json.</footer></body></html>")
    path = out / REPORT_HTML
    path.write_text("\n".join(parts) + "\n", encoding="utf-8")
    return ReportResult(html=path, plots=plots, summaries=summaries, series=series, headline=lines)
