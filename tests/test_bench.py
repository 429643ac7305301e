"""embedpipe bench and report: the grid on tiny real models, resume, re-render, and the page in a real browser."""

from __future__ import annotations

import csv
import html
import json
import re
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

import embedpipe.bench.grid as grid
from embedpipe import BackboneSpec, RunConfig, SplitConfig
from embedpipe.bench import BenchError, parse_shots, read_results, resolve_backbones, scratch_record
from embedpipe.bench import PLOT_CONFUSION, PLOT_PARETO, PLOT_SHOTS

BACKBONES = ("test_resnet", "test_efficientnet")
BOGUS = "not_a_backbone_xyz"
HEADS = ("logreg", "knn")
SHOTS = (2, "all")
SEEDS = 2
TINY = BackboneSpec(name="test_resnet", pretrained=False, preprocess={"input_size": 64}, precision="fp32", dtype="float32")
RUN = RunConfig(device="cpu", batch_size=8, num_workers=0)


def _bench(source: Path, out: Path, cache: Path, **kw: Any) -> grid.BenchResult:
    specs = [replace(TINY, name=name) for name in kw.pop("backbones", (*BACKBONES, BOGUS))]
    return grid.bench(source, specs, heads=kw.pop("heads", HEADS), shots=kw.pop("shots", SHOTS), seeds=kw.pop("seeds", SEEDS),
                          out=out, cache_dir=cache, run=RUN, **kw)


@pytest.fixture(scope="module")
def benched(image_tree: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[grid.BenchResult, Path]:
    """One 2 backbones (+ a bogus one) x 2 heads x 2 shots x 2 seeds bench; read-only, copy before changing it."""
    root = tmp_path_factory.mktemp("bench")
    return _bench(image_tree, root / "out", root / "cache"), root / "cache"


def _copy(out: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(out, tmp_path / "out"))


def _runs(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in records if r["record"] == "run" and not r["error"]]


def test_grid_gives_every_row_file_and_plot(benched: tuple[grid.BenchResult, Path]) -> None:
    result, _ = benched
    out = result.out
    runs = _runs(result.records)
    cells = {(r["backbone"], r["head"], str(r["shots"]), r["seed"]) for r in runs}
    assert cells == {(b, h, str(s), seed) for b in BACKBONES for h in HEADS for s in SHOTS for seed in range(SEEDS)}
    assert len(runs) == len(cells) == 16
    assert {(s["backbone"], s["head"], str(s["shots"])) for s in result.summaries} == {(b, h, str(s)) for b in BACKBONES for h in HEADS for s in SHOTS}
    for s in result.summaries:
        values = [r["accuracy"] for r in runs if r["run_id"] in s["run_ids"]]
        assert s["n_seeds"] == 2 and s["accuracy_mean"] == pytest.approx(np.mean(values))
        assert s["accuracy_std"] == pytest.approx(np.std(values, ddof=1))
    for r in runs:
        matrix = np.asarray(r["confusion_matrix"])
        assert matrix.sum() == r["n_test"] > 0 and np.trace(matrix) / matrix.sum() == pytest.approx(r["accuracy"])
        assert r["n_train"] == (2 * 3 if r["shots"] == 2 else r["n_train"])  # 2 shots x 3 classes
        assert r["extract_images_per_second"] > 0 and r["fit_seconds"] >= 0 and r["peak_memory_bytes"] is not None
        assert r["split"] and r["preprocess"].startswith("64x64") and "mean (" in r["normalisation"]
        assert r["env_machine"] and r["env_torch"]
        assert (r["head"] == "logreg") == bool(r["c_grid"]) and (r["head"] != "logreg" or r["chosen"].startswith("C="))
    all_rows = {r["n_train"] for r in runs if r["shots"] == "all"}
    assert len(all_rows) == 1 and all_rows.pop() > 6  # the whole train split
    # Dimension and parameter count against timm's own model.
    from embedpipe.backbone import _timm

    for name in BACKBONES:
        model = _timm().create_model(name, pretrained=False)
        row = next(r for r in runs if r["backbone"] == name)
        assert row["embedding_dim"] == model.num_features
        assert row["param_count"] == sum(p.numel() for p in model.parameters())
    # Files: JSON and CSV hold the same records; the plots are real PNGs.
    stored = json.loads((out / "results.json").read_text())
    with (out / "results.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(stored) == len(result.records) == 16 + 8 + 1
    assert [r["run_id"] for r in rows] == [str(r.get("run_id") or "") for r in stored]
    for name in (PLOT_SHOTS, PLOT_PARETO, PLOT_CONFUSION):
        with Image.open(out / name) as image:
            image.load()
            assert image.format == "PNG" and image.width > 200 and image.height > 200
            assert np.asarray(image.convert("L")).std() > 5  # something is drawn
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 3
    assert not re.search(r"""(src|href)=["']?(https?:|//)""", page)  # nothing fetched from the network
    assert "Best:" in page and "<table" in page and "Protocol" in page and "Environment" in page


def test_bogus_backbone_becomes_an_error_row_and_the_rest_completes(benched: tuple[grid.BenchResult, Path]) -> None:
    result, _ = benched
    errors = [r for r in result.records if r["error"]]
    assert [r["backbone"] for r in errors] == [BOGUS]
    assert "unknown backbone" in errors[0]["error"] and errors[0]["error_type"] == "BackboneError"
    assert errors[0]["env_machine"]  # a failure says where it ran, like any row
    assert BOGUS in (result.out / "report.html").read_text()


def test_skip_existing_refits_nothing_finished(benched: tuple[grid.BenchResult, Path], image_tree: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    result, cache = benched
    out = _copy(result.out, tmp_path)
    calls = {"fit_head": 0, "extract": []}
    fit_head, extract = grid.fit_head, grid.extract

    def counting_fit(*args: Any, **kw: Any) -> Any:
        calls["fit_head"] += 1
        return fit_head(*args, **kw)

    def counting_extract(source: Any, spec: BackboneSpec, **kw: Any) -> Any:
        calls["extract"].append(spec.name)
        return extract(source, spec, **kw)

    monkeypatch.setattr(grid, "fit_head", counting_fit)
    monkeypatch.setattr(grid, "extract", counting_extract)
    again = _bench(image_tree, out, cache, skip_existing=True)
    assert calls["fit_head"] == 0 and again.fitted == 0 and again.reused == 16
    assert calls["extract"] == [BOGUS]  # failures are retried; finished backbones are not even extracted
    before = {r["run_id"]: r for r in _runs(result.records)}
    after = {r["run_id"]: r for r in _runs(again.records)}
    assert after == before  # the same records, sessions and numbers
    # A grown grid fits only the new cells.
    grown = _bench(image_tree, out, cache, skip_existing=True, shots=(2, 3, "all"))
    assert calls["fit_head"] == grown.fitted == len(BACKBONES) * len(HEADS) * SEEDS
    assert {r["session"] for r in _runs(grown.records) if r["shots"] != 3} == {result.records[0]["session"]}
    assert len(_runs(grown.records)) == 24


def test_report_rerenders_identically(benched: tuple[grid.BenchResult, Path], tmp_path: Path) -> None:
    result, _ = benched
    out = _copy(result.out, tmp_path)
    for name in ("report.html", PLOT_SHOTS, PLOT_PARETO, PLOT_CONFUSION):
        (out / name).unlink()
    rendered = grid.report(out)
    assert rendered.html == out / "report.html"
    for name in ("report.html", PLOT_SHOTS, PLOT_PARETO, PLOT_CONFUSION):
        assert (out / name).read_bytes() == (result.out / name).read_bytes(), name


def test_scratch_rows_are_drawn_on_the_shots_plot(benched: tuple[grid.BenchResult, Path], tmp_path: Path) -> None:
    result, _ = benched
    out = _copy(result.out, tmp_path)
    records = read_results(out)
    first = _runs(records)[0]
    common = {k: v for k, v in first.items() if k.startswith("env_") or k in ("bench_format", "session", "dataset", "source")}
    scratch = []
    for shots in SHOTS:  # what --baseline scratch stores: one record per fine-tune run folder
        for seed in range(SEEDS):
            run_dir = _finetune_run(tmp_path / "scratch" / f"test_resnet-{shots}-s{seed}")
            scratch.append(scratch_record(common, spec=TINY, split=SplitConfig(), shots=shots, seed=seed, run_dir=run_dir))
    failed = scratch_record(common, spec=TINY, split=SplitConfig(), shots=2, seed=9, run_dir=tmp_path, error=MemoryError("out of memory"))
    assert failed["record"] == "error" and failed["error"] == "out of memory"
    (out / "results.json").write_text(json.dumps(records + scratch + [failed]))
    rendered = grid.report(out)
    assert ("test_resnet", "scratch") in rendered.series and ("test_resnet", "logreg") in rendered.series
    row = next(s for s in rendered.summaries if s["head"] == "scratch" and s["shots"] == "all")
    assert row["accuracy_mean"] == pytest.approx(0.87) and row["train_per_class"] == next(
        s["train_per_class"] for s in rendered.summaries if s["head"] == "logreg" and s["shots"] == "all")
    assert any(line.startswith("Pretraining buys") for line in rendered.headline)
    assert (out / PLOT_SHOTS).read_bytes() != (result.out / PLOT_SHOTS).read_bytes()


def _finetune_run(folder: Path) -> Path:
    """A fine-tune run folder as `embedpipe fine-tune` writes it: metrics.jsonl per epoch and summary.json."""
    folder.mkdir(parents=True)
    lines = []
    for epoch in range(1, 13):
        phase = "head" if epoch <= 3 else "full"
        val_loss = 1.2 / epoch + (0.05 * (epoch - 8) if epoch > 8 else 0.0)
        lines.append(json.dumps({"phase": phase, "epoch": epoch, "train_loss": 1.3 / epoch, "train_acc": min(0.99, 0.4 + 0.06 * epoch),
                                 "val_loss": val_loss, "val_acc": min(0.9, 0.35 + 0.06 * epoch), "lr": 1e-3, "seconds": 2.0}))
    (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    (folder / "summary.json").write_text(json.dumps({
        "best_epoch": 8, "stopped_epoch": 12, "stop_reason": "early_stopping", "test": {"accuracy": 0.87, "balanced_accuracy": 0.85},
        "peak_memory_bytes": 123 * 2**20, "seconds": 24.0}))
    return folder


@pytest.mark.slow
def test_baseline_scratch_trains_the_same_architecture_on_each_label_budget(image_tree: Path, tmp_path: Path) -> None:
    """--baseline scratch runs the real fine-tune stage from random weights, on the heads' few-shot rows."""
    result = _bench(image_tree, tmp_path / "out", tmp_path / "cache", backbones=("test_resnet",), heads=("knn",), seeds=1,
                    baseline="scratch")
    scratch = [r for r in result.records if r["head"] == "scratch" and r["record"] != "summary"]
    assert [(r["record"], str(r["shots"]), r["error"]) for r in scratch] == [("run", "2", None), ("run", "all", None)]
    runs = {str(r["shots"]): tmp_path / "out" / "scratch" / f"test_resnet-{r['shots']}-s0" for r in scratch}
    summaries = {k: json.loads((v / "summary.json").read_text()) for k, v in runs.items()}
    knn_all = next(r for r in _runs(result.records) if r["head"] == "knn" and str(r["shots"]) == "all")
    assert summaries["2"]["n_train"] == 2 * 3  # two labelled images per class, as the frozen heads got
    assert summaries["all"]["n_train"] == knn_all["n_train"]
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in scratch)
    assert ("test_resnet", "scratch") in result.report.series
    again = _bench(image_tree, tmp_path / "out", tmp_path / "cache", backbones=("test_resnet",), heads=("knn",), seeds=1,
                   baseline="scratch", skip_existing=True)
    assert again.fitted == 0  # the finished scratch runs are kept


def test_finetune_run_curves_in_the_report(benched: tuple[grid.BenchResult, Path], tmp_path: Path) -> None:
    result, _ = benched
    out = _copy(result.out, tmp_path)
    run_dir = _finetune_run(tmp_path / "runs" / "shapes-lite0")
    rendered = grid.report(out, finetune_runs=[run_dir])
    plot = rendered.plots["finetune shapes-lite0"]
    with Image.open(plot) as image:
        assert image.format == "PNG" and image.width > 400
    page = rendered.html.read_text()
    assert "Fine-tune runs" in page and "shapes-lite0" in page and "early_stopping" in page and "0.870" in page
    assert page.count("data:image/png;base64,") == 4
    # Stored with the results, so a plain re-render keeps it.
    shutil.rmtree(run_dir)
    assert grid.report(out).html.read_text() == page
    with pytest.raises(BenchError, match="not a readable fine-tune run"):
        grid.report(out, finetune_runs=[tmp_path / "runs" / "missing"])


def test_grid_arguments(tmp_path: Path) -> None:
    assert parse_shots(["1", "5", "all", "5"]) == [1, 5, "all"]
    with pytest.raises(BenchError, match="neither a number nor 'all'"):
        parse_shots(["ten"])
    assert resolve_backbones("offline-fast,test_resnet") == ["tf_efficientnet_lite0", "mobilenetv2_100", "test_resnet"]
    assert resolve_backbones("test")[:2] == ["test_resnet", "test_efficientnet"]
    lists = tmp_path / "lists.json"
    lists.write_text(json.dumps({"mine": ["resnet18", "test_vit"]}))
    assert resolve_backbones("mine,test_resnet,resnet18", lists_file=lists) == ["resnet18", "test_vit", "test_resnet"]


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "embedpipe", *args], capture_output=True, text=True, cwd=cwd, timeout=300)


def test_cli_bench_then_report(image_tree: Path, tmp_path: Path) -> None:
    common = ["--no-pretrained", "--img-size", "64", "--precision", "fp32", "--device", "cpu", "--cache-dir", str(tmp_path / "cache")]
    done = _cli("bench", str(image_tree), "--backbones", f"test_resnet,{BOGUS}", "--heads", "knn", "--shots", "2,all",
                "--seeds", "1", "--out", str(tmp_path / "out"), "-q", *common, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "test_resnet" in done.stdout and f"failed: {BOGUS}" in done.stdout
    page = (tmp_path / "out" / "report.html").read_bytes()
    again = _cli("report", str(tmp_path / "out"), cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert again.stdout == done.stdout and (tmp_path / "out" / "report.html").read_bytes() == page
    refused = _cli("bench", str(image_tree), "--backbones", "test_resnet,test_vit", "--weights", str(tmp_path / "w.pth"),
                   "--out", str(tmp_path / "o2"), cwd=tmp_path)
    assert refused.returncode == 2 and "--weights names one backbone" in refused.stderr
    missing = _cli("report", str(tmp_path / "nothing"), cwd=tmp_path)
    assert missing.returncode != 0 and "no results.json" in missing.stderr and "Traceback" not in missing.stderr


# --------------------------------------------------------------------------- a real browser

# Injected into a copy of the page (the page itself has no script): records every error event (capture
# phase, so failed image loads too) and console.error call, then, once loaded, writes what the page
# shows into the DOM, which --dump-dom prints.
_PROBE = """<script>
window.__errors=[];
window.addEventListener('error',function(e){window.__errors.push('error: '+(e.message||(e.target&&(e.target.src||e.target.href))||'resource'));},true);
var __ce=console.error;console.error=function(){window.__errors.push('console.error: '+Array.prototype.join.call(arguments,' '));__ce.apply(console,arguments);};
window.addEventListener('load',function(){
 var imgs=Array.prototype.slice.call(document.images);
 var out={images:imgs.map(function(i){return {w:i.naturalWidth,h:i.naturalHeight,complete:i.complete,shown:i.getBoundingClientRect().width};}),
  rows:document.querySelectorAll('table tbody tr').length,points:document.querySelectorAll('.map .pt').length,
  errors:window.__errors,title:document.title,
  text:document.body.innerText.length};
 var pre=document.createElement('pre');pre.id='probe';pre.textContent=JSON.stringify(out);document.body.appendChild(pre);});
</script>"""


def _chromium(page: Path, profile: Path) -> tuple[dict[str, Any] | None, list[str]]:
    """Load a page in headless Chromium: (what the probe saw, console lines from Chromium's log)."""
    probe_page = page.with_name(f"probe-{page.name}")
    probe_page.write_text(page.read_text().replace("<head>", "<head>" + _PROBE, 1))
    command = ["chromium", "--headless", "--disable-gpu", "--no-sandbox", "--no-first-run", f"--user-data-dir={profile}",
               "--enable-logging=stderr", "--v=0", "--virtual-time-budget=10000", "--dump-dom"]
    done = subprocess.run([*command, probe_page.as_uri()], capture_output=True, text=True, timeout=120)
    found = re.search(r'<pre id="probe">(.*?)</pre>', done.stdout, re.S)
    seen = json.loads(html.unescape(found[1])) if found else None
    plain = subprocess.run([*command, page.as_uri()], capture_output=True, text=True, timeout=120)  # the page as shipped
    console = [line for line in plain.stderr.splitlines() if ":CONSOLE" in line]
    return seen, console


@pytest.mark.skipif(shutil.which("chromium") is None,
                    reason="chromium is not installed (apt-get install chromium; .ci/run installs it where apt works)")
def test_report_renders_in_headless_chromium(benched: tuple[grid.BenchResult, Path], tmp_path: Path) -> None:
    result, _ = benched
    out = _copy(result.out, tmp_path)
    seen, console = _chromium(out / "report.html", tmp_path / "profile")
    assert seen is not None, "the page did not finish loading"
    assert seen["errors"] == [] and console == []
    assert seen["title"].startswith("embedpipe bench") and seen["rows"] >= 8 and seen["text"] > 500
    assert len(seen["images"]) == 3
    for image in seen["images"]:
        assert image["complete"] and image["w"] > 200 and image["h"] > 200 and image["shown"] > 100  # decoded and laid out
    # The harness can fail: a page with a broken image and a console error is caught.
    bad = tmp_path / "bad.html"
    bad.write_text('<!DOCTYPE html><html><head><title>t</title></head><body><script>console.error("boom")</script>'
                   '<table><tbody><tr><td>1</td></tr></tbody></table><img src="data:image/png;base64,AAAA"></body></html>')
    seen, console = _chromium(bad, tmp_path / "profile2")
    assert seen is not None and seen["images"][0]["w"] == 0 and any("boom" in e for e in seen["errors"])
    assert any("boom" in line for line in console)


# --------------------------------------------------------------------------- feature quality and leakage


def brute_force_retrieval(queries: np.ndarray, q_labels: np.ndarray, bank: np.ndarray, b_labels: np.ndarray) -> tuple[float, float, float]:
    """recall@1, recall@5 and mAP@R by the book: float64 cosine, a full stable sort, one query at a time."""
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    b = bank / np.linalg.norm(bank, axis=1, keepdims=True)
    order = np.argsort(-(q.astype(np.float64) @ b.astype(np.float64).T), axis=1, kind="stable")
    r1, r5, aps = [], [], []
    for i, label in enumerate(q_labels):
        rel = b_labels[order[i]] == label
        big_r = int((b_labels == label).sum())
        r1.append(rel[:1].any())
        r5.append(rel[:5].any())
        aps.append(sum(rel[:j + 1].sum() / (j + 1) for j in range(big_r) if rel[j]) / big_r)
    return float(np.mean(r1)), float(np.mean(r5)), float(np.mean(aps))


def test_retrieval_quality_equals_a_brute_force_computation() -> None:
    from embedpipe.explore import retrieval_quality

    rng = np.random.default_rng(0)
    centres = rng.standard_normal((4, 24))
    b_labels, q_labels = rng.integers(0, 4, 300), rng.integers(0, 4, 70)
    bank = (centres[b_labels] + 3.0 * rng.standard_normal((300, 24))).astype(np.float32)
    queries = (centres[q_labels] + 3.0 * rng.standard_normal((70, 24))).astype(np.float32)
    q_labels[:3] = -1  # unlabelled queries are left out
    found = retrieval_quality(queries, q_labels, bank, b_labels, device="cpu")
    expected = brute_force_retrieval(queries[3:], q_labels[3:], bank, b_labels)
    assert (found.queries, found.bank, found.skipped) == (67, 300, 3)
    assert (found.recall[1], found.recall[5], found.map_at_r) == pytest.approx(expected, abs=1e-9)
    assert 0 < found.map_at_r < found.recall[1] < found.recall[5] < 1  # neither trivial nor perfect


def test_bench_rows_carry_the_backbones_retrieval_quality_and_no_false_leakage(benched: tuple[grid.BenchResult, Path]) -> None:
    from embedpipe import load

    result, _ = benched
    assert result.warnings == [] and not any(r["record"] == "warning" for r in result.records)
    for name in BACKBONES:
        rows = [r for r in result.records if r["record"] in ("run", "summary") and r["backbone"] == name]
        X, y, meta = load(next(r["embeddings_file"] for r in rows if r["record"] == "run"))
        test, train = meta["split"] == "test", meta["split"] == "train"
        expected = brute_force_retrieval(X[test], y[test], X[train], y[train])
        for r in rows:  # measured once per backbone, the same on each of its rows
            assert (r["knn_recall_at_1"], r["knn_recall_at_5"], r["knn_map_at_r"]) == pytest.approx(expected, abs=1e-6)
            assert r["knn_queries"] == int(test.sum())
        assert rows[0]["leakage_check"] == ("test images with a byte-identical train image: 0 of "
                                            f"{int(test.sum())}; near duplicates not checked (no threshold given)")
    assert "mAP@R" in (result.out / "report.html").read_text()


def test_a_planted_train_test_copy_becomes_a_warning_row(tmp_path: Path) -> None:
    from .conftest import make_tree

    root = make_tree(tmp_path / "shapes", per_class=6)
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.*"))
    rows = [("path", "label", "split")] + [(f, f.split("/")[0], ("train", "train", "test")[i % 3]) for i, f in enumerate(files)]
    shutil.copyfile(root / files[0], root / "copy.png" if files[0].endswith(".png") else root / "copy.jpg")
    copy = next(p.name for p in root.iterdir() if p.name.startswith("copy."))
    rows.append((copy, files[0].split("/")[0], "test"))  # files[0] is in train
    with (root / "manifest.csv").open("w", newline="") as handle:
        csv.writer(handle).writerows(rows)
    # Random weights put every test image above 0.99 of a train image: the guard keeps the near check from firing.
    result = _bench(root / "manifest.csv", tmp_path / "out", tmp_path / "cache", backbones=("test_resnet",), heads=("knn",),
                    shots=("all",), seeds=1, leakage_threshold=0.9)
    check = next(r["leakage_check"] for r in result.records if r["record"] == "run")
    assert "near duplicates (cosine >= 0.9) not reported: the median test image has a train image at cosine 0.99" in check
    assert [(w["backbone"], w["exact_pairs"], w["near_pairs"]) for w in result.warnings] == [("test_resnet", 1, 0)]
    warning = result.warnings[0]
    assert f"{copy} = {files[0]} (identical file)" == warning["examples"] and "inflated" in warning["message"]
    assert result.report.headline[0] == ("Leakage (test_resnet): test images with a byte-identical train image: 1 of 7: the test "
                                         "numbers are inflated; remove the copies from test (or train) and rerun.")
    assert "Warnings" in (result.out / "report.html").read_text() and copy in (result.out / "report.html").read_text()
    assert text_table_lines(result)[-1].startswith("warning: test_resnet: test images with a byte-identical train image: 1 of 7")
    # Kept by a resume that refits nothing, and re-rendered from the stored records.
    again = _bench(root / "manifest.csv", tmp_path / "out", tmp_path / "cache", backbones=("test_resnet",), heads=("knn",),
                   shots=("all",), seeds=1, skip_existing=True, leakage_threshold=0.9)
    assert again.fitted == 0 and [w["examples"] for w in again.warnings] == [warning["examples"]]


def text_table_lines(result: grid.BenchResult) -> list[str]:
    from embedpipe.bench import text_table

    return text_table(result.summaries, result.errors, result.warnings).splitlines()


def test_split_leakage_finds_near_copies_and_refuses_a_threshold_that_chains() -> None:
    from embedpipe.explore import split_leakage

    rng = np.random.default_rng(2)
    X = rng.standard_normal((200, 32)).astype(np.float32)  # distinct rows: cosine ~0 between them
    splits = np.array(["train"] * 150 + ["test"] * 50, dtype=object)
    digests = [f"d{i}" for i in range(200)]
    X[150] = X[3] + 0.05 * rng.standard_normal(32)  # a near copy of train row 3 in test
    digests[151] = digests[7]  # and a byte-identical one of train row 7
    found = split_leakage(X, digests, splits, threshold=0.9, device="cpu")
    assert found.exact == [(151, 7)] and [(a, b) for a, b, _ in found.near] == [(150, 3)] and not found.inconclusive
    assert split_leakage(X, digests, splits, threshold=None, device="cpu").near == []
    # A threshold below what distinct rows reach: every test row "has a copy", so none is reported.
    loose = split_leakage(X, digests, splits, threshold=0.1, device="cpu")
    assert loose.near == [] and loose.exact == [(151, 7)] and "does not tell these images apart" in loose.inconclusive
    # Test rows spread along one chain of near-identical rows: one group too large to be copies.
    chain = np.cumsum(0.02 * rng.standard_normal((200, 32)), axis=0).astype(np.float32) + 5
    chain[150:] = rng.standard_normal((50, 32)) * 3
    chain[150:175] = chain[rng.choice(150, 25, replace=False)] + 0.001
    chained = split_leakage(chain, [f"d{i}" for i in range(200)], splits, threshold=0.99, device="cpu")
    assert chained.near == [] and "into one group" in chained.inconclusive
