"""The fine-tune stage: labelled images -> splits -> the network and its head prepared -> the loop -> the run folder.

>>> result = fine_tune("data/flowers", "tf_efficientnet_lite0", out="runs/flowers", config=FineTuneConfig(unfreeze="top:2"))
>>> result.best_checkpoint      # embedpipe extract --weights runs/flowers/best.safetensors
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .._progress import ProgressFactory, no_progress
from ..cache import FileIndex
from ..config import OUTPUT_EMBEDDING, BackboneSpec, EmbeddingConfig, FineTuneConfig, PreprocessConfig, RunConfig, SplitConfig, canonical_json
from ..data import Dataset, load_dataset
from ..errors import DataError, FineTuneError, HeadError
from ..extraction import as_spec, dataset_fingerprint, ensure_folder, resolve
from ..heads import HeadInfo, few_shot_indices, load_head, save_head
from ..machine import CUDA_PEAK, RSS_PEAK, resolve_device, versions
from .loop import Outcome, Split, Splits, Trainer
from .recipe import check_config, head_from_classifier, linear_from_probe
from .rundir import BEST_FILE, CONFIG_FILE, CURVES_FILE, HEAD_DIR, SUMMARY_FILE, check_out_folder, plot_curves, write_json

logger = logging.getLogger(__name__)


@dataclass
class FineTuneResult:
    """What :func:`fine_tune` did; everything is also in ``out/summary.json``."""

    out: Path  # the run folder
    best_checkpoint: Path  # out/best.safetensors: timm key names, for `extract --weights`
    head: Path | None  # out/head: the trained classifier as a saved head (for `predict`)
    best_epoch: int  # 0: the starting weights were never beaten
    stopped_epoch: int
    stop_reason: str  # max_epochs, patience or non_finite_loss
    history: list[dict[str, Any]]  # one record per epoch, as in metrics.jsonl
    test: dict[str, Any] | None  # metrics of the best weights on the test split (None without one)
    val: dict[str, Any]
    peak_memory_bytes: int
    memory: dict[str, int]  # phase (head, finetune) -> peak bytes (CUDA allocated, or process RSS on CPU)
    seconds: float
    summary: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return self.summary


def fine_tune(
    source: str | Path,
    backbone: str | BackboneSpec = BackboneSpec(),
    *,
    out: str | Path,
    config: FineTuneConfig = FineTuneConfig(),
    init_head: str | Path | None = None,
    resume: bool = False,
    cache_dir: str | Path = "cache",
    split: SplitConfig | None = None,
    run: RunConfig = RunConfig(),
    progress: ProgressFactory = no_progress,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
) -> FineTuneResult:
    """Fine-tune a backbone and a linear classifier on a labelled dataset, with early stopping on val.

    A from-scratch baseline of the same architecture: ``BackboneSpec(name, pretrained=False)`` with
    ``FineTuneConfig(unfreeze="all", head_epochs=0, train_bn=True, lr=1e-3)``.

    Args:
        source: folder tree or CSV manifest with labels (as for :func:`embedpipe.extract`); needs a val split
            (a seeded one is made when the data has none).
        backbone: a timm model name or a :class:`BackboneSpec` (weights, preprocessing, precision).
        out: the run folder (:mod:`embedpipe.finetune.rundir`).
        config: how to train (:class:`~embedpipe.config.FineTuneConfig`).
        init_head: a logreg head saved by :func:`embedpipe.fit_head` on this backbone's embeddings of this
            data's classes; its linear map (standardisation folded in) starts the classifier.
        resume: continue the run in ``out`` from its last finished epoch.
        cache_dir: the cache folder (its file-hash index fingerprints the data for ``resume``).
        split: how to split labelled data that comes without a split.
        run: device, evaluation batch size, workers, channels_last, error policy.
        progress: progress bar factory, one bar per epoch.
        on_epoch: called with each epoch's record as it finishes.

    Raises:
        FineTuneError: bad options, no val split, a foreign run in ``out``.
        HeadError: ``init_head`` made for another backbone, preprocessing or classes.
    """
    started = time.perf_counter()
    check_config(config)
    out = Path(out)
    check_out_folder(out, resume=resume)
    dataset = load_dataset(source, split=split)
    splits = _splits(dataset, config, source)
    device = resolve_device(run.device)
    spec = as_spec(backbone)
    embedding = resolve(spec, device)
    digests = FileIndex(ensure_folder(Path(cache_dir))).digests([r.path for r in dataset.records])
    classes = list(dataset.class_names)
    init, head_info = _probe_init(init_head, embedding, classes) if init_head is not None else (None, None)
    identity = {"config": config.to_dict(), "backbone": spec.to_dict(), "embedding_key": embedding.key(),  # what --resume checks
                "data": dataset_fingerprint(dataset, digests, embedding), "classes": classes,
                "init_head": head_info.get("cache_key") if head_info else None}
    model = prepare_network(spec, len(classes), init=init, seed=config.seed, device=device, channels_last=run.channels_last,
                            init_source=init_head)
    out.mkdir(parents=True, exist_ok=True)
    if not resume:  # what the run started with; a resumed run keeps its own
        write_json(out / CONFIG_FILE, {
            "fine_tune": config.to_dict(), "backbone": spec.to_dict(), "embedding_config": embedding.to_dict(),
            "source": str(Path(source).resolve()), "split": dataset.describe(), "classes": classes,
            "init_head": str(Path(init_head).resolve()) if init_head else None, "device": device, "versions": versions()})
    # auto trains in fp32 on CPU: bf16 autocast, 2x faster for inference there, made a training step of
    # tf_efficientnet_lite0 1.3-2x slower than fp32 on 2 Xeon cores (its backward kernels).
    precision = "fp32" if spec.precision == "auto" and device == "cpu" else embedding.precision
    trainer = Trainer(model, splits=splits, preprocess=embedding.preprocess, precision=precision, device=device, config=config,
                      run=run, out=out, identity=identity, progress=progress, on_epoch=on_epoch,
                      # A logreg head is refit on train + val, so its val score at epoch 0 is in-sample:
                      # the best checkpoint is chosen among the fine-tuned epochs.
                      initial_is_candidate=init is None)
    outcome = trainer.run(resume=resume)
    head_path = _save_head(out, outcome, spec, embedding, device, classes)
    summary = _summary(outcome, out=out, head_path=head_path, splits=splits, device=device, precision=precision, config=config,
                       spec=spec, embedding=embedding, init_head=init_head, source=source, started=started)
    write_json(out / SUMMARY_FILE, summary)
    plot_curves(outcome.history, outcome.best.get("epoch", 0), out / CURVES_FILE, initial=outcome.initial,
                stop_reason=outcome.stop_reason)
    return FineTuneResult(out=out, best_checkpoint=out / BEST_FILE, head=head_path, best_epoch=summary["best_epoch"],
                          stopped_epoch=outcome.stopped_epoch, stop_reason=outcome.stop_reason, history=outcome.history,
                          test=outcome.test, val=outcome.val, peak_memory_bytes=summary["peak_memory_bytes"],
                          memory=outcome.memory, seconds=outcome.seconds, summary=summary)


def _splits(dataset: Dataset, config: FineTuneConfig, source: str | Path) -> Splits:
    """The dataset's train (few-shot when ``config.shots``), val and test images; train and val must not be empty."""
    if dataset.reader is not None:
        raise DataError(f"{source} is a {dataset.layout} source: fine-tuning reads image files; pass a folder or a "
                        "manifest of local files (embedpipe extract reads every input kind)")
    if not dataset.labelled:
        raise FineTuneError(f"{source} holds unlabelled images: fine-tune needs class folders or a manifest with labels")
    parts = {name: Split(tuple(str(r.path) for r in dataset.records if r.split == name),
                         tuple(r.label for r in dataset.records if r.split == name)) for name in ("train", "val", "test")}
    if config.shots is not None:  # the few-shot rows fit-head --shots and the bench choose, same seed
        if config.shots < 1:
            raise FineTuneError(f"--shots {config.shots}: give a positive number of images per class")
        train_part = parts["train"]
        keep = few_shot_indices(np.asarray(train_part.labels), config.shots, seed=config.seed)
        parts["train"] = Split(tuple(train_part.paths[i] for i in keep), tuple(train_part.labels[i] for i in keep))
    if not len(parts["train"]) or not len(parts["val"]):
        raise FineTuneError(
            f"{source} has {len(parts['train'])} train and {len(parts['val'])} val images: fine-tune needs both "
            "(add a val/ folder or split column, or raise --val-fraction for a seeded split)"
        )
    return Splits(train=parts["train"], val=parts["val"], test=parts["test"], class_names=tuple(dataset.class_names))


def _probe_init(init_head: str | Path, embedding: EmbeddingConfig, classes: list[str]) -> tuple[tuple[np.ndarray, np.ndarray], dict[str, Any]]:
    """``--init-head``: the probe's linear map on raw embeddings, after checking it was fitted on these features."""
    probe, head_info = load_head(init_head)
    theirs = head_info.get("embedding_config") or {}
    ours = embedding.to_dict()
    differs = [k for k in ("backbone", "weights", "preprocess") if canonical_json(theirs.get(k)) != canonical_json(ours[k])]
    if differs:
        raise HeadError(
            f"{init_head} was fitted on embeddings of another backbone or preprocessing (differs in: {', '.join(differs)}; "
            f"head: {theirs.get('backbone')} {str(theirs.get('weights', ''))[:20]}): fit a head on this backbone's "
            "embeddings (embedpipe extract + fit-head with the same backbone options), or drop --init-head"
        )
    if head_info.get("kind") != "logreg" or head_info.get("output", "embeddings") != "embeddings":
        raise HeadError(f"{init_head} is a {head_info.get('kind')} head on {head_info.get('output')}: "
                        "--init-head takes a logreg head fitted on embeddings (embedpipe fit-head --head logreg)")
    try:
        return linear_from_probe(probe, classes), head_info
    except FineTuneError as error:
        raise HeadError(f"{init_head}: {error}") from None


def prepare_network(spec: BackboneSpec, num_classes: int, *, init: tuple[np.ndarray, np.ndarray] | None, seed: int,
                    device: str, channels_last: bool, init_source: str | Path | None = None) -> Any:
    """The backbone with a fresh ``num_classes`` classifier (seeded), or the probe's ``(W, b)`` in it, on ``device``.

    The one place the network is edited before training: the classifier, the device, the memory format.
    """
    import torch

    from ..backbone import load_backbone

    model = load_backbone(spec.name, weights=spec.weights, pretrained=spec.pretrained)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model.reset_classifier(num_classes)
    if init is not None:
        classifier = model.get_classifier()
        if tuple(classifier.weight.shape) != init[0].shape:
            raise HeadError(f"{init_source} maps {init[0].shape[1]} features, {spec.name}'s classifier takes "
                            f"{classifier.weight.shape[1]}: fit the head on this backbone's embeddings")
        with torch.no_grad():
            classifier.weight.copy_(torch.from_numpy(init[0]))
            classifier.bias.copy_(torch.from_numpy(init[1]))
    model = model.to(device)
    return model.to(memory_format=torch.channels_last) if channels_last else model


def _save_head(out: Path, outcome: Outcome, spec: BackboneSpec, embedding: EmbeddingConfig, device: str,
               classes: list[str]) -> Path | None:
    """The trained classifier on the fine-tuned backbone's embeddings, as a saved head (None when it is not one linear map)."""
    best = out / BEST_FILE
    head_spec = BackboneSpec(name=spec.name, weights=str(best.resolve()), pretrained=True, outputs=(OUTPUT_EMBEDDING,),
                             precision=embedding.precision, dtype=spec.dtype, preprocess=embedding.preprocess.to_dict())
    head_embedding = resolve(head_spec, device)
    head_path = out / HEAD_DIR
    try:
        weight, bias = outcome.classifier
        head = head_from_classifier(weight, bias, classes)
    except (ValueError, TypeError) as error:  # a classifier that is not one linear map
        logger.warning("no head file written (%s)", error)
        return None
    save_head(head_path, head, HeadInfo(
        kind="logreg", output="embeddings", backbone_spec=head_spec.to_dict(), embedding_config=head_embedding.to_dict(),
        cache_key=head_embedding.key(), class_names=classes,
        trained_on={"fine_tune": str(out.resolve()), "best_epoch": outcome.best.get("epoch")},
        metrics={k: v for k, v in (("val", outcome.val), ("test", outcome.test)) if v}, fit_seconds=outcome.seconds,
    ))
    return head_path


def _preprocess_flags(preprocess: PreprocessConfig) -> list[str]:
    """CLI flags that pin a PreprocessConfig, for the printed extract command."""
    _, h, w = preprocess.input_size
    flags = ["--img-size", str(h)] if h == w else []
    flags += ["--crop-pct", f"{preprocess.crop_pct:g}", "--interpolation", preprocess.interpolation,
              "--mean", ",".join(f"{v:g}" for v in preprocess.mean), "--std", ",".join(f"{v:g}" for v in preprocess.std)]
    return flags


def _extract_command(source: str | Path, spec: BackboneSpec, embedding: EmbeddingConfig, best: Path, device: str) -> str:
    """The ``embedpipe extract`` command that embeds data with the fine-tuned weights and this run's preprocessing."""
    plain = resolve(BackboneSpec(name=spec.name, weights=str(best), preprocess=spec.preprocess, precision=spec.precision), device)
    command = ["embedpipe", "extract", str(source), "--backbone", spec.name, "--weights", str(best)]
    if plain.preprocess != embedding.preprocess:
        command += _preprocess_flags(embedding.preprocess)
    elif spec.preprocess.get("input_size"):
        command += ["--img-size", str(spec.preprocess["input_size"])]
    return " ".join(command)


def _summary(outcome: Outcome, *, out: Path, head_path: Path | None, splits: Splits, device: str, precision: str,
             config: FineTuneConfig, spec: BackboneSpec, embedding: EmbeddingConfig, init_head: str | Path | None,
             source: str | Path, started: float) -> dict[str, Any]:
    """``summary.json``: what the run did, what it cost and how to use its weights."""
    best = out / BEST_FILE
    return {
        "best_epoch": outcome.best.get("epoch"),
        "best_phase": outcome.best.get("phase"),
        "stopped_epoch": outcome.stopped_epoch,
        "stop_reason": outcome.stop_reason,
        "best_checkpoint": str(best),
        "head": str(head_path) if head_path else None,
        "monitor": config.monitor,
        "best": outcome.best,
        "initial": outcome.initial,
        "val": outcome.val,
        "test": outcome.test,
        "phases": outcome.phases,
        "peak_memory_bytes": max(outcome.memory.values(), default=0),
        "memory": outcome.memory,
        "memory_kind": CUDA_PEAK if device.startswith("cuda") else RSS_PEAK,
        "seconds": outcome.seconds,
        "wall_seconds_this_call": time.perf_counter() - started,
        "n_train": len(splits.train), "n_val": len(splits.val), "n_test": len(splits.test),
        "skipped": [{"path": p, "reason": r} for p, r in outcome.skipped],
        "device": device,
        "precision": precision,
        "config": config.to_dict(),
        "backbone": spec.to_dict(),
        "embedding_config": embedding.to_dict(),
        "init_head": str(init_head) if init_head else None,
        "extract_command": _extract_command(source, spec, embedding, best, device),
        "versions": versions(),
    }
