"""What every benchmark's report is made of: percentiles, millisecond cells, tables, the machine line.

Percentiles are numpy's linear interpolation between the nearest ranks, everywhere, so two scripts' p95s
of the same numbers agree. Two table shapes: `markdown` pads a finished table to fixed width (it reads the
same raw and rendered); `StreamedTable` prints its header at once and each row as soon as it is measured,
at widths fixed in advance, for runs that may be cut off (the GPU lease) or that report as they go.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Collection, Sequence
from pathlib import Path

import numpy as np


def quantile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0-100) of `values`, None when there are none."""
    return float(np.percentile(values, q)) if len(values) else None


def ms(seconds: float | None) -> str:
    """Seconds as a whole-millisecond cell; `-` for no value."""
    return "-" if seconds is None else f"{seconds * 1000:.0f}"


def pct_ms(values: Sequence[float], q: float) -> str:
    """The q-th percentile of `values` (seconds) as a millisecond cell."""
    return ms(quantile(values, q))


def markdown(header: Sequence[str], rows: Sequence[Sequence[str]], left: Collection[int] = ()) -> str:
    """A markdown table padded to fixed width. Cells are right-aligned (numbers), except the columns whose
    indices are in `left` (text)."""
    short = [r for r in rows if len(r) != len(header)]
    if short:
        raise ValueError(f"rows of {len(short[0])} cells in a table of {len(header)} columns: {short[0]}")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        pairs = enumerate(zip(cells, widths, strict=True))
        padded = [c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in pairs]
        return "| " + " | ".join(padded) + " |"

    rule = [":" + "-" * (w + 1) if i in left else "-" * (w + 1) + ":" for i, w in enumerate(widths)]
    return "\n".join([line(header), "|" + "|".join(rule) + "|", *(line(r) for r in rows)])


class StreamedTable:
    """A markdown table printed as it is measured: the header now, each row by `row`, cells left-aligned
    and padded to the columns' given widths (a longer cell widens its row only)."""

    def __init__(self, columns: Sequence[tuple[str, int]]) -> None:
        self.widths = tuple(w for _, w in columns)
        self.row([name for name, _ in columns])
        print("|" + "|".join("-" * (w + 2) for w in self.widths) + "|", flush=True)

    def row(self, cells: Sequence[str]) -> None:
        padded = (c.ljust(w) for c, w in zip(cells, self.widths, strict=True))
        print("| " + " | ".join(padded) + " |", flush=True)


PROBE_ITERATIONS = 1_000_000  # ~30 ms of one core


def cpu_probe_ms(rounds: int = 5) -> float:
    """How fast a core of this machine runs right now: the CPU milliseconds of this thread (not wall time,
    so a busy machine's run queue does not count) for a fixed pure-Python loop, the median of `rounds`.

    The same 2-vCPU VM read 0.65 s and 0.95-1.0 s for ten million of these additions a few hours apart
    (2026-12-08), its engine frame step 14 and 22-30 ms, and every load result moved with it: a report
    carries the reading, so that runs taken hours or VMs apart can be compared. Lower is faster."""
    times = []
    for _ in range(rounds):
        start, total = time.thread_time(), 0
        for i in range(PROBE_ITERATIONS):
            total += i
        times.append(time.thread_time() - start)
    return 1000 * statistics.median(times)


def machine_line() -> str:
    """`# machine: <CPU model>, <cores> cores; torch threads per replica <CSM_TORCH_THREADS>; cpu probe
    <ms>` (`cpu_probe_ms`, read now)."""
    model = next(
        (
            ln.split(":", 1)[1].strip()
            for ln in Path("/proc/cpuinfo").read_text().splitlines()
            if ln.startswith("model name")
        ),
        "unknown CPU",
    )
    threads = os.environ.get("CSM_TORCH_THREADS", "1")
    return (
        f"# machine: {model}, {os.cpu_count()} cores; torch threads per replica {threads}"
        f" (CSM_TORCH_THREADS); cpu probe {cpu_probe_ms():.1f} ms (bench/report.py: lower is faster)"
    )
