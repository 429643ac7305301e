"""The store at ten million rows: how many files it holds, what finding a dataset's rows in it costs, and ``cache verify``.

An extraction of 10M images takes hours on a CPU, but the store only ever sees digests and rows:
this writes them exactly as the extract stage does (one committed, fsync'd shard per batch of 256,
``Store.compact`` after every ``COMPACT_SHARDS`` shards and once at the end), with distinct sha256
digests and narrow rows, so the compaction rule and the store's own costs are measured at the
scale the issue asks for:

- files in the store (goal: a few thousand at most at 10M);
- ``Store.index`` of every digest (what an export of the whole dataset looks up): seconds, and the
  bytes per row it holds and needs at its peak (``tracemalloc``, which traces numpy's arrays);
- ``embedpipe cache verify`` of the cache, in a process of its own: seconds and peak RSS (it
  streams, so its memory should not grow with the store).

Example::

    python benchmarks/bench_store_scale.py --rows 10000000 --workdir /data/store   # ~15 min on 2 cores
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np

from _harness import machine_info, results_path, run_embedpipe, write_results

from embedpipe.cache.index import FileIndex
from embedpipe.cache.layout import COMPACT_SHARDS, RAW_DIGEST_DTYPE
from embedpipe.cache.store import Store
from embedpipe.config import EmbeddingConfig, PreprocessConfig

BATCH = 256  # the extract stage's default batch: one shard each


def digests(start: int, stop: int) -> np.ndarray:
    """Distinct sha256 digests of ``start .. stop-1``, as the file index gives them (raw), made a block at a time."""
    out = np.empty(stop - start, dtype=RAW_DIGEST_DTYPE)
    for first in range(start, stop, 65536):
        last = min(first + 65536, stop)
        out[first - start : last - start] = [hashlib.sha256(i.to_bytes(8, "little")).digest() for i in range(first, last)]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000_000, help="rows written (default: %(default)s)")
    parser.add_argument("--width", type=int, default=8, help="embedding width of each row (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=BATCH, help="rows per committed shard (default: %(default)s)")
    parser.add_argument("--workdir", default=None, help="where the cache goes (default: a temporary folder)")
    parser.add_argument("--out", default=None, help="results JSON (default: benchmarks/results/store-scale-<machine>.json)")
    args = parser.parse_args(argv)
    info = machine_info("cpu")
    cache = Path(args.workdir or tempfile.mkdtemp(prefix="embedpipe-store-")) / f"cache-{time.time_ns()}"
    preprocess = PreprocessConfig(input_size=(3, 32, 32), interpolation="bilinear", mean=(0.5,) * 3, std=(0.5,) * 3,
                                  crop_pct=1.0, crop_mode="center")
    store = Store(cache, EmbeddingConfig(backbone="synthetic", weights="random:0", preprocess=preprocess, dtype="float32"))  # row numbers exact
    store.create()
    image = cache / "one-file"  # the file index an extract leaves beside its store (verify reads it too)
    image.write_bytes(b"not an image: only hashed")
    FileIndex(cache).digests([str(image)])
    rows = np.zeros((args.batch, args.width), dtype=np.float32)
    started = time.perf_counter()
    written = 0
    for start in range(0, args.rows, args.batch):
        part = digests(start, min(start + args.batch, args.rows))
        rows[:, 0] = np.arange(start, start + args.batch)  # each row its own value
        store.write_shard(part, {"embedding": rows[: len(part)]})
        written += 1
        if written % COMPACT_SHARDS == 0:  # as the extract stage does
            store.compact()
        if written % 4096 == 0:
            print(f"  {start + len(part):,} rows, {len(store.shards())} shards, {time.perf_counter() - started:.0f} s", file=sys.stderr)
    store.compact()
    write_seconds = time.perf_counter() - started
    files = sum(1 for p in (cache / "store").rglob("*") if p.is_file())
    shards = len(store.shards())

    every = digests(0, args.rows)
    tracemalloc.start()  # numpy's arrays are traced: what the index holds at its peak, beyond the digests asked for
    started = time.perf_counter()
    index = store.index(every)
    index_seconds = time.perf_counter() - started
    index_bytes, index_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert index.stored().all(), "rows lost"
    probe = np.random.default_rng(0).integers(0, args.rows, 1000)
    found = store.read_rows(index, probe, "embedding")[:, 0]
    assert np.array_equal(found, probe.astype(found.dtype)), "wrong rows found"
    del index, every

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    _, verify_seconds, verify_rss = run_embedpipe(["cache", "verify", str(cache)], env)
    record: dict[str, Any] = {**info, "rows": args.rows, "width": args.width, "batch": args.batch, "write_seconds": write_seconds,
                              "store_files": files, "shards": shards, "index_seconds": index_seconds,
                              "index_bytes_per_row": index_bytes / args.rows, "index_peak_bytes_per_row": index_peak / args.rows,
                              "verify_seconds": verify_seconds,
                              "verify_peak_rss_bytes": verify_rss}
    write_results(results_path("store-scale", info, out=args.out), [record])
    print(f"\nembedpipe store at {args.rows:,} rows ({info['cpu']}, {info['cores']} cores; {args.batch} rows a shard, width {args.width})\n")
    print(f"written and compacted: {write_seconds:.0f} s; {files} files in the store ({shards} shards)")
    print(f"Store.index of every digest: {index_seconds:.1f} s; holds {index_bytes / args.rows:.1f} B/row, "
          f"{index_peak / args.rows:.1f} B/row at its peak")
    print(f"cache verify: {verify_seconds:.1f} s, peak RSS {verify_rss / 2**20:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
