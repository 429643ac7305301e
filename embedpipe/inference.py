"""The one inference loop: images in, (row ids, outputs) out. No file I/O here.

Workers decode and crop in parallel with the forward pass and hand uint8
tensors over; the main process moves them to the device (pinned memory and
non-blocking copies on CUDA), normalises there, and runs the frozen network
under ``torch.inference_mode`` with optional autocast, channels_last and
``torch.compile``. Each batch is yielded as soon as it is done, so memory
stays flat however large the dataset.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL.Image import DecompressionBombError

from .config import OUTPUT_EMBEDDING, OUTPUT_LOGITS, STAGE_PREFIX, EmbeddingConfig, RunConfig
from .errors import DataError
from .data.items import ItemColumn
from .preprocess import decode_image, eval_transform, normalize, resize_target

logger = logging.getLogger(__name__)

# What Pillow raises for truncated, corrupt, unknown or oversized files;
# DecompressionBombError subclasses Exception directly.
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, DecompressionBombError)

_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Batch:
    """One finished batch.

    Attributes:
        rows: int64 (B,) positions in the item list passed to :func:`embed`.
        outputs: name -> float32 (B, D) array, rows aligned with ``rows``.
        errors: (row, reason) for images in this batch that could not be decoded.
    """

    rows: np.ndarray
    outputs: dict[str, np.ndarray]
    errors: list[tuple[int, str]]


class ImageFiles(torch.utils.data.Dataset):
    """Decodes and crops one image per item; a bad file yields its error, not a neighbour.

    Items are image files, or an :class:`~embedpipe.data.items.ItemColumn` whose ``read(i)`` gives
    each image's bytes (tar members, table rows, URLs); a read that fails is that item's error.
    """

    def __init__(self, paths: Sequence[str | Path], config: EmbeddingConfig) -> None:
        self.paths = paths  # read one at a time: a lazy column of a million paths stays lazy
        self.items = paths if isinstance(paths, ItemColumn) else None
        self.transform = eval_transform(config.preprocess)
        self.draft_to = resize_target(config.preprocess) if config.preprocess.jpeg_draft else None
        c, h, w = config.preprocess.input_size
        self.blank = torch.zeros((h, w, c), dtype=torch.uint8).permute(2, 0, 1)  # laid out as decoded images are

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor, str]:
        path = str(self.paths[index])
        source: str | bytes = path
        if self.items is not None:
            # A failed read (a network error, a shard gone) says nothing about the image's bytes, so it
            # stops the run (finished batches are kept) instead of being recorded against their digest.
            try:
                source = self.items.read(index)
            except OSError as error:
                raise DataError(f"{error}: check that it is reachable, then rerun; finished batches are kept") from None
        try:
            image = decode_image(source, draft_to=self.draft_to)
            return index, self.transform(image), ""
        except DECODE_ERRORS as error:
            return index, self.blank, decode_reason(error, path)


def collate_images(samples: Sequence[tuple[int, torch.Tensor, str]]) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Batch :class:`ImageFiles` items: (rows, uint8 (B, C, H, W) images laid out channels_last, reasons).

    timm's transform gives each image as a CHW view of its pixel-interleaved (HWC) pixels
    (``pil_to_tensor`` permutes). ``default_collate`` would stack those views into NCHW, a strided
    copy, and channels_last would transpose them back; stacking the HWC pixels is a plain copy whose
    NCHW view is channels_last already (1.5 vs 13 ms for 64 images of 224 px on 2 EPYC cores).
    """
    rows, images, reasons = zip(*samples)
    pixels = torch.utils.data.default_collate([image.permute(1, 2, 0) for image in images])  # shared memory in a worker
    return torch.tensor(rows, dtype=torch.int64), pixels.permute(0, 3, 1, 2), list(reasons)


def decode_reason(error: BaseException, path: str) -> str:
    """Why an image could not be decoded, without its path: the reason is stored by content, for every
    dataset holding the same bytes, so it must not name one dataset's file (or a memory address)."""
    text = str(error).replace(repr(path), "").replace(path, "")
    text = re.sub(r"\s*<_io\.\w+[^>]*>", "", text).strip()
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def forward_outputs(model: torch.nn.Module, x: torch.Tensor, outputs: Sequence[str]) -> dict[str, torch.Tensor]:
    """All requested outputs from one forward pass.

    Returns:
        name -> (B, D) tensor: ``embedding`` is ``forward_head(features, pre_logits=True)``,
        ``logits`` the classifier output, ``stageN`` the spatially averaged output of stage N.
    """
    stages = sorted({int(name[len(STAGE_PREFIX):]) for name in outputs if name.startswith(STAGE_PREFIX)})
    result: dict[str, torch.Tensor] = {}
    if stages:
        features, intermediates = model.forward_intermediates(x, indices=stages, intermediates_only=False)
        for stage, tensor in zip(stages, intermediates):
            result[f"{STAGE_PREFIX}{stage}"] = tensor.float().mean(dim=tuple(range(2, tensor.ndim)))
    else:
        features = model.forward_features(x)
    if OUTPUT_EMBEDDING in outputs:
        result[OUTPUT_EMBEDDING] = model.forward_head(features, pre_logits=True).flatten(1)
    if OUTPUT_LOGITS in outputs:
        result[OUTPUT_LOGITS] = model.forward_head(features).flatten(1)
    return {name: result[name] for name in outputs}


def default_workers(device: str) -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if device.startswith("cuda"):
        return min(16, cores)  # the GPU waits on decoding: use every core
    # On CPU the forward's threads already use every core, so a decode worker takes cores from it.
    # Measured on 2 cores (benchmarks/bench_cores.py, tf_efficientnet_lite0, 512 JPEGs): no worker
    # 1.15x, two 1.09x, one (the old default) 1.0x, one with 1 torch thread 0.83x. One core decodes
    # ~135 img/s while two run the forward at ~50, so a worker keeps up with the forward of about
    # five other cores: one worker per six cores, none below six (derived, not measured beyond 2).
    return min(8, cores // 6)


def default_batch_size(device: str) -> int:
    # On a GPU a larger batch keeps the device busy; the forward halves it when memory runs out.
    return 256 if device.startswith("cuda") else 64


class _FittingForward:
    """The network's forward in chunks that fit in memory: on out-of-memory the chunk is halved and
    the batch retried, and later batches stay at the size that fitted instead of failing again."""

    def __init__(self, model: torch.nn.Module, outputs: Sequence[str], *, precision: str, device: str, limit: int) -> None:
        self.model, self.outputs, self.limit = model, outputs, limit
        self.device_type = device.split(":")[0]
        self.autocast_dtype = _AUTOCAST_DTYPES.get(precision)

    def _forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if len(x) == 1:
            # A lone image runs as a pair: oneDNN computes a batch of one with other kernels, whose sums
            # differ in the last bits (Xeon with AVX-512/AMX: up to 9e-8 on test_resnet, while batches of
            # 2 to 64 agree bit for bit), and a cached row must not depend on what it was batched with.
            return {name: value[:1] for name, value in self._forward(torch.cat((x, x))).items()}
        if self.autocast_dtype is None:
            return forward_outputs(self.model, x, self.outputs)
        with torch.autocast(device_type=self.device_type, dtype=self.autocast_dtype):
            return forward_outputs(self.model, x, self.outputs)

    def __call__(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        from .errors import BackboneError

        while True:
            try:
                if len(x) <= self.limit:
                    return self._forward(x)
                parts = [self._forward(x[start : start + self.limit]) for start in range(0, len(x), self.limit)]
                return {name: torch.cat([part[name] for part in parts]) for name in self.outputs}
            except torch.OutOfMemoryError:
                if self.limit == 1:
                    raise BackboneError(
                        "out of memory for a single image: use a smaller --img-size, --precision bf16, or --device cpu"
                    ) from None
                self.limit = max(1, self.limit // 2)
                if self.device_type == "cuda":
                    torch.cuda.empty_cache()
                logger.warning("out of memory: running the network on %d images at a time", self.limit)


# The methods forward_outputs calls. torch.compile(model) compiles forward() only, and an
# OptimizedModule hands every other attribute to the eager module: --compile compiled nothing.
_COMPILED_METHODS = ("forward_features", "forward_head", "forward_intermediates")


def prepare_model(model: torch.nn.Module, device: str, run: RunConfig, *,
                  compile_backend: str | Callable[..., Any] = "inductor") -> torch.nn.Module:
    """Move to the device, set channels_last and compile, as the run asks.

    Args:
        compile_backend: torch.compile's backend when ``run.compile`` ("eager" traces without
            generating code: tests and quick checks), or a backend callable.

    Returns:
        The same module; with ``run.compile`` its ``forward_features``, ``forward_head`` and
        ``forward_intermediates`` are compiled (each on its first call), so :func:`embed` runs them.
    """
    model = model.to(device)
    if run.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if run.compile:
        for name in _COMPILED_METHODS:
            if hasattr(model, name):
                setattr(model, name, torch.compile(getattr(model, name), backend=compile_backend))
    return model


def embed(
    model: torch.nn.Module,
    paths: Sequence[str | Path],
    config: EmbeddingConfig,
    *,
    device: str,
    run: RunConfig = RunConfig(),
) -> Iterator[Batch]:
    """Run the frozen ``model`` over image files, one :class:`Batch` at a time.

    Args:
        model: a prepared model (see :func:`prepare_model`) on ``device``.
        paths: image files, or an :class:`~embedpipe.data.items.ItemColumn`; a batch's ``rows`` index into it.
        config: the embedding config (preprocessing, outputs, precision).
        device: a resolved device string.
        run: batch size, workers and the rest of how to run.
    """
    batch_size = default_batch_size(device) if run.batch_size is None else run.batch_size
    workers = default_workers(device) if run.num_workers is None else run.num_workers
    workers = min(workers, max(0, (len(paths) + batch_size - 1) // batch_size))
    on_cuda = device.startswith("cuda")
    loader = torch.utils.data.DataLoader(
        ImageFiles(paths, config),
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=collate_images,
        pin_memory=on_cuda,
        prefetch_factor=4 if workers else None,
        persistent_workers=False,
    )
    forward = _FittingForward(model, config.outputs, precision=config.precision, device=device, limit=batch_size)
    memory_format = torch.channels_last if run.channels_last else torch.contiguous_format
    with torch.inference_mode():
        for rows, images, reasons in loader:
            ok = torch.tensor([not reason for reason in reasons], dtype=torch.bool)
            errors = [(int(row), reason) for row, reason in zip(rows.tolist(), reasons) if reason]
            if not bool(ok.any()):
                yield Batch(rows=np.empty(0, dtype=np.int64), outputs={}, errors=errors)
                continue
            if not bool(ok.all()):
                rows, images = rows[ok], images[ok]
            x = images.to(device, non_blocking=on_cuda).contiguous(memory_format=memory_format)
            x = normalize(x, config.preprocess)
            out = forward(x)
            yield Batch(
                rows=rows.numpy().astype(np.int64),
                outputs={name: value.float().cpu().numpy() for name, value in out.items()},
                errors=errors,
            )
