"""Load benchmark: N simulated people holding spoken conversations with the app for T seconds.

    python bench/load.py --people 1,2,4,8,16 --seconds 60 --ramp 10   # starts the `make demo` app itself
    python bench/load.py --people 8 --url ws://127.0.0.1:8000/v1/realtime --token SECRET    # a running app

Without `--url` it starts the app of `serve_config.yaml` the way `serve run serve_config.yaml` (`make demo`)
does, the same args and per-deployment options (tiny random presets on CPU, echo responder, pocketsphinx
ASR, 16 conversations), on a free loopback port with a temporary history folder. One app serves every N of
`--people`, one run after another (a warm-up turn first, and each run waits for the last one's
conversations to be gone). With `--asr streaming,end-of-turn` (the default) the app is launched once per
ASR mode, turns recognized while spoken, then once each has ended (`ingress.streaming_asr`), and the
report ends with their ratios, N by N, and the issue's targets for streaming.

A person connects to `/v1/realtime`, waits for `session.created`, and until T takes turns: one of a few
espeak-ng sentences streamed in 80 ms chunks at real time, as a microphone would, then ~1 s of silence so
the server's VAD ends the turn; then it waits for `response.done`, "plays" the reply at real time, pauses
briefly and speaks again. People start evenly over `--ramp` seconds. A person refused as busy (`error`
`server_busy`, close 1013) retries after a jittered backoff, so N people keep trying all along.

Columns (one row per N):
- turns: turns answered with a completed reply;
- turn ms: `input_audio_buffer.speech_stopped` received → first `response.output_audio.delta` received
  (the server's VAD decision to the first reply audio), p50/p95/p99;
- eos ms: the last speech chunk sent → first audio delta (what the person waits after they stop talking,
  the VAD's 500 ms of silence included), p50/p95;
- underrun %: replies whose audio came slower than it plays, played as the page plays them: playback
  starts once 120 ms of the reply's audio has arrived (the page's base pre-roll), or at its
  `response.output_audio.done` if it is shorter, and stalls whenever the played position would pass the
  audio received so far; stall ms: the mean total stall of those replies;
- errors: `error` events by `error.code`, then other failures by kind (`connect:`, `closed:<code>`,
  `timeout:`, `reply:<status>`, `cut:` for turns still running at the hard stop);
- busy: connections refused as busy; mem MB: total RSS of the server's processes (the Ray cluster this
  script started: every process below it; with `--url`, every process whose command line has `ray::`,
  `raylet` or `gcs_server`), start/peak/end of the run, and the least-squares growth per minute.

Under the table, per N: the run's wall time, load average and `cpu probe` before and after it (how fast a
core of this machine ran: `bench.report.cpu_probe_ms`; a slower VM moves every number here), reply
length and streaming speed, where underruns began, the turn latency split
at `conversation.item.input_audio_transcription.completed` (the server's encode flush and ASR, then
reply text, generation and decoding), each server process's CPU (cores) and RSS growth, memory over time,
and the clients' own CPU and event-loop lag: they run on the server's machine, in this process, and a
late client inflates the latencies it measures. RSS counts pages shared between processes once per
process, so the total overstates memory in use; its growth is the number to watch.

Ray's workers run at nice 0 here (`RAY_worker_niceness`: bench/launch.py), not Ray's default 15, so
that the clients do not take the server's cores; there is no dashboard. Ctrl-C (or SIGTERM) closes the
clients, shuts Ray down and prints the runs finished so far.
Exit status 1 when anything crashed unexpectedly: a simulated person raised an unexpected exception, the
server sent `internal_error` or closed a socket with 1011, or the app was not ready after a run.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.launch import (
    demo_config,
    free_port,
    http_base,
    readyz,
    settle,
    start_app,
    stop_app,
    stop_on_sigterm,
)
from bench.load_client import (
    OPEN_TIMEOUT_S,
    REPLY_TIMEOUT_S,
    SENTENCES,
    Failure,
    Plan,
    RunStats,
    Utterance,
    make_utterance,
    open_conversation,
    person,
    take_turn,
)
from bench.load_procs import snapshot
from bench.load_report import report
from bench.report import cpu_probe_ms

MAX_PEOPLE, MAX_SECONDS = 64, 600
LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})
ASR_MODES = ("streaming", "end-of-turn")
MEM_EVERY_S = 2.0


# ---- a run ---------------------------------------------------------------------------------------


async def sample_memory(stats: RunStats, own_cluster: bool, start: float) -> None:
    while True:
        stats.add_sample(time.perf_counter() - start, await asyncio.to_thread(snapshot, own_cluster))
        await asyncio.sleep(MEM_EVERY_S)


async def watch_loop_lag(stats: RunStats) -> None:
    """How late this process's event loop wakes up: a late client measures a late server."""
    while True:
        before = time.perf_counter()
        await asyncio.sleep(0.1)
        stats.loop_lag.append(time.perf_counter() - before - 0.1)


async def run_people(plan: Plan, own_cluster: bool) -> RunStats:
    stats = RunStats(plan.people)
    stats.loadavg = (Path("/proc/loadavg").read_text().split()[0], "")
    cpu0 = sum(os.times()[:2])
    watchers = [
        asyncio.create_task(sample_memory(stats, own_cluster, plan.start)),
        asyncio.create_task(watch_loop_lag(stats)),
    ]
    tasks = [asyncio.create_task(person(i, plan, stats)) for i in range(plan.people)]
    # A turn under way at T finishes (bounded by its own timeouts); past this hard stop it is cut.
    hard_stop = plan.seconds + OPEN_TIMEOUT_S + REPLY_TIMEOUT_S + 40
    done, pending = await asyncio.wait(tasks, timeout=hard_stop)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    stats.wall_s = time.perf_counter() - plan.start
    stats.cpu_s = sum(os.times()[:2]) - cpu0
    stats.add_sample(stats.wall_s, snapshot(own_cluster))
    for task in watchers:
        task.cancel()
    await asyncio.gather(*watchers, return_exceptions=True)
    stats.crashes += [f"person: {t.exception()!r}" for t in done if t.exception() is not None]
    stats.crashes += [f"watcher: {t.exception()!r}" for t in watchers if not t.cancelled() and t.exception()]
    stats.loadavg = (stats.loadavg[0], Path("/proc/loadavg").read_text().split()[0])
    return stats


async def warm_up(url: str, utterance: Utterance) -> float:
    """One turn, not measured: the first call of each deployment loads things lazily."""
    began = time.perf_counter()
    stats = RunStats(1)
    conversation = await open_conversation(url, stats)
    try:
        await take_turn(conversation, utterance, stats)
    finally:
        await conversation.close()
    return time.perf_counter() - began


async def run_all(args: argparse.Namespace, url: str, own_cluster: bool, results: list[RunStats]) -> None:
    """Warm up, then one run per N; each finished run goes into `results` (kept if interrupted)."""
    folder = Path(tempfile.mkdtemp(prefix="load_speech_"))
    try:
        utterances = tuple(make_utterance(text, folder) for text in SENTENCES)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    connect_url = f"{url}?token={quote(args.token)}" if args.token else url
    base = http_base(url)
    print(f"warm-up turn: {await warm_up(connect_url, utterances[0]):.1f} s", flush=True)
    for n in args.people:
        await settle(base)
        probe = cpu_probe_ms()  # read outside the run: the plan's clock starts after it
        plan = Plan(connect_url, n, args.seconds, args.ramp, utterances, time.perf_counter())
        stats = await run_people(plan, own_cluster)
        stats.cpu_probe_ms = (probe, cpu_probe_ms())
        if await readyz(base) is None:
            stats.crashes.append("the app was not ready after the run (/readyz)")
        print(f"{n} people: done in {stats.wall_s:.0f} s", flush=True)
        results.append(stats)


# ---- the command line ----------------------------------------------------------------------------


def people_counts(text: str) -> list[int]:
    try:
        counts = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: a comma-separated list of counts, e.g. 1,8,32") from None
    if not all(1 <= n <= MAX_PEOPLE for n in counts):
        raise argparse.ArgumentTypeError(f"each count must be 1..{MAX_PEOPLE} (loopback load, bounded)")
    return counts


def asr_modes(text: str) -> list[str]:
    modes = text.split(",")
    if not modes or any(m not in ASR_MODES for m in modes) or len(set(modes)) != len(modes):
        raise argparse.ArgumentTypeError(f"{text!r}: streaming, end-of-turn, or both comma-separated")
    return modes


def loopback_url(text: str) -> str:
    parts = urlsplit(text)
    if parts.scheme not in ("ws", "wss") or parts.hostname not in LOOPBACK:
        raise argparse.ArgumentTypeError(f"{text!r}: only ws:// or wss:// on {', '.join(sorted(LOOPBACK))}")
    path = parts.path if parts.path not in ("", "/") else "/v1/realtime"
    return urlunsplit((parts.scheme, parts.netloc, path, "", ""))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--people", type=people_counts, default=[1, 8], help="N, or N1,N2,... run one after another"
    )
    ap.add_argument("--seconds", type=float, default=60.0, help=f"T: each run's length (≤ {MAX_SECONDS})")
    ap.add_argument("--ramp", type=float, default=10.0, help="people start evenly over this many seconds")
    ap.add_argument("--url", type=loopback_url, help="a running app's ws://…/v1/realtime (loopback only)")
    ap.add_argument("--token", help="sent as ?token=; also the token of the app this script starts")
    ap.add_argument("--max-conversations", type=int, help="admission limit of the app this script starts")
    ap.add_argument("--recognizers", type=int, help="SpeechRecognizer replicas of the app this script starts")
    ap.add_argument(
        "--asr",
        type=asr_modes,
        help="the app this script starts, one launch per mode: recognize turns while spoken (streaming), "
        "or once each has ended (end-of-turn); default both, with their ratios",
    )
    args = ap.parse_args(argv)
    if not 0 < args.seconds <= MAX_SECONDS:
        ap.error(f"--seconds must be in (0, {MAX_SECONDS}]")
    if not 0 <= args.ramp <= args.seconds:
        ap.error("--ramp must be in [0, --seconds]")
    if args.url and args.asr is not None:
        ap.error("--asr applies only to the app this script starts (no --url): a running app has its own")
    args.asr = ["the app's"] if args.url else args.asr or list(ASR_MODES)
    if args.url and args.max_conversations is not None:
        ap.error("--max-conversations applies only to the app this script starts (no --url)")
    if args.url and args.recognizers is not None:
        ap.error("--recognizers applies only to the app this script starts (no --url)")
    if args.recognizers is not None and args.recognizers < 1:
        ap.error("--recognizers must be ≥ 1")
    if args.max_conversations is not None and args.max_conversations < 1:
        ap.error("--max-conversations must be ≥ 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stop_on_sigterm()
    history = tempfile.mkdtemp(prefix="load_history_")
    runs: list[tuple[str, list[RunStats]]] = []
    url = args.url or ""
    status = 0
    try:
        for mode in args.asr:
            runs.append((mode, []))
            try:
                url = args.url or start_app(
                    demo_config(
                        free_port(), history, args.token, args.max_conversations, mode, args.recognizers
                    )
                )
                asyncio.run(run_all(args, url, args.url is None, runs[-1][1]))
            finally:
                if args.url is None:
                    stop_app()
    except Failure as e:  # the warm-up turn: nothing to measure if one person cannot talk
        print(f"the warm-up turn failed: {e.kind}", file=sys.stderr)
        status = 1
    except KeyboardInterrupt:
        print("interrupted: the runs finished so far follow", file=sys.stderr)
        status = 130
    finally:
        shutil.rmtree(history, ignore_errors=True)
    if any(results for _, results in runs):
        print(report(args, url, runs))
    return status or (1 if any(s.crashes for _, results in runs for s in results) else 0)


if __name__ == "__main__":
    sys.exit(main())
