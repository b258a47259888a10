"""The conversation benchmark's report: first audio and rows per reply, turn by turn, per phase; the
off/on ratios per N; the targets (reuse on): first audio flat over the conversation, rows prefilled cut."""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file too (`--help`)

from bench.conversation_turns import REPLY_SECONDS, SEED, TEXT_CHARS, Phase
from bench.report import machine_line, markdown, ms

FIRST, LAST = 2, 3  # the first-audio target compares the last 3 turns' mean with the first 2 turns'
LATENCY_RATIO, ROWS_RATIO = 1.2, 3.0
ROWS_FROM_TURN = 3


def num(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def at(values: Sequence, t: int) -> Any:
    return values[t] if t < len(values) else None


def by_turn(phases: Sequence[Phase], turns: int, cell: Callable[[Phase, int], str]) -> str:
    header = ["turn", *(p.key for p in phases)]
    return markdown(header, [[str(t + 1), *(cell(p, t) for p in phases)] for t in range(turns)])


def latency_cell(p: Phase, t: int) -> str:
    values = at(p.first_audio, t)
    return ms(statistics.mean(values)) if values else "-"


def rows_cell(p: Phase, t: int) -> str:
    prefilled, reused, rows = at(p.prefilled, t), at(p.reused, t), at(p.rows, t)
    if prefilled is None:
        return "-"
    return " / ".join([num(prefilled), num(reused), *([num(rows)] if rows is not None else [])])


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None:
        return None
    return a / b if b else float("inf")


def fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def latency_target(on: Phase, turns: int) -> tuple[float | None, bool | None]:
    """last-3 mean / first-2 mean of the reuse-on phase, and whether it is within LATENCY_RATIO."""
    if turns < FIRST + LAST or len(on.first_audio) < turns:
        return None, None
    r = ratio(on.mean_first_audio(slice(-LAST, None)), on.mean_first_audio(slice(0, FIRST)))
    return r, None if r is None else r <= LATENCY_RATIO


def rows_target(on: Phase, off: Phase | None) -> tuple[float | None, bool | None]:
    """The least off/on prefilled-rows ratio over turns ≥ ROWS_FROM_TURN, and whether each is ≥ ROWS_RATIO."""
    if off is None:
        return None, None
    pairs = list(zip(on.prefilled, off.prefilled, strict=False))[ROWS_FROM_TURN - 1 :]
    ratios = [ratio(b, a) for a, b in pairs]
    if not ratios or any(r is None for r in ratios):
        return None, None
    least = min(ratios)
    return least, least >= ROWS_RATIO


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("PASS" if ok else "FAIL")


def mean_of(values: Sequence[float | None], start: int) -> float | None:
    kept = [v for v in values[start:] if v is not None]
    return statistics.mean(kept) if kept else None


def summary(phases: Sequence[Phase], counts: Sequence[int], turns: int) -> tuple[str, list[str]]:
    """The ratio table (a row per N) and the target lines."""
    find = {(p.conversations, p.reuse): p for p in phases}
    rows, lines, verdicts = [], [], []
    tail = slice(ROWS_FROM_TURN - 1, None)
    for n in counts:
        on, off = find.get((n, True)), find.get((n, False))
        lat = ratio(off.mean_first_audio(tail), on.mean_first_audio(tail)) if on and off else None
        pre = (
            ratio(mean_of(off.prefilled, tail.start), mean_of(on.prefilled, tail.start))
            if on and off
            else None
        )
        trend = [latency_target(p, turns)[0] if p else None for p in (on, off)]
        rows.append([str(n), fmt(lat), fmt(pre), fmt(trend[0]), fmt(trend[1])])
        if on is None:
            continue
        (lr, lok), (rr, rok) = latency_target(on, turns), rows_target(on, off)
        verdicts += [lok, rok]
        lines.append(
            f"{n} conversations, reuse on: first audio last {LAST} / first {FIRST} = {fmt(lr)} "
            f"(≤ {LATENCY_RATIO}) {verdict(lok)}; rows prefilled off/on from turn {ROWS_FROM_TURN}, least "
            f"{fmt(rr)} (≥ {ROWS_RATIO:g}) {verdict(rok)}"
        )
    overall = "FAIL" if False in verdicts else "PASS" if verdicts and None not in verdicts else "incomplete"
    lines.append(f"targets: {overall}")
    header = [
        "convs",
        f"first audio off/on (turns {ROWS_FROM_TURN}+)",
        f"prefilled off/on (turns {ROWS_FROM_TURN}+)",
        f"on: last {LAST} / first {FIRST}",
        f"off: last {LAST} / first {FIRST}",
    ]
    return markdown(header, rows), lines


def report(args: argparse.Namespace, phases: Sequence[Phase], elapsed: float, command: str) -> str:
    sources = sorted({s for p in phases for s in p.sources}) or ["none (the server reports no row counts)"]
    table, targets = summary(phases, args.conversations, args.turns)
    cut = [f"phase {p.key}: {p.error}" for p in phases if p.error]
    return "\n".join(
        [
            f"{machine_line()}; generator torch threads {args.threads}",
            f"# date: {datetime.now().astimezone():%Y-%m-%d %H:%M %Z}; command: {command}",
            f"# workload: preset {args.preset} (random weights), cpu fp32, {args.turns} typed turns of "
            f"~{TEXT_CHARS} chars per conversation, echo responder, VAD off, max reply {REPLY_SECONDS:g} s, "
            f"seed {SEED}; a turn's conversations start together; columns: conversations, reuse on/off",
            "",
            "First audio ms (response.create sent → first audio delta), mean over the round's conversations:",
            "",
            by_turn(phases, args.turns, latency_cell),
            "",
            f"Rows per reply, prefilled / reused (/ prompt rows, from x-prompt); from {', '.join(sources)}:",
            "",
            by_turn(phases, args.turns, rows_cell),
            "",
            table,
            "",
            *targets,
            *cut,
            "phase seconds: " + ", ".join(f"{p.key} {p.elapsed:.0f}" for p in phases),
            f"elapsed: {elapsed:.0f} s",
        ]
    )
