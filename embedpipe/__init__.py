"""embedpipe: transfer learning on images with cached embeddings.

The public API; the ``embedpipe`` command is a thin shell over it.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .config import BackboneSpec, EmbeddingConfig, FineTuneConfig, PreprocessConfig, RunConfig, SplitConfig  # noqa: E402
from .errors import (  # noqa: E402
    BackboneError,
    CacheError,
    DataError,
    EmbedpipeError,
    FineTuneError,
    ImageDecodeError,
    WeightsError,
)
from ._malloc import keep_freed_memory  # noqa: E402
from .pipeline import (  # noqa: E402
    ExtractResult,
    FineTuneResult,
    FitResult,
    Prediction,
    cache_info,
    cache_list,
    cache_remove,
    cache_verify,
    evaluate,
    extract,
    fine_tune,
    fit_head,
    load,
    predict,
)

__all__ = [
    "BackboneError",
    "BackboneSpec",
    "CacheError",
    "DataError",
    "EmbeddingConfig",
    "EmbedpipeError",
    "ExtractResult",
    "FineTuneConfig",
    "FineTuneError",
    "FineTuneResult",
    "FitResult",
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
