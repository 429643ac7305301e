"""What every benchmark script shares: how samples are taken and summarised, the machine, the results file.

A speed goal here is a ratio of variants measured side by side in one process, because the
development machines are shared and noisy. The harness takes care of that part, so that a script
keeps only what it measures:

- :class:`Harness`: the flat records of one run, and its samples, each taken on cores other
  processes left alone (:meth:`Harness.wait_for_quiet`, :class:`ContentionMeter`), a failure
  recorded as a row with its error; repetitions run their units in alternating order
  (:meth:`Harness.run_interleaved`: A B C, then C B A).
- :class:`Selection`: the samples of some variants grouped by repetition, the clean repetitions
  preferred; medians of their values and of per-repetition ratios (:func:`med`, :func:`merge`).
- the printed table (:meth:`Harness.finish`), the machine a result names (:func:`machine_info`),
  and where results go (:func:`results_path`, :func:`write_results`).
- :func:`photo`: the synthetic photos the extraction benchmarks decode.
- :func:`run_embedpipe`: one ``embedpipe`` command in a process of its own, with its own peak RSS.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

from embedpipe.machine import cpu_flags, environment  # noqa: E402

if TYPE_CHECKING:
    from PIL import Image

__all__ = [
    "PHOTO_QUALITY",
    "PHOTO_SIZE",
    "REPO",
    "ContentionMeter",
    "Harness",
    "Selection",
    "add_sampling_options",
    "machine_info",
    "med",
    "merge",
    "photo",
    "results_path",
    "run_embedpipe",
    "write_results",
]

Record = dict[str, Any]
PHOTO_SIZE = (500, 375)  # a typical web photo (ImageNet's median is about 500x375)
PHOTO_QUALITY = 90  # JPEG quality: about 45 KB per photo at PHOTO_SIZE, as web photos of that size are


# --------------------------------------------------------------------------- the machine and the results file


def machine_info(device: str, **extra: Any) -> Record:
    """CPU/GPU, cores, versions and git state (:func:`embedpipe.machine.environment`), plus what speed depends on.

    Adds the CPU's native bf16/AMX support, torch's thread count, whether ``embedpipe/`` has
    uncommitted changes, and ``extra`` (a script's own fields, e.g. its BLAS or thread cap).
    """
    import torch

    flags = cpu_flags()
    dirty = None
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        status = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "embedpipe"],
                                capture_output=True, text=True, timeout=10)
        dirty = bool(status.stdout.strip()) if status.returncode == 0 else None
    return {
        **environment(device),
        "cpu_bf16": bool(flags & {"avx512_bf16", "amx_bf16"}),
        "cpu_amx": "amx_tile" in flags,
        "torch_threads": torch.get_num_threads(),
        "embedpipe_dirty": dirty,
        **extra,
    }


def results_path(what: str, info: Record, *, out: str | Path | None = None, suffix: str = "") -> Path:
    """``out`` when given, else ``benchmarks/results/<what>-<machine><suffix>.json`` (results name their machine)."""
    return Path(out) if out else REPO / "benchmarks" / "results" / f"{what}-{info['machine']}{suffix}.json"


def write_results(path: Path, records: list[Record]) -> None:
    """The run's records as one JSON list, replacing ``path`` (runs of other settings name other files)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records, indent=1, default=str) + "\n")
    print(f"wrote {len(records)} records to {path}", file=sys.stderr)


# The child reports its own VmHWM as it exits. ``wait4``'s ru_maxrss will not do: Linux carries the
# parent's high-water mark across fork and exec into the child's, so a child of a benchmark that once
# held 1 GB reads 1 GB whatever it used (measured: `python -c pass` "used" 789 MiB after the parent
# had allocated 800 MB and freed it).
_REPORT_PEAK = """import atexit, runpy, sys
out = sys.argv.pop(1)
def report():
    with open("/proc/self/status") as status, open(out, "w") as f:
        f.write(next(line for line in status if line.startswith("VmHWM")).split()[1])
atexit.register(report)
sys.argv[0] = "embedpipe"
runpy.run_module("embedpipe", run_name="__main__", alter_sys=True)
"""


def run_embedpipe(args: list[str], env: dict[str, str], *, cwd: Path = REPO) -> tuple[str, float, int]:
    """``embedpipe ARGS`` in a process of its own: (its stdout, wall seconds, its own peak RSS in bytes).

    Raises:
        RuntimeError: the command failed; the message is the last line it wrote to stderr.
    """
    with tempfile.TemporaryDirectory() as folder:
        peak_file = Path(folder) / "peak"
        with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
            started = time.perf_counter()
            code = subprocess.call([sys.executable, "-c", _REPORT_PEAK, str(peak_file), *args], stdout=out, stderr=err, env=env, cwd=cwd)
            wall = time.perf_counter() - started
            out.seek(0), err.seek(0)
            if code != 0:
                raise RuntimeError((err.read().strip().splitlines() or [f"exit {code} (no message)"])[-1])
            return out.read(), wall, int(peak_file.read_text()) * 1024  # kB


def add_sampling_options(parser: argparse.ArgumentParser, *, what: str, max_wait: float) -> None:
    """The options of :class:`Harness`: repetitions, what counts as a clean sample, the results file."""
    add = parser.add_argument
    add("--repeats", type=int, default=3, help="interleaved repetitions of every variant (default: %(default)s)")
    add("--max-contention", type=float, default=0.25,
        help="cores other processes may keep busy for a sample to count as clean (default: %(default)s)")
    add("--max-wait", type=float, default=max_wait,
        help="seconds in all to wait for other processes to go quiet (default: %(default)s)")
    add("--out", default=None, help=f"results JSON (default: benchmarks/results/{what}-<machine>.json)")


# --------------------------------------------------------------------------- synthetic data


def photo(seed: int, size: tuple[int, int] = PHOTO_SIZE) -> Image.Image:
    """A photo-like RGB image: smooth colour field, a few shapes, slight blur, sensor noise.

    At :data:`PHOTO_QUALITY` these are about 45 KB, as web photos of that size are; pure
    noise would be 3-4x larger and slower to decode than any real photo.
    """
    import numpy as np
    from PIL import Image, ImageDraw, ImageFilter

    rng = np.random.default_rng(seed)
    w, h = size
    image = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
    pen = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(3, 9))):
        x, y, s = int(rng.integers(-50, w)), int(rng.integers(-50, h)), int(rng.integers(20, 200))
        box = (x, y, x + s, y + int(s * rng.uniform(0.5, 1.5)))
        fill = tuple(int(c) for c in rng.integers(0, 256, 3))
        (pen.ellipse if rng.random() < 0.5 else pen.rectangle)(box, fill=fill)
    image = image.filter(ImageFilter.GaussianBlur(1.0))
    noisy = np.asarray(image, dtype=np.int16) + rng.normal(0, 6, (h, w, 3)).astype(np.int16)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


# --------------------------------------------------------------------------- clean samples


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


# --------------------------------------------------------------------------- medians


def med(values: Iterable[float | None]) -> float | None:
    """The median of the finite values, None when there are none."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.median(finite) if finite else None


def merge(samples: list[Record]) -> Record:
    """One sample standing for several of a variant: median numbers, worst contention."""
    merged = dict(samples[0])
    for key, value in merged.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "rep":
            merged[key] = med(x.get(key) for x in samples)
    merged["other_cores_busy"] = max((x.get("other_cores_busy") or 0.0) for x in samples)
    return merged


class Selection:
    """Samples of some variants grouped by repetition, preferring repetitions no other process disturbed.

    Within a repetition, variants that ran equally often (A B B A) are paired in run order;
    otherwise each variant's samples in that repetition are merged (:func:`merge`). A group is
    clean when, in each of its samples, other processes kept at most ``max_contention`` cores
    busy; when no group is clean, all complete ones are used and the table says so
    (:meth:`label`: clean / complete).

    Args:
        samples: successful sample records in run order, each with ``variant`` and ``rep``.
    """

    def __init__(self, samples: Sequence[Record], variants: Sequence[str], *, max_contention: float) -> None:
        complete: list[dict[str, Record]] = []
        for rep in sorted({x["rep"] for x in samples}):
            runs = {v: [x for x in samples if x["variant"] == v and x["rep"] == rep] for v in variants}
            if not variants or not all(runs.values()):
                continue
            counts = {len(r) for r in runs.values()}
            if len(counts) == 1:
                complete += [{v: runs[v][k] for v in variants} for k in range(counts.pop())]
            else:
                complete.append({v: merge(r) for v, r in runs.items()})
        clean = [
            group for group in complete
            if all((x.get("other_cores_busy") or 0.0) <= max_contention for x in group.values())
        ]
        self.reps = clean or complete
        self.clean, self.complete = len(clean), len(complete)

    def median(self, fn: Callable[[dict[str, Record]], float | None]) -> float | None:
        """The median over repetitions of ``fn(group)``, e.g. a per-repetition ratio of two variants."""
        return med(fn(group) for group in self.reps)

    def value(self, variant: str, key: str) -> float | None:
        return med(group[variant].get(key) for group in self.reps)

    def label(self) -> str:
        return f"{self.clean}/{self.complete}"


# --------------------------------------------------------------------------- the run


class Harness:
    """The records of one benchmark run, and how its samples are taken: interleaved, on quiet cores.

    A script subclasses it with what it measures. Every record is one flat dict: :attr:`common`
    (the machine and the run's settings; a script may change it between parts of the run), then
    ``measurement``, ``variant``, ``error`` and the values. A sample (:meth:`sample`) also carries
    ``rep`` and ``other_cores_busy``; the final, successful ones are also kept, in run order, in
    :attr:`samples`, which :meth:`select` groups.

    Args:
        retries: times a sample that other processes disturbed runs again right away; its
            records then carry ``attempt`` and ``superseded``. None: each sample runs once and
            its record has neither field.
    """

    # Before a sample, wait (within max_wait seconds in all) for QUIET_POLLS polls in a row of
    # QUIET_POLL_SECONDS each with at most max_contention cores busy elsewhere, pausing
    # BUSY_PAUSE_SECONDS after a busy poll.
    QUIET_POLL_SECONDS = 1.0
    QUIET_POLLS = 2
    BUSY_PAUSE_SECONDS = 0.0

    def __init__(self, common: Record, *, max_contention: float, max_wait: float, retries: int | None = None) -> None:
        self.common = common
        self.max_contention = max_contention
        self.max_wait = max_wait
        self.retries = retries
        self.records: list[Record] = []
        self.samples: list[Record] = []
        self.waited = 0.0

    # ----------------------------------------------------------------- records

    def record(self, measurement: str, variant: str, **values: Any) -> Record:
        row = {**self.common, "measurement": measurement, "variant": variant, "error": None, **values}
        self.records.append(row)
        return row

    def diag(self, variant: str, value: float, unit: str, **extra: Any) -> None:
        self.record("diagnostic", variant, value=value, unit=unit, **extra)

    def show(self, measurement: str, variant: str, rep: int, values: Record) -> None:
        """Called with each sample's values as it is recorded; silent here, a script may print them."""

    # ----------------------------------------------------------------- samples

    def sample(self, measurement: str, variant: str, rep: int, fn: Callable[[], Record]) -> None:
        """Run one sample on quiet cores; a failure becomes a record with its error and the benchmark goes on.

        A sample that other processes disturbed runs again, up to ``retries`` times, right
        away (so it stays next to the variants it is compared with); every attempt is
        recorded, the disturbed ones with ``superseded: true``.
        """
        last = self.retries or 0
        for attempt in range(1 + last):
            gc.collect()
            self.wait_for_quiet()
            meter = ContentionMeter()
            try:
                values = fn()
            except Exception as error:  # noqa: BLE001 - any failure is a result to record
                self.record(measurement, variant, rep=rep, error=f"{type(error).__name__}: {error}")
                traceback.print_exc()
                return
            values["other_cores_busy"] = busy = meter.other_cores_busy()
            final = busy is None or busy <= self.max_contention or attempt == last
            tries = {} if self.retries is None else {"attempt": attempt, "superseded": not final}
            row = self.record(measurement, variant, rep=rep, **tries, **values)
            self.show(measurement, variant, rep, values)
            if final:
                self.samples.append(row)
                return

    def wait_for_quiet(self) -> None:
        """Wait, within ``max_wait`` seconds in all, until other processes leave the cores alone."""
        quiet = 0
        while quiet < self.QUIET_POLLS and self.waited < self.max_wait:
            meter = ContentionMeter()
            time.sleep(self.QUIET_POLL_SECONDS)
            self.waited += self.QUIET_POLL_SECONDS
            busy = meter.other_cores_busy()
            if busy is None or busy <= self.max_contention:
                quiet += 1
                continue
            quiet = 0
            time.sleep(self.BUSY_PAUSE_SECONDS)
            self.waited += self.BUSY_PAUSE_SECONDS

    def run_interleaved(self, units: list[Callable[[], None]], rep: int) -> None:
        """One repetition's units, in order on even repetitions and reversed on odd ones (A B C, then C B A).

        Compared variants sit next to each other in ``units``, so a pair runs close in time,
        and slow drift on a noisy machine cancels out of the median of per-repetition ratios.
        """
        for unit in units if rep % 2 == 0 else reversed(units):
            unit()

    def samples_where(self, **fields: Any) -> list[Record]:
        """The final, successful samples whose records have these field values."""
        return [r for r in self.samples if all(r.get(k) == v for k, v in fields.items())]

    def select(self, *variants: str, **fields: Any) -> Selection:
        """:class:`Selection` of ``variants`` among the samples with these field values (e.g. ``size=...``)."""
        return Selection(self.samples_where(**fields), variants, max_contention=self.max_contention)

    # ----------------------------------------------------------------- the end

    def finish(self, title: list[str], header: list[str], rows: list[list[str]], *, started: float, out: Path) -> None:
        """Record the total runtime, print the table (``title``, then ``header`` and ``rows``), write the results."""
        total = time.perf_counter() - started
        self.diag("total_seconds", total, "s")
        print("\n".join([*title, "", *_table(header, rows), *self.footer(total)]))
        write_results(out, self.records)

    def footer(self, total: float) -> list[str]:
        """How busy other processes kept the cores, what was run again, what failed, the runtime."""
        lines = []
        final = [r for r in self.records if not r.get("superseded")]
        busy = [r["other_cores_busy"] for r in final if r.get("other_cores_busy") is not None]
        retried = len(self.records) - len(final)
        if busy:
            lines.append(
                f"\nother processes kept {statistics.median(busy):.2f} cores busy during the median sample "
                f"(max {max(busy):.2f})" + ("; rerun on a quiet machine" if statistics.median(busy) > 0.1 else "")
                + (f"; {retried} disturbed samples were run again (records with superseded: true)" if retried else "")
            )
        errors = [r for r in self.records if r.get("error")]
        if errors:
            lines.append(f"\n{len(errors)} failed samples, e.g. {errors[0]['variant']}: {errors[0]['error']}")
        lines.append(f"\ntotal runtime {total:.0f} s")
        return lines


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    """Aligned lines: the first two columns left-justified, the others right-justified."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(r: list[str]) -> str:
        return "  ".join(str(c).ljust(w) if i < 2 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths)))

    return [line(header), "  ".join("-" * w for w in widths), *(line(r) for r in rows)]
