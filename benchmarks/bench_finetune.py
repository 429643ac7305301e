"""Linear probe vs fine-tuning vs training from scratch, on a small real dataset with real pretrained weights.

The strategies, all on the same seeded train/val/test subset of ELPV (solar-cell
electroluminescence images, functional vs defective; ``embedpipe example-data elpv``)
and the same backbone (default ``tf_efficientnet_lite0`` with its offline ImageNet weights):

1. ``linear_probe``: ``extract`` (frozen backbone, every image once) + ``fit-head logreg``
   (C chosen on val); time and memory include the extraction.
2. ``finetune_top``: LP-FT: the classifier starts from that probe (``--init-head``), then
   the top ``--top`` layer groups and the classifier train (``--unfreeze top:K``).
3. ``finetune_all``: the same with every layer training (``--unfreeze all``).
4. ``scratch``: the same architecture from random weights (``pretrained=False``), every
   layer and BatchNorm training, at a 10x larger LR, with a fresh head.

Each strategy runs in its own process, so its peak RSS is its own; wall time is
measured inside that process, without interpreter start-up. Rows carry test accuracy,
balanced accuracy, wall seconds, peak memory, the epochs run and why they stopped,
and ratios against the linear probe. The fine-tune rows' time does not include the
probe they start from (its row has it). A failing strategy becomes a row with its
error, and the others still run.

On CPU keep it small (the defaults: 500 images at 112 px, 6 epochs, about 10 minutes on
two cores); on a GPU use ``--images 0 --img-size 224 --epochs 20`` for the whole set.

Output: a table on stdout, and flat JSON records in
``benchmarks/results/finetune-<machine>.json``.

Example::

    python -m embedpipe example-data elpv /tmp/elpv
    python benchmarks/bench_finetune.py /tmp/elpv/manifest.csv
    python benchmarks/bench_finetune.py /tmp/elpv/manifest.csv --images 0 --img-size 224 --epochs 20 --device cuda
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from _harness import machine_info, results_path, write_results

STRATEGIES = ("linear_probe", "finetune_top", "finetune_all", "scratch")


# --------------------------------------------------------------------------- data


def subset_manifest(manifest: Path, images: int, seed: int, fractions: tuple[float, float]) -> Path:
    """A manifest beside ``manifest`` with ``images`` rows per the class shares, and a seeded split column."""
    import numpy as np

    with open(manifest, newline="") as handle:
        rows = list(csv.DictReader(handle))
    rng = np.random.default_rng(seed)
    labels = sorted({r["label"] for r in rows})
    chosen: list[dict[str, str]] = []
    for label in labels:
        members = [r for r in rows if r["label"] == label]
        take = len(members) if images <= 0 else max(6, round(images * len(members) / len(rows)))
        picked = [members[i] for i in rng.permutation(len(members))[:take]]
        n_val, n_test = round(len(picked) * fractions[0]), round(len(picked) * fractions[1])
        for i, row in enumerate(picked):
            split = "val" if i < n_val else "test" if i < n_val + n_test else "train"
            chosen.append({"path": row["path"], "label": label, "split": split})
    out = manifest.with_name(f"bench-{images or 'all'}-s{seed}.csv")
    with open(out, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["path", "label", "split"])
        writer.writeheader()
        writer.writerows(sorted(chosen, key=lambda r: r["path"]))
    return out


# --------------------------------------------------------------------------- one strategy, in its own process


def run_strategy(args: argparse.Namespace) -> dict[str, Any]:
    import embedpipe
    from embedpipe import BackboneSpec, FineTuneConfig, RunConfig
    from embedpipe.machine import PeakMemory

    memory = PeakMemory("cpu")  # read, never reset: this process's peak RSS since it started
    work = Path(args.workdir)
    preprocess = {"input_size": args.img_size}
    run = RunConfig(device=args.device, batch_size=64, num_workers=args.workers)
    pretrained = BackboneSpec(name=args.backbone, preprocess=preprocess, precision=args.precision)
    started = time.perf_counter()
    if args.strategy == "linear_probe":
        exported = embedpipe.extract(args.manifest, pretrained, cache_dir=work / "cache", run=run)
        fitted = embedpipe.fit_head(exported.path, "logreg", out=work / "probe")
        seconds = time.perf_counter() - started
        return {"accuracy": fitted.metrics["test"]["accuracy"], "balanced_accuracy": fitted.metrics["test"]["balanced_accuracy"],
                "val_accuracy": fitted.metrics["val"]["accuracy"], "train_accuracy": fitted.metrics["train"]["accuracy"],
                "wall_seconds": seconds, "peak_memory_bytes": memory.read(), "C": fitted.chosen.get("C"),
                "trainable_params": fitted.head.coef_.size + fitted.head.intercept_.size}
    common = dict(epochs=args.epochs, patience=args.patience, batch_size=args.batch_size, augment=args.augment,
                  seed=args.seed, warmup=1.0, schedule="cosine")
    if args.strategy == "finetune_top":
        spec, init, config = pretrained, work / "probe", FineTuneConfig(unfreeze=f"top:{args.top}", head_epochs=0, lr=args.lr, **common)
    elif args.strategy == "finetune_all":
        spec, init, config = pretrained, work / "probe", FineTuneConfig(unfreeze="all", head_epochs=0, lr=args.lr, **common)
    elif args.strategy == "scratch":
        spec = BackboneSpec(name=args.backbone, pretrained=False, preprocess=preprocess, precision=args.precision)
        init, config = None, FineTuneConfig(unfreeze="all", head_epochs=0, train_bn=True, lr=args.lr * 10, **common)
    else:
        raise ValueError(f"unknown strategy {args.strategy}")
    if init is not None and not (init / "head.json").is_file():
        raise RuntimeError("the linear probe did not save its head (its row has the error)")
    result = embedpipe.fine_tune(args.manifest, spec, out=work / args.strategy, config=config, init_head=init,
                                 cache_dir=work / "cache", run=run)
    seconds = time.perf_counter() - started
    summary = result.summary
    return {
        "accuracy": result.test["accuracy"], "balanced_accuracy": result.test["balanced_accuracy"],
        "val_accuracy": result.val.get("accuracy"), "initial_val_accuracy": summary["initial"]["val_acc"],
        "wall_seconds": seconds, "train_seconds": result.seconds, "peak_memory_bytes": memory.read(),
        "phase_peak_memory_bytes": result.peak_memory_bytes, "best_epoch": result.best_epoch,
        "stopped_epoch": result.stopped_epoch, "stop_reason": result.stop_reason,
        "trainable_params": max(p["trainable_params"] for p in summary["phases"]),
        "seconds_per_epoch": sum(r["seconds"] for r in result.history) / max(1, len(result.history)),
        "lr": config.lr, "unfreeze": config.unfreeze, "train_bn": config.train_bn,
    }


def child(args: argparse.Namespace) -> None:
    try:
        record = {"error": None, **run_strategy(args)}
    except Exception as error:  # a failing strategy becomes a row
        record = {"error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc(limit=3)}
    Path(args.record).write_text(json.dumps(record))


# --------------------------------------------------------------------------- the parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("manifest", type=Path, help="ELPV manifest.csv (embedpipe example-data elpv DEST)")
    parser.add_argument("--backbone", default="tf_efficientnet_lite0")
    parser.add_argument("--images", type=int, default=500, help="stratified subset size (0: all)")
    parser.add_argument("--img-size", type=int, default=112)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--patience", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-4, help="fine-tune LR; scratch uses 10x")
    parser.add_argument("--top", type=int, default=2, help="layer groups the top strategy unfreezes")
    parser.add_argument("--augment", default="standard")
    parser.add_argument("--precision", default="fp32", help="fp32 on CPU: bf16 autocast was not faster for training here")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument("--workdir", default=None, help="default: a temporary folder")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--strategy", help=argparse.SUPPRESS)
    parser.add_argument("--record", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.strategy:
        child(args)
        return

    from embedpipe.machine import resolve_device

    device = resolve_device(args.device)
    info = machine_info(device)
    manifest = subset_manifest(args.manifest.resolve(), args.images, args.seed, (0.15, 0.25))
    with open(manifest) as handle:
        splits = [row["split"] for row in csv.DictReader(handle)]
    sizes = {s: splits.count(s) for s in ("train", "val", "test")}
    setup = {"dataset": "elpv", "images": len(splits), **{f"n_{k}": v for k, v in sizes.items()}, "img_size": args.img_size,
             "backbone": args.backbone, "epochs": args.epochs, "patience": args.patience, "batch_size": args.batch_size,
             "augment": args.augment, "precision": args.precision, "top": args.top, "seed": args.seed}
    print(f"ELPV subset: {len(splits)} images ({sizes}), {args.img_size} px, {args.backbone}, up to {args.epochs} epochs, "
          f"on {info['cpu'] if not info['gpu'] else info['gpu']} ({info['cores']} cores) - a small CPU-sized run", flush=True)
    records: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-finetune-") as tmp:
        workdir = Path(args.workdir or tmp)
        for strategy in args.strategies.split(","):
            record_file = workdir / f"{strategy}.json"
            command = [sys.executable, __file__, str(manifest), "--strategy", strategy, "--record", str(record_file),
                       "--workdir", str(workdir)] + [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                                                    if k in ("backbone", "img_size", "epochs", "patience", "batch_size", "lr",
                                                             "top", "augment", "precision", "device", "seed")
                                                    ] + ([f"--workers={args.workers}"] if args.workers is not None else [])
            started = time.perf_counter()
            done = subprocess.run(command, capture_output=True, text=True)
            try:
                values = json.loads(record_file.read_text())
            except (OSError, ValueError):
                values = {"error": f"exit {done.returncode}: {done.stderr.strip().splitlines()[-1:] or ''}"}
            record = {**info, **setup, "strategy": strategy, "process_seconds": time.perf_counter() - started, **values}
            records.append(record)
            shown = f"{record['error']}" if record.get("error") else (
                f"acc {record['accuracy']:.3f}  bal {record['balanced_accuracy']:.3f}  {record['wall_seconds']:.0f} s  "
                f"{record['peak_memory_bytes'] / 2**20:.0f} MiB")
            print(f"{strategy:<13} {shown}", flush=True)
    probe = next((r for r in records if r["strategy"] == "linear_probe" and not r.get("error")), None)
    if probe:
        for record in records:
            if record.get("error"):
                continue
            record["accuracy_minus_probe"] = record["accuracy"] - probe["accuracy"]
            record["time_vs_probe"] = record["wall_seconds"] / probe["wall_seconds"]
            record["memory_vs_probe"] = record["peak_memory_bytes"] / probe["peak_memory_bytes"]
    print()
    print("| strategy | test acc | balanced acc | Δ acc vs probe | wall s | time × probe | peak RSS MiB | memory × probe | epochs (best/stopped, why) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in records:
        if r.get("error"):
            print(f"| {r['strategy']} | error: {r['error']} |||||||")
            continue
        epochs = f"{r['best_epoch']}/{r['stopped_epoch']}, {r['stop_reason']}" if "best_epoch" in r else "-"
        print(f"| {r['strategy']} | {r['accuracy']:.3f} | {r['balanced_accuracy']:.3f} | {r.get('accuracy_minus_probe', 0):+.3f} | "
              f"{r['wall_seconds']:.0f} | {r.get('time_vs_probe', float('nan')):.1f} | {r['peak_memory_bytes'] / 2**20:.0f} | "
              f"{r.get('memory_vs_probe', float('nan')):.2f} | {epochs} |")
    write_results(results_path("finetune", info, out=args.out), records)


if __name__ == "__main__":
    main()
