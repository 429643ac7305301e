"""What the commands share: their options, how those become configs, error handling and progress bars.

Defined once here so every command spells an option the same way (pip-tools' ``scripts/options.py``).
"""

from __future__ import annotations

import contextlib
import functools
import math
import sys
from collections.abc import Callable, Iterator
from typing import Any

import click

from ..config import DEFAULT_BACKBONE, IMAGE_CHANNELS, INTERPOLATIONS, MAX_INPUT_SIZE, BackboneSpec, RunConfig
from ..errors import EmbedpipeError


def handle_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """Turn library errors into ``error: <message>`` and the error's exit code."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except EmbedpipeError as error:
            click.echo(f"error: {error}", err=True)
            sys.exit(error.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted: finished batches are kept in the cache; rerun to resume", err=True)
            sys.exit(130)

    return wrapper


def progress_factory(quiet: bool) -> Callable[[str, int], Any]:
    @contextlib.contextmanager
    def factory(stage: str, total: int) -> Iterator[Callable[[int], None]]:
        if quiet or total == 0:
            yield lambda n: None
            return
        from tqdm import tqdm

        # disable=None: no bar when stderr is not a terminal (logs, CI, pipes).
        unit = "fit" if stage.endswith("fits") else "img"  # bench counts head fits
        with tqdm(total=total, desc=stage, unit=unit, dynamic_ncols=True, file=sys.stderr, leave=False, disable=None) as bar:
            yield bar.update

    return factory


def backbone_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """Options shared by every command that runs a backbone (extract, predict, fine-tune, bench)."""
    options = [
        click.option("--backbone", "-b", default=DEFAULT_BACKBONE, show_default=True,
                     help="timm model name, optionally with a pretrained tag (resnet50.a1_in1k)."),
        click.option("--weights", type=click.Path(dir_okay=False), default=None,
                     help="Local .safetensors or .pth weights for the backbone (loaded without running pickled code)."),
        click.option("--no-pretrained", is_flag=True, help="Random (seeded) weights, for tests."),
        click.option("--cache-dir", type=click.Path(file_okay=False), default="cache", show_default=True,
                     help="Cache folder for embeddings."),
        click.option("--device", default="auto", show_default=True, help="auto picks cuda, then mps, then cpu."),
        click.option("--precision", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), default="auto", show_default=True,
                     help="Compute precision: auto is bf16 on CUDA and on CPUs with native bf16, else fp32."),
        click.option("--dtype", type=click.Choice(["float16", "float32"]), default="float16", show_default=True,
                     help="Storage dtype of the embeddings."),
        click.option("--output", "outputs", multiple=True, default=("embedding",), show_default=True,
                     help="What to store: embedding (pooled pre-logits), logits, stageN; repeatable."),
        click.option("--img-size", type=click.IntRange(1, MAX_INPUT_SIZE), default=None, help="Override the input size (square)."),
        click.option("--crop-pct", type=click.FloatRange(0, 1, min_open=True), default=None,
                     help="Override the centre-crop fraction, in (0, 1]."),
        click.option("--interpolation", type=click.Choice(INTERPOLATIONS), default=None, help="Override the resize interpolation."),
        click.option("--mean", type=CHANNEL_VALUES, default=None, help="Override the normalisation mean, e.g. 0.5,0.5,0.5."),
        click.option("--std", type=CHANNEL_VALUES_POSITIVE, default=None, help="Override the normalisation std, e.g. 0.5,0.5,0.5."),
        click.option("--no-jpeg-draft", is_flag=True, help="Decode JPEGs at full size even when much larger than needed."),
        click.option("--batch-size", type=click.IntRange(min=1), default=None,
                     help="Images per batch [default: 256 on CUDA, 64 on CPU]; halved on out-of-memory."),
        click.option("--workers", type=click.IntRange(min=0), default=None, help="DataLoader decode workers [default: by device: GPU min(16, cores); CPU cores // 6, none below 6 cores]."),
        click.option("--compile", "compile_", is_flag=True, help="torch.compile the backbone."),
        click.option("--no-channels-last", is_flag=True, help="Keep NCHW memory format."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


FRACTION = click.FloatRange(0, 1, max_open=True)  # a share of the images: --val-fraction, --test-fraction
POSITIVE = click.FloatRange(0, min_open=True)  # learning rates and decay factors


class ChannelValues(click.ParamType):
    """One finite number per RGB channel, comma-separated: ``0.5,0.5,0.5``."""

    name = "R,G,B"

    def __init__(self, *, positive: bool = False) -> None:
        self.positive = positive

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> tuple[float, ...]:
        if isinstance(value, tuple):
            return value
        try:
            numbers = tuple(float(v) for v in str(value).split(","))
        except ValueError:
            self.fail(f"{value!r} is not a comma-separated list of numbers, e.g. 0.5,0.5,0.5", param, ctx)
        if len(numbers) != IMAGE_CHANNELS:
            self.fail(f"{value!r} has {len(numbers)} values; images are RGB, so give {IMAGE_CHANNELS}, e.g. 0.5,0.5,0.5", param, ctx)
        if not all(math.isfinite(v) for v in numbers) or (self.positive and min(numbers) <= 0):
            self.fail(f"{value!r} must be {'positive' if self.positive else 'finite'} numbers, e.g. 0.5,0.5,0.5", param, ctx)
        return numbers


CHANNEL_VALUES = ChannelValues()
CHANNEL_VALUES_POSITIVE = ChannelValues(positive=True)


def backbone_spec(kw: dict[str, Any]) -> Any:
    """Build a BackboneSpec from the shared options (popping them from ``kw``)."""
    preprocess = {
        "input_size": kw.pop("img_size"),
        "crop_pct": kw.pop("crop_pct"),
        "interpolation": kw.pop("interpolation"),
        "mean": kw.pop("mean"),
        "std": kw.pop("std"),
    }
    if kw.pop("no_jpeg_draft"):
        preprocess["jpeg_draft"] = False
    outputs = tuple(o for value in kw.pop("outputs") for o in value.split(",") if o)
    return BackboneSpec(
        name=kw.pop("backbone"),
        weights=kw.pop("weights"),
        pretrained=not kw.pop("no_pretrained"),
        outputs=outputs,
        precision=kw.pop("precision"),
        dtype=kw.pop("dtype"),
        preprocess={k: v for k, v in preprocess.items() if v is not None},
    )


def run_config(kw: dict[str, Any], *, on_error: str = "skip") -> Any:
    return RunConfig(
        device=kw.pop("device"),
        batch_size=kw.pop("batch_size"),
        num_workers=kw.pop("workers"),
        channels_last=not kw.pop("no_channels_last"),
        compile=kw.pop("compile_"),
        on_error=on_error,
    )
