"""The command line: the offline default end to end, clean one-line errors, cache commands."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import embedpipe

from .test_weights import EXPECTED, _photo


def embedpipe_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "embedpipe", *args], capture_output=True, text=True, cwd=cwd, timeout=600)


def test_offline_default_classifies_shipped_photos_with_no_flags(tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in EXPECTED:
        Image.fromarray(_photo(name)).save(photos / f"{name}.jpg", quality=95)
    done = embedpipe_cli("extract", str(photos), "--output", "logits", "--cache-dir", str(tmp_path / "cache"))
    assert done.returncode == 0, done.stderr
    logits, labels, meta = embedpipe.load(done.stdout.strip(), output="logits")
    assert meta["backbone"] == "tf_efficientnet_lite0" and meta["weights"].startswith("sha256:")
    assert (labels == -1).all() and meta["split"] is None  # a plain folder is unlabelled
    for path, row in zip(meta["paths"], logits):
        top5 = set(np.argsort(row)[-5:].tolist())
        assert top5 & EXPECTED[Path(path).stem], (path, sorted(top5))


@pytest.mark.parametrize(
    ("setup", "args", "message"),
    [
        (None, ["extract", "{tmp}/missing"], "does not exist"),
        ("empty", ["extract", "{tmp}/empty"], "no images found"),
        ("manifest_nocol", ["extract", "{tmp}/m.csv"], "no 'path' column"),
        ("manifest_escape", ["extract", "{tmp}/m.csv"], "escapes"),
        ("manifest_missing", ["extract", "{tmp}/m.csv"], "do not exist"),
        ("tree", ["extract", "{tmp}/tree", "-b", "resnet_nonexistent"], "unknown backbone"),
        ("tree", ["extract", "{tmp}/tree", "-b", "test_resnet", "--weights", "{tmp}/bad.pth"], "bad.pth"),
        ("tree", ["extract", "{tmp}/tree", "-b", "test_resnet", "--output", "bogus", "--no-pretrained"], "unknown output"),
        (None, ["cache", "info", "{tmp}/nothing.h5"], "does not exist"),
    ],
)
def test_bad_input_gets_one_line_and_nonzero_exit(tmp_path: Path, setup: str | None, args: list[str], message: str) -> None:
    if setup == "empty":
        (tmp_path / "empty").mkdir()
    elif setup and setup.startswith("manifest"):
        header = "file,label" if setup == "manifest_nocol" else "path,label"
        row = "../outside.jpg,a" if setup == "manifest_escape" else "nothere.jpg,a"
        (tmp_path / "m.csv").write_text(f"{header}\n{row}\n")
    elif setup == "tree":
        (tmp_path / "tree" / "a").mkdir(parents=True)
        Image.new("RGB", (40, 40), "red").save(tmp_path / "tree" / "a" / "x.png")
        (tmp_path / "bad.pth").write_bytes(b"\x80\x04garbage")
    done = embedpipe_cli(*[a.format(tmp=tmp_path) for a in args], "--cache-dir", str(tmp_path / "c")) if args[0] == "extract" else embedpipe_cli(*[a.format(tmp=tmp_path) for a in args])
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    assert message in lines[0] and "Traceback" not in done.stderr


def test_cache_commands(image_tree: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    base = ["-b", "test_resnet", "--no-pretrained", "--img-size", "64", "--cache-dir", str(cache), "--workers", "0"]
    first = embedpipe_cli("extract", str(image_tree), *base, "--json")
    assert first.returncode == 0, first.stderr
    result = json.loads(first.stdout)
    assert result["computed"] == 24 and not result["cache_hit"]
    again = embedpipe_cli("extract", str(image_tree), *base)
    assert again.stdout.strip() == result["path"] and "cache hit" in again.stderr

    listing = embedpipe_cli("cache", "ls", "--cache-dir", str(cache), "--json")
    entries = json.loads(listing.stdout)
    assert [e["path"] for e in entries["exports"]] == [result["path"]] and entries["stores"][0]["rows"] == 24
    info = json.loads(embedpipe_cli("cache", "info", result["path"], "--json").stdout)
    assert info["rows"] == 24 and info["class_names"] == ["circles", "squares", "stripes"]
    assert embedpipe_cli("cache", "verify", str(cache)).returncode == 0

    with open(result["path"], "r+b") as handle:  # flip bytes inside the embeddings' chunk
        handle.seek(-4000, 2)
        handle.write(b"\xff" * 64)
    assert embedpipe_cli("cache", "verify", result["path"]).returncode == 1

    assert embedpipe_cli("cache", "rm", "nomatch", "--cache-dir", str(cache)).returncode != 0
    removed = embedpipe_cli("cache", "rm", "test_resnet", "--cache-dir", str(cache))
    assert removed.returncode == 0 and not list(cache.glob("*.h5")) and not list(cache.glob("store/*"))


def test_help_is_instant_and_lists_commands() -> None:
    done = embedpipe_cli("--help")
    assert done.returncode == 0 and "extract" in done.stdout and "cache" in done.stdout
    heavy = subprocess.run(
        [sys.executable, "-c", "import sys, embedpipe.cli; print('torch' in sys.modules)"], capture_output=True, text=True
    )
    assert heavy.stdout.strip() == "False"  # --help never imports torch


def test_example_dataset_from_pypi_is_a_labelled_manifest(tmp_path: Path) -> None:
    done = embedpipe_cli("example-data", "elpv", str(tmp_path / "elpv"))
    assert done.returncode == 0, done.stderr
    from embedpipe.data import load_dataset

    dataset = load_dataset(done.stdout.strip())
    assert len(dataset) == 2624 and dataset.class_names == ("defective", "functional")
    assert dataset.name == "elpv" and {r.split for r in dataset.records} == {"train", "val", "test"}
    with Image.open(dataset.records[0].path) as image:
        assert image.size == (300, 300)


def test_bf16_embeddings_stay_close_to_fp32_on_real_weights(tmp_path: Path) -> None:
    """bf16 is the CPU default only where it keeps cosine >= 0.99 of fp32 (real photos, real weights)."""
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in EXPECTED:
        Image.fromarray(_photo(name)).save(photos / f"{name}.png")
    run = embedpipe.RunConfig(num_workers=0)
    files = {
        precision: embedpipe.extract(photos, embedpipe.BackboneSpec(precision=precision, dtype="float32"), cache_dir=tmp_path, run=run).path
        for precision in ("fp32", "bf16")
    }
    a, b = embedpipe.load(files["fp32"])[0], embedpipe.load(files["bf16"])[0]
    cosine = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cosine.min() >= 0.99, cosine


def test_the_command_tunes_glibc_malloc_and_the_library_does_not(monkeypatch: pytest.MonkeyPatch) -> None:
    import embedpipe.allocator as malloc
    from embedpipe.cli import main

    assert malloc.keep_freed_memory() is True  # glibc on Linux: both thresholds accepted
    monkeypatch.setenv("EMBEDPIPE_MALLOC_TUNING", "0")
    assert malloc.keep_freed_memory() is False
    calls: list[int] = []
    monkeypatch.setattr(malloc, "keep_freed_memory", lambda: calls.append(1) or True)
    monkeypatch.setattr("sys.argv", ["embedpipe", "--help"])
    with pytest.raises(SystemExit):
        main()
    assert calls == [1]
