"""Soak: N simulated people talking to the `make demo` app for a long time; what grows, and whether anything
is lost.

    RAY_worker_niceness=0 python bench/soak.py                   # 8 people, 30 min, the first 5 a warm-up
    python bench/soak.py --people 8 --minutes 30 --warm-up 5 --every 60

It starts the app of `serve_config.yaml` as `bench/load.py` does (tiny random presets on CPU, streaming
pocketsphinx, echo responder) with a history folder of its own, and runs `bench/load.py`'s people
(`bench/load_client.py`: spoken turns at real time, each reply played out) in one long run. Every `--every`
seconds it samples the RSS of each server process. At the end it prints RSS per process over time, the
growth of the total after the warm-up against the target (≤ 2%), every error, and checks each conversation's
history file: every turn that finished with a completed reply must be in it (the person's turn and the
reply). Exits 1 if a target is missed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.launch import demo_config, free_port, start_app, stop_app
from bench.load import run_people, warm_up
from bench.load_client import SENTENCES, Plan, RunStats, make_utterance
from bench.load_procs import snapshot
from bench.report import machine_line, markdown

GROWTH_TARGET = 0.02  # of the total RSS, from the end of the warm-up to the end


async def sample(every_s: float, start: float, into: list[tuple[float, dict[str, float]]]) -> None:
    """Every `every_s`: (minutes into the run, process name → RSS MB; same-named processes summed)."""
    while True:
        by_name: dict[str, float] = defaultdict(float)
        for p in (await asyncio.to_thread(snapshot, True)).values():
            by_name[p.name] += p.mb
        into.append(((time.perf_counter() - start) / 60, dict(by_name)))
        await asyncio.sleep(every_s)


async def soak(args: argparse.Namespace, url: str) -> tuple[RunStats, list[tuple[float, dict[str, float]]]]:
    folder = Path(tempfile.mkdtemp(prefix="soak_speech_"))
    try:
        utterances = tuple(make_utterance(text, folder) for text in SENTENCES)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print(f"warm-up turn: {await warm_up(url, utterances[0]):.1f} s", flush=True)
    samples: list[tuple[float, dict[str, float]]] = []
    plan = Plan(url, args.people, args.minutes * 60, args.ramp, utterances, time.perf_counter())
    sampler = asyncio.create_task(sample(args.every, plan.start, samples))
    try:
        stats = await run_people(plan, own_cluster=True)
    finally:
        sampler.cancel()
    return stats, samples


def history_check(history: Path, finished: dict[str, int]) -> list[str]:
    """What is missing: a conversation whose file holds fewer turns of either side than finished."""
    missing = []
    for conversation_id, turns in sorted(finished.items()):
        path = history / f"{conversation_id}.jsonl"
        records = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
        roles = [r["role"] for r in records if r.get("kind") == "turn"]
        for role in ("user", "assistant"):
            if roles.count(role) < turns:
                missing.append(f"{conversation_id}: {roles.count(role)} {role} turns of {turns} finished")
    return missing


def report(args, stats: RunStats, samples, missing: list[str]) -> tuple[str, bool]:
    names = sorted(
        {name for _, by_name in samples for name in by_name}, key=lambda n: -samples[-1][1].get(n, 0)
    )
    rows = []
    for minutes, by_name in samples:
        if not rows or minutes - rows[-1][0] >= args.table_every - 1e-6 or (minutes, by_name) == samples[-1]:
            rows.append((minutes, by_name))
    table = [[f"{m:.1f}", f"{sum(b.values()):.0f}", *(f"{b.get(n, 0):.0f}" for n in names)] for m, b in rows]
    after = [(m, b) for m, b in samples if m >= args.warm_up]
    base, end = sum(after[0][1].values()), sum(samples[-1][1].values())
    growth = (end - base) / base
    errors = {**stats.errors, **stats.failures}
    ok = growth <= GROWTH_TARGET and not errors and not stats.crashes and not missing
    lines = [
        machine_line(),
        f"# soak: {args.people} people for {args.minutes:g} min (the first {args.warm_up:g} a warm-up); "
        f"RSS MB of the server's processes",
        markdown(["min", "total", *names], table),
        "",
        f"turns completed {stats.turns} in {len(stats.finished)} conversations; busy {stats.refused}",
        f"total RSS {base:.0f} MB at {after[0][0]:.1f} min → {end:.0f} MB at {samples[-1][0]:.1f} min: "
        f"{100 * growth:+.2f}% (target ≤ {100 * GROWTH_TARGET:g}%)",
        "errors: " + (", ".join(f"{k} {v}" for k, v in sorted(errors.items())) or "none"),
        "crashes: " + ("; ".join(stats.crashes) or "none"),
        "history: "
        + ("; ".join(missing) or f"every finished turn is in its file ({sum(stats.finished.values())})"),
        "soak targets: " + ("met" if ok else "MISSED"),
    ]
    return "\n".join(lines), ok


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--people", type=int, default=8)
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--warm-up", type=float, default=5.0, help="minutes not counted in the growth")
    ap.add_argument("--ramp", type=float, default=10.0, help="seconds over which the people start")
    ap.add_argument("--every", type=float, default=30.0, help="seconds between RSS samples")
    ap.add_argument("--table-every", type=float, default=5.0, help="minutes between the table's rows")
    args = ap.parse_args()
    if not (1 <= args.people <= 64 and 0 < args.minutes <= 120 and 0 <= args.warm_up < args.minutes):
        ap.error("1..64 people, 0 < minutes ≤ 120 (bounded: loopback load), 0 ≤ warm-up < minutes")
    history = Path(tempfile.mkdtemp(prefix="soak_history_"))
    try:
        url = start_app(demo_config(free_port(), str(history), None, None))
        try:
            stats, samples = asyncio.run(soak(args, url))
        finally:
            stop_app()
        text, ok = report(args, stats, samples, history_check(history, stats.finished))
    finally:
        shutil.rmtree(history, ignore_errors=True)
    print(text)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
