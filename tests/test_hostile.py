"""Tampered and foreign files: exports, heads, fine-tune runs and bench results each get a one-line error, never a traceback.

Each case is a real file made by embedpipe (the session's ``artifacts``) with one thing changed.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from safetensors.numpy import load_file, save_file

import embedpipe
from embedpipe.cache.hdf5 import column_checksums
from embedpipe import RunConfig
from embedpipe.cache import cache_list, cache_verify, read_export
from embedpipe.cli import cli
from embedpipe.config import EmbeddingConfig
from embedpipe.errors import BenchError, CacheError, FineTuneError, HeadError
from embedpipe.heads import evaluate, load_head, predict
from embedpipe.heads.headfile import checksums

STR = h5py.string_dtype()


def invoke(*args: str) -> tuple[int, str, str]:
    """The CLI in this process: (exit code, stdout, stderr); any exception but a clean exit fails the test."""
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exc_info
    return result.exit_code, result.stdout, result.stderr.strip()


def one_line(message: str) -> str:
    assert message and "\n" not in message.strip() and "Traceback" not in message, message
    return message


# --------------------------------------------------------------------------- exports


def _replace(f: h5py.File, name: str, data: Any, **kwargs: Any) -> None:
    del f[name]
    f.create_dataset(name, data=data, **kwargs)


def _only_kind(f: h5py.File) -> None:
    for name in list(f):
        del f[name]


EXPORT_TAMPERING: dict[str, tuple[Callable[[h5py.File], None], str]] = {
    "class_names a dict": (lambda f: f.attrs.__setitem__("class_names", json.dumps({"a": 1})), "not a list of names"),
    "class_names an int": (lambda f: f.attrs.__setitem__("class_names", 3), "not a list of names"),
    "class_names too short": (lambda f: f.attrs.__setitem__("class_names", json.dumps(["circles"])), "outside -1..0"),
    "label 99": (lambda f: f["labels"].__setitem__(0, 99), "outside -1..2"),
    "label -7": (lambda f: f["labels"].__setitem__(0, -7), "outside -1..2"),
    "labels strings": (lambda f: _replace(f, "labels", np.array(["x"] * f["labels"].shape[0], dtype=object), dtype=STR),
                       "'labels' dataset of dtype object"),
    "1-D embeddings": (lambda f: _replace(f, "embeddings", f["embeddings"][:, 0]), "not 2-D"),
    "a NaN row": (lambda f: f["embeddings"].__setitem__(3, np.full(f["embeddings"].shape[1], np.nan)), "non-finite embeddings (first at row 3)"),
    "outputs an int": (lambda f: f.attrs.__setitem__("outputs", 5), "not a list of output names"),
    "outputs nested": (lambda f: f.attrs.__setitem__("outputs", json.dumps([["embedding"]])), "not a list of output names"),
    "kind without datasets": (_only_kind, "has no 'paths' dataset (it has none)"),
    "dims a string": (lambda f: f.attrs.__setitem__("dims", "abc"), "has dims 'abc'"),
    "paths shorter": (lambda f: _replace(f, "paths", f["paths"].asstr()[:-1].tolist(), dtype=STR), "rows of 'labels' but 23 paths"),
    "split unknown": (lambda f: _replace(f, "split", ["train"] * 23 + ["holdout"], dtype=STR), "split names ['holdout']"),
    "digests short": (lambda f: _replace(f, "digests", f["digests"][:].astype("S8")), "'digests' dataset of dtype |S8"),
    "huge declared shape": (lambda f: (_replace(f, "embeddings", np.zeros((0, 0), "f2"), maxshape=(None, None), chunks=(1, 1)),
                                       f["embeddings"].resize((24, 1 << 30)), f.attrs.__setitem__("dims", json.dumps({"embedding": 1 << 30}))),
                            "more than its"),
    "format_version a string": (lambda f: f.attrs.__setitem__("format_version", "1"), "format_version '1' of type str, not an integer"),
}


def tampered_export(artifacts: dict[str, Path], folder: Path, change: Callable[[h5py.File], None]) -> Path:
    folder.mkdir(exist_ok=True)
    path = folder / artifacts["export"].name
    shutil.copyfile(artifacts["export"], path)
    with h5py.File(path, "r+") as f:
        change(f)
    return path


@pytest.mark.parametrize("case", EXPORT_TAMPERING)
def test_a_tampered_export_is_refused_in_one_line_everywhere(artifacts: dict[str, Path], tmp_path: Path, case: str) -> None:
    change, message = EXPORT_TAMPERING[case]
    path = tampered_export(artifacts, tmp_path / "cache", change)
    with pytest.raises(CacheError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[").replace("]", r"\]")):
        read_export(path)
    code, _, stderr = invoke("fit-head", path)  # was fitted and evaluated with exit 0, or a traceback
    assert code == CacheError.exit_code and one_line(stderr).startswith(f"error: {path}")
    # cache ls shows the bad file as one row with its error, and still lists the rest of the folder
    shutil.copyfile(artifacts["export"], tmp_path / "cache" / "good.h5")
    rows = {Path(r["path"]).name: r for r in cache_list(tmp_path / "cache")["exports"]}
    assert "error" not in rows["good.h5"] and rows["good.h5"]["dims"] == {"embedding": 96}
    assert ("error" in rows[path.name]) == (case != "a NaN row")  # ls checks the schema; values are read by verify
    code, stdout, _ = invoke("cache", "ls", "--cache-dir", tmp_path / "cache")
    assert code == 0 and len(stdout.splitlines()) == 2
    assert cache_verify(path) and all(p.startswith(str(path)) for p in cache_verify(path))


def test_an_export_of_the_wrong_width_for_the_head_is_refused(artifacts: dict[str, Path], tmp_path: Path) -> None:
    def narrower(f: h5py.File) -> None:
        _replace(f, "embeddings", f["embeddings"][:, :50])
        f.attrs["dims"] = json.dumps({"embedding": 50})
        # resealed, as a valid export of a narrower backbone would be: only the width check can refuse it
        names = ["embeddings", "labels", "paths", "digests", "split", "errors/paths", "errors/reasons"]
        f.attrs["checksums"] = column_checksums(f, names)

    path = tampered_export(artifacts, tmp_path, narrower)
    with pytest.raises(HeadError, match="holds 50-wide embeddings, the head reads 96"):
        evaluate(artifacts["logreg"], path)
    code, _, stderr = invoke("evaluate", artifacts["knn"], path)
    assert code == HeadError.exit_code and "50-wide" in one_line(stderr)


def test_folders_and_odd_format_versions_are_named_for_what_they_are(artifacts: dict[str, Path]) -> None:
    folder = artifacts["cache"]
    for args in (["fit-head", folder], ["cache", "info", folder]):
        code, _, stderr = invoke(*args)
        assert code == CacheError.exit_code and f"{folder} is a folder, not an exported file" in one_line(stderr)
        assert "does not exist" not in stderr


# --------------------------------------------------------------------------- heads


def reseal(folder: Path) -> None:
    """Recompute a head's checksums after an edit: a crafted head, not a damaged one, so the checks behind them are reached."""
    info = json.loads((folder / "head.json").read_text())
    info["checksums"] = checksums(info, (folder / "arrays.safetensors").read_bytes())
    (folder / "head.json").write_text(json.dumps(info))


def _edit_json(folder: Path, change: Callable[[dict[str, Any]], None], *, seal: bool = True) -> None:
    info = json.loads((folder / "head.json").read_text())
    change(info)
    (folder / "head.json").write_text(json.dumps(info))
    if seal:
        reseal(folder)


def _edit_arrays(folder: Path, change: Callable[[dict[str, np.ndarray]], None], *, seal: bool = True) -> None:
    arrays = load_file(folder / "arrays.safetensors")
    change(arrays)
    save_file(arrays, folder / "arrays.safetensors")
    if seal:
        reseal(folder)


def test_a_head_changed_since_it_was_saved_is_refused(artifacts: dict[str, Path], tmp_path: Path) -> None:
    for part, edit in (("json", lambda: _edit_json(folder, lambda i: i["state"]["classes"].reverse(), seal=False)),
                       ("arrays", lambda: _edit_arrays(folder, lambda a: a["coef"].__setitem__((0, 0), 1.0), seal=False))):
        folder = Path(shutil.copytree(artifacts["logreg"], tmp_path / part))
        edit()  # a valid head that predicts other labels or other numbers: only the checksum can tell
        with pytest.raises(HeadError, match="changed since it was saved"):
            load_head(folder)
    _edit_json(folder, lambda i: i.__setitem__("format_version", "1"))
    with pytest.raises(HeadError, match=r"has head format '1' \(str\)"):
        load_head(folder)


def _huge_input(info: dict[str, Any]) -> None:
    """An attacker who also fixes the cache key: predict would have allocated 100000 x 100000 px images."""
    info["embedding_config"]["preprocess"]["input_size"] = [3, 100000, 100000]
    info["cache_key"] = EmbeddingConfig.from_dict(info["embedding_config"]).key()


HEAD_TAMPERING: dict[str, tuple[str, str, Callable[[Path], None], str]] = {
    "no embedding_config": ("logreg", "json", lambda i: i.pop("embedding_config"), "lacks the embedding_config and cache_key"),
    "no cache_key": ("knn", "json", lambda i: i.pop("cache_key"), "lacks the embedding_config and cache_key"),
    "edited n_features_in": ("logreg", "json", lambda i: i["state"].__setitem__("n_features_in", 50), r"need \(3, 50\)"),
    "n_features_in a string": ("mlp", "json", lambda i: i["state"].__setitem__("n_features_in", "64"), "not a width"),
    "input_size 100000": ("logreg", "json", _huge_input, "from 1 to 4096"),
    "cache_key of another config": ("knn", "json", lambda i: i.__setitem__("cache_key", "0" * 64), "not the key of its embedding_config"),
    "no classes": ("mlp", "json", lambda i: i["state"].pop("classes"), "lacks \\['classes'\\]"),
    "classes a string": ("logreg", "json", lambda i: i["state"].__setitem__("classes", "abc"), "list of 2 to"),
    "kind an int": ("logreg", "json", lambda i: i.__setitem__("kind", 5), "has kind 5"),
    "kind of another head": ("logreg", "json", lambda i: i.__setitem__("kind", "knn"), "holds a LogisticProbe"),
    "unknown parameter": ("knn", "json", lambda i: i["state"]["params"].__setitem__("evil", 1), "does not take"),
    "fitted value that shadows a method": ("logreg", "json", lambda i: i["state"]["fitted"].__setitem__("_proba", 1), "does not store"),
    "normalize bogus": ("logreg", "json", lambda i: i["state"]["params"].__setitem__("normalize", "bogus"), "normalize 'bogus'"),
    "huge classes_dtype": ("logreg", "json", lambda i: i["state"].__setitem__("classes_dtype", "V1000000000"), "not a label dtype"),
    "coef of the wrong shape": ("logreg", "arrays", lambda a: a.__setitem__("coef", a["coef"][:, :50].copy()), r"has shape \(3, 50\)"),
    "coef integers": ("logreg", "arrays", lambda a: a.__setitem__("coef", a["coef"].astype(np.int32)), "not a float array"),
    "NaN in coef": ("logreg", "arrays", lambda a: a["coef"].__setitem__((0, 0), np.nan), "NaN or infinite"),
    "no intercept": ("logreg", "arrays", lambda a: a.pop("intercept"), "no 'intercept' array"),
    "knn label out of range": ("knn", "arrays", lambda a: a["labels"].__setitem__(0, 7), "outside 0..2"),
    "knn features of the wrong width": ("knn", "arrays", lambda a: a.__setitem__("features", a["features"][:, :8].copy()), "features"),
    "mlp layer missing": ("mlp", "arrays", lambda a: a.pop("weights.out.bias"), "not fc0..fcN and out layers"),
    "mlp layer of the wrong shape": ("mlp", "arrays", lambda a: a.__setitem__("weights.fc0.bias", a["weights.fc0.bias"][:3].copy()),
                                     r"weights.fc0.bias is not a float array of shape \(16,\)"),
}


@pytest.mark.parametrize("case", HEAD_TAMPERING)
def test_a_tampered_head_is_refused_in_one_line_before_use(artifacts: dict[str, Path], tmp_path: Path, case: str) -> None:
    kind, part, change, message = HEAD_TAMPERING[case]
    folder = Path(shutil.copytree(artifacts[kind], tmp_path / kind))
    (_edit_json if part == "json" else _edit_arrays)(folder, change)
    with pytest.raises(HeadError, match=message) as raised:
        load_head(folder)
    one_line(str(raised.value))
    code, _, stderr = invoke("evaluate", folder, artifacts["export"])
    assert code == HeadError.exit_code and one_line(stderr).startswith("error:")


def test_predict_refuses_a_huge_input_size_before_allocating(artifacts: dict[str, Path], tmp_path: Path) -> None:
    folder = Path(shutil.copytree(artifacts["logreg"], tmp_path / "head"))
    _edit_json(folder, _huge_input)
    with pytest.raises(HeadError, match="from 1 to 4096"):
        predict(folder, artifacts["data"], cache_dir=tmp_path / "cache", run=RunConfig(device="cpu", num_workers=0))
    assert not (tmp_path / "cache").exists()  # refused before any image was read


def test_untampered_heads_still_load_and_predict_as_before(artifacts: dict[str, Path]) -> None:
    X, _, _ = embedpipe.load(artifacts["export"])
    for kind in ("logreg", "knn", "mlp"):
        head, _ = load_head(artifacts[kind])
        assert head.predict_proba(X).shape == (len(X), 3)


# --------------------------------------------------------------------------- fine-tune runs and bench results


def _edit_header(path: Path, change: Callable[[dict[str, Any]], None], tensors: Callable[[dict[str, Any]], None] | None = None,
                 *, seal: bool = True) -> None:
    from safetensors import safe_open
    from safetensors.torch import load_file as load_torch
    from safetensors.torch import save_file as save_torch

    from embedpipe.finetune.rundir import CHECKSUM_KEY, tensors_digest

    with safe_open(str(path), "pt") as handle:
        raw = handle.metadata() or {}
    meta = {k: json.loads(v) for k, v in raw.items() if k != CHECKSUM_KEY}
    data = load_torch(str(path))
    change(meta)
    if tensors:
        tensors(data)
    header = {k: json.dumps(v) for k, v in meta.items()}
    # sealed: a crafted checkpoint, so the checks behind the checksum are reached; unsealed: damage, the old checksum kept
    header[CHECKSUM_KEY] = json.dumps(tensors_digest(data, header)) if seal else raw[CHECKSUM_KEY]
    save_torch(data, str(path), metadata=header)


RUN_TAMPERING: dict[str, tuple[str, Callable[[dict[str, Any]], None], Any, str]] = {
    "history not a list": ("last.safetensors", lambda m: m["state"].__setitem__("history", "x"), None, "'history' is missing or of the wrong type"),
    "phase_index past the plan": ("last.safetensors", lambda m: m["state"].__setitem__("phase_index", 99), None, "at phase 99"),
    "identity a list": ("last.safetensors", lambda m: m.__setitem__("identity", []), None, "no identity or state object"),
    "a weight of another shape": ("best.safetensors", lambda m: None,
                                  lambda t: t.__setitem__("fc.weight", t["fc.weight"][:, :5].clone()), "holds fc.weight as"),
    "NaN weights": ("best.safetensors", lambda m: None, lambda t: t["fc.bias"].fill_(float("nan")), "NaN or infinite values in fc.bias"),
    "a changed weight, unsealed": ("best.safetensors", lambda m: None, lambda t: t["fc.bias"].add_(1.0), "changed since it was written"),
}


@pytest.mark.parametrize("case", RUN_TAMPERING)
def test_a_tampered_fine_tune_checkpoint_is_refused_on_resume(artifacts: dict[str, Path], tmp_path: Path, case: str) -> None:
    from embedpipe import BackboneSpec
    from embedpipe.config import FineTuneConfig

    name, change, tensors, message = RUN_TAMPERING[case]
    out = Path(shutil.copytree(artifacts["run"], tmp_path / "run"))
    _edit_header(out / name, change, tensors, seal="unsealed" not in case)
    spec = BackboneSpec(name="test_resnet", pretrained=False, preprocess={"input_size": 64}, precision="fp32")
    config = FineTuneConfig(batch_size=8, augment="none", warmup=0.0, head_epochs=1, epochs=1, unfreeze="none")
    with pytest.raises(FineTuneError, match=message) as raised:
        embedpipe.fine_tune(artifacts["data"], spec, out=out, config=config, resume=True, cache_dir=artifacts["cache"],
                            run=RunConfig(device="cpu", batch_size=8, num_workers=0))
    one_line(str(raised.value))


@pytest.mark.parametrize(("file", "text", "message"), [
    ("metrics.jsonl", "5\n", "line 1 is not an epoch record"),
    ("metrics.jsonl", '{"phase": "head", "epoch": "one"}\n', "line 1 is not an epoch record"),
    ("summary.json", "[1, 2]", "is not a JSON object"),
    ("summary.json", '{"best_epoch": "x"}', "'best_epoch' of the wrong type"),
    ("summary.json", '{"test": {"accuracy": "high"}}', "test metrics that are not numbers"),
])
def test_a_tampered_run_folder_is_refused_by_the_bench_report(artifacts: dict[str, Path], tmp_path: Path, file: str, text: str,
                                                              message: str) -> None:
    from embedpipe.bench import read_finetune_run
    from embedpipe.finetune import read_run

    out = Path(shutil.copytree(artifacts["run"], tmp_path / "run"))
    (out / file).write_text(text)
    with pytest.raises(FineTuneError, match=message):
        read_run(out)
    with pytest.raises(BenchError, match=message):
        read_finetune_run(out)


GOOD_RECORD = {"bench_format": 1, "record": "run", "backbone": "test_resnet", "head": "logreg", "shots": "all", "seed": 0,
               "run_id": "abc", "error": None, "accuracy": 0.5}


@pytest.mark.parametrize(("records", "message"), [
    ([1, 2], "not a list of bench records"),
    ([{**GOOD_RECORD, "bench_format": "1"}], "bench format"),
    ([{**GOOD_RECORD, "record": "weird"}], "record 0 is of kind 'weird'"),
    ([{**GOOD_RECORD, "shots": "many"}], "record 0 has shots 'many' of the wrong type"),
    ([{**GOOD_RECORD, "accuracy": "high"}], "has accuracy 'high'"),
    ([{**GOOD_RECORD, "confusion_matrix": [[1, 2]]}], "has confusion_matrix"),
    ([{**GOOD_RECORD, "run_id": None}], "lacks 'run_id'"),
    ([{**GOOD_RECORD, "class_names": {"a": 1}}], "has class_names"),
])
def test_a_tampered_bench_results_file_is_one_line(tmp_path: Path, records: Any, message: str) -> None:
    (tmp_path / "results.json").write_text(json.dumps(records))
    code, _, stderr = invoke("report", tmp_path)
    assert code == BenchError.exit_code and message in one_line(stderr)


# --------------------------------------------------------------------------- odd file names, symlinks, shared ledgers


def _spec_run() -> tuple[embedpipe.BackboneSpec, RunConfig]:
    return (embedpipe.BackboneSpec(name="test_resnet", pretrained=False, preprocess={"input_size": 64}, precision="fp32"),
            RunConfig(device="cpu", batch_size=8, num_workers=0))


def test_a_file_name_that_is_not_utf8_is_ledgered_and_the_run_goes_on(tree_copy: Path, tmp_path: Path) -> None:
    import os

    spec, run = _spec_run()
    odd = Path(os.fsdecode(str(tree_copy / "circles").encode() + b"/caf\xe9.png"))
    shutil.copyfile(sorted((tree_copy / "circles").glob("*.png"))[0], odd)
    odd_class = Path(os.fsdecode(str(tree_copy).encode() + b"/\xff\xfe"))
    odd_class.mkdir()
    shutil.copyfile(odd, odd_class / "x.png")
    result = embedpipe.extract(tree_copy, spec, cache_dir=tmp_path / "cache", run=run)
    assert result.num_images == 24 and sorted(p for p, _ in result.failed) == ["\\xff\\xfe/x.png", "circles/caf\\xe9.png"]
    assert all("not valid UTF-8" in reason for _, reason in result.failed)
    X, y, meta = embedpipe.load(result.path)
    assert len(X) == 24 and len(meta["paths"]) == 24 and meta["class_names"] == ["circles", "squares", "stripes"]
    again = embedpipe.extract(tree_copy, spec, cache_dir=tmp_path / "cache", run=run)
    assert again.cache_hit and again.failed == result.failed
    os.replace(odd, tree_copy / "circles" / "cafe.png")  # renamed: now embedded, and no longer in the ledger
    renamed = embedpipe.extract(tree_copy, spec, cache_dir=tmp_path / "cache", run=run)
    assert renamed.num_images == 25 and renamed.computed == 0 and [p for p, _ in renamed.failed] == ["\\xff\\xfe/x.png"]


def test_symlinks_are_followed_in_folders_and_manifests_and_loops_listed_once(image_tree: Path, tmp_path: Path) -> None:
    spec, run = _spec_run()
    outside = Path(shutil.copytree(image_tree / "circles", tmp_path / "elsewhere" / "circles"))
    data = tmp_path / "data"
    shutil.copytree(image_tree / "squares", data / "squares")
    (data / "circles").symlink_to(outside, target_is_directory=True)  # a class folder kept elsewhere
    (data / "squares" / "loop").symlink_to(data / "squares", target_is_directory=True)  # points back up
    folder = embedpipe.extract(data, spec, cache_dir=tmp_path / "cache", run=run)
    X, _, meta = embedpipe.load(folder.path)
    assert len(X) == 16 and not any("loop" in p for p in meta["paths"])
    manifest = data / "manifest.csv"
    manifest.write_text("path,label\n" + "".join(f"{p},{p.split('/')[0]}\n" for p in meta["paths"]))
    listed = embedpipe.extract(manifest, spec, cache_dir=tmp_path / "cache", run=run)
    assert listed.computed == 0 and listed.num_images == 16  # the same files, through the same symlinks
    manifest.write_text(f"path,label\n../elsewhere/circles/{sorted(outside.iterdir())[0].name},circles\n")
    code, _, stderr = invoke("extract", str(manifest), "-b", "test_resnet", "--no-pretrained", "--device", "cpu",
                             "--cache-dir", str(tmp_path / "cache"))
    assert code == embedpipe.DataError.exit_code and "escapes the manifest's folder" in one_line(stderr)


def test_a_ledger_reason_never_names_another_datasets_file(tmp_path: Path) -> None:
    spec, run = _spec_run()
    first, second = tmp_path / "first", tmp_path / "second"
    for folder in (first, second):
        folder.mkdir()
        Image.new("RGB", (48, 48), (10, 200, 30)).save(folder / "fine.png")
        (folder / f"broken-in-{folder.name}.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    embedpipe.extract(first, spec, cache_dir=tmp_path / "cache", run=run)
    result = embedpipe.extract(second, spec, cache_dir=tmp_path / "cache", run=run)
    (path, reason), = result.failed
    assert path == "broken-in-second.png" and "first" not in reason and str(tmp_path) not in reason and "0x" not in reason
