"""Scale-out: extraction throughput from 1 to N torchrun processes, and memory as the dataset grows.

Two measurements, each through the real command line (``embedpipe extract``, launched by
``torchrun`` for the multi-process runs), on synthetic JPEG photos generated here:

1. scaling: images/s of the embedding stage (all ranks' images over the slowest rank's
   seconds) with 1, 2, 4 ... ``--max-procs`` processes, each on a fresh cache; the
   ratio to one process. On a GPU machine each process gets its own GPU (ideal ratio:
   the process count); on a CPU the processes share the same cores (``OMP_NUM_THREADS``
   = cores / processes, ideal ratio 1.0: the work is split, not the cores multiplied).
2. decode: JPEG decode-only images/s, embedpipe's PIL decoding in its DataLoader workers vs
   ``torchvision.io.decode_jpeg`` on the GPU (CUDA only), to choose the GPU path's decoder.
3. memory: peak RSS of one ``embedpipe extract`` process (``--workers 0``, so every byte
   is counted in that process) over datasets of growing size; the ratio of the largest
   to the smallest dataset's peak (goal: flat, <= 1.10; extraction streams rows and
   never holds N x D).

The GPU-only end-to-end vs bare-forward figures per backbone come from bench_extract.py
(``--device cuda --backbone resnet50 ...``); see benchmarks/README.md.

Output: a table on stdout and flat JSON records in
``benchmarks/results/scale-<machine>.json``; a failing run becomes a record with its error.

Example::

    python benchmarks/bench_scale.py                                   # CPU: test_resnet, 2 processes
    python benchmarks/bench_scale.py --device cuda --backbone resnet50 --max-procs 8 --images 20000
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from _harness import PHOTO_QUALITY, PHOTO_SIZE, REPO, machine_info, photo, results_path, write_results

GOAL_MEMORY_FLAT = 1.10  # peak RSS of the largest dataset over the smallest's


def make_photos(folder: Path, count: int, size: tuple[int, int]) -> Path:
    """``count`` photo-like JPEGs in ``folder`` (kept between runs: generating them is the slow part)."""
    folder.mkdir(parents=True, exist_ok=True)
    have = len(list(folder.glob("*.jpg")))
    for i in range(have, count):
        photo(i, size).save(folder / f"img_{i:07d}.jpg", quality=PHOTO_QUALITY)
    return folder


def extract_command(args: argparse.Namespace, data: Path, cache: Path, *, workers: int | None) -> list[str]:
    command = ["-m", "embedpipe", "extract", str(data), "--backbone", args.backbone, "--cache-dir", str(cache),
               "--device", args.device, "--json"]
    if args.no_pretrained:
        command.append("--no-pretrained")
    if args.img_size:
        command += ["--img-size", str(args.img_size)]
    if workers is not None:
        command += ["--workers", str(workers)]
    return command


def peak_rss_of(command: list[str], env: dict[str, str]) -> tuple[dict[str, Any], float, float]:
    """Run to completion: ``(its JSON result, wall seconds, the process's own peak RSS in MiB, from wait4)``."""
    started = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        process = subprocess.Popen(command, stdout=out, stderr=err, text=True, env=env, cwd=REPO)
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - started
        out.seek(0), err.seek(0)
        if process.returncode != 0:
            lines = err.read().strip().splitlines()
            raise RuntimeError(lines[-1] if lines else f"exit {process.returncode}")
        return json.loads(out.read()), wall, usage.ru_maxrss / 1024  # KiB on Linux


def decode_pil(paths: list[Path], args: argparse.Namespace) -> float:
    """Images/s of embedpipe's own decode + resize + crop (PIL) in its default DataLoader workers."""
    import torch

    from embedpipe import BackboneSpec, inference
    from embedpipe.extraction import resolve
    from embedpipe.machine import resolve_device

    device = resolve_device(args.device)
    preprocess = {"input_size": args.img_size} if args.img_size else {}
    config = resolve(BackboneSpec(name=args.backbone, pretrained=False, preprocess=preprocess), device)
    loader = torch.utils.data.DataLoader(inference.ImageFiles(paths, config), batch_size=64,
                                         num_workers=inference.default_workers(device), prefetch_factor=4,
                                         collate_fn=inference.collate_images)
    started = time.perf_counter()
    count = sum(len(rows) for rows, _, _ in loader)
    return count / (time.perf_counter() - started)


def decode_gpu(paths: list[Path], args: argparse.Namespace) -> float:
    """Images/s of ``torchvision.io.decode_jpeg`` on the GPU, batched, from bytes already in memory."""
    import torch

    if not args.device.startswith("cuda"):
        raise RuntimeError("needs --device cuda")
    import torchvision.io

    data = [torchvision.io.read_file(str(p)) for p in paths]
    torchvision.io.decode_jpeg(data[:8], device="cuda")  # warm-up: nvjpeg handles
    torch.cuda.synchronize()
    started = time.perf_counter()
    for start in range(0, len(data), 64):
        torchvision.io.decode_jpeg(data[start : start + 64], device="cuda")
    torch.cuda.synchronize()
    return len(data) / (time.perf_counter() - started)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--backbone", default="test_resnet", help="timm model (default: %(default)s)")
    add("--no-pretrained", action="store_true", default=True, help="random weights (default; speed only)")
    add("--img-size", type=int, default=None, help="input size override (default: the model's; 64 for test_ models)")
    add("--device", default="cpu", help="cpu (default) or cuda")
    add("--images", type=int, default=512, help="JPEGs in the scaling dataset (default: %(default)s)")
    add("--max-procs", type=int, default=None, help="most processes (default: GPUs on cuda, cores on cpu)")
    add("--memory-sizes", default="1000,4000,16000", help="dataset sizes of the memory runs (default: %(default)s)")
    add("--memory-backbone", default="test_resnet",
        help="model of the memory runs; a tiny one, since what grows with the dataset is the rest (default: %(default)s)")
    add("--workdir", default=None, help="where images and caches go (default: a temporary folder)")
    add("--out", default=None, help="results JSON (default: benchmarks/results/scale-<machine>.json)")
    add("--parts", default="scaling,memory,decode",
        help="what to measure: scaling, memory, decode (PIL workers vs nvjpeg on the GPU) (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.img_size is None and args.backbone.startswith("test_"):
        args.img_size = 64
    info = machine_info(args.device)
    cores = info["cores"]
    import torch

    gpus = torch.cuda.device_count() if args.device.startswith("cuda") else 0
    max_procs = args.max_procs or (gpus if gpus else cores)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="embedpipe-scale-"))
    records: list[dict[str, Any]] = []
    rows: list[tuple[str, str, str]] = []

    def record(**fields: Any) -> dict[str, Any]:
        row = {**info, "backbone": args.backbone, "img_size": args.img_size, **fields}
        records.append(row)
        return row

    parts = set(args.parts.split(","))
    if "scaling" in parts:
        data = make_photos(workdir / f"photos-{args.images}", args.images, PHOTO_SIZE)
        procs = sorted({1, *[2**i for i in range(1, 8) if 2**i <= max_procs], max_procs})
        base = None
        for n in procs:
            env = {**os.environ, "OMP_NUM_THREADS": str(max(1, cores // n if not gpus else cores // n // 2 or 1))}
            launcher = [sys.executable] if n == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                          "--nproc-per-node", str(n)]
            cache = workdir / f"cache-scaling-{n}-{time.time_ns()}"
            try:
                result, wall, _ = peak_rss_of([*launcher, *extract_command(args, data, cache, workers=None)], env)
            except Exception as error:  # noqa: BLE001 - a failing run is a result to record
                traceback.print_exc()
                record(measurement="scaling", processes=n, error=f"{type(error).__name__}: {error}")
                rows.append((f"{n} processes", "error", str(error)[:60]))
                continue
            ips = result["images_per_second"]
            base = base or ips
            record(measurement="scaling", processes=n, error=None, images=result["computed"], images_per_second=ips,
                   wall_seconds=wall, ratio_to_one=ips / base, omp_threads=int(env["OMP_NUM_THREADS"]))
            rows.append((f"{n} processes: img/s (embedding stage), wall", f"{ips:.1f}, {wall:.1f} s", f"{ips / base:.2f}x one"))

    if "memory" in parts:
        sizes = [int(s) for s in args.memory_sizes.split(",") if s]
        peaks = {}
        for n in sizes:
            data = make_photos(workdir / "photos-small", n, (128, 96))
            subset = workdir / f"subset-{n}.csv"  # the first n images, as a manifest
            names = sorted(p.name for p in data.glob("*.jpg"))[:n]
            subset.write_text("path\n" + "".join(f"{data / name}\n" for name in names))
            cache = workdir / f"cache-memory-{n}-{time.time_ns()}"
            small = argparse.Namespace(**{**vars(args), "backbone": args.memory_backbone,
                                          "img_size": 64 if args.memory_backbone.startswith("test_") else None})
            command = [sys.executable, *extract_command(small, subset, cache, workers=0)]
            try:
                result, wall, peak = peak_rss_of(command, {**os.environ})
            except Exception as error:  # noqa: BLE001
                traceback.print_exc()
                record(measurement="memory", images=n, error=f"{type(error).__name__}: {error}")
                rows.append((f"memory, {n} images", "error", str(error)[:60]))
                continue
            peaks[n] = peak
            record(measurement="memory", images=n, error=None, memory_backbone=args.memory_backbone, peak_rss_mib=peak, wall_seconds=wall,
                   images_per_second=result["images_per_second"])
            rows.append((f"peak RSS, {n} images ({args.memory_backbone}, workers 0)", f"{peak:.0f} MiB", f"{wall:.1f} s"))
        if len(peaks) >= 2:
            ratio = peaks[max(peaks)] / peaks[min(peaks)]
            record(measurement="summary", variant="memory_flat", error=None, ratio=ratio,
                   goal=f"<= {GOAL_MEMORY_FLAT}", passed=ratio <= GOAL_MEMORY_FLAT)
            rows.append((f"peak RSS {max(peaks)} / {min(peaks)} images", f"{ratio:.3f}",
                         "pass" if ratio <= GOAL_MEMORY_FLAT else "MISS"))

    if "decode" in parts:
        data = make_photos(workdir / f"photos-{args.images}", args.images, PHOTO_SIZE)
        for name, fn in (("pil_workers", decode_pil), ("gpu_decode_jpeg", decode_gpu)):
            try:
                ips = fn(sorted(data.glob("*.jpg")), args)
            except Exception as error:  # noqa: BLE001
                record(measurement="decode", variant=name, error=f"{type(error).__name__}: {error}")
                rows.append((f"decode only, {name}", "error", str(error)[:70]))
                continue
            record(measurement="decode", variant=name, error=None, images_per_second=ips)
            rows.append((f"decode only, {name}", f"{ips:.0f} img/s", ""))

    write_results(results_path("scale", info, out=args.out), records)
    where = f"{info['gpu'] or info['cpu']}, {cores} cores, torch {info['torch']}, {args.backbone} at {args.img_size or 'default'} px"
    print(f"\nembedpipe scale-out ({where})\n")
    width = max(len(r[0]) for r in rows) if rows else 10
    for name, value, note in rows:
        print(f"{name:<{width}}  {value:>18}  {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
