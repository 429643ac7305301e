"""The extract stage: records -> digests -> what is missing -> inference -> store -> export.

>>> import embedpipe
>>> result = embedpipe.extract("path/to/images", "tf_efficientnet_lite0", cache_dir="cache")
>>> X, y, meta = embedpipe.load(result.path)

Under torchrun every rank hashes and embeds its share and commits its own shards; rank 0 writes
the export (:mod:`embedpipe.distributed`).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ._columns import digest_order, narrow
from ._progress import ProgressFactory, no_progress
# No h5py here: the cache hit is answered before it loads (about 0.2 s); exports and shards import it.
from .cache.index import FileIndex, stat_files
from .cache.layout import COMPACT_SHARDS, RAW_DIGEST_DTYPE, as_raw_digests, hex_digest_blocks
from .cache.listing import Listings, Snapshot, hash_columns, is_hit, same_rows, unchanged_rows
from .cache.resolved import ResolvedConfigs
from .config import OUTPUT_EMBEDDING, BackboneSpec, EmbeddingConfig, PreprocessConfig, RunConfig, SplitConfig, canonical_json
from .data import Dataset, ItemColumn, PathColumn, load_dataset
from .data.strings import PackedStrings
from .data.load import needs_seeded_split, with_seeded_split
from .distributed import Ranks, rank_device
from .distributed import ranks as join_ranks
from .errors import CacheError, ImageDecodeError
from .machine import resolve_device, resolve_precision

if TYPE_CHECKING:
    from .cache.export import ExportMeta
    from .cache.store import Store, StoreIndex

logger = logging.getLogger(__name__)


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


def as_spec(backbone: str | BackboneSpec) -> BackboneSpec:
    """A timm name as a :class:`BackboneSpec` with every other field at its default."""
    return BackboneSpec(name=backbone) if isinstance(backbone, str) else backbone


def spec_of(attrs: dict[str, Any]) -> BackboneSpec:
    """The :class:`BackboneSpec` that embeds new images exactly as an exported file's were.

    Its precision and dtype are the file's own, not ``auto``, so the cache key matches on any device.

    Args:
        attrs: an exported file's metadata (``embedpipe.load(...)[2]``), or a saved head's
            ``backbone_spec`` and ``embedding_config``.
    """
    stored = attrs.get("backbone_spec") or {}
    config = attrs["embedding_config"]
    return BackboneSpec(
        name=stored.get("name", config["backbone"]),
        weights=stored.get("weights"),
        pretrained=stored.get("pretrained", True),
        outputs=tuple(config["outputs"]),
        precision=config["precision"],
        dtype=config["dtype"],
        preprocess=PreprocessConfig.from_dict(config["preprocess"]).to_dict(),
    )


def resolve(backbone: str | BackboneSpec, device: str, *, cache_dir: str | Path | None = None) -> EmbeddingConfig:
    """The embedding config a backbone spec gives on a device (no network built).

    Args:
        cache_dir: remember the result there (:mod:`embedpipe.cache.resolved`), so the next call with
            the same spec, versions and weights file answers without importing torch or timm.
    """
    spec = as_spec(backbone)
    precision = resolve_precision(spec.precision, device)
    memo = ResolvedConfigs(cache_dir) if cache_dir is not None else None
    if memo is not None and (known := memo.get(spec, precision)) is not None:
        return known
    from .backbone import resolve_embedding_config, weights_file

    outputs = tuple(dict.fromkeys((OUTPUT_EMBEDDING, *spec.outputs)))  # the embedding is always stored
    config = resolve_embedding_config(spec.name, weights=spec.weights, pretrained=spec.pretrained, preprocess=spec.preprocess,
                                      outputs=outputs, precision=precision, dtype=spec.dtype)
    if memo is not None:
        file = weights_file(spec.name, weights=spec.weights, pretrained=spec.pretrained)
        memo.put(spec, precision, config, [file] if file is not None else [])
    return config


def dataset_fingerprint(dataset: Dataset, digests: np.ndarray, config: EmbeddingConfig) -> str:
    """Hash of everything an exported file holds: rows, labels, splits, contents, embedding config.

    Args:
        digests: ``RAW_DIGEST_DTYPE`` (N,) sha256 of each image, in dataset order (hashed as hex,
            the form exports hold, so the fingerprint does not depend on how memory holds them).
    """
    digest = hashlib.sha256(canonical_json({
        "key": config.key(), "classes": list(dataset.class_names), "layout": dataset.layout,
        "split": dataset.split_config.to_dict() if dataset.split_config else None,
    }).encode())
    if dataset.rejected:  # files left out of the rows still change what the file's ledger says
        digest.update(canonical_json(list(dataset.rejected)).encode())
    return hash_columns(digest, (dataset.relpaths.offsets, dataset.relpaths.blob, dataset.labels.astype(np.int64), dataset.split_codes.astype(np.int8),
                                 *hex_digest_blocks(as_raw_digests(digests)))).hexdigest()


def ensure_folder(folder: Path) -> Path:
    """Create the cache folder, or say which one cannot be created."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise CacheError(f"cannot create cache folder {folder} ({error.strerror}): pick a writable --cache-dir") from None
    return folder


def extract(
    source: str | Path,
    backbone: str | BackboneSpec = BackboneSpec(),
    *,
    cache_dir: str | Path = "cache",
    split: SplitConfig | None = None,
    run: RunConfig = RunConfig(),
    progress: ProgressFactory = no_progress,
    storage_options: dict[str, Any] | None = None,
) -> ExtractResult:
    """Embed every image of a dataset once, into the cache, and export it to one HDF5 file.

    Images already in the cache under the same embedding config (same content,
    wherever the file lives) are not recomputed; a killed run resumes where it
    stopped.

    Args:
        source: folder, manifest, tar shards, saved HF dataset or URL (:func:`~embedpipe.data.load_dataset`).
        backbone: a timm model name, or a :class:`BackboneSpec` for weights/outputs/precision.
        cache_dir: the cache folder; created when missing.
        split: how to split labelled data that comes without a split.
        run: device, batch size, workers, error policy.
        progress: progress bar factory (see :data:`embedpipe._progress.ProgressFactory`).
        storage_options: fsspec options for URL sources (``{"endpoint_url": ...}``); in no cache key.

    Returns:
        An :class:`ExtractResult`; ``result.path`` is the exported file, with
        datasets ``embeddings`` (N, D), ``labels``, ``paths``, ``split`` and
        the metadata described in the README.
    """
    started = time.perf_counter()
    cache_dir = Path(cache_dir)
    if run.on_error not in ("skip", "fail"):
        raise CacheError(f"unknown --on-error {run.on_error!r}: use skip or fail")
    taken_ns = time.time_ns()  # files changed from here on (a folder's are stat'ed as listed) are racily clean for the next run
    dataset = load_dataset(source, split=split, storage_options=storage_options, seed_split=False)
    device = resolve_device(run.device)
    spec = as_spec(backbone)
    config = resolve(spec, device, cache_dir=ensure_folder(cache_dir))
    listings = Listings(cache_dir)
    seeded = (split or SplitConfig()) if needs_seeded_split(dataset) else None
    listing_key = Listings.key(str(dataset.root), seeded.to_dict() if seeded else None, config.key())
    paths = dataset.paths
    stats = dataset.stats if dataset.stats is not None else stat_files(paths)
    snapshot = listings.read(listing_key)
    # The seeded split is a function of the rows, their labels and the split settings (in the listing
    # key): when those are the snapshot's, so is the split, and no path is hashed for it again.
    unchanged = snapshot is not None and same_rows(snapshot, dataset.relpaths, dataset.labels)
    dataset = with_seeded_split(dataset, split, known=snapshot.split_codes if unchanged and seeded else None)
    if dataset.rejected:
        logger.warning("%d file(s) left out: %s: %s", len(dataset.rejected), *dataset.rejected[0])
    # A snapshot holds the rows, not the files left out of them, so a dataset with such files takes the slow path.
    if unchanged and not dataset.rejected and is_hit(snapshot, dataset.split_codes, stats, cache_dir / snapshot.export):
        # Every file is as it was when this export was made: answered from one stat per file.
        _raise_on_failures(run, snapshot.errors)
        return _result(cache_dir / snapshot.export, dataset, config, device, started, cache_hit=True, failed=snapshot.errors,
                       dims=snapshot.dims)

    from .cache.export import ExportMeta, export_name, read_ledger, verify_export
    from .cache.hdf5 import read_attrs

    with join_ranks(device) as ranks:
        device = rank_device(device, ranks)
        if not ranks.is_main:  # one progress bar and one report, from rank 0
            progress = no_progress
        digests = _digests(FileIndex(cache_dir), paths, stats, snapshot, dataset.relpaths, ranks, progress)
        del snapshot  # its columns (about 110 bytes an image) are not held while embedding
        fingerprint = dataset_fingerprint(dataset, digests, config)
        path = cache_dir / export_name(dataset.name, config.backbone, fingerprint)
        attrs = read_attrs(path)
        computed, forward_seconds = 0, 0.0
        cache_hit = bool(attrs) and attrs.get("dataset_fingerprint") == fingerprint and attrs.get("cache_key") == config.key()
        if cache_hit and (problems := verify_export(path)):
            # Named right but damaged (bit flips, truncation, a foreign edit): rebuilt from the store, never served.
            logger.warning("replacing %s, which is damaged (%s); its rows are rebuilt from the store", path, problems[0])
            cache_hit = False
        if not cache_hit:
            meta = ExportMeta(config=config, dataset_fingerprint=fingerprint, backbone_spec=spec.to_dict(),
                              class_names=tuple(dataset.class_names), dataset=dataset.describe(),
                              split_seed=dataset.split_config.seed if dataset.split_config else -1)
            computed, forward_seconds = _fill_and_export(path, dataset, digests, meta, spec, device, run, ranks, progress)
    failed = read_ledger(path)
    if cache_hit:
        _raise_on_failures(run, failed)
    dims = dict(((attrs if cache_hit else read_attrs(path)) or {}).get("dims", {}))
    if ranks.is_main:
        listings.write(listing_key, relpaths=dataset.relpaths, labels=dataset.labels, split_codes=dataset.split_codes, stats=stats,
                       digests=digests, taken_ns=taken_ns, export=path, dims=dims, errors=failed)
    return _result(path, dataset, config, device, started, cache_hit=cache_hit, failed=failed, dims=dims, computed=computed,
                   images_per_second=computed / forward_seconds if computed and forward_seconds > 0 else None)


def _result(path: Path, dataset: Dataset, config: EmbeddingConfig, device: str, started: float, *, cache_hit: bool,
            failed: list[tuple[str, str]], dims: dict[str, int], computed: int = 0,
            images_per_second: float | None = None) -> ExtractResult:
    embedded = len(dataset) - (len(failed) - len(dataset.rejected))  # the ledger also lists the files left out
    return ExtractResult(path=path, cache_hit=cache_hit, num_images=embedded, computed=computed, reused=embedded - computed,
                         failed=failed, dims=dims, backbone=config.backbone,
                         cache_key=config.key(), device=device, seconds=time.perf_counter() - started,
                         images_per_second=images_per_second)


def _digests(index: FileIndex, paths: PathColumn | ItemColumn, stats: np.ndarray, snapshot: Snapshot | None,
             relpaths: PackedStrings, ranks: Ranks, progress: ProgressFactory) -> np.ndarray:
    """Each image's content digest: from the last snapshot where its file is unchanged, else hashed (each rank its share)."""
    digests = np.empty(len(paths), dtype=RAW_DIGEST_DTYPE)
    todo = np.arange(len(paths))
    if snapshot is not None:
        source = unchanged_rows(snapshot, relpaths, stats)
        kept = source >= 0
        digests[kept] = snapshot.digests[source[kept]]
        todo = np.flatnonzero(~kept)
    if len(todo) == len(paths) and ranks.world == 1:  # every row: no copies of the whole columns
        with progress("hashing", len(todo)) as advance:
            return index.digests(paths, stats=stats, progress=advance)
    groups = _groups(paths, todo, ranks)
    mine = ranks.share(todo, groups)
    with progress("hashing", len(todo)) as advance:
        hashed = index.digests(paths.take(mine), stats=stats[mine], progress=advance)
    digests[todo] = hashed if ranks.world == 1 else as_raw_digests(ranks.unshare(ranks.gather(hashed.tolist()), len(todo), groups))
    return digests


def _groups(paths: PathColumn | ItemColumn, rows: np.ndarray, ranks: Ranks) -> np.ndarray | None:
    """What ranks share out whole: the tar shard of each row (each rank reads its own shards); None for files."""
    return paths.groups(rows) if ranks.world > 1 and isinstance(paths, ItemColumn) else None


def _fill_and_export(path: Path, dataset: Dataset, digests: np.ndarray, meta: ExportMeta, spec: BackboneSpec, device: str,
                     run: RunConfig, ranks: Ranks, progress: ProgressFactory) -> tuple[int, float]:
    """Embed what the store lacks (each rank its share), then write the export from rank 0.

    Returns:
        ``(images computed by all ranks, seconds of the slowest rank's forward stage)``.
    """
    from .cache.export import ExportRequest, SplitColumn, write_export
    from .cache.store import ShardReadError, Store

    store = Store(path.parent, meta.config)
    # Under torchrun rank 0 holds the store's lock for the whole job, against other jobs;
    # its ranks write their own shards side by side.
    with store.lock() if ranks.is_main else contextlib.nullcontext():
        ranks.barrier()  # the store exists and dead writers' temporary files are gone
        computed, seconds = 0, 0.0
        for attempt in range(3):
            index: StoreIndex | None = store.index(digests)
            todo = _to_embed(index, dataset, digests, run)
            if len(todo) or ranks.world > 1:
                # Shards will be written (and maybe merged), so where each row is changes: read again after,
                # and not held while embedding (8 bytes a row beside the network's memory).
                index = None
            timings = _fill(store, todo, dataset, digests, spec, device, run, ranks, progress)
            new = sum(t[1] for t in timings)
            computed, seconds = computed + new, max(seconds, *(t[0] for t in timings))
            if not ranks.is_main:
                break
            if ranks.world > 1:
                store.compact()
            if index is None:
                index = store.index(digests)
            request = ExportRequest(paths=dataset.relpaths, labels=dataset.labels, rejected=dataset.rejected,
                                    split=SplitColumn(dataset.split_codes) if dataset.has_split else None,
                                    digests=digests, meta=meta)
            try:
                write_export(path, store, index, request)
                break
            except ShardReadError as damaged:  # moved aside, then its rows are computed again
                store.quarantine(damaged.shard, damaged.error)
                if ranks.world > 1 or attempt == 2:
                    raise
        ranks.barrier()  # the export is complete before any rank reports it
    return computed, seconds


def _to_embed(index: StoreIndex, dataset: Dataset, digests: np.ndarray, run: RunConfig) -> np.ndarray:
    """Positions of the images whose digests the store lacks (``index``: :meth:`Store.index` of them), ascending.

    An image stored twice is embedded once (the first of each digest). int32 while it fits: the
    positions are held while embedding, beside the network's memory.

    Raises:
        ImageDecodeError: with ``--on-error fail``, an image already known not to decode.
    """
    failed_before = index.failed(digests)
    if failed_before is not None and failed_before.any():
        _raise_on_failures(run, [(dataset.relpaths[i], index.errors[bytes(digests[i])]) for i in np.flatnonzero(failed_before)])
    missing = ~index.stored() if failed_before is None else ~index.stored() & ~failed_before
    rows = narrow(np.flatnonzero(missing), len(digests))
    del missing
    first = _first_of_each(digests if len(rows) == len(digests) else digests[rows])
    return rows if len(first) == len(rows) else rows[first]


def _fill(store: Store, todo: np.ndarray, dataset: Dataset, digests: np.ndarray, spec: BackboneSpec, device: str, run: RunConfig,
          ranks: Ranks, progress: ProgressFactory) -> list[tuple[float, int]]:
    """Embed the images at positions ``todo`` (see :func:`_to_embed`), each rank its share; every rank's (seconds, images)."""
    ranks.barrier()  # every rank read the store before any writes to it, so all agree on what is missing
    mine = ranks.share(todo, _groups(dataset.paths, todo, ranks))
    mine_digests = digests if len(mine) == len(digests) else digests[mine]  # every row, in order: no 32 B/row copy
    own = _compute(store, mine_digests, dataset.paths.take(mine), spec, device, run, progress, own_shards=ranks.world > 1)
    return ranks.gather(own)  # also waits for every rank's last shard


def _first_of_each(digests: np.ndarray) -> np.ndarray:
    """Positions of the first occurrence of each distinct digest, ascending.

    The digests' stable order (:func:`~embedpipe._columns.digest_order`: among equal digests the first
    stays first), then whole digests compared only where a sorted key equals the one before, instead
    of ``np.unique``'s sorted copy of the digests (32 bytes a row).
    """
    order, keys = digest_order(digests)
    after = np.flatnonzero(keys[1:] == keys[:-1]) + 1  # sorted places whose key is the one before's
    del keys
    repeat = np.zeros(len(digests), dtype=bool)
    repeat[order[after]] = digests[order[after]] == digests[order[after - 1]]
    return np.flatnonzero(~repeat)


def _raise_on_failures(run: RunConfig, failed: list[tuple[str, str]]) -> None:
    if run.on_error == "fail" and failed:
        where, reason = failed[0]
        raise ImageDecodeError(f"{where}: {reason}: fix or remove the file, or pass --on-error skip to record and go on")


def _compute(
    store: Store,
    digests: np.ndarray,
    paths: Sequence[str],
    spec: BackboneSpec,
    device: str,
    run: RunConfig,
    progress: ProgressFactory,
    *,
    own_shards: bool = False,
) -> tuple[float, int]:
    """Embed the images at ``paths`` (content ``digests``, ``RAW_DIGEST_DTYPE``) into the store, one committed shard per batch.

    Args:
        own_shards: compact only the shards this process wrote (other ranks write beside it).

    Returns:
        ``(seconds, images computed)``.
    """
    if not len(paths):  # nothing to embed: torch and timm stay unimported
        return 0.0, 0
    from .backbone import load_backbone
    from .inference import embed, prepare_model

    model = prepare_model(load_backbone(spec.name, weights=spec.weights, pretrained=spec.pretrained), device, run)
    computed = 0
    written = 0
    started = time.perf_counter()
    with progress("embedding", len(paths)) as advance:
        for batch in embed(model, paths, store.config, device=device, run=run):
            errors = [(bytes(digests[row]), reason) for row, reason in batch.errors]
            store.write_shard(digests[batch.rows], batch.outputs, errors)
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
        dict with ``paths``, ``split``, ``class_names``, ``digests`` (sha256 of each image file),
        ``errors`` and the stored attributes.
    """
    from .cache.export import read_export

    loaded = read_export(path, outputs=[output])
    X, y, paths, split_column = loaded.arrays[output], loaded.labels, loaded.paths, loaded.split
    digests = loaded.digests
    if split is not None:
        if split_column is None:
            raise CacheError(f"{path} has no split: load it without split=, or extract labelled data")
        keep = split_column == split
        X, y, split_column = X[keep], y[keep], split_column[keep]
        paths, digests = [p for p, k in zip(paths, keep) if k], [d for d, k in zip(digests, keep) if k]
    meta = dict(loaded.attrs)
    meta.update(paths=paths, split=split_column, digests=digests, errors=loaded.errors,
                class_names=list(loaded.attrs.get("class_names", [])))
    return X, y, meta
