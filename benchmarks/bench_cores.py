"""How decode workers and torch threads should share the cores: ``extract()`` end to end per split.

On CPU the decode workers and the forward's threads run on the same cores. For each split
``WxT`` (W DataLoader decode workers, T torch threads in the main process), a fresh cache and
one ``embedpipe.extract()`` over the same synthetic JPEGs (those of ``bench_extract.py``),
interleaved (A B C ... then ... C B A) so the machine's drift cancels out; the table gives each
split's embedding-stage images/s and whole-call seconds, and each as a ratio to the split the
command picks by default (``inference.default_workers`` workers, torch's own thread count).

Example::

    python benchmarks/bench_cores.py --images 512                      # about 4 minutes on 2 cores
    python benchmarks/bench_cores.py --splits 0x2,1x2,1x1,2x2,2x1 --images 1024
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from _harness import Harness, Selection, add_sampling_options, machine_info, results_path
from bench_extract import make_images

import embedpipe
from embedpipe import inference
from embedpipe.config import BackboneSpec, RunConfig
from embedpipe.machine import resolve_device

HEADER = ["workers x threads", "embedding stage", "vs default", "whole call", "vs default", "clean reps"]


def parse_splits(text: str) -> list[tuple[int, int]]:
    splits = []
    for part in text.split(","):
        workers, _, threads = part.strip().partition("x")
        splits.append((int(workers), int(threads)))
    return splits


class Cores(Harness):
    """One dataset, one extract() per split and repetition."""

    QUIET_POLL_SECONDS = 0.5
    QUIET_POLLS = 1
    BUSY_PAUSE_SECONDS = 1.0

    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args, self.workdir = args, workdir
        self.device = resolve_device(args.device)
        self.spec = BackboneSpec(name=args.backbone, pretrained=not args.no_pretrained)
        self.default = (inference.default_workers(self.device), torch.get_num_threads())
        self.splits = list(dict.fromkeys([self.default, *parse_splits(args.splits)]))
        self.info = machine_info(self.device)
        super().__init__({"bench": "cores", **self.info, "backbone": args.backbone, "images": args.images,
                          "default_split": "%dx%d" % self.default}, max_contention=args.max_contention, max_wait=args.max_wait)
        self.data = workdir / "photos"
        make_images(self.data, args.images)
        warm = workdir / "warm"  # the first extract() of a process pays imports and weights: not any split's cost
        make_images(warm / "photos", 8)
        embedpipe.extract(warm / "photos", self.spec, cache_dir=warm / "cache", run=RunConfig(device=self.device))

    def extract(self, workers: int, threads: int, rep: int) -> dict[str, Any]:
        cache = self.workdir / f"cache-{workers}x{threads}-{rep}"
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            started = time.perf_counter()
            result = embedpipe.extract(self.data, self.spec, cache_dir=cache,
                                       run=replace(RunConfig(device=self.device), num_workers=workers))
            return {"seconds": time.perf_counter() - started, "images_per_second": result.images_per_second,
                    "workers": workers, "threads": threads}
        finally:
            torch.set_num_threads(before)
            shutil.rmtree(cache, ignore_errors=True)

    def run(self) -> None:
        for rep in range(self.args.repeats):
            started = time.perf_counter()
            units = [lambda w=w, t=t: self.sample("cores", f"split_{w}x{t}", rep, lambda: self.extract(w, t, rep))
                     for w, t in self.splits]
            self.run_interleaved(units, rep)
            print(f"  repetition {rep + 1}/{self.args.repeats}: {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)

    def summarize(self) -> list[list[str]]:
        rows = []
        base = "split_%dx%d" % self.default
        for workers, threads in self.splits:
            name = f"split_{workers}x{threads}"
            sel: Selection = self.select(name, base)
            ips, seconds = sel.value(name, "images_per_second"), sel.value(name, "seconds")
            ips_ratio = sel.median(lambda g: g[name]["images_per_second"] / g[base]["images_per_second"])
            time_ratio = sel.median(lambda g: g[base]["seconds"] / g[name]["seconds"])
            self.record("cores", "summary:" + name, workers=workers, threads=threads, images_per_second=ips, seconds=seconds,
                        speed_vs_default=ips_ratio, whole_call_speed_vs_default=time_ratio, reps_clean=sel.clean)
            rows.append([f"{workers} x {threads}" + (" (default)" if (workers, threads) == self.default else ""),
                         "n/a" if ips is None else f"{ips:.1f} img/s", "n/a" if ips_ratio is None else f"{ips_ratio:.3f}",
                         "n/a" if seconds is None else f"{seconds:.2f} s", "n/a" if time_ratio is None else f"{time_ratio:.3f}",
                         sel.label()])
        return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="tf_efficientnet_lite0", help="timm model name (default: %(default)s)")
    parser.add_argument("--no-pretrained", action="store_true", help="seeded random weights (quick runs, test_* models)")
    parser.add_argument("--images", type=int, default=512, help="synthetic JPEGs (default: %(default)s)")
    parser.add_argument("--splits", default="0x2,1x2,1x1,2x2", help="WORKERSxTHREADS,... besides the default (default: %(default)s)")
    parser.add_argument("--device", default="cpu", help="cpu (default)")
    parser.add_argument("--workdir", default=None, help="where the images and caches go (default: a temporary folder)")
    add_sampling_options(parser, what="cores", max_wait=30.0)
    args = parser.parse_args(argv)
    embedpipe.keep_freed_memory()  # what the embedpipe command does
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-cores-") as tmp:
        bench = Cores(args, Path(args.workdir or tmp))
        bench.run()
        title = [f"decode workers x torch threads: extract() of {args.images} JPEGs with {args.backbone}, "
                 f"{args.repeats} repetitions, medians",
                 f"machine: {bench.info.get('cpu')}, {bench.info.get('cores')} cores; default split "
                 f"{bench.default[0]} x {bench.default[1]} (inference.default_workers, torch.get_num_threads())"]
        bench.finish(title, HEADER, bench.summarize(), started=started, out=results_path("cores", bench.info, out=args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
