"""Extraction under PyTorch's own launcher: torchrun, 2 processes, gloo on CPU, a tiny model.

The exported file must equal the single-process one, and a run whose rank is killed must
leave its finished shards usable, so that a rerun (with any number of processes) completes it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

import embedpipe
from embedpipe.distributed import Ranks

from .conftest import make_tree

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
EXTRACT = ["-m", "embedpipe", "extract", "--backbone", "test_resnet", "--no-pretrained", "--img-size", "64",
           "--dtype", "float32", "--precision", "fp32", "--batch-size", "2", "--workers", "0", "--device", "cpu", "--json"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # two ranks on two cores


def _shards(cache: Path) -> list[Path]:
    return [p for p in cache.glob("store/*/shards/*.h5") if not p.name.startswith(".")]


def _single(data: Path, cache: Path) -> dict:
    done = subprocess.run([sys.executable, *EXTRACT, str(data), "--cache-dir", str(cache)],
                          capture_output=True, text=True, env=ENV, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def _torchrun(data: Path, cache: Path) -> dict:
    done = subprocess.run([*TORCHRUN, *EXTRACT, str(data), "--cache-dir", str(cache)],
                          capture_output=True, text=True, env=ENV, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)  # rank 0 alone reports


def _same_export(a: str, b: str) -> None:
    with h5py.File(a, "r") as fa, h5py.File(b, "r") as fb:
        for name in ("paths", "labels", "split", "digests"):
            assert fa[name][:].tolist() == fb[name][:].tolist(), name
        # Same batch size, same kernels: bitwise on this CPU (the issue allows kernel nondeterminism).
        assert fa["embeddings"][:].tobytes() == fb["embeddings"][:].tobytes()


def test_share_and_unshare_cover_every_item_once() -> None:
    items = list(range(11))
    parts = [Ranks(rank=r, world=3).share(items) for r in range(3)]
    assert sorted(sum(parts, [])) == items
    assert Ranks(rank=0, world=3).unshare(parts, len(items)) == items


def test_ranks_share_whole_tar_shards() -> None:
    shard_of = np.repeat([4, 1, 7, 2, 9], [30, 10, 25, 5, 30])  # 5 shards of unequal size, in dataset order
    items = np.arange(len(shard_of)) * 10
    parts = [Ranks(rank=r, world=2).share(items, shard_of) for r in range(2)]
    assert sorted(np.concatenate(parts).tolist()) == items.tolist()  # every item once
    owners = [set(shard_of[part // 10].tolist()) for part in parts]
    assert not owners[0] & owners[1] and owners[0] | owners[1] == {1, 2, 4, 7, 9}  # no shard read by both ranks
    assert abs(len(parts[0]) - len(parts[1])) <= 30  # balanced to within one shard
    assert Ranks(rank=1, world=2).unshare([p.tolist() for p in parts], len(items), shard_of) == items.tolist()
    assert Ranks(rank=0, world=1).share(items, shard_of) is not None and len(Ranks().share(items, shard_of)) == len(items)


@pytest.mark.slow
def test_torchrun_two_processes_write_the_single_process_file(tmp_path: Path) -> None:
    data = make_tree(tmp_path / "data", per_class=7)
    single = _single(data, tmp_path / "single")
    result = _torchrun(data, tmp_path / "multi")
    assert result["computed"] == 21 and result["reused"] == 0
    _same_export(result["path"], single["path"])
    assert embedpipe.cache_verify(tmp_path / "multi") == []
    again = _torchrun(data, tmp_path / "multi")
    assert again["cache_hit"] and again["computed"] == 0


@pytest.mark.slow
def test_a_killed_rank_leaves_usable_shards_and_a_rerun_completes(tmp_path: Path) -> None:
    data = make_tree(tmp_path / "data", per_class=10)
    single = _single(data, tmp_path / "single")
    cache = tmp_path / "multi"
    launcher = subprocess.Popen([*TORCHRUN, *EXTRACT, str(data), "--cache-dir", str(cache)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV, start_new_session=True)
    deadline = time.monotonic() + 240
    while len(_shards(cache)) < 3:  # both ranks are embedding
        assert launcher.poll() is None, launcher.communicate()[1][-2000:]
        assert time.monotonic() < deadline
        time.sleep(0.005)
    children = Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read_text().split()
    os.kill(int(children[-1]), signal.SIGKILL)  # one rank dies; torchrun stops the other
    launcher.wait(timeout=120)
    assert launcher.returncode != 0
    kept = len(_shards(cache))
    assert embedpipe.cache_verify(cache) == []
    assert 0 < kept  # finished work survives

    resumed = _single(data, cache)  # any number of processes completes it: here one
    assert 0 < resumed["computed"] < 30
    assert resumed["computed"] + resumed["reused"] == 30
    _same_export(resumed["path"], single["path"])


@pytest.mark.slow
def test_torchrun_over_tar_shards_writes_the_single_process_file(tmp_path: Path) -> None:
    from .test_sources import write_shards

    data = make_tree(tmp_path / "data", per_class=6)
    write_shards(data, tmp_path / "wds", shards=4)  # whole shards go to one rank each (test_ranks_share_whole_tar_shards)
    source = tmp_path / "wds" / "shards-{000000..000003}.tar"
    single = _single(source, tmp_path / "single")
    result = _torchrun(source, tmp_path / "multi")
    assert result["computed"] == 18 and result["reused"] == 0
    _same_export(result["path"], single["path"])
    assert embedpipe.cache_verify(tmp_path / "multi") == []
