"""embedpipe.explore: neighbours against a brute-force NumPy search, on arrays and on real extracted files."""

from __future__ import annotations

import csv
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image
import pytest

from embedpipe import BackboneSpec, ExploreError, RunConfig, extract, load
from embedpipe.explore import faiss_search, neighbors, search

from .conftest import CLASSES, make_tree


def brute_force(queries: np.ndarray, bank: np.ndarray, k: int, *, exclude_self: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The reference: float64 cosine similarities, a stable sort (ties to the lower index)."""
    q = queries.astype(np.float64) / np.linalg.norm(queries.astype(np.float64), axis=1, keepdims=True)
    b = bank.astype(np.float64) / np.linalg.norm(bank.astype(np.float64), axis=1, keepdims=True)
    sims = q @ b.T
    if exclude_self:
        np.fill_diagonal(sims, -np.inf)
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, order, 1), order


def clustered(n: int, d: int, *, spread: float, seed: int) -> np.ndarray:
    """Rows around a few centres: crowded neighbourhoods, like real embeddings."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((8, d))
    return (centres[rng.integers(0, 8, n)] + spread * rng.standard_normal((n, d))).astype(np.float32)


FP16_TOLERANCE = 1e-3  # float16 has 11 significant bits: 2^-10 ~ 1e-3 on values in [-1, 1]


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("exclude_self", [True, False])
def test_search_equals_brute_force(precision: str, exclude_self: bool) -> None:
    bank = clustered(700, 48, spread=0.4, seed=1)
    queries = bank if exclude_self else clustered(90, 48, spread=0.4, seed=2)
    # A small block so the search runs in many blocks, the last one partial.
    found = search(queries, bank, 7, exclude_self=exclude_self, device="cpu", precision=precision, block_bytes=4 * 700 * 33)
    sims, idx = brute_force(queries, bank, 7, exclude_self=exclude_self)
    assert found.precision == precision and found.indices.dtype == np.int64 and found.similarities.dtype == np.float32
    np.testing.assert_array_equal(found.indices, idx)
    np.testing.assert_allclose(found.similarities, sims, atol=FP16_TOLERANCE)
    if exclude_self:
        assert not (found.indices == np.arange(len(bank))[:, None]).any()


def test_low_precision_search_rechecks_what_its_bound_cannot_certify() -> None:
    """Neighbours closer than bf16 can tell apart: the bound notices those queries, and fp32 answers them."""
    bank = clustered(400, 32, spread=0.2, seed=3)
    found = search(bank, bank, 5, exclude_self=True, device="cpu", precision="bf16")
    assert 0 < found.rechecked < len(bank)  # some certified, some searched again
    _, idx = brute_force(bank, bank, 5, exclude_self=True)
    np.testing.assert_array_equal(found.indices, idx)


def test_search_refuses_what_it_cannot_answer() -> None:
    bank = clustered(10, 4, spread=0.1, seed=0)
    with pytest.raises(ExploreError, match="only 9 rows can be neighbours"):
        search(bank, bank, 10, exclude_self=True, device="cpu")
    with pytest.raises(ExploreError, match="same width"):
        search(bank[:, :3], bank, 2, device="cpu")
    with pytest.raises(ExploreError, match="unknown precision"):
        search(bank, bank, 2, device="cpu", precision="int8")


def test_faiss_backend_equals_brute_force() -> None:
    pytest.importorskip("faiss")
    bank = clustered(500, 40, spread=0.4, seed=4)
    for exclude_self in (True, False):
        found = faiss_search(bank, bank, 6, exclude_self=exclude_self)
        sims, idx = brute_force(bank, bank, 6, exclude_self=exclude_self)
        np.testing.assert_array_equal(found.indices, idx)
        np.testing.assert_allclose(found.similarities, sims, atol=FP16_TOLERANCE)


@pytest.fixture(scope="module")
def shapes_file(image_tree: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The synthetic tree embedded by test_resnet (random weights, 64 px): (exported file, cache folder)."""
    cache = tmp_path_factory.mktemp("explore-cache")
    spec = BackboneSpec(name="test_resnet", pretrained=False, preprocess={"input_size": 64}, precision="fp32", dtype="float32")
    result = extract(image_tree, spec, cache_dir=cache, run=RunConfig(device="cpu", batch_size=8, num_workers=0))
    return result.path, cache


def test_neighbors_of_a_file_equal_brute_force(shapes_file: tuple[Path, Path]) -> None:
    path, _ = shapes_file
    X, y, meta = load(path)
    found = neighbors(path, k=4, device="cpu")
    sims, idx = brute_force(X, X, 4, exclude_self=True)
    np.testing.assert_array_equal(found.indices, idx)
    np.testing.assert_allclose(found.similarities, sims, atol=FP16_TOLERANCE)
    records = found.records()
    assert len(records) == 4 * len(X) and records[0]["rank"] == 1 and records[3]["rank"] == 4
    first = records[0]
    assert first["query"] == meta["paths"][0] and first["neighbor"] == meta["paths"][idx[0, 0]]
    assert first["label"] == meta["class_names"][y[idx[0, 0]]] and first["split"] == meta["split"][idx[0, 0]]


def test_neighbors_of_new_images_go_through_the_cache(shapes_file: tuple[Path, Path], image_tree: Path, tmp_path: Path) -> None:
    path, cache = shapes_file
    queries = tmp_path / "new"
    queries.mkdir()
    picked = sorted((image_tree / "squares").iterdir())[:3]
    for i, image in enumerate(picked):  # the same bytes under new names: found at similarity 1, nothing recomputed
        shutil.copyfile(image, queries / f"query{i}{image.suffix}")
    found = neighbors(path, query=queries, k=2, cache_dir=cache, run=RunConfig(device="cpu", batch_size=8, num_workers=0))
    assert found.queries == [f"query{i}{p.suffix}" for i, p in enumerate(picked)]
    assert [found.paths[row[0]] for row in found.indices] == [f"squares/{p.name}" for p in picked]
    np.testing.assert_allclose(found.similarities[:, 0], 1.0, atol=1e-5)
    Xq, _, _ = load(found.query_file)
    X, _, _ = load(path)
    sims, idx = brute_force(Xq, X, 2)
    np.testing.assert_array_equal(found.indices, idx)


def test_cli_neighbors_writes_what_the_library_returns(shapes_file: tuple[Path, Path], tmp_path: Path) -> None:
    path, _ = shapes_file
    out = tmp_path / "n.csv"
    done = subprocess.run([sys.executable, "-m", "embedpipe", "neighbors", str(path), "--k", "3", "--device", "cpu", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "24 queries x 3 neighbours" in done.stderr
    with out.open() as handle:
        rows = list(csv.DictReader(handle))
    expected = neighbors(path, k=3, device="cpu").records()
    assert [(r["query"], int(r["rank"]), r["neighbor"]) for r in rows] == [(r["query"], r["rank"], r["neighbor"]) for r in expected]
    np.testing.assert_allclose([float(r["similarity"]) for r in rows], [r["similarity"] for r in expected], atol=1e-6)
    refused = subprocess.run([sys.executable, "-m", "embedpipe", "neighbors", str(path), "--k", "50", "--device", "cpu"],
                             capture_output=True, text=True, timeout=300)
    assert refused.returncode == ExploreError.exit_code and "pass --k between 1 and 23" in refused.stderr
    assert "Traceback" not in refused.stderr


# --------------------------------------------------------------------------- export


def _expected(path: Path) -> tuple[np.ndarray, np.ndarray, dict]:
    X, y, meta = load(path)
    assert meta["digests"] and len(meta["digests"]) == len(X)
    return X, y, meta


def test_export_parquet_reads_back_in_pyarrow_pandas_and_duckdb(shapes_file: tuple[Path, Path], tmp_path: Path) -> None:
    pq = pytest.importorskip("pyarrow.parquet")
    from embedpipe.explore import export, read_metadata

    path, _ = shapes_file
    X, y, meta = _expected(path)
    done = export(path, "parquet", tmp_path / "e.parquet")
    assert done.paths == [tmp_path / "e.parquet"] and done.rows == len(X) and done.dims == X.shape[1]
    table = pq.read_table(done.paths[0])
    assert table.column_names == ["row", "path", "label", "class", "split", "digest", "embedding"]
    assert str(table.schema.field("embedding").type) == f"fixed_size_list<element: float>[{X.shape[1]}]"
    np.testing.assert_array_equal(np.stack(table["embedding"].to_numpy(zero_copy_only=False)), X)  # bit for bit
    assert table["path"].to_pylist() == meta["paths"] and table["label"].to_pylist() == y.tolist()
    assert table["class"].to_pylist() == [meta["class_names"][v] for v in y]
    assert table["split"].to_pylist() == list(meta["split"]) and table["digest"].to_pylist() == meta["digests"]
    stored = read_metadata(done.paths[0])
    assert stored["attrs"]["cache_key"] == meta["cache_key"] and stored["attrs"]["class_names"] == meta["class_names"]

    pd = pytest.importorskip("pandas")
    frame = pd.read_parquet(done.paths[0])
    np.testing.assert_array_equal(np.stack(frame["embedding"].to_numpy()), X)
    assert frame["path"].tolist() == meta["paths"]

    duckdb = pytest.importorskip("duckdb")
    rows = duckdb.sql(f"SELECT path, split, embedding FROM '{done.paths[0]}' ORDER BY row").fetchall()
    assert [r[0] for r in rows] == meta["paths"] and [r[1] for r in rows] == list(meta["split"])
    np.testing.assert_array_equal(np.array([r[2] for r in rows], dtype=np.float32), X)
    counts = dict(duckdb.sql(f"SELECT class, count(*) FROM '{done.paths[0]}' GROUP BY class").fetchall())
    assert counts == {c: int((y == i).sum()) for i, c in enumerate(meta["class_names"])}


def test_export_npy_and_faiss_map_back_to_rows(shapes_file: tuple[Path, Path], tmp_path: Path) -> None:
    import json

    from embedpipe.explore import export

    path, _ = shapes_file
    X, y, meta = _expected(path)
    done = export(path, "npy", tmp_path / "e.npy")
    np.testing.assert_array_equal(np.load(done.paths[0]), X)
    sidecar = json.loads(done.paths[1].read_text())
    assert sidecar["rows"]["path"] == meta["paths"] and sidecar["rows"]["digest"] == meta["digests"]
    assert sidecar["format"] == "embedpipe-export" and sidecar["attrs"]["backbone"] == meta["backbone"]

    faiss = pytest.importorskip("faiss")
    done = export(path, "faiss", tmp_path / "e.faiss")
    index = faiss.read_index(str(done.paths[0]))
    assert index.ntotal == len(X)
    sims, ids = index.search(X / np.linalg.norm(X, axis=1, keepdims=True), 4)
    ref_sims, ref_idx = brute_force(X, X, 4)
    np.testing.assert_array_equal(ids[:, 0], np.arange(len(X)))  # each row finds itself: ids are row numbers
    np.testing.assert_allclose(sims, ref_sims, atol=FP16_TOLERANCE)
    rows = json.loads(done.paths[1].read_text())["rows"]
    assert [rows["path"][i] for i in ids[:, 1]] == [meta["paths"][j] for j in ref_idx[:, 1]]


def test_export_lance_round_trip(shapes_file: tuple[Path, Path], tmp_path: Path) -> None:
    lance = pytest.importorskip("lance")
    from embedpipe.explore import export, read_metadata

    path, _ = shapes_file
    X, _, meta = _expected(path)
    done = export(path, "lance", tmp_path / "e.lance")
    table = lance.dataset(str(done.paths[0])).to_table()
    np.testing.assert_array_equal(np.stack(table["embedding"].to_numpy(zero_copy_only=False)), X)
    assert table["path"].to_pylist() == meta["paths"]
    assert read_metadata(done.paths[0])["attrs"]["cache_key"] == meta["cache_key"]


def test_export_without_its_extra_names_what_to_install(shapes_file: tuple[Path, Path], tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from embedpipe.explore import export

    path, _ = shapes_file
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow now raises ImportError
    monkeypatch.setitem(sys.modules, "faiss", None)
    with pytest.raises(ExploreError, match=r"pip install 'embedpipe\[parquet\]'"):
        export(path, "parquet", tmp_path / "e.parquet")
    with pytest.raises(ExploreError, match=r"pip install 'embedpipe\[faiss\]'"):
        export(path, "faiss", tmp_path / "e.faiss")
    assert not list(tmp_path.iterdir())  # nothing half-written
    with pytest.raises(ExploreError, match="unknown export format"):
        export(path, "xml", tmp_path / "e.xml")


# --------------------------------------------------------------------------- audit: planted duplicates, leakage, label errors

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "coins", "hubble_deep_field", "immunohistochemistry", "retina",
          "stereo_motorcycle", "cell", "colorwheel", "logo", "horse", "text")


def _photo_tiles() -> list[tuple[str, str, "Image.Image"]]:
    """(class, name, image): the four quarters of real photos shipped with scikit-image; class = the photo."""
    skimage_data = pytest.importorskip("skimage.data")
    from PIL import Image

    tiles = []
    for name in PHOTOS:
        array = getattr(skimage_data, name)()
        array = array[0] if isinstance(array, tuple) else array  # stereo_motorcycle: (left, right, disparity)
        image = Image.fromarray(np.asarray(array)).convert("RGB")
        w, h = image.size
        for r in range(2):
            for c in range(2):
                tiles.append((name, f"{name}_{r}{c}", image.crop((c * w // 2, r * h // 2, (c + 1) * w // 2, (r + 1) * h // 2))))
    return tiles


def _copies(image: "Image.Image") -> dict[str, "Image.Image"]:
    """Near duplicates as they happen: re-encoded at another JPEG quality, resized, mirrored, a few pixels cropped."""
    import io

    from PIL import Image, ImageOps

    w, h = image.size
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=70)
    return {"jpeg": Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"), "resized": image.resize((w * 4 // 5, h * 4 // 5)),
            "flipped": ImageOps.mirror(image), "cropped": image.crop((4, 4, w - 4, h - 4))}


@pytest.fixture(scope="module")
def planted_photos(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str], set[str]]:
    """Real photo tiles with near-duplicates planted, embedded by the real offline Lite0.

    Returns:
        (exported file, copy path -> its original's path, copies planted in another split than their original).
    """
    root = tmp_path_factory.mktemp("planted")
    rng = np.random.default_rng(0)
    tiles = _photo_tiles()
    planted = set(rng.choice(len(tiles), 24, replace=False).tolist())
    rows, copies, crossing = [("path", "label", "split")], {}, set()
    for i, (label, name, image) in enumerate(tiles):
        split = ("train", "train", "test", "val")[i % 4]
        image.save(root / f"{name}.png")
        rows.append((f"{name}.png", label, split))
        if i in planted:
            for kind, copy in _copies(image).items():
                other = {"train": "test", "test": "train", "val": "train"}[split] if kind == "jpeg" else split
                copy.save(root / f"{name}-{kind}.png")
                rows.append((f"{name}-{kind}.png", label, other))
                copies[f"{name}-{kind}.png"] = f"{name}.png"
                if other != split:
                    crossing.add(f"{name}-{kind}.png")
    with (root / "manifest.csv").open("w", newline="") as handle:
        csv.writer(handle).writerows(rows)
    result = extract(root / "manifest.csv", "tf_efficientnet_lite0", cache_dir=root / "cache",
                     run=RunConfig(device="cpu", batch_size=32, num_workers=0))
    return result.path, copies, crossing


@pytest.mark.slow  # embeds 152 photo tiles with the real Lite0 (~40 s on 2 cores, once per module)
def test_audit_finds_planted_duplicates_and_every_leak(planted_photos: tuple[Path, dict[str, str], set[str]], tmp_path: Path) -> None:
    from embedpipe.explore import audit

    path, copies, crossing = planted_photos
    result = audit(path, out=tmp_path / "audit", device="cpu")
    group_of = {p: i for i, g in enumerate(result.duplicates) for p in g.paths}
    found = [c for c, original in copies.items() if c in group_of and group_of.get(original) == group_of[c]]
    related = set(copies) | set(copies.values())
    flagged = list(group_of)
    recall, precision = len(found) / len(copies), sum(p in related for p in flagged) / len(flagged)
    print(f"planted duplicates: recall {recall:.3f} ({len(found)}/{len(copies)}), precision {precision:.3f} ({len(flagged)} flagged)")
    assert recall >= 0.95 and precision >= 0.90
    leaked = {p for g in result.leakage for p in g.paths}
    assert crossing and crossing <= leaked  # every copy planted across splits is called leakage, with its original
    assert {copies[c] for c in crossing} <= leaked
    assert all(len(set(g.splits)) > 1 for g in result.leakage)
    assert result.exact_duplicates == 0 and not any(g.exact for g in result.duplicates)


def test_audit_names_identical_files_and_ranks_flipped_labels(image_tree: Path, tmp_path: Path) -> None:
    """Synthetic shapes (colour shows the class), test_resnet: identical files across splits, and flipped labels."""
    pytest.importorskip("cleanlab")
    from embedpipe.explore import audit

    root = make_tree(tmp_path / "shapes", per_class=30)
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.*"))
    rng = np.random.default_rng(1)
    flipped = set(rng.choice(len(files), 8, replace=False).tolist())
    rows = [("path", "label", "split")]
    for i, rel in enumerate(files):
        true = rel.split("/")[0]
        label = CLASSES[(CLASSES.index(true) + 1) % 3] if i in flipped else true
        rows.append((rel, label, ("train", "train", "train", "test", "val")[i % 5]))
    twins = [files[0], files[31]]  # byte-identical copies, placed in test
    for rel in twins:
        shutil.copyfile(root / rel, root / f"copy-{Path(rel).name}")
        rows.append((f"copy-{Path(rel).name}", rel.split("/")[0], "test"))
    with (root / "manifest.csv").open("w", newline="") as handle:
        csv.writer(handle).writerows(rows)
    spec = BackboneSpec(name="test_resnet", pretrained=False, preprocess={"input_size": 64}, precision="fp32", dtype="float32")
    path = extract(root / "manifest.csv", spec, cache_dir=tmp_path / "cache", run=RunConfig(device="cpu", batch_size=16, num_workers=0)).path
    # Random weights put every pair above 0.99: only identical embeddings count as duplicates here.
    result = audit(path, out=tmp_path / "audit", device="cpu", threshold=1.0, leakage_threshold=1.0)
    exact = [g for g in result.duplicates if g.exact]
    assert sorted(sorted(g.paths) for g in exact) == sorted(sorted([rel, f"copy-{Path(rel).name}"]) for rel in twins)
    assert result.exact_duplicates == 2 and all(g.leakage for g in exact)  # train (i % 5 == 0) vs test
    top = [issue.path for issue in result.label_issues[: 2 * len(flipped)]]
    hits = {files[i] for i in flipped} & set(top)
    print(f"planted label errors: {len(hits)}/{len(flipped)} in the top {2 * len(flipped)} of {len(result.label_issues)} findings")
    assert len(hits) >= 0.6 * len(flipped)
    for issue in result.label_issues:
        if issue.path in hits:
            assert issue.suggested == issue.path.split("/")[0]  # cleanlab suggests the true class back
    assert result.outliers and all(0 <= o.score <= 1 for o in result.outliers)


@pytest.mark.slow  # embeds 152 photo tiles with the real Lite0 (~40 s on 2 cores, once per module)
def test_cli_audit_and_its_page_in_headless_chromium(planted_photos: tuple[Path, dict[str, str], set[str]], tmp_path: Path) -> None:
    import json

    path, _, crossing = planted_photos
    out = tmp_path / "audit"
    done = subprocess.run([sys.executable, "-m", "embedpipe", "audit", str(path), "--out", str(out), "--device", "cpu"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("Leakage: ") and "nearest-neighbour similarity" in done.stdout
    stored = json.loads((out / "audit.json").read_text())
    assert stored["format"] == "embedpipe-audit" and stored["rows"] == 56 + 96
    assert crossing <= {p for g in stored["leakage"] for p in g["paths"]}
    page = (out / "audit.html").read_text()
    assert not re.search(r"""(src|href)=["']?(https?:|//)""", page) and "<script" not in page
    if shutil.which("chromium") is None:
        pytest.skip("chromium is not installed (apt-get install chromium; .ci/run installs it where apt works)")
    from .test_bench import _chromium

    seen, console = _chromium(out / "audit.html", tmp_path / "profile")
    assert seen is not None, "the page did not finish loading"
    assert seen["errors"] == [] and console == [] and seen["title"].startswith("embedpipe audit")
    assert seen["rows"] >= 10 and len(seen["images"]) >= 50
    for image in seen["images"]:
        assert image["complete"] and image["w"] > 20 and image["h"] > 20 and image["shown"] > 50  # decoded and laid out


# --------------------------------------------------------------------------- map


def test_map_pca_equals_scikit_learns_pca_of_the_normalised_rows(shapes_file: tuple[Path, Path], tmp_path: Path) -> None:
    from sklearn.decomposition import PCA

    from embedpipe.explore import map_embeddings

    path, _ = shapes_file
    X, y, meta = load(path)
    result = map_embeddings(path, out=tmp_path / "map", thumbnails=10)
    rows = X.astype(np.float64) / np.linalg.norm(X.astype(np.float64), axis=1, keepdims=True)  # documented: unit rows, not standardised
    reference = PCA(n_components=2, svd_solver="full").fit(rows)
    expected = reference.transform(rows)
    signs = np.sign(np.sum(result.coordinates * expected, axis=0))  # an axis's sign is a convention
    np.testing.assert_allclose(result.coordinates, expected * signs, atol=1e-6)
    np.testing.assert_allclose(result.explained_variance, reference.explained_variance_ratio_, rtol=1e-6)
    with (tmp_path / "map" / "map.csv").open() as handle:
        stored = list(csv.DictReader(handle))
    assert [r["path"] for r in stored] == meta["paths"] and [r["split"] for r in stored] == list(meta["split"])
    assert [r["label"] for r in stored] == [meta["class_names"][v] for v in y]
    np.testing.assert_allclose([[float(r["x"]), float(r["y"])] for r in stored], result.coordinates, rtol=1e-5, atol=1e-6)
    page = (tmp_path / "map" / "map.html").read_text()
    assert page.count('class="pt ') == len(X) and page.count("data:image/jpeg;base64,") == 10 == len(result.thumbnails)
    assert not re.search(r"""(src|href)=["']?(https?:|//)""", page) and "<script" not in page
    with Image.open(tmp_path / "map" / "map.png") as image:
        assert image.format == "PNG" and image.width > 400 and np.asarray(image.convert("L")).std() > 5


def test_map_umap_without_its_extra_is_one_line_naming_it(shapes_file: tuple[Path, Path], tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from embedpipe.explore import map_embeddings

    path, _ = shapes_file
    monkeypatch.setitem(sys.modules, "umap", None)
    with pytest.raises(ExploreError, match=r"pip install 'embedpipe\[umap\]'"):
        map_embeddings(path, out=tmp_path / "map", method="umap")
    assert not (tmp_path / "map").exists()
    code = ("import sys; sys.modules['umap'] = None; from embedpipe.cli import main; "
            f"sys.argv = ['embedpipe', 'map', {str(path)!r}, '--out', {str(tmp_path / 'm')!r}, '--method', 'umap']; main()")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == ExploreError.exit_code and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == ["error: UMAP maps needs umap, which is not installed: pip install 'embedpipe[umap]'"]


@pytest.mark.slow  # numba compiles UMAP's kernels on first use (~30 s on 2 cores)
def test_map_umap(shapes_file: tuple[Path, Path], tmp_path: Path) -> None:
    pytest.importorskip("umap")
    from embedpipe.explore import map_embeddings

    path, _ = shapes_file
    result = map_embeddings(path, out=tmp_path / "map", method="umap", seed=0)
    assert result.coordinates.shape == (24, 2) and np.isfinite(result.coordinates).all() and result.explained_variance is None
    assert (tmp_path / "map" / "map.html").read_text().count('class="pt ') == 24


def test_cli_map_and_its_page_in_headless_chromium(shapes_file: tuple[Path, Path], tmp_path: Path) -> None:
    path, _ = shapes_file
    out = tmp_path / "map"
    done = subprocess.run([sys.executable, "-m", "embedpipe", "map", str(path), "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("24 images mapped by PCA") and "24 with thumbnails" in done.stdout
    assert done.stdout.splitlines()[1:] == [str(out / name) for name in ("map.png", "map.html", "map.csv")]
    if shutil.which("chromium") is None:
        pytest.skip("chromium is not installed (apt-get install chromium; .ci/run installs it where apt works)")
    from .test_bench import _chromium

    seen, console = _chromium(out / "map.html", tmp_path / "profile")
    assert seen is not None, "the page did not finish loading"
    assert seen["errors"] == [] and console == [] and seen["title"].startswith("embedpipe map")
    assert seen["points"] == 24 and len(seen["images"]) == 24  # every point, each with its thumbnail
    for image in seen["images"]:
        assert image["complete"] and 20 < image["w"] <= 64 and 20 < image["h"] <= 64  # decoded; shown only on hover
