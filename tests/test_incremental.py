"""The cache-hit fast path and incremental runs: no stale row, whatever changes, and a hit that imports no torch."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import embedpipe
from embedpipe import BackboneSpec, RunConfig
from embedpipe.cache.index import RACY_NS

from .conftest import draw, make_tree


def _settle(folder: Path) -> None:
    """Wait until every file below ``folder`` is older than the racily-clean window, as files normally are."""
    newest = max(max(p.stat().st_mtime_ns, p.stat().st_ctime_ns) for p in folder.rglob("*") if p.is_file())
    time.sleep(max(0.0, (newest + RACY_NS - time.time_ns()) / 1e9 + 0.05))


def _fresh(tree: Path, spec: BackboneSpec, run: RunConfig, tmp_path: Path) -> np.ndarray:
    """The embeddings an empty cache gives: what any cached answer must equal."""
    cache = tmp_path / f"fresh-{time.time_ns()}"
    return embedpipe.load(embedpipe.extract(tree, spec, cache_dir=cache, run=run).path)[0]


def test_cache_hit_imports_neither_torch_nor_timm_nor_h5py(tree_copy: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"

    def extract(seed: int) -> dict:
        code = (
            "import json, sys, embedpipe\n"
            "spec = embedpipe.BackboneSpec(name='test_resnet', pretrained=False, preprocess={'input_size': 64}, precision='fp32')\n"
            f"r = embedpipe.extract({str(tree_copy)!r}, spec, cache_dir={str(cache)!r}, split=embedpipe.SplitConfig(seed={seed}), "
            "run=embedpipe.RunConfig(device='auto', num_workers=0))\n"
            "print(json.dumps({'hit': r.cache_hit, 'computed': r.computed, 'rows': r.num_images, "
            "'imported': sorted(m for m in ('torch', 'timm', 'torchvision', 'h5py', 'urllib.request') if m in sys.modules)}))\n"
        )
        return json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)

    _settle(tree_copy)
    runs = [extract(seed=0) for _ in range(2)]
    assert runs[0]["computed"] == 24 and {"h5py", "timm", "torch", "torchvision"} <= set(runs[0]["imported"])  # the test can fail
    assert runs[1] == {"hit": True, "computed": 0, "rows": 24, "imported": []}
    # Another split: a new export, every row already in the store, so it is written without building the network.
    assert extract(seed=1) == {"hit": False, "computed": 0, "rows": 24, "imported": ["h5py"]}


def test_every_change_to_the_key_recomputes(tree_copy: Path, tmp_path: Path, spec: BackboneSpec, run: RunConfig) -> None:
    cache = tmp_path / "cache"
    _settle(tree_copy)
    embedpipe.extract(tree_copy, spec, cache_dir=cache, run=run)
    variants = [
        dataclasses.replace(spec, preprocess={"input_size": 72}),
        dataclasses.replace(spec, preprocess={"input_size": 64, "interpolation": "nearest"}),
        dataclasses.replace(spec, preprocess={"input_size": 64, "crop_pct": 0.5}),
        dataclasses.replace(spec, preprocess={"input_size": 64, "mean": (0.4, 0.45, 0.5)}),
        dataclasses.replace(spec, dtype="float16"),
        dataclasses.replace(spec, precision="bf16"),
        dataclasses.replace(spec, outputs=("embedding", "logits")),
        dataclasses.replace(spec, name="test_vit"),
    ]
    keys = set()
    for variant in variants:
        result = embedpipe.extract(tree_copy, variant, cache_dir=cache, run=run)
        assert not result.cache_hit and result.computed == 24, variant
        keys.add(result.cache_key)
        np.testing.assert_array_equal(embedpipe.load(result.path)[0], _fresh(tree_copy, variant, run, tmp_path))
        assert embedpipe.extract(tree_copy, variant, cache_dir=cache, run=run).cache_hit  # and now it is a hit
    assert len(keys) == len(variants)


def test_a_weights_file_rewritten_in_place_is_a_new_key(image_tree: Path, tmp_path: Path, spec: BackboneSpec, run: RunConfig) -> None:
    from safetensors.torch import save_file

    from embedpipe.backbone import load_backbone

    weights = tmp_path / "w.safetensors"
    model = load_backbone("test_resnet", pretrained=False)
    save_file(model.state_dict(), weights)
    spec = dataclasses.replace(spec, weights=str(weights))
    first = embedpipe.extract(image_tree, spec, cache_dir=tmp_path / "cache", run=run)
    for tensor in model.state_dict().values():
        tensor.mul_(1.5) if tensor.is_floating_point() else None
    save_file(model.state_dict(), weights)  # same path, new bytes: the remembered resolution must not be served
    second = embedpipe.extract(image_tree, spec, cache_dir=tmp_path / "cache", run=run)
    assert second.cache_key != first.cache_key and second.computed == 24
    np.testing.assert_array_equal(embedpipe.load(second.path)[0], _fresh(image_tree, spec, run, tmp_path))


@pytest.mark.parametrize("how", ["same size, mtime restored", "same size, mtime restored, seconds later",
                                 "renamed over (new inode), mtime restored", "written, then touch -d",
                                 "cp -p of a file with the old mtime", "tar -x of an archive with the old mtime"])
def test_an_image_rewritten_in_place_is_recomputed(tree_copy: Path, tmp_path: Path, spec: BackboneSpec, run: RunConfig,
                                                    how: str) -> None:
    cache = tmp_path / "cache"
    victim = sorted(tree_copy.glob("squares/*.png"))[0]
    # Uncompressed PNGs of one size hold the same number of bytes whatever their pixels.
    draw("squares", seed=7, size=(96, 80)).save(victim, compress_level=0)
    replacement = tmp_path / "replacement.png"
    draw("circles", seed=99, size=(96, 80)).save(replacement, compress_level=0)
    new = replacement.read_bytes()
    assert len(new) == victim.stat().st_size
    _settle(tree_copy)
    embedpipe.extract(tree_copy, spec, cache_dir=cache, run=run)
    before = victim.stat()
    if how.startswith("renamed"):
        staged = victim.with_name(".staged.png")
        staged.write_bytes(new)
        os.replace(staged, victim)
    elif how.startswith(("cp", "tar")):  # tools that carry the old mtime over themselves
        os.utime(replacement, ns=(before.st_atime_ns, before.st_mtime_ns))
        if how.startswith("cp"):
            subprocess.run(["cp", "-p", str(replacement), str(victim)], check=True)
        else:
            archive = tmp_path / "update.tar"
            subprocess.run(["tar", "-cf", str(archive), "-C", str(tmp_path), "--transform", f"s|replacement.png|{victim.name}|",
                            "replacement.png"], check=True)
            subprocess.run(["tar", "-xf", str(archive), "-C", str(victim.parent)], check=True)
    else:
        if how.endswith("later"):
            time.sleep(1.1)
        with open(victim, "r+b") as handle:
            handle.write(new)
    if how.startswith("written, then touch"):
        subprocess.run(["touch", "-d", f"@{before.st_mtime_ns // 10**9}.{before.st_mtime_ns % 10**9:09d}", str(victim)], check=True)
    else:
        os.utime(victim, ns=(before.st_atime_ns, before.st_mtime_ns))  # as touch -d, cp -p, rsync -t, tar do
    assert victim.stat().st_size == before.st_size and victim.stat().st_mtime_ns == before.st_mtime_ns
    again = embedpipe.extract(tree_copy, spec, cache_dir=cache, run=run)
    assert again.computed == 1 and not again.cache_hit
    np.testing.assert_array_equal(embedpipe.load(again.path)[0], _fresh(tree_copy, spec, run, tmp_path))


def test_added_images_hash_only_themselves(tree_copy: Path, tmp_path: Path, spec: BackboneSpec, run: RunConfig,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    import embedpipe.cache.index as index

    cache = tmp_path / "cache"
    _settle(tree_copy)
    embedpipe.extract(tree_copy, spec, cache_dir=cache, run=run)
    make_tree(tree_copy, per_class=1, start=40)
    hashed: list[str] = []
    real = index.sha256_file
    monkeypatch.setattr(index, "sha256_file", lambda path: hashed.append(os.fspath(path)) or real(path))
    grown = embedpipe.extract(tree_copy, spec, cache_dir=cache, run=run)
    assert grown.computed == 3 and sorted(Path(p).name for p in hashed) == sorted(
        p.name for p in tree_copy.rglob("*_040.*"))
    np.testing.assert_array_equal(embedpipe.load(grown.path)[0], _fresh(tree_copy, spec, run, tmp_path))


def test_a_damaged_snapshot_is_ignored_not_trusted(tree_copy: Path, tmp_path: Path, spec: BackboneSpec, run: RunConfig) -> None:
    cache = tmp_path / "cache"
    _settle(tree_copy)
    first = embedpipe.extract(tree_copy, spec, cache_dir=cache, run=run)
    (snapshot,) = (cache / "listings").glob("*.npz")
    data = bytearray(snapshot.read_bytes())
    data[len(data) // 2] ^= 0xFF
    snapshot.write_bytes(bytes(data))
    again = embedpipe.extract(tree_copy, spec, cache_dir=cache, run=run)
    assert again.cache_hit and again.path == first.path  # answered the slow way, from the export itself
    shutil.rmtree(cache / "listings")
    assert embedpipe.extract(tree_copy, spec, cache_dir=cache, run=run).cache_hit


def _flip_byte_in(path: Path, dataset: str) -> None:
    """Flip the lowest bit of a contiguous dataset's first byte, as bit rot would (label 0 -> 1: still a valid class)."""
    import h5py

    with h5py.File(path, "r") as f:
        offset = f[dataset].id.get_offset()
    with open(path, "r+b") as handle:
        handle.seek(offset)
        byte = handle.read(1)
        handle.seek(offset)
        handle.write(bytes([byte[0] ^ 0x01]))


@pytest.mark.parametrize("dataset", ["labels", "digests"])
def test_a_damaged_export_is_found_and_rebuilt_byte_for_byte(tree_copy: Path, tmp_path: Path, spec: BackboneSpec,
                                                            run: RunConfig, dataset: str) -> None:
    cache = tmp_path / "cache"
    first = embedpipe.extract(tree_copy, spec, cache_dir=cache, run=run)
    clean = first.path.read_bytes()
    _flip_byte_in(first.path, dataset)
    problems = embedpipe.cache_verify(first.path)
    assert any(dataset in p for p in problems), problems
    with pytest.raises(embedpipe.CacheError, match=dataset):
        embedpipe.load(first.path)
    again = embedpipe.extract(tree_copy, spec, cache_dir=cache, run=run)
    assert not again.cache_hit and again.computed == 0 and again.path == first.path
    assert first.path.read_bytes() == clean and embedpipe.cache_verify(first.path) == []


def test_swapped_digests_in_the_file_index_are_not_trusted(tree_copy: Path, tmp_path: Path, spec: BackboneSpec,
                                                           run: RunConfig) -> None:
    import sqlite3

    cache = tmp_path / "cache"
    _settle(tree_copy)
    first = embedpipe.extract(tree_copy, spec, cache_dir=cache, run=run)
    reference = embedpipe.load(first.path)[0]
    with sqlite3.connect(cache / "files.sqlite") as db:
        (a, da), (b, db_) = db.execute("SELECT path, digest FROM stats_v2 ORDER BY path LIMIT 2").fetchall()
        db.execute("UPDATE stats_v2 SET digest = ? WHERE path = ?", (db_, a))
        db.execute("UPDATE stats_v2 SET digest = ? WHERE path = ?", (da, b))
    first.path.unlink()
    shutil.rmtree(cache / "listings")
    again = embedpipe.extract(tree_copy, spec, cache_dir=cache, run=run)
    np.testing.assert_array_equal(embedpipe.load(again.path)[0], reference)


def test_a_garbage_file_index_is_moved_aside_and_rebuilt(tree_copy: Path, tmp_path: Path, spec: BackboneSpec,
                                                         run: RunConfig) -> None:
    cache = tmp_path / "cache"
    first = embedpipe.extract(tree_copy, spec, cache_dir=cache, run=run)
    (cache / "files.sqlite").write_bytes(b"not a database " * 100)
    shutil.rmtree(cache / "listings")
    again = embedpipe.extract(tree_copy, spec, cache_dir=cache, run=run)
    assert again.cache_hit and again.path == first.path
    assert list(cache.glob("files.sqlite.damaged-*"))


def test_a_damaged_shard_is_quarantined_and_its_rows_recomputed(tree_copy: Path, tmp_path: Path, spec: BackboneSpec,
                                                               run: RunConfig, caplog: pytest.LogCaptureFixture) -> None:
    import h5py

    cache = tmp_path / "cache"
    first = embedpipe.extract(tree_copy, spec, cache_dir=cache, run=run)
    clean = first.path.read_bytes()
    shard = sorted((cache / "store").glob("*/shards/*.h5"))[0]  # one batch's shard
    with h5py.File(shard, "r") as f:
        damaged_rows = f["digests"].shape[0]
        offset = f["embeddings"].id.get_chunk_info(0).byte_offset
    with open(shard, "r+b") as handle:  # 16 bytes of the embeddings' first chunk: its Fletcher-32 no longer holds
        handle.seek(offset + 8)
        handle.write(bytes(16))
    first.path.unlink()
    shutil.rmtree(cache / "listings")
    with caplog.at_level("WARNING"):
        again = embedpipe.extract(tree_copy, spec, cache_dir=cache, run=run)
    assert again.computed == damaged_rows and first.path.read_bytes() == clean
    assert list((cache / "store").glob("*/quarantine/*.h5")) and "moved to" in caplog.text


def test_verify_checks_a_snapshot_a_block_at_a_time_as_extract_reads_it(tmp_path: Path) -> None:
    """``cache verify`` streams a listing snapshot into its checksum; it finds exactly the damage the extract stage's whole read finds."""
    from embedpipe.cache.listing import Listings, _load, _sound
    from embedpipe.data.strings import PackedStrings

    n = 3000
    rng = np.random.default_rng(0)
    export = tmp_path / "export.h5"
    export.write_bytes(b"x")
    listings = Listings(tmp_path)
    listings.write("k", relpaths=PackedStrings.pack([f"class{i % 3}/img_{i:05d}.png" for i in range(n)]),
                   labels=rng.integers(0, 3, n), split_codes=rng.integers(-1, 3, n).astype(np.int8),
                   stats=rng.integers(0, 2**40, (n, 4)), digests=np.array([f"{i:064x}".encode() for i in range(n)], dtype="S64"),
                   taken_ns=1, export=export, dims={"embedding": 8}, errors=[("a.png", "bad")])
    path = listings.path("k")
    assert listings.problems() == [] and _sound(path) and _load(path) is not None
    clean = path.read_bytes()
    for at in range(0, len(clean), max(1, len(clean) // 400)):  # headers, every column's bytes, the zip directory
        damaged = bytearray(clean)
        damaged[at] ^= 0x5A
        path.write_bytes(bytes(damaged))
        assert _sound(path) == (_load(path) is not None), f"streamed and whole reads disagree on a flip at byte {at}"
    digests_at = clean.index(b"digests.npy") + 200  # inside the digests column's bytes
    damaged = bytearray(clean)
    damaged[digests_at] ^= 0x01
    path.write_bytes(bytes(damaged))
    assert listings.problems() and not _sound(path)
