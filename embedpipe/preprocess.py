"""Image file -> network input, resolved from the backbone's own pretrained config.

Decoding is strict: a truncated or corrupt file raises rather than being
silently patched (``ImageFile.LOAD_TRUNCATED_IMAGES`` stays off), EXIF
orientation is applied, and every mode (grayscale, palette, RGBA, CMYK,
16-bit) becomes RGB without clipping. The resize/crop is timm's own eval
transform; the tensor stays uint8 until it is on the device, where it is
normalised (a quarter of the bytes to move, as timm's prefetcher does).
"""

from __future__ import annotations

import functools
import io
import math
from pathlib import Path
from typing import IO, Any, Callable

import numpy as np
from PIL import Image, ImageOps

from .config import IMAGE_CHANNELS, INTERPOLATIONS, MAX_INPUT_SIZE, PreprocessConfig
from .errors import BackboneError

# Modes whose samples are wider than 8 bits; Pillow's convert("RGB") clips them.
_WIDE_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N", "F"}
CROP_MODES = ("center", "squash", "border")  # timm's eval-transform crop modes


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_overrides(overrides: dict[str, Any]) -> None:
    """Refuse preprocessing no image could go through, before any is decoded or any memory is taken.

    Raises:
        BackboneError: a size outside 1..MAX_INPUT_SIZE, a mean/std without one value per RGB
            channel or a std that is not positive, a crop fraction outside (0, 1], an unknown
            interpolation or crop mode.
    """
    size = overrides.get("input_size")
    if size is not None:
        sides = [size] if isinstance(size, int) and not isinstance(size, bool) else list(size) if isinstance(size, (list, tuple)) else None
        if sides is not None and len(sides) == 3:
            channels, sides = sides[0], sides[1:]
            if channels != IMAGE_CHANNELS:
                raise BackboneError(f"input_size {tuple(size)} has {channels!r} channels: images are RGB, use 3")
        if not sides or len(sides) > 2 or not all(isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= MAX_INPUT_SIZE for v in sides):
            raise BackboneError(f"input size {size!r} must be a whole number of pixels from 1 to {MAX_INPUT_SIZE}: e.g. --img-size 224")
    for name in ("mean", "std"):
        values = overrides.get(name)
        if values is None:
            continue
        if not isinstance(values, (list, tuple)) or len(values) != IMAGE_CHANNELS or not all(map(_is_number, values)):
            raise BackboneError(f"{name} {values!r} needs {IMAGE_CHANNELS} numbers, one per RGB channel: e.g. --{name} 0.5,0.5,0.5")
        if name == "std" and min(values) <= 0:
            raise BackboneError(f"std {tuple(values)} must be positive in every channel: e.g. --std 0.229,0.224,0.225")
    crop = overrides.get("crop_pct")
    if crop is not None and not (_is_number(crop) and 0 < crop <= 1):
        raise BackboneError(f"crop fraction {crop!r} must be in (0, 1]: e.g. --crop-pct 0.875")
    interpolation = overrides.get("interpolation")
    if interpolation is not None and interpolation not in INTERPOLATIONS:
        raise BackboneError(f"unknown interpolation {interpolation!r}: use one of {', '.join(INTERPOLATIONS)}")
    crop_mode = overrides.get("crop_mode")
    if crop_mode is not None and crop_mode not in CROP_MODES:
        raise BackboneError(f"unknown crop mode {crop_mode!r}: use one of {', '.join(CROP_MODES)}")


def resolve_preprocess(pretrained_cfg: dict[str, Any], overrides: dict[str, Any] | None = None) -> PreprocessConfig:
    """The eval preprocessing for a model: user overrides, then its pretrained_cfg, then timm's defaults.

    Args:
        pretrained_cfg: the model's ``pretrained_cfg`` dict (timm).
        overrides: keys of :class:`PreprocessConfig` the user set; None values are ignored.
    """
    from ._compat import ensure_torchvision_importable

    ensure_torchvision_importable()
    from timm.data import resolve_data_config

    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    check_overrides(overrides)
    args = {k: overrides[k] for k in ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode") if k in overrides}
    if "input_size" in args and isinstance(args["input_size"], int):
        args["input_size"] = (3, args["input_size"], args["input_size"])
    resolved = resolve_data_config(args=args, pretrained_cfg=pretrained_cfg)
    return PreprocessConfig(
        input_size=tuple(int(v) for v in resolved["input_size"]),
        interpolation=str(resolved["interpolation"]),
        mean=tuple(float(v) for v in resolved["mean"]),
        std=tuple(float(v) for v in resolved["std"]),
        crop_pct=float(resolved["crop_pct"]),
        crop_mode=str(resolved.get("crop_mode") or "center"),
        jpeg_draft=bool(overrides.get("jpeg_draft", True)),
    )


def resize_target(config: PreprocessConfig) -> int:
    """Shortest side the eval transform resizes to before cropping."""
    return math.floor(max(config.input_size[1:]) / config.crop_pct)


def _to_rgb(image: Image.Image) -> Image.Image:
    """``image`` as RGB; an RGB image without a colour key is returned as is, not copied.

    So the caller passes an image that outlives its file (decode_image passes exif_transpose's
    copy): the copy convert("RGB") would make costs about 5% of decoding a 500x375 JPEG.
    """
    if image.mode == "RGB" and "transparency" not in image.info:
        return image
    if image.mode in _WIDE_MODES:
        array = np.asarray(image, dtype=np.float64)
        if image.mode == "F":
            # Float images carry no range; map their own min..max onto 0..255.
            low, high = float(array.min()), float(array.max())
            array = (array - low) / (high - low or 1.0) * 255.0
        else:
            # 16-bit samples (Pillow also opens 16-bit PNGs as mode "I").
            array = array / 257.0
        image = Image.fromarray(np.clip(np.rint(array), 0, 255).astype(np.uint8), mode="L")
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        # Composite on white: transparent pixels often hold black RGB, which
        # convert("RGB") would expose. "transparency" is a palette index for
        # "P" and a colour key for "L" and "RGB" (PNG tRNS); convert honours both.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def decode_image(path: str | Path | bytes | IO[bytes], *, draft_to: int | None = None) -> Image.Image:
    """Open an image as an RGB PIL image, fully decoded.

    Args:
        path: the image file, its bytes (a tar member, a table cell, a download) or a binary file object;
            every form goes through the same draft, EXIF transpose and mode conversion.
        draft_to: when set, a JPEG may be decoded at a reduced scale whose
            shortest side is still at least this many pixels.

    Raises:
        OSError, ValueError, SyntaxError, EOFError: the file is not a decodable image.
            Pillow raises these for truncated, corrupt and unknown files.
    """
    if isinstance(path, (bytes, bytearray, memoryview)):
        path = io.BytesIO(path)
    with Image.open(path) as image:
        image.seek(0)  # GIF and multi-page TIFF: the first frame
        if draft_to and image.format == "JPEG":
            # EXIF rotation happens after the draft, so bound both sides.
            image.draft("RGB", (draft_to, draft_to))
        image.load()  # a truncated file raises here, not at open()
        image = ImageOps.exif_transpose(image)
        return _to_rgb(image)


def eval_transform(config: PreprocessConfig) -> Callable[[Image.Image], Any]:
    """timm's eval transform up to a uint8 CHW tensor (normalisation happens on the device)."""
    from ._compat import ensure_torchvision_importable

    ensure_torchvision_importable()
    from timm.data import create_transform

    return create_transform(
        input_size=config.input_size,
        interpolation=config.interpolation,
        mean=config.mean,
        std=config.std,
        crop_pct=config.crop_pct,
        crop_mode=config.crop_mode,
        is_training=False,
        use_prefetcher=True,
    )


@functools.lru_cache(maxsize=32)
def _mean_std(mean: tuple[float, ...], std: tuple[float, ...], device: Any) -> tuple[Any, Any]:
    """The (1, C, 1, 1) float32 tensors ``255 * mean`` and ``255 * std`` on ``device``, made once.

    Made per batch they cost a host-to-device copy each on CUDA (and a sync); the cache holds
    one pair per (config, device), a few bytes each.
    """
    import torch

    with torch.inference_mode(False):  # plain tensors, usable outside inference mode too (fine-tuning)
        return (torch.tensor(mean, device=device).view(1, -1, 1, 1) * 255.0,
                torch.tensor(std, device=device).view(1, -1, 1, 1) * 255.0)


def normalize(batch: Any, config: PreprocessConfig, *, dtype: Any = None) -> Any:
    """uint8 (B, C, H, W) tensor -> float tensor normalised with the config's mean/std.

    The float copy is normalised in place: one new tensor instead of three, about 2x faster on
    CPU (41 vs 85 ms for 64 x 224 px on 2 EPYC cores) and bit-identical to ``(x - mean) / std``.
    """
    import torch

    mean, std = _mean_std(tuple(config.mean), tuple(config.std), batch.device)
    out = batch.to(torch.float32, copy=True).sub_(mean).div_(std)
    return out if dtype is None else out.to(dtype)
