"""Decoders compared on the same files: img/s of decode + timm's eval resize/crop, and what they change.

For JPEG at three sizes, PNG and WebP (synthetic photos, :func:`_harness.photo`), each decoder
turns every file into the network's uint8 input with timm's eval transform (resnet50's
pretrained_cfg: 224 px, bicubic, crop 0.95, so a 235 px resize target):

- ``pillow``: embedpipe's path, ``preprocess.decode_image`` (JPEG draft to the resize target: DCT scaling).
- ``pillow_full``: the same without the draft, for what the draft itself changes.
- ``simplejpeg``: ``simplejpeg.decode_jpeg(min_width=, min_height=)``: libjpeg-turbo's DCT scaling in
  eighths (5/8, 3/8, ...), finer than Pillow's draft (1/2, 1/4, 1/8), so smaller decodes.
- ``simplejpeg_pillow_scale``: simplejpeg held to the scale Pillow's draft picks.
- ``turbojpeg``: PyTurboJPEG with the smallest scaling factor that covers the target.

A decoder that is not installed (or whose library does not load) becomes a row saying why.
Per row: img/s (single process, median of ``--repeats`` interleaved passes), the ratio to
``pillow``, the max and mean absolute difference of the input pixels from ``pillow``'s, and the
min cosine of the embeddings (random-weight ``--backbone``) to ``pillow``'s.

Example::

    python benchmarks/bench_decoders.py                 # about a minute on 2 cores
    python benchmarks/bench_decoders.py --files 16 --repeats 1
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from _harness import PHOTO_QUALITY, Harness, machine_info, photo, results_path

from embedpipe._compat import ensure_torchvision_importable  # noqa: E402

ensure_torchvision_importable()

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from embedpipe import RunConfig, inference  # noqa: E402
from embedpipe.backbone import load_backbone  # noqa: E402
from embedpipe.preprocess import decode_image, eval_transform, normalize, resize_target, resolve_preprocess  # noqa: E402

# (format, longest side): JPEG at a thumbnail, a web photo and a camera-ish size; PNG and WebP at the middle one.
FILE_SETS = (("JPEG", 256), ("JPEG", 512), ("JPEG", 1024), ("PNG", 512), ("WEBP", 512))
ASPECT = 0.75  # 4:3 photos


def make_files(folder: Path, fmt: str, side: int, count: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    suffix = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp"}[fmt]
    paths = []
    for i in range(count):
        path = folder / f"{fmt.lower()}{side}_{i:04d}{suffix}"
        options = {"quality": PHOTO_QUALITY} if fmt in ("JPEG", "WEBP") else {}
        photo(i, (side, int(side * ASPECT))).save(path, format=fmt, **options)
        paths.append(path)
    return paths


# --------------------------------------------------------------------------- decoders: path -> PIL RGB image


def pillow(target: int) -> Callable[[Path], Image.Image]:
    return lambda path: decode_image(path, draft_to=target)


def pillow_full(target: int) -> Callable[[Path], Image.Image]:
    return lambda path: decode_image(path, draft_to=None)


def simplejpeg_decoder(target: int) -> Callable[[Path], Image.Image]:
    import simplejpeg

    def decode(path: Path) -> Image.Image:
        # No EXIF orientation here: a library path would hand oriented files to Pillow.
        array = simplejpeg.decode_jpeg(path.read_bytes(), colorspace="RGB", min_height=target, min_width=target)
        return Image.fromarray(array)

    return decode


def simplejpeg_pillow_scale(target: int) -> Callable[[Path], Image.Image]:
    """simplejpeg at exactly the scale Pillow's draft picks (1, 1/2, 1/4 or 1/8), so the pixels can be Pillow's."""
    import simplejpeg

    def decode(path: Path) -> Image.Image:
        data = path.read_bytes()
        height, width, _, _ = simplejpeg.decode_jpeg_header(data)
        scale = max(1, min(width // target, height // target))
        scale = next(s for s in (8, 4, 2, 1) if scale >= s)  # as JpegImagePlugin.draft
        array = simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=-(-height // scale), min_width=-(-width // scale))
        return Image.fromarray(array)

    return decode


def turbojpeg_decoder(target: int) -> Callable[[Path], Image.Image]:
    try:
        from turbojpeg import TJPF_RGB, TurboJPEG
    except ImportError:
        raise ImportError("PyTurboJPEG is not installed (2.x also needs the system's libturbojpeg >= 3.0)") from None

    jpeg = TurboJPEG()
    factors = sorted(jpeg.scaling_factors, key=lambda f: f[0] / f[1])

    def decode(path: Path) -> Image.Image:
        data = path.read_bytes()
        width, height, _, _ = jpeg.decode_header(data)
        factor = next((f for f in factors if min(width, height) * f[0] // f[1] >= target), (1, 1))
        return Image.fromarray(jpeg.decode(data, pixel_format=TJPF_RGB, scaling_factor=factor))

    return decode


DECODERS: dict[str, tuple[Callable[[int], Callable[[Path], Image.Image]], tuple[str, ...]]] = {
    "pillow": (pillow, ("JPEG", "PNG", "WEBP")),
    "pillow_full": (pillow_full, ("JPEG",)),
    "simplejpeg": (simplejpeg_decoder, ("JPEG",)),
    "simplejpeg_pillow_scale": (simplejpeg_pillow_scale, ("JPEG",)),
    "turbojpeg": (turbojpeg_decoder, ("JPEG",)),
}  # name -> (factory taking the resize target, formats it decodes)


# --------------------------------------------------------------------------- the run


class Bench(Harness):
    def __init__(self, args: argparse.Namespace) -> None:
        import timm

        self.args = args
        self.config = resolve_preprocess(timm.models.get_pretrained_cfg("resnet50").to_dict())
        self.target = resize_target(self.config)
        self.transform = eval_transform(self.config)
        self.info = machine_info("cpu")
        common = {"bench": "decoders", **self.info, "files": args.files, "backbone": args.backbone,
                  "input_size": "x".join(map(str, self.config.input_size)), "resize_target": self.target}
        super().__init__(common, max_contention=args.max_contention, max_wait=args.max_wait)
        self.model = inference.prepare_model(load_backbone(args.backbone, pretrained=False), "cpu", RunConfig(device="cpu"))

    def decoders(self, fmt: str) -> dict[str, Callable[[Path], Image.Image] | str]:
        """name -> decode function, or why it cannot run here."""
        found: dict[str, Callable[[Path], Image.Image] | str] = {}
        for name, (factory, formats) in DECODERS.items():
            if fmt not in formats:
                continue
            try:
                found[name] = factory(self.target)
            except Exception as error:  # noqa: BLE001 - not installed, or its library does not load
                found[name] = f"{type(error).__name__}: {str(error).splitlines()[0]}"
        return found

    def inputs(self, decode: Callable[[Path], Image.Image], paths: list[Path]) -> torch.Tensor:
        return torch.stack([self.transform(decode(p)) for p in paths])

    def embed(self, x: torch.Tensor) -> np.ndarray:
        with torch.inference_mode():
            features = self.model.forward_features(normalize(x.contiguous(memory_format=torch.channels_last), self.config))
            return self.model.forward_head(features, pre_logits=True).float().numpy()

    def file_set(self, fmt: str, side: int, paths: list[Path]) -> None:
        decoders = self.decoders(fmt)
        runnable = {k: v for k, v in decoders.items() if callable(v)}
        for name, why in decoders.items():
            if not callable(why):
                self.record("decode", name, format=fmt, side=side, skipped=why)
        times: dict[str, list[float]] = {name: [] for name in runnable}
        for rep in range(self.args.repeats):
            order = list(runnable) if rep % 2 == 0 else list(reversed(runnable))
            for name in order:
                self.wait_for_quiet()
                started = time.perf_counter()
                for path in paths:
                    self.transform(runnable[name](path))
                times[name].append(time.perf_counter() - started)
        reference = self.inputs(runnable["pillow"], paths)
        ref_embeddings = self.embed(reference)
        base = len(paths) / statistics.median(times["pillow"])
        for name, decode in runnable.items():
            x = self.inputs(decode, paths)
            diff = (x.int() - reference.int()).abs().float()
            emb = self.embed(x)
            cos = (emb * ref_embeddings).sum(1) / (np.linalg.norm(emb, axis=1) * np.linalg.norm(ref_embeddings, axis=1) + 1e-12)
            ips = len(paths) / statistics.median(times[name])
            self.record("decode", name, format=fmt, side=side, images_per_second=ips, ratio_to_pillow=ips / base,
                        max_abs_diff=float(diff.max()), mean_abs_diff=float(diff.mean()), cosine_min=float(cos.min()),
                        mean_file_bytes=float(np.mean([p.stat().st_size for p in paths])))
            print(f"  {fmt} {side}: {name} {ips:.0f} img/s", file=sys.stderr, flush=True)

    def table(self) -> list[list[str]]:
        rows = []
        for r in self.records:
            if r["measurement"] != "decode":
                continue
            where = f"{r['format']} {r['side']}x{int(r['side'] * ASPECT)}"
            if r.get("skipped"):
                rows.append([where, r["variant"], "", "", "", "", "", f"not run: {r['skipped'][:90]}"])
                continue
            rows.append([where, r["variant"], f"{r['images_per_second']:.0f}", f"{r['ratio_to_pillow']:.2f}",
                         f"{r['max_abs_diff']:.0f}", f"{r['mean_abs_diff']:.3f}", f"{r['cosine_min']:.5f}",
                         f"{r['mean_file_bytes'] / 1024:.0f} KB"])
        return rows


HEADER = ["file", "decoder", "img/s", "vs pillow", "max |dpx|", "mean |dpx|", "cosine min", "note"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=48, help="files per format and size (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved timing passes (default: %(default)s)")
    parser.add_argument("--backbone", default="resnet18", help="random-weight model for the cosines (default: %(default)s)")
    parser.add_argument("--max-contention", type=float, default=0.25, help="cores others may keep busy (default: %(default)s)")
    parser.add_argument("--max-wait", type=float, default=20.0, help="seconds in all to wait for quiet (default: %(default)s)")
    parser.add_argument("--out", default=None, help="results JSON (default: benchmarks/results/decoders-<machine>.json)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    started = time.perf_counter()
    bench = Bench(args)
    with tempfile.TemporaryDirectory(prefix="bench-decoders-") as workdir:
        for fmt, side in FILE_SETS:
            bench.file_set(fmt, side, make_files(Path(workdir) / f"{fmt}{side}", fmt, side, args.files))
    title = [f"decode + timm eval resize/crop to {bench.common['input_size']} (resize target {bench.target} px), "
             f"{args.files} files per row, single process, median of {args.repeats}; cosines with {args.backbone} (random weights)",
             f"machine: {bench.info['cpu']}, {bench.info['cores']} cores; torch {bench.info['torch']}; "
             f"Pillow {Image.__version__}"]
    bench.finish(title, HEADER, bench.table(), started=started, out=results_path("decoders", bench.info, out=args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
