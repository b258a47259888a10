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

Under the table, per N: reply length and streaming speed, where underruns began, the turn latency split
at `conversation.item.input_audio_transcription.completed` (the server's encode flush and ASR, then
reply text, generation and decoding), each server process's CPU (cores) and RSS growth, memory over time,
and the clients' own CPU and event-loop lag: they run on the server's machine, in this process, and a
late client inflates the latencies it measures. RSS counts pages shared between processes once per
process, so the total overstates memory in use; its growth is the number to watch.

Ray's workers run at nice 0 here (`RAY_worker_niceness`, as in bench/serve.py), not Ray's default 15, so
that the clients do not take the server's cores; there is no dashboard. Ctrl-C (or SIGTERM) closes the
clients, shuts Ray down and prints the runs finished so far.
Exit status 1 when anything crashed unexpectedly: a simulated person raised an unexpected exception, the
server sent `internal_error` or closed a socket with 1011, or the app was not ready after a run.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import random
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import quote, urlsplit, urlunsplit

import httpx
import numpy as np
import websockets
import yaml
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.realtime_client import CHUNK, speech

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_RATE = 24_000
CHUNK_S = CHUNK / SAMPLE_RATE  # 80 ms, what a browser's audio worklet sends at a time
PREROLL_S = 0.12  # the page's base pre-roll (frontend/src/lib/jitterBuffer.ts, `prerollMs`)
MAX_PEOPLE, MAX_SECONDS = 64, 600
LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})
SENTENCES = (  # no commas: a pause inside a sentence must not end the turn early
    "Could you tell me what the weather will be like tomorrow morning",
    "I would like to book a table for two people at eight tonight",
    "How long does it take to walk from here to the train station",
    "Please remind me to call my sister after lunch on Friday",
)
LEAD_S, TAIL_S = 0.3, 1.0  # silence before the sentence, and after it (the VAD waits 500 ms of it)
PAUSE_S = 0.5  # between the end of a reply's playback and the next turn (plus up to 0.5 s of jitter)
OPEN_TIMEOUT_S = 30.0  # connect, then `session.created` and `x-server.info`
REPLY_TIMEOUT_S = 90.0  # the end of the person's audio → `response.done`
RETRY_S = 2.0  # backoff after a refusal or failure, ±50%: a page would retry after a few seconds
MEM_EVERY_S = 2.0
SETTLE_TIMEOUT_S = 60.0  # waiting for the previous run's conversations to end on the server


# ---- the people's speech -------------------------------------------------------------------------


@dataclass(frozen=True)
class Utterance:
    """One turn's audio as ready-to-send `input_audio_buffer.append` messages, one per 80 ms chunk."""

    text: str
    messages: tuple[str, ...]
    speech_end_chunk: int  # the chunk holding the last sample of speech (then silence follows)


def make_utterance(text: str, folder: Path) -> Utterance:
    pcm = speech(text, folder, lead_s=LEAD_S, tail_s=TAIL_S)
    loud = np.flatnonzero(np.abs(pcm.astype(np.int32)) > 0.02 * np.abs(pcm).max())
    messages = tuple(
        json.dumps(
            {"type": "input_audio_buffer.append", "audio": base64.b64encode(pcm[i : i + CHUNK]).decode()}
        )
        for i in range(0, pcm.size, CHUNK)
    )
    return Utterance(text, messages, int(loud[-1]) // CHUNK)


# ---- one run's measurements ----------------------------------------------------------------------


@dataclass
class RunStats:
    people: int
    turns: int = 0
    replies: int = 0
    turn_latency: list[float] = field(default_factory=list)
    eos_latency: list[float] = field(default_factory=list)
    transcript_latency: list[float] = field(default_factory=list)  # speech_stopped → transcript
    reply_latency: list[float] = field(default_factory=list)  # transcript → first audio delta
    stalls: list[float] = field(default_factory=list)  # total stall of each reply that underran
    stall_starts: list[float] = field(default_factory=list)  # where in its audio each one first ran dry
    reply_audio: list[tuple[float, float]] = field(default_factory=list)  # (audio s, first → last delta s)
    errors: Counter[str] = field(default_factory=Counter)  # `error` events by code
    failures: Counter[str] = field(default_factory=Counter)  # everything else, by kind
    refused: int = 0
    crashes: list[str] = field(default_factory=list)
    memory: list[tuple[float, float]] = field(default_factory=list)  # (s into the run, total RSS MB)
    loop_lag: list[float] = field(default_factory=list)
    # The first and the latest process sample: (s into the run, pid → sample).
    first: tuple[float, dict[int, Sample]] = field(default_factory=lambda: (0.0, {}))
    last: tuple[float, dict[int, Sample]] = field(default_factory=lambda: (0.0, {}))
    cpu_s: float = 0.0
    wall_s: float = 0.0
    loadavg: tuple[str, str] = ("", "")

    def add_sample(self, at: float, processes: dict[int, Sample]) -> None:
        self.memory.append((at, sum(p.mb for p in processes.values())))
        self.first = self.first if self.first[1] else (at, processes)
        self.last = (at, processes)

    def changes(self) -> list[tuple[str, float, float]]:
        """(name, RSS growth MB, share of a core) of each server process that lived through the run."""
        (t0, first), (t1, last) = self.first, self.last
        return [
            (p.name, p.mb - first[pid].mb, (p.cpu_s - first[pid].cpu_s) / max(t1 - t0, 1e-9))
            for pid, p in last.items()
            if pid in first
        ]


class Failure(Exception):
    """An expected way for a connection or turn to fail; `kind` is how it is counted."""

    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        self.kind = kind


class Refused(Failure):
    def __init__(self) -> None:
        super().__init__("server_busy")


class Stall(NamedTuple):
    at_s: float  # how far into the reply's audio the player ran dry
    seconds: float


@dataclass
class Turn:
    speech_end_sent: float | None = None
    speech_stopped_at: float | None = None
    transcribed_at: float | None = None  # the server has the turn's transcript: the reply can start
    arrivals: list[tuple[float, int]] = field(default_factory=list)  # (receipt time, samples) per delta
    audio_done_at: float | None = None  # `response.output_audio.done`: no more audio will come
    status: str | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)


def playback(
    arrivals: list[tuple[float, int]], complete_at: float | None = None, preroll: float = PREROLL_S
) -> tuple[float, list[Stall]]:
    """When a player that buffers `preroll` of audio before it starts finishes, and where it stalled.

    The page's jitter buffer: playback starts at the delta that brings the reply's audio to `preroll`, or
    when the reply is complete (`complete_at`, else its last delta) if it never does. `runs_dry` is when
    the audio received so far would have been played out; a delta arriving after it is a stall of the
    difference (playback resumes at once when it arrives: the stall is what the person hears).
    """
    need, total = round(preroll * SAMPLE_RATE), 0
    starts = next((at for at, n in arrivals if (total := total + n) >= need), None)
    if starts is None:
        starts = max(complete_at or arrivals[-1][0], arrivals[-1][0])
    runs_dry, played, stalls = starts, 0, []
    for at, samples in arrivals:
        if at > runs_dry:
            stalls.append(Stall(played / SAMPLE_RATE, at - runs_dry))
            runs_dry = at
        runs_dry += samples / SAMPLE_RATE
        played += samples
    return runs_dry, stalls


def delta_samples(b64: str) -> int:
    """Samples in a base64 PCM16 delta, without decoding it."""
    return (len(b64) * 3 // 4 - len(b64) + len(b64.rstrip("="))) // 2


# ---- a connection --------------------------------------------------------------------------------


class Conversation:
    """One open socket: a reader task files each event into the current turn as it arrives."""

    def __init__(self, ws: websockets.ClientConnection, stats: RunStats) -> None:
        self.ws = ws
        self.stats = stats
        self.turn: Turn | None = None
        self.ended: str | None = None  # why the server ended it, as a failure kind
        self._closing = False
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            async for raw in self.ws:
                self._on_event(json.loads(raw), time.perf_counter())
        except ConnectionClosed:
            pass
        finally:
            if not self._closing:
                code = self.ws.close_code
                self.ended = f"closed:{code}"
                if code == 1011:
                    self.stats.crashes.append("the server closed a socket with 1011 (internal error)")
            if self.turn is not None:
                self.turn.done.set()

    def _on_event(self, event: dict[str, Any], at: float) -> None:
        kind, turn = event.get("type"), self.turn
        if kind == "error":
            code = event["error"]["code"]
            self.stats.errors[code] += 1
            if code == "internal_error":
                self.stats.crashes.append(f"internal_error: {event['error']['message']}")
        elif turn is None:
            return
        elif kind == "input_audio_buffer.speech_stopped":
            turn.speech_stopped_at = at  # the last one: the turn its reply answers
        elif kind == "conversation.item.input_audio_transcription.completed":
            turn.transcribed_at = at
        elif kind == "response.output_audio.delta":
            turn.arrivals.append((at, delta_samples(event["delta"])))
        elif kind == "response.output_audio.done":
            turn.audio_done_at = at
        elif kind == "response.done":
            self._on_done(turn, event["response"]["status"])

    def _on_done(self, turn: Turn, status: str) -> None:
        if status == "cancelled":
            # The VAD heard two turns in one sentence and the second barged in: wait for its reply.
            self.stats.failures["reply:cancelled"] += 1
            turn.arrivals.clear()
            turn.audio_done_at = None
            return
        turn.status = status
        turn.done.set()

    async def send(self, message: str) -> None:
        try:
            await self.ws.send(message)
        except ConnectionClosed:
            raise Failure(self.ended or f"closed:{self.ws.close_code}") from None

    async def close(self) -> None:
        self._closing = True
        try:
            await asyncio.wait_for(self.ws.close(), 10)
        except (TimeoutError, OSError):
            pass
        self._reader.cancel()
        await asyncio.gather(self._reader, return_exceptions=True)


async def _recv(ws: websockets.ClientConnection) -> dict[str, Any]:
    return json.loads(await asyncio.wait_for(ws.recv(), OPEN_TIMEOUT_S))


async def _connect(url: str) -> websockets.ClientConnection:
    try:
        # No client pings (a browser sends none), no proxy (loopback only); deflate on, as in a browser.
        return await websockets.connect(
            url, open_timeout=OPEN_TIMEOUT_S, close_timeout=5, ping_interval=None, proxy=None, max_size=2**22
        )
    except InvalidStatus as e:
        raise Failure(f"connect:http_{e.response.status_code}") from None
    except (OSError, TimeoutError, InvalidHandshake) as e:
        raise Failure(f"connect:{type(e).__name__}") from None


async def open_conversation(url: str, stats: RunStats) -> Conversation:
    """Connect and wait for `session.created` and `x-server.info`; raise `Refused` or `Failure`."""
    ws = await _connect(url)
    try:
        first = await _recv(ws)
        if first["type"] == "error" and first["error"]["code"] == "server_busy":
            raise Refused
        if first["type"] != "session.created":
            raise Failure(f"open:{first['type']}")
        if (await _recv(ws))["type"] != "x-server.info":
            raise Failure("open:no x-server.info")
    except ConnectionClosed:
        await ws.close()
        if ws.close_code == 1013:
            raise Refused from None
        raise Failure(f"closed:{ws.close_code}") from None
    except TimeoutError:
        await ws.close()
        raise Failure("timeout:session.created") from None
    except Failure:
        await ws.close()
        raise
    return Conversation(ws, stats)


# ---- a person ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    url: str
    people: int
    seconds: float
    ramp: float
    utterances: tuple[Utterance, ...]
    start: float  # perf_counter at the start of the run

    def start_delay(self, person: int) -> float:
        return person * self.ramp / self.people

    def over(self) -> bool:
        return time.perf_counter() >= self.start + self.seconds


async def sleep_until(at: float) -> None:
    await asyncio.sleep(max(at - time.perf_counter(), 0.0))


async def stream(conversation: Conversation, utterance: Utterance, turn: Turn) -> None:
    """Send the utterance at real time: chunk k leaves k × 80 ms after the first (late ones catch up)."""
    began = time.perf_counter()
    for k, message in enumerate(utterance.messages):
        await sleep_until(began + k * CHUNK_S)
        await conversation.send(message)
        if k == utterance.speech_end_chunk:
            turn.speech_end_sent = time.perf_counter()


def record(turn: Turn, stats: RunStats) -> float:
    """File a finished turn's numbers; returns when its reply has been played out."""
    if turn.status == "completed":
        stats.turns += 1
    else:
        stats.failures[f"reply:{turn.status}"] += 1
    if not turn.arrivals:
        return time.perf_counter()
    first = turn.arrivals[0][0]
    stats.replies += 1
    if turn.speech_stopped_at is not None:
        stats.turn_latency.append(first - turn.speech_stopped_at)
        if turn.transcribed_at is not None:  # split the turn latency at the transcript
            stats.transcript_latency.append(turn.transcribed_at - turn.speech_stopped_at)
            stats.reply_latency.append(first - turn.transcribed_at)
    if turn.speech_end_sent is not None:
        stats.eos_latency.append(first - turn.speech_end_sent)
    audio_s = sum(n for _, n in turn.arrivals) / SAMPLE_RATE
    stats.reply_audio.append((audio_s, turn.arrivals[-1][0] - first))
    ends, stalls = playback(turn.arrivals, turn.audio_done_at)
    if stalls:
        stats.stalls.append(sum(st.seconds for st in stalls))
        stats.stall_starts.append(stalls[0].at_s)
    return ends


async def take_turn(conversation: Conversation, utterance: Utterance, stats: RunStats) -> None:
    turn = conversation.turn = Turn()
    await stream(conversation, utterance, turn)
    try:
        await asyncio.wait_for(turn.done.wait(), REPLY_TIMEOUT_S)
    except TimeoutError:
        raise Failure(
            "timeout:no speech_stopped" if turn.speech_stopped_at is None else "timeout:reply"
        ) from None
    if turn.status is None:  # the socket closed before the reply was done
        raise Failure(conversation.ended or "closed:unknown")
    await sleep_until(record(turn, stats))  # the person listens to the whole reply
    conversation.turn = None


async def converse(
    conversation: Conversation, plan: Plan, stats: RunStats, rng: random.Random, n: int
) -> int:
    """Take turns until the run is over; returns the next sentence's index."""
    while not plan.over():
        await take_turn(conversation, plan.utterances[n % len(plan.utterances)], stats)
        n += 1
        await asyncio.sleep(PAUSE_S + rng.random() * 0.5)
    return n


async def hold_conversation(plan: Plan, stats: RunStats, rng: random.Random, n: int) -> int:
    """One connection, from connect to close; returns the next sentence's index."""
    conversation = await open_conversation(plan.url, stats)
    try:
        return await converse(conversation, plan, stats, rng, n)
    except asyncio.CancelledError:
        if conversation.turn is not None:
            stats.failures["cut:turn at the hard stop"] += 1
        raise
    finally:
        await conversation.close()


async def person(index: int, plan: Plan, stats: RunStats) -> None:
    """Talk until the run is over; after a refusal or a failure, back off and connect again."""
    rng = random.Random(index)
    n = index  # people start on different sentences
    await asyncio.sleep(plan.start_delay(index))
    while not plan.over():
        try:
            n = await hold_conversation(plan, stats, rng, n)
            continue
        except Refused:
            stats.refused += 1
        except Failure as e:
            stats.failures[e.kind] += 1
        await asyncio.sleep(RETRY_S * (0.5 + rng.random()))


# ---- the server's memory -------------------------------------------------------------------------


TICK_S = 1 / os.sysconf("SC_CLK_TCK")


class Proc(NamedTuple):
    pid: int
    ppid: int
    cmdline: str
    cpu_s: float  # user + system time so far


def _processes() -> Iterator[Proc]:
    """Every process we may read."""
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
            cmdline = Path(entry.path, "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # it exited meanwhile
            continue
        # The command name in field 2 may hold spaces and parentheses: the fields after its last ')'.
        fields = stat[stat.rindex(")") + 2 :].split()
        yield Proc(int(entry.name), int(fields[1]), cmdline, (int(fields[11]) + int(fields[12])) * TICK_S)


def server_processes(own_cluster: bool) -> list[Proc]:
    """The app's processes: everything below this process when it started the cluster (raylet, GCS and
    the workers Ray forks), else every Ray process by name (on a machine running other Ray apps, theirs
    too)."""
    procs = list(_processes())
    if not own_cluster:
        names = ("ray::", "raylet", "gcs_server")
        return [p for p in procs if any(n in p.cmdline for n in names)]
    children: dict[int, list[Proc]] = {}
    for p in procs:
        children.setdefault(p.ppid, []).append(p)
    found, todo = [], list(children.get(os.getpid(), []))
    while todo:
        p = todo.pop()
        found.append(p)
        todo.extend(children.get(p.pid, []))
    return found


def rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:  # it exited meanwhile
        pass
    return 0.0


def process_name(cmdline: str) -> str:
    """`ray::ServeReplica:csm:CSMGenerator.method` → `CSMGenerator`; a program → its file name."""
    words = cmdline.split() or ["?"]
    if words[0].startswith("ray::"):
        return words[0].removeprefix("ray::").split(".")[0].split(":")[-1]
    program = next((w for w in words if w.endswith(".py")), words[0])
    return Path(program).name


class Sample(NamedTuple):
    name: str
    mb: float
    cpu_s: float


def snapshot(own_cluster: bool) -> dict[int, Sample]:
    """pid → (name, RSS MB, CPU seconds so far) of the server's processes."""
    return {
        p.pid: Sample(process_name(p.cmdline), rss_mb(p.pid), p.cpu_s) for p in server_processes(own_cluster)
    }


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


# ---- a run ---------------------------------------------------------------------------------------


def http_base(ws_url: str) -> str:
    parts = urlsplit(ws_url)
    return urlunsplit(("https" if parts.scheme == "wss" else "http", parts.netloc, "", "", ""))


async def readyz(base: str) -> dict[str, Any] | None:
    try:
        async with httpx.AsyncClient(timeout=15) as client:
            r = await client.get(f"{base}/readyz")
        return r.json() if r.status_code == 200 else None
    except (httpx.HTTPError, ValueError):
        return None


async def settle(base: str) -> None:
    """Wait (bounded) until the server holds no conversation, so each run starts from an idle server."""
    deadline = time.perf_counter() + SETTLE_TIMEOUT_S
    while time.perf_counter() < deadline:
        ready = await readyz(base)
        if ready is not None and ready.get("conversations", 0) == 0:
            return
        await asyncio.sleep(1)


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
        plan = Plan(connect_url, n, args.seconds, args.ramp, utterances, time.perf_counter())
        stats = await run_people(plan, own_cluster)
        if await readyz(base) is None:
            stats.crashes.append("the app was not ready after the run (/readyz)")
        print(f"{n} people: done in {stats.wall_s:.0f} s", flush=True)
        results.append(stats)


# ---- the report ----------------------------------------------------------------------------------


def quantile(values: list[float], q: float) -> float | None:
    """The q-th percentile of `values` (seconds), None when there are none."""
    return float(np.percentile(values, q)) if values else None


def ms_of(x: float | None) -> str:
    return "-" if x is None else f"{x * 1000:.0f}"


def pct(values: list[float], q: float) -> str:
    return ms_of(quantile(values, q))


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
        " / ".join(pct(s.turn_latency, q) for q in (50, 95, 99)),
        " / ".join(pct(s.eos_latency, q) for q in (50, 95)),
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
    """A markdown table padded to fixed width, so it reads the same raw and rendered. Numbers are
    right-aligned; the last column (the errors, text) is left-aligned."""
    widths = [max(len(r[i]) for r in [HEADER, *rows]) for i in range(len(HEADER))]
    text = len(HEADER) - 1

    def line(cells: list[str]) -> str:
        padded = [
            c.ljust(w) if i == text else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return "| " + " | ".join(padded) + " |"

    rule = ["-" * (w + 1) + ":" if i != text else ":" + "-" * (w + 1) for i, w in enumerate(widths)]
    return "\n".join([line(HEADER), "|" + "|".join(rule) + "|", *(line(r) for r in rows)])


def machine_line() -> str:
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
        f"# machine: {model}, {os.cpu_count()} cores; torch threads per replica {threads} (CSM_TORCH_THREADS)"
    )


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
    lag = f"p99 {pct(s.loop_lag, 99)} ms, max {pct(s.loop_lag, 100)} ms"
    return "\n    ".join(
        [
            f"{s.people:>3} people: {s.wall_s:.0f} s; loadavg {s.loadavg[0]} → {s.loadavg[1]}",
            f"replies: {audio / max(len(s.reply_audio), 1):.1f} s of audio on average, streamed at {speed} "
            f"(first → last delta); {early} of {len(s.stall_starts)} underruns began in the first 0.5 s",
            f"turn ms split: speech_stopped → transcript p50/p95 {pct(s.transcript_latency, 50)} / "
            f"{pct(s.transcript_latency, 95)}, transcript → first audio {pct(s.reply_latency, 50)} / "
            f"{pct(s.reply_latency, 95)}",
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
    if all(modes.get(m) for m in ASR_MODES):
        lines += ["", *compare(modes["streaming"], modes["end-of-turn"])]
    if modes.get("streaming"):
        lines += ["", *targets(modes["streaming"])]
    clusters = sum("gcs_server" in p.cmdline for p in _processes())
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
            f"| {s.people} | {ms_of(st)} / {ms_of(et)} | {ratio(et, st)} | {ms_of(sl)} / {ms_of(el)} "
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


# ---- the app -------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def demo_config(
    port: int,
    history: str,
    token: str | None,
    max_conversations: int | None,
    asr: str = "streaming",
    recognizers: int | None = None,
) -> dict:
    """serve_config.yaml with our port, history folder, token, admission limit, ASR mode and
    SpeechRecognizer replica count (None: the file's)."""
    config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    config["http_options"] = {"host": "127.0.0.1", "port": port}
    (app,) = config["applications"]
    ingress = app["args"].setdefault("ingress", {})
    ingress["history_dir"] = history
    if token:
        ingress["token"] = token
    else:
        ingress["allow_anonymous"] = True  # loopback only: as `make demo`, which sets CSM_ALLOW_ANONYMOUS
    if max_conversations is not None:
        ingress["max_conversations"] = max_conversations
    ingress["streaming_asr"] = asr == "streaming"
    if recognizers is not None:
        (options,) = [d for d in app["deployments"] if d["name"] == "SpeechRecognizer"]
        options["num_replicas"] = recognizers
    return config


def start_app(config: dict) -> str:
    """Start Ray and deploy `config` as `serve run <config file>` does, deployments' options included."""
    import ray
    from ray import serve
    from ray.serve._private import api
    from ray.serve._private.constants import SERVE_NAMESPACE
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(config)
    # Ray starts its workers at nice 15; the clients here run at nice 0 on the same cores and would
    # starve the server. Same priority for both (a real server has no load generator on its cores).
    os.environ.setdefault("RAY_worker_niceness", "0")
    ray.init(namespace=SERVE_NAMESPACE, include_dashboard=False, log_to_driver=False, configure_logging=False)
    # `serve.run` takes an Application and would drop the YAML's per-deployment options (ongoing-request
    # limits, batch sizes): deploy the config itself, with the calls `serve run` makes (ray/serve/scripts.py).
    client = api.serve_start(
        http_options=schema.http_options.model_dump(), proxy_location=schema.proxy_location
    )
    client.deploy_apps(schema)
    name = schema.applications[0].name
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        status = serve.status().applications.get(name)
        if status is not None and status.status == "RUNNING":
            return f"ws://127.0.0.1:{config['http_options']['port']}/v1/realtime"
        if status is not None and status.status == "DEPLOY_FAILED":
            raise RuntimeError(f"the app failed to deploy: {status.message}")
        time.sleep(1)
    raise TimeoutError("the app was not running after 600 s")


def stop_app() -> None:
    import ray
    from ray import serve

    try:
        if ray.is_initialized():
            serve.shutdown()
    finally:
        ray.shutdown()


# ---- the command line ----------------------------------------------------------------------------


def people_counts(text: str) -> list[int]:
    try:
        counts = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: a comma-separated list of counts, e.g. 1,8,32") from None
    if not all(1 <= n <= MAX_PEOPLE for n in counts):
        raise argparse.ArgumentTypeError(f"each count must be 1..{MAX_PEOPLE} (loopback load, bounded)")
    return counts


ASR_MODES = ("streaming", "end-of-turn")


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


def _stop_on_sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # the same cleanup as Ctrl-C: clients closed, Ray shut down


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
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
                signal.signal(signal.SIGTERM, _stop_on_sigterm)  # again: ray.init installs its own
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
