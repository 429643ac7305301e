"""benchmarks/gpu_check: the CPU run CI does so the one-shot GPU measurement cannot rot, and its GPU-decode loop."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from embedpipe import BackboneSpec, RunConfig

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gpu_check():
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import gpu_check

        yield gpu_check
    finally:
        sys.path.remove(str(REPO / "benchmarks"))


@pytest.mark.slow
def test_gpu_check_quick_on_cpu_records_every_row(tmp_path: Path) -> None:
    out = tmp_path / "gpu-check.json"
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(REPO)}
    done = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--device", "cpu", "--quick", "--check-device-loop",
                           "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "installing the project" not in done.stderr  # this environment already has it
    records = json.loads(out.read_text())
    rows = {(r.get("model"), r["variant"]): r for r in records if r["measurement"] != "diagnostic"}
    for model in ("test_resnet", "test_efficientnet", "test_vit"):
        forward, pil = rows[model, "forward"], rows[model, "e2e_pil"]
        assert forward["error"] is None and forward["images_per_second"] > 0
        assert pil["error"] is None and 0 < pil["ratio_to_forward"] == pytest.approx(pil["images_per_second"] / forward["images_per_second"])
        assert rows[model, "e2e_gpu_decode"]["skipped"] == "no CUDA"
        loop = rows[model, "e2e_device_loop_pil"]  # that row's code, decoding by PIL
        assert loop["error"] is None and loop["images_per_second"] > 0 and loop["cosine_min_vs_pil"] > 0.999
    compiled = rows["test_resnet", "forward_compiled"]
    assert compiled["error"] is None and compiled["images_per_second"] > 0 and compiled["backend"] == "eager"
    assert rows["test_vit", "forward_compiled"]["skipped"].startswith("--quick")
    assert rows["test_resnet", "torchrun"]["skipped"] == "no CUDA"
    assert rows["test_resnet", "forward"]["channels_last"] and not rows["test_vit", "forward"]["channels_last"]
    assert "e2e_pil" in done.stdout and "vs forward" in done.stdout


def test_device_decode_loop_matches_the_pil_path(gpu_check, tmp_path: Path) -> None:
    """The GPU-decode row's loop, run on CPU with PIL decoding the bytes: only the resize and crop differ."""
    import torch

    from embedpipe import extraction, inference
    from embedpipe.backbone import load_backbone
    from embedpipe.preprocess import decode_image, eval_transform

    paths = gpu_check.make_jpegs(tmp_path, 11, (150, 100), processes=1)
    spec = BackboneSpec(name="test_resnet", pretrained=False, preprocess={"input_size": 64}, precision="fp32", dtype="float32")
    config = extraction.resolve(spec, "cpu")
    model = inference.prepare_model(load_backbone(spec.name, pretrained=False), "cpu", RunConfig(device="cpu"))
    ours, _ = gpu_check.device_decode_embed(model, paths, config, device="cpu", batch_size=4, workers=0, channels_last=True,
                                            decode=gpu_check.pil_bytes_decoder("cpu"))
    run = RunConfig(device="cpu", batch_size=4, num_workers=0)
    reference = np.concatenate([b.outputs["embedding"] for b in inference.embed(model, paths, config, device="cpu", run=run)])
    assert ours.shape == reference.shape
    assert gpu_check.cosine_rows(ours.astype(np.float64), reference.astype(np.float64)).min() > 0.9999

    transform = eval_transform(config.preprocess)
    for path in paths[:3]:
        image = decode_image(path)
        pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1)
        diff = (gpu_check.resize_crop(pixels, config.preprocess).int() - transform(image).int()).abs()
        assert diff.shape == (3, 64, 64) and int(diff.max()) <= 1


@pytest.mark.slow
def test_gpu_check_torchrun_row_on_cpu(tmp_path: Path) -> None:
    """The 1-vs-N torchrun row, with gloo ranks on CPU: the code a multi-GPU loan runs."""
    out = tmp_path / "gpu-check.json"
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(REPO)}
    command = ["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--device", "cpu", "--quick", "--models", "test_resnet",
               "--torchrun-procs", "2", "--skip", "e2e_pil", "forward_compiled", "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    (row,) = [r for r in json.loads(out.read_text()) if r["variant"] == "torchrun"]
    assert row["error"] is None and row["processes"] == 2
    assert row["images_per_second_1"] > 0 and row["images_per_second_2"] > 0 and row["scaling"] > 0


@pytest.mark.slow
def test_bookkeeping_benchmark_runs_every_measurement(tmp_path: Path) -> None:
    """bench_bookkeeping at a toy size, so the scale benchmark cannot rot: every row measured, the hit a hit."""
    out = tmp_path / "bookkeeping.json"
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_bookkeeping.py"), "--sizes", "300",
                           "--workdir", str(tmp_path / "work"), "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    (record,) = json.loads(out.read_text())
    assert record["images"] == 300 and record["hit_cache_hit"] is True
    assert record["incremental_images"] == 3 and record["incremental_computed"] == 3
    assert record["store_files"] > 0 and record["verify_seconds"] > 0 and record["list_stat_seconds"] > 0
    assert "hit/stat" in done.stdout


@pytest.mark.slow
def test_store_scale_benchmark_compacts_and_finds_every_row(tmp_path: Path) -> None:
    """bench_store_scale at a toy size: shards pile up and are merged as the extract stage merges them, every row found."""
    from embedpipe.cache.layout import COMPACT_SHARDS

    out = tmp_path / "store.json"
    rows, batch = 3 * COMPACT_SHARDS * 16 + 5, 16  # three rounds of compaction and a last short shard
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_store_scale.py"), "--rows", str(rows), "--batch", str(batch),
                           "--workdir", str(tmp_path / "work"), "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    (record,) = json.loads(out.read_text())
    assert record["rows"] == rows and record["shards"] < COMPACT_SHARDS  # merged, not one shard per batch
    assert record["verify_seconds"] > 0 and record["index_bytes_per_row"] > 0
    assert "files in the store" in done.stdout


def test_benchmark_commands_report_their_own_peak_rss_not_their_parents() -> None:
    """run_embedpipe's peak is the command's own: wait4's ru_maxrss would carry the benchmark's 400 MB over into it."""
    script = ("import os, sys, numpy as np\nsys.path.insert(0, sys.argv[1])\nfrom _harness import run_embedpipe\n"
              "ballast = np.ones(50_000_000)  # 400 MB resident in the parent\n"
              "out, wall, peak = run_embedpipe(['--version'], dict(os.environ))\nprint(out.strip()); print(peak)")
    done = subprocess.run([sys.executable, "-c", script, str(REPO / "benchmarks")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    version, peak = done.stdout.strip().splitlines()[-2:]
    assert "embedpipe" in version
    assert 5 * 2**20 < int(peak) < 250 * 2**20  # `embedpipe --version` imports no torch: tens of MiB


def test_export_benchmark_rebuilds_a_sound_export(tmp_path: Path) -> None:
    """bench_export at a toy size: the rebuilt export it times reads back whole and verifies; both variants are timed."""
    out = tmp_path / "export.json"
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_export.py"), "--rows", "5000", "--repeats", "1",
                           "--workdir", str(tmp_path / "work"), "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    (record,) = json.loads(out.read_text())
    assert record["new_rows"] == 50 and all(v > 0 for v in record["median_seconds"].values())
    assert "rebuild / append lower bound" in done.stdout
