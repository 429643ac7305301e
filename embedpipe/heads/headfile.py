"""A saved head: a folder with ``head.json`` and ``arrays.safetensors``; loading never unpickles.

``head.json`` holds the head's kind, hyper-parameters and fitted values, the
classes, and everything needed to rebuild the exact pipeline that feeds it
(the backbone spec, the embedding config and its cache key), plus metrics and
versions. The arrays are safetensors, a format that holds only tensors, so a
crafted head file cannot run code when loaded.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .._atomic import json_bytes, write_atomically
from ..config import digest_of
from ..errors import HeadError
from ..machine import versions

FORMAT = "embedpipe-head"
FORMAT_VERSION = 1
META_FILE = "head.json"
ARRAYS_FILE = "arrays.safetensors"


@dataclass(frozen=True)
class HeadInfo:
    """Everything ``head.json`` says besides the fitted state: what the head reads and how it was made.

    Built once by each stage that saves a head (``fit-head``, ``fine-tune``); ``predict`` and
    ``evaluate`` rebuild the exact pipeline from ``backbone_spec`` and ``embedding_config`` and
    refuse embeddings whose ``cache_key`` differs.
    """

    kind: str  # a name in HEADS
    output: str  # the stored output it reads: "embeddings", "logits" or "stageN"
    backbone_spec: dict[str, Any] | None  # how to rebuild the backbone (BackboneSpec.to_dict())
    embedding_config: dict[str, Any]  # EmbeddingConfig.to_dict() of the features it was fitted on
    cache_key: str  # that config's key
    class_names: list[str]
    trained_on: dict[str, Any]  # the file or fine-tune run, rows, shots, seed
    metrics: dict[str, Any] = field(default_factory=dict)  # split -> metrics
    chosen: dict[str, Any] = field(default_factory=dict)  # the hyper-parameter picked (C, k, best epoch)
    fit_seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "output": self.output, "backbone_spec": self.backbone_spec,
                "embedding_config": self.embedding_config, "cache_key": self.cache_key, "class_names": list(self.class_names),
                "trained_on": self.trained_on, "metrics": self.metrics, "chosen": self.chosen,
                "fit_seconds": self.fit_seconds, "versions": versions()}


def save_head(folder: str | Path, head: Any, info: HeadInfo) -> Path:
    """Write a fitted head and its pipeline description; returns the folder.

    Each file is written atomically (temporary name, fsync, rename); the arrays go first, so a
    ``head.json`` on disk always describes arrays that are there.

    Args:
        folder: created if missing; an existing head there is replaced file by file.
        head: a fitted head with ``get_state()`` (see :mod:`embedpipe.heads`).
        info: what the head reads and how it was made.

    Raises:
        HeadError: the folder cannot be written (full disk, permissions).
    """
    from safetensors.numpy import save

    folder = Path(folder)
    arrays, state = head.get_state()
    document = {"format": FORMAT, "format_version": FORMAT_VERSION, "state": state, **info.to_dict()}
    array_bytes = save({k: np.ascontiguousarray(v) for k, v in arrays.items()})
    document = json.loads(json_bytes(document))  # the plain JSON that is written, so its digest is the one read back
    document["checksums"] = checksums(document, array_bytes)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        write_atomically(folder / ARRAYS_FILE, array_bytes)
        write_atomically(folder / META_FILE, json_bytes(document))
    except OSError as error:
        raise HeadError(f"could not write the head to {folder} ({error.strerror or error}): free disk space or pick another --out") from None
    return folder


def checksums(document: dict[str, Any], array_bytes: bytes) -> dict[str, str]:
    """sha256 of ``arrays.safetensors`` and of ``head.json`` without its checksums: a changed byte in either is refused."""
    body = {k: v for k, v in document.items() if k != "checksums"}
    return {"arrays": hashlib.sha256(array_bytes).hexdigest(), "document": digest_of(body)}


def load_head(folder: str | Path) -> tuple[Any, dict[str, Any]]:
    """Read a saved head; returns ``(head, info)`` where info is the parsed ``head.json``.

    Raises:
        HeadError: not a head folder, another format version, or damaged files.
    """
    from safetensors import SafetensorError
    from safetensors.numpy import load

    from .registry import HEADS, from_state

    folder = Path(folder)
    meta_path = folder / META_FILE if folder.is_dir() else folder
    if meta_path.name != META_FILE or not meta_path.is_file():
        raise HeadError(f"{folder} is not a saved head (no {META_FILE}): pass the folder written by `embedpipe fit-head --out`")
    try:
        info = json.loads(meta_path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise HeadError(f"{meta_path} is not readable JSON ({error}): refit the head") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise HeadError(f"{meta_path} is not an embedpipe head: pass the folder written by `embedpipe fit-head --out`")
    version = info.get("format_version")
    if version != FORMAT_VERSION or type(version) is not int:
        raise HeadError(
            f"{meta_path} has head format {version!r} ({type(version).__name__}), this embedpipe reads {FORMAT_VERSION}: refit the head"
        )
    try:
        array_bytes = (meta_path.parent / ARRAYS_FILE).read_bytes()
        arrays = load(array_bytes)
    except (OSError, SafetensorError, ValueError) as error:
        raise HeadError(f"{meta_path.parent / ARRAYS_FILE} is not a readable safetensors file ({error}): refit the head") from None
    stored = info.get("checksums")
    if stored is not None and stored != checksums(info, array_bytes):  # heads saved before checksums have none
        raise HeadError(f"{meta_path.parent} changed since it was saved (its checksums do not match): refit the head")
    _check_info(info, meta_path)
    try:
        head = from_state(arrays, info["state"])
    except HeadError as error:
        raise HeadError(f"{folder}: {error}") from None
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise HeadError(f"{folder} does not describe a complete head ({type(error).__name__}: {error}): refit the head") from None
    if not isinstance(head, HEADS[info["kind"]]):
        raise HeadError(f"{meta_path} says kind {info['kind']!r} but holds a {type(head).__name__}: refit the head")
    return head, info


def _check_info(info: dict[str, Any], meta_path: Path) -> None:
    """What ``predict`` and ``evaluate`` read from ``head.json``, with its types, before any of it is used.

    The embedding config must rebuild a pipeline this embedpipe accepts (an input size of
    100000 px is refused here, not by allocating it) and hash to the stored ``cache_key``.
    """
    from ..config import EmbeddingConfig
    from ..errors import BackboneError
    from ..preprocess import check_overrides
    from .registry import HEADS

    def bad(what: str) -> HeadError:
        return HeadError(f"{meta_path} {what}: refit the head")

    if not isinstance(info.get("kind"), str) or info["kind"] not in HEADS:
        raise bad(f"has kind {info.get('kind')!r}, not one of {', '.join(HEADS)}")
    output = info.get("output", "embeddings")
    if not isinstance(output, str) or not (output in ("embeddings", "logits") or (output.startswith("stage") and output[5:].isdigit())):
        raise bad(f"has output {output!r}, not embeddings, logits or stageN")
    if not isinstance(info.get("state"), dict):
        raise bad("has no state object")
    spec = info.get("backbone_spec")
    if spec is not None and not (isinstance(spec, dict) and isinstance(spec.get("name", ""), str)
                                 and isinstance(spec.get("weights") or "", str) and isinstance(spec.get("pretrained", True), bool)):
        raise bad(f"has a backbone_spec that is not a name, weights path and pretrained flag ({spec!r:.80})")
    config_dict, key = info.get("embedding_config"), info.get("cache_key")
    if not isinstance(config_dict, dict) or not isinstance(key, str):
        raise bad("lacks the embedding_config and cache_key that say which embeddings it reads")
    try:
        config = EmbeddingConfig.from_dict(config_dict)
        preprocess = config.preprocess.to_dict()
        check_overrides({k: v for k, v in preprocess.items() if k != "jpeg_draft"})
        typed = (isinstance(config.backbone, str) and isinstance(config.weights, str) and config.precision in ("fp32", "bf16", "fp16")
                 and config.dtype in ("float16", "float32") and all(isinstance(o, str) for o in config.outputs)
                 and isinstance(preprocess["input_size"], tuple) and len(preprocess["input_size"]) == 3
                 and isinstance(preprocess["jpeg_draft"], bool))
        if not typed:
            raise TypeError("a field of the wrong type")
        expected = config.key()
    except BackboneError as error:
        raise bad(f"has an embedding_config embedpipe refuses ({error})") from None
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise bad(f"has an embedding_config that is not one ({type(error).__name__}: {error})") from None
    if key != expected:
        raise bad(f"has cache_key {key[:16]!r}, which is not the key of its embedding_config ({expected[:16]})")
