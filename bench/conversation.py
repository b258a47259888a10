"""Conversation benchmark: first audio and prompt rows prefilled, turn by turn, over long typed
conversations through the whole app, with the generator's prefix reuse on and off in one run.

    python bench/conversation.py                                  # 1,4,8 conversations × 10 turns × on/off
    python bench/conversation.py --conversations 1 --turns 3 --preset tiny --reuse on     # a smoke run

The app is `serve_config.yaml` deployed as `serve run` deploys it (bench/launch.py: per-deployment
options kept), with the `small` CSM preset, `generator: {prefix_cache: true|false}`, the echo responder, on
a free loopback port and a temporary history folder. Reuse on and off are two launches of the app; phases
run in ABBA order (1: on, off; 4: off, on; 8: on, off) so each pair is measured close together in time
(this shared VM drifts by ±20% in a minute), one launch per change of setting.

A phase: N conversations open (`session.update`: VAD off, `x-sampling` seed and max reply seconds), then
`--turns` rounds; in a round every conversation types one ~60-character turn (`conversation.item.create`,
then `response.create`) at once and waits for `response.done`; the next round starts when all are done.
Each turn's text is unique to its phase, so nothing is reused from an earlier phase but the voice.

Measured per turn (the mean over a round's conversations):
- first audio: `response.create` sent → first `response.output_audio.delta` received;
- rows prefilled (and reused) per reply: `response.done`'s `response["x-prompt"]` when the server sends it,
  else the difference of the generator's `info()` counters `prefilled_rows` / `reused_rows` (what /readyz
  would show, read straight from the CSMGenerator handle: /readyz keeps only its weights fields) over the
  round, divided by N.

Targets (reuse on): the last three turns' mean first audio ≤ 1.2× the first two turns'; from turn 3 on,
each turn prefills ≥ 3× fewer rows per reply than with reuse off.

Ray's workers run at nice 0 (`RAY_worker_niceness`, as in bench/serve.py: the clients here share the
server's cores), replicas other than the generator use one torch thread (`CSM_TORCH_THREADS=1`), the
generator `--threads`. Every phase has a timeout (`--phase-timeout`); a phase cut by it keeps the turns it
finished. Ctrl-C (or SIGTERM) stops, shuts Ray down and prints the phases finished so far.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from pydantic import ValidationError

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.conversation_report import report
from bench.conversation_turns import Phase, generator_counters, run_phase, warm_up
from bench.launch import (
    DEPLOY_TIMEOUT_S,
    SETTLE_TIMEOUT_S,
    app_name,
    config_args,
    demo_config,
    free_port,
    start_app,
    stop_app,
    stop_on_sigterm,
)

LAUNCH_BOUND_S = DEPLOY_TIMEOUT_S + SETTLE_TIMEOUT_S  # start_app waits for the app, then it settles


# ---- the app -------------------------------------------------------------------------------------


def generator_args(preset_slots: int, threads: int, reuse: bool) -> dict:
    """The app's `generator` args, checked against GeneratorConfig here (a bad field fails at once)."""
    from deployments.generator import GeneratorConfig

    args = {"max_slots": preset_slots, "torch_threads": threads, "prefix_cache": reuse}
    if reuse and not has_prefix_cache():
        del args["prefix_cache"]
    GeneratorConfig.model_validate({"preset": "tiny", **args})
    return args


@functools.cache
def has_prefix_cache() -> bool:
    from deployments.generator import GeneratorConfig

    if "prefix_cache" in GeneratorConfig.model_fields:
        return True
    print("note: GeneratorConfig has no prefix_cache yet; reuse on = the generator's default", flush=True)
    return False


def app_config(args: argparse.Namespace, reuse: bool, history: str) -> dict:
    """serve_config.yaml (bench/launch.py: our port and history folder) with our preset and generator."""
    slots = max(16, *args.conversations)  # serve_config.yaml's 16, or more
    config = demo_config(free_port(), history, None, slots)
    app_args = config_args(config)
    app_args["preset"] = args.preset
    app_args["generator"] = {**app_args.get("generator", {}), **generator_args(slots, args.threads, reuse)}
    return config


def launch(args: argparse.Namespace, reuse: bool, history: str) -> tuple[str, str]:
    """Start Ray and the app; returns (ws URL, application name)."""
    config = app_config(args, reuse, history)
    os.environ["CSM_TORCH_THREADS"] = "1"  # codec, ASR, ingress; the generator gets --threads
    return start_app(config), app_name(config)


# ---- the plan ------------------------------------------------------------------------------------


def plan(counts: Sequence[int], settings: Sequence[bool]) -> list[tuple[int, bool]]:
    """(conversations, reuse) phases in ABBA order: each count's settings adjacent, one switch per count."""
    phases = []
    for k, n in enumerate(counts):
        order = settings if k % 2 == 0 else list(reversed(settings))
        phases += [(n, reuse) for reuse in order]
    return phases


def estimate_s(phases: Sequence[tuple[int, bool]], turns: int, warm_turn_s: float) -> float:
    """A rough guess: a round of N costs a lone turn × (1 + (N-1)/3) (batching shares the frame steps; the
    prefill grows with N, and without reuse with the turn number too)."""
    return sum(turns * warm_turn_s * (1 + (n - 1) / 3) * (1.0 if reuse else 1.5) for n, reuse in phases)


def bound_s(phases: Sequence[tuple[int, bool]], timeout: float) -> float:
    launches = len(groups(phases))
    return launches * LAUNCH_BOUND_S + len(phases) * (timeout + 60)


async def run_launch(
    args: argparse.Namespace,
    url: str,
    app: str,
    group: list[tuple[int, int, bool]],
    done: list[Phase],
    on_warm: Callable[[float], None],
) -> None:
    """Warm up, then the group's phases (index, conversations, reuse) on one launch of the app."""
    warm = await warm_up(url)
    print(f"warm-up turn: {warm:.1f} s", flush=True)
    on_warm(warm)
    counters = generator_counters(app)
    for index, n, reuse in group:
        phase = await run_phase(Phase(n, reuse), url, counters, index, args.turns, args.phase_timeout)
        done.append(phase)
        note = f" ({phase.error})" if phase.error else ""
        print(f"phase {phase.key}: {len(phase.first_audio)} turns in {phase.elapsed:.0f} s{note}", flush=True)


def groups(phases: Sequence[tuple[int, bool]]) -> list[list[tuple[int, int, bool]]]:
    """Consecutive phases with the same setting share a launch of the app."""
    out: list[list[tuple[int, int, bool]]] = []
    for index, (n, reuse) in enumerate(phases, start=1):
        if out and out[-1][-1][2] == reuse:
            out[-1].append((index, n, reuse))
        else:
            out.append([(index, n, reuse)])
    return out


def run_all(args: argparse.Namespace, done: list[Phase]) -> None:
    phases = plan(args.conversations, args.reuse)
    bound = bound_s(phases, args.phase_timeout) / 60
    print(f"{len(phases)} phases of {args.turns} turns; bounded by {bound:.0f} min (timeouts)", flush=True)

    def estimate(warm: float) -> None:
        if not done:  # the first launch only
            print(f"estimate: ≈{estimate_s(phases, args.turns, warm):.0f} s of turns", flush=True)

    for group in groups(phases):
        history = tempfile.mkdtemp(prefix="conversation_history_")
        began = time.perf_counter()
        try:
            url, app = launch(args, group[0][2], history)
            print(f"app up (reuse {'on' if group[0][2] else 'off'}) in {time.perf_counter() - began:.0f} s")
            asyncio.run(run_launch(args, url, app, group, done, estimate))
        finally:
            stop_app()
            shutil.rmtree(history, ignore_errors=True)


# ---- the command line ----------------------------------------------------------------------------


def counts_arg(text: str) -> list[int]:
    try:
        counts = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: comma-separated counts, e.g. 1,4,8") from None
    if not all(1 <= n <= 16 for n in counts):
        raise argparse.ArgumentTypeError("each count must be 1..16 (the app's 16 conversations)")
    return counts


def reuse_arg(text: str) -> list[bool]:
    names = {"on": True, "off": False}
    parts = text.split(",")
    if not parts or any(p not in names for p in parts) or len(set(parts)) != len(parts):
        raise argparse.ArgumentTypeError(f"{text!r}: on, off, on,off or off,on")
    return [names[p] for p in parts]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--conversations", type=counts_arg, default=[1, 4, 8])
    ap.add_argument("--turns", type=int, default=10)
    ap.add_argument("--reuse", type=reuse_arg, default=[True, False], help="on,off (default), on or off")
    ap.add_argument("--preset", default="small")
    ap.add_argument("--threads", type=int, default=1, help="the generator's torch threads (bench/serve.py)")
    ap.add_argument("--phase-timeout", type=float, default=300.0, help="seconds per phase, at most")
    args = ap.parse_args(argv)
    if not 1 <= args.turns <= 50:
        ap.error("--turns must be 1..50")
    if args.phase_timeout <= 0:
        ap.error("--phase-timeout must be > 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = shlex.join(["python", "bench/conversation.py", *(sys.argv[1:] if argv is None else argv)])
    try:  # fail before any launch when the generator lacks a setting
        for reuse in args.reuse:
            generator_args(1, args.threads, reuse)
    except ValidationError as e:
        print(f"the generator's config refuses these args:\n{e}", file=sys.stderr)
        return 2
    stop_on_sigterm()
    began, done, status = time.perf_counter(), [], 0
    try:
        run_all(args, done)
    except KeyboardInterrupt:
        print("interrupted: the phases finished so far follow", file=sys.stderr)
        status = 130
    if done:
        print(report(args, done, time.perf_counter() - began, command))
    return status or (1 if any(p.error for p in done) else 0)


if __name__ == "__main__":
    sys.exit(main())
