"""Input kinds beyond folders: tar shards, saved Hugging Face datasets, Parquet manifests, URLs over http and S3.

Every kind is checked against the same images as plain files: the same sha256 digests, the same
embeddings as timm's own forward on those files, and a shared cache that computes them once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.server
import io
import json
import socket
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import embedpipe
from embedpipe import BackboneSpec, RunConfig
from embedpipe.data import load_dataset
from embedpipe.errors import DataError

from .test_cli import embedpipe_cli
from .test_extract import reference_embeddings

CLASSES = ("circles", "squares", "stripes")


def _files(tree: Path) -> list[Path]:
    return sorted(p for p in tree.rglob("*") if p.is_file())


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def reference(image_tree: Path) -> dict[str, np.ndarray]:
    """digest -> timm's own embedding of that image file, for every file of the shared image tree."""
    spec = BackboneSpec(name="test_resnet", pretrained=False, preprocess={"input_size": 64}, precision="fp32", dtype="float32")
    files = _files(image_tree)
    return dict(zip(map(_sha, files), reference_embeddings(files, spec)))


def _check(result: embedpipe.extraction.ExtractResult, reference: dict[str, np.ndarray], n: int = 24) -> dict:
    """The export holds n rows whose embeddings are timm's forward on the files with the same bytes."""
    X, y, meta = embedpipe.load(result.path)
    assert X.shape[0] == n == len(meta["digests"])
    expected = np.stack([reference[d.decode() if isinstance(d, bytes) else d] for d in meta["digests"]])
    np.testing.assert_allclose(X, expected, rtol=1e-4, atol=1e-5)
    return {"X": X, "y": y, **meta}


def write_shards(tree: Path, folder: Path, shards: int = 3, *, label: str | None = "cls", corrupt: bool = False) -> list[Path]:
    """The tree's images spread over WebDataset shards ``shards-00000N.tar``: ``<class>/<stem>.<ext>`` plus a label member."""
    folder.mkdir(parents=True, exist_ok=True)
    files = _files(tree)
    written = []
    for s in range(shards):
        path = folder / f"shards-{s:06d}.tar"
        with tarfile.open(path, "w") as tar:
            for i, file in enumerate(files[s::shards]):
                cls = CLASSES.index(file.parent.name)
                members = {f"{file.parent.name}/{file.name}": file.read_bytes()}
                if label == "cls":
                    members[f"{file.parent.name}/{file.stem}.cls"] = str(cls).encode()
                elif label == "json":
                    members[f"{file.parent.name}/{file.stem}.json"] = json.dumps({"label": file.parent.name}).encode()
                if corrupt and s == 1 and i == 0:
                    members["bad/broken.jpg"] = b"\xff\xd8\xff\xe0 this is not a jpeg"
                    if label == "cls":
                        members["bad/broken.cls"] = b"0"
                for name, data in members.items():
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        written.append(path)
    return written


@pytest.mark.parametrize("form", ["path", "glob", "brace"])
def test_tar_shards_embed_like_the_files(image_tree: Path, tmp_path: Path, spec: BackboneSpec, run: RunConfig,
                                         reference: dict[str, np.ndarray], form: str) -> None:
    shards = write_shards(image_tree, tmp_path / "wds", shards=1 if form == "path" else 3)
    source = {"path": str(shards[0]), "glob": str(tmp_path / "wds" / "*.tar"),
              "brace": str(tmp_path / "wds" / "shards-{000000..000002}.tar")}[form]
    if form == "brace":
        run = dataclasses.replace(run, num_workers=2)  # the reader travels into DataLoader workers
    result = embedpipe.extract(source, spec, cache_dir=tmp_path / "cache", run=run)
    assert result.computed == 24 and not result.failed
    meta = _check(result, reference)
    assert meta["class_names"] == ["0", "1", "2"]  # .cls numbers keep their values
    assert all("::" in p and p.split("::")[0].endswith(".tar") for p in meta["paths"])
    assert [int(v) for v in meta["y"]] == [CLASSES.index(p.split("::")[1].split("/")[0]) for p in meta["paths"]]
    again = embedpipe.extract(source, spec, cache_dir=tmp_path / "cache", run=run)
    assert again.cache_hit and again.computed == 0


def test_tar_labels_from_json_or_none(image_tree: Path, tmp_path: Path) -> None:
    write_shards(image_tree, tmp_path / "json", label="json")
    write_shards(image_tree, tmp_path / "none", label=None)
    named = load_dataset(tmp_path / "json" / "shards-{000000..000002}.tar")
    assert named.class_names == CLASSES and named.layout == "tar" and len(named) == 24
    assert [CLASSES[k] for k in named.labels] == [r.split("::")[1].split("/")[0] for r in named.relpaths]
    bare = load_dataset(str(tmp_path / "none" / "*.tar"))
    assert not bare.labelled and (bare.labels == -1).all() and not bare.has_split


def test_corrupt_tar_member_is_ledgered_and_rows_stay_aligned(image_tree: Path, tmp_path: Path, spec: BackboneSpec, run: RunConfig,
                                                              reference: dict[str, np.ndarray]) -> None:
    write_shards(image_tree, tmp_path / "wds", corrupt=True)
    result = embedpipe.extract(tmp_path / "wds" / "shards-{000000..000002}.tar", spec, cache_dir=tmp_path / "cache", run=run)
    assert [where for where, _ in result.failed] == ["shards-000001.tar::bad/broken.jpg"]
    assert result.num_images == 24
    meta = _check(result, reference)  # every kept row's embedding is its own image's
    assert "shards-000001.tar::bad/broken.jpg" not in meta["paths"]


def test_missing_shard_and_truncated_shard_are_one_line_errors(image_tree: Path, tmp_path: Path) -> None:
    shards = write_shards(image_tree, tmp_path / "wds")
    with pytest.raises(DataError, match="shards-000003.tar"):
        load_dataset(tmp_path / "wds" / "shards-{000000..000003}.tar")
    done = embedpipe_cli("extract", str(tmp_path / "wds" / "shards-{000000..000003}.tar"), "--cache-dir", str(tmp_path / "c"))
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 10 and len(lines) == 1 and "shards-000003.tar" in lines[0], done.stderr
    data = shards[2].read_bytes()
    shards[2].write_bytes(data[: len(data) // 2 + 100])  # cut inside a member
    with pytest.raises(DataError, match="shards-000002.tar") as info:
        load_dataset(tmp_path / "wds" / "shards-{000000..000002}.tar")
    assert "\n" not in str(info.value)


def test_same_images_through_folder_tar_and_parquet_compute_once(image_tree: Path, tmp_path: Path, spec: BackboneSpec, run: RunConfig,
                                                                 reference: dict[str, np.ndarray]) -> None:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    cache = tmp_path / "cache"
    folder = embedpipe.extract(image_tree, spec, cache_dir=cache, run=run)
    write_shards(image_tree, tmp_path / "wds")
    tar = embedpipe.extract(tmp_path / "wds" / "*.tar", spec, cache_dir=cache, run=run)
    files = _files(image_tree)
    pq.write_table(pa.table({"image": [f.read_bytes() for f in files], "label": [f.parent.name for f in files]}),
                   tmp_path / "images.parquet", row_group_size=5)
    table = embedpipe.extract(tmp_path / "images.parquet", spec, cache_dir=cache, run=run)
    assert (folder.computed, tar.computed, table.computed) == (24, 0, 0)
    assert tar.reused == table.reused == 24
    by_digest = {}
    for result in (folder, tar, table):
        meta = _check(result, reference)
        for digest, row in zip(meta["digests"], meta["X"]):
            by_digest.setdefault(digest, []).append(row)
    assert len(by_digest) == 24 and all(len(rows) == 3 and np.array_equal(rows[0], rows[2]) for rows in by_digest.values())
    assert embedpipe.load(table.path)[2]["class_names"] == list(CLASSES)


def test_saved_hugging_face_dataset(image_tree: Path, tmp_path: Path, spec: BackboneSpec, run: RunConfig,
                                    reference: dict[str, np.ndarray]) -> None:
    datasets = pytest.importorskip("datasets", reason="the datasets extra is not installed")
    files = _files(image_tree)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list(CLASSES))})

    def part(chosen: list[Path]) -> object:
        return datasets.Dataset.from_dict({"image": [{"bytes": f.read_bytes(), "path": f.name} for f in chosen],
                                           "label": [CLASSES.index(f.parent.name) for f in chosen]}, features=features)

    datasets.DatasetDict({"train": part(files[::2]), "validation": part(files[1::2])}).save_to_disk(str(tmp_path / "hf"))
    loaded = load_dataset(tmp_path / "hf")
    assert loaded.layout == "hf" and loaded.class_names == CLASSES and loaded.split_source == "given"
    assert sorted(set(loaded.splits)) == ["train", "val"]
    result = embedpipe.extract(tmp_path / "hf", spec, cache_dir=tmp_path / "cache", run=run)
    meta = _check(result, reference)
    want = {_sha(f): CLASSES.index(f.parent.name) for f in files}
    assert [want[d] for d in meta["digests"]] == [int(v) for v in meta["y"]]


def test_parquet_manifest_of_relative_paths(image_tree: Path, tmp_path: Path, spec: BackboneSpec, run: RunConfig,
                                            reference: dict[str, np.ndarray]) -> None:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    files = _files(image_tree)
    rel = [f.relative_to(image_tree.parent).as_posix() for f in files]
    pq.write_table(pa.table({"path": rel, "label": [CLASSES.index(f.parent.name) for f in files]}), image_tree.parent / "m.parquet")
    try:
        dataset = load_dataset(image_tree.parent / "m.parquet")
        assert dataset.reader is None  # local files keep the plain-file fast path
        result = embedpipe.extract(image_tree.parent / "m.parquet", spec, cache_dir=tmp_path / "cache", run=run)
        _check(result, reference)
        pq.write_table(pa.table({"path": ["../escape.png"]}), image_tree.parent / "m.parquet")
        with pytest.raises(DataError, match="escapes"):
            load_dataset(image_tree.parent / "m.parquet")
    finally:
        (image_tree.parent / "m.parquet").unlink()


class _Counting(http.server.SimpleHTTPRequestHandler):
    hits: list[str] = []

    def do_GET(self) -> None:  # noqa: N802
        type(self).hits.append(self.path)
        super().do_GET()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def http_root(image_tree: Path) -> Iterator[str]:
    """A localhost HTTP server over the image tree, in a thread, for the test's duration."""
    handler = type("Handler", (_Counting,), {"hits": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), lambda *a: handler(*a, directory=str(image_tree)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", handler.hits
    finally:
        server.shutdown()
        server.server_close()


def test_parquet_manifest_of_http_urls(image_tree: Path, tmp_path: Path, spec: BackboneSpec, run: RunConfig,
                                       reference: dict[str, np.ndarray], http_root: tuple[str, list[str]]) -> None:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    root, hits = http_root
    files = _files(image_tree)
    urls = [f"{root}/{f.relative_to(image_tree).as_posix()}" for f in files]
    pq.write_table(pa.table({"path": urls, "label": [f.parent.name for f in files]}), tmp_path / "urls.parquet")
    result = embedpipe.extract(tmp_path / "urls.parquet", spec, cache_dir=tmp_path / "cache", run=run)
    meta = _check(result, reference)
    assert meta["paths"] == sorted(urls) and meta["class_names"] == list(CLASSES)
    before = len(hits)
    again = embedpipe.extract(tmp_path / "urls.parquet", spec, cache_dir=tmp_path / "cache", run=run)
    assert again.cache_hit and again.computed == 0
    assert len(hits) - before == 24  # URLs have no stat: fetched and hashed again on every run, as documented


def test_unreachable_url_is_a_one_line_error(tmp_path: Path, http_root: tuple[str, list[str]]) -> None:
    root, _ = http_root
    (tmp_path / "m.csv").write_text(f"path,label\n{root}/nothere.png,a\n")
    done = embedpipe_cli("extract", str(tmp_path / "m.csv"), "--cache-dir", str(tmp_path / "c"), "-b", "test_resnet",
                         "--no-pretrained")
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 10 and len(lines) == 1 and f"{root}/nothere.png" in lines[0] and "404" in lines[0], done.stderr
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]  # a port nothing listens on
    with pytest.raises(DataError, match=f"127.0.0.1:{closed}/m.csv"):
        load_dataset(f"http://127.0.0.1:{closed}/m.csv")


@pytest.fixture
def s3(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, object]]:
    """A moto S3 server on localhost (a real HTTP endpoint, not a mock of fsspec) and a boto3 client for it."""
    pytest.importorskip("s3fs", reason="the remote extra is not installed")
    server_module = pytest.importorskip("moto.server", reason="moto[server] is not installed")
    import boto3

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = server_module.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)
    client = boto3.client("s3", endpoint_url=endpoint)
    client.create_bucket(Bucket="images")
    try:
        yield endpoint, client
    finally:
        server.stop()


def test_s3_shards_and_manifest_on_a_local_endpoint(image_tree: Path, tmp_path: Path, spec: BackboneSpec, run: RunConfig,
                                                    reference: dict[str, np.ndarray], s3: tuple[str, object],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    endpoint, client = s3
    for shard in write_shards(image_tree, tmp_path / "wds"):
        client.upload_file(str(shard), "images", f"wds/{shard.name}")
    files = _files(image_tree)
    for f in files:
        client.upload_file(str(f), "images", f"tree/{f.relative_to(image_tree).as_posix()}")
    rows = "".join(f"{f.relative_to(image_tree).as_posix()},{f.parent.name}\n" for f in files)
    client.put_object(Bucket="images", Key="tree/manifest.csv", Body=f"path,label\n{rows}".encode())
    cache = tmp_path / "cache"
    options = {"endpoint_url": endpoint}
    shards = embedpipe.extract("s3://images/wds/shards-{000000..000002}.tar", spec, cache_dir=cache, run=run, storage_options=options)
    assert shards.computed == 24
    _check(shards, reference)
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)  # the other way in: the endpoint from the environment
    manifest = embedpipe.extract("s3://images/tree/manifest.csv", spec, cache_dir=cache, run=run)
    assert manifest.computed == 0 and manifest.reused == 24
    meta = _check(manifest, reference)
    assert meta["class_names"] == list(CLASSES)
    again = embedpipe.extract("s3://images/wds/*.tar", spec, cache_dir=cache, run=run)
    assert again.computed == 0
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    done = embedpipe_cli("extract", "s3://images/wds/shards-{000000..000002}.tar", "--storage-option", f"endpoint_url={endpoint}",
                         "-b", "test_resnet", "--no-pretrained", "--img-size", "64", "--workers", "0", "--cache-dir", str(cache))
    assert done.returncode == 0, done.stderr
    assert embedpipe.load(done.stdout.strip())[0].shape[0] == 24
    with pytest.raises(DataError, match="s3://images/wds/shards-000003.tar") as info:
        load_dataset("s3://images/wds/shards-{000002..000003}.tar", storage_options=options)
    assert "\n" not in str(info.value)
