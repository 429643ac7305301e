"""The simplejpeg fast path (embedpipe[turbo]) gives Pillow's pixels, and hands every other file to Pillow."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from embedpipe import preprocess
from embedpipe.preprocess import decode_image

pytest.importorskip("simplejpeg")

from .conftest import draw  # noqa: E402


def pillow_decode(path: Path, draft_to: int | None, monkeypatch: pytest.MonkeyPatch) -> np.ndarray:
    with monkeypatch.context() as m:
        m.setattr(preprocess, "_simplejpeg", None)
        return np.asarray(decode_image(path, draft_to=draft_to))


def photo(size: tuple[int, int], seed: int = 0) -> Image.Image:
    """Smooth colour with noise: chroma detail that subsampling and upsampling choices would show."""
    rng = np.random.default_rng(seed)
    w, h = size
    base = Image.fromarray(rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
    noisy = np.asarray(base, dtype=np.int16) + rng.normal(0, 12, (h, w, 3)).astype(np.int16)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


CASES = {
    "420": ({}, (333, 251)),
    "444": ({"subsampling": 0}, (333, 251)),
    "422": ({"subsampling": 1}, (200, 150)),
    "progressive": ({"progressive": True}, (640, 480)),
    "large": ({}, (1100, 830)),
    "tiny": ({}, (17, 9)),
}


@pytest.mark.parametrize("draft_to", [None, 73, 235], ids=["full", "draft73", "draft235"])
@pytest.mark.parametrize("case", list(CASES))
def test_same_pixels_as_pillow(tmp_path: Path, case: str, draft_to: int | None, monkeypatch: pytest.MonkeyPatch) -> None:
    options, size = CASES[case]
    path = tmp_path / "a.jpg"
    photo(size).save(path, quality=88, **options)
    assert preprocess._fast_jpeg(path, draft_to) is not None  # the fast path is taken
    ours = np.asarray(decode_image(path, draft_to=draft_to))
    theirs = pillow_decode(path, draft_to, monkeypatch)
    assert ours.shape == theirs.shape and ours.dtype == np.uint8
    assert np.array_equal(ours, theirs)


def test_grayscale_becomes_the_same_rgb(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "gray.jpg"
    photo((300, 200)).convert("L").save(path, quality=90)
    assert preprocess._fast_jpeg(path, 64) is not None
    assert np.array_equal(np.asarray(decode_image(path, draft_to=64)), pillow_decode(path, 64, monkeypatch))


def test_other_files_go_to_pillow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    image = draw("circles", seed=3, size=(120, 90))
    rotated = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    image.save(rotated, quality=90, exif=exif)
    upright = tmp_path / "upright.jpg"
    exif[0x0112] = 1
    image.save(upright, quality=90, exif=exif)
    cmyk = tmp_path / "cmyk.jpg"
    image.convert("CMYK").save(cmyk, quality=90)
    png = tmp_path / "a.png"
    image.save(png)
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(upright.read_bytes()[:-200])

    for path in (rotated, cmyk, png, truncated):
        assert preprocess._fast_jpeg(path, None) is None, path.name
    assert preprocess._fast_jpeg(upright, None) is not None  # EXIF without a rotation stays fast
    assert decode_image(rotated).size == (90, 120)
    for path in (rotated, cmyk, png, upright):
        assert np.array_equal(np.asarray(decode_image(path)), pillow_decode(path, None, monkeypatch)), path.name
    with pytest.raises(OSError, match="truncated"):
        decode_image(truncated)
