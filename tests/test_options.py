"""Every command-line option is checked at the edge: a bad value is one line and a non-zero exit, never a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

import embedpipe
from embedpipe import BackboneSpec, RunConfig
from embedpipe.backbone import resolve_embedding_config
from embedpipe.cli import cli
from embedpipe.config import INTERPOLATIONS
from embedpipe.errors import BackboneError

TINY = ["-b", "test_resnet", "--no-pretrained", "--workers", "0"]


def invoke(*args: str) -> tuple[int, str]:
    """Run the CLI in this process; returns (exit code, stderr), failing on any exception but a clean exit."""
    result = CliRunner().invoke(cli, list(args))
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exc_info
    return result.exit_code, result.stderr.strip()


def one_line_error(stderr: str) -> str:
    """The error line, checked to be the only thing that says what went wrong (click adds a usage hint)."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.lower().startswith("error")]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr
    return errors[0]


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (["--mean", "0.5,0.5"], "give 3"),
        (["--std", "0.5,0.5,0.5,0.5"], "give 3"),
        (["--std", "0,0,0"], "positive"),
        (["--mean", "a,b,c"], "not a comma-separated list"),
        (["--mean", "nan,0,0"], "finite"),
        (["--img-size", "-5"], "1<=x<=4096"),
        (["--img-size", "0"], "1<=x<=4096"),  # exited 0 with every image in the ledger
        (["--img-size", "100000"], "1<=x<=4096"),
        (["--crop-pct", "0"], "0<x<=1"),
        (["--crop-pct", "1.5"], "0<x<=1"),
        (["--interpolation", "bogus"], "bicubic"),
        (["--workers", "-1"], "x>=0"),
        (["--val-fraction", "1.5"], "0<=x<1"),
        (["--test-fraction", "-0.1"], "0<=x<1"),
    ],
)
def test_bad_extract_options_are_click_errors(image_tree: Path, tmp_path: Path, option: list[str], message: str) -> None:
    code, stderr = invoke("extract", str(image_tree), *TINY, "--cache-dir", str(tmp_path / "cache"), *option)
    assert code == 2 and message in one_line_error(stderr)
    assert not (tmp_path / "cache").exists()  # refused before anything was hashed or written


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["fit-head", "x.h5", "--shots", "0"], "x>=1"),
        (["fit-head", "x.h5", "--seed", "-1"], "x>=0"),
        (["fit-head", "x.h5", "--cs", "0"], "x>=1"),
        (["fit-head", "x.h5", "--head", "mlp", "--dropout", "1"], "0<=x<1"),
        (["fit-head", "x.h5", "--head", "mlp", "--lr", "-1"], "x>0"),
        (["fit-head", "x.h5", "--head", "knn", "--k", "0"], "x>=1"),
        (["predict", "head", "images", "--top-k", "0"], "x>=1"),
        (["fine-tune", "images", "--out", "run", "--epochs", "-1"], "x>=0"),
        (["fine-tune", "images", "--out", "run", "--accum-steps", "0"], "x>=1"),
        (["fine-tune", "images", "--out", "run", "--layer-decay", "0"], "0<x<=1"),
        (["fine-tune", "images", "--out", "run", "--lr", "0"], "x>0"),
        (["fine-tune", "images", "--out", "run", "--warmup", "-1"], "x>=0"),
        (["fine-tune", "images", "--out", "run", "--mean", "1"], "give 3"),
        (["bench", "images", "--out", "r", "--img-size", "0"], "1<=x<=4096"),
    ],
)
def test_bad_numbers_in_other_commands_are_click_errors(args: list[str], message: str) -> None:
    code, stderr = invoke(*args)
    assert code == 2 and message in one_line_error(stderr)


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (["--output", "stage99"], "test_resnet has no stage99 (it has stage0 to stage4)"),
        (["--device", "tpu"], "unknown device 'tpu'"),
    ],
)
def test_options_that_need_the_model_or_torch_are_backbone_errors(image_tree: Path, tmp_path: Path, option: list[str],
                                                                   message: str) -> None:
    code, stderr = invoke("extract", str(image_tree), *TINY, "--cache-dir", str(tmp_path / "cache"), *option)
    assert code == BackboneError.exit_code and message in one_line_error(stderr)


def test_an_unknown_pretrained_tag_lists_the_known_ones(image_tree: Path, tmp_path: Path) -> None:
    code, stderr = invoke("extract", str(image_tree), "-b", "test_resnet.bogus_tag", "--cache-dir", str(tmp_path / "c"))
    assert code == BackboneError.exit_code
    assert "no pretrained tag 'bogus_tag' (known: r160_in1k)" in one_line_error(stderr)


def test_the_library_checks_the_same_things(image_tree: Path, tmp_path: Path) -> None:
    """A notebook user gets the same refusals, as BackboneError, before any image is decoded."""
    for preprocess, message in [({"input_size": 0}, "from 1 to 4096"), ({"input_size": 100000}, "from 1 to 4096"),
                                ({"mean": (0.5, 0.5)}, "needs 3 numbers"), ({"std": (1, 0, 1)}, "positive"),
                                ({"interpolation": "bogus"}, "unknown interpolation"), ({"crop_pct": 0.0}, r"\(0, 1\]"),
                                ({"input_size": (1, 64, 64)}, "images are RGB")]:
        with pytest.raises(BackboneError, match=message):
            embedpipe.extract(image_tree, BackboneSpec(name="test_resnet", pretrained=False, preprocess=preprocess),
                              cache_dir=tmp_path / "cache", run=RunConfig(device="cpu", num_workers=0))
    with pytest.raises(BackboneError, match=r"has no stage5 \(it has stage0 to stage4\)"):
        resolve_embedding_config("test_resnet", pretrained=False, outputs=("embedding", "stage5"))
    assert resolve_embedding_config("test_resnet", pretrained=False, outputs=("stage4",)).outputs == ("stage4",)
    with pytest.raises(BackboneError, match="known: r160_in1k"):
        resolve_embedding_config("test_resnet.bogus_tag")


def test_the_interpolations_offered_are_the_ones_timm_knows() -> None:
    from timm.data.transforms import str_to_interp_mode

    for name in INTERPOLATIONS:
        str_to_interp_mode(name)  # raises for a name timm does not know
