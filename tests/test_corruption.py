"""The corruption census: every kind of damage to a cache folder is found by ``cache verify`` and healed
by the next ``extract`` that uses the damaged part, whose export then equals a clean run's byte for byte.

Each case damages one part of a clean cache (an export, a shard, the file index, a store's config, a
listing snapshot) the way bit rot, a truncated copy or a foreign edit through h5py/sqlite would.
"""

from __future__ import annotations

import shutil
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest

import embedpipe
from embedpipe import BackboneSpec, RunConfig

from .conftest import make_tree
from .test_incremental import _settle

Damage = Callable[[Path, Path], None]  # (cache folder, export) -> None


def _flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as handle:
        handle.seek(offset)
        byte = handle.read(1)
        handle.seek(offset)
        handle.write(bytes([byte[0] ^ 0x01]))


def _offset(path: Path, name: str) -> int:
    with h5py.File(path, "r") as f:
        data = f[name]
        return data.id.get_offset() if data.chunks is None else data.id.get_chunk_info(0).byte_offset + 8


def _flip_dataset(name: str, *, shard: bool = False) -> Damage:
    def damage(cache: Path, export: Path) -> None:
        target = _shard(cache) if shard else export
        _flip(target, _offset(target, name))
    return damage


def _rewrite(name: str, change: Callable[[np.ndarray], np.ndarray], *, shard: bool = False) -> Damage:
    """An edit through h5py: HDF5's own checks (Fletcher-32) hold afterwards, only embedpipe's checksums can tell."""
    def damage(cache: Path, export: Path) -> None:
        with h5py.File(_shard(cache) if shard else export, "r+") as f:
            f[name][...] = change(f[name][...])
    return damage


def _swap_rows(rows: np.ndarray) -> np.ndarray:
    rows = rows.copy()
    rows[[0, 1]] = rows[[1, 0]]
    return rows


def _edit_digest(digests: np.ndarray) -> np.ndarray:
    digests = digests.copy()
    digests[0] = b"0" * 64
    return digests


def _truncate(*, shard: bool = False) -> Damage:
    def damage(cache: Path, export: Path) -> None:
        target = _shard(cache) if shard else export
        target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    return damage


def _garbage(part: Callable[[Path], Path]) -> Damage:
    def damage(cache: Path, export: Path) -> None:
        part(cache).write_bytes(b"\x00garbage\xff" * 200)
    return damage


def _delete(part: Callable[[Path], Path]) -> Damage:
    return lambda cache, export: part(cache).unlink()


def _drop_attr(name: str, *, shard: bool = False) -> Damage:
    def damage(cache: Path, export: Path) -> None:
        with h5py.File(_shard(cache) if shard else export, "r+") as f:
            del f.attrs[name]
    return damage


def _swap_index_digests(cache: Path, export: Path) -> None:
    with sqlite3.connect(cache / "files.sqlite") as db:
        (a, da), (b, db_) = db.execute("SELECT path, digest FROM stats_v2 ORDER BY path LIMIT 2").fetchall()
        db.execute("UPDATE stats_v2 SET digest = ? WHERE path = ?", (db_, a))
        db.execute("UPDATE stats_v2 SET digest = ? WHERE path = ?", (da, b))
    db.close()


def _shard(cache: Path) -> Path:
    return sorted((cache / "store").glob("*/shards/*.h5"))[0]


def _index(cache: Path) -> Path:
    return cache / "files.sqlite"


def _store_config(cache: Path) -> Path:
    return next((cache / "store").glob("*/config.json"))


def _snapshot(cache: Path) -> Path:
    return next((cache / "listings").glob("*.npz"))


# kind -> (damage, what the next extract must be made to use: "export", "store" (export deleted) or "index"
# (listing snapshots deleted, so files are looked up), what it logs when it replaces the part (None: nothing to say)).
KINDS: dict[str, tuple[Damage, str, str | None]] = {
    "export embeddings: a flipped bit": (_flip_dataset("embeddings"), "export", "replacing"),
    "export labels: a flipped bit": (_flip_dataset("labels"), "export", "replacing"),
    "export paths: a flipped bit": (_flip_dataset("paths"), "export", "replacing"),
    "export digests: a flipped bit": (_flip_dataset("digests"), "export", "replacing"),
    "export split: a flipped bit": (_flip_dataset("split"), "export", "replacing"),
    "export rows swapped through h5py": (_rewrite("embeddings", _swap_rows), "export", "replacing"),
    "export truncated": (_truncate(), "export", None),
    "export checksums attribute deleted": (_drop_attr("checksums"), "export", "replacing"),
    "shard embeddings: a flipped bit": (_flip_dataset("embeddings", shard=True), "store", "moved to"),
    "shard rows swapped through h5py": (_rewrite("embeddings", _swap_rows, shard=True), "store", "moved to"),
    "shard digest edited through h5py": (_rewrite("digests", _edit_digest, shard=True), "store", "moved to"),
    "shard truncated": (_truncate(shard=True), "store", "moved to"),
    "shard replaced by garbage": (_garbage(_shard), "store", "moved to"),
    "shard checksums attribute deleted": (_drop_attr("checksums", shard=True), "store", "moved to"),
    "file index replaced by garbage": (_garbage(_index), "index", "moved to"),
    "file index digests swapped between rows": (_swap_index_digests, "index", "fail their check"),
    "file index deleted": (_delete(_index), "index", None),
    "store config.json replaced by garbage": (_garbage(_store_config), "store", "rewritten"),
    "store config.json deleted": (_delete(_store_config), "store", None),
    "listing snapshot replaced by garbage": (_garbage(_snapshot), "export", "damaged"),
}


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, bytes]:
    """A settled image tree and a cache extracted from it: (tree, cache, the export's bytes)."""
    root = tmp_path_factory.mktemp("census")
    tree = make_tree(root / "shapes", per_class=6)
    _settle(tree)
    spec, run = _spec_run()
    cache = root / "cache"
    result = embedpipe.extract(tree, spec, cache_dir=cache, run=run)
    assert embedpipe.cache_verify(cache) == []
    return tree, cache, result.path.read_bytes()


def _spec_run() -> tuple[BackboneSpec, RunConfig]:
    spec = BackboneSpec(name="test_resnet", pretrained=False, preprocess={"input_size": 64}, precision="fp32", dtype="float32")
    return spec, RunConfig(device="cpu", batch_size=4, num_workers=0)  # several shards, so one can be damaged


def test_the_census_names_twenty_kinds() -> None:
    assert len(KINDS) == 20  # the 18, and the two this project's own files add (checksum attributes)


@pytest.mark.parametrize("kind", list(KINDS))
def test_verify_finds_it_and_extract_heals_it(kind: str, clean: tuple[Path, Path, bytes], tmp_path: Path,
                                               caplog: pytest.LogCaptureFixture) -> None:
    tree, clean_cache, clean_bytes = clean
    damage, use, says = KINDS[kind]
    cache = Path(shutil.copytree(clean_cache, tmp_path / "cache"))
    (export,) = [p for p in cache.glob("*.h5")]
    damage(cache, export)

    problems = embedpipe.cache_verify(cache)
    assert problems, f"cache verify missed: {kind}"
    assert all("\n" not in p for p in problems)

    if kind.startswith("export"):  # refused when opened for use too, before any head sees a row
        with pytest.raises(embedpipe.CacheError):
            embedpipe.load(export)
    if use == "store":
        export.unlink()
    if use in ("store", "index"):
        shutil.rmtree(cache / "listings")
    spec, run = _spec_run()
    with caplog.at_level("WARNING"):
        again = embedpipe.extract(tree, spec, cache_dir=cache, run=run)
    assert again.path == export and export.read_bytes() == clean_bytes, f"not healed byte for byte: {kind}"
    if says is not None:
        assert says in caplog.text, f"extract did not say what it replaced ({kind}): {caplog.text}"
    assert embedpipe.cache_verify(cache) == [], f"still damaged after extract: {kind}"


# --------------------------------------------------------------------------- compaction


def _store(tmp_path: Path) -> Any:
    from embedpipe.cache import Store
    from embedpipe.config import EmbeddingConfig, PreprocessConfig

    preprocess = PreprocessConfig(input_size=(3, 32, 32), interpolation="bilinear", mean=(0.5,) * 3, std=(0.5,) * 3,
                                  crop_pct=1.0, crop_mode="center")
    store = Store(tmp_path / "cache", EmbeddingConfig(backbone="none", weights="random:0", preprocess=preprocess, dtype="float32"))
    store.create()
    return store


def _rows(shards: int, rows: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    digests = np.array([f"{i:064x}".encode() for i in range(shards * rows)], dtype="S64")
    return digests, rng.standard_normal((shards * rows, width)).astype(np.float32)


def test_compaction_keeps_every_row_and_error_and_streams(tmp_path: Path) -> None:
    import tracemalloc

    from embedpipe.cache.housekeeping import verify_store

    store = _store(tmp_path)
    shards, rows, width = 8, 4000, 64  # 8 MB of rows in all, 1 MB per shard
    digests, embeddings = _rows(shards, rows, width)
    for s in range(shards):
        part = slice(s * rows, (s + 1) * rows)
        store.write_shard(digests[part], {"embedding": embeddings[part]}, [(f"{s:064x}e".encode()[:64], f"reason {s}")])
    tracemalloc.start()
    store.compact(force=True)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert len(store.shards()) == 1 and verify_store(store.root) == []
    assert peak < 3 * rows * width * 4, f"compaction held {peak} bytes: more than a shard or two of rows"  # all: 8 shards
    index = store.index(digests[::-1])
    np.testing.assert_array_equal(store.read_rows(index, np.arange(len(digests)), "embedding"), embeddings[::-1])
    assert sorted(index.errors.values()) == [f"reason {s}" for s in range(shards)]


def test_a_damaged_shard_is_never_merged_into_a_fresh_one(tmp_path: Path) -> None:
    store = _store(tmp_path)
    digests, embeddings = _rows(4, 50, 16)
    written = [store.write_shard(digests[s * 50 : (s + 1) * 50], {"embedding": embeddings[s * 50 : (s + 1) * 50]}) for s in range(4)]
    with h5py.File(written[1], "r+") as f:  # rows swapped through h5py: only the checksums can tell
        f["embeddings"][...] = _swap_rows(f["embeddings"][...])
    store._checked = None  # a new process: nothing remembered about the edited shard's stat
    (store.root / "checked.json").unlink(missing_ok=True)
    store.compact(force=True)
    index = store.index(digests)
    assert not index.stored()[50:100].any() and index.stored()[:50].all()
    assert list((store.root / "quarantine").glob("*.h5"))
    np.testing.assert_array_equal(store.read_rows(index, np.arange(100, len(digests)), "embedding"), embeddings[100:])


def test_a_file_index_left_mid_write_by_a_killed_process_is_not_damage(clean: tuple[Path, Path, bytes], tmp_path: Path) -> None:
    import subprocess
    import sys

    _, clean_cache, _ = clean
    cache = Path(shutil.copytree(clean_cache, tmp_path / "cache"))
    writer = (f"import os, signal, sqlite3\nc = sqlite3.connect({str(cache / 'files.sqlite')!r})\n"
              "c.execute('PRAGMA cache_size=1'); c.execute('BEGIN')\n"
              "for i in range(20000): c.execute('INSERT INTO stats_v2 (path, digest) VALUES (?, ?)', (f'x{i}', 'y' * 64))\n"
              "os.kill(os.getpid(), signal.SIGKILL)\n")
    subprocess.run([sys.executable, "-c", writer], check=False)
    assert (cache / "files.sqlite-journal").exists()  # a hot journal: SQLite rolls it back on the next open
    assert embedpipe.cache_verify(cache) == []  # read-only, SQLite reported "attempt to write a readonly database"


def test_digests_are_held_raw_and_written_as_hex(tmp_path: Path) -> None:
    """In memory a digest is its 32 bytes (hashlib's ``digest()``); files hold hashlib's ``hexdigest()``;
    hex handed to the store is decoded, never cast (numpy would keep its first 32 characters)."""
    import hashlib

    from embedpipe.cache.layout import as_raw_digests, hex_digests, raw_digests

    sums = [hashlib.sha256(str(i).encode()).digest() for i in range(70000)]  # more than one conversion block
    sums[3] = sums[3][:-1] + b"\0"  # a trailing zero byte survives (S32 would strip it)
    hexes = [d.hex() for d in sums]
    raw = raw_digests(hexes)
    assert raw.dtype.itemsize == 32 and [bytes(d) for d in raw[:5]] == sums[:5] and raw.tobytes() == b"".join(sums)
    assert hex_digests(raw).tolist() == [h.encode() for h in hexes]
    assert as_raw_digests(np.array(hexes, dtype="S64")).tobytes() == raw.tobytes() and as_raw_digests(raw) is raw
    for bad in (["A" * 64], ["a" * 63], ["g" * 64]):
        with pytest.raises(ValueError, match="lowercase hex"):
            raw_digests(bad)
    with pytest.raises(TypeError):
        as_raw_digests(np.zeros(3))

    store = _store(tmp_path)
    digests, embeddings = _rows(2, 10, 4)
    shard = store.write_shard(as_raw_digests(digests[:10]), {"embedding": embeddings[:10]}, [(bytes(raw_digests(digests[19:])[0]), "bad")])
    with h5py.File(shard, "r") as f:
        assert f["digests"][:].tolist() == digests[:10].tolist() and f["errors/digests"][:].tolist() == [digests[19]]
    by_hex, by_raw = store.index(digests), store.index(raw_digests(digests))
    assert by_hex.stored().tolist() == by_raw.stored().tolist() == [True] * 10 + [False] * 10
    assert by_raw.failed(raw_digests(digests)).tolist() == [False] * 19 + [True]
