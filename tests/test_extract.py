"""Extraction and the cache, checked against timm's own forward and against uninterrupted runs."""

from __future__ import annotations

import dataclasses
import errno
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

import embedpipe
from embedpipe import BackboneSpec, RunConfig
from embedpipe.backbone import load_backbone
from embedpipe.errors import BackboneError, CacheError, ImageDecodeError
from embedpipe.extraction import resolve
from embedpipe.preprocess import decode_image, eval_transform, normalize, resize_target

from .conftest import draw, make_tree


def reference_embeddings(paths: list[Path], spec: BackboneSpec, output: str = "embedding") -> np.ndarray:
    """timm's own forward_head(forward_features(x), pre_logits=True) on the same preprocessed tensors."""
    config = resolve(spec, "cpu")
    model = load_backbone(spec.name, pretrained=spec.pretrained, weights=spec.weights)
    transform = eval_transform(config.preprocess)
    draft = resize_target(config.preprocess) if config.preprocess.jpeg_draft else None
    x = torch.stack([transform(decode_image(p, draft_to=draft)) for p in paths])
    with torch.inference_mode():
        features = model.forward_features(normalize(x, config.preprocess))
        head = model.forward_head(features, pre_logits=(output == "embedding"))
    return head.numpy()


@pytest.mark.parametrize("name", ["test_resnet", "test_vit", "test_efficientnet", "test_convnext"])
def test_embeddings_equal_timm_forward(image_tree: Path, tmp_path: Path, spec: BackboneSpec, run: RunConfig, name: str) -> None:
    spec = dataclasses.replace(spec, name=name, outputs=("embedding", "logits"))
    result = embedpipe.extract(image_tree, spec, cache_dir=tmp_path / "cache", run=run)
    X, y, meta = embedpipe.load(result.path)
    logits, _, _ = embedpipe.load(result.path, output="logits")
    paths = [image_tree / p for p in meta["paths"]]
    assert X.shape == (24, reference_embeddings(paths[:1], spec).shape[1])
    np.testing.assert_allclose(X, reference_embeddings(paths, spec), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(logits, reference_embeddings(paths, spec, output="logits"), rtol=1e-4, atol=1e-5)
    assert meta["class_names"] == ["circles", "squares", "stripes"]
    assert list(y) == [meta["class_names"].index(p.split("/")[0]) for p in meta["paths"]]


def test_export_layout_and_metadata(image_tree: Path, tmp_path: Path, spec: BackboneSpec, run: RunConfig) -> None:
    result = embedpipe.extract(image_tree, dataclasses.replace(spec, dtype="float16"), cache_dir=tmp_path, run=run)
    with h5py.File(result.path, "r") as f:
        assert f["embeddings"].dtype == np.float16 and f["embeddings"].shape[0] == 24
        assert f["labels"].dtype == np.int64
        assert sorted(set(f["split"].asstr()[:])) == ["test", "train", "val"]
        attrs = dict(f.attrs)
    for key in ("backbone", "weights", "preprocess", "outputs", "dtype", "versions", "dataset_fingerprint", "class_names", "split_seed"):
        assert key in attrs, key
    assert attrs["weights"] == "random:0" and attrs["backbone"] == "test_resnet"
    assert embedpipe.cache_verify(tmp_path) == []


def test_stage_outputs_come_from_the_same_forward(image_tree: Path, tmp_path: Path, spec: BackboneSpec, run: RunConfig) -> None:
    spec = dataclasses.replace(spec, outputs=("embedding", "stage1"))
    result = embedpipe.extract(image_tree, spec, cache_dir=tmp_path, run=run)
    stage, _, meta = embedpipe.load(result.path, output="stage1")
    model = load_backbone("test_resnet", pretrained=False)
    config = resolve(spec, "cpu")
    transform = eval_transform(config.preprocess)
    x = normalize(torch.stack([transform(decode_image(image_tree / p, draft_to=None)) for p in meta["paths"][:4]]), config.preprocess)
    with torch.inference_mode():
        _, (feature_map,) = model.forward_intermediates(x, indices=[1])
    np.testing.assert_allclose(stage[:4], feature_map.mean(dim=(2, 3)).numpy(), rtol=1e-4, atol=1e-5)


def test_batch_size_invariance(image_tree: Path, tmp_path: Path, spec: BackboneSpec) -> None:
    small = embedpipe.extract(image_tree, spec, cache_dir=tmp_path / "a", run=RunConfig(batch_size=3, num_workers=0))
    large = embedpipe.extract(image_tree, spec, cache_dir=tmp_path / "b", run=RunConfig(batch_size=32, num_workers=2))
    np.testing.assert_allclose(embedpipe.load(small.path)[0], embedpipe.load(large.path)[0], rtol=1e-4, atol=1e-5)


def test_cache_hit_runs_no_forward(image_tree: Path, tmp_path: Path, spec: BackboneSpec, run: RunConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    first = embedpipe.extract(image_tree, spec, cache_dir=tmp_path, run=run)
    assert not first.cache_hit and first.computed == 24

    def no_forward(*args: object, **kwargs: object) -> None:
        raise AssertionError("the network ran on a cache hit")

    monkeypatch.setattr("embedpipe.inference.forward_outputs", no_forward)
    monkeypatch.setattr("embedpipe.backbone.load_backbone", no_forward)
    second = embedpipe.extract(image_tree, spec, cache_dir=tmp_path, run=run)
    assert second.cache_hit and second.computed == 0 and second.path == first.path


def test_key_changes_with_what_changes_the_numbers(image_tree: Path, tmp_path: Path, spec: BackboneSpec, run: RunConfig) -> None:
    base = embedpipe.extract(image_tree, spec, cache_dir=tmp_path, run=run)
    for changed in (
        dataclasses.replace(spec, preprocess={"input_size": 72}),
        dataclasses.replace(spec, preprocess={"input_size": 64, "crop_pct": 0.8}),
        dataclasses.replace(spec, preprocess={"input_size": 64, "interpolation": "bicubic"}),
        dataclasses.replace(spec, dtype="float16"),
        dataclasses.replace(spec, precision="bf16"),
        dataclasses.replace(spec, outputs=("embedding", "logits")),
    ):
        result = embedpipe.extract(image_tree, changed, cache_dir=tmp_path, run=run)
        assert result.cache_key != base.cache_key and result.computed == 24, changed


def test_new_images_only_are_computed_and_moves_compute_nothing(tree_copy: Path, tmp_path: Path, spec: BackboneSpec, run: RunConfig) -> None:
    cache = tmp_path / "cache"
    embedpipe.extract(tree_copy, spec, cache_dir=cache, run=run)
    make_tree(tree_copy, per_class=1, start=50)  # 3 new images
    grown = embedpipe.extract(tree_copy, spec, cache_dir=cache, run=run)
    assert (grown.computed, grown.reused, grown.num_images) == (3, 24, 27)

    moved = tree_copy / "squares" / "renamed.png"
    (tree_copy / "squares" / "squares_000.png").rename(moved)
    renamed = embedpipe.extract(tree_copy, spec, cache_dir=cache, run=run)
    assert renamed.computed == 0 and not renamed.cache_hit

    other = tmp_path / "other"
    shutil.copytree(tree_copy / "circles", other / "round")
    make_tree(other, per_class=1, start=90)
    shared = embedpipe.extract(other, spec, cache_dir=cache, run=run)
    assert shared.computed == 3 and shared.reused == 9 + 3 - 3

    X, _, meta = embedpipe.load(renamed.path)
    row = meta["paths"].index("squares/renamed.png")
    np.testing.assert_allclose(X[row], reference_embeddings([moved], spec)[0], rtol=1e-4, atol=1e-5)


def test_changed_file_is_rehashed(tree_copy: Path, tmp_path: Path, spec: BackboneSpec, run: RunConfig) -> None:
    embedpipe.extract(tree_copy, spec, cache_dir=tmp_path, run=run)
    target = tree_copy / "stripes" / "stripes_000.png"
    draw("circles", seed=7).save(target)
    os.utime(target, ns=(1, 1))  # even with an old mtime, the size or inode tells
    result = embedpipe.extract(tree_copy, spec, cache_dir=tmp_path, run=run)
    assert result.computed == 1


def test_bad_images_are_recorded_and_rows_stay_aligned(tree_copy: Path, tmp_path: Path, spec: BackboneSpec, run: RunConfig) -> None:
    good = tree_copy / "circles" / "circles_001.jpg"
    (tree_copy / "circles" / "zero.jpg").write_bytes(b"")
    (tree_copy / "circles" / "garbage.png").write_bytes(os.urandom(500))
    (tree_copy / "squares" / "truncated.jpg").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    result = embedpipe.extract(tree_copy, spec, cache_dir=tmp_path, run=run)
    assert sorted(p for p, _ in result.failed) == ["circles/garbage.png", "circles/zero.jpg", "squares/truncated.jpg"]
    X, y, meta = embedpipe.load(result.path)
    assert len(X) == len(meta["paths"]) == len(y) == 24
    np.testing.assert_allclose(X, reference_embeddings([tree_copy / p for p in meta["paths"]], spec), rtol=1e-4, atol=1e-5)
    info = embedpipe.cache_info(result.path)
    assert {e["path"] for e in info["errors"]} == {p for p, _ in result.failed}

    with pytest.raises(ImageDecodeError, match="--on-error skip"):
        embedpipe.extract(tree_copy, spec, cache_dir=tmp_path, run=dataclasses.replace(run, on_error="fail"))
    with pytest.raises(ImageDecodeError, match="truncated.jpg|zero.jpg|garbage.png"):
        embedpipe.extract(tree_copy, spec, cache_dir=tmp_path / "fresh", run=dataclasses.replace(run, on_error="fail"))


def test_unknown_backbone_and_mismatched_weights(image_tree: Path, tmp_path: Path, spec: BackboneSpec, run: RunConfig) -> None:
    with pytest.raises(BackboneError, match="unknown backbone"):
        embedpipe.extract(image_tree, "resnet_nonexistent", cache_dir=tmp_path, run=run)
    from safetensors.torch import save_file

    weights = tmp_path / "vit.safetensors"
    save_file(load_backbone("test_vit", pretrained=False).state_dict(), weights)
    with pytest.raises(BackboneError, match="do not fit"):
        embedpipe.extract(image_tree, dataclasses.replace(spec, weights=str(weights)), cache_dir=tmp_path, run=run)


def test_local_weights_file_is_used_and_keyed_by_content(image_tree: Path, tmp_path: Path, spec: BackboneSpec, run: RunConfig) -> None:
    from safetensors.torch import save_file

    model = load_backbone("test_resnet", pretrained=False)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)
    weights = tmp_path / "scaled.safetensors"
    save_file(model.state_dict(), weights)
    scaled = embedpipe.extract(image_tree, dataclasses.replace(spec, weights=str(weights)), cache_dir=tmp_path / "c", run=run)
    plain = embedpipe.extract(image_tree, spec, cache_dir=tmp_path / "c", run=run)
    assert scaled.cache_key != plain.cache_key
    assert not np.allclose(embedpipe.load(scaled.path)[0], embedpipe.load(plain.path)[0])
    assert embedpipe.load(scaled.path)[2]["weights"].startswith("sha256:")


def test_full_disk_fails_cleanly_and_keeps_the_cache(tree_copy: Path, tmp_path: Path, spec: BackboneSpec, run: RunConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "cache"
    embedpipe.extract(tree_copy, spec, cache_dir=cache, run=run)
    make_tree(tree_copy, per_class=4, start=60)
    real_replace = os.replace
    calls = {"n": 0}

    def full_after_one(src: str, dst: str) -> None:
        calls["n"] += 1
        if calls["n"] > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr("embedpipe.cache.export.os.replace", full_after_one)
    with pytest.raises(CacheError, match="free disk space"):
        embedpipe.extract(tree_copy, spec, cache_dir=cache, run=dataclasses.replace(run, batch_size=2))
    monkeypatch.undo()
    assert embedpipe.cache_verify(cache) == []
    assert not list(cache.rglob(".tmp-*"))
    resumed = embedpipe.extract(tree_copy, spec, cache_dir=cache, run=run)
    assert resumed.computed == 12 - 2  # the one shard that made it to disk is kept


EXTRACT_CMD = [sys.executable, "-m", "embedpipe", "-q", "extract", "--backbone", "resnet18", "--no-pretrained",
               "--img-size", "96", "--dtype", "float32", "--batch-size", "2", "--workers", "0", "--device", "cpu"]


def _shards(cache: Path) -> list[Path]:
    return [p for p in cache.glob("store/*/shards/*.h5") if not p.name.startswith(".")]


@pytest.mark.slow
def test_sigkill_at_several_points_resumes_to_identical_embeddings(tmp_path: Path) -> None:
    data = make_tree(tmp_path / "data", per_class=10)
    reference = subprocess.run([*EXTRACT_CMD, str(data), "--cache-dir", str(tmp_path / "ref")], capture_output=True, text=True, check=True)
    expected, _, expected_meta = embedpipe.load(reference.stdout.strip())
    cache = tmp_path / "killed"
    for kill_after in (0, 1, 4, 9):  # shards committed by this process before the kill; 0: while hashing
        before = len(_shards(cache))
        process = subprocess.Popen([*EXTRACT_CMD, str(data), "--cache-dir", str(cache)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 120
        while process.poll() is None:
            done = len(_shards(cache)) >= before + kill_after if kill_after else (cache / "files.sqlite").exists()
            if done:
                break
            assert time.monotonic() < deadline
            time.sleep(0.002)
        process.send_signal(signal.SIGKILL)
        process.wait()
        assert process.returncode == -signal.SIGKILL, "finished before it could be killed"
        assert embedpipe.cache_verify(cache) == []  # readable at every moment
    resumed = subprocess.run([*EXTRACT_CMD, str(data), "--cache-dir", str(cache), "--json"], capture_output=True, text=True, check=True)
    import json

    result = json.loads(resumed.stdout)
    assert result["computed"] < 30
    X, _, meta = embedpipe.load(result["path"])
    assert meta["paths"] == expected_meta["paths"]
    np.testing.assert_array_equal(X, expected)  # bitwise: same batches, same kernels
    with h5py.File(result["path"], "r") as a, h5py.File(reference.stdout.strip(), "r") as b:
        assert a["embeddings"][:].tobytes() == b["embeddings"][:].tobytes()


@pytest.mark.slow
def test_two_processes_at_once_do_not_corrupt_the_cache(tmp_path: Path) -> None:
    data = make_tree(tmp_path / "data", per_class=6)
    cmd = [*EXTRACT_CMD, str(data), "--cache-dir", str(tmp_path / "cache"), "--json"]
    first, second = (subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2))
    outs = [p.communicate(timeout=300) for p in (first, second)]
    assert first.returncode == 0 and second.returncode == 0, outs
    import json

    results = [json.loads(out) for out, _ in outs]
    assert results[0]["path"] == results[1]["path"]
    assert sorted(r["computed"] for r in results) == [0, 18]  # one waited, then reused everything
    assert embedpipe.cache_verify(tmp_path / "cache") == []


def test_load_by_split_and_missing_file(image_tree: Path, tmp_path: Path, spec: BackboneSpec, run: RunConfig) -> None:
    result = embedpipe.extract(image_tree, spec, cache_dir=tmp_path, run=run)
    X_train, y_train, meta = embedpipe.load(result.path, split="train")
    X_all, _, all_meta = embedpipe.load(result.path)
    assert 0 < len(X_train) < len(X_all) and set(meta["split"]) == {"train"}
    with pytest.raises(CacheError, match="does not exist"):
        embedpipe.load(tmp_path / "nope.h5")
    (tmp_path / "fake.h5").write_bytes(b"not hdf5")
    with pytest.raises(CacheError, match="not a readable HDF5"):
        embedpipe.load(tmp_path / "fake.h5")


def test_hub_weights_load_from_the_local_hf_cache_offline(image_tree: Path, tmp_path: Path) -> None:
    """A tagged timm name resolves through the usual Hugging Face cache, with no network."""
    from safetensors.torch import save_file

    weights = load_backbone("test_resnet", pretrained=False).state_dict()
    weights = {k: v * 1.25 if v.is_floating_point() else v for k, v in weights.items()}  # not the random init
    repo = tmp_path / "hf" / "hub" / "models--timm--test_resnet.r160_in1k"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    save_file(weights, repo / "snapshots" / commit / "model.safetensors")
    save_file(weights, tmp_path / "same.safetensors")

    env = {**os.environ, "HF_HOME": str(tmp_path / "hf")}
    common = ["--img-size", "64", "--dtype", "float32", "--workers", "0", "--cache-dir", str(tmp_path / "cache"), "-q"]
    hub = subprocess.run([sys.executable, "-m", "embedpipe", "extract", str(image_tree), "-b", "test_resnet.r160_in1k", *common],
                         capture_output=True, text=True, env=env, timeout=300)
    assert hub.returncode == 0, hub.stderr
    local = subprocess.run([sys.executable, "-m", "embedpipe", "extract", str(image_tree), "-b", "test_resnet", "--weights",
                            str(tmp_path / "same.safetensors"), *common], capture_output=True, text=True, env=env, timeout=300)
    assert local.returncode == 0, local.stderr
    X_hub, _, meta = embedpipe.load(hub.stdout.strip())
    assert meta["weights"] == "timm:test_resnet.r160_in1k"
    np.testing.assert_allclose(X_hub, embedpipe.load(local.stdout.strip())[0], rtol=1e-5, atol=1e-6)


def test_out_of_memory_halves_the_forward_instead_of_failing(
    image_tree: Path, tmp_path: Path, spec: BackboneSpec, run: RunConfig, monkeypatch: pytest.MonkeyPatch, caplog
) -> None:
    import embedpipe.inference as inference

    reference, _, _ = embedpipe.load(embedpipe.extract(image_tree, spec, cache_dir=tmp_path / "a", run=run).path)
    real = inference.forward_outputs
    sizes: list[int] = []

    def small_device(model, x, outputs):
        sizes.append(len(x))
        if len(x) > 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(model, x, outputs)

    monkeypatch.setattr(inference, "forward_outputs", small_device)
    with caplog.at_level("WARNING", logger="embedpipe.inference"):
        result = embedpipe.extract(image_tree, spec, cache_dir=tmp_path / "b", run=dataclasses.replace(run, batch_size=8))
    X, _, _ = embedpipe.load(result.path)
    np.testing.assert_allclose(X, reference, rtol=1e-5, atol=1e-6)
    assert max(s for s in sizes[3:]) <= 2  # after the first failures the run stays at the size that fitted
    assert "2 images at a time" in caplog.text

    monkeypatch.setattr(inference, "forward_outputs", lambda *a: (_ for _ in ()).throw(torch.OutOfMemoryError("oom")))
    with pytest.raises(BackboneError, match="out of memory for a single image"):
        embedpipe.extract(image_tree, spec, cache_dir=tmp_path / "c", run=run)


def test_compile_compiles_what_embed_calls(image_tree: Path, spec: BackboneSpec) -> None:
    """torch.compile(model) compiles forward() only; embed() calls forward_features and forward_head."""
    import torch._dynamo

    from embedpipe.inference import embed, prepare_model

    graphs: list[int] = []

    def counting(gm: torch.fx.GraphModule, example_inputs: list) -> object:
        graphs.append(len(gm.graph.nodes))
        return gm.forward

    torch._dynamo.reset()
    paths = sorted(image_tree.rglob("*.jpg"))[:4]
    config = resolve(spec, "cpu")
    run = RunConfig(device="cpu", batch_size=4, num_workers=0, compile=True)
    model = prepare_model(load_backbone(spec.name, pretrained=False), "cpu", run, compile_backend=counting)
    (batch,) = list(embed(model, paths, config, device="cpu", run=run))
    assert len(graphs) >= 2  # forward_features and forward_head were traced
    np.testing.assert_allclose(batch.outputs["embedding"], reference_embeddings(paths, spec), rtol=1e-4, atol=1e-5)
