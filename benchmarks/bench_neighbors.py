"""All-pairs exact top-10 of N x 1280 embeddings: embedpipe's search against a plain matmul of the same size, and FAISS.

Every row of an (N, D) float32 array (``--n``, ``--dims``; rows around ``--centres`` centres, so
neighbourhoods are crowded as real embeddings are) searched among the others for its ``--k``
most cosine-similar rows, exactly. Variants, run once per repetition in alternating order
(A B C ... then ... C B A), so compared variants run next to each other:

- ``matmul fp32`` / ``matmul bf16`` (``fp16`` on CUDA): the plain product ``X @ X.T`` of the
  same size (2 N^2 D FLOPs), in the row blocks the search uses (the whole N x N product does not
  fit in memory at N = 100k: 40 GB) and with nothing else: no top-k, no normalisation. The
  ceiling the search is measured against.
- ``search fp32``: :func:`embedpipe.explore.search` with ``precision="fp32"``;
- ``search auto``: the same at its default precision (bf16 on CPUs with native bf16, fp16 on
  CUDA: a low-precision pass, an fp32 re-scoring of k + 16 candidates, and fp32 re-searches of the
  queries its error bound cannot certify); skipped where auto is fp32;
- ``faiss flat``: FAISS's exact ``IndexFlatIP`` (:func:`embedpipe.explore.faiss_search`, the
  ``faiss`` extra), on the CPU with the same thread count.

Reported for each: seconds, the achieved FLOP rate (2 N^2 D / seconds), its ratio to the plain
matmul of the same precision measured in the same repetition (median over repetitions; goal
>= 0.7 for embedpipe's search), the peak memory held during the variant
(:class:`embedpipe.machine.PeakMemory`: peak RSS on a CPU, absolute; the CUDA allocator's peak on a
GPU), the share of rows whose neighbours equal the fp32 search's and the largest difference of their
similarities from its (every variant is exact up to fp32 rounding, so rows that differ are ties
within ~1e-6).

Output: a table on stdout and flat JSON records in ``benchmarks/results/neighbors-<machine>-n<N>.json``.

Example::

    python benchmarks/bench_neighbors.py                 # N = 100,000 as in the issue: ~15 min on 2 cores per repetition
    python benchmarks/bench_neighbors.py --n 20000       # what a 2-core machine affords, ~4 min
    python benchmarks/bench_neighbors.py --device cuda --n 100000 --repeats 5
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from _harness import Harness, add_sampling_options, machine_info, results_path

GOAL = 0.7  # the search's FLOP rate over the plain matmul's (from the issue)


def clustered(n: int, d: int, centres: int, seed: int) -> Any:
    """float32 (n, d) rows around ``centres`` random centres (noise 0.5 of the centres' scale)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    middle = rng.standard_normal((centres, d), dtype=np.float32)
    return middle[rng.integers(0, centres, n)] + 0.5 * rng.standard_normal((n, d), dtype=np.float32)


class Bench(Harness):
    def __init__(self, args: argparse.Namespace) -> None:
        import numpy as np
        import torch

        from embedpipe.explore.knn import normalize, resolve_search_precision
        from embedpipe.machine import resolve_device

        self.args = args
        self.device = resolve_device(args.device)
        self.low = resolve_search_precision("auto", self.device)
        self.info = machine_info(self.device, benchmark="neighbors", n=args.n, dims=args.dims, k=args.k, centres=args.centres)
        super().__init__(self.info, max_contention=args.max_contention, max_wait=args.max_wait, retries=args.retries)
        self.X = clustered(args.n, args.dims, args.centres, args.seed)
        self.unit = torch.from_numpy(normalize(self.X)).to(self.device)
        self.flops = 2.0 * args.n * args.n * args.dims
        self.reference: Any = None  # the fp32 search's indices, to check the others against
        self.np = np

    def _sync(self) -> None:
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize()

    def _timed(self, fn: Any) -> tuple[Any, dict[str, Any]]:
        from embedpipe.machine import PeakMemory

        self._sync()
        with PeakMemory(self.device) as memory:
            started = time.perf_counter()
            result = fn()
            self._sync()
            seconds = time.perf_counter() - started
        return result, {"seconds": seconds, "gflops": self.flops / seconds / 1e9, "peak_bytes": memory.peak_bytes,
                        "peak_kind": memory.kind}

    def matmul(self, precision: str) -> dict[str, Any]:
        """The plain product in the search's row blocks: what the search's matmuls alone cost."""
        import torch

        from embedpipe.explore.knn import BLOCK_BYTES, MARGIN

        n, d = self.unit.shape
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
        bank = self.unit.to(dtype)
        wanted = 0 if precision == "fp32" else min(n - 1, self.args.k + MARGIN) * d
        block = max(1, BLOCK_BYTES // (4 * max(1, n, wanted)))  # the search's own block size (knn.search)

        def run() -> float:
            total = 0.0
            with torch.inference_mode():
                for start in range(0, n, block):
                    total += float((bank[start : start + block] @ bank.T)[0, 0])  # keep the product alive until used
            return total

        _, values = self._timed(run)
        return {**values, "precision": precision, "block_rows": block}

    def search(self, precision: str) -> dict[str, Any]:
        from embedpipe.explore import search

        found, values = self._timed(lambda: search(self.X, self.X, self.args.k, exclude_self=True, device=self.device,
                                                   precision=precision))
        if precision == "fp32":
            self.reference = found
        return {**values, "precision": found.precision, "rechecked": found.rechecked, **self._agree(found)}

    def faiss(self) -> dict[str, Any]:
        import faiss
        import torch

        from embedpipe.explore import faiss_search

        faiss.omp_set_num_threads(torch.get_num_threads())
        found, values = self._timed(lambda: faiss_search(self.X, self.X, self.args.k, exclude_self=True))
        return {**values, "precision": "fp32", **self._agree(found)}

    def _agree(self, found: Any) -> dict[str, float | None]:
        """The share of rows with the fp32 search's neighbours, and the largest similarity difference from its."""
        if self.reference is None:
            return {"agree": None, "max_similarity_difference": None}
        same = (found.indices == self.reference.indices).all(axis=1).mean()
        gap = abs(found.similarities - self.reference.similarities).max()
        return {"agree": float(same), "max_similarity_difference": float(gap)}

    def units(self, rep: int) -> list[Any]:
        units = [lambda: self.sample("all_pairs", "matmul fp32", rep, lambda: self.matmul("fp32")),
                 lambda: self.sample("all_pairs", "search fp32", rep, lambda: self.search("fp32"))]
        if self.low != "fp32":
            units += [lambda: self.sample("all_pairs", f"matmul {self.low}", rep, lambda: self.matmul(self.low)),
                      lambda: self.sample("all_pairs", "search auto", rep, lambda: self.search("auto"))]
        if not self.args.no_faiss:
            units.append(lambda: self.sample("all_pairs", "faiss flat", rep, self.faiss))
        return units

    def run(self) -> None:
        from embedpipe.explore import search

        small = self.X[: min(2048, len(self.X))]
        for precision in ("fp32", self.low):  # warm-up: the first large matmul of a process pays for thread pools and pages
            search(small, small, self.args.k, exclude_self=True, device=self.device, precision=precision)
        self.search("fp32")  # the reference answer the others are checked against (the same every time: exact)
        for rep in range(self.args.repeats):
            self.run_interleaved(self.units(rep), rep)

    def table(self) -> list[list[str]]:
        rows = []
        pairs = [("matmul fp32", "matmul fp32"), ("search fp32", "matmul fp32"), ("faiss flat", "matmul fp32")]
        if self.low != "fp32":
            pairs[2:2] = [(f"matmul {self.low}", f"matmul {self.low}"), ("search auto", f"matmul {self.low}")]
        for variant, base in pairs:
            chosen = self.select(variant, base) if variant != base else self.select(variant)
            if not chosen.reps:
                continue
            ratio = None if variant == base else chosen.median(lambda g, v=variant, b=base: g[b]["seconds"] / g[v]["seconds"])
            seconds, gflops, peak = (chosen.value(variant, k) for k in ("seconds", "gflops", "peak_bytes"))
            agree, gap = chosen.value(variant, "agree"), chosen.value(variant, "max_similarity_difference")
            goal = "" if ratio is None or variant.startswith("faiss") else ("pass" if ratio >= GOAL else "**miss**")
            self.record("summary", variant, seconds=seconds, gflops=gflops, ratio_to_matmul=ratio, matmul=base, goal=GOAL if goal else None,
                        peak_bytes=peak, agree=agree, max_similarity_difference=gap, reps=chosen.label())
            rows.append([variant, base if ratio is not None else "", f"{seconds:.2f}", f"{gflops:.1f}",
                         "" if ratio is None else f"{ratio:.2f}", goal, f"{peak / 2**20:.0f}" if peak else "",
                         "" if agree is None else f"{agree:.4f}", "" if gap is None else f"{gap:.1e}", chosen.label()])
        return rows


HEADER = ["variant", "vs", "seconds", "GFLOP/s", "ratio", f"goal >= {GOAL}", "peak MiB", "same as fp32", "max sim. diff", "clean reps"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--n", type=int, default=100_000, help="rows (default: %(default)s, the issue's size)")
    add("--dims", type=int, default=1280, help="embedding width (default: %(default)s, tf_efficientnet_lite0's)")
    add("--k", type=int, default=10, help="neighbours per row (default: %(default)s)")
    add("--centres", type=int, default=64, help="clusters the rows lie around (default: %(default)s)")
    add("--seed", type=int, default=0)
    add("--device", default="auto", help="auto (the GPU if any), cpu, cuda")
    add("--no-faiss", action="store_true", help="leave FAISS out (it is an optional extra)")
    add_sampling_options(parser, what="neighbors", max_wait=120.0)
    add("--retries", type=int, default=0, help="times a sample that other processes disturbed runs again (default: %(default)s)")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    bench = Bench(args)
    out = results_path("neighbors", bench.info, out=args.out, suffix=f"-n{args.n}")
    bench.run()
    title = [(f"all-pairs top-{args.k}: {args.n} x {args.dims} float32 on {bench.device} ({bench.info.get('cpu', '')}, "
              f"{bench.info.get('torch_threads')} threads); auto precision here = {bench.low}"),
             (f"FLOP rate = 2 N^2 D / seconds = {bench.flops / 1e9:.0f} GFLOP / seconds; ratio = the plain matmul's seconds "
              "over the variant's, per repetition (median)")]
    bench.finish(title, HEADER, bench.table(), started=started, out=out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
