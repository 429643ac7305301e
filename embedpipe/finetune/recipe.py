"""The fine-tuning recipe: which options are valid, which layers train, at what learning rate, from which head.

What trains is resolved from the timm model's own structure: its ``group_matcher(coarse=False)``
numbers the parameters bottom to top in layer groups (stem, each block, the neck), the same
numbering timm's ``param_groups_layer_decay`` uses, and the classifier is the module the model's
``pretrained_cfg["classifier"]`` names. ``--unfreeze top:K`` trains the top K layer groups (plus any
neck that shares the classifier's group, as ConvNeXt's ``head.norm`` does).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..config import AUGMENTS, MONITORS, SCHEDULES, UNFREEZE_CHOICES, FineTuneConfig
from ..errors import FineTuneError


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


def plan_phases(config: FineTuneConfig) -> list[tuple[str, int]]:
    """``[(phase, epochs), ...]``: ``head`` (backbone frozen) then ``finetune``; empty phases left out."""
    if parse_unfreeze(config.unfreeze)[0] == "none":
        return [("head", config.head_epochs + config.epochs)]
    return [(name, n) for name, n in (("head", config.head_epochs), ("finetune", config.epochs)) if n > 0]


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
    from .._compat import ensure_torchvision_importable
    from ..weights import _classifier_prefixes

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

    Saved with :func:`embedpipe.heads.save_head`, it predicts from the fine-tuned backbone's
    cached embeddings exactly as the network's own classifier does.
    """
    from ..heads import LogisticProbe

    weight, bias = np.asarray(weight, dtype=np.float32), np.asarray(bias, dtype=np.float32)
    head = LogisticProbe(Cs=[1.0], normalize="none")
    head.classes_ = np.asarray(list(class_names))
    head.n_features_in_ = int(weight.shape[1])
    if weight.shape[0] == 2:  # softmax over two logits = sigmoid of their difference
        weight, bias = (weight[1] - weight[0])[None, :], np.array([bias[1] - bias[0]], dtype=np.float32)
    head.coef_, head.intercept_ = weight, bias
    head.C_, head.val_scores_, head.val_losses_, head.n_iter_ = None, {}, {}, 0
    return head
