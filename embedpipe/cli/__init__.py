"""The ``embedpipe`` command: parses options, calls each stage's public functions, prints.

Heavy imports (torch, timm) happen inside the library calls, so ``--help``
answers at once. Library errors become a one-line message and a non-zero
exit status, never a traceback.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import click

from ..config import AUGMENTS, MONITORS, SCHEDULES, FineTuneConfig
from ..examples import EXAMPLES
from .explore import COMMANDS as EXPLORE_COMMANDS
from .options import FRACTION, POSITIVE, backbone_options, backbone_spec, handle_errors, progress_factory, run_config

logger = logging.getLogger("embedpipe")


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="embedpipe")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.option("-q", "--quiet", is_flag=True, help="Only errors; no progress bars.")
@click.pass_context
def cli(ctx: click.Context, verbose: int, quiet: bool) -> None:
    """Transfer learning on images with cached embeddings.

    Extract embeddings from a frozen timm backbone once, then train heads on them in seconds.
    """
    level = logging.ERROR if quiet else (logging.WARNING, logging.INFO, logging.DEBUG)[min(verbose, 2)]
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("embedpipe").setLevel(level)
    ctx.obj = {"quiet": quiet}


@cli.command()
@click.argument("source", type=click.Path())
@backbone_options
@click.option("--val-fraction", type=FRACTION, default=0.1, show_default=True, help="Split made when the data has none.")
@click.option("--test-fraction", type=FRACTION, default=0.2, show_default=True)
@click.option("--split-seed", type=int, default=0, show_default=True)
@click.option("--on-error", type=click.Choice(["skip", "fail"]), default="skip", show_default=True,
              help="skip: record an undecodable image in the ledger and go on.")
@click.option("--storage-option", "storage_options", multiple=True, metavar="KEY=VALUE",
              help="fsspec option for URL sources, repeatable (e.g. endpoint_url=http://localhost:9000 for S3).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option("-q", "--quiet", is_flag=True, help="Print only the file path; no progress bars.")
@click.pass_context
@handle_errors
def extract(ctx: click.Context, source: str, on_error: str, as_json: bool, quiet: bool, val_fraction: float,
            test_fraction: float, split_seed: int, storage_options: tuple[str, ...], **kw: Any) -> None:
    """Embed a dataset once with a frozen backbone into the HDF5 cache.

    SOURCE is a folder with one sub-folder per class (optionally under train/ val/ test/),
    a folder of unlabelled images, a CSV or Parquet manifest (path[,label][,split], paths relative
    to it or URLs; or a Parquet image column), WebDataset .tar shards (a path, a glob or a brace
    pattern such as 'data-{000000..000099}.tar'), a folder written by datasets' save_to_disk, or
    one of these files as a file://, http(s):// or s3:// URL.

    \b
    Example:
        embedpipe extract data/flowers --backbone tf_efficientnet_lite0 --cache-dir cache/
        embedpipe extract data/flowers -b resnet50.a1_in1k --output embedding --output logits
        embedpipe extract 's3://bucket/shards/data-{000000..000099}.tar' --storage-option endpoint_url=http://localhost:9000
        torchrun --nproc-per-node 8 -m embedpipe extract data/flowers -b resnet50.a1_in1k
    """
    from ..config import SplitConfig
    from ..distributed import is_main_process
    from ..extraction import extract as run_extract

    spec = backbone_spec(kw)
    run = run_config(kw, on_error=on_error)
    quiet = ctx.obj["quiet"] or quiet or as_json
    main_rank = is_main_process()  # under torchrun only rank 0 reports
    result = run_extract(
        source,
        spec,
        cache_dir=kw.pop("cache_dir"),
        split=SplitConfig(val_fraction=val_fraction, test_fraction=test_fraction, seed=split_seed),
        run=run,
        progress=progress_factory(quiet or not main_rank),
        storage_options=_key_values(storage_options, "--storage-option"),
    )
    if not main_rank:
        return
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
        return
    click.echo(str(result.path))
    if not quiet:
        if result.cache_hit:
            how = "cache hit, nothing computed"
        else:
            rate = f" at {result.images_per_second:.1f} img/s" if result.images_per_second else ""
            how = f"{result.computed} computed{rate} on {result.device}, {result.reused} from cache"
        dims = ", ".join(f"{k} {v}" for k, v in result.dims.items())
        skipped = f", {len(result.failed)} skipped (see `embedpipe cache info`)" if result.failed else ""
        click.echo(
            f"{result.num_images} images x ({dims}) from {result.backbone}: {how}{skipped}; {result.seconds:.1f} s",
            err=True,
        )


def _key_values(pairs: tuple[str, ...], option: str) -> dict[str, Any] | None:
    """``KEY=VALUE`` options as a dict; values that read as JSON (numbers, true/false) become those."""
    found: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{pair!r} is not KEY=VALUE: e.g. {option} endpoint_url=http://localhost:9000")
        try:
            found[key] = json.loads(value)
        except ValueError:
            found[key] = value
    return found or None


_HEAD_OPTIONS = {  # CLI option -> head parameter; only options the user sets are passed
    "cs": "Cs", "normalize": "normalize", "solver": "solver", "class_weight": "class_weight",
    "hidden": "hidden", "dropout": "dropout", "weight_decay": "weight_decay", "lr": "lr",
    "max_epochs": "max_epochs", "patience": "patience", "k": "k", "head_device": "device",
}


def _head_params(kind: str, kw: dict[str, Any]) -> dict[str, Any]:
    from ..heads import HEADS

    accepted = set(HEADS[kind]().get_params())
    params = {}
    for option, param in _HEAD_OPTIONS.items():
        value = kw.pop(option, None)
        if value is None:
            continue
        if param not in accepted:
            raise click.UsageError(f"--{option.replace('_', '-')} does not apply to the {kind} head")
        params[param] = value
    return params


def _print_metrics(metrics: dict[str, dict[str, Any]]) -> None:
    rows = [("split", "n", "accuracy", "balanced", "macro-F1", "top-k")]
    for split, m in metrics.items():
        top = next((v for k, v in m.items() if k.startswith("top")), float("nan"))
        rows.append((split, str(m["n"]), f"{m['accuracy']:.3f}", f"{m['balanced_accuracy']:.3f}", f"{m['macro_f1']:.3f}", f"{top:.3f}"))
    for row in rows:
        click.echo("  ".join(cell.ljust(9) for cell in row))


@cli.command("fit-head")
@click.argument("embeddings", type=click.Path())
@click.option("--head", "kind", type=click.Choice(["logreg", "mlp", "knn"]), default="logreg", show_default=True)
@click.option("--out", type=click.Path(file_okay=False), default=None, help="Folder to save the head to.")
@click.option("--shots", type=click.IntRange(min=1), default=None, help="Train on K images per class (few-shot).")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True, help="Few-shot sampling seed.")
@click.option("--output", default="embeddings", show_default=True, help="Stored output to train on (embeddings, logits, stageN).")
@click.option("--cs", type=click.IntRange(min=1), default=None, help="logreg: number of C values on the 1e-6..1e5 grid [45].")
@click.option("--normalize", type=click.Choice(["standard", "l2", "none"]), default=None, help="logreg: feature normalisation [standard].")
@click.option("--solver", type=click.Choice(["torch", "sklearn"]), default=None, help="logreg: L-BFGS in torch or scikit-learn [torch].")
@click.option("--class-weight", type=click.Choice(["balanced"]), default=None, help="Weight classes inversely to their frequency.")
@click.option("--hidden", type=click.IntRange(min=1), default=None, help="mlp: hidden width.")
@click.option("--dropout", type=click.FloatRange(0, 1, max_open=True), default=None, help="mlp: dropout.")
@click.option("--weight-decay", type=click.FloatRange(min=0), default=None, help="mlp: AdamW weight decay.")
@click.option("--lr", type=POSITIVE, default=None, help="mlp: learning rate.")
@click.option("--max-epochs", type=click.IntRange(min=1), default=None, help="mlp: epoch cap (early stopping usually ends sooner).")
@click.option("--patience", type=click.IntRange(min=0), default=None, help="mlp: epochs without validation improvement before stopping.")
@click.option("--k", type=click.IntRange(min=1), default=None, help="knn: neighbours (default: chosen on validation).")
@click.option("--head-device", default=None, help="Device for torch heads (auto: GPU when there is one).")
@click.option("--json", "as_json", is_flag=True)
@handle_errors
def fit_head(embeddings: str, kind: str, out: str | None, shots: int | None, seed: int, output: str, as_json: bool, **kw: Any) -> None:
    """Train a head on cached embeddings: train split to fit, val to choose, every split reported.

    \b
    Example:
        embedpipe fit-head cache/elpv-tf_efficientnet_lite0-c29b2595c6b7.h5 --head logreg --out heads/elpv-logreg
        embedpipe fit-head cache/elpv-...h5 --head knn --shots 10 --seed 1
    """
    from ..heads import fit_head as run_fit

    result = run_fit(embeddings, kind, out=out, params=_head_params(kind, kw), shots=shots, seed=seed, output=output)
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2, default=str))
        return
    _print_metrics(result.metrics)
    chosen = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in result.chosen.items())
    click.echo(f"{kind}: {chosen or 'fixed hyper-parameters'}; fit {result.fit_seconds:.2f} s on {result.n_train} train rows")
    if "test" in result.metrics:
        click.echo(f"test confusion matrix (rows: true {', '.join(map(str, result.head.classes_))}):")
        for row in result.metrics["test"]["confusion_matrix"]:
            click.echo("  " + " ".join(f"{v:6d}" for v in row))
    click.echo(f"diagnosis: {result.diagnosis}")
    if out:
        click.echo(f"saved {out}")


@cli.command()
@click.argument("head", type=click.Path())
@click.argument("embeddings", type=click.Path())
@click.option("--split", default=None, help="Only this split (train, val, test).")
@click.option("--json", "as_json", is_flag=True)
@handle_errors
def evaluate(head: str, embeddings: str, split: str | None, as_json: bool) -> None:
    """Score a saved head on an exported embeddings file made with the same backbone.

    \b
    Example:
        embedpipe evaluate heads/elpv-logreg cache/elpv-tf_efficientnet_lite0-c29b2595c6b7.h5 --split test
    """
    from ..heads import evaluate as run_evaluate

    metrics = run_evaluate(head, embeddings, split=split)
    if as_json:
        click.echo(json.dumps(metrics, indent=2))
        return
    _print_metrics(metrics)


@cli.command()
@click.argument("head", type=click.Path())
@click.argument("source", type=click.Path())
@click.option("--top-k", type=click.IntRange(min=1), default=3, show_default=True)
@click.option("--out", "out_file", type=click.Path(dir_okay=False), default=None, help="Write predictions to .csv or .json.")
@click.option("--cache-dir", type=click.Path(file_okay=False), default="cache", show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=None,
              help="Images per batch [default: 256 on CUDA, 64 on CPU]; halved on out-of-memory.")
@click.option("--workers", type=click.IntRange(min=0), default=None)
@click.option("-q", "--quiet", is_flag=True)
@click.pass_context
@handle_errors
def predict(ctx: click.Context, head: str, source: str, top_k: int, out_file: str | None, cache_dir: str, device: str,
            batch_size: int | None, workers: int | None, quiet: bool) -> None:
    """Label new images: images -> the head's backbone (via the cache) -> head -> top-k classes.

    The head rebuilds the backbone and preprocessing it was trained with; images already in the
    cache are not recomputed. Unreadable images are reported, not fatal.

    \b
    Example:
        embedpipe predict heads/elpv-logreg path/to/new/images --top-k 2 --out predictions.csv
    """
    from ..config import RunConfig
    from ..heads import predict as run_predict

    run = RunConfig(device=device, batch_size=batch_size, num_workers=workers)
    predictions, failed = run_predict(
        head, source, top_k=top_k, cache_dir=cache_dir, run=run, progress=progress_factory(ctx.obj["quiet"] or quiet)
    )
    records = [{"path": p.path, "label": p.label, "top": [{"class": c, "probability": round(v, 6)} for c, v in p.top]} for p in predictions]
    if out_file:
        _write_predictions(Path(out_file), records, top_k)
    elif not quiet:
        for record in records:
            top = ", ".join(f"{t['class']} {t['probability']:.3f}" for t in record["top"])
            click.echo(f"{record['path']}\t{record['label']}\t{top}")
    for path, reason in failed:
        click.echo(f"skipped {path}: {reason}", err=True)
    if out_file and not quiet:
        click.echo(f"{len(records)} predictions written to {out_file}" + (f", {len(failed)} images skipped" if failed else ""), err=True)


def _write_predictions(path: Path, records: list[dict[str, Any]], top_k: int) -> None:
    import csv

    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".json":
        path.write_text(json.dumps(records, indent=2))
        return
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        width = max((len(r["top"]) for r in records), default=top_k)
        writer.writerow(["path", "label", *[f"{kind}{i + 1}" for i in range(width) for kind in ("class", "probability")]])
        for r in records:
            writer.writerow([r["path"], r["label"], *[v for t in r["top"] for v in (t["class"], t["probability"])]])


@cli.command()
@click.argument("source", type=click.Path())
@click.option("--backbones", default=None,
              help="Comma list of timm names and/or named lists from embedpipe/bench/backbones.json "
                   "(offline, offline-fast, small, standard, test) [default: --backbone].")
@click.option("--backbone-lists", type=click.Path(dir_okay=False, exists=True), default=None,
              help="A JSON file of named backbone lists (name -> [timm names]) [default: the lists shipped in embedpipe/bench/backbones.json].")
@backbone_options
@click.option("--heads", default="logreg,knn", show_default=True, help="Comma list of heads: logreg, knn, mlp.")
@click.option("--shots", default="all", show_default=True,
              help="Comma list of labelled training images per class; all = the whole train split.")
@click.option("--seeds", type=click.IntRange(min=1), default=3, show_default=True,
              help="Seeds 0..N-1: each draws the few-shot sample and seeds the head.")
@click.option("--out", type=click.Path(file_okay=False), required=True,
              help="Results folder: results.csv, results.json, report.html, *.png; {machine} becomes the machine's name.")
@click.option("--skip-existing", is_flag=True, help="Resume: keep finished runs stored in OUT whose inputs are unchanged.")
@click.option("--baseline", type=click.Choice(["scratch"]), default=None,
              help="Also train each architecture from random init on each label budget (needs the fine-tune stage).")
@click.option("--finetune-run", "finetune_runs", multiple=True, type=click.Path(file_okay=False),
              help="A fine-tune run folder (metrics.jsonl, summary.json) to show in the report; repeatable.")
@click.option("--cs", type=click.IntRange(min=1), default=None, help="logreg: number of C values on the 1e-6..1e5 grid [45].")
@click.option("--val-fraction", type=FRACTION, default=0.1, show_default=True, help="Split made when the data has none.")
@click.option("--test-fraction", type=FRACTION, default=0.2, show_default=True)
@click.option("--split-seed", type=int, default=0, show_default=True)
@click.option("--leakage-threshold", type=click.FloatRange(0, 1, min_open=True), default=None,
              help="Also warn about test images whose nearest train image is at this cosine or above (e.g. 0.9) "
                   "[default: byte-identical files only].")
@click.option("--json", "as_json", is_flag=True, help="Print the summary and failure records as JSON.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars; print only the table.")
@click.pass_context
@handle_errors
def bench(ctx: click.Context, source: str, backbones: str | None, backbone_lists: str | None, heads: str, shots: str, seeds: int, out: str,
          skip_existing: bool, baseline: str | None, finetune_runs: tuple[str, ...], cs: int | None, val_fraction: float,
          test_fraction: float, split_seed: int, leakage_threshold: float | None, as_json: bool, quiet: bool, **kw: Any) -> None:
    """Compare backbones x heads x label budgets x seeds on one labelled dataset, with a report.

    Each backbone is extracted once through the cache; every head fits on the cached features with only
    its training rows' labels and is scored on the same test split. A failing backbone becomes a row
    with its error. Writes OUT/results.csv, results.json, report.html and the plots.

    \b
    Example:
        embedpipe bench data/flowers --backbones offline --heads logreg,knn,mlp --shots 1,5,10,all --seeds 3 --out reports/flowers
        embedpipe bench data/flowers --backbones tf_efficientnet_lite0,resnet50.a1_in1k --out reports/flowers --skip-existing
        embedpipe report reports/flowers
    """
    from dataclasses import replace

    from click.core import ParameterSource

    from ..bench import bench as run_bench
    from ..bench import parse_shots, resolve_backbones, text_table
    from ..config import SplitConfig

    if backbones is not None and ctx.get_parameter_source("backbone") == ParameterSource.COMMANDLINE:
        raise click.UsageError("pass either --backbone or --backbones, not both")
    names = resolve_backbones(backbones, lists_file=backbone_lists) if backbones is not None else [kw["backbone"]]
    if kw["weights"] and len(names) > 1:
        raise click.UsageError(f"--weights names one backbone's weights, but {len(names)} backbones are benched: bench one")
    template = backbone_spec(kw)
    run = run_config(kw)
    quiet = ctx.obj["quiet"] or quiet or as_json
    result = run_bench(
        source,
        [replace(template, name=name) for name in names],
        heads=[h.strip() for h in heads.split(",") if h.strip()],
        shots=parse_shots(shots.split(",")),
        seeds=seeds,
        out=out,
        cache_dir=kw.pop("cache_dir"),
        split=SplitConfig(val_fraction=val_fraction, test_fraction=test_fraction, seed=split_seed),
        run=run,
        skip_existing=skip_existing,
        head_params={"logreg": {"Cs": cs}} if cs is not None else None,
        baseline=baseline,
        finetune_runs=finetune_runs,
        leakage_threshold=leakage_threshold,
        progress=progress_factory(quiet),
    )
    if as_json:
        click.echo(json.dumps({"summaries": result.summaries, "errors": result.errors}, indent=2, default=str))
    else:
        click.echo(text_table(result.summaries, result.errors, result.warnings))
        if not quiet:
            for line in result.report.headline:
                click.echo(line, err=True)
            resumed = f", {result.reused} from stored results" if result.reused else ""
            click.echo(f"{result.fitted} head fits{resumed}; report: {result.report.html}", err=True)
    if not result.summaries:
        sys.exit(1)


@cli.command()
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--finetune-run", "finetune_runs", multiple=True, type=click.Path(file_okay=False),
              help="A fine-tune run folder (metrics.jsonl, summary.json) to add to the report; repeatable.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary records as JSON.")
@click.option("--markdown", is_flag=True, help="Print the table as Markdown (for a README).")
@handle_errors
def report(out: str, finetune_runs: tuple[str, ...], as_json: bool, markdown: bool) -> None:
    """Re-render OUT/report.html and the plots from a bench's stored results; prints the table.

    \b
    Example:
        embedpipe report reports/flowers
        embedpipe report reports/flowers --finetune-run runs/flowers-lite0
    """
    from ..bench import markdown_table, read_results, text_table
    from ..bench import report as run_report

    result = run_report(out, finetune_runs=finetune_runs)
    if as_json:
        click.echo(json.dumps(result.summaries, indent=2, default=str))
        return
    stored = read_results(out)
    errors = [r for r in stored if r.get("error")]
    warnings = [r for r in stored if r.get("record") == "warning"]
    click.echo((markdown_table if markdown else text_table)(result.summaries, errors, warnings))
    click.echo(f"report: {result.html}", err=True)

@cli.command("fine-tune")
@click.argument("source", type=click.Path())
@backbone_options
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run folder (checkpoints, metrics, curves, summary).")
@click.option("--init-head", type=click.Path(), default=None,
              help="Start the classifier from a logreg head fitted on this backbone's embeddings (LP-FT).")
@click.option("--unfreeze", default=FineTuneConfig.unfreeze, show_default=True,
              help="What trains after the head phase: none, top:K (last K of timm's layer groups) or all.")
@click.option("--head-epochs", type=click.IntRange(min=0), default=FineTuneConfig.head_epochs, show_default=True, help="Phase 1: epochs with the backbone frozen.")
@click.option("--epochs", type=click.IntRange(min=0), default=FineTuneConfig.epochs, show_default=True, help="Phase 2: epochs with --unfreeze layers training.")
@click.option("--lr", type=POSITIVE, default=FineTuneConfig.lr, show_default=True, help="AdamW LR of the backbone's top layer group.")
@click.option("--head-lr-mult", type=POSITIVE, default=FineTuneConfig.head_lr_mult, show_default=True, help="Classifier LR = lr x this.")
@click.option("--layer-decay", type=click.FloatRange(0, 1, min_open=True), default=FineTuneConfig.layer_decay, show_default=True,
              help="LR x decay**depth for lower layer groups (0.65-0.75 suits ViTs; 1 = off).")
@click.option("--weight-decay", type=click.FloatRange(min=0), default=FineTuneConfig.weight_decay, show_default=True, help="AdamW weight decay (not on biases/norms).")
@click.option("--schedule", type=click.Choice(SCHEDULES), default=FineTuneConfig.schedule, show_default=True,
              help="LR decay after warmup, restarted at each phase.")
@click.option("--warmup", type=click.FloatRange(min=0), default=FineTuneConfig.warmup, show_default=True, help="Epochs of linear LR warmup per phase.")
@click.option("--schedule-unit", type=click.Choice(["step", "epoch"]), default=FineTuneConfig.schedule_unit, show_default=True,
              help="Update the LR every optimizer step or once per epoch.")
@click.option("--step-every", type=click.IntRange(min=1), default=FineTuneConfig.step_every, show_default=True, help="step schedule: epochs between decays.")
@click.option("--step-gamma", type=POSITIVE, default=FineTuneConfig.step_gamma, show_default=True, help="step schedule: LR factor per decay.")
@click.option("--exp-gamma", type=POSITIVE, default=FineTuneConfig.exp_gamma, show_default=True, help="exp schedule: LR factor per epoch.")
@click.option("--train-bn", is_flag=True, help="Update BatchNorm statistics in unfrozen layers (default: inference mode).")
@click.option("--augment", type=click.Choice(AUGMENTS), default=FineTuneConfig.augment, show_default=True,
              help="standard: random resized crop (>= 50%) + flip; strong: crop (>= 25%) + flip + RandAugment.")
@click.option("--accum-steps", type=click.IntRange(min=1), default=FineTuneConfig.accum_steps, show_default=True, help="Gradient accumulation steps.")
@click.option("--monitor", type=click.Choice(MONITORS), default=FineTuneConfig.monitor, show_default=True)
@click.option("--patience", type=click.IntRange(min=0), default=FineTuneConfig.patience, show_default=True, help="Epochs without improvement before a phase stops.")
@click.option("--seed", type=click.IntRange(min=0), default=FineTuneConfig.seed, show_default=True)
@click.option("--shots", type=click.IntRange(min=1), default=None,
              help="Train on K labelled images per class, chosen by --seed as fit-head --shots does [default: all].")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last finished epoch.")
@click.option("--val-fraction", type=FRACTION, default=0.1, show_default=True, help="Split made when the data has none.")
@click.option("--test-fraction", type=FRACTION, default=0.2, show_default=True)
@click.option("--split-seed", type=int, default=0, show_default=True)
@click.option("--on-error", type=click.Choice(["skip", "fail"]), default="skip", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print summary.json instead of the table.")
@click.pass_context
@handle_errors
def fine_tune(ctx: click.Context, source: str, out: str, init_head: str | None, resume: bool, val_fraction: float,
              test_fraction: float, split_seed: int, on_error: str, as_json: bool, **kw: Any) -> None:
    """Fine-tune the backbone and a classifier: head first, then the top layers at a low LR.

    Validation loss is checked every epoch; the best weights are kept and restored at the end.
    --batch-size is the training batch (default 32 here); --precision auto trains in fp32 on CPU.
    A from-scratch baseline of the same
    architecture: --no-pretrained --unfreeze all --head-epochs 0 --train-bn --lr 1e-3.

    \b
    Example:
        embedpipe fine-tune data/flowers --init-head heads/flowers-logreg --unfreeze top:2 \\
            --lr 1e-4 --head-lr-mult 10 --layer-decay 0.75 --epochs 20 --patience 3 --out runs/flowers-ft
        embedpipe extract data/flowers --weights runs/flowers-ft/best.safetensors
        embedpipe fine-tune data/flowers --out runs/flowers-ft --resume
    """
    from ..config import FineTuneConfig, SplitConfig
    from ..finetune import fine_tune as run_fine_tune

    batch_size_set = ctx.get_parameter_source("batch_size") != click.core.ParameterSource.DEFAULT
    spec = backbone_spec(kw)
    run = run_config(kw, on_error=on_error)
    cache_dir = kw.pop("cache_dir")
    config = FineTuneConfig(batch_size=run.batch_size if batch_size_set else FineTuneConfig.batch_size, **kw)
    quiet = ctx.obj["quiet"] or as_json

    def show_epoch(record: dict[str, Any]) -> None:
        if not quiet:
            click.echo(f"{record['epoch']:>5}  {record['phase']:<8}  {record['train_loss']:10.4f}  {record['train_acc']:9.3f}  "
                       f"{record['val_loss']:8.4f}  {record['val_acc']:7.3f}  {record['lr']:9.2e}  {record['seconds']:6.1f}"
                       f"{'  *' if record['improved'] else ''}")

    if not quiet:
        click.echo("epoch  phase     train_loss  train_acc  val_loss  val_acc         lr       s")
    result = run_fine_tune(
        source, spec, out=out, config=config, init_head=init_head, resume=resume, cache_dir=cache_dir,
        split=SplitConfig(val_fraction=val_fraction, test_fraction=test_fraction, seed=split_seed), run=run,
        progress=progress_factory(quiet), on_epoch=show_epoch,
    )
    summary = result.summary
    if as_json:
        click.echo(json.dumps(summary, indent=2, default=str))
        return
    best = summary["best"]
    click.echo(f"best epoch {result.best_epoch} ({best.get('phase')}: val_loss {best.get('val_loss', float('nan')):.4f}, "
               f"val_acc {best.get('val_acc', float('nan')):.3f}); stopped after epoch {result.stopped_epoch}: {result.stop_reason}")
    if result.test:
        click.echo(f"test: accuracy {result.test['accuracy']:.3f}, balanced accuracy {result.test['balanced_accuracy']:.3f} "
                   f"on {result.test['n']} images (best weights)")
    memory = ", ".join(f"{phase} {bytes_ / 2**20:.0f} MiB" for phase, bytes_ in result.memory.items())
    click.echo(f"peak memory ({summary['memory_kind']}): {memory}; {result.seconds:.1f} s")
    click.echo(f"best checkpoint: {result.best_checkpoint}")
    if result.head:
        click.echo(f"head: {result.head} (embedpipe predict {result.head} IMAGES)")
    click.echo(f"next: {summary['extract_command']}")


@cli.command("example-data")
@click.argument("name", type=click.Choice(sorted(EXAMPLES)))
@click.argument("dest", type=click.Path(file_okay=False))
@handle_errors
def example_data(name: str, dest: str) -> None:
    """Write a small real labelled dataset that ships in a PyPI package; prints its manifest.

    \b
    Example:
        pip install elpv-dataset
        embedpipe example-data elpv data/elpv && embedpipe extract data/elpv/manifest.csv
    """
    from ..examples import prepare_example

    click.echo(str(prepare_example(name, dest)))


@cli.group()
def cache() -> None:
    """Inspect, verify and clean the embedding cache."""


@cache.command("ls")
@click.option("--cache-dir", type=click.Path(file_okay=False), default="cache", show_default=True)
@click.option("--json", "as_json", is_flag=True)
@handle_errors
def cache_ls(cache_dir: str, as_json: bool) -> None:
    """List exported files and stores.

    \b
    Example:
        embedpipe cache ls --cache-dir cache/
    """
    from ..cache import cache_list

    listing = cache_list(cache_dir)
    if as_json:
        click.echo(json.dumps(listing, indent=2))
        return
    if not listing["exports"] and not listing["stores"]:
        click.echo(f"{cache_dir}: empty")
        return
    for entry in listing["exports"]:
        if "error" in entry:
            click.echo(f"{entry['path']}  ({entry['error']})")
            continue
        dims = ",".join(str(d) for d in (entry["dims"] or {}).values())
        click.echo(f"{entry['path']}  {entry['backbone']}  {entry['rows']} x {dims}  {entry['bytes'] / 2**20:.1f} MiB")
    for entry in listing["stores"]:
        click.echo(
            f"store {entry['key'][:12]}  {entry['backbone']}  {entry['weights'][:24] if entry['weights'] else ''}  "
            f"{entry['rows']} rows  {entry['bytes'] / 2**20:.1f} MiB"
        )


@cache.command("info")
@click.argument("file", type=click.Path())
@click.option("--json", "as_json", is_flag=True)
@handle_errors
def cache_info(file: str, as_json: bool) -> None:
    """Show an exported file's metadata and error ledger.

    \b
    Example:
        embedpipe cache info cache/flowers-tf_efficientnet_lite0-0123456789ab.h5
    """
    from ..cache import cache_info as info

    data = info(file)
    if as_json:
        click.echo(json.dumps(data, indent=2, default=str))
        return
    for key in ("backbone", "weights", "rows", "dims", "outputs", "dtype", "precision", "class_names",
                "split_counts", "split_seed", "preprocess", "dataset", "versions", "cache_key"):
        if key in data:
            value = data[key]
            click.echo(f"{key:14} {json.dumps(value) if not isinstance(value, str) else value}")
    click.echo(f"{'errors':14} {len(data['errors'])}")
    for error in data["errors"]:
        click.echo(f"  {error['path']}: {error['reason']}")


@cache.command("verify")
@click.argument("target", type=click.Path(), default="cache")
@click.option("--files", "check_files", is_flag=True, help="Also re-hash the source images and report changed ones.")
@handle_errors
def cache_verify(target: str, check_files: bool) -> None:
    """Read every byte of an exported file (or a whole cache folder) and check it.

    \b
    Example:
        embedpipe cache verify cache/
    """
    from ..cache import cache_verify as verify

    problems = verify(target, check_files=check_files)
    for problem in problems:
        click.echo(problem)
    if problems:
        sys.exit(1)
    click.echo(f"{target}: ok")


@cache.command("rm")
@click.argument("targets", nargs=-1)
@click.option("--cache-dir", type=click.Path(file_okay=False), default="cache", show_default=True)
@click.option("--all", "everything", is_flag=True, help="Delete the whole cache folder.")
@handle_errors
def cache_rm(targets: tuple[str, ...], cache_dir: str, everything: bool) -> None:
    """Delete exported files, stores (by key prefix or backbone name), or everything.

    \b
    Example:
        embedpipe cache rm cache/flowers-tf_efficientnet_lite0-0123456789ab.h5
        embedpipe cache rm resnet50 --cache-dir cache/
        embedpipe cache rm --all
    """
    from ..cache import cache_remove

    if not targets and not everything:
        raise click.UsageError("name what to remove (a file, a store key or a backbone), or pass --all")
    for removed in cache_remove(list(targets), cache_dir=cache_dir, everything=everything):
        click.echo(f"removed {removed}")


for _command in EXPLORE_COMMANDS:  # neighbors, export, audit, map: in cli/explore.py
    cli.add_command(_command)


def main() -> None:
    from ..allocator import keep_freed_memory

    keep_freed_memory()  # 1.5-1.9x faster CPU forwards; a process-wide choice, so only here (see allocator.py)
    cli(prog_name="embedpipe")


if __name__ == "__main__":
    main()
