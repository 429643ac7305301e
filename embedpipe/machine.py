"""The machine a run happens on, described once: device resolution, environment and versions, peak memory.

Every stage and every benchmark asks this module, so a results file, a head, an export and a
fine-tune run name their machine and measure memory the same way.
"""

from __future__ import annotations

import contextlib
import os
import re
import resource
import sys
from pathlib import Path
from typing import Any

from ._version import __version__
from .errors import BackboneError

# What decides the numbers of an embedding, a head or a run (read from package metadata: nothing is imported).
VERSIONED_PACKAGES = ("torch", "timm", "h5py", "numpy", "pillow", "scikit-learn")

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
CUDA_PEAK = "cuda_max_allocated"  # bytes torch's CUDA allocator held at its peak
RSS_PEAK = "peak_rss"  # the process's peak resident set size (Linux VmHWM, reset at the start of the block)


def resolve_device(device: str) -> str:
    """``auto`` picks cuda, then mps, then cpu; an explicit device is checked, not guessed.

    Raises:
        BackboneError: an unknown device, or CUDA asked for where torch sees no GPU.
    """
    if device == "cpu":
        return device
    if device == "auto" and not _may_have_gpu():
        return "cpu"  # decided without importing torch (seconds), so a cache hit need not
    import torch

    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    try:
        kind = torch.device(device).type
    except (RuntimeError, TypeError):
        raise BackboneError(f"unknown device {device!r}: pass auto, cpu, cuda, cuda:N or mps") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise BackboneError(f"device {device!r} asked for but CUDA is not available: pass --device cpu or auto")
    return device


def _may_have_gpu() -> bool:
    """False only where torch certainly sees no GPU: Linux without an NVIDIA or AMD driver's device nodes."""
    if not sys.platform.startswith("linux"):
        return True  # macOS has MPS; elsewhere ask torch
    return any(os.path.exists(node) for node in ("/dev/nvidiactl", "/dev/nvidia0", "/proc/driver/nvidia", "/dev/kfd", "/dev/dxg"))


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    return set()


def cpu_has_native_bf16() -> bool:
    """True when the CPU computes bf16 in hardware (AVX512-BF16 or AMX)."""
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})


def resolve_precision(precision: str, device: str) -> str:
    """``auto``: bf16 on CUDA cards that support it (fp16 on older ones) and on CPUs with native
    bf16 (AVX512-BF16/AMX: 1.9x faster than fp32 for tf_efficientnet_lite0, embeddings at cosine
    >= 0.997 of fp32, see benchmarks/README.md); fp32 elsewhere, where bf16 is emulated and slow.
    """
    if precision not in PRECISIONS:
        raise BackboneError(f"unknown precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    if precision != "auto":
        return precision
    if device.startswith("cuda"):
        import torch

        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if device == "cpu" and cpu_has_native_bf16():
        return "bf16"
    return "fp32"


def versions() -> dict[str, str]:
    """Installed versions of embedpipe and of what decides the numbers."""
    from importlib.metadata import PackageNotFoundError, version  # 60 ms: not on a cache hit's path

    found = {"embedpipe": __version__}
    for package in VERSIONED_PACKAGES:
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = "not installed"
    return found


def environment(device: str) -> dict[str, Any]:
    """What a results file must name: CPU/GPU, cores, Python, library versions, git commit, a machine slug."""
    import platform

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        found = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
        cpu = found[1].strip() if found else cpu
    gpu = ""
    if device.startswith("cuda"):
        import torch

        gpu = torch.cuda.get_device_name(device)
    info: dict[str, Any] = {"cpu": cpu, "cores": available_cores(), "gpu": gpu, "device": device,
                            "python": platform.python_version()}
    info.update({name.replace("-", ""): v for name, v in versions().items()})
    info["git_commit"] = _checkout_commit()
    info["machine"] = machine_slug(info)
    return info


def _checkout_commit() -> str:
    """The commit of the embedpipe checkout this code runs from; empty for an installed wheel.

    Only a repository whose top folder holds this package counts: a wheel installed in a venv that
    sits inside some other project's repository must not record that project's commit.
    """
    package = Path(__file__).resolve().parent
    import subprocess

    with contextlib.suppress(OSError, subprocess.SubprocessError):
        done = subprocess.run(["git", "-C", str(package), "rev-parse", "--show-toplevel", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=5)
        lines = done.stdout.split()
        if done.returncode == 0 and len(lines) == 2 and Path(lines[0]).resolve() == package.parent:
            return lines[1]
    return ""


def machine_slug(info: dict[str, Any]) -> str:
    """``cpu-amd-epyc-2c`` or ``gpu-nvidia-h100-80gb-hbm3-16c``: how results files and folders name their machine."""
    name = info.get("gpu") or info.get("cpu") or ""
    name = re.sub(r"\((r|tm)\)|cpu|processor|@.*$|\d+-core", "", name, flags=re.I)
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"
    return f"{'gpu' if info.get('gpu') else 'cpu'}-{slug}-{info.get('cores', 0)}c"


class PeakMemory:
    """The peak memory of a block, with one meaning everywhere: absolute, not an increase.

    On CUDA: the allocator's peak (``torch.cuda.max_memory_allocated``), kind :data:`CUDA_PEAK`.
    Elsewhere: the process's peak resident set size, kind :data:`RSS_PEAK`; on Linux the peak is
    reset on entry (``/proc/self/clear_refs``), so it is this block's peak, model weights and
    everything else the process holds included; where it cannot be reset it is the process's
    lifetime peak. :meth:`read` gives the peak so far, inside the block too.

    >>> with PeakMemory("cpu") as memory:
    ...     work()
    >>> memory.peak_bytes, memory.kind
    """

    def __init__(self, device: str) -> None:
        self.device = device
        self.kind = CUDA_PEAK if device.startswith("cuda") else RSS_PEAK
        self.peak_bytes: int | None = None

    def __enter__(self) -> PeakMemory:
        self.reset()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.peak_bytes = self.read()

    def reset(self) -> None:
        """Start a new peak from what the process holds now."""
        if self.kind == CUDA_PEAK:
            import torch

            torch.cuda.reset_peak_memory_stats(self.device)
            return
        with contextlib.suppress(OSError):
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (Linux >= 4.0)

    def read(self) -> int:
        """Bytes at the peak since the last reset."""
        if self.kind == CUDA_PEAK:
            import torch

            return int(torch.cuda.max_memory_allocated(self.device))
        with contextlib.suppress(OSError, ValueError):
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
