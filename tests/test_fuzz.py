"""Fuzzing the files embedpipe reads back: exports, saved heads and fine-tune checkpoints, made for real and then damaged.

Two kinds of mutant, each checked for one property:

- **damage** (bit flips, truncation, an attribute deleted or of another type, a dataset of another shape
  or dtype, applied to the bytes as they are): a one-line :class:`EmbedpipeError`, or a result equal to
  the undamaged file's;
- **crafting** (a head or checkpoint edited and its checksum recomputed, as a deliberate forger would):
  a one-line error, or a result that is sane (finite probabilities that sum to 1; a run state that passes).

For every case: no other exception type, and Python-side allocation (numpy included, via tracemalloc)
under 32 MiB plus 64x the file's size. Derandomized, so every run tries the same cases; the counts are
printed at the end of the session (``fuzz: N cases; ...``, by ``tests/conftest.py``).
"""

from __future__ import annotations

import collections
import json
import math
import shutil
import tempfile
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import embedpipe
from embedpipe.cache import cache_list, read_export, verify_export
from embedpipe.cache.layout import hex_digests as as_hex
from embedpipe.errors import EmbedpipeError
from embedpipe.finetune.rundir import CHECKSUM_KEY, check_run_state, check_state_dict, load_tensors, tensors_digest
from embedpipe.heads import load_head
from embedpipe.heads.headfile import checksums

CASES: collections.Counter[str] = collections.Counter()
FUZZ = settings(derandomize=True, database=None, deadline=None, print_blob=False,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
SWAPS = [0, -1, 2**40, 1.5, float("nan"), True, None, "", "abc", [], {}, ["x"], {"a": 1}, [[1]], "1"]


def bounded(path_bytes: int, fn: Callable[[], Any]) -> tuple[str, Any]:
    """Run ``fn``: ``("error", message)`` for a one-line EmbedpipeError, else ``("ok", value)``; any other exception fails."""
    tracemalloc.start()
    try:
        try:
            return "ok", fn()
        except EmbedpipeError as error:
            message = str(error)
            assert message and "\n" not in message, message
            return "error", message
        finally:
            _, peak = tracemalloc.get_traced_memory()
            assert peak <= (32 << 20) + 64 * path_bytes, f"allocated {peak} bytes for a {path_bytes}-byte file"
    finally:
        tracemalloc.stop()


def flip_bits(path: Path, bits: list[int]) -> None:
    data = bytearray(path.read_bytes())
    for bit in bits:
        data[(bit // 8) % len(data)] ^= 1 << (bit % 8)
    path.write_bytes(bytes(data))


def truncate(path: Path, fraction: float) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])


# --------------------------------------------------------------------------- exports

RESHAPES = ["drop last row", "add a row", "drop a column", "to 1-D", "to float64", "to int8", "to strings", "to a group"]


def reshape_dataset(f: h5py.File, name: str, how: str) -> None:
    data = f[name][()]
    del f[name]
    if how == "to a group":
        f.create_group(name)
        return
    if data.dtype.kind == "O":
        data = np.array([v if isinstance(v, bytes) else str(v).encode() for v in data], dtype=object)
    changed = {
        "drop last row": lambda: data[:-1],
        "add a row": lambda: np.concatenate([data, data[:1]]),
        "drop a column": lambda: data[:, :-1] if data.ndim == 2 else data[:, None],
        "to 1-D": lambda: data.reshape(-1) if data.ndim == 2 else data[:1],
        "to float64": lambda: data.astype(np.float64) if data.dtype.kind in "iuf" else np.zeros(len(data)),
        "to int8": lambda: data.astype(np.int8) if data.dtype.kind in "iuf" else np.zeros(len(data), np.int8),
        "to strings": lambda: np.array([v.decode() if isinstance(v, bytes) else str(v) for v in data.reshape(-1)[: len(data)]], dtype=object),
    }[how]()
    f.create_dataset(name, data=changed, dtype=h5py.string_dtype() if changed.dtype.kind == "O" else None)


def hdf5_damage(max_bit: int) -> list[Any]:
    """What any of our HDF5 files can suffer: bit flips, truncation, attributes deleted or retyped, datasets reshaped."""
    return [
        st.tuples(st.just("bit flips"), st.lists(st.integers(0, max_bit), min_size=1, max_size=8)),
        st.tuples(st.just("truncation"), st.floats(0.0, 0.999)),
        st.tuples(st.just("attribute deleted"), st.integers(0, 100)),
        st.tuples(st.just("attribute type swap"), st.tuples(st.integers(0, 100), st.sampled_from(SWAPS))),
        st.tuples(st.just("dataset reshaped"), st.tuples(st.integers(0, 100), st.sampled_from(RESHAPES))),
    ]


export_mutations = st.one_of(*hdf5_damage(10**7))


def mutate_export(path: Path, kind: str, arg: Any) -> None:
    if kind == "bit flips":
        flip_bits(path, arg)
        return
    if kind == "truncation":
        truncate(path, arg)
        return
    with h5py.File(path, "r+") as f:
        if kind == "dataset reshaped":
            names = sorted(n for n in ["embeddings", "labels", "paths", "split", "digests", "errors/paths", "errors/reasons"] if n in f)
            reshape_dataset(f, names[arg[0] % len(names)], arg[1])
            return
        names = sorted(f.attrs)
        index = arg if kind == "attribute deleted" else arg[0]
        name = names[index % len(names)]
        if kind == "attribute deleted":
            del f.attrs[name]
        else:
            value = arg[1]
            f.attrs[name] = json.dumps(value) if isinstance(value, (list, dict)) else ("null" if value is None else value)


def same_export(a: Any, b: Any) -> dict[str, bool]:
    """Which parts of two loaded exports are equal."""
    return {
        "embeddings": a.arrays.keys() == b.arrays.keys() and all(np.array_equal(a.arrays[k], b.arrays[k]) for k in a.arrays),
        "columns": (np.array_equal(a.labels, b.labels) and a.paths == b.paths and a.digests == b.digests and a.errors == b.errors
                    and ((a.split is None) == (b.split is None)) and (a.split is None or np.array_equal(a.split, b.split))),
        "attrs": a.attrs == b.attrs,
    }


@settings(FUZZ, max_examples=150)
@given(mutation=export_mutations)
def test_a_damaged_export_is_an_error_or_the_same_rows(artifacts: dict[str, Path], mutation: tuple[str, Any]) -> None:
    kind, arg = mutation
    original = read_export(artifacts["export"])
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / artifacts["export"].name
        shutil.copyfile(artifacts["export"], path)
        mutate_export(path, kind, arg)
        size = path.stat().st_size
        status, loaded = bounded(size, lambda: read_export(path))
        assert isinstance(bounded(size, lambda: verify_export(path))[1], (list, str))
        assert len(bounded(size, lambda: cache_list(folder))[1]["exports"]) == 1  # ls never fails for one bad file
    CASES["export cases"] += 1
    if status == "error":
        CASES["export errors"] += 1
        return
    same = same_export(loaded, original)
    assert same["embeddings"], f"{kind} {arg}: embeddings changed silently"  # chunks carry Fletcher-32 and a sha256
    assert same["columns"], f"{kind} {arg}: rows changed silently"  # every column carries a sha256, checked on open
    if kind in ("bit flips", "truncation"):
        assert same["attrs"], f"{kind} {arg}: attributes changed silently"  # so do the attributes
    CASES["export unchanged"] += 1


# --------------------------------------------------------------------------- store shards and the file index

shard_mutations = st.one_of(*hdf5_damage(10**6), st.tuples(st.just("rows swapped"), st.integers(0, 100)))


def mutate_shard(path: Path, kind: str, arg: Any) -> None:
    if kind in ("bit flips", "truncation", "attribute deleted", "attribute type swap"):
        mutate_export(path, kind, arg)
        return
    with h5py.File(path, "r+") as f:
        names = sorted(n for n in ["digests", "embeddings", "errors/digests", "errors/reasons"] if n in f)
        name = names[(arg[0] if kind == "dataset reshaped" else arg) % len(names)]
        if kind == "dataset reshaped":
            reshape_dataset(f, name, arg[1])
        elif len(f[name]) > 1:  # edited through h5py: HDF5's own checks still hold
            data = f[name][()]
            f[name][...] = np.concatenate([data[1:2], data[:1], data[2:]])


@settings(FUZZ, max_examples=80)
@given(mutation=shard_mutations)
def test_a_damaged_shard_is_moved_aside_or_serves_the_same_rows(artifacts: dict[str, Path], mutation: tuple[str, Any]) -> None:
    from embedpipe.cache import Store
    from embedpipe.config import EmbeddingConfig

    kind, arg = mutation
    (store_folder,) = (artifacts["cache"] / "store").iterdir()
    config = EmbeddingConfig.from_dict(json.loads((store_folder / "config.json").read_text())["config"])
    original = read_export(artifacts["export"])
    digests = np.array(original.digests, dtype="S64")
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp)
        shutil.copytree(store_folder, cache / "store" / store_folder.name)
        shards = sorted((cache / "store" / store_folder.name / "shards").glob("*.h5"))
        mutate_shard(shards[0], kind, arg)
        store = Store(cache, config)

        def use() -> tuple[np.ndarray, np.ndarray]:
            index = store.index(digests)
            held = index.stored()
            return held, store.read_rows(index, np.flatnonzero(held), "embeddings") if held.any() else np.empty((0, 0))

        status, value = bounded(shards[0].stat().st_size if shards[0].exists() else 0, use)
        moved = list((cache / "store" / store_folder.name / "quarantine").glob("*.h5"))
    CASES["shard cases"] += 1
    if status == "error":  # ShardReadError: the extract stage moves the shard aside and recomputes
        CASES["shard errors"] += 1
        return
    held, rows = value
    np.testing.assert_array_equal(rows, original.arrays["embeddings"][held].astype(rows.dtype), err_msg=f"{kind} {arg}: wrong rows served")
    if not held.all():
        assert moved, f"{kind} {arg}: rows lost without the shard being moved aside"
        CASES["shard moved aside"] += 1
    else:
        CASES["shard unchanged"] += 1


index_mutations = st.one_of(
    st.tuples(st.just("bit flips"), st.lists(st.integers(0, 10**6), min_size=1, max_size=8)),
    st.tuples(st.just("truncation"), st.floats(0.0, 0.999)),
    st.tuples(st.just("field edited"), st.tuples(st.integers(0, 100), st.sampled_from(
        ["size", "mtime_ns", "ctime_ns", "inode", "hashed_ns", "digest", "row_check"]), st.sampled_from([0, -1, 2**62, "x", None]))),
    st.tuples(st.just("digests swapped"), st.integers(0, 100)),
)


@settings(FUZZ, max_examples=60)
@given(mutation=index_mutations)
def test_a_damaged_file_index_gives_the_true_digests(artifacts: dict[str, Path], mutation: tuple[str, Any]) -> None:
    import sqlite3

    from embedpipe.cache import FileIndex
    from embedpipe.config import sha256_file

    kind, arg = mutation
    paths = sorted(str(p) for p in artifacts["data"].rglob("*") if p.is_file())
    truth = [sha256_file(p).encode() for p in paths]
    with tempfile.TemporaryDirectory() as tmp:
        index_file = Path(tmp) / "files.sqlite"
        shutil.copyfile(artifacts["cache"] / "files.sqlite", index_file)
        if kind in ("bit flips", "truncation"):
            (flip_bits if kind == "bit flips" else truncate)(index_file, arg)
        else:
            with sqlite3.connect(index_file) as db:
                rows = db.execute("SELECT path, digest FROM stats_v2 ORDER BY path").fetchall()
                if kind == "field edited":
                    db.execute(f"UPDATE stats_v2 SET {arg[1]} = ? WHERE path = ?", (arg[2], rows[arg[0] % len(rows)][0]))
                else:
                    (a, da), (b, db_) = rows[arg % len(rows)], rows[(arg + 1) % len(rows)]
                    db.execute("UPDATE stats_v2 SET digest = ? WHERE path = ?", (db_, a))
                    db.execute("UPDATE stats_v2 SET digest = ? WHERE path = ?", (da, b))
            db.close()
        status, value = bounded(index_file.stat().st_size, lambda: FileIndex(tmp).digests(paths))
    CASES["index cases"] += 1
    if status == "error":
        CASES["index errors"] += 1
        return
    assert as_hex(value).tolist() == truth, f"{kind} {arg}: a wrong digest was trusted"
    CASES["index true digests"] += 1


# --------------------------------------------------------------------------- heads


def json_paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [prefix] if prefix else []
    if isinstance(value, dict):
        for key, item in value.items():
            found += json_paths(item, (*prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value[:4]):
            found += json_paths(item, (*prefix, index))
    return found


def edit_at(document: Any, path: tuple[Any, ...], new: Any, *, delete: bool) -> None:
    parent = document
    for key in path[:-1]:
        parent = parent[key]
    if delete:
        del parent[path[-1]]
    else:
        parent[path[-1]] = new


head_mutations = st.tuples(
    st.sampled_from(["logreg", "knn", "mlp"]),
    st.one_of(
        st.tuples(st.just("bit flips"), st.tuples(st.booleans(), st.lists(st.integers(0, 10**6), min_size=1, max_size=4))),
        st.tuples(st.just("truncation"), st.tuples(st.booleans(), st.floats(0.0, 0.999))),
        st.tuples(st.just("json deleted"), st.tuples(st.integers(0, 10**4), st.booleans())),
        st.tuples(st.just("json type swap"), st.tuples(st.integers(0, 10**4), st.sampled_from(SWAPS), st.booleans())),
        st.tuples(st.just("array changed"), st.tuples(st.integers(0, 100), st.sampled_from(["NaN", "shape", "dtype", "gone", "empty"]),
                                                      st.booleans())),
    ),
)


def mutate_head(folder: Path, kind: str, arg: Any) -> bool:
    """Apply the mutation; returns True when the head was resealed (crafted), False when damaged."""
    from safetensors.numpy import load_file, save_file

    if kind in ("bit flips", "truncation"):
        target = folder / ("head.json" if arg[0] else "arrays.safetensors")
        (flip_bits if kind == "bit flips" else truncate)(target, arg[1])
        return False
    seal = arg[-1]
    if kind == "array changed":
        arrays = load_file(folder / "arrays.safetensors")
        name = sorted(arrays)[arg[0] % len(arrays)]
        array = arrays[name]
        how = arg[1]
        if how == "gone":
            del arrays[name]
        else:
            arrays[name] = {"NaN": lambda: np.where(np.arange(array.size).reshape(array.shape) == 0, np.nan, array).astype(array.dtype)
                            if array.dtype.kind == "f" else array + 100,
                            "shape": lambda: np.ascontiguousarray(array.reshape(-1)[: max(1, array.size - 1)]),
                            "dtype": lambda: array.astype(np.int16 if array.dtype.kind == "f" else np.float32),
                            "empty": lambda: np.zeros((0,) + array.shape[1:], array.dtype)}[how]()
        save_file(arrays, folder / "arrays.safetensors")
    else:
        info = json.loads((folder / "head.json").read_text())
        paths = [p for p in json_paths(info) if p[0] != "checksums"]
        edit_at(info, paths[arg[0] % len(paths)], arg[1] if kind == "json type swap" else None, delete=kind == "json deleted")
        (folder / "head.json").write_text(json.dumps(info))
    if seal:
        info = json.loads((folder / "head.json").read_text())
        info["checksums"] = checksums(info, (folder / "arrays.safetensors").read_bytes())
        (folder / "head.json").write_text(json.dumps(info))
    return seal


@settings(FUZZ, max_examples=150)
@given(mutation=head_mutations)
def test_a_damaged_head_is_an_error_or_the_same_predictions(artifacts: dict[str, Path], mutation: tuple[str, tuple[str, Any]]) -> None:
    name, (kind, arg) = mutation
    X, _, _ = embedpipe.load(artifacts["export"])
    original, _ = load_head(artifacts[name])
    expected = original.predict_proba(X)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(shutil.copytree(artifacts[name], Path(tmp) / name))
        crafted = mutate_head(folder, kind, arg)
        size = sum(p.stat().st_size for p in folder.iterdir())

        def use() -> tuple[Any, np.ndarray]:
            head, _ = load_head(folder)
            return head, head.predict_proba(X)

        status, value = bounded(size, use)
    CASES["head cases"] += 1
    if status == "error":
        CASES["head errors"] += 1
        return
    head, proba = value
    if crafted:  # a forged but valid head: its answer need only be sane
        assert proba.shape == expected.shape and np.isfinite(proba).all() and np.allclose(proba.sum(axis=1), 1, atol=1e-4)
        CASES["head crafted and sane"] += 1
        return
    assert list(head.classes_) == list(original.classes_) and np.allclose(proba, expected, atol=1e-6), f"{kind} {arg}: changed silently"
    CASES["head unchanged"] += 1


# --------------------------------------------------------------------------- fine-tune checkpoints

checkpoint_mutations = st.tuples(
    st.sampled_from(["best.safetensors", "last.safetensors"]),
    st.one_of(
        st.tuples(st.just("bit flips"), st.lists(st.integers(0, 10**7), min_size=1, max_size=4)),
        st.tuples(st.just("truncation"), st.floats(0.0, 0.999)),
        st.tuples(st.just("header deleted"), st.integers(0, 10**4)),
        st.tuples(st.just("header type swap"), st.tuples(st.integers(0, 10**4), st.sampled_from(SWAPS))),
        st.tuples(st.just("tensor changed"), st.tuples(st.integers(0, 1000), st.sampled_from(["NaN", "shape", "dtype", "gone"]))),
    ),
)


def mutate_checkpoint(path: Path, kind: str, arg: Any) -> bool:
    """Apply the mutation; returns True when resealed (crafted: the header and tensor edits), False when damaged."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    if kind in ("bit flips", "truncation"):
        (flip_bits if kind == "bit flips" else truncate)(path, arg)
        return False
    with safe_open(str(path), "pt") as handle:
        meta = {k: json.loads(v) for k, v in (handle.metadata() or {}).items() if k != CHECKSUM_KEY}
    tensors = load_file(str(path))
    if kind == "tensor changed":
        name = sorted(tensors)[arg[0] % len(tensors)]
        tensor = tensors[name]
        if arg[1] == "gone":
            del tensors[name]
        else:
            tensors[name] = {"NaN": lambda: tensor.float().fill_(math.nan).to(tensor.dtype) if tensor.is_floating_point() else tensor + 1,
                             "shape": lambda: tensor.reshape(-1)[: max(1, tensor.numel() - 1)].clone(),
                             "dtype": lambda: tensor.to(torch.float64 if tensor.dtype != torch.float64 else torch.float32)}[arg[1]]()
    else:
        paths = json_paths(meta)
        edit_at(meta, paths[(arg if kind == "header deleted" else arg[0]) % len(paths)],
                None if kind == "header deleted" else arg[1], delete=kind == "header deleted")
    header = {k: json.dumps(v) for k, v in meta.items()}
    header[CHECKSUM_KEY] = json.dumps(tensors_digest(tensors, header))
    save_file(tensors, str(path), metadata=header)
    return True


@settings(FUZZ, max_examples=120)
@given(mutation=checkpoint_mutations)
def test_a_damaged_checkpoint_is_an_error_or_the_same_state(artifacts: dict[str, Path], mutation: tuple[str, tuple[str, Any]]) -> None:
    name, (kind, arg) = mutation
    source = artifacts["run"] / name
    original, original_meta = load_tensors(source)
    model = {k.removeprefix("model/"): v for k, v in original.items() if not k.startswith("optim/")}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        shutil.copyfile(source, path)
        crafted = mutate_checkpoint(path, kind, arg)

        def use() -> tuple[dict[str, Any], dict[str, Any]]:
            tensors, meta = load_tensors(path)
            weights = {k.removeprefix("model/"): v for k, v in tensors.items() if not k.startswith("optim/")}
            check_state_dict(weights, model, path)
            if name == "last.safetensors":
                check_run_state(meta, path, phases=1)
            return tensors, meta

        status, value = bounded(path.stat().st_size, use)
    CASES["checkpoint cases"] += 1
    if status == "error":
        CASES["checkpoint errors"] += 1
        return
    tensors, meta = value
    if crafted:
        CASES["checkpoint crafted and accepted"] += 1
        return
    assert meta == original_meta and tensors.keys() == original.keys(), f"{kind} {arg}: changed silently"
    assert all(torch_equal(tensors[k], original[k]) for k in tensors), f"{kind} {arg}: changed silently"
    CASES["checkpoint unchanged"] += 1


def torch_equal(a: Any, b: Any) -> bool:
    import torch

    return a.dtype == b.dtype and a.shape == b.shape and bool(torch.equal(a, b))


hex_digests = st.text(alphabet="0123456789abcdef", min_size=64, max_size=64)


@settings(max_examples=100, deadline=None)
@given(shards=st.lists(st.lists(hex_digests, max_size=12), min_size=1, max_size=4), prefixes=st.lists(st.text("01", min_size=1, max_size=5), max_size=30),
       asked=st.lists(hex_digests, max_size=10), picks=st.lists(st.integers(0, 60), max_size=30))
def test_store_index_finds_each_digest_asked_in_its_first_shard(shards: list[list[str]], prefixes: list[str], asked: list[str],
                                                                 picks: list[int]) -> None:
    """Store.index matches digests by their first 64 bits, then whole: a dict of (first shard, first row) says where each is.

    Digests sharing their first 16 hex digits (a 64-bit key collision) in runs, as a real store almost
    never has; digests in two shards and twice in one; digests asked for twice (an image at two paths).
    """
    import time

    from embedpipe.cache.store import Store
    from embedpipe.config import EmbeddingConfig, PreprocessConfig

    shared = [f"{'0' * 16}{p}".ljust(64, "e") for p in prefixes]
    shards = [part + shared[: 8 * i + 1] for i, part in enumerate(shards)]  # runs longer than _Wanted._PAIRS too
    with tempfile.TemporaryDirectory() as tmp:
        preprocess = PreprocessConfig(input_size=(3, 8, 8), interpolation="bilinear", mean=(0.5,) * 3, std=(0.5,) * 3,
                                      crop_pct=1.0, crop_mode="center")
        store = Store(tmp, EmbeddingConfig(backbone="b", weights="random:0", preprocess=preprocess, dtype="float32"))
        store.create()
        where: dict[str, tuple[int, int]] = {}
        for s, part in enumerate(shards):
            values = np.arange(len(part), dtype=np.float32)[:, None] + 100 * s
            store.write_shard(np.array([d.encode() for d in part], dtype="S64"), {"embedding": values})
            for r, d in enumerate(part):
                where.setdefault(d, (s, r))
            time.sleep(0.001)  # shard names are ordered by the time they were written
        every = sorted(where)
        queries = [*asked, *shared, *(every[p % len(every)] for p in picks if every), f"{'0' * 16}{'1' * 48}"]
        index = store.index(np.array([q.encode() for q in queries], dtype="S64"))
        assert index.stored().tolist() == [q in where for q in queries]
        found = np.flatnonzero(index.stored())
        expected = [100 * where[queries[i]][0] + where[queries[i]][1] for i in found.tolist()]
        if len(found):
            assert store.read_rows(index, found, "embedding")[:, 0].tolist() == expected


@settings(max_examples=200, deadline=None)
@given(heads=st.lists(st.integers(0, 3), max_size=40), tails=st.lists(st.integers(0, 3), max_size=40))
def test_store_lookup_order_is_numpys_stable_sort_of_whole_digests(heads: list[int], tails: list[int]) -> None:
    """_Wanted sorts by 64-bit key, then re-sorts the runs of equal keys whose digests differ: numpy's own
    stable sort of the 32-byte digests is the order it must reach (few distinct heads, so keys collide)."""
    from embedpipe.cache.layout import RAW_DIGEST_DTYPE
    from embedpipe.cache.store import _Wanted

    raw = np.zeros((min(len(heads), len(tails)), 32), dtype=np.uint8)
    raw[:, 7], raw[:, 31] = heads[: len(raw)], tails[: len(raw)]  # byte 7 is in the key, byte 31 is not
    digests = raw.view(RAW_DIGEST_DTYPE).ravel()
    wanted = _Wanted(digests)
    assert wanted.order.tolist() == np.argsort(digests, kind="stable").tolist()
    assert np.all(np.diff(wanted.keys.astype(np.float64)) >= 0)


@settings(max_examples=300, deadline=None)
@given(rows=st.lists(st.tuples(*[st.integers(0, 2)] * 4), max_size=40), wide=st.booleans())
def test_digest_order_is_lexsort_of_the_words(rows: list[tuple[int, ...]], wide: bool) -> None:
    """The digests' order (the seeded split's and the store's) against numpy's own stable lexsort of their four
    big-endian 64-bit words: few distinct values, so first words tie and the re-sorted runs decide (``wide``:
    values near 2**64, where a signed compare would err)."""
    from embedpipe._columns import RAW_DIGEST_DTYPE, digest_order

    words = np.array(rows, dtype=np.uint64).reshape(-1, 4)
    if wide:
        words = words * np.uint64(2**62)
    words = np.ascontiguousarray(words.astype(">u8"))
    expected = np.lexsort((words[:, 3], words[:, 2], words[:, 1], words[:, 0]))
    assert digest_order(words.view(RAW_DIGEST_DTYPE).ravel())[0].tolist() == expected.tolist()


@settings(max_examples=200, deadline=None)
@given(heads=st.lists(st.integers(0, 2), max_size=60), tails=st.lists(st.integers(0, 2), max_size=60))
def test_first_of_each_digest_is_numpys_unique(heads: list[int], tails: list[int]) -> None:
    """The images embedded once per digest: the first position of each distinct digest, as ``np.unique`` finds
    them, when keys collide (byte 7 is in the 64-bit key, byte 31 is not) and digests repeat."""
    from embedpipe._columns import RAW_DIGEST_DTYPE
    from embedpipe.extraction import _first_of_each

    raw = np.zeros((min(len(heads), len(tails)), 32), dtype=np.uint8)
    raw[:, 7], raw[:, 31] = heads[: len(raw)], tails[: len(raw)]
    digests = raw.view(RAW_DIGEST_DTYPE).ravel()
    assert _first_of_each(digests).tolist() == sorted(np.unique(digests, return_index=True)[1].tolist())


def test_seeded_split_is_the_documented_rule() -> None:
    """stratified_split against its docstring, computed with sorted() of each path's sha256 of "seed:relpath":
    within each class the first round(n * test) go to test, the next round(n * val) to val, the rest to train."""
    import hashlib

    from embedpipe.config import SplitConfig
    from embedpipe.data.records import SPLITS, stratified_split
    from embedpipe.data.strings import PackedStrings

    rng = np.random.default_rng(3)
    relpaths = [f"c{k % 3}/{''.join(rng.choice(list('abcé'), 5))}_{k}.png" for k in range(500)]
    labels = np.array([k % 3 for k in range(500)])
    config = SplitConfig(val_fraction=0.15, test_fraction=0.25, seed=9)
    expected = {}
    for label in range(3):
        members = sorted((p for p, y in zip(relpaths, labels) if y == label),
                         key=lambda p: hashlib.sha256(f"9:{p}".encode()).digest())
        n_test, n_val = round(len(members) * 0.25), round(len(members) * 0.15)
        for i, p in enumerate(members):
            expected[p] = "test" if i < n_test else "val" if i < n_test + n_val else "train"
    for column in (relpaths, PackedStrings.pack(relpaths)):
        codes = stratified_split(column, labels, config)
        assert {p: SPLITS[c] for p, c in zip(relpaths, codes.tolist())} == expected


_PATHS = st.lists(st.text(st.sampled_from("ab/é.\u00e7z"), max_size=6), max_size=30)


@settings(max_examples=300, deadline=None)
@given(mine=_PATHS, theirs=_PATHS, collide=st.booleans())
def test_packed_strings_find_their_rows_as_a_dict_would(mine: list[str], theirs: list[str], collide: bool) -> None:
    """rows_in against a dict of the other column's strings: a row is found exactly when the string is there,
    and the row found holds it. With every key forced equal, byte comparison alone decides: a miss, never a wrong row."""
    from embedpipe.data.strings import PackedStrings

    a, b = PackedStrings.pack(mine), PackedStrings.pack(theirs)
    if collide:
        original = PackedStrings.keys
        PackedStrings.keys = lambda self: np.zeros(len(self), dtype=np.uint64)  # type: ignore[method-assign]
        try:
            rows = a.rows_in(b)
        finally:
            PackedStrings.keys = original  # type: ignore[method-assign]
    else:
        rows = a.rows_in(b)
    assert rows.dtype == np.int64 and len(rows) == len(mine)
    for string, row in zip(mine, rows.tolist()):
        if row >= 0:
            assert theirs[row] == string
        elif not collide:
            assert string not in theirs
    if a.keys().tolist() != [PackedStrings.pack([m]).keys()[0] for m in mine]:
        raise AssertionError("a string's key depends on its neighbours")
