"""What every benchmark script shares: the machine a result names, and how busy the other cores were.

The machine description is :func:`embedpipe.bench.environment` (the one the ``embedpipe bench``
command records), with the few fields a speed benchmark adds.
"""

from __future__ import annotations

import contextlib
import os
import resource
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

from embedpipe.bench import environment, machine_slug  # noqa: E402

__all__ = ["REPO", "ContentionMeter", "machine_info", "machine_slug"]


def machine_info(device: str, **extra: Any) -> dict[str, Any]:
    """CPU/GPU, cores, versions and git state (:func:`embedpipe.bench.environment`), plus what speed depends on.

    Adds the CPU's native bf16/AMX support, torch's thread count, whether ``embedpipe/`` has
    uncommitted changes, and ``extra`` (a script's own fields, e.g. its BLAS or thread cap).
    """
    import torch

    info = environment(device)
    flags: set[str] = set()
    with contextlib.suppress(OSError):
        found = re.search(r"^flags\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
        flags = set(found[1].split()) if found else set()
    dirty = None
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        status = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "embedpipe"],
                                capture_output=True, text=True, timeout=10)
        dirty = bool(status.stdout.strip()) if status.returncode == 0 else None
    return {
        **info,
        "cpu_bf16": "avx512_bf16" in flags or "amx_bf16" in flags,
        "cpu_amx": "amx_tile" in flags,
        "torch_threads": torch.get_num_threads(),
        "embedpipe_dirty": dirty,
        **extra,
    }


class ContentionMeter:
    """How many cores other processes kept busy while a sample ran (from /proc/stat, Linux only).

    The benchmark's own CPU time, its DataLoader workers' and child processes' included, is
    taken out; what is left is load from elsewhere that slowed the sample down.
    """

    def __init__(self) -> None:
        self.wall = time.perf_counter()
        self.busy = self._busy()
        self.own = self._own()

    @staticmethod
    def _busy() -> float | None:
        try:
            fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
        except OSError:
            return None
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[:8])
        return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")

    @staticmethod
    def _own() -> float:
        me, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return me.ru_utime + me.ru_stime + children.ru_utime + children.ru_stime

    def other_cores_busy(self) -> float | None:
        busy = self._busy()
        if busy is None or self.busy is None:
            return None
        wall = time.perf_counter() - self.wall
        return max(0.0, (busy - self.busy) - (self._own() - self.own)) / wall if wall > 0 else None
