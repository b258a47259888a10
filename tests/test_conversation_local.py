"""A conversation over `LocalServices`: turn-taking, barge-in, truncate and cancel, with real models (tiny
random CSM and Mimi, silero VAD, pocketsphinx, the echo responder) in this process. No Ray is started.

Events are what `send` got, in wire form (dicts), as a client would read them; assertions are on events,
history and counters, never on wall time (the timeouts only keep a broken test from hanging).
"""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest

from csm.async_engine import FIRST_FRAMES
from csm.audio import FRAME_MS
from devtools.realtime_client import (
    CHUNK,
    assert_spoken_turn,
    audio_samples,
    expected_frames,
    of_type,
    speech,
)
from serve_app import protocol as p
from serve_app.conversation import Conversation, Limits, Shared
from serve_app.history import HistoryStore
from serve_app.local_services import LocalServices
from serve_app.speech import InputStream, ReplyStream
from serve_app.voices import VoiceLibrary
from speech.vad import load_vad_model

FRAME = 1920
REPLY_S = 2.0  # short replies keep the file fast; the barge-in test asks for longer ones


@pytest.fixture(scope="module")
def services():
    local = LocalServices.load("tiny", max_slots=4)
    yield local
    asyncio.run(local.aclose())


@pytest.fixture(scope="module")
def vad_model():
    return load_vad_model()


class Session:
    """A conversation and what it sent, read like a client reads a socket."""

    def __init__(self, services: LocalServices, vad_model, folder: Path, max_reply_s: float) -> None:
        # The audio arrives as fast as the test pushes it: the audio budget is tested in test_limits.
        limits = Limits(max_reply_seconds=max_reply_s, audio_rate=1000.0, audio_burst_s=120.0)
        self.store = HistoryStore(folder / "history")
        shared = Shared(self.store, VoiceLibrary(None, None), vad_model, limits, "none")
        self.outbox: asyncio.Queue[p.ServerEvent] = asyncio.Queue()
        self.conversation = Conversation("conv_local", services, shared, self.outbox.put_nowait, [])
        self.events: list[dict] = []
        self.conversation.start()

    async def send(self, type: str, **fields) -> None:
        await self.conversation.handle(p.parse_client_event(json.dumps({"type": type, **fields})))

    async def say_text(self, text: str) -> None:
        item = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}
        await self.send("conversation.item.create", item=item)
        await self.send("response.create")

    async def stream(self, pcm: np.ndarray) -> None:
        for i in range(0, pcm.size, CHUNK):
            chunk = base64.b64encode(pcm[i : i + CHUNK].tobytes()).decode()
            await self.send("input_audio_buffer.append", audio=chunk)

    async def until(self, type: str, timeout: float = 60) -> list[dict]:
        """Events up to and including the next one of `type`."""
        out = []
        async with asyncio.timeout(timeout):
            while True:
                event = json.loads((await self.outbox.get()).to_json())
                self.events.append(event)
                out.append(event)
                if event["type"] == type:
                    return out

    def turn(self, item_id: str):
        return next(t for t in self.conversation.history if t.item_id == item_id)


@pytest.fixture
async def session(services, vad_model, tmp_path) -> AsyncIterator[Session]:
    s = Session(services, vad_model, tmp_path, REPLY_S)
    assert (await s.until("session.created"))[-1]["type"] == "session.created"
    yield s
    await s.conversation.close()


def test_a_conversation_imports_no_ray():
    """Checked in a fresh interpreter: other test files of the same session import Ray."""
    check = (
        "import sys, serve_app.conversation, serve_app.local_services; "
        "assert not [m for m in sys.modules if m == 'ray' or m.startswith('ray.')]"
    )
    subprocess.run([sys.executable, "-c", check], check=True, timeout=300)


def test_the_services_are_plain_objects(services):
    """The conversation's streams run over in-process objects: nothing of Ray's is in the way."""
    turn = services.input_stream(lambda text: None, streaming_asr=True)
    reply = services.reply_audio()
    assert isinstance(turn, InputStream) and turn.streaming_asr and isinstance(reply, ReplyStream)
    for obj in (services, turn, reply, services.engine):
        assert not type(obj).__module__.startswith("ray")


async def test_typed_turn_gets_a_reply_and_the_history_grows(session):
    await session.say_text("what is the weather like")
    events = await session.until("response.done")
    reply = of_type(events, "response.output_audio_transcript.done")[0]["transcript"]
    assert reply == "You said: what is the weather like."
    done = of_type(events, "response.done")[0]["response"]
    assert done["status"] == "completed" and done["x-prompt"]["sentences"] == 1
    deltas = of_type(events, "response.output_audio.delta")
    sizes = [len(base64.b64decode(d["delta"])) // 2 for d in deltas]
    frames = expected_frames(reply, REPLY_S)
    # FIRST_FRAMES first (240 ms start the page's playback at once), then two to four a delta (more as the
    # reply gets ahead of playback), whatever is left last.
    assert sizes[0] == FIRST_FRAMES * FRAME and sum(sizes) == frames * FRAME
    assert {s // FRAME for s in sizes[1:-1]} <= {2, 3, 4} and 1 <= sizes[-1] // FRAME <= 4
    assert audio_samples(events) == frames * FRAME
    user, assistant = session.conversation.history
    assert (user.role, user.text) == ("user", "what is the weather like")
    assert assistant.role == "assistant" and assistant.text == reply and assistant.frames == frames
    # The next reply's prompt extends this one's: the engine reuses the rows it holds.
    await session.say_text("and tomorrow")
    done = of_type(await session.until("response.done"), "response.done")[0]["response"]
    assert done["status"] == "completed" and len(session.conversation.history) == 4
    assert done["x-prompt"]["reused_rows"] > done["x-prompt"]["prefilled_rows"] > 0


async def test_spoken_turn_with_server_vad(session, tmp_path):
    await session.stream(speech("what is the weather like today", tmp_path))
    events = await session.until("response.done")
    assert_spoken_turn(events)
    assert of_type(events, "conversation.item.input_audio_transcription.delta")  # recognized while spoken
    transcript = of_type(events, "conversation.item.input_audio_transcription.completed")[0]["transcript"]
    assert "weather" in transcript.split()
    started = of_type(events, "input_audio_buffer.speech_started")[0]
    assert 500 <= started["audio_start_ms"] <= 1200  # speech begins at 1 s; 300 ms of prefix padding
    user, assistant = session.conversation.history
    assert user.role == "user" and user.text == transcript and user.frames > 0  # its encoded speech
    assert assistant.text == f"You said: {transcript}." and assistant.frames == expected_frames(
        assistant.text, REPLY_S
    )


async def test_barge_in_cancels_the_reply_and_keeps_what_was_heard(services, vad_model, tmp_path):
    session = Session(services, vad_model, tmp_path, max_reply_s=6.0)
    await session.say_text("tell me a long story about the sea and the sky")
    first = await session.until("response.output_audio.delta")
    item_id = first[-1]["item_id"]
    await session.stream(speech("stop please", tmp_path, lead_s=0.3))
    events = await session.until("response.done")
    assert "input_audio_buffer.speech_started" in [e["type"] for e in events]
    done = of_type(events, "response.done")[0]["response"]
    assert done["status"] == "cancelled" and done["status_details"]["reason"] == "turn_detected"
    heard = session.turn(item_id)  # the frames made before the barge-in, the sentence it was in
    sent = audio_samples(session.events) // FRAME
    assert heard.role == "assistant" and 0 < heard.frames == sent < expected_frames(heard.text, 6.0)
    # The person's turn (committed at speech end) gets its reply; the conversation goes on.
    events = await session.until("response.done")
    assert events[-1]["response"]["status"] == "completed"
    assert [t.role for t in session.conversation.history] == ["user", "assistant", "user", "assistant"]
    await session.conversation.close()


async def test_truncate_trims_the_assistant_turn(session):
    await session.say_text("say something")
    events = await session.until("response.done")
    item_id = of_type(events, "response.done")[0]["response"]["output"][0]["id"]
    frames = session.turn(item_id).frames
    assert frames == expected_frames("You said: say something.", REPLY_S)
    # Past the item's audio: an error, and the turn stays as it was.
    await session.send(
        "conversation.item.truncate", item_id=item_id, content_index=0, audio_end_ms=(frames + 1) * FRAME_MS
    )
    error = (await session.until("error"))[-1]["error"]
    assert error["code"] == "invalid_event" and error["param"] == "audio_end_ms"
    assert session.turn(item_id).frames == frames and session.outbox.empty()
    # The person's turn is not the assistant's audio.
    user_id = session.conversation.history[0].item_id
    await session.send("conversation.item.truncate", item_id=user_id, content_index=0, audio_end_ms=0)
    assert (await session.until("error"))[-1]["error"]["code"] == "invalid_event"
    await session.send("conversation.item.truncate", item_id=item_id, content_index=0, audio_end_ms=200)
    truncated = (await session.until("conversation.item.truncated"))[-1]
    assert truncated["item_id"] == item_id and truncated["audio_end_ms"] == 200
    turn = session.turn(item_id)
    assert turn.frames == 3 and turn.codes is not None and turn.codes.shape == (3, 32)  # ceil(200 / 80)
    records = [json.loads(line) for line in (session.store.directory / "conv_local.jsonl").open()]
    assert any(r["kind"] == "truncate" and r["item_id"] == item_id and r["frames"] == 3 for r in records)


async def test_response_cancel(session):
    await session.send("response.cancel")  # nothing in progress
    assert (await session.until("error"))[-1]["error"]["code"] == "no_active_response"
    await session.say_text("count to ten slowly please")
    await session.until("response.output_audio.delta")
    await session.send("response.cancel", response_id="resp_not_this_one")
    assert (await session.until("error"))[-1]["error"]["code"] == "no_active_response"
    await session.send("response.cancel")
    done = (await session.until("response.done"))[-1]["response"]
    assert done["status"] == "cancelled" and done["status_details"]["reason"] == "client_cancelled"
    assert session.conversation.reply is None
    await session.send("response.cancel")  # nothing to cancel now
    assert (await session.until("error"))[-1]["error"]["code"] == "no_active_response"
    await session.say_text("again")
    assert (await session.until("response.done"))[-1]["response"]["status"] == "completed"


async def test_response_create_parameters_are_honoured(session):
    """A reply's own voice, metadata and output cap (one token a frame); an unknown voice is refused."""
    item = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hello"}]}
    await session.send("conversation.item.create", item=item)
    await session.send("response.create", response={"audio": {"output": {"voice": "nobody"}}})
    error = (await session.until("error"))[-1]["error"]
    assert (error["code"], error["param"]) == ("invalid_event", "response.audio.output.voice")
    assert session.conversation.reply is None
    await session.send(
        "response.create",
        response={
            "metadata": {"turn": "1"},
            "max_output_tokens": 5,
            "audio": {"output": {"voice": "default"}},
        },
    )
    events = await session.until("response.done")
    created = of_type(events, "response.created")[0]["response"]
    done = of_type(events, "response.done")[0]["response"]
    for response in (created, done):
        assert response["metadata"] == {"turn": "1"} and response["max_output_tokens"] == 5
    assert done["status"] == "completed" and audio_samples(events) == 5 * FRAME
    assert session.conversation.history[-1].frames == 5
