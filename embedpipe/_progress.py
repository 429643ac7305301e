"""The progress-bar contract between the stages and the CLI.

A progress factory takes a stage name and a total and returns a context manager yielding a
callable that advances by n. The CLI passes tqdm bars; the library default shows nothing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import ContextManager

ProgressFactory = Callable[[str, int], ContextManager[Callable[[int], None]]]


@contextlib.contextmanager
def no_progress(stage: str, total: int) -> Iterator[Callable[[int], None]]:
    """The silent :data:`ProgressFactory`."""
    yield lambda n: None
