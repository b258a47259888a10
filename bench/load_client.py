"""The load benchmark's simulated people: their speech, their connections, their turns, and what one
run measured of them (`RunStats`).

A person connects to `/v1/realtime`, waits for `session.created`, and until the run is over takes turns:
a sentence streamed in 80 ms chunks at real time, then silence so the server's VAD ends the turn; it
waits for `response.done`, "plays" the reply at real time as the page would, pauses and speaks again.
A refusal (`server_busy`) or a failure backs off and connects again. `bench/load.py` runs them.
"""

from __future__ import annotations

import asyncio
import base64
import json
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import websockets
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file too (`--help`)

from bench.load_procs import Sample
from csm.audio import SAMPLE_RATE
from devtools.realtime_client import CHUNK, speech

CHUNK_S = CHUNK / SAMPLE_RATE  # 80 ms, what a browser's audio worklet sends at a time
PREROLL_S = 0.12  # the page's base pre-roll (frontend/src/lib/jitterBuffer.ts, `prerollMs`)
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
    finished: Counter[str] = field(default_factory=Counter)  # completed turns by conversation id
    crashes: list[str] = field(default_factory=list)
    memory: list[tuple[float, float]] = field(default_factory=list)  # (s into the run, total RSS MB)
    loop_lag: list[float] = field(default_factory=list)
    # The first and the latest process sample: (s into the run, pid → sample).
    first: tuple[float, dict[int, Sample]] = field(default_factory=lambda: (0.0, {}))
    last: tuple[float, dict[int, Sample]] = field(default_factory=lambda: (0.0, {}))
    cpu_s: float = 0.0
    wall_s: float = 0.0
    loadavg: tuple[str, str] = ("", "")
    cpu_probe_ms: tuple[float, float] = (0.0, 0.0)  # bench.report.cpu_probe_ms before and after the run

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

    def __init__(self, ws: websockets.ClientConnection, stats: RunStats, conversation_id: str) -> None:
        self.ws, self.stats, self.id = ws, stats, conversation_id
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
        if (info := await _recv(ws))["type"] != "x-server.info":
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
    return Conversation(ws, stats, info["conversation_id"])


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
    played = record(turn, stats)
    if turn.status == "completed":
        stats.finished[conversation.id] += 1
    await sleep_until(played)  # the person listens to the whole reply
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
