"""How close embedpipe's extraction comes to its limits, as ratios measured side by side.

Every variant runs once per repetition, in alternating order (A B C ... then
... C B A), compared variants next to each other, on one synthetic JPEG
dataset, in one process; a summary ratio is the median of the per-repetition
ratios, so slow drift on a noisy machine cancels out. Measurements and goals:

1. loop overhead: embedpipe's own loop (``inference.embed()`` fed pre-decoded
   uint8 images, workers=0) vs a bare timm forward over pre-made normalised
   batches (>= 0.95).
2. end to end: the embedding stage of ``embedpipe.extract()``
   (``ExtractResult.images_per_second``) vs its limit ``1 / (1/forward +
   1/decode)`` on CPU, ``min(forward, decode)`` on a GPU, where decode is
   ``inference.ImageFiles`` through a DataLoader built as embed() builds it (>= 0.90).
3. cache writes: ``extraction._compute`` (the embedding loop, one
   ``Store.write_shard`` per batch) vs the same loop with writes discarded (>= 0.98),
   both fed pre-decoded images with the warm model, as variant 1 is; and one
   ``_compute`` call that writes every other batch's shard, compared batch by
   batch (whole calls of one loop vary by 10-15% here, which no 2% goal survives).
4. cache hit: a second ``extract()`` on the same data and cache vs the first (<= 0.02).
5. incremental: ``extract()`` after adding 1% new images vs the first (<= 0.03).

Every variant computes in the precision ``--precision`` resolves to (auto:
as embedpipe resolves it for the device), the bare loop under the same
autocast. Extra rows: bf16 autocast vs fp32 (speed, and cosine of the
embeddings: bf16 is fit for a CPU default only at min cosine >= 0.99 and a
speed-up), channels_last on vs off, and glibc malloc defaults vs raised
mmap/trim thresholds (the bare forward in fresh child processes, since mallopt
cannot be undone in-process).

The pre-decoded, cache-write and malloc variants run on the first
``--forward-images`` images (128), the extract() calls on all ``--images``.
A sample counts as clean when other processes kept at most ``--max-contention``
cores busy while it ran (read from /proc/stat); summaries use the clean
repetitions when there are any, and the table says how many there were.

Output: a table on stdout and a JSON list of flat records (one per sample, one
per summary row, one per diagnostic) in benchmarks/results/, named after the
machine; every record carries the machine, torch threads, workers, batch size
and precision. A failing variant becomes a record with its error and the run
goes on.

Example::

    python benchmarks/bench_extract.py                      # about 4 minutes on 2 quiet cores
    python benchmarks/bench_extract.py --malloc-tuned       # the same with the proposed allocator fix
    python benchmarks/bench_extract.py --backbone test_efficientnet --no-pretrained --images 64 --repeats 2
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from _harness import PHOTO_QUALITY, PHOTO_SIZE, Harness, Selection, add_sampling_options, machine_info, photo, results_path

import embedpipe  # noqa: E402
from embedpipe import BackboneSpec, RunConfig  # noqa: E402
from embedpipe._compat import ensure_torchvision_importable  # noqa: E402

ensure_torchvision_importable()

import torch  # noqa: E402

from embedpipe import extraction, inference  # noqa: E402
from embedpipe._progress import no_progress  # noqa: E402
from embedpipe.backbone import load_backbone  # noqa: E402
from embedpipe.cache import Store  # noqa: E402
from embedpipe.cache.layout import RAW_DIGEST_DTYPE, raw_digests  # noqa: E402
from embedpipe.machine import PeakMemory, resolve_device  # noqa: E402
from embedpipe.preprocess import normalize  # noqa: E402

# Goals: (comparison, bound). ">=" for speed ratios, "<=" for time ratios.
GOALS = {
    "loop_overhead": (">=", 0.95),
    "end_to_end": (">=", 0.90),
    "cache_writes": (">=", 0.98),
    "cache_hit": ("<=", 0.02),
    "incremental": ("<=", 0.03),
    "bf16_cosine": (">=", 0.99),  # min cosine to fp32 for bf16 to be a CPU default
}
NEW_FRACTION = 0.01  # share of new images in the incremental extraction


# --------------------------------------------------------------------------- data


def make_images(folder: Path, count: int, *, start: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(start, start + count):
        path = folder / f"img_{i:06d}.jpg"
        photo(i).save(path, quality=PHOTO_QUALITY)
        paths.append(path)
    return paths


def sha256_hex(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------- variants


@contextlib.contextmanager
def in_memory_images(images: torch.Tensor) -> Iterator[None]:
    """Make ``embed()`` read pre-decoded uint8 images instead of decoding files (its loop runs unchanged)."""

    class Decoded(torch.utils.data.Dataset):
        def __init__(self, paths: Any, config: Any) -> None:
            self.n = len(paths)

        def __len__(self) -> int:
            return self.n

        def __getitem__(self, index: int) -> tuple[int, torch.Tensor, str]:
            return index, images[index % len(images)], ""  # cycled: a loop may run longer than the images

    original = inference.ImageFiles
    inference.ImageFiles = Decoded
    try:
        yield
    finally:
        inference.ImageFiles = original


@contextlib.contextmanager
def warm_model(model: torch.nn.Module) -> Iterator[None]:
    """Make ``extraction._compute`` run ``model`` (prepared and warmed up) instead of loading a fresh one."""
    from embedpipe import backbone

    originals = backbone.load_backbone, inference.prepare_model
    backbone.load_backbone = lambda *args, **kwargs: model
    inference.prepare_model = lambda prepared, *args, **kwargs: prepared
    try:
        yield
    finally:
        backbone.load_backbone, inference.prepare_model = originals


class TimedStore(Store):
    """A Store that adds up the time spent in ``write_shard``."""

    write_seconds = 0.0
    shards_written = 0

    def write_shard(self, digests: Any, outputs: Any, errors: Any = ()) -> Any:
        started = time.perf_counter()
        try:
            return super().write_shard(digests, outputs, errors)
        finally:
            self.write_seconds += time.perf_counter() - started
            self.shards_written += 1


class DiscardStore(Store):
    """A Store whose writes go nowhere: the same loop, without the cache."""

    def write_shard(self, digests: Any, outputs: Any, errors: Any = ()) -> Any:
        return None


class AlternatingStore(Store):
    """A Store that writes every other batch's shard and discards the others, noting when each
    loop iteration ends: neighbouring iterations differ only in the write, so the machine's drift
    (whole calls of the same loop vary by 10-15% here) cancels out of their ratio.

    The images cycle through ``cycle`` batches; which iterations write shifts by one each cycle,
    so every image batch is as often among the writing iterations as among the others (written
    on a fixed parity, the same image batches always wrote, and a difference in the forward's
    speed between batches of other images read as a cost of writing).
    """

    def __init__(self, *args: Any, cycle: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.cycle = max(1, cycle)
        self.ends: list[float] = []
        self.wrote: list[bool] = []
        self.compact_seconds = 0.0

    def write_shard(self, digests: Any, outputs: Any, errors: Any = ()) -> Any:
        k = len(self.ends)  # the first iteration (the loader's start) is not compared
        write = (k + k // self.cycle) % 2 == 1
        result = super().write_shard(digests, outputs, errors) if write else None
        self.ends.append(time.perf_counter())
        self.wrote.append(write)
        return result

    def compact(self, **kwargs: Any) -> None:
        started = time.perf_counter()
        super().compact(**kwargs)
        self.compact_seconds += time.perf_counter() - started

    def iterations(self) -> tuple[np.ndarray, np.ndarray]:
        """(seconds of each compared iteration: its forward, and its write when it wrote; whether it wrote)."""
        return np.diff(self.ends), np.array(self.wrote[1:], dtype=bool)

    def ratio(self) -> tuple[float, int]:
        """(median discarding iteration's time / median writing iteration's, the end-of-call compaction
        charged to the writing ones; the number of writing iterations). Medians, because a few
        iterations here run 10-30% slow when the host takes the cores away, whichever kind they are."""
        times, wrote = self.iterations()
        writing = int(wrote.sum())
        if not writing or writing == len(wrote):
            return float("nan"), 0
        return float(np.median(times[~wrote]) / (np.median(times[wrote]) + self.compact_seconds / writing)), writing


class Bench(Harness):
    """Holds the dataset and the models of one benchmark run; the harness holds its records."""

    # Before each sample: one quiet half-second, checked again 1 s after a busy one.
    QUIET_POLL_SECONDS = 0.5
    QUIET_POLLS = 1
    BUSY_PAUSE_SECONDS = 1.0

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.device = resolve_device(args.device)
        preprocess = {"input_size": args.input_size} if args.input_size else {}
        self.spec = BackboneSpec(name=args.backbone, pretrained=not args.no_pretrained, precision=args.precision, preprocess=preprocess)
        self.config = extraction.resolve(self.spec, self.device)
        # The bf16 rows compare the resolved precision with the other one of fp32/bf16.
        self.other_precision = "bf16" if self.config.precision == "fp32" else "fp32"
        self.workers = inference.default_workers(self.device) if args.workers is None else args.workers
        self.run_cfg = RunConfig(device=self.device, batch_size=args.batch_size, num_workers=self.workers)
        self.info = machine_info(self.device)
        common = {
            "bench": "extract",
            **self.info,
            "backbone": args.backbone,
            "pretrained": not args.no_pretrained,
            "input_size": "x".join(map(str, self.config.preprocess.input_size)),
            "images": args.images,
            "forward_images": min(args.images, args.forward_images),
            "batch_size": args.batch_size,
            "workers": self.workers,
            "precision": self.config.precision,
            "channels_last": self.run_cfg.channels_last,
            "repeats": args.repeats,
        }
        super().__init__(common, max_contention=args.max_contention, max_wait=args.max_wait)
        self.embeddings: dict[str, np.ndarray] = {}

    # ----------------------------------------------------------------- setup

    def setup(self, workdir: Path) -> None:
        args = self.args
        self.workdir = workdir
        self.data = workdir / "photos"
        self.extra = workdir / "new-photos"  # moved into the dataset for the incremental run
        started = time.perf_counter()
        self.paths = make_images(self.data, args.images)
        n_new = max(1, math.ceil(args.images * NEW_FRACTION))
        self.new_paths = make_images(self.extra, n_new, start=args.images)
        self.diag("dataset_seconds", time.perf_counter() - started, "s", mean_jpeg_bytes=float(np.mean([p.stat().st_size for p in self.paths])))
        self.todo = {sha256_hex(p).encode(): p for p in self.paths}

        # Pre-decoded uint8 images laid out as ImageFiles gives them, and the bare loop's pre-normalised batches.
        files = inference.ImageFiles(self.paths, self.config)
        _, self.decoded, _ = inference.collate_images([files[i] for i in range(min(len(files), args.forward_images))])
        memory_format = torch.channels_last if self.run_cfg.channels_last else torch.contiguous_format
        self.bare_batches = [
            normalize(self.decoded[s : s + args.batch_size], self.config.preprocess).contiguous(memory_format=memory_format)
            for s in range(0, len(self.decoded), args.batch_size)
        ]

        started = time.perf_counter()
        base = load_backbone(self.spec.name, weights=self.spec.weights, pretrained=self.spec.pretrained)
        self.diag("load_backbone_seconds", time.perf_counter() - started, "s")
        self.model = inference.prepare_model(base, self.device, self.run_cfg)
        contiguous = load_backbone(self.spec.name, weights=self.spec.weights, pretrained=self.spec.pretrained)
        self.model_contiguous = inference.prepare_model(contiguous, self.device, replace(self.run_cfg, channels_last=False))

        # Warm up every path once on one batch: oneDNN primitives for the batch shape
        # (the bare loop shares the fp32 model's), worker start, h5py, sqlite.
        small = self.decoded[: min(len(self.decoded), args.batch_size)]
        with in_memory_images(small):
            for model, config, channels_last in self._predecoded_variants().values():
                run = replace(self.run_cfg, num_workers=0, channels_last=channels_last)
                for _ in inference.embed(model, [""] * len(small), config, device=self.device, run=run):
                    pass
        warm = workdir / "warm" / "photos"
        for p in self.paths[: min(8, len(self.paths))]:
            warm.parent.mkdir(parents=True, exist_ok=True)
            warm.mkdir(exist_ok=True)
            shutil.copy(p, warm / p.name)
        embedpipe.extract(warm, self.spec, cache_dir=workdir / "warm" / "cache", run=self.run_cfg)
        shutil.rmtree(workdir / "warm")

    def _predecoded_variants(self) -> dict[str, tuple[torch.nn.Module, Any, bool]]:
        return {
            "embed_predecoded": (self.model, self.config, True),
            f"embed_predecoded_{self.other_precision}": (self.model, replace(self.config, precision=self.other_precision), True),
            "embed_predecoded_contiguous": (self.model_contiguous, self.config, False),
        }

    # ----------------------------------------------------------------- the variants

    def bare_forward(self) -> dict[str, Any]:
        model = self.model
        started = time.perf_counter()
        with torch.inference_mode(), autocast(self.device, self.config.precision):
            for x in self.bare_batches:
                model.forward_head(model.forward_features(x), pre_logits=True)
        seconds = time.perf_counter() - started
        return {"seconds": seconds, "images_per_second": len(self.decoded) / seconds}

    def predecoded(self, variant: str) -> dict[str, Any]:
        model, config, channels_last = self._predecoded_variants()[variant]
        run = replace(self.run_cfg, num_workers=0, channels_last=channels_last)  # nothing to decode: no workers
        parts = []
        started = time.perf_counter()
        with in_memory_images(self.decoded):
            for batch in inference.embed(model, [""] * len(self.decoded), config, device=self.device, run=run):
                parts.append(batch.outputs["embedding"])
        seconds = time.perf_counter() - started
        self.embeddings[variant] = np.concatenate(parts)
        return {"seconds": seconds, "images_per_second": len(self.decoded) / seconds, "precision": config.precision, "channels_last": channels_last}

    def decode_only(self) -> dict[str, Any]:
        """ImageFiles through a DataLoader built as embed() builds it, outputs discarded."""
        workers = min(self.workers, max(0, math.ceil(len(self.paths) / self.args.batch_size)))
        started = time.perf_counter()
        loader = torch.utils.data.DataLoader(
            inference.ImageFiles(self.paths, self.config),
            batch_size=self.args.batch_size,
            shuffle=False,
            num_workers=workers,
            collate_fn=inference.collate_images,
            pin_memory=False,
            prefetch_factor=4 if workers else None,
        )
        count = sum(len(rows) for rows, _, _ in loader)
        seconds = time.perf_counter() - started
        return {"seconds": seconds, "images_per_second": count / seconds}

    def compute(self, *, writes: bool, rep: int) -> dict[str, Any]:
        """``extraction._compute`` with shard writes or with them discarded, fed as the loop variants are fed.

        Pre-decoded images, no decode workers and the warm model, as ``embed_predecoded``: so its
        images/s is the loop's, and writes / discard isolates ``write_shard`` and compaction. Fed
        JPEG files through one decode worker with a fresh model per call, as it once was, it ran
        end to end over two batches, with worker start-up, pipeline fill and a cold model in every
        sample (about 1.5 s of 3.5 s, estimated from the stored AMD EPYC run), at a seventh of the
        loop's speed (issue 13): a different measurement, and the write cost drowned in its noise.
        """
        cache = self.workdir / "caches" / f"compute-{rep}-{writes}"
        store = (TimedStore if writes else DiscardStore)(cache, self.config)
        store.create()
        run = replace(self.run_cfg, num_workers=0)  # nothing to decode: no workers
        try:
            digests = raw_digests(list(self.todo)[: len(self.decoded)])
            with in_memory_images(self.decoded), warm_model(self.model):
                seconds, computed = extraction._compute(store, digests, [""] * len(digests), self.spec, self.device, run,
                                                        no_progress)
        finally:
            shutil.rmtree(cache, ignore_errors=True)
        extra = {"write_seconds": store.write_seconds, "shards": store.shards_written} if writes else {}
        return {"seconds": seconds, "images_per_second": computed / seconds, **extra}

    def compute_alternating(self, rep: int) -> dict[str, Any]:
        """One ``_compute`` call over ``--alternating-batches`` batches of the pre-decoded images (cycled),
        writing every other batch's shard: the ratio of adjacent iterations without and with a write,
        the end-of-call compaction charged to the writing ones."""
        cache = self.workdir / "caches" / f"alternating-{rep}"
        store = AlternatingStore(cache, self.config, cycle=math.ceil(len(self.decoded) / self.args.batch_size))
        store.create()
        n = self.args.alternating_batches * self.args.batch_size
        digests = np.array([hashlib.sha256(f"alternating {i}".encode()).digest() for i in range(n)], dtype=RAW_DIGEST_DTYPE)
        try:
            with in_memory_images(self.decoded), warm_model(self.model):
                seconds, computed = extraction._compute(store, digests, [""] * n, self.spec, self.device,
                                                        replace(self.run_cfg, num_workers=0), no_progress)
        finally:
            shutil.rmtree(cache, ignore_errors=True)
        ratio, pairs = store.ratio()
        times, wrote = store.iterations()
        return {"seconds": seconds, "images_per_second": computed / seconds, "ratio": ratio, "pairs": pairs,
                "compact_seconds": store.compact_seconds, "iteration_seconds": times.round(5).tolist(), "wrote": wrote.tolist()}

    def allocator_child(self, malloc: str) -> dict[str, Any]:
        """The bare forward in a fresh process, with glibc's malloc defaults or tuned (see embedpipe.keep_freed_memory)."""
        a = self.args
        command = [sys.executable, __file__, "--allocator-child", malloc, "--backbone", a.backbone, "--batch-size", str(a.batch_size)]
        command += ["--forward-images", str(len(self.decoded))] + (["--no-pretrained"] if a.no_pretrained else [])
        command += ["--input-size", str(a.input_size)] if a.input_size else []
        command += ["--precision", self.config.precision, "--device", self.device]
        done = subprocess.run(command, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            raise RuntimeError(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}")
        return json.loads(done.stdout.strip().splitlines()[-1])

    def extract_chain(self, rep: int) -> None:
        """First extraction into a fresh cache, then a cache hit, then +1% new images."""
        cache = self.workdir / "caches" / f"extract-{rep}"
        moved: list[Path] = []
        try:

            def call(variant: str) -> Callable[[], dict[str, Any]]:
                def fn() -> dict[str, Any]:
                    started = time.perf_counter()
                    result = embedpipe.extract(self.data, self.spec, cache_dir=cache, run=self.run_cfg)
                    wall = time.perf_counter() - started
                    return {
                        "seconds": wall,
                        "images_per_second": result.images_per_second,
                        "result_seconds": result.seconds,
                        "computed": result.computed,
                        "reused": result.reused,
                        "cache_hit": result.cache_hit,
                    }

                return fn

            self.sample("end_to_end", "extract_first", rep, call("extract_first"))
            self.sample("cache_hit", "extract_hit", rep, call("extract_hit"))
            for path in self.new_paths:
                path.rename(self.data / path.name)
                moved.append(path)
            self.sample("incremental", "extract_incremental", rep, call("extract_incremental"))
        finally:
            for path in moved:
                (self.data / path.name).rename(path)
            shutil.rmtree(cache, ignore_errors=True)

    def units(self, rep: int) -> list[Callable[[], None]]:
        # Variants that are compared sit next to each other, so a pair runs close in time.
        tagged = [
            ("bf16", lambda: self.sample("bf16", f"embed_predecoded_{self.other_precision}", rep, lambda: self.predecoded(f"embed_predecoded_{self.other_precision}"))),
            ("channels_last", lambda: self.sample("channels_last", "embed_predecoded_contiguous", rep, lambda: self.predecoded("embed_predecoded_contiguous"))),
            # A B B A here too: a pair's order alone moved its ratio by up to 10%.
            ("loop_overhead", lambda: self.sample("loop_overhead", "embed_predecoded", rep, lambda: self.predecoded("embed_predecoded"))),
            ("loop_overhead", lambda: self.sample("loop_overhead", "bare_forward", rep, self.bare_forward)),
            ("loop_overhead", lambda: self.sample("loop_overhead", "bare_forward", rep, self.bare_forward)),
            ("loop_overhead", lambda: self.sample("loop_overhead", "embed_predecoded", rep, lambda: self.predecoded("embed_predecoded"))),
            ("end_to_end", lambda: self.sample("end_to_end", "decode_only", rep, self.decode_only)),
            ("end_to_end cache_hit incremental", lambda: self.extract_chain(rep)),
            # A B B A: the second of two back-to-back _compute runs is often slower, whichever it is.
            ("cache_writes", lambda: self.sample("cache_writes", "compute_writes", rep, lambda: self.compute(writes=True, rep=rep))),
            ("cache_writes", lambda: self.sample("cache_writes", "compute_discard", rep, lambda: self.compute(writes=False, rep=rep))),
            ("cache_writes", lambda: self.sample("cache_writes", "compute_discard", rep, lambda: self.compute(writes=False, rep=rep))),
            ("cache_writes", lambda: self.sample("cache_writes", "compute_writes", rep, lambda: self.compute(writes=True, rep=rep))),
            ("cache_writes", lambda: self.sample("cache_writes", "compute_alternating", rep, lambda: self.compute_alternating(rep))),
            ("allocator", lambda: self.sample("allocator", "child_forward_glibc_default", rep, lambda: self.allocator_child("default"))),
            ("allocator", lambda: self.sample("allocator", "child_forward_malloc_tuned", rep, lambda: self.allocator_child("tuned"))),
        ][: None if self.args.allocator else -2]
        only = set(self.args.only.split(",")) if self.args.only else None
        return [unit for measurements, unit in tagged if only is None or only & set(measurements.split())]

    def run(self) -> None:
        for rep in range(self.args.repeats):
            started = time.perf_counter()
            self.run_interleaved(self.units(rep), rep)
            print(f"  repetition {rep + 1}/{self.args.repeats}: {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)
            if f"embed_predecoded_{self.other_precision}" in self.embeddings and "embed_predecoded" in self.embeddings:
                self.cosines = cosine_rows(self.embeddings[f"embed_predecoded_{self.other_precision}"], self.embeddings["embed_predecoded"])
            if "embed_predecoded_contiguous" in self.embeddings and "embed_predecoded" in self.embeddings:
                self.cosines_cl = cosine_rows(self.embeddings["embed_predecoded_contiguous"], self.embeddings["embed_predecoded"])
        self.diag("waited_for_quiet_seconds", self.waited, "s")
        self.wait_for_quiet()
        self.breakdown()

    def breakdown(self) -> None:
        """Per-batch cost of what embed() does besides the forward, for diagnosing loop overhead."""
        batch = self.decoded[: self.args.batch_size]
        memory_format = torch.channels_last if self.run_cfg.channels_last else torch.contiguous_format

        def per_call(fn: Callable[[], Any], n: int = 10) -> float:
            times = []
            for _ in range(n):
                started = time.perf_counter()
                fn()
                times.append(time.perf_counter() - started)
            return statistics.median(times)

        collate = torch.utils.data.default_collate
        items = [(i, batch[i], "") for i in range(len(batch))]
        with torch.inference_mode():
            self.diag("per_batch_collate_seconds", per_call(lambda: collate(items)), "s")
            self.diag("per_batch_channels_last_seconds", per_call(lambda: batch.contiguous(memory_format=memory_format)), "s")
            x = batch.contiguous(memory_format=memory_format)
            self.diag("per_batch_normalize_seconds", per_call(lambda: normalize(x, self.config.preprocess)), "s")
            x = self.bare_batches[0]
            with autocast(self.device, self.config.precision):
                forward = per_call(lambda: self.model.forward_head(self.model.forward_features(x), pre_logits=True), 3)
            self.diag("per_batch_forward_seconds", forward, "s")


def autocast(device: str, precision: str) -> contextlib.AbstractContextManager[Any]:
    """The autocast embed() runs under for a precision (none for fp32)."""
    dtype = inference._AUTOCAST_DTYPES.get(precision)
    return torch.autocast(device_type=device.split(":")[0], dtype=dtype) if dtype is not None else contextlib.nullcontext()


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a.astype(np.float64)
    b = b.astype(np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)


# --------------------------------------------------------------------------- summary


def passes(measurement: str, ratio: float | None) -> bool | None:
    if ratio is None or measurement not in GOALS:
        return None
    op, bound = GOALS[measurement]
    return ratio >= bound if op == ">=" else ratio <= bound


def summarize(bench: Bench) -> list[list[str]]:
    """Summary records (appended to bench.records) and the rows of the printed table.

    Columns: section, variant, value (median images/s or seconds), ratio (median
    of the per-repetition ratios), goal, result, and how many repetitions were
    clean out of those that completed.
    """
    rows: list[list[str]] = []
    cpu = bench.device == "cpu"

    def fmt(value: float | None, unit: str) -> str:
        if value is None:
            return "n/a"
        return f"{value:.1f} img/s" if unit == "ips" else f"{value:.3f} s"

    def row(section: str, text: str, value: str, measurement: str = "", name: str = "", ratio: float | None = None,
            sel: Selection | None = None, description: str = "", **extra: Any) -> None:
        goal = GOALS.get(measurement)
        ok = passes(measurement, ratio)
        if name:
            bench.record(
                measurement,
                "summary:" + name,
                ratio=ratio,
                goal=f"{goal[0]} {goal[1]}" if goal else None,
                passed=ok,
                description=description,
                reps_clean=sel.clean if sel else None,
                reps_complete=sel.complete if sel else None,
                **extra,
            )
        rows.append([
            section,
            text,
            value,
            "" if not name else ("n/a" if ratio is None else f"{ratio:.3f}"),
            f"{goal[0]} {goal[1]}" if goal and name else "",
            "" if ok is None else ("PASS" if ok else "FAIL"),
            sel.label() if sel else "",
        ])

    def ips_ratio(a: str, b: str) -> Callable[[dict[str, dict[str, Any]]], float]:
        return lambda g: g[a]["images_per_second"] / g[b]["images_per_second"]

    def limit(g: dict[str, dict[str, Any]]) -> float:
        fwd, dec = g["bare_forward"]["images_per_second"], g["decode_only"]["images_per_second"]
        return 1 / (1 / fwd + 1 / dec) if cpu else min(fwd, dec)

    # 1. loop overhead
    sel = bench.select("embed_predecoded", "bare_forward")
    row("1 loop", "bare timm forward, pre-normalised batches", fmt(sel.value("bare_forward", "images_per_second"), "ips"), sel=sel)
    row("1 loop", "embed() fed pre-decoded uint8 images", fmt(sel.value("embed_predecoded", "images_per_second"), "ips"),
        "loop_overhead", "embed_vs_bare", sel.median(ips_ratio("embed_predecoded", "bare_forward")), sel,
        "embed() on pre-decoded images / bare timm forward, images/s")

    # 2. end to end
    sel = bench.select("extract_first", "bare_forward", "decode_only")
    form = "1/(1/fwd+1/dec)" if cpu else "min(fwd, dec)"
    lim = sel.median(limit)
    row("2 e2e", f"decode+transform only, {bench.workers} worker(s)", fmt(sel.value("decode_only", "images_per_second"), "ips"), sel=sel)
    row("2 e2e", f"limit {form}", fmt(lim, "ips"), sel=sel)
    row("2 e2e", "extract(): embedding stage", fmt(sel.value("extract_first", "images_per_second"), "ips"),
        "end_to_end", "extract_vs_limit", sel.median(lambda g: g["extract_first"]["images_per_second"] / limit(g)), sel,
        f"extract() images_per_second / {form}", limit_images_per_second=lim)
    row("2 e2e", "extract(): whole call, fresh cache", fmt(sel.value("extract_first", "seconds"), "s"), sel=sel)

    # 3. cache writes
    sel = bench.select("compute_writes", "compute_discard")
    share = sel.median(lambda g: g["compute_writes"]["write_seconds"] / g["compute_writes"]["seconds"])
    row("3 writes", "embedding loop, outputs discarded", fmt(sel.value("compute_discard", "images_per_second"), "ips"), sel=sel)
    row("3 writes", "embedding loop + write_shard per batch", fmt(sel.value("compute_writes", "images_per_second"), "ips"),
        "cache_writes", "writes_vs_discard", sel.median(ips_ratio("compute_writes", "compute_discard")), sel,
        "_compute with shard writes / without, images/s", write_time_share=share)
    row("3 writes", "  time inside write_shard / loop time", "n/a" if share is None else f"{100 * share:.2f} %", sel=sel)
    sel = bench.select("compute_alternating")
    writing = sel.median(lambda g: g["compute_alternating"]["pairs"])  # writing iterations, as many as the others
    row("3 writes", f"batches without / with write_shard, one call ({writing or 0:.0f} of each)",
        fmt(sel.value("compute_alternating", "images_per_second"), "ips"), "cache_writes", "alternating_batches",
        sel.median(lambda g: g["compute_alternating"]["ratio"]), sel,
        "one _compute call writing every other batch: median discarding / median writing iteration's time, compaction charged to writes")

    # 4. cache hit
    sel = bench.select("extract_hit", "extract_first")
    row("4 hit", "extract() first, fresh cache", fmt(sel.value("extract_first", "seconds"), "s"), sel=sel)
    row("4 hit", "extract() again, cache hit", fmt(sel.value("extract_hit", "seconds"), "s"),
        "cache_hit", "hit_vs_first", sel.median(lambda g: g["extract_hit"]["seconds"] / g["extract_first"]["seconds"]), sel,
        "wall time of a cache hit / first extraction")

    # 5. incremental, and what it pays whatever its size
    sel = bench.select("extract_incremental", "extract_first")
    n_new, n = len(bench.new_paths), bench.args.images
    row("5 incr", f"extract() after adding {n_new} new images ({100 * NEW_FRACTION:.0f}%)", fmt(sel.value("extract_incremental", "seconds"), "s"),
        "incremental", "incremental_vs_first", sel.median(lambda g: g["extract_incremental"]["seconds"] / g["extract_first"]["seconds"]), sel,
        "wall time with 1% new images / first extraction", new_images=n_new)
    rate = sel.value("extract_first", "images_per_second")
    if rate:
        f0 = sel.median(lambda g: g["extract_first"]["seconds"] - n / g["extract_first"]["images_per_second"])
        f1 = sel.median(lambda g: g["extract_incremental"]["seconds"] - n_new / g["extract_first"]["images_per_second"])
        goal = GOALS["incremental"][1]
        # f1 + NEW_FRACTION * N / rate <= goal * (f0 + N / rate)  <=>  N >= rate * (f1 - goal * f0) / (goal - NEW_FRACTION)
        break_even = max(0.0, rate * (f1 - goal * f0) / (goal - NEW_FRACTION)) if f0 is not None and f1 is not None else None
        row("5 incr", "  fixed cost of a call, beyond its images", fmt(f1, "s"), "incremental_fixed", "fixed_costs", None, sel,
            "incremental wall minus its new images at the first run's rate; first run likewise",
            first_fixed_seconds=f0, incremental_fixed_seconds=f1, break_even_images=break_even)
        row("5 incr", "  dataset size from which the goal holds", "n/a" if break_even is None else f"~{break_even:.0f} img", sel=sel)

    # bf16 and channels_last
    bf16, fp32 = (
        ("embed_predecoded", "embed_predecoded_fp32") if bench.other_precision == "fp32" else ("embed_predecoded_bf16", "embed_predecoded")
    )
    sel = bench.select(bf16, fp32)
    cos = getattr(bench, "cosines", None)
    cmin, cmean = (float(cos.min()), float(cos.mean())) if cos is not None else (None, None)
    row("bf16", "embed() pre-decoded, fp32", fmt(sel.value(fp32, "images_per_second"), "ips"), sel=sel)
    row("bf16", "embed() pre-decoded, bf16 autocast", fmt(sel.value(bf16, "images_per_second"), "ips"),
        "bf16_speed", "bf16_vs_fp32", sel.median(ips_ratio(bf16, fp32)), sel,
        "bf16 / fp32 images/s, pre-decoded", cosine_min=cmin, cosine_mean=cmean)
    row("bf16", "  cosine to fp32 embeddings, min (mean)", "n/a" if cmin is None else f"{cmin:.4f} ({cmean:.4f})",
        "bf16_cosine", "bf16_cosine_min", cmin, None, "min over images of cosine(bf16, fp32)", cosine_mean=cmean)
    sel = bench.select("embed_predecoded", "embed_predecoded_contiguous")
    cos = getattr(bench, "cosines_cl", None)
    row("chan_last", "embed() pre-decoded, channels_last off", fmt(sel.value("embed_predecoded_contiguous", "images_per_second"), "ips"), sel=sel)
    row("chan_last", "  speed-up of channels_last on", "", "channels_last", "on_vs_off",
        sel.median(ips_ratio("embed_predecoded", "embed_predecoded_contiguous")), sel,
        "channels_last on / off images/s, pre-decoded", cosine_min=None if cos is None else float(cos.min()))

    # glibc malloc
    sel = bench.select("child_forward_malloc_tuned", "child_forward_glibc_default")
    if sel.complete:
        extra = {
            f"{key}_{name}": sel.value(f"child_forward_{name}", key)
            for key in ("sys_seconds", "minor_faults", "max_rss_mb")
            for name in ("glibc_default", "malloc_tuned")
        }
        k = bench.common["forward_images"]
        row("malloc", "bare forward, new process, glibc defaults", fmt(sel.value("child_forward_glibc_default", "images_per_second"), "ips"), sel=sel)
        row("malloc", "bare forward, new process, mallopt tuned", fmt(sel.value("child_forward_malloc_tuned", "images_per_second"), "ips"),
            "allocator", "tuned_vs_default", sel.median(ips_ratio("child_forward_malloc_tuned", "child_forward_glibc_default")), sel,
            "bare forward images/s with M_MMAP_THRESHOLD and M_TRIM_THRESHOLD raised / glibc defaults", **extra)
        row("malloc", "  minor page faults per image", f"{extra['minor_faults_glibc_default'] / k:.0f} -> {extra['minor_faults_malloc_tuned'] / k:.0f}", sel=sel)
        row("malloc", "  kernel (sys) seconds per image", f"{extra['sys_seconds_glibc_default'] / k:.3f} -> {extra['sys_seconds_malloc_tuned'] / k:.3f}", sel=sel)
        row("malloc", "  peak RSS (MB)", f"{extra['max_rss_mb_glibc_default']:.0f} -> {extra['max_rss_mb_malloc_tuned']:.0f}", sel=sel)
    return rows


HEADER = ["#", "variant", "value", "ratio", "goal", "result", "clean reps"]


def title(bench: Bench) -> list[str]:
    info = bench.info
    return [
        f"embedpipe extract benchmark: {bench.args.backbone} ({'pretrained' if not bench.args.no_pretrained else 'random'} weights), "
        f"{bench.args.images} JPEGs {PHOTO_SIZE[0]}x{PHOTO_SIZE[1]} q{PHOTO_QUALITY}, input {bench.common['input_size']}, "
        f"{bench.args.repeats} repetitions, medians",
        f"machine: {info['cpu']}, {info['cores']} cores{', ' + info['gpu'] if info['gpu'] else ''}; torch {info['torch']}, "
        f"timm {info['timm']}, {info['torch_threads']} torch threads; device {bench.device}, batch {bench.args.batch_size}, "
        f"workers {bench.workers}, precision {bench.config.precision}, channels_last {bench.run_cfg.channels_last}, "
        f"glibc malloc {'tuned (--malloc-tuned)' if bench.common.get('malloc_tuned') else 'defaults'}; "
        f"pre-decoded, cache-write and malloc variants on {bench.common['forward_images']} images",
    ]




def allocator_child(args: argparse.Namespace) -> int:
    """``--allocator-child``: time the bare forward in this fresh process and print one JSON line."""
    device = resolve_device(args.device)
    preprocess = {"input_size": args.input_size} if args.input_size else {}
    spec = BackboneSpec(name=args.backbone, pretrained=not args.no_pretrained, precision=args.precision, preprocess=preprocess)
    config = extraction.resolve(spec, device)
    tuned = embedpipe.keep_freed_memory() if args.allocator_child == "tuned" else False
    model = inference.prepare_model(load_backbone(spec.name, pretrained=spec.pretrained), device, RunConfig(device=device))
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (args.batch_size, *config.preprocess.input_size), dtype=torch.uint8, generator=generator)
    x = normalize(images.contiguous(memory_format=torch.channels_last), config.preprocess)
    batches = max(1, args.forward_images // args.batch_size)
    with torch.inference_mode(), autocast(device, config.precision):
        model.forward_head(model.forward_features(x), pre_logits=True)  # warm-up
        before = resource.getrusage(resource.RUSAGE_SELF)
        started = time.perf_counter()
        for _ in range(batches):
            model.forward_head(model.forward_features(x), pre_logits=True)
        seconds = time.perf_counter() - started
        after = resource.getrusage(resource.RUSAGE_SELF)
    print(
        json.dumps(
            {
                "seconds": seconds,
                "images_per_second": batches * args.batch_size / seconds,
                "child_malloc_tuned": tuned,
                "sys_seconds": after.ru_stime - before.ru_stime,
                "minor_faults": after.ru_minflt - before.ru_minflt,
                # VmHWM: ru_maxrss would include the parent's from before exec
                "max_rss_mb": PeakMemory("cpu").read() / 2**20,
            }
        )
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="tf_efficientnet_lite0", help="timm model name (default: %(default)s)")
    parser.add_argument("--no-pretrained", action="store_true", help="seeded random weights (quick runs, test_* models)")
    parser.add_argument("--input-size", type=int, default=None, help="override the input size (e.g. 64 for test models)")
    parser.add_argument("--images", type=int, default=256, help="synthetic JPEGs in the dataset (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: embedpipe's default for the device")
    parser.add_argument("--workers", type=int, default=None, help="decode workers (default: embedpipe's default for the device)")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda or auto")
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                        help="compute precision of every variant; auto resolves as embedpipe does (default: %(default)s)")
    parser.add_argument("--workdir", default=None, help="where the dataset and caches go (default: a temporary folder)")
    parser.add_argument("--forward-images", type=int, default=128, help="images per sample of the pre-decoded forward variants (default: %(default)s)")
    parser.add_argument("--alternating-batches", type=int, default=17,
                        help="batches of the one-call writes variant, every other one written (default: %(default)s)")
    parser.add_argument("--only", default=None,
                        help="run only these measurements, e.g. cache_writes or loop_overhead,cache_writes (default: all)")
    parser.add_argument("--no-allocator", dest="allocator", action="store_false", help="skip the glibc malloc A/B (child processes)")
    parser.add_argument("--malloc-tuned", action="store_true", help="raise glibc's mmap/trim thresholds in this process first (the proposed fix)")
    parser.add_argument("--allocator-child", choices=("default", "tuned"), help=argparse.SUPPRESS)
    add_sampling_options(parser, what="extract", max_wait=30.0)
    args = parser.parse_args(argv)
    if args.batch_size is None:
        args.batch_size = inference.default_batch_size(resolve_device(args.device))
    if args.allocator_child:
        return allocator_child(args)
    malloc_tuned = embedpipe.keep_freed_memory() if args.malloc_tuned else False  # what the embedpipe command does

    started = time.perf_counter()
    bench = Bench(args)
    bench.common["malloc_tuned"] = malloc_tuned
    # Settings that change what runs name the file too, so runs of one machine sit side by side.
    suffix = "".join(
        [
            f"-{args.precision}" if args.precision != "auto" else "",
            f"-batch{args.batch_size}" if args.batch_size != RunConfig().batch_size else "",
            f"-workers{args.workers}" if args.workers is not None else "",
            "-malloc-tuned" if malloc_tuned else "",
        ]
    )
    out = results_path("extract", bench.info, out=args.out, suffix=suffix)
    with contextlib.ExitStack() as stack:
        workdir = Path(args.workdir) if args.workdir else Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-extract-")))
        print(f"setting up {args.images} images in {workdir} ...", file=sys.stderr, flush=True)
        bench.setup(workdir)
        print(f"  setup {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)
        bench.run()
    bench.finish(title(bench), HEADER, summarize(bench), started=started, out=out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
