"""A saved head: a folder with ``head.json`` and ``arrays.safetensors``; loading never unpickles.

``head.json`` holds the head's kind, hyper-parameters and fitted values, the
classes, and everything needed to rebuild the exact pipeline that feeds it
(the backbone spec, the embedding config and its cache key), plus metrics and
versions. The arrays are safetensors, a format that holds only tensors, so a
crafted head file cannot run code when loaded.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from .errors import HeadError

FORMAT = "embedpipe-head"
FORMAT_VERSION = 1
META_FILE = "head.json"
ARRAYS_FILE = "arrays.safetensors"


def save_head(folder: str | Path, head: Any, info: dict[str, Any]) -> Path:
    """Write a fitted head and its pipeline description; returns the folder.

    Args:
        folder: created if missing; an existing head there is replaced atomically file by file.
        head: a fitted head with ``get_state()`` (see :mod:`embedpipe.heads`).
        info: JSON-able: backbone spec, embedding config, cache key, metrics, versions...
    """
    from safetensors.numpy import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    arrays, state = head.get_state()
    document = {"format": FORMAT, "format_version": FORMAT_VERSION, "state": state, **info}
    tmp_arrays = folder / f".tmp-{uuid.uuid4().hex}-{ARRAYS_FILE}"
    save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(tmp_arrays))
    os.replace(tmp_arrays, folder / ARRAYS_FILE)
    tmp_meta = folder / f".tmp-{uuid.uuid4().hex}-{META_FILE}"
    tmp_meta.write_text(json.dumps(document, indent=2, default=_jsonable))
    os.replace(tmp_meta, folder / META_FILE)
    return folder


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def load_head(folder: str | Path) -> tuple[Any, dict[str, Any]]:
    """Read a saved head; returns ``(head, info)`` where info is the parsed ``head.json``.

    Raises:
        HeadError: not a head folder, another format version, or damaged files.
    """
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    from .heads import from_state

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
    if info.get("format_version") != FORMAT_VERSION:
        raise HeadError(
            f"{meta_path} has head format {info.get('format_version')}, this embedpipe reads {FORMAT_VERSION}: refit the head"
        )
    try:
        arrays = load_file(str(meta_path.parent / ARRAYS_FILE))
    except (OSError, SafetensorError, ValueError) as error:
        raise HeadError(f"{meta_path.parent / ARRAYS_FILE} is not a readable safetensors file ({error}): refit the head") from None
    try:
        head = from_state(arrays, info["state"])
    except (KeyError, TypeError, ValueError) as error:
        raise HeadError(f"{folder} does not describe a complete head ({type(error).__name__}: {error}): refit the head") from None
    return head, info
