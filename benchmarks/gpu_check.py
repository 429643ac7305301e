"""One prepared GPU measurement (issue 13): bare forward vs end to end from JPEG files, per backbone.

A GPU is lent to this project now and then, for minutes, so this is one command that needs
nothing beyond the project's own install, makes its own synthetic JPEGs, and finishes within
``--budget-s`` (default 420 s, under the 8 minutes a loan allows). For each backbone (random
weights, ``pretrained=False``, so nothing is downloaded), with the precision embedpipe
resolves for the device (bf16 autocast on CUDA) and channels_last for convnets:

- ``forward``: the bare timm forward over pre-made, pre-normalised batches already on the device;
  every other row is given as a ratio to it.
- ``e2e_pil``: the embedding stage of ``embedpipe.extract()`` (``ExtractResult.images_per_second``)
  from the JPEG files, with PIL DataLoader workers as embedpipe sizes them for the device.
- ``e2e_gpu_decode``: the same files read as bytes by a few workers and decoded in batches on the
  GPU (nvjpeg, ``torchvision.io.decode_jpeg(device="cuda")``), resized and cropped there
  (:func:`resize_crop`), then normalised and embedded as embed() does; its ``cosine_min`` to the
  PIL path's embeddings says how far the GPU's decode and resampling move them.
- ``torchrun``: 1 vs N processes of ``torchrun -m embedpipe extract`` (first backbone), when
  ``torch.cuda.device_count() > 1`` (``--torchrun-procs N`` on CPU runs it with gloo ranks: a check).
- ``forward_compiled``: the forward as ``--compile`` runs it (``inference.prepare_model``: inductor;
  the eager backend in ``--quick``), its compile time recorded; a failure is recorded, not fatal.

A path that cannot run here is a row with ``skipped`` and its reason (no CUDA, one GPU, the time
budget); a path that crashes is a row with ``error`` and makes the command exit 1 (compile
failures excepted). Output: a table on stdout, flat JSON records in
``benchmarks/results/gpu-check-<machine>.json`` or ``--out``.

Example::

    bash benchmarks/gpu_check.sh                          # on a GPU machine, about 5 minutes
    bash benchmarks/gpu_check.sh --device cpu --quick     # every code path, tiny models, under a minute
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from _harness import PHOTO_QUALITY, PHOTO_SIZE, REPO, Harness, machine_info, photo, results_path

import embedpipe  # noqa: E402
from embedpipe import BackboneSpec, RunConfig  # noqa: E402
from embedpipe._compat import ensure_torchvision_importable  # noqa: E402

ensure_torchvision_importable()

import torch  # noqa: E402

from embedpipe import extraction, inference  # noqa: E402
from embedpipe.backbone import load_backbone  # noqa: E402
from embedpipe.preprocess import normalize, resize_target  # noqa: E402

MODELS = ("resnet50", "efficientnet_b0", "vit_base_patch16_224")
QUICK_MODELS = ("test_resnet", "test_efficientnet", "test_vit")  # the same three families, tiny
QUICK_SIZE = 64  # px input for the quick models
QUICK_PHOTO = (160, 120)
# Rows that may fail without failing the command (torch.compile breaks on some stacks).
OPTIONAL = {"forward_compiled"}
# Seconds a row is expected to need at most, so the budget check can skip it in time.
NEEDS = {"forward": 15, "e2e_pil": 30, "e2e_gpu_decode": 30, "e2e_device_loop_pil": 30, "torchrun": 90, "forward_compiled": 120}
QUICK_NEEDS = {name: 3 for name in NEEDS}


# --------------------------------------------------------------------------- data


def _write_photo(job: tuple[Path, int, tuple[int, int]]) -> None:
    path, seed, size = job
    photo(seed, size).save(path, quality=PHOTO_QUALITY)


def make_jpegs(folder: Path, count: int, size: tuple[int, int], *, processes: int) -> list[Path]:
    """``count`` synthetic photos (:func:`_harness.photo`) as JPEGs, made in parallel."""
    folder.mkdir(parents=True, exist_ok=True)
    jobs = [(folder / f"img_{i:06d}.jpg", i, size) for i in range(count)]
    if processes > 1 and count > 64:
        with multiprocessing.get_context("fork").Pool(processes) as pool:
            pool.map(_write_photo, jobs, chunksize=32)
    else:
        for job in jobs:
            _write_photo(job)
    return [path for path, _, _ in jobs]


# --------------------------------------------------------------------------- GPU decode


class EncodedFiles(torch.utils.data.Dataset):
    """Each item's file bytes as a uint8 tensor: workers only read, the GPU decodes."""

    def __init__(self, paths: Sequence[Path]) -> None:
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor]:
        return index, torch.frombuffer(bytearray(Path(self.paths[index]).read_bytes()), dtype=torch.uint8)


def as_lists(items: list[tuple[int, torch.Tensor]]) -> tuple[list[int], list[torch.Tensor]]:
    """Collate encoded files of different lengths into (rows, tensors) without stacking."""
    return [row for row, _ in items], [data for _, data in items]


def nvjpeg_decoder(device: str) -> tuple[Callable[[list[torch.Tensor]], list[torch.Tensor]] | None, str]:
    """``(decode, "")`` when torchvision decodes JPEGs on this CUDA device, else ``(None, why not)``.

    ``decode`` maps encoded uint8 tensors to RGB uint8 (3, H, W) tensors on the device, in one batched call.
    """
    if not device.startswith("cuda"):
        return None, "no CUDA"
    try:
        from PIL import Image
        from torchvision.io import ImageReadMode, decode_jpeg

        buffer = io.BytesIO()
        Image.new("RGB", (16, 16), (10, 200, 30)).save(buffer, format="JPEG")
        probe = torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)
        decode_jpeg([probe], device=device, mode=ImageReadMode.RGB)
    except Exception as error:  # noqa: BLE001 - any failure means: not available here
        return None, f"torchvision.io.decode_jpeg on {device} failed: {type(error).__name__}: {error}"

    def decode(datas: list[torch.Tensor]) -> list[torch.Tensor]:
        return decode_jpeg(datas, device=device, mode=ImageReadMode.RGB)

    return decode, ""


def resize_crop(image: torch.Tensor, config: Any) -> torch.Tensor:
    """timm's eval resize (shortest side to :func:`resize_target`) and centre crop, on the image's device.

    Args:
        image: uint8 (3, H, W).
        config: a :class:`~embedpipe.config.PreprocessConfig` with crop_mode "center" and a
            bilinear or bicubic interpolation.

    Returns:
        uint8 (3, h, w), ``config.input_size``. torch's antialiased resampling follows PIL's (for
        bicubic, its a = -0.5 kernel), so from the same decoded pixels this differs from timm's
        PIL transform by rounding: at most 1 level, cosine of embeddings > 0.99999
        (tests/test_benchmarks.py). On the GPU nvjpeg's IDCT and upsampling add their own differences.
    """
    _, h, w = image.shape
    target = resize_target(config)
    size = (target, int(target * w / h)) if h <= w else (int(target * h / w), target)  # as torchvision's Resize(int)
    x = torch.nn.functional.interpolate(image[None].float(), size=size, mode=config.interpolation, antialias=True,
                                        align_corners=False)
    th, tw = config.input_size[1:]
    top, left = int(round((size[0] - th) / 2.0)), int(round((size[1] - tw) / 2.0))
    return x[0, :, top : top + th, left : left + tw].round_().clamp_(0, 255).to(torch.uint8)


def device_decode_embed(model: torch.nn.Module, paths: Sequence[Path], config: Any, *, device: str, batch_size: int,
                        workers: int, channels_last: bool,
                        decode: Callable[[list[torch.Tensor]], list[torch.Tensor]]) -> tuple[np.ndarray, float]:
    """Embed files whose bytes workers read and ``decode`` turns into images on ``device``.

    Returns:
        ``(embeddings float32 (N, D) in path order, seconds)``.
    """
    loader = torch.utils.data.DataLoader(EncodedFiles(paths), batch_size=batch_size, shuffle=False, num_workers=workers,
                                         collate_fn=as_lists, prefetch_factor=4 if workers else None)
    dtype = inference._AUTOCAST_DTYPES.get(config.precision)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    parts: list[torch.Tensor] = []
    started = time.perf_counter()
    with torch.inference_mode(), autocast(device, dtype):
        for _rows, datas in loader:
            images = torch.stack([resize_crop(image, config.preprocess) for image in decode(datas)])
            x = normalize(images.contiguous(memory_format=memory_format), config.preprocess)
            parts.append(inference.forward_outputs(model, x, ("embedding",))["embedding"].float())
        embeddings = torch.cat(parts).cpu().numpy()  # waits for the device
    return embeddings, time.perf_counter() - started


def pil_bytes_decoder(device: str) -> Callable[[list[torch.Tensor]], list[torch.Tensor]]:
    """``decode`` for :func:`device_decode_embed` by PIL on the CPU: the GPU path's loop, testable without a GPU."""
    from PIL import Image

    def decode(datas: list[torch.Tensor]) -> list[torch.Tensor]:
        out = []
        for data in datas:
            with Image.open(io.BytesIO(data.numpy().tobytes())) as image:
                out.append(torch.from_numpy(np.asarray(image.convert("RGB")).copy()).permute(2, 0, 1).to(device))
        return out

    return decode


# --------------------------------------------------------------------------- the rows


@contextlib.contextmanager
def autocast(device: str, dtype: Any) -> Iterator[None]:
    if dtype is None:
        yield
        return
    with torch.autocast(device_type=device.split(":")[0], dtype=dtype):
        yield


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def is_convnet(model: torch.nn.Module) -> bool:
    """More than one Conv2d: channels_last helps; a ViT's only conv is its patch embedding."""
    return sum(isinstance(m, torch.nn.Conv2d) for m in model.modules()) > 1


class Check(Harness):
    """The rows of one gpu_check run; a row that fails is a record with its error."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.device = args.device
        self.info = machine_info(self.device)
        self.cores = self.info["cores"]
        self.batch_size = args.batch_size or (16 if args.quick else inference.default_batch_size(self.device))
        self.workers = inference.default_workers(self.device) if args.workers is None else args.workers
        common = {"bench": "gpu_check", **self.info, "quick": args.quick, "images": args.images,
                  "batch_size": self.batch_size, "workers": self.workers}
        super().__init__(common, max_contention=1e9, max_wait=0.0)  # no waiting for quiet: the loan is short
        self.started = time.perf_counter()
        self.needs = QUICK_NEEDS if args.quick else NEEDS

    # ----------------------------------------------------------------- budget and rows

    def left(self) -> float:
        return self.args.budget_s - (time.perf_counter() - self.started)

    def row(self, model: str, variant: str, fn: Callable[[], dict[str, Any]], *, skip: str = "") -> dict[str, Any] | None:
        """Run one row unless ``skip`` says why not or the budget is too near; record what happened."""
        if not skip and variant in self.args.skip:
            skip = "--skip"
        if not skip and self.left() < self.needs[variant]:
            skip = f"time budget: {self.left():.0f} s left of --budget-s {self.args.budget_s:.0f}"
        if skip:
            self.record(variant, variant, model=model, skipped=skip)
            print(f"  {model} {variant}: skipped ({skip})", file=sys.stderr, flush=True)
            return None
        self.sample(variant, variant, 0, fn)
        last = self.records[-1]
        last["model"] = model
        shown = last.get("error") or f"{last.get('images_per_second') or 0:.1f} img/s"
        print(f"  {model} {variant}: {shown} ({time.perf_counter() - self.started:.0f} s)", file=sys.stderr, flush=True)
        return None if last.get("error") else last

    def spec(self, name: str) -> BackboneSpec:
        preprocess = {"input_size": QUICK_SIZE} if self.args.quick else {}
        return BackboneSpec(name=name, pretrained=False, precision=self.args.precision, preprocess=preprocess)

    # ----------------------------------------------------------------- one backbone

    def backbone(self, name: str, workdir: Path) -> None:
        spec = self.spec(name)
        config = extraction.resolve(spec, self.device)
        base = load_backbone(name, pretrained=False)
        channels_last = is_convnet(base)
        run = RunConfig(device=self.device, batch_size=self.batch_size, num_workers=self.workers, channels_last=channels_last)
        model = inference.prepare_model(base, self.device, run)
        self.common.update(model=name, precision=config.precision, channels_last=channels_last,
                           input_size="x".join(map(str, config.preprocess.input_size)))
        dtype = inference._AUTOCAST_DTYPES.get(config.precision)
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        generator = torch.Generator().manual_seed(0)
        images = torch.randint(0, 256, (self.batch_size, *config.preprocess.input_size), dtype=torch.uint8, generator=generator)
        x = normalize(images.to(self.device).contiguous(memory_format=memory_format), config.preprocess)

        forward = self.row(name, "forward", lambda: self.time_forward(model, x, dtype))
        pil = self.row(name, "e2e_pil", lambda: self.e2e_pil(spec, run, workdir / f"cache-{name}"))
        decode, why = nvjpeg_decoder(self.device)
        if decode is None and self.device.startswith("cuda"):
            print(f"  GPU decode unavailable, PIL workers only: {why}", file=sys.stderr, flush=True)
        if decode is not None and (config.preprocess.crop_mode != "center" or config.preprocess.interpolation not in ("bilinear", "bicubic")):
            why, decode = f"preprocessing {config.preprocess.crop_mode}/{config.preprocess.interpolation} not done on the GPU", None
        self.row(name, "e2e_gpu_decode", lambda: self.e2e_device(model, config, channels_last, decode, pil), skip=why)
        if self.args.check_device_loop:  # the GPU-decode row's code, with PIL decoding the bytes: runs anywhere
            self.row(name, "e2e_device_loop_pil", lambda: self.e2e_device(model, config, channels_last, pil_bytes_decoder(self.device), pil))
        self.pending.append((name, channels_last, x, dtype))  # compiled rows run last: the slowest, and optional
        for row in self.records:
            if row.get("model") == name and forward and row.get("images_per_second") and row is not forward:
                row["ratio_to_forward"] = row["images_per_second"] / forward["images_per_second"]

    def time_forward(self, model: torch.nn.Module, x: torch.Tensor, dtype: Any, *, warmup: int = 3) -> dict[str, Any]:
        """Images/s of ``model`` on the same batch, after ``warmup`` calls, for about ``--forward-seconds``."""
        started = time.perf_counter()
        with torch.inference_mode(), autocast(self.device, dtype):
            for _ in range(warmup):
                model.forward_head(model.forward_features(x), pre_logits=True)
            sync(self.device)
            warm = time.perf_counter() - started
            one = time.perf_counter()
            model.forward_head(model.forward_features(x), pre_logits=True)
            sync(self.device)
            calls = max(3, math.ceil(self.args.forward_seconds / max(time.perf_counter() - one, 1e-6)))
            begun = time.perf_counter()
            for _ in range(calls):
                model.forward_head(model.forward_features(x), pre_logits=True)
            sync(self.device)
            seconds = time.perf_counter() - begun
        return {"seconds": seconds, "images_per_second": calls * len(x) / seconds, "warmup_seconds": warm, "calls": calls}

    def e2e_pil(self, spec: BackboneSpec, run: RunConfig, cache: Path) -> dict[str, Any]:
        embedpipe.extract(self.warm, spec, cache_dir=cache.with_name(cache.name + "-warm"), run=run)  # workers, cudnn, h5py
        started = time.perf_counter()
        result = embedpipe.extract(self.data, spec, cache_dir=cache, run=run)
        wall = time.perf_counter() - started
        if result.computed != len(self.paths) or result.failed:
            raise RuntimeError(f"extract() embedded {result.computed} of {len(self.paths)} images, {len(result.failed)} failed")
        X, _, meta = embedpipe.load(result.path)
        self.pil_embeddings = dict(zip(meta["paths"], X.astype(np.float32)))
        return {"images_per_second": result.images_per_second, "seconds": wall, "stage_seconds": result.computed / result.images_per_second}

    def e2e_device(self, model: torch.nn.Module, config: Any, channels_last: bool, decode: Any, pil: dict[str, Any] | None) -> dict[str, Any]:
        workers = min(4, self.cores)  # reading bytes is cheap; the rest of the cores stay free
        kwargs = dict(device=self.device, batch_size=self.batch_size, workers=workers, channels_last=channels_last, decode=decode)
        device_decode_embed(model, self.paths[: self.batch_size], config, **kwargs)  # warm-up: nvjpeg handles, kernels
        embeddings, seconds = device_decode_embed(model, self.paths, config, **kwargs)
        values = {"images_per_second": len(self.paths) / seconds, "seconds": seconds, "read_workers": workers}
        if pil is not None:
            reference = np.stack([self.pil_embeddings[p.name] for p in self.paths]).astype(np.float64)
            cos = cosine_rows(embeddings.astype(np.float64), reference)
            values.update(cosine_min_vs_pil=float(cos.min()), cosine_mean_vs_pil=float(cos.mean()))
        return values

    def compiled(self, name: str, channels_last: bool, x: torch.Tensor, dtype: Any) -> dict[str, Any]:
        """The forward as ``--compile`` runs it: ``inference.prepare_model`` compiles the methods embed() calls."""
        backend = "eager" if self.args.quick else "inductor"  # eager: the dynamo path in seconds, for CI
        torch._dynamo.reset()
        run = RunConfig(device=self.device, channels_last=channels_last, compile=True)
        model = inference.prepare_model(load_backbone(name, pretrained=False), self.device, run, compile_backend=backend)
        started = time.perf_counter()
        with torch.inference_mode(), autocast(self.device, dtype):
            model.forward_head(model.forward_features(x), pre_logits=True)
        sync(self.device)
        compile_seconds = time.perf_counter() - started
        return {**self.time_forward(model, x, dtype, warmup=1), "compile_seconds": compile_seconds, "backend": backend}

    # ----------------------------------------------------------------- torchrun

    def torchrun(self, name: str, workdir: Path, procs: int) -> dict[str, Any]:
        """``torchrun -m embedpipe extract`` with 1 and with ``procs`` processes: one GPU each, or gloo ranks on CPU."""
        device = "cuda" if self.device.startswith("cuda") else "cpu"
        values: dict[str, Any] = {"processes": procs}
        for nproc in (1, procs):
            workers = max(1, min(16, self.cores // nproc))  # the cores shared by the ranks' decode workers
            command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                       "-m", "embedpipe", "extract", str(self.data), "--backbone", name, "--no-pretrained",
                       "--cache-dir", str(workdir / f"torchrun-{nproc}"), "--device", device, "--precision", self.args.precision,
                       "--batch-size", str(self.batch_size), "--workers", str(workers), "--json"]
            command += ["--img-size", str(QUICK_SIZE)] if self.args.quick else []
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
            if device == "cpu":
                env["OMP_NUM_THREADS"] = str(max(1, self.cores // nproc))  # ranks share the cores
            started = time.perf_counter()
            done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=max(10.0, self.left() - 5))
            wall = time.perf_counter() - started
            if done.returncode != 0:
                raise RuntimeError(f"torchrun with {nproc} processes exited {done.returncode}: {done.stderr.strip()[-500:]}")
            result, _ = json.JSONDecoder().raw_decode(done.stdout[done.stdout.index("{"):])  # --json: indented, rank 0 only
            if result["computed"] != len(self.paths):
                raise RuntimeError(f"torchrun with {nproc} processes embedded {result['computed']} of {len(self.paths)} images")
            values[f"images_per_second_{nproc}"] = result["images_per_second"]
            values[f"wall_seconds_{nproc}"] = wall
        values["images_per_second"] = values[f"images_per_second_{procs}"]
        values["scaling"] = values[f"images_per_second_{procs}"] / values["images_per_second_1"]
        values["scaling_per_process"] = values["scaling"] / procs
        return values

    # ----------------------------------------------------------------- the run

    def run(self, workdir: Path) -> None:
        args = self.args
        size = QUICK_PHOTO if args.quick else PHOTO_SIZE
        started = time.perf_counter()
        self.data = workdir / "photos"
        self.paths = make_jpegs(self.data, args.images, size, processes=self.cores)
        self.warm = workdir / "warm"
        make_jpegs(self.warm, min(args.images, self.batch_size), size, processes=1)
        self.diag("dataset_seconds", time.perf_counter() - started, "s", photo_size="x".join(map(str, size)))
        self.pending: list[tuple[str, bool, torch.Tensor, Any]] = []
        models = args.models or (QUICK_MODELS if args.quick else MODELS)
        for name in models:
            try:
                self.backbone(name, workdir)
            except Exception as error:  # noqa: BLE001 - the other backbones' rows still run, and the results are written
                traceback.print_exc()
                self.record("setup", "setup", model=name, error=f"{type(error).__name__}: {error}")
        first = models[0]
        cuda = self.device.startswith("cuda")
        procs = args.torchrun_procs or (torch.cuda.device_count() if cuda else 0)
        skip = "" if procs > 1 else "no CUDA" if not cuda else "one GPU"
        self.common.update(model=first)
        self.row(first, "torchrun", lambda: self.torchrun(first, workdir, procs), skip=skip)
        for name, channels_last, x, dtype in self.pending:
            self.common.update(model=name)
            forward = next((r for r in self.records if r.get("model") == name and r["variant"] == "forward" and not r.get("error")), None)
            skip = "--quick compiles the first model only" if args.quick and name != first else ""
            row = self.row(name, "forward_compiled", lambda: self.compiled(name, channels_last, x, dtype), skip=skip)
            if row and forward:
                row["ratio_to_forward"] = row["images_per_second"] / forward["images_per_second"]

    def table(self) -> list[list[str]]:
        rows = []
        for r in self.records:
            if r["measurement"] == "diagnostic":
                continue
            ips, ratio = r.get("images_per_second"), r.get("ratio_to_forward")
            if r.get("skipped"):
                note = f"skipped: {r['skipped']}"
            elif r.get("error"):
                note = f"ERROR {r['error'][:100]}"
            else:
                note = ", ".join(filter(None, [
                    f"compile {r['compile_seconds']:.1f} s ({r['backend']})" if "compile_seconds" in r else "",
                    f"cosine to PIL min {r['cosine_min_vs_pil']:.4f}" if "cosine_min_vs_pil" in r else "",
                    f"{r['processes']} processes: x{r['scaling']:.2f} ({100 * r['scaling_per_process']:.0f}% each)" if "scaling" in r else "",
                ]))
            rows.append([r.get("model", ""), r["variant"], "" if ips is None else f"{ips:.1f}",
                         "" if ratio is None else f"{ratio:.3f}", r.get("precision", ""), note])
        return rows

    def failed(self) -> list[dict[str, Any]]:
        return [r for r in self.records if r.get("error") and r["variant"] not in OPTIONAL]


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)


HEADER = ["model", "variant", "img/s", "vs forward", "precision", "note"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="(default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help="tiny test_* models at 64 px on 32 small JPEGs: every code path, in seconds")
    parser.add_argument("--budget-s", type=float, default=420.0, help="stop adding rows when this is near (default: %(default)s)")
    parser.add_argument("--out", default=None, help="results JSON (default: benchmarks/results/gpu-check-<machine>.json)")
    parser.add_argument("--models", nargs="+", default=None, help=f"timm names (default: {' '.join(MODELS)})")
    parser.add_argument("--images", type=int, default=None, help="JPEGs for the end-to-end rows (default: 4096; --quick 32)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: embedpipe's for the device (--quick 16)")
    parser.add_argument("--workers", type=int, default=None, help="PIL decode workers (default: embedpipe's for the device)")
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"), help="(default: auto, bf16 on CUDA)")
    parser.add_argument("--skip", nargs="+", default=[], choices=sorted(NEEDS), help="rows not to run (recorded as skipped)")
    parser.add_argument("--torchrun-procs", type=int, default=None,
                        help="processes of the N-process torchrun row (default: the GPUs; on CPU: gloo ranks, a check)")
    parser.add_argument("--check-device-loop", action="store_true",
                        help="also run the GPU-decode row's loop with PIL decoding the bytes (a check that needs no GPU)")
    parser.add_argument("--forward-seconds", type=float, default=None, help="seconds per forward timing (default: 2; --quick 0.2)")
    args = parser.parse_args(argv)
    args.images = args.images or (32 if args.quick else 4096)
    args.forward_seconds = args.forward_seconds or (0.2 if args.quick else 2.0)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: --device cuda but torch sees no GPU; use --device cpu", file=sys.stderr)
        return 2

    check = Check(args)
    suffix = "-quick" if args.quick else ""
    out = results_path("gpu-check", check.info, out=args.out, suffix=suffix)
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as workdir:
        check.run(Path(workdir))
    title = [f"embedpipe gpu_check: {args.images} JPEGs, device {check.device}, batch {check.batch_size}, "
             f"{check.workers} PIL workers; random weights",
             f"machine: {check.info['cpu']}, {check.cores} cores{', ' + check.info['gpu'] if check.info['gpu'] else ''}; "
             f"torch {check.info['torch']}, timm {check.info['timm']}"]
    check.finish(title, HEADER, check.table(), started=check.started, out=out)
    if failed := check.failed():
        print(f"gpu_check: {len(failed)} rows crashed, e.g. {failed[0].get('model')} {failed[0]['variant']}: {failed[0]['error']}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
