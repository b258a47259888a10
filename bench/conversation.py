"""Conversation benchmark: first audio and prompt rows prefilled, turn by turn, over long typed
conversations through the whole app, with the generator's prefix reuse on and off in one run.

    python bench/conversation.py                                  # 1,4,8 conversations × 10 turns × on/off
    python bench/conversation.py --conversations 1 --turns 3 --preset tiny --reuse on     # a smoke run

The app is `serve_config.yaml` deployed as `serve run` deploys it (bench/load.py's launcher: per-deployment
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
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from websockets.exceptions import WebSocketException

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.load import demo_config, free_port, http_base, machine_line, settle, start_app, stop_app
from tests.realtime_client import Client

SEED = 7
REPLY_SECONDS = 1.5  # x-sampling.max_reply_seconds: short replies keep the run bounded
TEXT_CHARS = 60
FILLER = "please tell me more about the quiet river walk near the old mill today".split()
OPEN_TIMEOUT_S = 30.0
TURN_TIMEOUT_S = 120.0  # response.create → response.done
LAUNCH_BOUND_S = 600 + 60  # load.start_app waits ≤600 s for the app; settling ≤60 s
FIRST, LAST = 2, 3  # the first-audio target compares the last 3 turns' mean with the first 2 turns'
LATENCY_RATIO, ROWS_RATIO = 1.2, 3.0
ROWS_FROM_TURN = 3


# ---- one conversation ----------------------------------------------------------------------------


class TurnFailed(Exception):
    """A turn ended without a completed reply (an `error` event, a timeout, another status)."""


@dataclass(frozen=True)
class Reply:
    first_audio: float  # s
    prompt: dict[str, int] | None  # response.done's x-prompt: rows, reused_rows, prefilled_rows


def turn_text(phase: int, conversation: int, turn: int) -> str:
    """About TEXT_CHARS characters, unique to the phase, one sentence (one generator call per reply)."""
    words = f"phase {phase} chat {conversation} turn {turn}".split()
    for word in FILLER:
        if len(" ".join([*words, word])) > TEXT_CHARS:
            break
        words.append(word)
    return " ".join(words)


async def open_conversation(url: str) -> Client:
    """Connect, then VAD off (typed turns only), a fixed seed and short replies."""
    client, _ = await asyncio.wait_for(Client.open(url), OPEN_TIMEOUT_S)
    sampling = {"seed": SEED, "max_reply_seconds": REPLY_SECONDS}
    await client.send(
        "session.update", session={"audio": {"input": {"turn_detection": None}}, "x-sampling": sampling}
    )
    events = await client.until("session.updated", OPEN_TIMEOUT_S)
    errors = [e["error"] for e in events if e["type"] == "error"]
    if errors:
        raise TurnFailed(f"session.update: {errors}")
    return client


async def take_turn(client: Client, text: str) -> Reply:
    item = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}
    await client.send("conversation.item.create", item=item)
    sent = time.perf_counter()
    await client.send("response.create")
    first: float | None = None
    deadline = sent + TURN_TIMEOUT_S
    while True:
        try:
            event = await client.recv(max(deadline - time.perf_counter(), 0.01))
        except TimeoutError:
            raise TurnFailed(f"no response.done within {TURN_TIMEOUT_S:.0f} s") from None
        kind = event["type"]
        if kind == "response.output_audio.delta" and first is None:
            first = time.perf_counter() - sent
        elif kind == "error":
            raise TurnFailed(f"error {event['error']['code']}: {event['error']['message']}")
        elif kind == "response.done":
            break
    client.events.clear()  # the audio deltas: nothing to keep
    response = event["response"]
    if response["status"] != "completed" or first is None:
        raise TurnFailed(f"reply {response['status']} ({response.get('status_details')}), audio: {first}")
    return Reply(first, response.get("x-prompt"))


# ---- the generator's counters --------------------------------------------------------------------


def generator_counters(app: str) -> Callable[[], Any]:
    """An async reader of the CSMGenerator's (prefilled_rows, reused_rows) totals, None if it has none."""
    from ray import serve

    handle = serve.get_deployment_handle("CSMGenerator", app)

    async def read() -> tuple[int, int] | None:
        info = await handle.info.remote()
        if "prefilled_rows" not in info:
            return None
        return int(info["prefilled_rows"]), int(info.get("reused_rows", 0))

    return read


# ---- a phase: N conversations × T turns ----------------------------------------------------------


@dataclass
class Phase:
    conversations: int
    reuse: bool
    first_audio: list[list[float]] = field(default_factory=list)  # per turn: one per conversation, s
    prefilled: list[float | None] = field(default_factory=list)  # per turn: mean rows per reply
    reused: list[float | None] = field(default_factory=list)
    rows: list[float | None] = field(default_factory=list)  # prompt rows per reply (x-prompt only)
    sources: set[str] = field(default_factory=set)
    elapsed: float = 0.0
    error: str | None = None

    @property
    def key(self) -> str:
        return f"{self.conversations} {'on' if self.reuse else 'off'}"

    def add_round(self, replies: Sequence[Reply], before: tuple | None, after: tuple | None) -> None:
        self.first_audio.append([r.first_audio for r in replies])
        prompts = [r.prompt for r in replies]
        n = len(replies)
        if all(p is not None for p in prompts):
            self.sources.add("x-prompt")
            self.prefilled.append(statistics.mean(p["prefilled_rows"] for p in prompts))
            self.reused.append(statistics.mean(p["reused_rows"] for p in prompts))
            self.rows.append(statistics.mean(p["rows"] for p in prompts))
        elif before is not None and after is not None:
            self.sources.add("generator info")
            self.prefilled.append((after[0] - before[0]) / n)
            self.reused.append((after[1] - before[1]) / n)
            self.rows.append(None)
        else:
            self.prefilled.append(None)
            self.reused.append(None)
            self.rows.append(None)

    def mean_first_audio(self, turns: slice) -> float | None:
        values = [x for turn in self.first_audio[turns] for x in turn]
        return statistics.mean(values) if values else None


async def converse(phase: Phase, url: str, counters: Callable[[], Any], index: int, turns: int) -> None:
    clients = await asyncio.gather(*(open_conversation(url) for _ in range(phase.conversations)))
    try:
        for t in range(turns):
            before = await counters()
            replies = await asyncio.gather(
                *(take_turn(c, turn_text(index, i, t + 1)) for i, c in enumerate(clients))
            )
            phase.add_round(replies, before, await counters())
    finally:
        await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)


async def run_phase(
    phase: Phase, url: str, counters: Callable[[], Any], index: int, turns: int, timeout: float
) -> Phase:
    """Run one phase under its timeout; a failure or the timeout ends it with the turns it finished."""
    began = time.perf_counter()
    try:
        await asyncio.wait_for(converse(phase, url, counters, index, turns), timeout)
    except TimeoutError:
        phase.error = f"timed out after {timeout:.0f} s"
    except (TurnFailed, OSError, AssertionError, WebSocketException) as e:
        phase.error = f"{type(e).__name__}: {e}"
    phase.elapsed = time.perf_counter() - began
    await settle(http_base(url))
    return phase


async def warm_up(url: str) -> float:
    """One unmeasured turn (each deployment's first call loads things lazily); returns its seconds."""
    began = time.perf_counter()
    client = await open_conversation(url)
    try:
        await take_turn(client, turn_text(0, 0, 0))
    finally:
        await client.close()
    await settle(http_base(url))
    return time.perf_counter() - began


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
    """serve_config.yaml (bench/load.py's copy: our port and history folder) with our preset and generator."""
    slots = max(16, *args.conversations)  # serve_config.yaml's 16, or more
    config = demo_config(free_port(), history, None, slots)
    (app,) = config["applications"]
    app["args"]["preset"] = args.preset
    app["args"]["generator"] = {
        **app["args"].get("generator", {}),
        **generator_args(slots, args.threads, reuse),
    }
    return config


def launch(args: argparse.Namespace, reuse: bool, history: str) -> tuple[str, str]:
    """Start Ray and the app; returns (ws URL, application name)."""
    config = app_config(args, reuse, history)
    os.environ["CSM_TORCH_THREADS"] = "1"  # codec, ASR, ingress; the generator gets --threads
    return start_app(config), config["applications"][0]["name"]


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
            signal.signal(signal.SIGTERM, _stop_on_sigterm)  # again: ray.init installs its own
            print(f"app up (reuse {'on' if group[0][2] else 'off'}) in {time.perf_counter() - began:.0f} s")
            asyncio.run(run_launch(args, url, app, group, done, estimate))
        finally:
            stop_app()
            shutil.rmtree(history, ignore_errors=True)


# ---- the report ----------------------------------------------------------------------------------


def markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A markdown table padded to fixed width (it reads the same raw and rendered), numbers right-aligned."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.rjust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    return "\n".join(
        [line(header), "|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|"] + [line(r) for r in rows]
    )


def ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.0f}"


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


def _stop_on_sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = shlex.join(["python", "bench/conversation.py", *(sys.argv[1:] if argv is None else argv)])
    try:  # fail before any launch when the generator lacks a setting
        for reuse in args.reuse:
            generator_args(1, args.threads, reuse)
    except ValidationError as e:
        print(f"the generator's config refuses these args:\n{e}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
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
