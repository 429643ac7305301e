"""Resolved embedding configs, remembered by what decides them, so a cache hit never imports timm.

Resolving a backbone spec into an :class:`~embedpipe.config.EmbeddingConfig` reads timm's pretrained
config (importing torch and timm: seconds) and hashes the weights file. The result depends only on
the spec, the resolved precision, the embedpipe and timm versions and the weights file's bytes, so it
is kept in ``cache/resolved/<key>.json`` with the stat key of that file; an entry whose file changed
(or that cannot be read) is ignored and resolved again.
"""

from __future__ import annotations

import contextlib
import json
import os
import importlib.util
import re
from pathlib import Path
from typing import Any

from .._atomic import json_bytes, write_atomically
from .._version import __version__
from ..config import BackboneSpec, EmbeddingConfig, digest_of

RESOLVED_DIR = "resolved"


def _stat_key(path: str) -> list[int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def timm_version() -> str | None:
    """The installed timm's version, without importing it (or ``importlib.metadata``: 60 ms, a tenth of a cache hit).

    timm keeps it in ``timm/version.py``; where that cannot be read, the distribution's metadata says.
    """
    spec = importlib.util.find_spec("timm")
    if spec is None or spec.origin is None:
        return None
    with contextlib.suppress(OSError):
        text = Path(spec.origin).with_name("version.py").read_text(encoding="utf-8")
        if found := re.search(r"""^__version__\s*=\s*['"]([^'"]+)['"]""", text, re.MULTILINE):
            return found.group(1)
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("timm")
    except PackageNotFoundError:
        return None


class ResolvedConfigs:
    """The remembered resolutions of one cache folder."""

    def __init__(self, cache_dir: str | Path) -> None:
        self.folder = Path(cache_dir) / RESOLVED_DIR

    @staticmethod
    def _key(spec: BackboneSpec, precision: str) -> str:
        return digest_of({"spec": spec.to_dict(), "precision": precision, "embedpipe": __version__, "timm": timm_version()})

    def get(self, spec: BackboneSpec, precision: str) -> EmbeddingConfig | None:
        """The config ``spec`` resolved to at ``precision``, when it was resolved before and its weights file is unchanged."""
        key = self._key(spec, precision)
        try:
            entry: dict[str, Any] = json.loads((self.folder / f"{key[:32]}.json").read_text())
            if entry["key"] != key or any(_stat_key(path) != stat for path, stat in entry["files"]):
                return None
            return EmbeddingConfig.from_dict(entry["config"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def put(self, spec: BackboneSpec, precision: str, config: EmbeddingConfig, files: list[Path]) -> None:
        """Remember a resolution and the files it read. Best effort: failing to remember only costs speed."""
        key = self._key(spec, precision)
        stats = [(os.fspath(path), _stat_key(os.fspath(path))) for path in files]
        if any(stat is None for _, stat in stats):
            return
        with contextlib.suppress(OSError):
            self.folder.mkdir(parents=True, exist_ok=True)
            write_atomically(self.folder / f"{key[:32]}.json", json_bytes({"key": key, "config": config.to_dict(), "files": stats}))
