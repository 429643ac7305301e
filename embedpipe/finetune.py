"""The fine-tuning loop: the one place besides :mod:`embedpipe.inference` that runs the network.

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
import csv
import io
import json
import logging
import math
import random
import resource
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ._atomic import write_atomically
from .config import AUGMENTS, MONITORS, SCHEDULES, UNFREEZE_CHOICES, FineTuneConfig, PreprocessConfig, RunConfig
from .errors import FineTuneError, ImageDecodeError
from .inference import _AUTOCAST_DTYPES, DECODE_ERRORS, default_batch_size, default_workers
from .preprocess import decode_image, eval_transform, normalize, resize_target

logger = logging.getLogger(__name__)

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
# Augmentations, as timm's create_transform(is_training=True) arguments. Crops keep at least half
# (standard) or a quarter (strong) of the image, so a small object or defect rarely leaves the frame.
_AUGMENT_ARGS: dict[str, dict[str, Any]] = {
    "standard": {"scale": (0.5, 1.0), "hflip": 0.5, "color_jitter": None},
    # RandAugment (2 ops at magnitude 7: colour, contrast, rotation, shear, translation...); timm
    # applies it instead of a separate colour jitter.
    "strong": {"scale": (0.25, 1.0), "hflip": 0.5, "auto_augment": "rand-m7-mstd0.5-inc1"},
}


# --------------------------------------------------------------------------- options


def parse_unfreeze(text: str) -> tuple[str, int]:
    """``"none"`` -> ``("none", 0)``, ``"all"`` -> ``("all", 0)``, ``"top:2"`` -> ``("top", 2)``."""
    if text in ("none", "all"):
        return text, 0
    kind, _, count = text.partition(":")
    if kind == "top" and count.isdigit() and int(count) >= 1:
        return "top", int(count)
    raise FineTuneError(f"unknown --unfreeze {text!r}: use {UNFREEZE_CHOICES} (e.g. top:2, K >= 1)")


def check_config(config: FineTuneConfig) -> None:
    """Raise :class:`FineTuneError` naming the first option out of range."""
    parse_unfreeze(config.unfreeze)
    checks = [
        (config.schedule in SCHEDULES, f"unknown --schedule {config.schedule!r}: use {', '.join(SCHEDULES)}"),
        (config.augment in AUGMENTS, f"unknown --augment {config.augment!r}: use {', '.join(AUGMENTS)}"),
        (config.monitor in MONITORS, f"unknown --monitor {config.monitor!r}: use {', '.join(MONITORS)}"),
        (config.schedule_unit in ("step", "epoch"), f"unknown schedule unit {config.schedule_unit!r}: use step or epoch"),
        (config.epochs >= 0 and config.head_epochs >= 0, "--epochs and --head-epochs must be 0 or more"),
        (config.epochs + config.head_epochs >= 1, "nothing to train: pass --epochs or --head-epochs of at least 1"),
        (config.lr > 0 and math.isfinite(config.lr), f"--lr must be a positive number, not {config.lr}"),
        (config.head_lr_mult > 0, f"--head-lr-mult must be positive, not {config.head_lr_mult}"),
        (0 < config.layer_decay <= 1, f"--layer-decay must be in (0, 1] (1 = off), not {config.layer_decay}"),
        (config.weight_decay >= 0, f"--weight-decay must be 0 or more, not {config.weight_decay}"),
        (config.warmup >= 0, f"--warmup must be 0 or more epochs, not {config.warmup}"),
        (config.batch_size >= 1 and config.accum_steps >= 1, "--batch-size and --accum-steps must be at least 1"),
        (config.patience >= 1, f"--patience must be at least 1, not {config.patience}"),
        (config.step_every >= 1 and 0 < config.step_gamma <= 1 and 0 < config.exp_gamma <= 1,
         "step/exp schedules need step_every >= 1 and gammas in (0, 1]"),
        (0 <= config.min_lr_ratio <= 1, f"min_lr_ratio must be in [0, 1], not {config.min_lr_ratio}"),
    ]
    for ok, message in checks:
        if not ok:
            raise FineTuneError(message)


def check_out_folder(out: Path, *, resume: bool) -> None:
    """Refuse to overwrite a run without ``resume``, and to resume where there is nothing to resume."""
    if resume and not (out / LAST_FILE).is_file():
        raise FineTuneError(f"nothing to resume in {out} (no {LAST_FILE}): run without --resume")
    if not resume and ((out / LAST_FILE).exists() or (out / SUMMARY_FILE).exists()):
        raise FineTuneError(f"{out} already holds a run: pass --resume to continue it, or another --out")


def plan_phases(config: FineTuneConfig) -> list[tuple[str, int]]:
    """``[(phase, epochs), ...]``: ``head`` (backbone frozen) then ``finetune``; empty phases left out."""
    if parse_unfreeze(config.unfreeze)[0] == "none":
        return [("head", config.head_epochs + config.epochs)]
    return [(name, n) for name, n in (("head", config.head_epochs), ("finetune", config.epochs)) if n > 0]


# --------------------------------------------------------------------------- what trains


@dataclass(frozen=True)
class LayerGroups:
    """The model's parameters in timm's layer groups, bottom (stem) to top (classifier)."""

    layer_of: dict[str, int]  # parameter name -> layer id from group_matcher(coarse=False)
    classifier: frozenset[str]  # the classifier's parameter names
    blocks: tuple[int, ...]  # layer ids of backbone groups that --unfreeze top:K counts, bottom to top
    neck: int | None  # a backbone group sharing the classifier's layer id (ConvNeXt head.norm); goes with top:K
    top_layer: int  # the largest layer id: the layer-decay exponent is top_layer - layer

    def unfrozen(self, unfreeze: str) -> set[str]:
        """Backbone parameter names that ``unfreeze`` trains (the classifier always trains)."""
        kind, count = parse_unfreeze(unfreeze)
        backbone = [name for name in self.layer_of if name not in self.classifier]
        if kind == "none":
            return set()
        if kind == "all":
            return set(backbone)
        if count > len(self.blocks):
            raise FineTuneError(
                f"--unfreeze top:{count} asks for more layer groups than the model has ({len(self.blocks)}, "
                f"stem and blocks as timm's group_matcher counts them): use top:1..top:{len(self.blocks)} or all"
            )
        chosen = set(self.blocks[-count:]) | ({self.neck} if self.neck is not None else set())
        return {name for name in backbone if self.layer_of[name] in chosen}


def layer_groups(model: torch.nn.Module) -> LayerGroups:
    """Number the parameters with timm's own ``group_matcher(coarse=False)``.

    Raises:
        FineTuneError: the model names no classifier or has no group matcher.
    """
    from ._compat import ensure_torchvision_importable
    from .weights import _classifier_prefixes

    ensure_torchvision_importable()
    from timm.models._manipulate import group_parameters

    arch = (getattr(model, "pretrained_cfg", None) or {}).get("architecture") or type(model).__name__
    prefixes = _classifier_prefixes(model)  # ("fc.",), ("head.fc.",)...: pretrained_cfg["classifier"]
    if not prefixes or not hasattr(model, "group_matcher"):
        raise FineTuneError(f"{arch} has no classifier or group_matcher in timm, so fine-tune cannot tell its layers apart")
    groups = group_parameters(model, model.group_matcher(coarse=False))
    layer_of = {name: int(layer) for layer, names in groups.items() for name in names}
    classifier = frozenset(name for name in layer_of if name.startswith(prefixes))
    if not classifier:
        raise FineTuneError(f"{arch}'s classifier ({', '.join(prefixes)}) has no parameters: fine-tune needs a linear classifier")
    backbone_ids = sorted({layer_of[n] for n in layer_of if n not in classifier})
    head_ids = {layer_of[n] for n in classifier}
    neck = backbone_ids[-1] if backbone_ids and backbone_ids[-1] in head_ids else None
    blocks = tuple(i for i in backbone_ids if i != neck)
    return LayerGroups(layer_of=layer_of, classifier=classifier, blocks=blocks, neck=neck, top_layer=max(layer_of.values()))


def set_trainable(model: torch.nn.Module, names: set[str]) -> None:
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name in names)


def set_train_mode(model: torch.nn.Module, *, train_bn: bool) -> None:
    """Training mode where something trains, inference mode elsewhere.

    A module with parameters trains when any of them does; a module without (dropout,
    drop-path, activations) follows its parent. BatchNorm stays in inference mode
    (running statistics untouched) unless ``train_bn`` and its parameters train.
    """
    modes: dict[str, bool] = {}
    for name, module in model.named_modules():
        params = list(module.parameters())
        training = any(p.requires_grad for p in params) if params else modes.get(name.rpartition(".")[0], False)
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and not (train_bn and training):
            training = False
        module.training = training
        modes[name] = training


def param_groups(model: torch.nn.Module, layers: LayerGroups, config: FineTuneConfig) -> list[dict[str, Any]]:
    """AdamW parameter groups of the trainable parameters, each with its ``lr_scale``.

    The classifier's scale is ``head_lr_mult``; a backbone parameter in layer ``i`` gets
    ``layer_decay ** (top_layer - i)``, timm's ``param_groups_layer_decay`` rule. Biases,
    norm weights (1-d) and the model's ``no_weight_decay()`` names get no weight decay.
    """
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    buckets: dict[tuple[int, bool, bool], dict[str, Any]] = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        is_head = name in layers.classifier
        layer = layers.layer_of[name]
        decays = not (parameter.ndim <= 1 or name.endswith(".bias") or name in skip)
        key = (layer, is_head, decays)
        if key not in buckets:
            scale = config.head_lr_mult if is_head else config.layer_decay ** (layers.top_layer - layer)
            buckets[key] = {
                "params": [],
                "param_names": [],
                "lr_scale": float(scale),
                "weight_decay": config.weight_decay if decays else 0.0,
                "lr": config.lr * scale,
                "group": f"{'head' if is_head else f'layer{layer}'}{'' if decays else '_no_decay'}",
            }
        buckets[key]["params"].append(parameter)
        buckets[key]["param_names"].append(name)
    return [buckets[key] for key in sorted(buckets)]


def lr_factor(config: FineTuneConfig, unit: int, total: int, units_per_epoch: int) -> float:
    """The LR multiplier at ``unit`` (an optimizer step, or an epoch with ``schedule_unit="epoch"``) of a phase.

    Linear warmup over ``warmup`` epochs (``(unit + 1) / warmup_units``), then ``constant``: 1;
    ``step``: ``step_gamma`` every ``step_every`` epochs; ``exp``: ``exp_gamma`` per epoch;
    ``cosine``: from 1 down to ``min_lr_ratio`` at the end of the phase.

    Args:
        unit: 0-based index within the phase.
        total: units in the phase (``epochs * units_per_epoch``).
        units_per_epoch: optimizer steps per epoch, or 1 per epoch.
    """
    warm = int(round(config.warmup * units_per_epoch))
    if unit < warm:
        return (unit + 1) / warm
    t = unit - warm
    if config.schedule == "constant":
        return 1.0
    if config.schedule == "step":
        return config.step_gamma ** (t // (config.step_every * units_per_epoch))
    if config.schedule == "exp":
        return config.exp_gamma ** (t / units_per_epoch)
    span = max(1, total - warm)
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, span) / span))


def set_lr(optimizer: torch.optim.Optimizer, base_lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = base_lr * group["lr_scale"]


# --------------------------------------------------------------------------- the linear probe as the head


def linear_from_probe(probe: Any, class_names: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """A fitted :class:`~embedpipe.heads.LogisticProbe` as a linear layer on raw embeddings.

    The standardisation is folded in: ``W = coef / scale``, ``b = intercept - W @ mean``; a
    two-class (binomial) probe becomes the rows ``[0, w]``, ``[0, b]``, whose softmax is its sigmoid.

    Returns:
        ``(W, b)``: float32 ``(C, D)`` and ``(C,)``, rows in ``class_names`` order.

    Raises:
        FineTuneError: L2-normalised features (not linear) or other classes than ``class_names``.
    """
    if probe.normalize == "l2":
        raise FineTuneError(
            "the head was fitted on L2-normalised embeddings, which no linear layer reproduces: "
            "refit it with `embedpipe fit-head --normalize standard` (the default) or none"
        )
    coef = np.asarray(probe.coef_, dtype=np.float64)
    intercept = np.asarray(probe.intercept_, dtype=np.float64)
    if probe.normalize == "standard":
        coef = coef / np.asarray(probe.scale_, dtype=np.float64)
        intercept = intercept - coef @ np.asarray(probe.mean_, dtype=np.float64)
    if coef.shape[0] == 1:
        coef = np.vstack([np.zeros_like(coef), coef])
        intercept = np.concatenate([[0.0], intercept])
    theirs = [str(c) for c in probe.classes_]
    if sorted(theirs) != sorted(class_names):
        raise FineTuneError(
            f"the head was fitted on classes {theirs[:5]}, the data has {list(class_names)[:5]}: "
            "fit the head on embeddings of this dataset, or drop --init-head"
        )
    order = [theirs.index(name) for name in class_names]
    return coef[order].astype(np.float32), intercept[order].astype(np.float32)


def head_from_classifier(weight: np.ndarray, bias: np.ndarray, class_names: Sequence[str]) -> Any:
    """The trained classifier as a :class:`~embedpipe.heads.LogisticProbe` on raw embeddings (``normalize="none"``).

    Saved with :func:`embedpipe.headfile.save_head`, it predicts from the fine-tuned backbone's
    cached embeddings exactly as the network's own classifier does.
    """
    from .heads import LogisticProbe

    weight, bias = np.asarray(weight, dtype=np.float32), np.asarray(bias, dtype=np.float32)
    head = LogisticProbe(Cs=[1.0], normalize="none")
    head.classes_ = np.asarray(list(class_names))
    head.n_features_in_ = int(weight.shape[1])
    if weight.shape[0] == 2:  # softmax over two logits = sigmoid of their difference
        weight, bias = (weight[1] - weight[0])[None, :], np.array([bias[1] - bias[0]], dtype=np.float32)
    head.coef_, head.intercept_ = weight, bias
    head.C_, head.val_scores_, head.val_losses_, head.n_iter_ = None, {}, {}, 0
    return head


# --------------------------------------------------------------------------- data


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
    from ._compat import ensure_torchvision_importable

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


# --------------------------------------------------------------------------- files


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` so that a crash leaves the old file or the new one, never half of either."""
    try:
        write_atomically(path, data)
    except OSError as error:
        raise FineTuneError(f"could not write {path} ({error.strerror or error}): free disk space or pick another --out") from None


def write_json(path: Path, data: Any) -> None:
    atomic_write(path, (json.dumps(data, indent=2, default=_jsonable) + "\n").encode())


def _jsonable(value: Any) -> Any:
    if isinstance(value, (np.generic, torch.Tensor)):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, Any]) -> None:
    """A safetensors file whose header carries ``metadata`` (each value JSON-encoded), written atomically."""
    from safetensors.torch import save

    plain = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    atomic_write(path, save(plain, metadata={k: json.dumps(v, default=_jsonable) for k, v in metadata.items()}))


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


# --------------------------------------------------------------------------- memory


def reset_peak_memory(device: str) -> None:
    """Start a new peak: CUDA's allocator peak, or the process's peak RSS (Linux ``clear_refs``)."""
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)
        return
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (Linux >= 4.0)


def peak_memory(device: str) -> int:
    """Bytes: peak CUDA memory allocated, or peak resident set size since the last reset."""
    if device.startswith("cuda"):
        return int(torch.cuda.max_memory_allocated(device))
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


# --------------------------------------------------------------------------- the loop


@dataclass
class Outcome:
    """What :func:`train` did; :func:`embedpipe.pipeline.fine_tune` turns it into the summary."""

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


class _Trainer:
    """One run: phases, epochs, checkpoints. Build with everything resolved, then :meth:`run`."""

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
        check_config(config)
        self.model, self.splits, self.preprocess = model, splits, preprocess
        self.initial_is_candidate = initial_is_candidate
        self.device, self.config, self.run_config, self.out = device, config, run, out
        # What must match on --resume (config, backbone, data), as JSON reads it back (tuples -> lists).
        self.identity = json.loads(json.dumps(identity, default=_jsonable))
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
        self.memory: dict[str, int] = {}
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
        theirs = meta.get("identity", {})
        differs = [k for k in self.identity if theirs.get(k) != self.identity[k]]
        if differs:
            raise FineTuneError(
                f"the run in {self.out} was started with other {', '.join(differs)}: "
                "resume with the same options and data, or start a new run with another --out"
            )
        self.model.load_state_dict({k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")}, strict=True)
        state = meta["state"]
        self.history, self.initial, self.best = state["history"], state["initial"], state["best"]
        self.phase_index, self.phase_epoch = state["phase_index"], state["phase_epoch"]
        self.phase_finished, self.bad_epochs, self.step = state["phase_finished"], state["bad_epochs"], state["step"]
        self.memory, self.phase_log, self.elapsed = state["memory"], state["phase_log"], state["elapsed"]
        self.skipped = dict(state.get("skipped", {}))
        # A kill between writing best.safetensors and last.safetensors leaves a newer best: adopt it.
        _, best_meta = load_tensors(self.out / BEST_FILE)
        if best_meta.get("best", {}).get("epoch", 0) > self.best.get("epoch", 0):
            self.best = best_meta["best"]
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
            for key, tensor in saved["tensors"].items():
                _, index, field_name = key.split("/", 2)
                state.setdefault(int(index), {})[field_name] = tensor
            for index, values in saved["optimizer"]["state"].items():
                state.setdefault(int(index), {}).update(values)
            self.optimizer.load_state_dict({"state": state, "param_groups": saved["optimizer"]["param_groups"]})
            if saved["scaler"]:
                self.scaler.load_state_dict(saved["scaler"])

    def _write_metrics(self) -> None:
        lines = "".join(json.dumps(record) + "\n" for record in self.history)
        atomic_write(self.out / METRICS_JSONL, lines.encode())
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(METRIC_KEYS), extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.history)
        atomic_write(self.out / METRICS_CSV, buffer.getvalue().encode())

    # ----------------------------------------------------------------- the run

    def run(self, *, resume: bool) -> Outcome:
        started = time.perf_counter()
        saved: dict[str, Any] | None = None
        self.out.mkdir(parents=True, exist_ok=True)
        check_out_folder(self.out, resume=resume)
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
            reset_peak_memory(self.device)
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
        phase["peak_memory_bytes"] = max(phase["peak_memory_bytes"], peak_memory(self.device))
        self.memory[name] = max(self.memory.get(name, 0), phase["peak_memory_bytes"])
        self.elapsed = elapsed_before + record["seconds"]
        self._save_last()
        self._write_metrics()
        logger.info("epoch %d (%s): train_loss %.4f acc %.4f, val_loss %.4f acc %.4f, lr %.3g%s", epoch, name,
                    train_loss, train_acc, val_loss, val_acc, lr, " *" if improved else "")
        if self.on_epoch is not None:
            self.on_epoch(record)

    def _outcome(self) -> Outcome:
        from .evaluate import classification_metrics

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


def train(model: torch.nn.Module, *, resume: bool = False, **options: Any) -> Outcome:
    """Fine-tune ``model`` (a timm classifier with ``len(splits.class_names)`` outputs) into ``out``.

    ``options`` are :class:`_Trainer`'s keywords: ``splits``, ``preprocess``, ``precision``, ``device``,
    ``config``, ``run``, ``out``, ``identity``, ``progress`` (required), ``on_epoch``, ``initial_is_candidate``.

    Args:
        model: on ``device``; its classifier already initialised (fresh or from a probe).
        resume: continue the run in ``out`` from its last finished epoch.
        splits: train (to fit), val (to monitor, required) and test (scored once, at the end) images.
        preprocess: the backbone's eval preprocessing; training augments from it.
        precision: resolved compute precision: fp32, bf16 (autocast) or fp16 (autocast + grad scaler).
        identity: JSON-able description of the run (config, backbone, data); ``resume`` refuses another.
        initial_is_candidate: whether the starting weights (epoch 0) may be the best checkpoint. False
            for a classifier from a probe that was refit on train + val: its val score is in-sample.

    Returns:
        An :class:`Outcome`; the model holds the best weights.
    """
    return _Trainer(model, **options).run(resume=resume)


# --------------------------------------------------------------------------- the curves


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
