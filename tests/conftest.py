"""Shared fixtures: synthetic images whose class is visible, and a tiny random-weight backbone."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from embedpipe import BackboneSpec, RunConfig

CLASSES = ("circles", "squares", "stripes")


def draw(kind: str, seed: int, size: tuple[int, int] = (96, 80)) -> Image.Image:
    """An RGB image whose class shows in its colour and shape, with per-image jitter."""
    rng = np.random.default_rng(seed)
    w, h = size
    base = rng.integers(0, 40, size=(h, w, 3)).astype(np.uint8)
    image = Image.fromarray(base)
    pen = ImageDraw.Draw(image)
    x, y = int(rng.integers(5, w // 3)), int(rng.integers(5, h // 3))
    r = int(rng.integers(w // 5, w // 3))
    if kind == "circles":
        pen.ellipse((x, y, x + 2 * r, y + 2 * r), fill=(230, int(rng.integers(20, 80)), 30))
    elif kind == "squares":
        pen.rectangle((x, y, x + 2 * r, y + 2 * r), fill=(30, 220, int(rng.integers(20, 80))))
    else:
        for i in range(0, w, 10):
            pen.line((i, 0, i, h), fill=(40, int(rng.integers(20, 80)), 230), width=4)
    return image


def make_tree(root: Path, per_class: int = 8, *, start: int = 0) -> Path:
    """ImageFolder layout; JPEG and PNG mixed; sizes vary."""
    for c, kind in enumerate(CLASSES):
        folder = root / kind
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(start, start + per_class):
            image = draw(kind, seed=1000 * c + i, size=(80 + 4 * (i % 5), 72 + 3 * (i % 4)))
            suffix = ".jpg" if i % 2 else ".png"
            image.save(folder / f"{kind}_{i:03d}{suffix}", quality=92)
    return root


@pytest.fixture(scope="session")
def image_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A read-only ImageFolder of 3 x 8 synthetic images; copy it before changing it."""
    return make_tree(tmp_path_factory.mktemp("images") / "shapes")


@pytest.fixture
def tree_copy(image_tree: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(image_tree, tmp_path / "shapes"))


@pytest.fixture
def spec() -> BackboneSpec:
    """test_resnet, random weights, 64 px, fp32 compute and storage so values compare with timm's forward."""
    return BackboneSpec(
        name="test_resnet", pretrained=False, preprocess={"input_size": 64}, precision="fp32", dtype="float32"
    )


@pytest.fixture
def run() -> RunConfig:
    return RunConfig(device="cpu", batch_size=8, num_workers=0)


@pytest.fixture(scope="session")
def artifacts(image_tree: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Real files to tamper with, made once: an export, a saved head of each kind and a finished fine-tune run.

    Read-only: copy a file before changing it. Keys: ``data``, ``cache``, ``export``, ``logreg``, ``knn``,
    ``mlp`` (head folders), ``run`` (a fine-tune run folder).
    """
    import embedpipe
    from embedpipe.config import FineTuneConfig
    from embedpipe.heads import fit_head

    root = tmp_path_factory.mktemp("artifacts")
    spec = BackboneSpec(name="test_resnet", pretrained=False, preprocess={"input_size": 64}, precision="fp32")
    run = RunConfig(device="cpu", batch_size=8, num_workers=0)
    export = embedpipe.extract(image_tree, spec, cache_dir=root / "cache", run=run).path
    found = {"data": image_tree, "cache": root / "cache", "export": export}
    params = {"logreg": {"Cs": 3, "device": "cpu"}, "knn": {"device": "cpu"}, "mlp": {"hidden": 16, "max_epochs": 3, "device": "cpu"}}
    for kind, kind_params in params.items():
        fit_head(export, kind, out=root / kind, params=kind_params)
        found[kind] = root / kind
    config = FineTuneConfig(batch_size=8, augment="none", warmup=0.0, head_epochs=1, epochs=1, unfreeze="none")
    embedpipe.fine_tune(image_tree, spec, out=root / "run", config=config, cache_dir=root / "cache", run=run)
    found["run"] = root / "run"
    return found


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """The fuzz suite's case counts, when it ran (tests/test_fuzz.py)."""
    fuzz = sys.modules.get("tests.test_fuzz")
    cases = getattr(fuzz, "CASES", None)
    if cases:
        total = sum(v for k, v in cases.items() if k.endswith(" cases"))
        terminalreporter.write_line(f"fuzz: {total} cases; " + ", ".join(f"{k} {v}" for k, v in sorted(cases.items())))
