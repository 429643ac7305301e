"""embedpipe: transfer learning on images with cached embeddings.

The public API; the ``embedpipe`` command is a thin shell over it. Each stage lives in its own
room, from the function a notebook calls down to the files it writes:

- :mod:`embedpipe.extraction`: ``extract`` and ``load`` (images -> the cache -> an exported HDF5 file)
- :mod:`embedpipe.cache`: the store, exports and their housekeeping (``cache_list/info/verify/remove``)
- :mod:`embedpipe.heads`: the heads and their stage (``fit_head``, ``evaluate``, ``predict``)
- :mod:`embedpipe.finetune`: ``fine_tune`` (the loop, the recipe, the run folder)
- :mod:`embedpipe.explore`: ``neighbors``, ``audit``, ``export`` (neighbours, duplicates and
  label issues, other formats)
- :mod:`embedpipe.bench`: ``bench`` and ``report`` (``from embedpipe.bench import bench``: the name
  ``embedpipe.bench`` is the package)

The names that need torch (heads, fine-tune, bench) or h5py (cache housekeeping) are imported
when first used, so ``import embedpipe`` stays cheap and a cache hit loads neither.
"""

from __future__ import annotations

import importlib
from typing import Any

from .allocator import keep_freed_memory
from ._version import __version__
from .config import BackboneSpec, EmbeddingConfig, FineTuneConfig, PreprocessConfig, RunConfig, SplitConfig
from .errors import (
    BackboneError,
    BenchError,
    CacheError,
    DataError,
    EmbedpipeError,
    ExploreError,
    FineTuneError,
    HeadError,
    ImageDecodeError,
    WeightsError,
)
from .extraction import ExtractResult, extract, load

# Public name -> the module that defines it, imported on first use (each pulls in torch, or h5py).
_LAZY = {
    **dict.fromkeys(("cache_info", "cache_list", "cache_remove", "cache_verify"), "embedpipe.cache.housekeeping"),
    "FitResult": "embedpipe.heads",
    "Prediction": "embedpipe.heads",
    "evaluate": "embedpipe.heads",
    "fit_head": "embedpipe.heads",
    "predict": "embedpipe.heads",
    "FineTuneResult": "embedpipe.finetune",
    "fine_tune": "embedpipe.finetune",
    "BenchResult": "embedpipe.bench",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'embedpipe' has no attribute {name!r}")


__all__ = [
    "BackboneError",
    "BackboneSpec",
    "BenchError",
    "BenchResult",
    "CacheError",
    "DataError",
    "EmbeddingConfig",
    "EmbedpipeError",
    "ExploreError",
    "ExtractResult",
    "FineTuneConfig",
    "FineTuneError",
    "FineTuneResult",
    "FitResult",
    "HeadError",
    "ImageDecodeError",
    "Prediction",
    "PreprocessConfig",
    "RunConfig",
    "SplitConfig",
    "WeightsError",
    "__version__",
    "cache_info",
    "cache_list",
    "cache_remove",
    "cache_verify",
    "evaluate",
    "extract",
    "fine_tune",
    "fit_head",
    "keep_freed_memory",
    "load",
    "predict",
]
