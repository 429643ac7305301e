"""The optional extras the explore stages use, imported on demand with an error that names what to install."""

from __future__ import annotations

import importlib
from types import ModuleType

from ..errors import ExploreError

# Importable module -> (what it is for, the pyproject extra that installs it).
EXTRAS: dict[str, tuple[str, str]] = {
    "pyarrow": ("Parquet export", "parquet"),
    "faiss": ("FAISS search and export", "faiss"),
    "lance": ("Lance export", "lance"),
    "cleanlab": ("label-issue and outlier scores", "cleanlab"),
    "umap": ("UMAP maps", "umap"),
}


def require(module: str) -> ModuleType:
    """Import an optional extra (or one of its modules: ``pyarrow.parquet``), or raise :class:`ExploreError` saying which extra installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        what, extra = EXTRAS[module.partition(".")[0]]
        raise ExploreError(f"{what} needs {module.partition('.')[0]}, which is not installed: pip install 'embedpipe[{extra}]'") from None


def available(module: str) -> bool:
    """True when the extra imports."""
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True
