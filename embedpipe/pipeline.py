"""One library function per CLI command; the CLI only parses and prints.

>>> import embedpipe
>>> result = embedpipe.extract("path/to/images", "tf_efficientnet_lite0", cache_dir="cache")
>>> X, y, meta = embedpipe.load(result.path)
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ContextManager

import numpy as np

from . import __version__
from .cache import (
    FILE_KIND,
    ExportRequest,
    FileIndex,
    Store,
    export_name,
    list_exports,
    list_stores,
    read_attrs,
    read_export,
    remove_tmp_files,
    verify_export,
    verify_store,
    write_export,
)
from .config import (
    CACHE_FORMAT,
    OUTPUT_EMBEDDING,
    BackboneSpec,
    EmbeddingConfig,
    FineTuneConfig,
    RunConfig,
    SplitConfig,
    canonical_json,
    digest_of,
    sha256_file,
)
from .data import Dataset, load_dataset
from .distributed import rank_device
from .distributed import ranks as join_ranks
from .errors import CacheError, ImageDecodeError

if TYPE_CHECKING:
    from .report import ReportResult

logger = logging.getLogger(__name__)

# A progress factory: given a stage name and a total, a context manager
# yielding a callable that advances by n. The CLI passes tqdm bars.
ProgressFactory = Callable[[str, int], ContextManager[Callable[[int], None]]]


@contextlib.contextmanager
def _no_progress(stage: str, total: int) -> Iterator[Callable[[int], None]]:
    yield lambda n: None


@dataclass
class ExtractResult:
    """What :func:`extract` did."""

    path: Path  # the exported HDF5 file
    cache_hit: bool  # True when the exported file was already there: no forward pass
    num_images: int  # rows in the exported file
    computed: int  # images embedded in this run
    reused: int  # images whose rows came from the cache
    failed: list[tuple[str, str]] = field(default_factory=list)  # (path, reason) ledger
    dims: dict[str, int] = field(default_factory=dict)
    backbone: str = ""
    cache_key: str = ""
    device: str = ""
    seconds: float = 0.0
    images_per_second: float | None = None  # of the forward stage, when it ran

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["path"] = str(self.path)
        return data


def _versions() -> dict[str, str]:
    """Installed versions of what decides the numbers (read from metadata: nothing is imported)."""
    from importlib.metadata import PackageNotFoundError, version

    found = {"embedpipe": __version__}
    for package in ("torch", "timm", "h5py", "numpy", "pillow", "scikit-learn"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = "not installed"
    return found


def _spec(backbone: str | BackboneSpec) -> BackboneSpec:
    return BackboneSpec(name=backbone) if isinstance(backbone, str) else backbone


def resolve(backbone: str | BackboneSpec, device: str) -> EmbeddingConfig:
    """The embedding config a backbone spec gives on a device (no network built)."""
    from .backbone import resolve_embedding_config, resolve_precision

    spec = _spec(backbone)
    outputs = tuple(dict.fromkeys((OUTPUT_EMBEDDING, *spec.outputs)))  # the embedding is always stored
    return resolve_embedding_config(
        spec.name,
        weights=spec.weights,
        pretrained=spec.pretrained,
        preprocess=spec.preprocess,
        outputs=outputs,
        precision=resolve_precision(spec.precision, device),
        dtype=spec.dtype,
    )


def dataset_fingerprint(dataset: Dataset, digests: list[str], config: EmbeddingConfig) -> str:
    """Hash of everything an exported file holds: rows, labels, splits, contents, embedding config."""
    return digest_of(
        {
            "key": config.key(),
            "rows": [[r.relpath, r.label, r.split, d] for r, d in zip(dataset.records, digests)],
            "classes": list(dataset.class_names),
            "layout": dataset.layout,
            "split": dataset.split_config.to_dict() if dataset.split_config else None,
        }
    )


def extract(
    source: str | Path,
    backbone: str | BackboneSpec = BackboneSpec(),
    *,
    cache_dir: str | Path = "cache",
    split: SplitConfig | None = None,
    run: RunConfig = RunConfig(),
    progress: ProgressFactory = _no_progress,
) -> ExtractResult:
    """Embed every image of a dataset once, into the cache, and export it to one HDF5 file.

    Images already in the cache under the same embedding config (same content,
    wherever the file lives) are not recomputed; a killed run resumes where it
    stopped.

    Args:
        source: folder tree, CSV manifest or plain folder of images.
        backbone: a timm model name, or a :class:`BackboneSpec` for weights/outputs/precision.
        cache_dir: the cache folder; created when missing.
        split: how to split labelled data that comes without a split.
        run: device, batch size, workers, error policy.
        progress: progress bar factory (see :data:`ProgressFactory`).

    Returns:
        An :class:`ExtractResult`; ``result.path`` is the exported file, with
        datasets ``embeddings`` (N, D), ``labels``, ``paths``, ``split`` and
        the metadata described in the README.
    """
    from .backbone import resolve_device

    started = time.perf_counter()
    cache_dir = Path(cache_dir)
    if run.on_error not in ("skip", "fail"):
        raise CacheError(f"unknown --on-error {run.on_error!r}: use skip or fail")
    dataset = load_dataset(source, split=split)
    device = resolve_device(run.device)
    spec = _spec(backbone)
    config = resolve(spec, device)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise CacheError(f"cannot create cache folder {cache_dir} ({error.strerror}): pick a writable --cache-dir") from None

    with join_ranks(device) as ranks:
        device = rank_device(device, ranks)
        if not ranks.is_main:  # one progress bar and one report, from rank 0
            progress = _no_progress
        paths = [r.path for r in dataset.records]
        with progress("hashing", len(dataset)) as advance:
            mine = FileIndex(cache_dir).digests(ranks.share(paths), progress=advance)
        digests = ranks.unshare(ranks.gather(mine), len(paths))
        fingerprint = dataset_fingerprint(dataset, digests, config)
        path = cache_dir / export_name(dataset.name, config.backbone, fingerprint)
        attrs = read_attrs(path)
        if attrs and attrs.get("dataset_fingerprint") == fingerprint and attrs.get("cache_key") == config.key():
            failed = _ledger(path)
            _raise_on_failures(run, failed)
            return ExtractResult(
                path=path,
                cache_hit=True,
                num_images=len(dataset) - len(failed),
                computed=0,
                reused=len(dataset) - len(failed),
                failed=failed,
                dims=dict(attrs.get("dims", {})),
                backbone=config.backbone,
                cache_key=config.key(),
                device=device,
                seconds=time.perf_counter() - started,
            )

        store = Store(cache_dir, config)
        # Under torchrun rank 0 holds the store's lock for the whole job, against other jobs;
        # its ranks write their own shards side by side.
        with store.lock() if ranks.is_main else contextlib.nullcontext():
            ranks.barrier()  # the store exists and dead writers' temporary files are gone
            index = store.index()
            ranks.barrier()  # every rank saw the same shards, so all agree on what is missing
            keys = [d.encode() for d in digests]  # the store's row keys
            todo: dict[bytes, Path] = {}
            for record, key in zip(dataset.records, keys):
                if key not in index and key not in todo:
                    todo[key] = record.path
            previously_failed = [(r.relpath, index.errors[k]) for r, k in zip(dataset.records, keys) if k in index.errors]
            _raise_on_failures(run, previously_failed)
            mine_todo = dict(ranks.share(list(todo.items())))
            own = _compute(store, mine_todo, spec, config, device, run, progress, own_shards=ranks.world > 1)
            timings = ranks.gather(own)  # also waits for every rank's last shard
            forward_seconds = max(t[0] for t in timings)
            computed = sum(t[1] for t in timings)
            if ranks.is_main:
                if ranks.world > 1:
                    store.compact()
                index = store.index()
                dims = {o: store.width(index, o) for o in config.outputs}
                write_export(path, store, index, _export_request(dataset, keys, config, spec, fingerprint, dims))
            ranks.barrier()  # the export is complete before any rank reports it
    dims = dict(read_attrs(path).get("dims", {}))
    failed = _ledger(path)
    return ExtractResult(
        path=path,
        cache_hit=False,
        num_images=len(dataset) - len(failed),
        computed=computed,
        reused=len(dataset) - len(failed) - computed,
        failed=failed,
        dims=dims,
        backbone=config.backbone,
        cache_key=config.key(),
        device=device,
        seconds=time.perf_counter() - started,
        images_per_second=computed / forward_seconds if computed and forward_seconds > 0 else None,
    )


def _export_request(
    dataset: Dataset,
    keys: list[bytes],
    config: EmbeddingConfig,
    spec: BackboneSpec,
    fingerprint: str,
    dims: dict[str, int],
) -> ExportRequest:
    """What the exported file holds besides the rows: the dataset's order, labels, split and metadata."""
    return ExportRequest(
        paths=[r.relpath for r in dataset.records],
        labels=np.array([r.label for r in dataset.records], dtype=np.int64),
        split=[r.split or "" for r in dataset.records] if dataset.has_split else None,
        digests=keys,
        attrs={
            "kind": FILE_KIND,
            "format_version": CACHE_FORMAT,
            "cache_key": config.key(),
            "dataset_fingerprint": fingerprint,
            "embedding_config": config.to_dict(),
            "backbone_spec": spec.to_dict(),  # how to rebuild this backbone (predict, fine-tune)
            "backbone": config.backbone,
            "weights": config.weights,
            "preprocess": config.preprocess.to_dict(),
            "outputs": list(config.outputs),
            "precision": config.precision,
            "dtype": config.dtype,
            "dims": dims,
            "class_names": list(dataset.class_names),
            "dataset": dataset.describe(),
            "split_seed": dataset.split_config.seed if dataset.split_config else -1,
            "versions": _versions(),
        },
    )


def _ledger(path: Path) -> list[tuple[str, str]]:
    return read_export(path, outputs=[]).errors


def _raise_on_failures(run: RunConfig, failed: list[tuple[str, str]]) -> None:
    if run.on_error == "fail" and failed:
        where, reason = failed[0]
        raise ImageDecodeError(f"{where}: {reason}: fix or remove the file, or pass --on-error skip to record and go on")


def _compute(
    store: Store,
    todo: dict[bytes, Path],
    spec: BackboneSpec,
    config: EmbeddingConfig,
    device: str,
    run: RunConfig,
    progress: ProgressFactory,
    *,
    own_shards: bool = False,
) -> tuple[float, int]:
    """Embed the images in ``todo`` into the store, one committed shard per batch.

    Args:
        own_shards: compact only the shards this process wrote (other ranks write beside it).

    Returns:
        ``(seconds, images computed)``.
    """
    from .backbone import load_backbone
    from .cache import COMPACT_SHARDS
    from .inference import embed, prepare_model

    if not todo:
        return 0.0, 0
    model = prepare_model(load_backbone(spec.name, weights=spec.weights, pretrained=spec.pretrained), device, run)
    digests = list(todo)
    paths = list(todo.values())
    computed = 0
    written = 0
    started = time.perf_counter()
    with progress("embedding", len(paths)) as advance:
        for batch in embed(model, paths, config, device=device, run=run):
            errors = [(digests[row], reason) for row, reason in batch.errors]
            store.write_shard([digests[row] for row in batch.rows.tolist()], batch.outputs, errors)
            written += 1
            computed += len(batch.rows)
            advance(len(batch.rows) + len(errors))
            if errors and run.on_error == "fail":
                row, reason = batch.errors[0]
                raise ImageDecodeError(f"{paths[row]}: {reason}: fix or remove the file, or pass --on-error skip")
            for row, reason in batch.errors:
                logger.info("skipped %s: %s", paths[row], reason)
            if written % COMPACT_SHARDS == 0:
                store.compact(own=own_shards)
    seconds = time.perf_counter() - started
    store.compact(own=own_shards)
    return seconds, computed


def load(path: str | Path, *, output: str = "embeddings", split: str | None = None) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Read an exported file.

    Args:
        path: a file printed by :func:`extract`.
        output: which stored output: ``embeddings``, ``logits`` or ``stageN``.
        split: only rows of this split (``train``, ``val``, ``test``).

    Returns:
        ``(X, y, meta)``: X float32 (N, D); y int64 (N,), -1 when unlabelled; meta a
        dict with ``paths``, ``split``, ``class_names``, ``errors`` and the stored attributes.
    """
    loaded = read_export(path, outputs=[output])
    X, y, paths, split_column = loaded.arrays[output], loaded.labels, loaded.paths, loaded.split
    if split is not None:
        if split_column is None:
            raise CacheError(f"{path} has no split: load it without split=, or extract labelled data")
        keep = split_column == split
        X, y, paths, split_column = X[keep], y[keep], [p for p, k in zip(paths, keep) if k], split_column[keep]
    meta = dict(loaded.attrs)
    meta.update(paths=paths, split=split_column, errors=loaded.errors, class_names=list(loaded.attrs.get("class_names", [])))
    return X, y, meta


# --------------------------------------------------------------------------- cache housekeeping


def cache_list(cache_dir: str | Path = "cache") -> dict[str, list[dict[str, Any]]]:
    """Exported files and stores in a cache folder, as plain dicts."""
    exports = []
    for path, attrs in list_exports(cache_dir):
        if attrs is None or attrs.get("kind") != FILE_KIND:
            exports.append({"path": str(path), "error": "not a readable embedpipe file"})
            continue
        exports.append(
            {
                "path": str(path),
                "dataset": (attrs.get("dataset") or {}).get("root", ""),
                "backbone": attrs.get("backbone"),
                "rows": (attrs.get("dataset") or {}).get("num_images"),
                "dims": attrs.get("dims"),
                "bytes": path.stat().st_size,
            }
        )
    stores = [
        {
            "path": str(root),
            "key": root.name,
            "backbone": (config or {}).get("config", {}).get("backbone"),
            "weights": (config or {}).get("config", {}).get("weights"),
            "rows": rows,
            "bytes": sum(p.stat().st_size for p in root.rglob("*") if p.is_file()),
        }
        for root, config, rows in list_stores(cache_dir)
    ]
    return {"exports": exports, "stores": stores}


def cache_info(path: str | Path) -> dict[str, Any]:
    """An exported file's metadata, its shape and its error ledger."""
    loaded = read_export(path, outputs=[])
    info = dict(loaded.attrs)
    info["rows"] = len(loaded.paths)
    info["errors"] = [{"path": p, "reason": r} for p, r in loaded.errors]
    if loaded.split is not None:
        names, counts = np.unique(loaded.split, return_counts=True)
        info["split_counts"] = {str(n): int(c) for n, c in zip(names, counts)}
    return info


def cache_verify(target: str | Path, *, check_files: bool = False) -> list[str]:
    """Problems in an exported file or a whole cache folder; empty when all is sound.

    Args:
        target: an exported ``.h5`` file, or a cache folder (every export and store).
        check_files: also re-hash the dataset's image files and report those that changed.
    """
    target = Path(target)
    if not target.exists():
        raise CacheError(f"{target} does not exist: pass an exported .h5 file or a cache folder")
    problems: list[str] = []
    files = [p for p, _ in list_exports(target)] if target.is_dir() else [target]
    for file in files:
        problems += [f"{file}: {p}" for p in verify_export(file)]
        if check_files and not problems:
            loaded = read_export(file, outputs=[])
            root = Path(loaded.attrs["dataset"]["root"])
            root = root.parent if root.is_file() else root
            for rel, digest in zip(loaded.paths, loaded.digests):
                source = root / rel
                if not source.is_file():
                    problems.append(f"{file}: source image {source} is gone")
                elif sha256_file(source) != digest:
                    problems.append(f"{file}: source image {source} changed since extraction; rerun extract")
    if target.is_dir():
        for root, _, _ in list_stores(target):
            problems += [f"{root}: {p}" for p in verify_store(root)]
    return problems


def cache_remove(targets: list[str], *, cache_dir: str | Path = "cache", everything: bool = False) -> list[str]:
    """Delete exported files, stores (by key prefix or backbone name) or the whole cache; returns what went.

    Raises:
        CacheError: a target matches nothing, so a typo never passes silently.
    """
    cache_dir = Path(cache_dir)
    removed: list[str] = []
    if everything:
        if cache_dir.is_dir():
            shutil.rmtree(cache_dir)
            removed.append(str(cache_dir))
        return removed
    for target in targets:
        matched = False
        path = Path(target)
        if path.suffix == ".h5" and path.is_file():
            path.unlink()
            removed.append(str(path))
            continue
        for export, attrs in list_exports(cache_dir):
            if attrs and attrs.get("backbone") == target:
                export.unlink()
                removed.append(str(export))
                matched = True
        for root, config, _ in list_stores(cache_dir):
            backbone = (config or {}).get("config", {}).get("backbone")
            if root.name.startswith(target) or backbone == target:
                shutil.rmtree(root)
                removed.append(str(root))
                matched = True
        if not matched:
            raise CacheError(f"nothing in {cache_dir} matches {target!r}: see `embedpipe cache ls` for files and keys")
    removed += [f"{n} temporary file(s)"] if (n := remove_tmp_files(cache_dir)) else []
    return removed




# --------------------------------------------------------------------------- heads


@dataclass
class FitResult:
    """What :func:`fit_head` did."""

    head: Any  # the fitted estimator
    kind: str
    out: Path | None
    metrics: dict[str, dict[str, Any]]  # split -> metrics (see embedpipe.evaluate)
    chosen: dict[str, Any]  # the hyper-parameter picked on validation (C, k, best epoch)
    fit_seconds: float
    diagnosis: str
    n_train: int = 0
    n_val: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "out": str(self.out) if self.out else None,
            "metrics": self.metrics,
            "chosen": self.chosen,
            "fit_seconds": self.fit_seconds,
            "diagnosis": self.diagnosis,
            "n_train": self.n_train,
            "n_val": self.n_val,
        }


# Heads whose fit ends with a refit on train + val -> their chosen hyper-parameter, fixed.
_REFIT_ON_VAL: dict[str, Callable[[Any], dict[str, Any]]] = {
    "logreg": lambda head: {"Cs": [head.C_]},
    "knn": lambda head: {"k": head.k_},
}


def few_shot_indices(labels: np.ndarray, shots: int, *, seed: int) -> np.ndarray:
    """``shots`` examples per class (all of a smaller class), chosen by ``seed``; sorted row indices."""
    rng = np.random.default_rng(seed)
    chosen = [rng.permutation(np.flatnonzero(labels == c))[:shots] for c in np.unique(labels)]
    return np.sort(np.concatenate(chosen))


def _chosen(head: Any) -> dict[str, Any]:
    found = {name.rstrip("_"): getattr(head, name) for name in ("C_", "k_", "best_epoch_") if hasattr(head, name)}
    return {k: (v.item() if isinstance(v, np.generic) else v) for k, v in found.items()}


def fit_head(
    embeddings: str | Path,
    kind: str = "logreg",
    *,
    out: str | Path | None = None,
    params: dict[str, Any] | None = None,
    shots: int | None = None,
    seed: int = 0,
    output: str = "embeddings",
    holdout: bool = False,
    loaded: tuple[np.ndarray, np.ndarray, dict[str, Any]] | None = None,
) -> FitResult:
    """Fit a head on an exported file's train split, choose its hyper-parameter on val, report every split.

    Args:
        embeddings: a file written by :func:`extract` (labelled data).
        kind: ``logreg``, ``mlp`` or ``knn`` (:data:`embedpipe.heads.HEADS`).
        out: folder to save the head to (``head.json`` + ``arrays.safetensors``); None to not save.
        params: the head's keyword parameters (e.g. ``{"Cs": 20, "solver": "sklearn"}``).
        shots: keep only this many training images per class (few-shot), chosen by ``seed``.
        seed: few-shot sampling seed.
        output: which stored output to train on.
        holdout: ignore the val split while fitting: the head holds out its own validation share of
            the training rows to choose its hyper-parameter, so it sees no labels but those rows'
            (how ``bench`` counts a label budget); val is then scored as unseen data.
        loaded: what ``load(embeddings, output=output)`` returned, when the caller has it already
            (``bench`` fits many heads on one file and reads it once).
    """
    from .errors import HeadError
    from .evaluate import classification_metrics, diagnose
    from sklearn.base import clone

    from .headfile import save_head
    from .heads import HEADS

    if kind not in HEADS:
        raise HeadError(f"unknown head {kind!r}: choose one of {', '.join(HEADS)}")
    X, y, meta = load(embeddings, output=output) if loaded is None else loaded
    classes = np.asarray(meta["class_names"])
    if not len(classes) or (y < 0).all():
        raise HeadError(f"{embeddings} holds unlabelled images: extract a labelled dataset (class folders or a manifest with labels)")
    if meta["split"] is None:
        raise HeadError(f"{embeddings} has no split: re-extract it (labelled data gets a seeded split)")
    split = meta["split"]
    names = classes[y]
    parts = {s: np.flatnonzero(split == s) for s in ("train", "val", "test")}
    train = parts["train"]
    if shots is not None:
        if shots < 1:
            raise HeadError(f"--shots must be at least 1, not {shots}")
        train = train[few_shot_indices(y[train], shots, seed=seed)]
    if not len(train):
        raise HeadError(f"{embeddings} has no training rows: check its split (embedpipe cache info)")
    head = HEADS[kind](**(params or {}))
    val = parts["val"]
    started = time.perf_counter()
    if not holdout and len(val) and set(np.unique(names[val])) <= set(np.unique(names[train])):
        head.fit(X[train], names[train], X_val=X[val], y_val=names[val])
    else:
        head.fit(X[train], names[train])  # the head holds out its own validation share
    fit_seconds = time.perf_counter() - started
    metrics = {}
    for name, rows in (("train", train), ("val", val), ("test", parts["test"])):
        if len(rows):
            scorer = head
            if name == "val" and kind in _REFIT_ON_VAL and not holdout:
                # This head refits on train + val, so it has seen val: score val with the same
                # hyper-parameter fitted on train alone.
                scorer = clone(head).set_params(**_REFIT_ON_VAL[kind](head)).fit(X[train], names[train])
            metrics[name] = classification_metrics(names[rows], scorer.predict_proba(X[rows]), head.classes_)
    reference = metrics.get("val") or metrics.get("test") or metrics["train"]
    diagnosis = diagnose(metrics["train"]["accuracy"], reference["accuracy"], chance=1 / len(head.classes_))
    result = FitResult(
        head=head,
        kind=kind,
        out=Path(out) if out else None,
        metrics=metrics,
        chosen=_chosen(head),
        fit_seconds=fit_seconds,
        diagnosis=diagnosis,
        n_train=len(train),
        n_val=len(val),
    )
    if out:
        save_head(
            out,
            head,
            {
                "kind": kind,
                "output": output,
                "backbone_spec": meta.get("backbone_spec"),
                "embedding_config": meta["embedding_config"],
                "cache_key": meta["cache_key"],
                "class_names": classes.tolist(),
                "trained_on": {"file": str(Path(embeddings).resolve()), "dataset_fingerprint": meta["dataset_fingerprint"],
                               "rows": int(len(train)), "shots": shots, "seed": seed,
                               "holdout": holdout},
                "metrics": metrics,
                "chosen": result.chosen,
                "fit_seconds": fit_seconds,
                "versions": _versions(),
            },
        )
    return result


def _check_same_pipeline(info: dict[str, Any], attrs: dict[str, Any], where: str) -> None:
    from .errors import HeadError

    if info["cache_key"] != attrs.get("cache_key"):
        ours, theirs = info["embedding_config"], attrs.get("embedding_config") or {}
        differs = [k for k in ours if ours.get(k) != theirs.get(k)]
        raise HeadError(
            f"{where} was made with another backbone or preprocessing than the head expects "
            f"(differs in: {', '.join(differs) or 'format'}; head wants {ours.get('backbone')} {ours.get('weights', '')[:20]}): "
            "extract with the head's backbone options, or fit a head on these embeddings"
        )


def evaluate(head_path: str | Path, embeddings: str | Path, *, split: str | None = None) -> dict[str, Any]:
    """Metrics of a saved head on an exported file (one split, or each split it has).

    Raises:
        HeadError: the file was made with another backbone/preprocessing, or has no labels.
    """
    from .errors import HeadError
    from .evaluate import classification_metrics
    from .headfile import load_head

    head, info = load_head(head_path)
    X, y, meta = load(embeddings, output=info.get("output", "embeddings"))
    _check_same_pipeline(info, meta, str(embeddings))
    if (y < 0).all():
        raise HeadError(f"{embeddings} has no labels to evaluate against: use `embedpipe predict` for unlabelled images")
    names = np.asarray(meta["class_names"])[y]
    unknown = sorted(set(names) - set(head.classes_.tolist()))
    if unknown:
        raise HeadError(f"{embeddings} has classes the head never saw ({', '.join(unknown[:5])}): fit a head that includes them")
    groups = {"all": np.arange(len(y))} if meta["split"] is None else {s: np.flatnonzero(meta["split"] == s) for s in np.unique(meta["split"])}
    if split is not None:
        if split not in groups:
            raise HeadError(f"{embeddings} has no {split!r} split (it has {', '.join(groups)})")
        groups = {split: groups[split]}
    return {name: classification_metrics(names[rows], head.predict_proba(X[rows]), head.classes_) for name, rows in groups.items() if len(rows)}


@dataclass
class Prediction:
    path: str
    label: str
    top: list[tuple[str, float]]  # (class, probability), most probable first


def predict(
    head_path: str | Path,
    source: str | Path,
    *,
    top_k: int = 3,
    cache_dir: str | Path = "cache",
    run: RunConfig = RunConfig(),
    progress: ProgressFactory = _no_progress,
) -> tuple[list[Prediction], list[tuple[str, str]]]:
    """Images -> the head's backbone (through the cache) -> the head -> labels.

    Returns:
        ``(predictions, failed)``: one :class:`Prediction` per decodable image, and the
        (path, reason) of images that could not be read.
    """
    from .config import PreprocessConfig
    from .headfile import load_head

    head, info = load_head(head_path)
    stored = info.get("backbone_spec") or {}
    config = info["embedding_config"]
    # The head's own precision and dtype, so the cache key matches whatever device this runs on.
    spec = BackboneSpec(
        name=stored.get("name", config["backbone"]),
        weights=stored.get("weights"),
        pretrained=stored.get("pretrained", True),
        outputs=tuple(config["outputs"]),
        precision=config["precision"],
        dtype=config["dtype"],
        preprocess=PreprocessConfig.from_dict(config["preprocess"]).to_dict(),
    )
    result = extract(source, spec, cache_dir=cache_dir, run=run, progress=progress)
    X, _, meta = load(result.path, output=info.get("output", "embeddings"))
    _check_same_pipeline(info, meta, str(result.path))
    proba = head.predict_proba(X) if len(X) else np.empty((0, len(head.classes_)))
    k = max(1, min(top_k, len(head.classes_)))
    order = np.argsort(-proba, axis=1)[:, :k]
    predictions = [
        Prediction(path=p, label=str(head.classes_[o[0]]), top=[(str(head.classes_[j]), float(row[j])) for j in o])
        for p, row, o in zip(meta["paths"], proba, order)
    ]
    return predictions, result.failed


# --------------------------------------------------------------------------- bench and report


@dataclass
class BenchResult:
    """What :func:`bench` did."""

    out: Path  # the results folder
    records: list[dict[str, Any]]  # every record written to results.json (runs, failures, summaries)
    summaries: list[dict[str, Any]]  # one per (backbone, head, shots), mean and std over seeds
    errors: list[dict[str, Any]]  # the failure records
    fitted: int  # head fits run now (the rest came from --skip-existing)
    reused: int  # runs taken from the stored results
    report: ReportResult  # what was rendered: report.html, the plots, the headline


def _throughput_sample(spec: BackboneSpec, config: EmbeddingConfig, paths: list[Path], device: str, run: RunConfig) -> tuple[float | None, int | None]:
    """Images/s and peak memory of the extraction loop on a few images, for backbones that came from the cache."""
    from .backbone import load_backbone
    from .bench import PeakMemory
    from .inference import embed, prepare_model

    if not paths:
        return None, None
    with PeakMemory(device) as memory:
        model = prepare_model(load_backbone(spec.name, weights=spec.weights, pretrained=spec.pretrained), device, run)
        done = 0
        started = time.perf_counter()
        for batch in embed(model, paths, config, device=device, run=run):
            done += len(batch.rows)
        seconds = time.perf_counter() - started
    return (done / seconds if done and seconds > 0 else None), memory.peak_bytes


def _fine_tune_stage() -> Callable[..., Any]:
    """The fine-tune stage's library function, which ``--baseline scratch`` trains with."""
    stage = globals().get("fine_tune")
    if stage is None:
        from .bench import BenchError

        raise BenchError("--baseline scratch needs the fine-tune stage (embedpipe.pipeline.fine_tune), which this embedpipe "
                         "does not have: run the bench without --baseline, or install an embedpipe with `embedpipe fine-tune`")
    return stage


def _scratch_records(source: str | Path, spec: BackboneSpec, *, shots: list[int | str], seeds: list[int], out: Path,
                     split: SplitConfig, run: RunConfig, common: dict[str, Any],
                     previous: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """``--baseline scratch``: the same architecture trained from random initialisation on each label budget.

    Each (shots, seed) trains into ``out/scratch/<backbone>-<shots>-s<seed>/`` and becomes a record with
    ``head == "scratch"`` (:func:`embedpipe.bench.scratch_record`, read from that run's ``summary.json``),
    which the report draws dashed on the shots plot. The settings are the fine-tune stage's own recipe
    for a from-scratch baseline (every layer trains, no head-only phase, BatchNorm in train mode, LR 1e-3).
    A budget of K trains on the K-per-class rows ``few_shot_indices`` picks from the train split with the
    same seed, as the frozen heads' rows do; early stopping watches the whole val split.
    """
    from dataclasses import replace

    from .bench import ALL, SCRATCH, run_key, scratch_record

    fine_tune = _fine_tune_stage()
    from .config import FineTuneConfig  # type: ignore[attr-defined]  # arrives with the fine-tune stage

    records = []
    for budget in shots:
        for seed in seeds:
            key = run_key(source=common["source"], spec=spec, split=split, head=SCRATCH, params={}, shots=budget, seed=seed)
            if key in previous:  # --skip-existing
                records.append(previous[key])
                continue
            run_dir = out / "scratch" / f"{spec.name}-{budget}-s{seed}"
            error: BaseException | None = None
            try:
                config = FineTuneConfig(unfreeze="all", head_epochs=0, train_bn=True, lr=1e-3, seed=seed,
                                        shots=None if budget == ALL else int(budget))
                fine_tune(source, replace(spec, pretrained=False), out=run_dir, split=split, run=run, config=config)
            except Exception as failure:  # noqa: BLE001 - a failed baseline run becomes a row, like any other
                error = failure
            records.append(scratch_record(common, spec=spec, split=split, shots=budget, seed=seed, run_dir=run_dir, error=error))
    return records


def _bench_cell(embeddings: Path, loaded: tuple[np.ndarray, np.ndarray, dict[str, Any]], backbone: str,
                cell: tuple[str, dict[str, Any], int | str, int, str], fields: dict[str, Any]) -> dict[str, Any]:
    """Fit one head of the grid on a backbone's cached features; its run record, or its failure record."""
    from .bench import ALL, fit_metrics, head_protocol
    from .heads import HEADS

    kind, params, budget, seed, key = cell
    record = {**fields, "record": "run", "created": _now(), "run_id": key, "head": kind, "shots": budget,
              "seed": seed, "head_params": json.dumps(params, sort_keys=True), **head_protocol(kind, params)}
    accepted = HEADS[kind]().get_params()
    fit_params = {**({"random_state": seed} if "random_state" in accepted else {}), **params}
    try:
        fit = fit_head(embeddings, kind, params=fit_params, shots=None if budget == ALL else int(budget), seed=seed,
                       holdout=True, loaded=loaded)
    except Exception as error:  # noqa: BLE001 - a head that cannot fit (too few labels, out of memory) becomes a row
        logger.warning("%s + %s, shots %s, seed %s failed: %s", backbone, kind, budget, seed, error)
        return {**record, "record": "error", "error": str(error), "error_type": type(error).__name__}
    return {**record, **fit_metrics(fit.metrics, fit.chosen, n_train=fit.n_train, fit_seconds=fit.fit_seconds,
                                    classes=fit.head.classes_)}


def bench(
    source: str | Path,
    backbones: Sequence[str | BackboneSpec],
    *,
    heads: Sequence[str] = ("logreg", "knn"),
    shots: Sequence[int | str] = ("all",),
    seeds: int | Sequence[int] = 3,
    out: str | Path,
    cache_dir: str | Path = "cache",
    split: SplitConfig | None = None,
    run: RunConfig = RunConfig(),
    skip_existing: bool = False,
    head_params: dict[str, dict[str, Any]] | None = None,
    baseline: str | None = None,
    finetune_runs: Sequence[str | Path] = (),
    progress: ProgressFactory = _no_progress,
) -> BenchResult:
    """Backbones x heads x shots x seeds on one dataset: one extraction per backbone, every head on its cached features.

    Every head sees only its training rows' labels (``shots`` per class drawn by the seed, or the
    whole train split for ``"all"``) and chooses its hyper-parameter on a share of them it holds out;
    every row is scored on the same test split. A backbone or a fit that fails becomes a record with
    its error and the grid goes on. Results are written after each backbone, so a killed bench
    resumes with ``skip_existing``.

    Args:
        source: folder tree or CSV manifest of labelled images.
        backbones: timm names or :class:`BackboneSpec` (weights, precision, preprocessing, pretrained).
        heads: names in :data:`embedpipe.heads.HEADS`.
        shots: training images per class, ints or ``"all"``.
        seeds: how many seeds (0..n-1), or the seeds themselves; a seed draws the few-shot sample and seeds the head.
        out: results folder: ``results.json``, ``results.csv``, ``report.html``, ``*.png``; ``{machine}`` in
            it becomes the machine's name (``cpu-amd-epyc-2c``), as in benchmarks/results/.
        cache_dir: the embedding cache (already cached backbones are not recomputed).
        split: how to split data that comes without a split.
        run: device, batch size, workers.
        skip_existing: keep finished runs from ``out/results.json`` whose inputs are unchanged (same
            run id); failed ones are retried.
        head_params: head name -> keyword parameters (e.g. ``{"logreg": {"Cs": 20}}``).
        baseline: ``"scratch"``: also train each architecture from random initialisation on each
            label budget (needs the fine-tune stage).
        finetune_runs: fine-tune run folders to show in the report (copied into ``out/finetune/``).
        progress: progress bar factory for the extractions.
    """
    from .backbone import parameter_count, resolve_device
    from .bench import (BENCH_FORMAT, THROUGHPUT_SAMPLE, BenchError, PeakMemory, backbone_record, environment, parse_shots,
                        read_results, run_key, session_id, write_results)
    from .heads import HEADS
    from .report import read_finetune_run, render, summarise

    split = split or SplitConfig()
    specs = [_spec(b) for b in backbones]
    if not specs:
        raise BenchError("no backbones to bench: pass at least one")
    unknown = [h for h in heads if h not in HEADS]
    if unknown or not heads:
        raise BenchError(f"unknown head(s) {', '.join(unknown) or '(none given)'}: choose from {', '.join(HEADS)}")
    budgets = parse_shots(list(shots))
    seed_list = list(range(seeds)) if isinstance(seeds, int) else list(dict.fromkeys(seeds))
    if not seed_list:
        raise BenchError("no seeds: pass --seeds 1 or more")
    if baseline not in (None, "scratch"):
        raise BenchError(f"unknown --baseline {baseline!r}: the one baseline is 'scratch'")
    if baseline == "scratch":
        _fine_tune_stage()  # fail before hours of extraction, not after
    for folder in finetune_runs:
        read_finetune_run(folder)  # fail early on a wrong folder
    head_params = head_params or {}
    dataset = load_dataset(source, split=split)
    source_id = str(dataset.root)
    device = resolve_device(run.device)
    env = {f"env_{k}": v for k, v in environment(device).items()}
    out = Path(str(out).replace("{machine}", env["env_machine"]))  # results folders name the machine they ran on
    session = session_id()
    previous = {}
    if skip_existing:
        previous = {r["run_id"]: r for r in read_results(out) if r.get("record") == "run" and not r.get("error")}
    elif (out / "results.json").exists():
        logger.info("overwriting %s (pass skip_existing to resume it)", out / "results.json")

    records: list[dict[str, Any]] = []
    fitted = reused = 0

    def save() -> None:
        write_results(out, records + summarise(records))

    for spec in specs:
        base = {"bench_format": BENCH_FORMAT, "session": session, "dataset": dataset.name, "source": source_id, "backbone": spec.name,
                "pretrained": spec.pretrained, **env}
        cells = []
        for kind in heads:
            params = {**head_params.get(kind, {})}
            for budget in budgets:
                for seed in seed_list:
                    key = run_key(source=source_id, spec=spec, split=split, head=kind, params=params, shots=budget, seed=seed)
                    cells.append((kind, params, budget, seed, key))
        todo = [c for c in cells if c[4] not in previous]
        records += [previous[c[4]] for c in cells if c[4] in previous]
        reused += len(cells) - len(todo)
        if not todo:
            logger.info("%s: every run is in the stored results", spec.name)
            continue
        try:
            with PeakMemory(device) as memory:
                extracted = extract(source, spec, cache_dir=cache_dir, split=split, run=run, progress=progress)
            config = resolve(spec, device)
            rate, peak, how = extracted.images_per_second, memory.peak_bytes, "extraction"
            if rate is None or extracted.computed < min(THROUGHPUT_SAMPLE, extracted.num_images):
                sample = [r.path for r in dataset.records[:THROUGHPUT_SAMPLE]]
                rate, peak = _throughput_sample(spec, config, sample, device, run)
                how = f"sample of {len(sample)} images"
            params_count = parameter_count(spec.name)
        except Exception as error:  # noqa: BLE001 - any backbone failure (name, weights, memory) becomes a row
            logger.warning("%s failed: %s", spec.name, error)
            records.append({**base, "record": "error", "created": _now(), "run_id": "", "head": None, "shots": None, "seed": None,
                            "error": str(error).splitlines()[0] if str(error) else type(error).__name__,
                            "error_type": type(error).__name__})
            save()
            continue
        loaded = load(extracted.path, output="embeddings")  # once: every head, budget and seed fits on it
        _, labels, meta = loaded
        backbone_fields = {
            **base, **backbone_record(config, labels, meta, split), "embedding_dim": extracted.dims.get(OUTPUT_EMBEDDING),
            "param_count": params_count, "extract_images_per_second": rate, "throughput_source": how,
            "extract_seconds": extracted.seconds, "cache_hit": extracted.cache_hit, "peak_memory_bytes": peak,
            "peak_memory_kind": memory.kind, "device": device, "embeddings_file": str(extracted.path),
        }
        with progress(f"{spec.name}: head fits", len(todo)) as advance:
            for cell in todo:
                records.append(_bench_cell(extracted.path, loaded, spec.name, cell, backbone_fields))
                fitted += records[-1]["record"] == "run"
                advance(1)
        save()
    if baseline == "scratch":
        for spec in specs:
            common = {"bench_format": BENCH_FORMAT, "session": session, "dataset": dataset.name, "source": source_id, **env}
            records += _scratch_records(source, spec, shots=budgets, seeds=seed_list, out=out, split=split, run=run, common=common,
                                        previous=previous)
            save()
    _keep_finetune_runs(out, finetune_runs)
    save()
    stored = read_results(out)  # render from what is stored, so `embedpipe report` gives the same bytes
    result = render(out, stored)
    errors = [r for r in stored if r.get("error")]
    return BenchResult(out=out, records=stored, summaries=result.summaries, errors=errors, fitted=fitted, reused=reused, report=result)


def report(out: str | Path, *, finetune_runs: Sequence[str | Path] = ()) -> ReportResult:
    """Re-render ``report.html`` and the plots of a bench folder from its ``results.json``.

    Args:
        out: a folder written by :func:`bench`.
        finetune_runs: more fine-tune run folders to show (copied into ``out/finetune/``).

    Returns:
        What was rendered (:class:`embedpipe.report.ReportResult`).
    """
    from .bench import BenchError, read_results
    from .report import read_finetune_run, render

    out = Path(out)
    records = read_results(out)
    if not records:
        raise BenchError(f"{out} has no results.json: pass a folder written by `embedpipe bench --out`")
    for folder in finetune_runs:
        read_finetune_run(folder)  # all readable before any is copied
    _keep_finetune_runs(out, finetune_runs)
    return render(out, records)


def _keep_finetune_runs(out: Path, folders: Sequence[str | Path]) -> None:
    """Copy fine-tune runs' ``metrics.jsonl`` and ``summary.json`` into ``out/finetune/<name>/``, so the report re-renders alone."""
    from .bench import FINETUNE_DIR

    for folder in folders:
        target = out / FINETUNE_DIR / Path(folder).resolve().name
        target.mkdir(parents=True, exist_ok=True)
        for name in ("metrics.jsonl", "summary.json"):
            shutil.copyfile(Path(folder) / name, target / name)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())


# --------------------------------------------------------------------------- fine-tune


@dataclass
class FineTuneResult:
    """What :func:`fine_tune` did; everything is also in ``out/summary.json``."""

    out: Path  # the run folder
    best_checkpoint: Path  # out/best.safetensors: timm key names, for `extract --weights`
    head: Path | None  # out/head: the trained classifier as a saved head (for `predict`)
    best_epoch: int  # 0: the starting weights were never beaten
    stopped_epoch: int
    stop_reason: str  # max_epochs, patience or non_finite_loss
    history: list[dict[str, Any]]  # one record per epoch, as in metrics.jsonl
    test: dict[str, Any] | None  # metrics of the best weights on the test split (None without one)
    val: dict[str, Any]
    peak_memory_bytes: int
    memory: dict[str, int]  # phase (head, finetune) -> peak bytes (CUDA allocated, or process RSS on CPU)
    seconds: float
    summary: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return self.summary


def _preprocess_flags(preprocess: Any) -> list[str]:
    """CLI flags that pin a PreprocessConfig, for the printed extract command."""
    _, h, w = preprocess.input_size
    flags = ["--img-size", str(h)] if h == w else []
    flags += ["--crop-pct", f"{preprocess.crop_pct:g}", "--interpolation", preprocess.interpolation,
              "--mean", ",".join(f"{v:g}" for v in preprocess.mean), "--std", ",".join(f"{v:g}" for v in preprocess.std)]
    return flags


def fine_tune(
    source: str | Path,
    backbone: str | BackboneSpec = BackboneSpec(),
    *,
    out: str | Path,
    config: FineTuneConfig = FineTuneConfig(),
    init_head: str | Path | None = None,
    resume: bool = False,
    cache_dir: str | Path = "cache",
    split: SplitConfig | None = None,
    run: RunConfig = RunConfig(),
    progress: ProgressFactory = _no_progress,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
) -> FineTuneResult:
    """Fine-tune a backbone and a linear classifier on a labelled dataset, with early stopping on val.

    A from-scratch baseline of the same architecture: ``BackboneSpec(name, pretrained=False)`` with
    ``FineTuneConfig(unfreeze="all", head_epochs=0, train_bn=True, lr=1e-3)``.

    Args:
        source: folder tree or CSV manifest with labels (as for :func:`extract`); needs a val split
            (a seeded one is made when the data has none).
        backbone: a timm model name or a :class:`BackboneSpec` (weights, preprocessing, precision).
        out: the run folder: best.safetensors, last.safetensors, head/, config.json, metrics.jsonl,
            metrics.csv, summary.json, curves.png.
        config: how to train (:class:`~embedpipe.config.FineTuneConfig`).
        init_head: a logreg head saved by :func:`fit_head` on this backbone's embeddings of this
            data's classes; its linear map (standardisation folded in) starts the classifier.
        resume: continue the run in ``out`` from its last finished epoch.
        cache_dir: the cache folder (its file-hash index fingerprints the data for ``resume``).
        split: how to split labelled data that comes without a split.
        run: device, evaluation batch size, workers, channels_last, error policy.
        progress: progress bar factory, one bar per epoch.
        on_epoch: called with each epoch's record as it finishes.

    Raises:
        FineTuneError: bad options, no val split, a foreign run in ``out``.
        HeadError: ``init_head`` made for another backbone, preprocessing or classes.
    """
    import torch

    from . import finetune as ft
    from .backbone import load_backbone, resolve_device
    from .errors import FineTuneError, HeadError
    from .headfile import load_head, save_head

    started = time.perf_counter()
    ft.check_config(config)
    out = Path(out)
    ft.check_out_folder(out, resume=resume)
    dataset = load_dataset(source, split=split)
    if not dataset.labelled:
        raise FineTuneError(f"{source} holds unlabelled images: fine-tune needs class folders or a manifest with labels")
    parts = {name: ft.Split(tuple(str(r.path) for r in dataset.records if r.split == name),
                            tuple(r.label for r in dataset.records if r.split == name)) for name in ("train", "val", "test")}
    if config.shots is not None:  # the few-shot rows fit-head --shots and the bench choose, same seed
        if config.shots < 1:
            raise FineTuneError(f"--shots {config.shots}: give a positive number of images per class")
        train = parts["train"]
        keep = few_shot_indices(np.asarray(train.labels), config.shots, seed=config.seed)
        parts["train"] = ft.Split(tuple(train.paths[i] for i in keep), tuple(train.labels[i] for i in keep))
    if not len(parts["train"]) or not len(parts["val"]):
        raise FineTuneError(
            f"{source} has {len(parts['train'])} train and {len(parts['val'])} val images: fine-tune needs both "
            "(add a val/ folder or split column, or raise --val-fraction for a seeded split)"
        )
    splits = ft.Splits(train=parts["train"], val=parts["val"], test=parts["test"], class_names=tuple(dataset.class_names))
    device = resolve_device(run.device)
    spec = _spec(backbone)
    embedding = resolve(spec, device)
    _mkdir(Path(cache_dir))
    digests = FileIndex(Path(cache_dir)).digests([r.path for r in dataset.records])
    classes = list(dataset.class_names)

    init = None
    head_info: dict[str, Any] | None = None
    if init_head is not None:
        probe, head_info = load_head(init_head)
        theirs = head_info.get("embedding_config") or {}
        ours = embedding.to_dict()
        differs = [k for k in ("backbone", "weights", "preprocess") if canonical_json(theirs.get(k)) != canonical_json(ours[k])]
        if differs:
            raise HeadError(
                f"{init_head} was fitted on embeddings of another backbone or preprocessing (differs in: {', '.join(differs)}; "
                f"head: {theirs.get('backbone')} {str(theirs.get('weights', ''))[:20]}): fit a head on this backbone's "
                "embeddings (embedpipe extract + fit-head with the same backbone options), or drop --init-head"
            )
        if head_info.get("kind") != "logreg" or head_info.get("output", "embeddings") != "embeddings":
            raise HeadError(f"{init_head} is a {head_info.get('kind')} head on {head_info.get('output')}: "
                            "--init-head takes a logreg head fitted on embeddings (embedpipe fit-head --head logreg)")
        try:
            init = ft.linear_from_probe(probe, classes)
        except FineTuneError as error:
            raise HeadError(f"{init_head}: {error}") from None

    identity = {
        "config": config.to_dict(),
        "backbone": spec.to_dict(),
        "embedding_key": embedding.key(),
        "data": dataset_fingerprint(dataset, digests, embedding),
        "classes": classes,
        "init_head": head_info.get("cache_key") if head_info else None,
    }
    model = load_backbone(spec.name, weights=spec.weights, pretrained=spec.pretrained)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model.reset_classifier(len(classes))
    if init is not None:
        classifier = model.get_classifier()
        if tuple(classifier.weight.shape) != init[0].shape:
            raise HeadError(f"{init_head} maps {init[0].shape[1]} features, {spec.name}'s classifier takes "
                            f"{classifier.weight.shape[1]}: fit the head on this backbone's embeddings")
        with torch.no_grad():
            classifier.weight.copy_(torch.from_numpy(init[0]))
            classifier.bias.copy_(torch.from_numpy(init[1]))
    model = model.to(device)
    if run.channels_last:
        model = model.to(memory_format=torch.channels_last)
    out.mkdir(parents=True, exist_ok=True)
    if not resume:
        ft.write_json(out / ft.CONFIG_FILE, {
            "fine_tune": config.to_dict(), "backbone": spec.to_dict(), "embedding_config": embedding.to_dict(),
            "source": str(Path(source).resolve()), "split": dataset.describe(), "classes": classes,
            "init_head": str(Path(init_head).resolve()) if init_head else None, "device": device, "versions": _versions(),
        })
    # auto trains in fp32 on CPU: bf16 autocast, 2x faster for inference there, made a training step of
    # tf_efficientnet_lite0 1.3-2x slower than fp32 on 2 Xeon cores (its backward kernels).
    precision = "fp32" if spec.precision == "auto" and device == "cpu" else embedding.precision
    outcome = ft.train(model, splits=splits, preprocess=embedding.preprocess, precision=precision,
                       device=device, config=config, run=run, out=out, identity=identity, resume=resume,
                       progress=progress, on_epoch=on_epoch,
                       # A logreg head is refit on train + val, so its val score at epoch 0 is in-sample:
                       # the best checkpoint is chosen among the fine-tuned epochs.
                       initial_is_candidate=init is None)

    best = out / ft.BEST_FILE
    # The saved head: the trained classifier on the fine-tuned backbone's embeddings.
    head_spec = BackboneSpec(name=spec.name, weights=str(best.resolve()), pretrained=True, outputs=(OUTPUT_EMBEDDING,),
                             precision=embedding.precision, dtype=spec.dtype, preprocess=embedding.preprocess.to_dict())
    head_embedding = resolve(head_spec, device)
    head_path: Path | None = out / ft.HEAD_DIR
    try:
        weight, bias = outcome.classifier
        save_head(head_path, ft.head_from_classifier(weight, bias, classes), {
            "kind": "logreg", "output": "embeddings", "backbone_spec": head_spec.to_dict(),
            "embedding_config": head_embedding.to_dict(), "cache_key": head_embedding.key(), "class_names": classes,
            "trained_on": {"fine_tune": str(out.resolve()), "best_epoch": outcome.best.get("epoch")},
            "metrics": {k: v for k, v in (("val", outcome.val), ("test", outcome.test)) if v}, "chosen": {},
            "fit_seconds": outcome.seconds, "versions": _versions(),
        })
    except (ValueError, TypeError) as error:  # a classifier that is not one linear map
        logger.warning("no head file written (%s)", error)
        head_path = None
    plain = resolve(BackboneSpec(name=spec.name, weights=str(best), preprocess=spec.preprocess, precision=spec.precision), device)
    extract_command = ["embedpipe", "extract", str(source), "--backbone", spec.name, "--weights", str(best)]
    if plain.preprocess != embedding.preprocess:
        extract_command += _preprocess_flags(embedding.preprocess)
    elif spec.preprocess.get("input_size"):
        extract_command += ["--img-size", str(spec.preprocess["input_size"])]
    peak = max(outcome.memory.values(), default=0)
    summary = {
        "best_epoch": outcome.best.get("epoch"),
        "best_phase": outcome.best.get("phase"),
        "stopped_epoch": outcome.stopped_epoch,
        "stop_reason": outcome.stop_reason,
        "best_checkpoint": str(best),
        "head": str(head_path) if head_path else None,
        "monitor": config.monitor,
        "best": outcome.best,
        "initial": outcome.initial,
        "val": outcome.val,
        "test": outcome.test,
        "phases": outcome.phases,
        "peak_memory_bytes": peak,
        "memory": outcome.memory,
        "memory_kind": "cuda_max_allocated" if device.startswith("cuda") else "peak_rss",
        "seconds": outcome.seconds,
        "wall_seconds_this_call": time.perf_counter() - started,
        "n_train": len(splits.train), "n_val": len(splits.val), "n_test": len(splits.test),
        "skipped": [{"path": p, "reason": r} for p, r in outcome.skipped],
        "device": device,
        "precision": precision,
        "config": config.to_dict(),
        "backbone": spec.to_dict(),
        "embedding_config": embedding.to_dict(),
        "init_head": str(init_head) if init_head else None,
        "extract_command": " ".join(extract_command),
        "versions": _versions(),
    }
    ft.write_json(out / ft.SUMMARY_FILE, summary)
    ft.plot_curves(outcome.history, outcome.best.get("epoch", 0), out / ft.CURVES_FILE, initial=outcome.initial,
                   stop_reason=outcome.stop_reason)
    return FineTuneResult(
        out=out, best_checkpoint=best, head=head_path, best_epoch=summary["best_epoch"],
        stopped_epoch=outcome.stopped_epoch, stop_reason=outcome.stop_reason, history=outcome.history,
        test=outcome.test, val=outcome.val, peak_memory_bytes=peak, memory=outcome.memory,
        seconds=outcome.seconds, summary=summary,
    )


def _mkdir(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise CacheError(f"cannot create cache folder {folder} ({error.strerror}): pick a writable --cache-dir") from None


__all__ = ["BenchResult", "ExtractResult", "FineTuneResult", "FitResult", "Prediction", "bench", "cache_info", "cache_list",
           "cache_remove", "cache_verify", "evaluate", "extract", "fine_tune", "fit_head", "load", "predict", "report",
           "resolve"]
