"""The fine-tuning loop: the one place besides :mod:`embedpipe.inference` that runs the network.

The recipe it follows (phases, layer groups, learning rates) is :mod:`.recipe`; the files it
writes are :mod:`.rundir`; :mod:`.stage` prepares the network and head and calls :meth:`Trainer.run`.

What trains is resolved from the timm model's own structure: its
``group_matcher(coarse=False)`` numbers the parameters bottom to top in layer
groups (stem, each block, the neck), the same numbering timm's
``param_groups_layer_decay`` uses, and the classifier is the module the
model's ``pretrained_cfg["classifier"]`` names. ``--unfreeze top:K`` trains the
top K layer groups (plus any neck that shares the classifier's group, as
ConvNeXt's ``head.norm`` does).

A run has up to two phases: ``head`` (backbone frozen, only the classifier
trains) and ``finetune`` (the chosen layer groups too). Each phase has its own
AdamW optimizer and LR schedule (linear warmup, then constant, step,
exponential or cosine decay); the validation split is scored after every epoch,
the best weights are checkpointed whenever the monitored value improves, a phase
stops after ``patience`` epochs without improvement, the second phase starts
from the best weights of the first, and the run ends on the best weights of both.

Everything written under the run folder is atomic (temporary file, fsync,
``os.replace``), so a run killed at any moment leaves the previous checkpoint
loadable; ``last.safetensors`` holds the model, the optimizer and, in its
header, the JSON state, so ``resume`` continues from the last finished epoch.
Randomness (shuffling, augmentation, dropout) is reseeded from ``(seed, epoch)``
at the start of every epoch, so a resumed run repeats the epochs it lost exactly.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .._atomic import jsonable
from ..config import FineTuneConfig, PreprocessConfig, RunConfig
from ..errors import FineTuneError, ImageDecodeError
from ..inference import _AUTOCAST_DTYPES, DECODE_ERRORS, default_batch_size, default_workers
from ..machine import PeakMemory
from ..preprocess import decode_image, eval_transform, normalize, resize_target
from .recipe import layer_groups, lr_factor, param_groups, plan_phases, set_lr, set_train_mode, set_trainable
from .rundir import (BEST_FILE, LAST_FILE, STATE_FORMAT, STATE_VERSION, check_run_state, check_state_dict, is_best_record, load_tensors,
                     save_tensors, write_metrics)

logger = logging.getLogger(__name__)

# Augmentations, as timm's create_transform(is_training=True) arguments. Crops keep at least half
# (standard) or a quarter (strong) of the image, so a small object or defect rarely leaves the frame.
_AUGMENT_ARGS: dict[str, dict[str, Any]] = {
    "standard": {"scale": (0.5, 1.0), "hflip": 0.5, "color_jitter": None},
    # RandAugment (2 ops at magnitude 7: colour, contrast, rotation, shear, translation...); timm
    # applies it instead of a separate colour jitter.
    "strong": {"scale": (0.25, 1.0), "hflip": 0.5, "auto_augment": "rand-m7-mstd0.5-inc1"},
}


@dataclass(frozen=True)
class Split:
    """Image files and their class indices."""

    paths: tuple[str, ...]
    labels: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.paths)


@dataclass(frozen=True)
class Splits:
    train: Split
    val: Split
    test: Split
    class_names: tuple[str, ...]


class LabelledImages(torch.utils.data.Dataset):
    """Decodes (strictly) and transforms one image; a bad file yields its error, not a neighbour."""

    def __init__(self, split: Split, transform: Callable[[Any], Any], preprocess: PreprocessConfig) -> None:
        self.split = split
        self.transform = transform
        self.draft_to = resize_target(preprocess) if preprocess.jpeg_draft else None
        self.blank = torch.zeros(preprocess.input_size, dtype=torch.uint8)

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor, int, str]:
        label = self.split.labels[index]
        try:
            image = decode_image(self.split.paths[index], draft_to=self.draft_to)
            return index, self.transform(image), label, ""
        except DECODE_ERRORS as error:
            return index, self.blank, label, f"{type(error).__name__}: {error}".strip()


def train_transform(preprocess: PreprocessConfig, augment: str) -> Callable[[Any], Any]:
    """timm's training transform for ``augment`` up to a uint8 tensor; ``none`` is the eval transform."""
    if augment == "none":
        return eval_transform(preprocess)
    from .._compat import ensure_torchvision_importable

    ensure_torchvision_importable()
    from timm.data import create_transform

    return create_transform(
        input_size=preprocess.input_size,
        is_training=True,
        interpolation=preprocess.interpolation,
        mean=preprocess.mean,
        std=preprocess.std,
        use_prefetcher=True,  # uint8 out; normalised on the device, as in extraction
        **_AUGMENT_ARGS[augment],
    )


@dataclass
class Outcome:
    """What :meth:`Trainer.run` did; :func:`embedpipe.finetune.fine_tune` turns it into the summary."""

    history: list[dict[str, Any]]
    initial: dict[str, float]  # val_loss, val_acc of the starting weights (epoch 0)
    best: dict[str, Any]  # epoch, phase, val_loss, val_acc
    stopped_epoch: int
    stop_reason: str  # max_epochs, patience or non_finite_loss (of the last phase)
    phases: list[dict[str, Any]]  # per phase: name, epochs run, stop_reason, trainable params, peak memory
    memory: dict[str, int]  # phase -> peak bytes
    test: dict[str, Any] | None  # metrics of the best weights on the test split
    val: dict[str, Any]  # metrics of the best weights on the val split
    skipped: list[tuple[str, str]] = field(default_factory=list)  # undecodable images (path, reason)
    seconds: float = 0.0
    classifier: tuple[np.ndarray, np.ndarray] | None = None  # best (W, b), for the head file


def _seed_everything(seed: int, epoch: int) -> torch.Generator:
    mixed = (seed * 1_000_003 + epoch) % (2**31)
    random.seed(mixed)
    np.random.seed(mixed)
    torch.manual_seed(mixed)
    return torch.Generator().manual_seed(mixed)


class Trainer:
    """One fine-tune run: phases, epochs, checkpoints. Build with everything resolved, then :meth:`run`.

    ``model`` is a timm classifier with ``len(splits.class_names)`` outputs; it trains into the run folder ``out``.

    Args:
        model: on ``device``, in its memory format; its classifier already initialised (fresh or from a probe).
        splits: train (to fit), val (to monitor, required) and test (scored once, at the end) images.
        preprocess: the backbone's eval preprocessing; training augments from it.
        precision: resolved compute precision: fp32, bf16 (autocast) or fp16 (autocast + grad scaler).
        device: where the model is.
        config: the checked recipe (:func:`embedpipe.finetune.recipe.check_config`).
        run: workers, evaluation batch size, channels_last inputs, error policy.
        out: the run folder (:mod:`embedpipe.finetune.rundir`).
        identity: JSON-able description of the run (config, backbone, data); ``resume`` refuses another.
        progress: progress bar factory, one bar per epoch.
        on_epoch: called with each epoch's record as it finishes.
        initial_is_candidate: whether the starting weights (epoch 0) may be the best checkpoint. False
            for a classifier from a probe that was refit on train + val: its val score is in-sample.

    :meth:`run` returns an :class:`Outcome`; the model then holds the best weights.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        splits: Splits,
        preprocess: PreprocessConfig,
        precision: str,
        device: str,
        config: FineTuneConfig,
        run: RunConfig,
        out: Path,
        identity: dict[str, Any],
        progress: Callable[[str, int], Any],
        on_epoch: Callable[[dict[str, Any]], None] | None = None,
        initial_is_candidate: bool = True,
    ) -> None:
        self.model, self.splits, self.preprocess = model, splits, preprocess
        self.initial_is_candidate = initial_is_candidate
        self.device, self.config, self.run_config, self.out = device, config, run, out
        # What must match on --resume (config, backbone, data), as JSON reads it back (tuples -> lists).
        self.identity = json.loads(json.dumps(identity, default=jsonable))
        self.progress, self.on_epoch = progress, on_epoch
        self.layers = layer_groups(model)
        self.phases = plan_phases(config)
        self.autocast = _AUTOCAST_DTYPES.get(precision)
        self.device_type = device.split(":")[0]
        self.memory_format = torch.channels_last if run.channels_last else torch.contiguous_format
        self.scaler = torch.amp.GradScaler(self.device_type, enabled=precision == "fp16")
        self.workers = default_workers(device) if run.num_workers is None else run.num_workers
        self.train_data = LabelledImages(splits.train, train_transform(preprocess, config.augment), preprocess)
        eval_tf = eval_transform(preprocess)
        self.val_data = LabelledImages(splits.val, eval_tf, preprocess)
        self.test_data = LabelledImages(splits.test, eval_tf, preprocess)
        self.skipped: dict[str, str] = {}
        # Mutable run state, all of it in last.safetensors.
        self.history: list[dict[str, Any]] = []
        self.initial: dict[str, float] = {}
        self.best: dict[str, Any] = {}
        self.phase_index = 0
        self.phase_epoch = 0
        self.phase_finished = False
        self.bad_epochs = 0
        self.step = 0
        self.memory: dict[str, int] = {}  # phase -> peak bytes, of self.peak's kind
        self.peak = PeakMemory(device)
        self.phase_log: list[dict[str, Any]] = []
        self.elapsed = 0.0
        self.optimizer: torch.optim.Optimizer | None = None

    # ----------------------------------------------------------------- data passes

    def _loader(self, data: LabelledImages, *, shuffle: bool, generator: torch.Generator | None = None, batch: int) -> Any:
        return torch.utils.data.DataLoader(
            data, batch_size=batch, shuffle=shuffle, generator=generator, num_workers=min(self.workers, math.ceil(len(data) / batch)),
            pin_memory=self.device_type == "cuda", persistent_workers=False,
        )

    def _batches(self, loader: Any, split: Split) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for rows, images, labels, reasons in loader:
            ok = torch.tensor([not r for r in reasons], dtype=torch.bool)
            for row, reason in zip(rows.tolist(), reasons):
                if reason:
                    if self.run_config.on_error == "fail":
                        raise ImageDecodeError(f"{split.paths[row]}: {reason}: fix or remove the file, or pass --on-error skip")
                    if split.paths[row] not in self.skipped:
                        logger.warning("skipped %s: %s", split.paths[row], reason)
                    self.skipped[split.paths[row]] = reason
            if not bool(ok.any()):
                continue
            if not bool(ok.all()):
                images, labels = images[ok], labels[ok]
            x = images.to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format)
            yield normalize(x, self.preprocess), labels.to(self.device)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.device_type, dtype=self.autocast) if self.autocast else contextlib.nullcontext():
            return self.model(x).float()

    def evaluate(self, data: LabelledImages) -> tuple[float, float, np.ndarray, np.ndarray]:
        """Mean cross-entropy, accuracy, ``(N, C)`` probabilities and ``(N,)`` labels of a split, in inference mode."""
        self.model.eval()
        losses, probas, labels = 0.0, [], []
        with torch.inference_mode():
            batch = self.run_config.batch_size or default_batch_size(self.device)  # evaluation: the extract batch
            for x, y in self._batches(self._loader(data, shuffle=False, batch=batch), data.split):
                logits = self._forward(x)
                losses += float(F.cross_entropy(logits, y, reduction="sum"))
                probas.append(torch.softmax(logits, dim=1).cpu().numpy())
                labels.append(y.cpu().numpy())
        if not labels:
            return float("nan"), float("nan"), np.empty((0, len(self.splits.class_names))), np.empty(0, dtype=np.int64)
        proba, y_all = np.concatenate(probas), np.concatenate(labels)
        return losses / len(y_all), float(np.mean(proba.argmax(1) == y_all)), proba, y_all

    def _train_epoch(self, epoch: int, length: int) -> tuple[float, float, float]:
        config, optimizer = self.config, self.optimizer
        assert optimizer is not None
        generator = _seed_everything(config.seed, epoch)
        set_train_mode(self.model, train_bn=config.train_bn)
        loader = self._loader(self.train_data, shuffle=True, generator=generator, batch=config.batch_size)
        steps_per_epoch = max(1, math.ceil(len(loader) / config.accum_steps))
        per_step = config.schedule_unit == "step"
        units, total = (steps_per_epoch, length * steps_per_epoch) if per_step else (1, length)

        def step() -> float:
            unit = self.step if per_step else self.phase_epoch - 1
            lr = config.lr * lr_factor(config, unit, total, units)
            set_lr(optimizer, lr)
            self.scaler.step(optimizer)
            self.scaler.update()
            optimizer.zero_grad(set_to_none=True)
            self.step += 1
            return lr

        # Per-batch loss and hits stay on the device until the epoch ends: no host sync per batch.
        losses: list[torch.Tensor] = []
        hits: list[torch.Tensor] = []
        sizes: list[int] = []
        lr, pending = config.lr, 0
        with self.progress(f"epoch {epoch} ({self.phases[self.phase_index][0]})", len(self.train_data)) as advance:
            for x, y in self._batches(loader, self.train_data.split):
                logits = self._forward(x)
                loss = F.cross_entropy(logits, y)
                self.scaler.scale(loss / config.accum_steps).backward()
                pending += 1
                losses.append(loss.detach())
                hits.append((logits.detach().argmax(1) == y).sum())
                sizes.append(len(y))
                advance(len(y))
                if pending == config.accum_steps:
                    lr, pending = step(), 0
            if pending:  # the epoch's last, shorter accumulation
                lr = step()
        seen = sum(sizes)
        if not seen:
            raise FineTuneError("no training image could be decoded: check the dataset (embedpipe cache info lists bad files)")
        loss_sum = sum(value * n for value, n in zip(torch.stack(losses).tolist(), sizes))
        return loss_sum / seen, sum(torch.stack(hits).tolist()) / seen, lr

    # ----------------------------------------------------------------- checkpoints

    def _is_better(self, val_loss: float, val_acc: float) -> bool:
        if not self.best:
            return True
        if self.config.monitor == "val_acc":
            return val_acc > self.best["val_acc"] + self.config.min_delta
        return val_loss < self.best["val_loss"] - self.config.min_delta

    def _save_best(self, epoch: int, phase: str, val_loss: float, val_acc: float) -> None:
        self.best = {"epoch": epoch, "phase": phase, "val_loss": val_loss, "val_acc": val_acc}
        save_tensors(self.out / BEST_FILE, self.model.state_dict(), {
            "format": f"{STATE_FORMAT}-best", "best": self.best, "identity": self.identity,
        })

    def _restore_best(self) -> None:
        tensors, _ = load_tensors(self.out / BEST_FILE)
        check_state_dict(tensors, self.model.state_dict(), self.out / BEST_FILE)
        self.model.load_state_dict(tensors, strict=True)

    def _save_last(self) -> None:
        assert self.optimizer is not None
        tensors = {f"model/{k}": v for k, v in self.model.state_dict().items()}
        optim = self.optimizer.state_dict()
        optim_meta: dict[str, dict[str, Any]] = {}
        for index, state in optim["state"].items():
            for key, value in state.items():
                if isinstance(value, torch.Tensor):
                    tensors[f"optim/{index}/{key}"] = value
                else:
                    optim_meta.setdefault(str(index), {})[key] = value
        save_tensors(self.out / LAST_FILE, tensors, {
            "format": STATE_FORMAT,
            "format_version": STATE_VERSION,
            "identity": self.identity,
            "state": {
                "history": self.history, "initial": self.initial, "best": self.best,
                "phase_index": self.phase_index, "phase_epoch": self.phase_epoch,
                "phase_finished": self.phase_finished, "bad_epochs": self.bad_epochs, "step": self.step,
                "memory": self.memory, "phase_log": self.phase_log, "elapsed": self.elapsed,
                "skipped": self.skipped,
            },
            "optimizer": {"param_groups": optim["param_groups"], "state": optim_meta},
            "scaler": self.scaler.state_dict(),
        })

    def _load_last(self) -> dict[str, Any]:
        tensors, meta = load_tensors(self.out / LAST_FILE)
        if meta.get("format") != STATE_FORMAT or meta.get("format_version") != STATE_VERSION:
            raise FineTuneError(
                f"{self.out / LAST_FILE} is not a run state this embedpipe reads "
                f"(format {meta.get('format')} {meta.get('format_version')}): start a new run with another --out"
            )
        check_run_state(meta, self.out / LAST_FILE, phases=len(self.phases))
        theirs = meta["identity"]
        differs = [k for k in self.identity if theirs.get(k) != self.identity[k]]
        if differs:
            raise FineTuneError(
                f"the run in {self.out} was started with other {', '.join(differs)}: "
                "resume with the same options and data, or start a new run with another --out"
            )
        weights = {k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")}
        check_state_dict(weights, self.model.state_dict(), self.out / LAST_FILE)
        self.model.load_state_dict(weights, strict=True)
        state = meta["state"]
        self.history, self.initial, self.best = state["history"], state["initial"], state["best"]
        self.phase_index, self.phase_epoch = state["phase_index"], state["phase_epoch"]
        self.phase_finished, self.bad_epochs, self.step = state["phase_finished"], state["bad_epochs"], state["step"]
        self.memory, self.phase_log, self.elapsed = state["memory"], state["phase_log"], state["elapsed"]
        self.skipped = dict(state.get("skipped", {}))
        # A kill between writing best.safetensors and last.safetensors leaves a newer best: adopt it.
        _, best_meta = load_tensors(self.out / BEST_FILE)
        newer = best_meta.get("best")
        if is_best_record(newer) and newer and newer.get("epoch", 0) > self.best.get("epoch", 0):
            self.best = newer
        meta["tensors"] = {k: v for k, v in tensors.items() if k.startswith("optim/")}
        return meta

    def _build_optimizer(self, saved: dict[str, Any] | None = None) -> None:
        name = self.phases[self.phase_index][0]
        trainable = set(self.layers.classifier)
        if name == "finetune":
            trainable |= self.layers.unfrozen(self.config.unfreeze)
        set_trainable(self.model, trainable)
        self.optimizer = torch.optim.AdamW(param_groups(self.model, self.layers, self.config), lr=self.config.lr)
        if saved is not None:
            state: dict[int, dict[str, Any]] = {}
            params = [p for group in self.optimizer.param_groups for p in group["params"]]
            where = self.out / LAST_FILE
            for key, tensor in saved["tensors"].items():
                _, index, field_name = (key.split("/", 2) + ["", ""])[:3]
                if not index.isdigit() or int(index) >= len(params) or (
                        tensor.dim() and tensor.shape != params[int(index)].shape):
                    raise FineTuneError(f"{where} holds optimizer tensor {key} {tuple(tensor.shape)}, which fits no "
                                        "trainable parameter: start a new run with another --out")
                state.setdefault(int(index), {})[field_name] = tensor
            for index, values in saved["optimizer"]["state"].items():
                state.setdefault(int(index), {}).update(values)
            try:
                self.optimizer.load_state_dict({"state": state, "param_groups": saved["optimizer"]["param_groups"]})
                if saved["scaler"]:
                    self.scaler.load_state_dict(saved["scaler"])
            except (KeyError, TypeError, ValueError, RuntimeError) as error:
                raise FineTuneError(f"{where} holds an optimizer state this run cannot take ({type(error).__name__}: "
                                    f"{str(error).splitlines()[0] if str(error) else ''}): start a new run with another --out") from None

    # ----------------------------------------------------------------- the run

    def run(self, *, resume: bool = False) -> Outcome:
        """Train, or continue the run in ``out`` from its last finished epoch with ``resume``."""
        started = time.perf_counter()
        saved: dict[str, Any] | None = None
        self.out.mkdir(parents=True, exist_ok=True)
        if resume:
            saved = self._load_last()
            logger.info("resuming %s after epoch %d", self.out, len(self.history))
        else:
            loss, acc, _, _ = self.evaluate(self.val_data)
            self.initial = {"val_loss": loss, "val_acc": acc, "candidate": self.initial_is_candidate}
            logger.info("epoch 0: val_loss %.4f, val_acc %.4f", loss, acc)
            self._save_best(0, "init", loss, acc)  # on disk either way: the run's starting point
            if not self.initial_is_candidate:
                self.best = {}  # any finite epoch replaces it
        base_elapsed = self.elapsed
        while self.phase_index < len(self.phases):
            name, length = self.phases[self.phase_index]
            if self.phase_epoch == 0:
                self._restore_best()  # the second phase starts from the best weights of the first
                self.bad_epochs, self.step = 0, 0
                self._build_optimizer()
                self.phase_log.append({"phase": name, "epochs": 0, "stop_reason": None,
                                       "trainable_params": self._trainable_count(), "peak_memory_bytes": 0})
            elif not self.phase_finished:  # resumed within the phase (one resumed at its end just moves on)
                self._build_optimizer(saved)
            self.peak.reset()
            while self.phase_epoch < length and not self.phase_finished:
                self._epoch(name, length, base_elapsed + time.perf_counter() - started)
            self.phase_index, self.phase_epoch, self.phase_finished, saved = self.phase_index + 1, 0, False, None
        self._restore_best()  # the best epoch, or the starting weights when no epoch was finite
        if not self.best:
            self.best = {"epoch": 0, "phase": "init", "val_loss": self.initial["val_loss"], "val_acc": self.initial["val_acc"]}
        self.elapsed = base_elapsed + time.perf_counter() - started
        return self._outcome()

    def _trainable_count(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    def _epoch(self, name: str, length: int, elapsed_before: float) -> None:
        epoch_started = time.perf_counter()
        epoch = len(self.history) + 1
        self.phase_epoch += 1
        train_loss, train_acc, lr = self._train_epoch(epoch, length)
        val_loss, val_acc, _, _ = self.evaluate(self.val_data)
        finite = math.isfinite(train_loss) and math.isfinite(val_loss)
        improved = finite and self._is_better(val_loss, val_acc)
        record = {
            "phase": name, "epoch": epoch, "train_loss": train_loss, "train_acc": train_acc,
            "val_loss": val_loss, "val_acc": val_acc, "lr": lr, "head_lr": lr * self.config.head_lr_mult,
            "seconds": time.perf_counter() - epoch_started, "improved": improved,
        }
        if improved:
            self.bad_epochs = 0
            self._save_best(epoch, name, val_loss, val_acc)
        else:
            self.bad_epochs += 1
        reason = None
        if not finite:
            reason = "non_finite_loss"
        elif self.bad_epochs >= self.config.patience:
            reason = "patience"
        elif self.phase_epoch >= length:
            reason = "max_epochs"
        self.phase_finished = reason is not None
        self.history.append(record)
        phase = self.phase_log[-1]
        phase["epochs"] = self.phase_epoch
        phase["stop_reason"] = reason
        phase["peak_memory_bytes"] = max(phase["peak_memory_bytes"], self.peak.read())
        self.memory[name] = max(self.memory.get(name, 0), phase["peak_memory_bytes"])
        self.elapsed = elapsed_before + record["seconds"]
        self._save_last()
        write_metrics(self.out, self.history)
        logger.info("epoch %d (%s): train_loss %.4f acc %.4f, val_loss %.4f acc %.4f, lr %.3g%s", epoch, name,
                    train_loss, train_acc, val_loss, val_acc, lr, " *" if improved else "")
        if self.on_epoch is not None:
            self.on_epoch(record)

    def _outcome(self) -> Outcome:
        from ..evaluate import classification_metrics

        classes = np.asarray(self.splits.class_names)
        metrics = {}
        for split_name, data in (("val", self.val_data), ("test", self.test_data)):
            if len(data):
                _, _, proba, y = self.evaluate(data)
                metrics[split_name] = classification_metrics(classes[y], proba, classes) if len(y) else None
        classifier = self.model.get_classifier()
        last = self.phase_log[-1] if self.phase_log else {"stop_reason": "max_epochs"}
        return Outcome(
            history=self.history,
            initial=self.initial,
            best=self.best,
            stopped_epoch=len(self.history),
            stop_reason=last["stop_reason"] or "max_epochs",
            phases=self.phase_log,
            memory=self.memory,
            test=metrics.get("test"),
            val=metrics.get("val") or {},
            skipped=sorted(self.skipped.items()),
            seconds=self.elapsed,
            classifier=(classifier.weight.detach().cpu().float().numpy().reshape(len(classes), -1),
                        classifier.bias.detach().cpu().float().numpy()),
        )
