"""fine-tune on tiny real timm models and synthetic images: what trains, what stays, what is saved."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import embedpipe
from embedpipe import BackboneSpec, RunConfig
from embedpipe.backbone import load_backbone
from embedpipe.config import FineTuneConfig
from embedpipe.errors import FineTuneError, HeadError
from embedpipe.finetune import layer_groups, linear_from_probe, lr_factor, param_groups, set_lr, set_trainable
from embedpipe.heads import LogisticProbe
from embedpipe.finetune import fine_tune
from embedpipe.heads import evaluate, fit_head

TINY = ("test_resnet", "test_efficientnet", "test_vit", "test_convnext")
# Small and quick: 15 train, 3 val, 6 test images at 64 px, batches of 8, no augmentation noise in timing.
QUICK = dict(batch_size=8, augment="none", warmup=0.0)


def cli(*args: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    return subprocess.run([sys.executable, "-m", "embedpipe", *args], capture_output=True, text=True, env=env, timeout=600, **kwargs)


def timm_model(name: str, classes: int = 3) -> torch.nn.Module:
    model = load_backbone(name, pretrained=False)
    model.reset_classifier(classes)
    return model


def ft(data: Path, spec: BackboneSpec, out: Path, run: RunConfig, **config: object) -> embedpipe.FineTuneResult:
    return fine_tune(data, spec, out=out, config=FineTuneConfig(**{**QUICK, **config}), cache_dir=out.parent / "cache", run=run)


# --------------------------------------------------------------------------- what trains


@pytest.mark.parametrize("name", TINY)
def test_unfreeze_follows_timms_layer_groups(name: str) -> None:
    model = timm_model(name)
    layers = layer_groups(model)
    names = [n for n, _ in model.named_parameters()]
    assert set(layers.layer_of) == set(names)
    classifier = model.get_classifier()
    where = next(m for m, module in model.named_modules() if module is classifier)
    assert layers.classifier == {f"{where}.{p}" for p, _ in classifier.named_parameters()}
    backbone = set(names) - layers.classifier
    assert layers.unfrozen("none") == set() and layers.unfrozen("all") == backbone
    top1, top2 = layers.unfrozen("top:1"), layers.unfrozen("top:2")
    assert top1 and top1 < top2 < backbone
    # top:1 is the highest layer group under the classifier (with a neck that shares the classifier's group).
    assert {layers.layer_of[n] for n in top1} - {layers.neck} == {layers.blocks[-1]}
    assert layers.unfrozen(f"top:{len(layers.blocks)}") == backbone
    with pytest.raises(FineTuneError, match="more layer groups than the model has"):
        layers.unfrozen(f"top:{len(layers.blocks) + 1}")
    with pytest.raises(FineTuneError, match="unknown --unfreeze"):
        layers.unfrozen("top:0")


@pytest.mark.parametrize("name", ["test_vit", "test_efficientnet"])
def test_param_groups_carry_the_promised_learning_rates(name: str) -> None:
    from timm.optim import param_groups_layer_decay

    model = timm_model(name)
    layers = layer_groups(model)
    set_trainable(model, set(layers.layer_of))
    config = FineTuneConfig(lr=2e-4, head_lr_mult=10, layer_decay=0.7, weight_decay=0.05)
    optimizer = torch.optim.AdamW(param_groups(model, layers, config))
    set_lr(optimizer, config.lr * 0.5)  # what the schedule does at a factor of 0.5
    ours = {n: (g["lr"], g["weight_decay"]) for g in optimizer.param_groups for n in g["param_names"]}
    assert set(ours) == set(layers.layer_of)
    # The independent reference: timm's own layer-decay groups (its lr_scale, its weight-decay rule).
    reference = {}
    by_id = {id(p): n for n, p in model.named_parameters()}
    for group in param_groups_layer_decay(model, weight_decay=0.05, layer_decay=0.7, no_weight_decay_list=getattr(model, "no_weight_decay", set)()):
        for p in group["params"]:
            reference[by_id[id(p)]] = (group["lr_scale"], group["weight_decay"])
    for n, (lr, wd) in ours.items():
        scale, their_wd = reference[n]
        expected = 1e-4 * (10 if n in layers.classifier else scale)
        assert lr == pytest.approx(expected, rel=1e-12), n
        assert wd == their_wd, n
    lowest = min(layers.blocks)
    assert min(lr for lr, _ in ours.values()) == pytest.approx(1e-4 * 0.7 ** (layers.top_layer - lowest))


def test_schedules_give_the_documented_values() -> None:
    per_epoch, epochs = 4, 10
    total = per_epoch * epochs

    def f(schedule: str, unit: int, **kw: object) -> float:
        return lr_factor(FineTuneConfig(schedule=schedule, warmup=1.0, **kw), unit, total, per_epoch)

    assert [f("constant", u) for u in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]  # linear warmup over one epoch
    assert f("step", 4 + 3 * 4 - 1, step_every=3, step_gamma=0.1) == 1.0
    assert f("step", 4 + 3 * 4, step_every=3, step_gamma=0.1) == pytest.approx(0.1)
    assert f("exp", 4 + 2 * 4, exp_gamma=0.9) == pytest.approx(0.81)
    assert f("cosine", 4, min_lr_ratio=0.0) == 1.0
    assert f("cosine", 4 + 18, min_lr_ratio=0.0) == pytest.approx(0.5)
    assert f("cosine", total - 1, min_lr_ratio=0.1) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 35 / 36)))
    # Per epoch: the unit is the epoch.
    assert lr_factor(FineTuneConfig(schedule="exp", warmup=0, exp_gamma=0.5), 3, 10, 1) == 0.125


def test_epoch_lrs_follow_the_schedule(image_tree: Path, spec: BackboneSpec, run: RunConfig, tmp_path: Path) -> None:
    result = ft(image_tree, spec, tmp_path / "run", run, unfreeze="top:1", head_epochs=1, epochs=3, schedule="step",
                step_every=1, step_gamma=0.5, schedule_unit="epoch", lr=1e-3, head_lr_mult=4, patience=10)
    lrs = [(r["phase"], r["lr"], r["head_lr"]) for r in result.history]
    assert lrs == [("head", 1e-3, 4e-3), ("finetune", 1e-3, 4e-3), ("finetune", 5e-4, 2e-3), ("finetune", 2.5e-4, 1e-3)]


def test_train_mode_follows_what_trains() -> None:
    from embedpipe.backbone import _timm
    from embedpipe.finetune import set_train_mode

    model = _timm().create_model("test_vit", drop_path_rate=0.1, num_classes=3)
    layers = layer_groups(model)
    set_trainable(model, layers.unfrozen("top:1") | layers.classifier)
    set_train_mode(model, train_bn=False)
    assert model.training and model.blocks[-1].training and model.blocks[-1].drop_path1.training
    assert not model.blocks[0].training and not model.blocks[0].drop_path1.training and not model.patch_embed.training
    resnet = timm_model("test_resnet")
    resnet_layers = layer_groups(resnet)
    set_trainable(resnet, resnet_layers.unfrozen("top:1") | resnet_layers.classifier)
    for train_bn in (False, True):
        set_train_mode(resnet, train_bn=train_bn)
        assert resnet.layer4[0].conv1.training and resnet.layer4[0].bn1.training == train_bn
        assert not resnet.layer1[0].bn1.training and not resnet.layer1[0].conv1.training


@pytest.mark.parametrize("augment", ["standard", "strong"])
def test_augmentations_keep_the_input_shape(augment: str, image_tree: Path) -> None:
    from embedpipe.finetune import train_transform
    from embedpipe.extraction import resolve
    from embedpipe.preprocess import decode_image

    preprocess = resolve(BackboneSpec(name="test_resnet", pretrained=False, preprocess={"input_size": 64}), "cpu").preprocess
    transform = train_transform(preprocess, augment)
    image = decode_image(next((image_tree / "circles").iterdir()))
    outputs = [transform(image) for _ in range(3)]
    assert all(o.dtype == torch.uint8 and tuple(o.shape) == (3, 64, 64) for o in outputs)
    assert not torch.equal(outputs[0], outputs[1]) or not torch.equal(outputs[1], outputs[2])  # random


@pytest.mark.parametrize("name", ["test_efficientnet", "test_vit", "test_convnext"])
def test_each_tiny_architecture_fine_tunes(name: str, image_tree: Path, run: RunConfig, tmp_path: Path) -> None:
    spec = BackboneSpec(name=name, pretrained=False, preprocess={"input_size": 64}, precision="fp32", dtype="float32")
    result = ft(image_tree, spec, tmp_path / "run", run, unfreeze="top:1", head_epochs=1, epochs=1, lr=1e-3)
    assert [r["phase"] for r in result.history] == ["head", "finetune"]
    phases = result.summary["phases"]
    assert phases[0]["trainable_params"] < phases[1]["trainable_params"]
    assert set(result.memory) == {"head", "finetune"} and all(v > 0 for v in result.memory.values())


# --------------------------------------------------------------------------- what stays


def _tensors_differ(a: torch.Tensor, b: torch.Tensor) -> bool:
    return not torch.equal(a, b)


@pytest.mark.parametrize("train_bn", [False, True])
def test_frozen_parameters_and_batchnorm_statistics_do_not_change(
    image_tree: Path, spec: BackboneSpec, run: RunConfig, tmp_path: Path, train_bn: bool
) -> None:
    before = {k: v.clone() for k, v in load_backbone("test_resnet", pretrained=False).state_dict().items()}
    ft(image_tree, spec, tmp_path / "run", run, unfreeze="top:1", head_epochs=1, epochs=2, lr=1e-3, train_bn=train_bn,
       patience=10)
    after = {k[len("model/"):]: v for k, v in load_file(tmp_path / "run" / "last.safetensors").items() if k.startswith("model/")}
    layers = layer_groups(timm_model("test_resnet"))
    trained = layers.unfrozen("top:1")
    top_prefix = "layer4."
    assert all(n.startswith(top_prefix) for n in trained)
    for key, value in before.items():
        if key.startswith("fc."):
            continue
        if key in trained:
            continue
        if key.endswith(("running_mean", "running_var", "num_batches_tracked")) and key.startswith(top_prefix):
            # BatchNorm statistics of the unfrozen block move only with --train-bn.
            assert _tensors_differ(value, after[key]) == train_bn, key
            continue
        assert torch.equal(value, after[key]), f"{key} changed although frozen"
    assert any(_tensors_differ(before[n], after[n]) for n in trained), "the unfrozen block did not train"


def test_early_stopping_restores_the_best_epoch(image_tree: Path, spec: BackboneSpec, run: RunConfig, tmp_path: Path) -> None:
    # An LR far too high for a full fine-tune: validation loss rises after the first epochs.
    result = ft(image_tree, spec, tmp_path / "run", run, unfreeze="all", head_epochs=0, epochs=8, lr=0.3,
                schedule="constant", patience=2)
    history = result.history
    assert result.stop_reason in ("patience", "non_finite_loss") and result.stopped_epoch < 8
    losses = [result.summary["initial"]["val_loss"]] + [r["val_loss"] for r in history]
    assert result.best_epoch == int(np.nanargmin(losses)) < result.stopped_epoch
    with safe_open(str(result.best_checkpoint), "pt") as handle:
        best_meta = json.loads(handle.metadata()["best"])
    assert best_meta["epoch"] == result.best_epoch
    # The final model is the best epoch's: its validation accuracy, scored after the restore, is that epoch's.
    best_acc = result.summary["initial"]["val_acc"] if result.best_epoch == 0 else history[result.best_epoch - 1]["val_acc"]
    assert result.val["accuracy"] == pytest.approx(best_acc)
    best = load_file(result.best_checkpoint)
    last = {k[len("model/"):]: v for k, v in load_file(tmp_path / "run" / "last.safetensors").items() if k.startswith("model/")}
    assert any(not torch.equal(best[k], last[k]) for k in best)
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == result.stopped_epoch
    assert {"phase", "epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds"} <= set(json.loads(lines[0]))
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    for key in ("best_epoch", "stopped_epoch", "stop_reason", "best_checkpoint", "test", "peak_memory_bytes", "seconds", "config"):
        assert key in summary
    assert {"accuracy", "balanced_accuracy"} <= set(summary["test"]) and summary["peak_memory_bytes"] > 0
    assert (tmp_path / "run" / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "run" / "metrics.csv").read_text().startswith("phase,epoch,train_loss")


# --------------------------------------------------------------------------- what is saved


def test_fine_tuned_weights_load_into_extract_under_a_new_key(
    image_tree: Path, spec: BackboneSpec, run: RunConfig, tmp_path: Path
) -> None:
    result = ft(image_tree, spec, tmp_path / "run", run, unfreeze="all", head_epochs=0, epochs=2, lr=1e-3, patience=10)
    assert result.best_epoch > 0
    cache = tmp_path / "cache"
    plain = embedpipe.extract(image_tree, spec, cache_dir=cache, run=run)
    tuned_spec = BackboneSpec(name="test_resnet", weights=str(result.best_checkpoint), preprocess={"input_size": 64},
                              precision="fp32", dtype="float32")
    tuned = embedpipe.extract(image_tree, tuned_spec, cache_dir=cache, run=run)
    assert tuned.cache_key != plain.cache_key and not tuned.cache_hit
    X0, _, _ = embedpipe.load(plain.path)
    X1, _, _ = embedpipe.load(tuned.path)
    assert X0.shape == X1.shape and not np.allclose(X0, X1)
    # The saved head on those embeddings is the fine-tuned network's own classifier.
    scores = evaluate(result.head, tuned.path, split="test")
    assert scores["test"]["accuracy"] == pytest.approx(result.test["accuracy"])


def test_init_head_from_the_linear_probe_reproduces_it_at_epoch_zero(
    image_tree: Path, spec: BackboneSpec, run: RunConfig, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    exported = embedpipe.extract(image_tree, spec, cache_dir=cache, run=run)
    fitted = fit_head(exported.path, "logreg", out=tmp_path / "probe", params={"Cs": 5})
    X, y, meta = embedpipe.load(exported.path, split="val")
    names = np.asarray(meta["class_names"])[y]
    proba = fitted.head.predict_proba(X)
    expected_loss = float(np.mean(-np.log(proba[np.arange(len(y)), np.searchsorted(fitted.head.classes_, names)])))
    result = fine_tune(image_tree, spec, out=tmp_path / "run", init_head=tmp_path / "probe", cache_dir=cache, run=run,
                       config=FineTuneConfig(**QUICK, unfreeze="none", head_epochs=0, epochs=1))
    assert result.summary["initial"]["val_loss"] == pytest.approx(expected_loss, rel=1e-4, abs=1e-5)
    assert result.summary["initial"]["val_acc"] == pytest.approx(float(np.mean(fitted.head.predict(X) == names)))
    # The probe was refit on train + val, so its val score is in-sample: the best is a fine-tuned epoch.
    assert result.best_epoch == 1 and result.summary["initial"]["candidate"] is False


@pytest.mark.parametrize("n_classes", [2, 4])
def test_folded_linear_layer_equals_the_probe(n_classes: int) -> None:
    rng = np.random.default_rng(n_classes)
    X = rng.normal(3.0, 2.0, size=(200, 16)).astype(np.float32)
    y = np.array([f"c{i}" for i in rng.integers(0, n_classes, 200)])
    X += (np.searchsorted(np.unique(y), y)[:, None] == np.arange(16) % n_classes) * 2.0
    probe = LogisticProbe(Cs=[0.5]).fit(X, y)
    order = list(np.unique(y))[::-1]  # the dataset may order classes differently than the probe
    W, b = linear_from_probe(probe, order)
    logits = torch.from_numpy(X) @ torch.from_numpy(W).T + torch.from_numpy(b)
    ours = torch.softmax(logits.double(), 1).numpy()
    theirs = probe.predict_proba(X)[:, [list(probe.classes_).index(c) for c in order]]
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-6)
    with pytest.raises(FineTuneError, match="classes"):
        linear_from_probe(probe, [*order, "other"])
    with pytest.raises(FineTuneError, match="L2-normalised"):
        linear_from_probe(LogisticProbe(Cs=[0.5], normalize="l2").fit(X, y), order)


def test_a_head_for_another_backbone_is_refused(image_tree: Path, run: RunConfig, tmp_path: Path, spec: BackboneSpec) -> None:
    other = BackboneSpec(name="test_vit", pretrained=False, preprocess={"input_size": 64}, precision="fp32", dtype="float32")
    exported = embedpipe.extract(image_tree, other, cache_dir=tmp_path / "cache", run=run)
    fit_head(exported.path, "logreg", out=tmp_path / "vit-head", params={"Cs": 3})
    with pytest.raises(HeadError, match="another backbone or preprocessing"):
        fine_tune(image_tree, spec, out=tmp_path / "run", init_head=tmp_path / "vit-head", cache_dir=tmp_path / "cache", run=run)
    assert not (tmp_path / "run" / "best.safetensors").exists()


# --------------------------------------------------------------------------- resume and the command line


@pytest.mark.slow  # ~30 s on 2 cores: two processes start torch and timm
def test_a_killed_run_resumes_and_ends_as_an_uninterrupted_one(image_tree: Path, tmp_path: Path) -> None:
    args = ["fine-tune", str(image_tree), "-b", "test_resnet", "--no-pretrained", "--img-size", "64", "--precision", "fp32",
            "--workers", "0", "--batch-size", "8", "--augment", "standard", "--head-epochs", "1", "--epochs", "3",
            "--patience", "20", "--lr", "1e-3", "--unfreeze", "top:2", "--cache-dir", str(tmp_path / "cache")]
    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    process = subprocess.Popen([sys.executable, "-m", "embedpipe", *args, "--out", str(out)], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not (out / "last.safetensors").exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    with safe_open(str(out / "last.safetensors"), "pt") as handle:  # the run state rides in the checkpoint's header
        done_before = len(json.loads(handle.metadata()["state"])["history"])
    assert 1 <= done_before < 4 and not (out / "summary.json").exists()
    config_json = (out / "config.json").read_bytes()
    again = cli(*args, "--out", str(out))
    assert again.returncode != 0 and "--resume" in again.stderr
    assert (out / "config.json").read_bytes() == config_json  # refused before anything is written
    resumed = cli(*args, "--out", str(out), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "best checkpoint" in resumed.stdout
    # The same run, uninterrupted, through the library.
    spec = BackboneSpec(name="test_resnet", pretrained=False, preprocess={"input_size": 64}, precision="fp32")
    config = FineTuneConfig(batch_size=8, augment="standard", head_epochs=1, epochs=3, patience=20, lr=1e-3, unfreeze="top:2")
    whole = fine_tune(image_tree, spec, out=tmp_path / "whole", config=config, cache_dir=tmp_path / "cache",
                      run=RunConfig(device="cpu", batch_size=8, num_workers=0))
    ours = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in ours] == [1, 2, 3, 4]
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in ours] == [
        {k: v for k, v in r.items() if k != "seconds"} for r in whole.history
    ]
    a, b = load_file(out / "best.safetensors"), load_file(whole.best_checkpoint)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--unfreeze", "top:x"], "unknown --unfreeze"),
        (["--unfreeze", "top:99"], "more layer groups"),
        (["--init-head", "{tmp}/nothing"], "not a saved head"),
        (["--resume"], "nothing to resume"),
        (["--val-fraction", "0"], "val"),
    ],
)
def test_bad_input_gets_one_line(image_tree: Path, tmp_path: Path, extra: list[str], message: str) -> None:
    done = cli("fine-tune", str(image_tree), "-b", "test_resnet", "--no-pretrained", "--img-size", "64", "--workers", "0",
               "--epochs", "1", "--out", str(tmp_path / "run"), "--cache-dir", str(tmp_path / "cache"),
               *[a.format(tmp=tmp_path) for a in extra])
    lines = done.stderr.strip().splitlines()
    assert done.returncode != 0 and len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    assert message in lines[0] and "Traceback" not in done.stderr
