"""Let glibc keep freed activation buffers for the next batch instead of returning them to the kernel.

glibc serves allocations above its mmap threshold (dynamic, up to 32 MiB) with fresh ``mmap``
calls and unmaps them on free, so every large activation of a CPU forward pass is page-faulted and
zeroed again, batch after batch, which shows up as system time. Raising the mmap and trim
thresholds makes freed buffers reusable: the bare forward of tf_efficientnet_lite0 (bf16, batch
32) ran 1.52x faster on a 2-core Intel Xeon (140 vs 92 img/s, 3 interleaved runs) and 1.6-1.9x on
a 2-core AMD EPYC (benchmarks/bench_extract.py --malloc-tuned). The cost: the process's RSS stays
at its peak instead of shrinking between batches.

It changes the allocator for the whole process, so the library never does it on import; the
``embedpipe`` command, a process of its own, does it at start (``EMBEDPIPE_MALLOC_TUNING=0``
turns it off). DataLoader workers forked afterwards inherit it.
"""

from __future__ import annotations

import ctypes
import os
import sys

_M_TRIM_THRESHOLD = -1  # from glibc's malloc.h
_M_MMAP_THRESHOLD = -3
_LIMIT = 2**31 - 1  # mallopt takes an int


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds; True when done (False off glibc, or when turned off)."""
    if os.environ.get("EMBEDPIPE_MALLOC_TUNING", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, _LIMIT)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, _LIMIT))
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to tune
        return False
