"""Inputs: dataset layouts, the seeded split, bad-input errors, image decoding and preprocessing.

Everything is written to tmp_path as real files; nothing is mocked. Layout tests
write tiny images (the loader only looks at names), decoding tests check pixels
against values computed here, and the preprocessing tests compare against timm's
own resolver and transform.
"""

from __future__ import annotations

import csv
import os
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from embedpipe.config import SplitConfig
from embedpipe.data import UNLABELLED, Dataset, load_dataset
from embedpipe.errors import DataError
from embedpipe.preprocess import decode_image, eval_transform, normalize, resize_target, resolve_preprocess

RED, GREEN, BLUE, YELLOW = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)
WHITE = (255, 255, 255)


# ---------------------------------------------------------------- helpers


def put_image(path: Path, colour: tuple[int, int, int] = (120, 60, 30), size: tuple[int, int] = (4, 4)) -> Path:
    """A small real image at ``path``, its format taken from the extension."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, format="JPEG" if path.suffix.lower() in (".jpg", ".jpeg") else None)
    return path


def put_text(path: Path, text: str = "not an image") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def write_manifest(path: Path, rows: list[list[str]], *, encoding: str = "utf-8") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding=encoding) as handle:
        csv.writer(handle).writerows(rows)
    return path


def relpaths(dataset: Dataset) -> list[str]:
    return [r.relpath for r in dataset.records]


def by_relpath(dataset: Dataset) -> dict[str, tuple[int, str | None]]:
    return {r.relpath: (r.label, r.split) for r in dataset.records}


def quadrants(size: tuple[int, int] = (40, 30)) -> np.ndarray:
    """uint8 (H, W, 3): red top-left, green top-right, blue bottom-left, yellow bottom-right."""
    w, h = size
    array = np.zeros((h, w, 3), dtype=np.uint8)
    array[: h // 2, : w // 2] = RED
    array[: h // 2, w // 2 :] = GREEN
    array[h // 2 :, : w // 2] = BLUE
    array[h // 2 :, w // 2 :] = YELLOW
    return array


def quadrant_centres(array: np.ndarray) -> list[tuple[int, ...]]:
    h, w = array.shape[:2]
    points = [(h // 4, w // 4), (h // 4, 3 * w // 4), (3 * h // 4, w // 4), (3 * h // 4, 3 * w // 4)]
    return [tuple(int(v) for v in array[y, x]) for y, x in points]


def rgb(image: Image.Image) -> np.ndarray:
    assert image.mode == "RGB"
    return np.asarray(image)


# ---------------------------------------------------------------- 1. layouts


def test_image_folder_tree(tmp_path: Path) -> None:
    root = tmp_path / "pets"
    # created out of order, so sorted output is the loader's doing
    put_image(root / "cats" / "b.png")
    put_image(root / "cats" / "A.JPG")  # upper-case extension counts
    put_image(root / "cats" / "sub" / "deep" / "c.jpeg")  # nested inside a class folder
    put_image(root / "ants" / "z.webp")
    put_image(root / "bees" / "x.bmp")
    put_image(root / "bees" / "y.tif")
    # ignored: hidden files and folders, non-image extensions, a folder with no images
    put_image(root / "cats" / ".hidden.png")
    put_image(root / "cats" / ".cache" / "thumb.png")
    put_image(root / ".git" / "objects" / "blob.png")
    put_text(root / "cats" / "notes.txt")
    put_text(root / "cats" / "Thumbs.db")
    put_text(root / "docs" / "README.md")
    put_text(root / "LICENSE.txt")

    dataset = load_dataset(root)

    assert dataset.layout == "folder"
    assert dataset.root == root.resolve()
    assert dataset.class_names == ("ants", "bees", "cats")
    assert relpaths(dataset) == [
        "ants/z.webp",
        "bees/x.bmp",
        "bees/y.tif",
        "cats/A.JPG",
        "cats/b.png",
        "cats/sub/deep/c.jpeg",
    ]
    assert [r.label for r in dataset.records] == [0, 1, 1, 2, 2, 2]
    for record in dataset.records:
        assert record.path.is_absolute() and record.path.is_file()
        assert record.path == root.resolve() / record.relpath
        assert "\\" not in record.relpath
    # labelled, no split given: a seeded split is made and recorded
    assert dataset.split_source == "seeded"
    assert dataset.split_config == SplitConfig()
    assert all(r.split in ("train", "val", "test") for r in dataset.records)


def test_split_folders(tmp_path: Path) -> None:
    root = tmp_path / "splits"
    put_image(root / "train" / "bird" / "t1.png")
    put_image(root / "train" / "bird" / "t2.png")
    put_image(root / "train" / "cat" / "t3.png")
    put_image(root / "val" / "cat" / "v1.png")
    put_image(root / "val" / "cat" / "more" / "v2.png")
    put_image(root / "test" / "dog" / "s1.png")  # a class only the test split has
    put_image(root / "test" / ".hidden" / "s2.png")
    put_text(root / "train" / "bird" / "labels.txt")

    dataset = load_dataset(root, split=SplitConfig(seed=7))

    assert dataset.layout == "split-folder"
    assert dataset.class_names == ("bird", "cat", "dog")  # union over splits, sorted
    assert by_relpath(dataset) == {
        "test/dog/s1.png": (2, "test"),
        "train/bird/t1.png": (0, "train"),
        "train/bird/t2.png": (0, "train"),
        "train/cat/t3.png": (1, "train"),
        "val/cat/more/v2.png": (1, "val"),
        "val/cat/v1.png": (1, "val"),
    }
    assert relpaths(dataset) == sorted(relpaths(dataset))
    assert dataset.split_source == "given"
    assert dataset.split_config is None  # the given split is kept, not re-drawn


def test_manifest_relative_to_its_folder_with_bom_and_loose_header(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = tmp_path / "data"
    put_image(data / "imgs" / "a.jpg")
    put_image(data / "imgs" / "b.png")
    put_image(data / "imgs" / "sub" / "c.png")
    put_image(data / "unlisted.png")  # only listed files count
    manifest = write_manifest(
        data / "list.csv",
        [
            [" Path ", "LABEL", " Split"],
            ["imgs/b.png", "dog", "val"],
            ["./imgs/a.jpg", " cat ", "TRAIN"],
            ["imgs/sub/c.png", "cat", "test"],
        ],
        encoding="utf-8-sig",  # Excel writes a BOM
    )
    assert manifest.read_bytes().startswith(b"\xef\xbb\xbf")
    monkeypatch.chdir(tmp_path)  # paths resolve against the manifest, not the working directory

    dataset = load_dataset("data/list.csv")

    assert dataset.layout == "manifest"
    assert dataset.root == manifest.resolve()
    assert dataset.name == "list"
    assert dataset.class_names == ("cat", "dog")
    assert by_relpath(dataset) == {
        "imgs/a.jpg": (0, "train"),
        "imgs/b.png": (1, "val"),
        "imgs/sub/c.png": (0, "test"),
    }
    assert relpaths(dataset) == sorted(relpaths(dataset))
    assert [r.path for r in dataset.records] == [(data / p).resolve() for p in relpaths(dataset)]
    assert dataset.split_source == "given"


def test_manifest_without_split_is_split_by_seed(tmp_path: Path) -> None:
    rows = [["path", "label"]]
    for i in range(10):
        put_image(tmp_path / f"{i}.png")
        rows.append([f"{i}.png", "even" if i % 2 == 0 else "odd"])
    manifest = write_manifest(tmp_path / "m.csv", rows)

    config = SplitConfig(val_fraction=0.2, test_fraction=0.2, seed=3)
    dataset = load_dataset(manifest, split=config)

    assert dataset.split_source == "seeded"
    assert dataset.split_config == config
    assert dataset.describe()["split_config"] == {"val_fraction": 0.2, "test_fraction": 0.2, "seed": 3}
    for label in (0, 1):
        splits = Counter(r.split for r in dataset.records if r.label == label)
        assert splits == {"train": 3, "val": 1, "test": 1}


def test_manifest_without_labels_is_unlabelled(tmp_path: Path) -> None:
    put_image(tmp_path / "a.png")
    put_image(tmp_path / "b.png")
    manifest = write_manifest(tmp_path / "m.csv", [["path"], ["b.png"], ["a.png"]])

    dataset = load_dataset(manifest)

    assert relpaths(dataset) == ["a.png", "b.png"]
    assert [r.label for r in dataset.records] == [UNLABELLED, UNLABELLED]
    assert [r.split for r in dataset.records] == [None, None]
    assert not dataset.labelled and dataset.split_source == "none"


def test_plain_folder_is_unlabelled(tmp_path: Path) -> None:
    root = tmp_path / "photos"
    for name in ("b.jpg", "a.png", "C.PNG", "d.gif"):
        put_image(root / name)
    put_image(root / ".DS_Store.png")
    put_text(root / "index.html")
    put_text(root / "thumbs" / "list.txt")  # a sub-folder without images does not make classes

    dataset = load_dataset(root, split=SplitConfig(seed=1))

    assert dataset.layout == "unlabelled"
    assert relpaths(dataset) == ["C.PNG", "a.png", "b.jpg", "d.gif"]
    assert all(r.label == UNLABELLED and r.split is None for r in dataset.records)
    assert dataset.class_names == ()
    assert not dataset.has_split
    assert dataset.split_source == "none" and dataset.split_config is None


def test_listing_is_sorted_by_whole_path_with_each_files_stat_key(tmp_path: Path) -> None:
    """A folder's listing stats each file as it lists it; its order and keys are what a sort and os.stat give."""
    root = tmp_path / "nested"
    names = ["a.png", "a-b.png", "a/x.png", "a/b/y.png", "a/b-c.png", "a0.png", "Z/q.png", "a/b/z/w.png", "a/b.png"]
    for name in names:
        put_image(root / "class" / name)
    put_text(root / "class" / "a" / "notes.txt")
    put_image(root / "class" / "a" / ".hidden.png")
    (root / "class" / "a" / "gone.txt").symlink_to(tmp_path / "nowhere")  # a broken link that is no image: not ours

    dataset = load_dataset(root)

    expected = sorted(f"class/{name}" for name in names)
    assert list(dataset.relpaths) == expected  # "a-b.png" before "a/...", "a/b-c.png" before "a/b/..."
    assert dataset.stats is not None and dataset.stats.dtype == np.int64
    by_stat = np.array([[st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
                        for st in (os.stat(root / relpath) for relpath in expected)])
    np.testing.assert_array_equal(dataset.stats, by_stat)

    (root / "class" / "a" / "lost.png").symlink_to(tmp_path / "nowhere")
    with pytest.raises(DataError, match="lost.png"):
        load_dataset(root)

    classes = tmp_path / "classes"  # class folders listed in name order, rows sorted by path: the keys follow the rows
    for relpath in ("a/1.png", "a-b/2.png", "a-b/3.png", "a/4.png"):
        put_image(classes / relpath, size=(2 + len(relpath), 2))
    dataset = load_dataset(classes)
    assert list(dataset.relpaths) == ["a-b/2.png", "a-b/3.png", "a/1.png", "a/4.png"]
    assert dataset.labels.tolist() == [1, 1, 0, 0]
    np.testing.assert_array_equal(dataset.stats[:, 3], [os.stat(classes / r).st_ino for r in dataset.relpaths])


# ---------------------------------------------------------------- 2. the seeded split


def make_classes(root: Path, sizes: dict[str, int], *, start: int = 0) -> Path:
    for name, n in sizes.items():
        for i in range(start, start + n):
            put_image(root / name / f"{name}_{i:03d}.png", size=(2, 2))
    return root


@pytest.fixture(scope="module")
def uneven_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Classes of 30, 17, 11 and 1 images."""
    return make_classes(tmp_path_factory.mktemp("split") / "tree", {"a": 30, "b": 17, "c": 11, "solo": 1})


def test_split_is_deterministic_per_seed(uneven_tree: Path) -> None:
    first = by_relpath(load_dataset(uneven_tree, split=SplitConfig(seed=0)))
    again = by_relpath(load_dataset(uneven_tree, split=SplitConfig(seed=0)))
    other = by_relpath(load_dataset(uneven_tree, split=SplitConfig(seed=1)))

    assert first == again
    moved = [p for p in first if first[p][1] != other[p][1]]
    assert len(moved) >= 10  # of 59 images; a new seed re-draws the split
    assert {p: first[p][0] for p in first} == {p: other[p][0] for p in other}  # labels never depend on the seed


@pytest.mark.parametrize("val_fraction,test_fraction", [(0.1, 0.2), (0.25, 0.15)])
def test_split_is_stratified(uneven_tree: Path, val_fraction: float, test_fraction: float) -> None:
    config = SplitConfig(val_fraction=val_fraction, test_fraction=test_fraction, seed=5)
    dataset = load_dataset(uneven_tree, split=config)

    assert dataset.split_config == config
    for label, name in enumerate(dataset.class_names):
        n = sum(1 for r in dataset.records if r.label == label)
        counts = Counter(r.split for r in dataset.records if r.label == label)
        if name == "solo":
            assert counts == {"train": 1}  # a single image stays in train
            continue
        assert counts["test"] == round(n * test_fraction), name
        assert counts["val"] == round(n * val_fraction), name
        assert counts["train"] == n - counts["test"] - counts["val"], name


def test_single_image_class_stays_in_train_even_with_large_fractions(tmp_path: Path) -> None:
    root = make_classes(tmp_path / "t", {"big": 10, "one": 1})

    dataset = load_dataset(root, split=SplitConfig(val_fraction=0.3, test_fraction=0.6))

    assert [r.split for r in dataset.records if r.relpath.startswith("one/")] == ["train"]
    big = Counter(r.split for r in dataset.records if r.relpath.startswith("big/"))
    assert big == {"test": 6, "val": 3, "train": 1}


def test_adding_images_keeps_existing_assignments(tmp_path: Path) -> None:
    sizes = {"a": 40, "b": 40}
    config = SplitConfig(val_fraction=0.1, test_fraction=0.2, seed=11)
    root = make_classes(tmp_path / "tree", sizes)
    before = by_relpath(load_dataset(root, split=config))

    make_classes(root, {"a": 5, "b": 5}, start=40)  # five new images per class
    after = by_relpath(load_dataset(root, split=config))

    assert len(after) == 90 and set(before) <= set(after)
    moved = [p for p in before if before[p] != after[p]]
    # only images at a split boundary may move: a re-shuffle would move about half
    assert len(moved) <= 8, moved
    for name in sizes:
        kept = [p for p in before if p.startswith(f"{name}/") and p not in moved]
        assert len(kept) >= 36, name
        for split in ("train", "val", "test"):  # every split keeps most of its images
            was = [p for p in before if p.startswith(f"{name}/") and before[p][1] == split]
            assert sum(after[p][1] == split for p in was) >= len(was) - 2, (name, split)


# ---------------------------------------------------------------- 3. bad inputs


def _missing(tmp: Path) -> Path:
    return tmp / "does-not-exist"


def _not_csv(tmp: Path) -> Path:
    return put_text(tmp / "images.txt")


def _empty_folder(tmp: Path) -> Path:
    (tmp / "empty").mkdir()
    return tmp / "empty"


def _only_non_images(tmp: Path) -> Path:
    put_text(tmp / "docs" / "a.txt")
    put_text(tmp / "docs" / "cls" / "b.csv")
    put_image(tmp / "docs" / ".hidden.png")
    return tmp / "docs"


def _split_and_other_folders(tmp: Path) -> Path:
    put_image(tmp / "ds" / "train" / "cat" / "a.png")
    put_image(tmp / "ds" / "extras" / "cat" / "b.png")
    return tmp / "ds"


def _loose_beside_classes(tmp: Path) -> Path:
    put_image(tmp / "ds" / "cat" / "a.png")
    put_image(tmp / "ds" / "stray.jpg")
    return tmp / "ds"


def _loose_beside_split_folders(tmp: Path) -> Path:
    put_image(tmp / "ds" / "train" / "cat" / "a.png")
    put_image(tmp / "ds" / "stray.jpg")
    return tmp / "ds"


def _loose_inside_split_folder(tmp: Path) -> Path:
    put_image(tmp / "ds" / "train" / "cat" / "a.png")
    put_image(tmp / "ds" / "train" / "stray.jpg")
    return tmp / "ds"


def _manifest(tmp: Path, rows: list[list[str]], images: tuple[str, ...] = ("a.png", "b.png")) -> Path:
    for name in images:
        put_image(tmp / "data" / name)
    return write_manifest(tmp / "data" / "m.csv", rows)


BAD_INPUTS: dict[str, tuple[Callable[[Path], Path], tuple[str, ...]]] = {
    "missing path": (_missing, ("does-not-exist", "does not exist")),
    "file not csv": (_not_csv, ("images.txt", "not a .csv")),
    "empty folder": (_empty_folder, ("no images found", "empty")),
    "only non-images": (_only_non_images, ("no images found", ".jpg")),
    "split and other folders": (_split_and_other_folders, ("mixes split folders", "extras", "train")),
    "loose beside classes": (_loose_beside_classes, ("loose images", "stray.jpg")),
    "loose beside split folders": (_loose_beside_split_folders, ("loose images", "stray.jpg", "split folders")),
    "loose inside split folder": (_loose_inside_split_folder, ("outside class folders", "stray.jpg")),
    "no path column": (
        lambda t: _manifest(t, [["file", "label"], ["a.png", "x"]]),
        ("no 'path' column", "file, label"),
    ),
    "empty manifest": (lambda t: _manifest(t, []), ("no 'path' column",)),
    "path escapes with ..": (
        lambda t: _manifest(t, [["path", "label"], ["a.png", "x"], ["../outside.png", "x"]]),
        ("escapes", "'../outside.png'", "m.csv:3"),
    ),
    "absolute path outside": (
        lambda t: _manifest(t, [["path", "label"], [str(put_image(t / "elsewhere" / "o.png")), "x"]]),
        ("escapes", "o.png", "m.csv:2"),
    ),
    "listed files missing": (
        lambda t: _manifest(
            t, [["path", "label"], ["a.png", "x"], ["gone1.png", "x"], ["b.png", "y"], ["gone2.png", "y"]]
        ),
        ("2 listed file(s) do not exist", "gone1.png", "line 3"),
    ),
    "empty path": (lambda t: _manifest(t, [["path", "label"], ["a.png", "x"], ["", "y"]]), ("empty path", "m.csv:3")),
    "empty label": (
        lambda t: _manifest(t, [["path", "label"], ["a.png", "x"], ["b.png", "  "]]),
        ("empty label", "m.csv:3"),
    ),
    "invalid split": (
        lambda t: _manifest(t, [["path", "label", "split"], ["a.png", "x", "train"], ["b.png", "y", "training"]]),
        ("'training'", "not one of", "m.csv:3"),
    ),
    "duplicate rows": (
        lambda t: _manifest(t, [["path", "label"], ["a.png", "x"], ["b.png", "y"], ["./a.png", "x"]]),
        ("a.png", "listed 2 times"),
    ),
    "more fields than header": (
        lambda t: _manifest(t, [["path", "label"], ["a.png", "x"], ["b.png", "y", "surplus"]]),
        ("more fields than the header", "m.csv:3"),
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_raises_one_line_data_error(tmp_path: Path, case: str) -> None:
    build, keywords = BAD_INPUTS[case]
    source = build(tmp_path)

    with pytest.raises(DataError) as info:
        load_dataset(source)

    message = str(info.value)
    assert "\n" not in message and "\r" not in message
    for keyword in keywords:
        assert keyword in message, (keyword, message)


def test_manifest_not_utf8_raises_data_error(tmp_path: Path) -> None:
    put_image(tmp_path / "café.png")
    manifest = tmp_path / "m.csv"
    manifest.write_bytes("path,label\ncafé.png,x\n".encode("latin-1"))

    with pytest.raises(DataError, match="not a readable CSV file") as info:
        load_dataset(manifest)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "val_fraction,test_fraction,keywords",
    [
        (0.5, 0.5, ("leave no training images", "less than 1")),
        (0.6, 0.7, ("leave no training images",)),
        (1.0, 0.0, ("[0, 1)",)),
        (-0.1, 0.2, ("[0, 1)",)),
    ],
)
def test_invalid_fractions_raise(
    uneven_tree: Path, val_fraction: float, test_fraction: float, keywords: tuple[str, ...]
) -> None:
    with pytest.raises(DataError) as info:
        load_dataset(uneven_tree, split=SplitConfig(val_fraction=val_fraction, test_fraction=test_fraction))
    message = str(info.value)
    assert "\n" not in message
    for keyword in keywords:
        assert keyword in message, (keyword, message)


# ---------------------------------------------------------------- 4. decoding


@pytest.mark.parametrize(
    "suffix,save_args,tolerance",
    [
        (".jpg", {"quality": 95}, 12),
        (".png", {}, 0),
        (".webp", {"lossless": True}, 0),
        (".bmp", {}, 0),
        (".gif", {}, 0),
        (".tif", {}, 0),
    ],
)
def test_formats_decode_to_rgb_with_their_pixels(tmp_path: Path, suffix: str, save_args: dict, tolerance: int) -> None:
    source = quadrants((40, 30))
    path = tmp_path / f"q{suffix}"
    Image.fromarray(source).save(path, **save_args)

    image = decode_image(path)

    assert image.mode == "RGB" and image.size == (40, 30)
    got = np.array(quadrant_centres(rgb(image)))
    want = np.array([RED, GREEN, BLUE, YELLOW])
    assert np.abs(got - want).max() <= tolerance, got


def test_animated_gif_gives_first_frame(tmp_path: Path) -> None:
    path = tmp_path / "anim.gif"
    frames = [Image.new("RGB", (12, 10), colour) for colour in (RED, BLUE, GREEN)]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0)
    with Image.open(path) as check:
        assert check.n_frames == 3

    array = rgb(decode_image(path))

    assert (array == RED).all()


def test_multipage_tiff_gives_first_page(tmp_path: Path) -> None:
    path = tmp_path / "pages.tif"
    pages = [Image.new("RGB", (12, 10), colour) for colour in (GREEN, RED)]
    pages[0].save(path, save_all=True, append_images=pages[1:])
    with Image.open(path) as check:
        assert check.n_frames == 2

    array = rgb(decode_image(path))

    assert (array == GREEN).all()


def test_grayscale(tmp_path: Path) -> None:
    gradient = np.tile(np.arange(0, 250, 10, dtype=np.uint8), (3, 1))
    Image.fromarray(gradient, mode="L").save(tmp_path / "g.png")

    array = rgb(decode_image(tmp_path / "g.png"))

    for channel in range(3):
        np.testing.assert_array_equal(array[..., channel], gradient)


def test_palette(tmp_path: Path) -> None:
    image = Image.new("P", (3, 1))
    image.putpalette([*RED, *GREEN, *BLUE] + [0] * (253 * 3))
    image.putdata([2, 0, 1])
    image.save(tmp_path / "p.png")
    with Image.open(tmp_path / "p.png") as check:
        assert check.mode == "P"

    array = rgb(decode_image(tmp_path / "p.png"))

    assert array[0].tolist() == [list(BLUE), list(RED), list(GREEN)]


def test_palette_with_transparency_is_white_where_transparent(tmp_path: Path) -> None:
    image = Image.new("P", (3, 1))
    image.putpalette([0, 0, 0, *GREEN, *BLUE] + [0] * (253 * 3))  # index 0: transparent black
    image.putdata([0, 1, 2])
    image.save(tmp_path / "pt.png", transparency=0)
    with Image.open(tmp_path / "pt.png") as check:
        assert check.mode == "P" and check.info["transparency"] == 0

    array = rgb(decode_image(tmp_path / "pt.png"))

    assert array[0].tolist() == [list(WHITE), list(GREEN), list(BLUE)]


@pytest.mark.parametrize("suffix", [".png", ".webp"])
def test_rgba_composites_on_white(tmp_path: Path, suffix: str) -> None:
    pixels = np.array([[[0, 0, 0, 0], [255, 0, 0, 255], [255, 0, 0, 128], [0, 0, 255, 255]]], dtype=np.uint8)
    path = tmp_path / f"a{suffix}"
    Image.fromarray(pixels, mode="RGBA").save(path, **({"lossless": True, "exact": True} if suffix == ".webp" else {}))

    array = rgb(decode_image(path)).astype(int)

    assert array[0, 0].tolist() == list(WHITE)  # transparent black becomes white, not black
    assert array[0, 1].tolist() == list(RED)
    assert array[0, 3].tolist() == list(BLUE)
    # half-transparent red over white: 255 in red, about 255 * (1 - 128/255) in green and blue
    assert array[0, 2, 0] == 255 and abs(array[0, 2, 1] - 127) <= 1 and abs(array[0, 2, 2] - 127) <= 1


def test_la_composites_on_white(tmp_path: Path) -> None:
    pixels = np.array([[[0, 0], [90, 255], [200, 255]]], dtype=np.uint8)
    Image.fromarray(pixels, mode="LA").save(tmp_path / "la.png")
    with Image.open(tmp_path / "la.png") as check:
        assert check.mode == "LA"

    array = rgb(decode_image(tmp_path / "la.png"))

    assert array[0].tolist() == [list(WHITE), [90, 90, 90], [200, 200, 200]]


@pytest.mark.parametrize("mode,key,values", [("RGB", (0, 0, 0), [(0, 0, 0), (200, 10, 10)]), ("L", 0, [0, 90])])
def test_transparency_key_composites_on_white(tmp_path: Path, mode: str, key: object, values: list) -> None:
    """PNG tRNS colour keys on RGB and L images: keyed pixels are transparent."""
    image = Image.new(mode, (2, 1))
    image.putdata(values)
    image.save(tmp_path / "k.png", transparency=key)
    with Image.open(tmp_path / "k.png") as check:
        assert check.mode == mode and "transparency" in check.info

    array = rgb(decode_image(tmp_path / "k.png"))

    second = list(values[1]) if mode == "RGB" else [values[1]] * 3
    assert array[0].tolist() == [list(WHITE), second]


@pytest.mark.parametrize(
    "cmyk,expected",
    [((0, 255, 255, 0), RED), ((255, 0, 255, 0), GREEN), ((0, 0, 255, 0), YELLOW), ((0, 0, 0, 255), (0, 0, 0))],
)
def test_cmyk_jpeg(tmp_path: Path, cmyk: tuple[int, int, int, int], expected: tuple[int, int, int]) -> None:
    Image.new("CMYK", (16, 16), cmyk).save(tmp_path / "c.jpg", quality=95)
    with Image.open(tmp_path / "c.jpg") as check:
        assert check.mode == "CMYK"

    array = rgb(decode_image(tmp_path / "c.jpg")).astype(int)

    assert np.abs(array - np.array(expected)).max() <= 10, array[0, 0]


@pytest.mark.parametrize("suffix,source_mode", [(".png", "I;16"), (".tif", "I;16"), (".tif", "I")])
def test_16_bit_grayscale_is_scaled_not_clipped(tmp_path: Path, suffix: str, source_mode: str) -> None:
    values = np.array([[0, 257, 12850, 32768, 40000, 65535]], dtype=np.uint16)
    image = Image.fromarray(values) if source_mode == "I;16" else Image.fromarray(values.astype(np.int32))
    path = tmp_path / f"g16{suffix}"
    image.save(path)
    with Image.open(path) as check:
        assert check.mode == source_mode

    array = rgb(decode_image(path)).astype(int)

    assert (array[..., 0] == array[..., 1]).all() and (array[..., 0] == array[..., 2]).all()
    # round(v / 257); Pillow's own convert("RGB") clips, giving 255 for all but the 0
    assert array[0, :, 0].tolist() == [0, 1, 50, 128, 156, 255]


def test_16_bit_gradient_keeps_its_order(tmp_path: Path) -> None:
    ramp = np.linspace(0, 65535, 64).astype(np.uint16)[None, :].repeat(2, axis=0)
    Image.fromarray(ramp).save(tmp_path / "ramp.png")

    grey = rgb(decode_image(tmp_path / "ramp.png"))[0, :, 0].astype(int)

    assert grey[0] == 0 and grey[-1] == 255
    assert (np.diff(grey) > 0).all()  # 64 steps over 256 levels: strictly increasing
    np.testing.assert_array_equal(grey, np.rint(ramp[0] / 257.0).astype(int))


# np.rot90's k: positive turns counter-clockwise
@pytest.mark.parametrize("orientation,k", [(3, 2), (6, -1), (8, 1)])
def test_exif_orientation_is_applied(tmp_path: Path, orientation: int, k: int) -> None:
    stored = np.zeros((40, 60, 3), dtype=np.uint8)  # 60 wide, 40 high
    stored[:, :30] = RED
    stored[:, 30:] = BLUE
    image = Image.fromarray(stored)
    exif = image.getexif()
    exif[0x0112] = orientation
    path = tmp_path / f"o{orientation}.jpg"
    image.save(path, exif=exif, quality=95)
    with Image.open(path) as raw:
        raw_pixels = np.asarray(raw.convert("RGB"))  # as stored, orientation ignored

    array = rgb(decode_image(path))

    np.testing.assert_array_equal(array, np.rot90(raw_pixels, k))
    if orientation == 3:  # upside down: red is now on the right
        assert array.shape[:2] == (40, 60)
        left, right = array[20, 5].astype(int), array[20, -5].astype(int)
        assert left[2] > 200 and left[0] < 40 and right[0] > 200 and right[2] < 40
    else:  # a quarter turn: 40 wide, 60 high
        assert array.shape[:2] == (60, 40)
        top, bottom = array[5, 20].astype(int), array[-5, 20].astype(int)
        red, blue = (top, bottom) if orientation == 6 else (bottom, top)  # 6 turns clockwise: the left edge goes on top
        assert red[0] > 200 and red[2] < 40 and blue[2] > 200 and blue[0] < 40


# ---------------------------------------------------------------- 5. corrupt files


def _decode_errors() -> tuple[type[BaseException], ...]:
    from embedpipe.inference import DECODE_ERRORS

    return DECODE_ERRORS


def _noisy(size: tuple[int, int], seed: int = 0) -> Image.Image:
    w, h = size
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8))


def _zero_bytes(tmp: Path) -> Path:
    path = tmp / "zero.jpg"
    path.write_bytes(b"")
    return path


def _random_bytes(tmp: Path) -> Path:
    path = tmp / "random.jpg"
    path.write_bytes(np.random.default_rng(1).bytes(4096))
    return path


def _truncated(suffix: str) -> Callable[[Path], Path]:
    def build(tmp: Path) -> Path:
        whole = tmp / f"whole{suffix}"
        _noisy((200, 150)).save(whole)
        data = whole.read_bytes()
        path = tmp / f"half{suffix}"
        path.write_bytes(data[: len(data) // 2])
        return path

    return build


@pytest.mark.parametrize(
    "build",
    [_zero_bytes, _random_bytes, _truncated(".jpg"), _truncated(".png")],
    ids=["zero-bytes", "random-bytes", "truncated-jpeg", "truncated-png"],
)
@pytest.mark.parametrize("draft_to", [None, 32])
def test_corrupt_files_raise(tmp_path: Path, build: Callable[[Path], Path], draft_to: int | None) -> None:
    path = build(tmp_path)

    with pytest.raises(_decode_errors()):
        decode_image(path, draft_to=draft_to)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # never switched on to paper over it


def test_truncated_jpeg_opens_but_does_not_decode(tmp_path: Path) -> None:
    """The header survives, so only a full load notices; a grey-padded image must not come back."""
    path = _truncated(".jpg")(tmp_path)
    with Image.open(path) as image:
        assert image.size == (200, 150)  # open() alone is fooled

    with pytest.raises(OSError, match="truncated"):
        decode_image(path)


# ---------------------------------------------------------------- 6. JPEG draft


@pytest.fixture(scope="module")
def large_jpeg(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """1600 x 1200, smooth colours so a reduced decode is comparable."""
    y, x = np.mgrid[0:1200, 0:1600]
    array = np.stack([x * 255 // 1599, y * 255 // 1199, (x + y) * 255 // 2798], axis=-1).astype(np.uint8)
    path = tmp_path_factory.mktemp("draft") / "large.jpg"
    Image.fromarray(array).save(path, quality=90)
    return path


@pytest.mark.parametrize("draft_to", [224, 300, 599])
def test_draft_decodes_large_jpeg_smaller_but_not_below_target(large_jpeg: Path, draft_to: int) -> None:
    full = decode_image(large_jpeg)
    small = decode_image(large_jpeg, draft_to=draft_to)

    assert full.size == (1600, 1200)
    assert min(small.size) >= draft_to
    assert small.size[0] < 1600 and small.size[1] < 1200
    assert small.size[0] * 1200 == small.size[1] * 1600  # aspect kept
    # the same picture: compare with the full decode scaled to the draft's size
    reference = np.asarray(full.resize(small.size, Image.Resampling.BOX)).astype(int)
    assert np.abs(rgb(small).astype(int) - reference).mean() < 3


def test_draft_keeps_small_jpeg_and_ignores_png(tmp_path: Path, large_jpeg: Path) -> None:
    _noisy((300, 200)).save(tmp_path / "small.jpg")
    with Image.open(large_jpeg) as image:
        image.save(tmp_path / "large.png")

    assert decode_image(tmp_path / "small.jpg", draft_to=224).size == (300, 200)
    png = decode_image(tmp_path / "large.png", draft_to=224)
    assert png.size == (1600, 1200)
    np.testing.assert_array_equal(rgb(png), rgb(decode_image(tmp_path / "large.png")))


def test_draft_bounds_both_sides_of_a_rotated_jpeg(tmp_path: Path, large_jpeg: Path) -> None:
    with Image.open(large_jpeg) as image:
        exif = image.getexif()
        exif[0x0112] = 6
        image.save(tmp_path / "rotated.jpg", exif=exif, quality=90)

    small = decode_image(tmp_path / "rotated.jpg", draft_to=300)

    assert small.size == (300, 400)  # 1/4 scale, then turned upright


# ---------------------------------------------------------------- 7. resolve_preprocess and the transform


def _timm_pretrained_cfg(name: str = "resnet50") -> dict:
    from embedpipe._compat import ensure_torchvision_importable

    ensure_torchvision_importable()
    import timm

    return timm.models.get_pretrained_cfg(name).to_dict()


@pytest.mark.parametrize("name", ["resnet50", "vit_small_patch16_224", "convnext_tiny"])
def test_resolve_without_overrides_matches_timm(name: str) -> None:
    pretrained_cfg = _timm_pretrained_cfg(name)
    from timm.data import resolve_data_config

    expected = resolve_data_config(pretrained_cfg=pretrained_cfg)
    config = resolve_preprocess(pretrained_cfg)

    assert config.input_size == tuple(expected["input_size"])
    assert config.interpolation == expected["interpolation"]
    assert config.mean == pytest.approx(tuple(expected["mean"]))
    assert config.std == pytest.approx(tuple(expected["std"]))
    assert config.crop_pct == pytest.approx(expected["crop_pct"])
    assert config.crop_mode == expected["crop_mode"]
    assert config.jpeg_draft is True
    assert resolve_preprocess(pretrained_cfg, {"input_size": None, "mean": None}) == config  # None means unset


def test_resolve_resnet50_values() -> None:
    """Pinned, so a change in what timm reports for resnet50 is noticed."""
    config = resolve_preprocess(_timm_pretrained_cfg("resnet50"))

    assert config.input_size == (3, 224, 224)
    assert config.interpolation == "bicubic"
    assert config.mean == pytest.approx((0.485, 0.456, 0.406))
    assert config.std == pytest.approx((0.229, 0.224, 0.225))
    assert config.crop_pct == pytest.approx(0.95)
    assert config.crop_mode == "center"


def test_user_overrides_beat_pretrained_cfg() -> None:
    pretrained_cfg = _timm_pretrained_cfg("resnet50")
    overrides = {
        "input_size": 64,
        "mean": (0.5, 0.5, 0.5),
        "std": (0.25, 0.25, 0.25),
        "crop_pct": 1.0,
        "interpolation": "bilinear",
        "crop_mode": "squash",
        "jpeg_draft": False,
    }

    config = resolve_preprocess(pretrained_cfg, overrides)

    assert config.input_size == (3, 64, 64)  # an int becomes (3, n, n)
    assert config.mean == (0.5, 0.5, 0.5)
    assert config.std == (0.25, 0.25, 0.25)
    assert config.crop_pct == 1.0
    assert config.interpolation == "bilinear"
    assert config.crop_mode == "squash"
    assert config.jpeg_draft is False
    # one override leaves the rest to the pretrained_cfg
    partial = resolve_preprocess(pretrained_cfg, {"input_size": (3, 96, 128)})
    assert partial.input_size == (3, 96, 128)
    assert partial.interpolation == "bicubic" and partial.crop_pct == pytest.approx(0.95)


@pytest.mark.parametrize(
    "overrides",
    [{}, {"input_size": 64, "interpolation": "bilinear", "crop_pct": 0.875}, {"input_size": 72, "crop_mode": "squash"}],
    ids=["resnet50", "64px-bilinear", "72px-squash"],
)
def test_eval_transform_and_normalize_match_timm(overrides: dict) -> None:
    import torch
    from timm.data import create_transform

    config = resolve_preprocess(_timm_pretrained_cfg("resnet50"), overrides)
    image = Image.fromarray(quadrants((150, 110)))
    image.paste(_noisy((60, 40), seed=4), (30, 20))
    reference = create_transform(**{k: v for k, v in config.to_dict().items() if k != "jpeg_draft"}, is_training=False)

    uint8 = eval_transform(config)(image)
    ours = normalize(uint8.unsqueeze(0), config)[0]
    theirs = reference(image)

    assert uint8.dtype == torch.uint8 and tuple(uint8.shape) == config.input_size
    assert ours.dtype == torch.float32 and ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    assert normalize(uint8.unsqueeze(0), config, dtype=torch.float16).dtype == torch.float16


def test_draft_to_resize_target_barely_changes_the_network_input(large_jpeg: Path) -> None:
    """What the extract loop does: draft to the resize target, then timm's eval transform."""
    config = resolve_preprocess(_timm_pretrained_cfg("resnet50"))
    transform = eval_transform(config)
    target = resize_target(config)
    assert target == int(224 / 0.95)

    drafted = decode_image(large_jpeg, draft_to=target)
    assert min(drafted.size) >= target and drafted.size[0] < 1600
    exact = transform(decode_image(large_jpeg)).int()
    approx = transform(drafted).int()

    assert (exact - approx).abs().float().mean().item() < 2.0


def test_packed_strings_hold_what_was_packed() -> None:
    from embedpipe.data.strings import PackedStrings

    strings = ["a/b.png", "", "café/ü.jpg", "x" * 300, "bad\udce9.png", "z.png"]  # empty, non-ASCII, a surrogate
    packed = PackedStrings.pack(strings)
    assert list(packed) == strings and len(packed) == 6 and packed == strings and packed == tuple(strings)
    assert [packed[i] for i in range(-6, 6)] == strings + strings
    assert packed[1:4] == strings[1:4] and packed[::-2] == strings[::-2]
    rows = [5, 0, 2, 2, 1]
    taken = packed.take(rows)
    assert isinstance(taken, PackedStrings) and list(taken) == [strings[i] for i in rows]
    assert list(packed.take([])) == [] and list(PackedStrings.pack([])) == []
    assert packed != strings[:-1] and packed != PackedStrings.pack(strings[:-1] + ["y.png"])
    with pytest.raises(IndexError):
        packed[6]
    import pickle

    assert pickle.loads(pickle.dumps(taken)) == taken
    rng = np.random.default_rng(0)  # against Python's own slicing, on random strings and rows
    words = ["".join(rng.choice(list("abcé/"), size=int(n))) for n in rng.integers(0, 12, 500)]
    picks = rng.integers(0, 500, 2000)
    assert PackedStrings.pack(words).take(picks).tolist() == [words[i] for i in picks.tolist()]
    # A prefix joined in, columns end to end, UTF-8 validity: against the strings built one by one.
    for prefix in ("", "class/", "dé/"):
        assert PackedStrings.pack(strings, prefix=prefix).tolist() == [prefix + s for s in strings]
    parts = [PackedStrings.pack(words[:7], prefix="é/"), PackedStrings.pack([]), PackedStrings.pack(strings), PackedStrings.pack(words[7:])]
    assert PackedStrings.concat(parts).tolist() == ["é/" + w for w in words[:7]] + strings + words[7:]
    assert PackedStrings.concat([]).tolist() == [] and PackedStrings.concat(parts[:1]) is parts[0]
    assert PackedStrings.pack(words).is_utf8() and not packed.is_utf8()  # the surrogate stands for a byte that is not UTF-8
