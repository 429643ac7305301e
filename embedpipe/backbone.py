"""Load a frozen timm backbone and say exactly which weights it carries.

Weights come from, in this order: a local file (``weights=``), a package
that ships real ImageNet weights offline (:data:`embedpipe.weights.OFFLINE_WEIGHTS`),
timm's usual pretrained download/cache, or random initialisation
(``pretrained=False``, for tests). :func:`resolve_embedding_config` names the
weights and preprocessing without building the network, so a cache hit never
pays for a model.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import replace
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from ._compat import ensure_torchvision_importable
from .config import DEFAULT_BACKBONE, OUTPUT_EMBEDDING, OUTPUT_LOGITS, STAGE_PREFIX, EmbeddingConfig, sha256_file
from .errors import BackboneError, WeightsError
from .machine import PRECISIONS
from .preprocess import resolve_preprocess

logger = logging.getLogger(__name__)

RANDOM_INIT_SEED = 0  # random weights are seeded, so random-weight caches are reusable too
STORAGE_DTYPES = ("float16", "float32")


def split_name(name: str) -> tuple[str, str]:
    """``'resnet50.a1_in1k'`` -> ``('resnet50', 'a1_in1k')``; the tag is ``''`` when absent."""
    arch, _, tag = name.partition(".")
    return arch, tag


def _timm() -> Any:
    ensure_torchvision_importable()
    import timm

    return timm


def _check_known(arch: str) -> None:
    timm = _timm()
    if not timm.is_model(arch):
        close = timm.list_models(f"*{arch.split('_')[0]}*")[:5]
        hint = f" (similar: {', '.join(close)})" if close else ""
        raise BackboneError(f"unknown backbone {arch!r}{hint}: pick a name from `timm.list_models()`")


def _pretrained_cfg(name: str) -> dict[str, Any]:
    timm = _timm()
    arch, tag = split_name(name)
    try:
        cfg = timm.models.get_pretrained_cfg(f"{arch}.{tag}" if tag else arch, allow_unregistered=False)
    except RuntimeError:  # timm raises for a tag its registry does not know
        cfg = None
    if cfg is None:
        if tag:
            tags = [n.partition(".")[2] for n in timm.list_pretrained(f"{arch}.*")]
            raise BackboneError(f"{arch} has no pretrained tag {tag!r} (known: {', '.join(tags) or 'none'}): "
                                f"pass {arch} or {arch}.<one of those>")
        cfg = timm.models.get_pretrained_cfg(arch)
    return cfg.to_dict() if cfg is not None else {}


def _ships_offline(arch: str, tag: str) -> bool:
    """True when a registry package ships the weights this name asks for (bare name or their own tag)."""
    from .weights import OFFLINE_WEIGHTS

    return arch in OFFLINE_WEIGHTS and tag in ("", OFFLINE_WEIGHTS[arch].tag)


def _hub_reachable(timeout: float = 3.0) -> bool:
    """One TCP connect to the hub, so an offline machine fails in seconds, not after minutes of retries."""
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _create_from_hub(name: str) -> Any:
    """timm's pretrained download, or its local Hugging Face cache when the hub cannot be reached."""
    import huggingface_hub.constants as hub

    from .weights import OFFLINE_WEIGHTS

    timm = _timm()
    was_offline = hub.HF_HUB_OFFLINE
    hub_logger = logging.getLogger("huggingface_hub")
    level = hub_logger.level
    hub.HF_HUB_OFFLINE = was_offline or not _hub_reachable()  # read at call time by huggingface_hub
    hub_logger.setLevel(logging.ERROR)
    try:
        return timm.create_model(name, pretrained=True)
    except (OSError, RuntimeError, ValueError) as error:
        where = "the hub is unreachable and they are not in the local cache" if hub.HF_HUB_OFFLINE else str(error).splitlines()[0][:120]
        raise BackboneError(
            f"pretrained weights for {name} could not be loaded ({where}): connect to the Hugging Face hub once, "
            f"pass --weights FILE, or use an offline backbone ({', '.join(sorted(OFFLINE_WEIGHTS))})"
        ) from None
    finally:
        hub.HF_HUB_OFFLINE = was_offline
        hub_logger.setLevel(level)


def stage_count(arch: str) -> int:
    """How many feature stages ``forward_intermediates`` numbers for an architecture (built on the meta device: no memory)."""
    import torch

    timm = _timm()
    with torch.device("meta"):
        model = timm.create_model(arch, pretrained=False)
    if not hasattr(model, "forward_intermediates"):
        return 0
    return len(getattr(model, "feature_info", None) or [])


def _validate_outputs(outputs: tuple[str, ...], arch: str) -> tuple[str, ...]:
    if not outputs:
        raise BackboneError("no outputs asked for: pass --output embedding (the default), logits or stageN")
    stages = []
    for output in outputs:
        if not isinstance(output, str):
            raise BackboneError(f"output {output!r} is not a name: use embedding, logits or stageN (e.g. stage2)")
        valid_stage = output.startswith(STAGE_PREFIX) and output[len(STAGE_PREFIX):].isdigit()
        if output not in (OUTPUT_EMBEDDING, OUTPUT_LOGITS) and not valid_stage:
            raise BackboneError(f"unknown output {output!r}: use embedding, logits or stageN (e.g. stage2)")
        if valid_stage:
            stages.append(output)
    if stages:
        count = stage_count(arch)
        for output in stages:
            if int(output[len(STAGE_PREFIX):]) >= count:
                have = f"stage0 to stage{count - 1}" if count else "no stages embedpipe can read"
                raise BackboneError(f"{arch} has no {output} (it has {have}): pass one of those to --output")
    return tuple(dict.fromkeys(outputs))


def resolve_embedding_config(
    name: str = DEFAULT_BACKBONE,
    *,
    weights: str | Path | None = None,
    pretrained: bool = True,
    preprocess: dict[str, Any] | None = None,
    outputs: tuple[str, ...] = (OUTPUT_EMBEDDING,),
    precision: str = "fp32",
    dtype: str = "float16",
) -> EmbeddingConfig:
    """Name the weights, preprocessing and outputs of a backbone without building it.

    Args:
        name: a timm model name, with or without pretrained tag.
        weights: a local ``.safetensors``/``.pth`` file to load instead of the default weights.
        pretrained: False for random weights (seeded, for tests).
        preprocess: overrides of :class:`~embedpipe.config.PreprocessConfig` fields.
        outputs: which outputs to store: ``embedding``, ``logits``, ``stageN``.
        precision: compute precision, already resolved for the device (not ``auto``).
        dtype: storage dtype, ``float16`` or ``float32``.
    """
    from .weights import OFFLINE_WEIGHTS, offline_weights_file

    arch, tag = split_name(name)
    _check_known(arch)
    if dtype not in STORAGE_DTYPES:
        raise BackboneError(f"unknown storage dtype {dtype!r}: use float16 or float32")
    if precision not in PRECISIONS[1:]:
        raise BackboneError(f"precision must be resolved to one of fp32, bf16, fp16, not {precision!r}")
    cfg = _pretrained_cfg(name)
    if weights is not None:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise WeightsError(f"weights file {path} does not exist: check the path passed to --weights")
        identity = f"sha256:{sha256_file(path)}"
    elif not pretrained:
        identity = f"random:{RANDOM_INIT_SEED}"
    elif _ships_offline(arch, tag):
        identity = f"sha256:{sha256_file(offline_weights_file(arch))}"
        cfg = {**cfg, **OFFLINE_WEIGHTS[arch].pretrained_cfg_overrides}
    else:
        identity = f"timm:{arch}.{cfg.get('tag') or tag or 'default'}"
    return EmbeddingConfig(
        backbone=arch,
        weights=identity,
        preprocess=resolve_preprocess(cfg, preprocess),
        outputs=_validate_outputs(tuple(outputs), arch),
        precision=precision,
        dtype=dtype,
    )


def weights_file(name: str, *, weights: str | Path | None = None, pretrained: bool = True) -> Path | None:
    """The file whose bytes name a backbone's weights (``--weights``, or the offline package's), or None.

    None for random weights and for hub weights, which timm names by tag.
    """
    if weights is not None:
        return Path(weights).expanduser()
    arch, tag = split_name(name)
    if not pretrained or not _ships_offline(arch, tag):
        return None
    from .weights import offline_weights_file

    return offline_weights_file(arch)


def load_backbone(
    name: str = DEFAULT_BACKBONE,
    *,
    weights: str | Path | None = None,
    pretrained: bool = True,
) -> Any:
    """Build the timm model in eval mode with every parameter frozen.

    Raises:
        BackboneError: unknown name, or pretrained weights that cannot be had (offline).
        WeightsError: a weights file that cannot be read or does not fit the architecture.
    """
    import torch

    from .weights import OFFLINE_WEIGHTS, load_into, load_offline_state_dict, read_state_dict

    timm = _timm()
    arch, tag = split_name(name)
    _check_known(arch)
    if weights is not None:
        model = timm.create_model(arch, pretrained=False)
        load_into(model, read_state_dict(weights), source=str(weights))
    elif not pretrained:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_INIT_SEED)
            model = timm.create_model(arch, pretrained=False)
    elif _ships_offline(arch, tag):
        entry = OFFLINE_WEIGHTS[arch]
        model = timm.create_model(arch, pretrained=False, pretrained_cfg_overlay=entry.pretrained_cfg_overrides or None)
        load_into(model, load_offline_state_dict(arch), source=entry.package)
    else:
        model = _create_from_hub(name)
    model.eval()
    model.requires_grad_(False)
    return model


def with_outputs(config: EmbeddingConfig, outputs: tuple[str, ...]) -> EmbeddingConfig:
    return replace(config, outputs=_validate_outputs(outputs, config.backbone))


def parameter_count(name: str) -> int:
    """Number of parameters of a timm architecture, counted on the meta device (no memory, no weights)."""
    import torch

    timm = _timm()
    arch, _ = split_name(name)
    _check_known(arch)
    with torch.device("meta"):
        model = timm.create_model(arch, pretrained=False)
    return int(sum(p.numel() for p in model.parameters()))
