"""The bench stage: which backbone, which head, how many labels, on your own data.

Its rooms: :mod:`.grid` (``bench``: the grid of backbones x heads x label budgets x seeds, and
``report``: re-rendering a results folder), :mod:`.records` (named backbone lists in
``backbones.json``, run ids, record fields, ``results.json``/``results.csv``) and :mod:`.report`
(tables, plots and the self-contained HTML page, a pure function of the records).
"""

from __future__ import annotations

from ..errors import BenchError
from .grid import BenchResult, bench, report
from .records import (ALL, BENCH_FORMAT, SCRATCH, backbone_lists, parse_shots, read_finetune_run, read_results, resolve_backbones,
                      scratch_record, write_results)
from .report import PLOT_CONFUSION, PLOT_PARETO, PLOT_SHOTS, ReportResult, markdown_table, render, summarise, text_table

__all__ = ["ALL", "BENCH_FORMAT", "PLOT_CONFUSION", "PLOT_PARETO", "PLOT_SHOTS", "SCRATCH", "BenchError", "BenchResult",
           "ReportResult", "backbone_lists", "bench", "markdown_table", "parse_shots", "read_finetune_run", "read_results",
           "render", "report", "resolve_backbones", "scratch_record", "summarise", "text_table", "write_results"]
