"""fit-head / evaluate / predict end to end on real extractions, and head files that cannot run code."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import embedpipe
from embedpipe import BackboneSpec, RunConfig
from embedpipe.errors import HeadError
from embedpipe.heads import load_head
from embedpipe.heads import evaluate, fit_head, predict

from .conftest import make_tree


@pytest.fixture(scope="module")
def extracted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """60 synthetic images embedded by test_resnet (random weights): (data, cache, exported file)."""
    root = tmp_path_factory.mktemp("fit")
    data = make_tree(root / "shapes", per_class=20)
    spec = BackboneSpec(name="test_resnet", pretrained=False, preprocess={"input_size": 64})
    result = embedpipe.extract(data, spec, cache_dir=root / "cache", run=RunConfig(batch_size=32, num_workers=0))
    return data, root / "cache", result.path


@pytest.mark.parametrize("kind", ["logreg", "knn", "mlp"])
def test_each_head_learns_and_round_trips(extracted: tuple[Path, Path, Path], tmp_path: Path, kind: str) -> None:
    _, _, file = extracted
    result = fit_head(file, kind, out=tmp_path / kind)
    assert result.metrics["train"]["accuracy"] >= 0.9 and result.metrics["test"]["accuracy"] >= 0.75, result.metrics
    assert set(result.metrics) == {"train", "val", "test"} and result.diagnosis
    head, info = load_head(tmp_path / kind)
    X, _, _ = embedpipe.load(file)
    np.testing.assert_allclose(head.predict_proba(X), result.head.predict_proba(X), rtol=1e-6, atol=1e-7)
    assert list(head.classes_) == ["circles", "squares", "stripes"] and info["cache_key"]
    assert evaluate(tmp_path / kind, file, split="test")["test"]["accuracy"] == result.metrics["test"]["accuracy"]


def test_few_shot_uses_k_per_class(extracted: tuple[Path, Path, Path]) -> None:
    result = fit_head(extracted[2], "knn", shots=2, seed=3)
    assert result.n_train == 6


def test_head_refuses_embeddings_of_another_backbone(extracted: tuple[Path, Path, Path], tmp_path: Path) -> None:
    data, cache, file = extracted
    fit_head(file, "logreg", out=tmp_path / "head", params={"Cs": 5})
    spec = BackboneSpec(name="test_vit", pretrained=False, preprocess={"input_size": 64})
    other = embedpipe.extract(data, spec, cache_dir=cache, run=RunConfig(batch_size=32, num_workers=0))
    with pytest.raises(HeadError, match="another backbone or preprocessing"):
        evaluate(tmp_path / "head", other.path)


def test_predict_rebuilds_the_pipeline_and_reports_bad_images(extracted: tuple[Path, Path, Path], tmp_path: Path) -> None:
    data, cache, file = extracted
    fit_head(file, "logreg", out=tmp_path / "head", params={"Cs": 5})
    new = make_tree(tmp_path / "new", per_class=2, start=200)
    (new / "circles" / "broken.jpg").write_bytes(b"\xff\xd8 not really")
    predictions, failed = predict(tmp_path / "head", new, top_k=2, cache_dir=cache, run=RunConfig(num_workers=0))
    assert [p for p, _ in failed] == ["circles/broken.jpg"]
    assert len(predictions) == 6 and all(len(p.top) == 2 for p in predictions)
    assert sum(p.label == p.path.split("/")[0] for p in predictions) >= 5  # class visible in colour and shape
    done = subprocess.run([sys.executable, "-m", "embedpipe", "predict", str(tmp_path / "head"), str(new), "--out",
                           str(tmp_path / "p.json"), "--cache-dir", str(cache), "--workers", "0"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert len(json.loads((tmp_path / "p.json").read_text())) == 6 and "broken.jpg" in done.stderr


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


def test_a_crafted_head_cannot_run_code(extracted: tuple[Path, Path, Path], tmp_path: Path) -> None:
    fit_head(extracted[2], "logreg", out=tmp_path / "head", params={"Cs": 3})
    marker = tmp_path / "marker"
    (tmp_path / "head" / "arrays.safetensors").write_bytes(pickle.dumps(_Exploit(marker)))
    with pytest.raises(HeadError, match="not a readable safetensors"):
        load_head(tmp_path / "head")
    assert not marker.exists()
    (tmp_path / "head" / "head.json").write_bytes(pickle.dumps(_Exploit(marker)))
    with pytest.raises(HeadError, match="not readable JSON"):
        load_head(tmp_path / "head")
    assert not marker.exists()
    with pytest.raises(HeadError, match="not a saved head"):
        load_head(tmp_path / "nothing")


def test_unlabelled_embeddings_and_unknown_head_get_clear_errors(extracted: tuple[Path, Path, Path], tmp_path: Path) -> None:
    data, cache, _ = extracted
    plain = tmp_path / "plain"
    plain.mkdir()
    for image in sorted((data / "circles").iterdir())[:3]:
        (plain / image.name).write_bytes(image.read_bytes())
    spec = BackboneSpec(name="test_resnet", pretrained=False, preprocess={"input_size": 64})
    unlabelled = embedpipe.extract(plain, spec, cache_dir=cache, run=RunConfig(num_workers=0))
    with pytest.raises(HeadError, match="unlabelled"):
        fit_head(unlabelled.path, "logreg")
    with pytest.raises(HeadError, match="unknown head"):
        fit_head(unlabelled.path, "svm")
    cli = subprocess.run([sys.executable, "-m", "embedpipe", "fit-head", str(unlabelled.path)], capture_output=True, text=True)
    assert cli.returncode != 0 and cli.stderr.strip().startswith("error:") and len(cli.stderr.strip().splitlines()) == 1
