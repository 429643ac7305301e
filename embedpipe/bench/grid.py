"""The bench grid: backbones x heads x label budgets x seeds on one dataset, and re-rendering its report.

Each backbone is extracted once through the cache; every head then fits on its cached features for
each label budget and seed. A failure becomes a record with its error and the grid goes on; the
results are written after each backbone, so a killed bench resumes with ``skip_existing``.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from .._progress import ProgressFactory, no_progress
from ..config import OUTPUT_EMBEDDING, BackboneSpec, EmbeddingConfig, FineTuneConfig, RunConfig, SplitConfig
from ..data import load_dataset
from ..errors import BenchError
from ..extraction import as_spec, extract, load, resolve
from ..finetune import fine_tune
from ..heads import HEADS, fit_head
from ..machine import PeakMemory, environment, resolve_device
from .records import (ALL, BENCH_FORMAT, FINETUNE_DIR, SCRATCH, THROUGHPUT_SAMPLE, backbone_record, feature_quality, fit_metrics,
                      head_protocol, leakage_record, parse_shots, read_finetune_run, read_results, run_key, scratch_record, session_id,
                      write_results)
from .report import ReportResult, render, summarise

logger = logging.getLogger(__name__)


@dataclass
class BenchResult:
    """What :func:`bench` did."""

    out: Path  # the results folder
    records: list[dict[str, Any]]  # every record written to results.json (runs, failures, summaries)
    summaries: list[dict[str, Any]]  # one per (backbone, head, shots), mean and std over seeds
    errors: list[dict[str, Any]]  # the failure records
    warnings: list[dict[str, Any]]  # the warning records: a backbone whose test split repeats its train split
    fitted: int  # head fits run now (the rest came from --skip-existing)
    reused: int  # runs taken from the stored results
    report: ReportResult  # what was rendered: report.html, the plots, the headline


def _throughput_sample(spec: BackboneSpec, config: EmbeddingConfig, paths: list[Path], device: str, run: RunConfig) -> tuple[float | None, int | None]:
    """Images/s and peak memory of the extraction loop on a few images, for backbones that came from the cache."""
    from ..backbone import load_backbone
    from ..inference import embed, prepare_model

    if not paths:
        return None, None
    with PeakMemory(device) as memory:
        model = prepare_model(load_backbone(spec.name, weights=spec.weights, pretrained=spec.pretrained), device, run)
        done = 0
        started = time.perf_counter()
        for batch in embed(model, paths, config, device=device, run=run):
            done += len(batch.rows)
        seconds = time.perf_counter() - started
    return (done / seconds if done and seconds > 0 else None), memory.peak_bytes


def _scratch_records(source: str | Path, spec: BackboneSpec, *, shots: list[int | str], seeds: list[int], out: Path,
                     split: SplitConfig, run: RunConfig, common: dict[str, Any],
                     previous: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """``--baseline scratch``: the same architecture trained from random initialisation on each label budget.

    Each (shots, seed) trains into ``out/scratch/<backbone>-<shots>-s<seed>/`` and becomes a record with
    ``head == "scratch"`` (:func:`embedpipe.bench.scratch_record`, read from that run's ``summary.json``),
    which the report draws dashed on the shots plot. The settings are the fine-tune stage's own recipe
    for a from-scratch baseline (every layer trains, no head-only phase, BatchNorm in train mode, LR 1e-3).
    A budget of K trains on the K-per-class rows ``few_shot_indices`` picks from the train split with the
    same seed, as the frozen heads' rows do; early stopping watches the whole val split.
    """
    records = []
    for budget in shots:
        for seed in seeds:
            key = run_key(source=common["source"], spec=spec, split=split, head=SCRATCH, params={}, shots=budget, seed=seed)
            if key in previous:  # --skip-existing
                records.append(previous[key])
                continue
            run_dir = out / "scratch" / f"{spec.name}-{budget}-s{seed}"
            error: BaseException | None = None
            try:
                config = FineTuneConfig(unfreeze="all", head_epochs=0, train_bn=True, lr=1e-3, seed=seed,
                                        shots=None if budget == ALL else int(budget))
                fine_tune(source, replace(spec, pretrained=False), out=run_dir, split=split, run=run, config=config)
            except Exception as failure:  # noqa: BLE001 - a failed baseline run becomes a row, like any other
                error = failure
            records.append(scratch_record(common, spec=spec, split=split, shots=budget, seed=seed, run_dir=run_dir, error=error))
    return records


def _bench_cell(embeddings: Path, loaded: tuple[np.ndarray, np.ndarray, dict[str, Any]], backbone: str,
                cell: tuple[str, dict[str, Any], int | str, int, str], fields: dict[str, Any]) -> dict[str, Any]:
    """Fit one head of the grid on a backbone's cached features; its run record, or its failure record."""
    kind, params, budget, seed, key = cell
    record = {**fields, "record": "run", "created": _now(), "run_id": key, "head": kind, "shots": budget,
              "seed": seed, "head_params": json.dumps(params, sort_keys=True), **head_protocol(kind, params)}
    accepted = HEADS[kind]().get_params()
    fit_params = {**({"random_state": seed} if "random_state" in accepted else {}), **params}
    try:
        fit = fit_head(embeddings, kind, params=fit_params, shots=None if budget == ALL else int(budget), seed=seed,
                       holdout=True, loaded=loaded)
    except Exception as error:  # noqa: BLE001 - a head that cannot fit (too few labels, out of memory) becomes a row
        logger.warning("%s + %s, shots %s, seed %s failed: %s", backbone, kind, budget, seed, error)
        return {**record, "record": "error", "error": str(error), "error_type": type(error).__name__}
    return {**record, **fit_metrics(fit.metrics, fit.chosen, n_train=fit.n_train, fit_seconds=fit.fit_seconds,
                                    classes=fit.head.classes_)}


def bench(
    source: str | Path,
    backbones: Sequence[str | BackboneSpec],
    *,
    heads: Sequence[str] = ("logreg", "knn"),
    shots: Sequence[int | str] = ("all",),
    seeds: int | Sequence[int] = 3,
    out: str | Path,
    cache_dir: str | Path = "cache",
    split: SplitConfig | None = None,
    run: RunConfig = RunConfig(),
    skip_existing: bool = False,
    head_params: dict[str, dict[str, Any]] | None = None,
    baseline: str | None = None,
    finetune_runs: Sequence[str | Path] = (),
    leakage_threshold: float | None = None,
    progress: ProgressFactory = no_progress,
) -> BenchResult:
    """Backbones x heads x shots x seeds on one dataset: one extraction per backbone, every head on its cached features.

    Every head sees only its training rows' labels (``shots`` per class drawn by the seed, or the
    whole train split for ``"all"``) and chooses its hyper-parameter on a share of them it holds out;
    every row is scored on the same test split. A backbone or a fit that fails becomes a record with
    its error and the grid goes on. Once per backbone, the test split is also searched against the
    train split (exact cosine kNN): its recall@1, recall@5 and mAP@R are columns of every row, and
    test images that repeat train images become a warning record (:func:`embedpipe.explore.split_leakage`). Results are written after each backbone, so a killed bench
    resumes with ``skip_existing``.

    Args:
        source: folder tree or CSV manifest of labelled images.
        backbones: timm names or :class:`BackboneSpec` (weights, precision, preprocessing, pretrained).
        heads: names in :data:`embedpipe.heads.HEADS`.
        shots: training images per class, ints or ``"all"``.
        seeds: how many seeds (0..n-1), or the seeds themselves; a seed draws the few-shot sample and seeds the head.
        out: results folder: ``results.json``, ``results.csv``, ``report.html``, ``*.png``; ``{machine}`` in
            it becomes the machine's name (``cpu-amd-epyc-2c``), as in benchmarks/results/.
        cache_dir: the embedding cache (already cached backbones are not recomputed).
        split: how to split data that comes without a split.
        run: device, batch size, workers.
        skip_existing: keep finished runs from ``out/results.json`` whose inputs are unchanged (same
            run id); failed ones are retried.
        head_params: head name -> keyword parameters (e.g. ``{"logreg": {"Cs": 20}}``).
        baseline: ``"scratch"``: also train each architecture from random initialisation on each
            label budget (needs the fine-tune stage).
        finetune_runs: fine-tune run folders to show in the report (copied into ``out/finetune/``).
        leakage_threshold: also report test images whose most similar train image is at this cosine or
            above (e.g. 0.9; guarded against backbones that cannot tell images apart, see
            :func:`embedpipe.explore.split_leakage`). None (the default) reports byte-identical files
            only: a fixed threshold fires on distinct images of look-alike data (ELPV's cells) and of
            random-weight backbones.
        progress: progress bar factory for the extractions.
    """
    split = split or SplitConfig()
    specs = [as_spec(b) for b in backbones]
    budgets, seed_list = _check_grid(specs, heads, shots, seeds, baseline)
    for folder in finetune_runs:
        read_finetune_run(folder)  # fail early on a wrong folder
    dataset = load_dataset(source, split=split)
    device = resolve_device(run.device)
    env = {f"env_{k}": v for k, v in environment(device).items()}
    out = Path(str(out).replace("{machine}", env["env_machine"]))  # results folders name the machine they ran on
    previous, warnings = _stored_runs(out, skip_existing)
    common = {"bench_format": BENCH_FORMAT, "session": session_id(), "dataset": dataset.name, "source": str(dataset.root)}
    grid = _Grid(source=source, out=out, cache_dir=cache_dir, split=split, run=run, device=device, common=common, env=env,
                 previous=previous, warnings=warnings, leakage_threshold=leakage_threshold, progress=progress)
    for spec in specs:
        cells = [(kind, {**(head_params or {}).get(kind, {})}, budget, seed) for kind in heads for budget in budgets
                 for seed in seed_list]
        grid.backbone(spec, [(*cell, grid.key(spec, *cell)) for cell in cells], sample=dataset.paths[:THROUGHPUT_SAMPLE])
    if baseline == SCRATCH:
        for spec in specs:
            grid.records += _scratch_records(source, spec, shots=budgets, seeds=seed_list, out=out, split=split, run=run,
                                             common={**common, **env}, previous=previous)
            grid.save()
    _keep_finetune_runs(out, finetune_runs)
    grid.save()
    stored = read_results(out)  # render from what is stored, so `embedpipe report` gives the same bytes
    result = render(out, stored)
    return BenchResult(out=out, records=stored, summaries=result.summaries, errors=[r for r in stored if r.get("error")],
                       warnings=[r for r in stored if r.get("record") == "warning"], fitted=grid.fitted, reused=grid.reused,
                       report=result)


def _stored_runs(out: Path, skip_existing: bool) -> tuple[dict[str, dict[str, Any]], dict[str, list[dict[str, Any]]]]:
    """With ``skip_existing``: the finished runs of ``out/results.json`` by run id, and its warnings by backbone."""
    previous: dict[str, dict[str, Any]] = {}
    warnings: dict[str, list[dict[str, Any]]] = {}
    if not skip_existing:
        if (out / "results.json").exists():
            logger.info("overwriting %s (pass skip_existing to resume it)", out / "results.json")
        return previous, warnings
    for record in read_results(out):
        if record.get("record") == "run" and not record.get("error"):
            previous[record["run_id"]] = record
        elif record.get("record") == "warning":
            warnings.setdefault(record["backbone"], []).append(record)
    return previous, warnings


def _check_grid(specs: Sequence[BackboneSpec], heads: Sequence[str], shots: Sequence[int | str], seeds: int | Sequence[int],
                baseline: str | None) -> tuple[list[int | str], list[int]]:
    """The grid's label budgets and seeds, after refusing an empty or unknown axis before any work is done."""
    if not specs:
        raise BenchError("no backbones to bench: pass at least one")
    unknown = [h for h in heads if h not in HEADS]
    if unknown or not heads:
        raise BenchError(f"unknown head(s) {', '.join(unknown) or '(none given)'}: choose from {', '.join(HEADS)}")
    budgets = parse_shots(list(shots))
    seed_list = list(range(seeds)) if isinstance(seeds, int) else list(dict.fromkeys(seeds))
    if not seed_list:
        raise BenchError("no seeds: pass --seeds 1 or more")
    if baseline not in (None, SCRATCH):
        raise BenchError(f"unknown --baseline {baseline!r}: the one baseline is {SCRATCH!r}")
    return budgets, seed_list


@dataclass
class _Grid:
    """One bench invocation's state: where it writes, what it reuses, and the records so far."""

    source: str | Path
    out: Path
    cache_dir: str | Path
    split: SplitConfig
    run: RunConfig
    device: str
    common: dict[str, Any]  # the fields every record starts with: format, session, dataset, source
    env: dict[str, Any]  # and the environment (env_cpu, env_cores, ...), after the backbone
    previous: dict[str, dict[str, Any]]  # run id -> a finished record kept by skip_existing
    warnings: dict[str, list[dict[str, Any]]]  # backbone -> its stored warning records, kept with its runs
    leakage_threshold: float | None
    progress: ProgressFactory
    records: list[dict[str, Any]] = field(default_factory=list)
    fitted: int = 0
    reused: int = 0

    def key(self, spec: BackboneSpec, kind: str, params: dict[str, Any], budget: int | str, seed: int) -> str:
        return run_key(source=self.common["source"], spec=spec, split=self.split, head=kind, params=params, shots=budget, seed=seed)

    def save(self) -> None:
        write_results(self.out, self.records + summarise(self.records))

    def backbone(self, spec: BackboneSpec, cells: list[tuple[str, dict[str, Any], int | str, int, str]], *, sample: list[Path]) -> None:
        """Extract one backbone (through the cache) and fit every cell not already in the stored results."""
        base = {**self.common, "backbone": spec.name, "pretrained": spec.pretrained, **self.env}
        todo = [c for c in cells if c[4] not in self.previous]
        self.records += [self.previous[c[4]] for c in cells if c[4] in self.previous]
        self.reused += len(cells) - len(todo)
        if not todo:
            logger.info("%s: every run is in the stored results", spec.name)
            self.records += self.warnings.get(spec.name, [])
            return
        try:
            fields = self._extraction_fields(spec, sample)
        except Exception as error:  # noqa: BLE001 - any backbone failure (name, weights, memory) becomes a row
            logger.warning("%s failed: %s", spec.name, error)
            self.records.append({**base, "record": "error", "created": _now(), "run_id": "", "head": None, "shots": None,
                                 "seed": None, "error": str(error).splitlines()[0] if str(error) else type(error).__name__,
                                 "error_type": type(error).__name__})
            self.save()
            return
        embeddings = Path(fields["embeddings_file"])
        loaded = load(embeddings, output="embeddings")  # once: every head, budget and seed fits on it
        X, labels, meta = loaded
        quality, leakage = feature_quality(X, labels, meta, device=self.device, leakage_threshold=self.leakage_threshold)
        if (warning := leakage_record(base, leakage, meta["paths"])) is not None:
            logger.warning("%s: %s", spec.name, warning["message"])
            self.records.append(warning)
        fields = {**base, **backbone_record(resolve(spec, self.device), labels, meta, self.split), **fields, **quality}
        with self.progress(f"{spec.name}: head fits", len(todo)) as advance:
            for cell in todo:
                self.records.append(_bench_cell(embeddings, loaded, spec.name, cell, fields))
                self.fitted += self.records[-1]["record"] == "run"
                advance(1)
        self.save()

    def _extraction_fields(self, spec: BackboneSpec, sample: list[Path]) -> dict[str, Any]:
        """Extract ``spec`` and measure its cost: images/s and peak memory, from a sample when the cache held it."""
        from ..backbone import parameter_count

        with PeakMemory(self.device) as memory:
            extracted = extract(self.source, spec, cache_dir=self.cache_dir, split=self.split, run=self.run, progress=self.progress)
        rate, peak, how = extracted.images_per_second, memory.peak_bytes, "extraction"
        if rate is None or extracted.computed < min(THROUGHPUT_SAMPLE, extracted.num_images):
            rate, peak = _throughput_sample(spec, resolve(spec, self.device), sample, self.device, self.run)
            how = f"sample of {len(sample)} images"
        return {"embedding_dim": extracted.dims.get(OUTPUT_EMBEDDING), "param_count": parameter_count(spec.name),
                "extract_images_per_second": rate, "throughput_source": how, "extract_seconds": extracted.seconds,
                "cache_hit": extracted.cache_hit, "peak_memory_bytes": peak, "peak_memory_kind": memory.kind,
                "device": self.device, "embeddings_file": str(extracted.path)}


def report(out: str | Path, *, finetune_runs: Sequence[str | Path] = ()) -> ReportResult:
    """Re-render ``report.html`` and the plots of a bench folder from its ``results.json``.

    Args:
        out: a folder written by :func:`bench`.
        finetune_runs: more fine-tune run folders to show (copied into ``out/finetune/``).

    Returns:
        What was rendered (:class:`embedpipe.report.ReportResult`).
    """
    out = Path(out)
    records = read_results(out)
    if not records:
        raise BenchError(f"{out} has no results.json: pass a folder written by `embedpipe bench --out`")
    for folder in finetune_runs:
        read_finetune_run(folder)  # all readable before any is copied
    _keep_finetune_runs(out, finetune_runs)
    return render(out, records)


def _keep_finetune_runs(out: Path, folders: Sequence[str | Path]) -> None:
    """Copy fine-tune runs' ``metrics.jsonl`` and ``summary.json`` into ``out/finetune/<name>/``, so the report re-renders alone."""
    for folder in folders:
        target = out / FINETUNE_DIR / Path(folder).resolve().name
        target.mkdir(parents=True, exist_ok=True)
        for name in ("metrics.jsonl", "summary.json"):
            shutil.copyfile(Path(folder) / name, target / name)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
