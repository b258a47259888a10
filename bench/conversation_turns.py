"""The conversation benchmark's client side: typed turns over the realtime socket, and a phase (N
conversations × T rounds of turns) with what it measured (`Phase`); bench/conversation.py runs them."""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from websockets.exceptions import WebSocketException

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file too (`--help`)

from bench.launch import http_base, settle
from devtools.realtime_client import Client

SEED = 7
REPLY_SECONDS = 1.5  # x-sampling.max_reply_seconds: short replies keep the run bounded
TEXT_CHARS = 60
FILLER = "please tell me more about the quiet river walk near the old mill today".split()
OPEN_TIMEOUT_S = 30.0
TURN_TIMEOUT_S = 120.0  # response.create → response.done


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
