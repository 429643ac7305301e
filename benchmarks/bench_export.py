"""Rebuilding an export after 1% new images, against the least any in-place extension of it could cost.

Issue 11 asks the export to be "extended or rebuilt from shards without rewriting rows that did not
change where the format allows": measure and choose. An export's rows are in its dataset's order
(sorted paths, so new images land among the old ones) and every column carries a sha256 that the
readers check, so extending a file in place would still read every existing row (to hash it) and,
unless every new path sorts last, move rows. This measures, side by side on one store of N rows:

- **rebuild**, what ``embedpipe extract`` does: ``Store.index`` of all N + n digests, then
  ``write_export`` of every row from the store into a new file (temporary name, fsync, rename);
- **append, lower bound**: what the cheapest in-place scheme cannot avoid: hashing every column of
  the existing N-row export (the checksums) and writing the n new rows at the end of a resizable
  dataset; nothing moved, no text column extended, no atomic replace.

Each variant runs ``--repeats`` times, interleaved; the medians are printed with their ratio.

Example::

    python benchmarks/bench_export.py --rows 1000000 --width 96     # ~3 min on 2 cores
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

from _harness import machine_info, results_path, write_results
from bench_store_scale import digests

from embedpipe.cache.export import CHECKSUMMED, ExportMeta, ExportRequest, SplitColumn, read_export, verify_export, write_export
from embedpipe.cache.hdf5 import column_digest
from embedpipe.cache.layout import COMPACT_ROWS, CHUNK_ROWS
from embedpipe.cache.store import Store
from embedpipe.config import EmbeddingConfig, PreprocessConfig
from embedpipe.data.strings import PackedStrings


def request(n: int, config: EmbeddingConfig) -> ExportRequest:
    """An export of rows ``0 .. n-1``: class folders as bench_bookkeeping's PNGs, paths sorted as a listing gives them."""
    paths = sorted(f"class{i % 10}/img_{i:08d}.png" for i in range(n))
    order = np.array([int(p[-12:-4]) for p in paths], dtype=np.int64)
    meta = ExportMeta(config=config, dataset_fingerprint=f"{n:064x}", backbone_spec={"name": config.backbone},
                      class_names=tuple(f"class{c}" for c in range(10)), dataset={"images": n}, split_seed=0)
    return ExportRequest(paths=PackedStrings.pack(paths), labels=order % 10, split=SplitColumn((order % 3).astype(np.int8)),
                         digests=digests(0, n)[order], meta=meta)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows of the existing export (default: %(default)s)")
    parser.add_argument("--new", type=float, default=0.01, help="fraction of new rows (default: %(default)s)")
    parser.add_argument("--width", type=int, default=96, help="embedding width (default: %(default)s, test_resnet's)")
    parser.add_argument("--repeats", type=int, default=3, help="samples of each variant (default: %(default)s)")
    parser.add_argument("--workdir", default=None, help="where the store goes (default: a temporary folder)")
    parser.add_argument("--out", default=None, help="results JSON (default: benchmarks/results/export-<machine>.json)")
    args = parser.parse_args(argv)
    info = machine_info("cpu")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="embedpipe-export-"))
    preprocess = PreprocessConfig(input_size=(3, 32, 32), interpolation="bilinear", mean=(0.5,) * 3, std=(0.5,) * 3,
                                  crop_pct=1.0, crop_mode="center")
    config = EmbeddingConfig(backbone="synthetic", weights="random:0", preprocess=preprocess, dtype="float32")
    store = Store(work / f"cache-{time.time_ns()}", config)
    store.create()
    extra = max(1, round(args.rows * args.new))
    total = args.rows + extra
    rng = np.random.default_rng(0)
    old, new = request(args.rows, config), request(total, config)
    # The store as a first run and then the 1% run leave it: the first run's rows in its dataset order, in
    # shards of COMPACT_ROWS (compacted), then the new images' rows in their own shards.
    added = new.digests[~np.isin(new.digests, old.digests)]  # in path order, as they were embedded
    for part in (old.digests, added):
        for start in range(0, len(part), COMPACT_ROWS):
            rows = part[start : start + COMPACT_ROWS]
            store.write_shard(rows, {"embedding": rng.standard_normal((len(rows), args.width), dtype=np.float32)})
    existing = store.root.parent.parent / "existing.h5"
    write_export(existing, store, store.index(old.digests), old)
    fresh_rows = rng.standard_normal((extra, args.width), dtype=np.float32)

    def rebuild() -> float:
        started = time.perf_counter()
        write_export(store.root.parent.parent / "rebuilt.h5", store, store.index(new.digests), new)
        return time.perf_counter() - started

    def append_lower_bound() -> float:
        started = time.perf_counter()
        with h5py.File(existing, "r") as f:
            for name in ("embeddings", *CHECKSUMMED):
                if name in f:
                    column_digest(f[name], hashlib.sha256())
        with h5py.File(store.root.parent.parent / "appended.h5", "w") as f:
            data = f.create_dataset("embeddings", shape=(args.rows, args.width), maxshape=(None, args.width),
                                    chunks=(CHUNK_ROWS, args.width), dtype=np.float32)
            data.resize(total, axis=0)
            data[args.rows :] = fresh_rows
        return time.perf_counter() - started

    variants = {"rebuild": rebuild, "append (lower bound)": append_lower_bound}
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, fn in variants.items():
            seconds[name].append(fn())
    rebuilt = read_export(store.root.parent.parent / "rebuilt.h5")  # what was timed is a sound export of every row
    assert len(rebuilt.paths) == total and not verify_export(store.root.parent.parent / "rebuilt.h5"), "rebuild unsound"
    assert rebuilt.paths[:3] == new.paths.take(np.arange(3)).tolist()
    del rebuilt
    medians = {name: statistics.median(values) for name, values in seconds.items()}
    record = {**info, "rows": args.rows, "new_rows": extra, "width": args.width, "seconds": seconds, "median_seconds": medians,
              "rebuild_over_append": medians["rebuild"] / medians["append (lower bound)"]}
    write_results(results_path("export", info, out=args.out), [record])
    print(f"\nexport of {args.rows:,} rows + {extra:,} new, width {args.width} ({info['cpu']}, {info['cores']} cores), "
          f"median of {args.repeats}\n")
    for name, value in medians.items():
        print(f"{name}: {value:.2f} s ({value / total * 1e6:.2f} us/row)")
    print(f"rebuild / append lower bound: {record['rebuild_over_append']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
