"""The load benchmark's report: a table row per N, the details under it, the end-of-turn ÷ streaming
ratios and issue 16's targets for streaming recognition (the columns are described in bench/load.py)."""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file too (`--help`)

from bench.load_client import RunStats
from bench.load_procs import ray_clusters
from bench.report import machine_line, markdown, ms, pct_ms, quantile


def growth_per_minute(memory: list[tuple[float, float]]) -> float:
    if len(memory) < 2:
        return float("nan")
    t, mb = np.array([m[0] for m in memory]), np.array([m[1] for m in memory])
    return float(np.polyfit(t, mb, 1)[0] * 60)


def row(s: RunStats) -> list[str]:
    mb = [m[1] for m in s.memory]
    counts = {**s.errors, **s.failures}
    errors = ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "none"
    underrun = f"{100 * len(s.stalls) / s.replies:.0f}" if s.replies else "-"
    stall = f"{np.mean(s.stalls) * 1000:.0f}" if s.stalls else "-"
    return [
        str(s.people),
        str(s.turns),
        " / ".join(pct_ms(s.turn_latency, q) for q in (50, 95, 99)),
        " / ".join(pct_ms(s.eos_latency, q) for q in (50, 95)),
        str(s.replies),
        underrun,
        stall,
        str(s.refused),
        f"{mb[0]:.0f} / {max(mb):.0f} / {mb[-1]:.0f}" if mb else "-",
        f"{growth:+.0f}" if np.isfinite(growth := growth_per_minute(s.memory)) else "-",
        errors,
    ]


HEADER = [
    "people",
    "turns",
    "turn ms p50/p95/p99",
    "eos ms p50/p95",
    "replies",
    "underrun %",
    "stall ms",
    "busy",
    "mem MB start/peak/end",
    "MB/min",
    "errors",
]


def table(rows: list[list[str]]) -> str:
    """Numbers right-aligned; the last column (the errors, text) left-aligned."""
    return markdown(HEADER, rows, left={len(HEADER) - 1})


def by_name(changes: list[tuple[str, float, float]]) -> dict[str, tuple[float, float]]:
    """Processes of the same name (two idle workers, say) added up: name → (MB grown, cores)."""
    out: dict[str, tuple[float, float]] = {}
    for name, mb, cores in changes:
        before = out.get(name, (0.0, 0.0))
        out[name] = (before[0] + mb, before[1] + cores)
    return out


def details(s: RunStats) -> str:
    """What the table leaves out: reply length and speed, where replies stalled, the server's CPU and
    memory by process, and the clients' own load."""
    mem = s.memory[:: max(len(s.memory) // 10, 1)]
    audio, span = (sum(x) for x in zip(*s.reply_audio, strict=True)) if s.reply_audio else (0.0, 0.0)
    speed = f"{audio / span:.2f}× real time" if span else "-"
    early = sum(at < 0.5 for at in s.stall_starts)
    procs = by_name(s.changes())
    cpu = sorted(procs.items(), key=lambda kv: -kv[1][1])[:6]
    grew = sorted(procs.items(), key=lambda kv: -kv[1][0])[:3]
    lag = f"p99 {pct_ms(s.loop_lag, 99)} ms, max {pct_ms(s.loop_lag, 100)} ms"
    return "\n    ".join(
        [
            f"{s.people:>3} people: {s.wall_s:.0f} s; loadavg {s.loadavg[0]} → {s.loadavg[1]}; cpu probe "
            f"{s.cpu_probe_ms[0]:.1f} → {s.cpu_probe_ms[1]:.1f} ms",
            f"replies: {audio / max(len(s.reply_audio), 1):.1f} s of audio on average, streamed at {speed} "
            f"(first → last delta); {early} of {len(s.stall_starts)} underruns began in the first 0.5 s",
            f"turn ms split: speech_stopped → transcript p50/p95 {pct_ms(s.transcript_latency, 50)} / "
            f"{pct_ms(s.transcript_latency, 95)}, transcript → first audio {pct_ms(s.reply_latency, 50)} / "
            f"{pct_ms(s.reply_latency, 95)}",
            "server CPU (cores): " + ", ".join(f"{name} {c:.2f}" for name, (_, c) in cpu),
            f"server RSS MB ({len(s.last[1])} processes) over time: "
            + " ".join(f"{t:.0f}s:{mb:.0f}" for t, mb in mem),
            "grew most (MB): " + ", ".join(f"{name} {mb:+.0f}" for name, (mb, _) in grew),
            f"load generator (this process): {s.cpu_s / max(s.wall_s, 1e-9):.2f} cores, event-loop lag {lag}",
        ]
    )


def report(args: argparse.Namespace, url: str, runs: list[tuple[str, list[RunStats]]]) -> str:
    recognizers = f", {args.recognizers} SpeechRecognizer replicas" if args.recognizers else ""
    app = f"its own app (serve_config.yaml{recognizers}, one launch per ASR mode)" if not args.url else url
    lines = [
        machine_line(),
        f"# date: {datetime.now().astimezone():%Y-%m-%d %H:%M %Z}; {args.seconds:g} s per run, "
        f"ramp {args.ramp:g} s, against {app}",
    ]
    for mode, results in runs:
        if results:
            lines += ["", f"ASR {mode}:", "", table([row(s) for s in results]), ""]
            lines += [details(s) for s in results]
    modes = dict(runs)
    if modes.get("streaming") and modes.get("end-of-turn"):
        lines += ["", *compare(modes["streaming"], modes["end-of-turn"])]
    if modes.get("streaming"):
        lines += ["", *targets(modes["streaming"])]
    clusters = ray_clusters()
    if args.url and clusters > 1:
        lines.append(f"note: {clusters} Ray clusters run on this machine; the memory columns add them all up")
    crashes = [c for _, results in runs for s in results for c in s.crashes]
    if crashes:
        lines += ["", "CRASHES:", *(f"  {c}" for c in Counter(crashes))]
    return "\n".join(lines)


def p50(values: list[float]) -> float | None:
    return quantile(values, 50)


def underrun_share(s: RunStats) -> float | None:
    return len(s.stalls) / s.replies if s.replies else None


def compare(streaming: list[RunStats], end_of_turn: list[RunStats]) -> list[str]:
    """End-of-turn over streaming, N by N, for the N both modes ran."""

    def ratio(a: float | None, b: float | None) -> str:
        return f"{a / b:.2f}" if a is not None and b else "-"

    def pct_of(x: float | None) -> str:
        return "-" if x is None else f"{100 * x:.0f}"

    eot = {s.people: s for s in end_of_turn}
    rows = [
        "end-of-turn ÷ streaming (same run):",
        "",
        "| people | speech_stopped → transcript p50 ms (s / e) | ratio | turn p50 ms (s / e) | ratio "
        "| turn p95 ratio | underrun % (s / e) |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in streaming:
        e = eot.get(s.people)
        if e is None:
            continue
        st, et = p50(s.transcript_latency), p50(e.transcript_latency)
        sl, el = p50(s.turn_latency), p50(e.turn_latency)
        s95, e95 = quantile(s.turn_latency, 95), quantile(e.turn_latency, 95)
        rows.append(
            f"| {s.people} | {ms(st)} / {ms(et)} | {ratio(et, st)} | {ms(sl)} / {ms(el)} "
            f"| {ratio(el, sl)} | {ratio(e95, s95)} "
            f"| {pct_of(underrun_share(s))} / {pct_of(underrun_share(e))} |"
        )
    return rows


def targets(streaming: list[RunStats]) -> list[str]:
    """Issue 16's targets for streaming recognition, each PASS, FAIL or not run."""
    by = {s.people: s for s in streaming}
    checks: list[tuple[str, bool | None]] = []

    def check(name: str, people: int, value: Callable[[RunStats], float | None], limit: float) -> None:
        s = by.get(people)
        v = value(s) if s is not None else None
        checks.append(
            (
                f"{name} at {people}: {'-' if v is None else f'{v:.3g}'} (≤ {limit:g})",
                None if v is None else v <= limit,
            )
        )

    check("speech_stopped → transcript p50 s", 1, lambda s: p50(s.transcript_latency), 0.150)
    check("turn p50 s", 1, lambda s: p50(s.turn_latency), 0.400)
    check("turn p50 s", 8, lambda s: p50(s.turn_latency), 1.0)
    check(
        "turn p95 s",
        8,
        lambda s: quantile(s.turn_latency, 95),
        2.0,
    )
    check("underrun share", 8, underrun_share, 0.05)
    errors = sum(sum(s.errors.values()) + sum(s.failures.values()) for s in streaming)
    checks.append((f"errors and failures, all N: {errors} (= 0)", errors == 0))
    verdict = {True: "PASS", False: "FAIL", None: "not run"}
    return ["targets (streaming):", *(f"  {verdict[ok]}: {name}" for name, ok in checks)]
