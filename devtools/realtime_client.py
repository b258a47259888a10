"""A small realtime-protocol client for the tests and benchmarks: a real WebSocket, JSON events."""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import time
from pathlib import Path

import numpy as np
import websockets

from csm.audio import SAMPLE_RATE, read_wav, to_mimi_rate
from serve_app.protocol import SEQ_FIELD

CHUNK = 1920  # 80 ms at 24 kHz


def espeak(text: str, folder: Path) -> np.ndarray:
    """espeak-ng saying `text` (US English, 160 words a minute): float32 at 24 kHz, with espeak's own
    short leading and trailing silence."""
    wav = folder / f"say_{abs(hash(text))}.wav"
    subprocess.run(["espeak-ng", "-v", "en-us", "-s", "160", "-w", str(wav), text], check=True)
    audio, rate = read_wav(wav)
    return to_mimi_rate(audio, rate).numpy()


def speech(text: str, folder: Path, lead_s: float = 1.0, tail_s: float = 1.5) -> np.ndarray:
    """espeak-ng saying `text`, at 24 kHz int16, with silence around it (a person's turn)."""
    audio = espeak(text, folder)
    pad = [np.zeros(int(s * SAMPLE_RATE), np.float32) for s in (lead_s, tail_s)]
    return (np.concatenate([pad[0], audio, pad[1]]) * 32767).astype(np.int16)


class Client:
    """One conversation's socket. It numbers the events it sends (`x-seq`, as the page does), unless
    `number` is False; `send_raw` sends a message as given."""

    def __init__(self, ws: websockets.ClientConnection, number: bool = True) -> None:
        self.ws = ws
        self.events: list[dict] = []
        self.number = number
        self.sent = 0

    @classmethod
    async def connect(cls, url: str, *, number: bool = True, **query: str) -> Client:
        q = "&".join(f"{k}={v}" for k, v in query.items())
        ws = await websockets.connect(f"{url}?{q}" if q else url, max_size=2**22)
        return cls(ws, number)

    @classmethod
    async def open(cls, url: str, *, number: bool = True, **query: str) -> tuple[Client, dict]:
        """Connect and read the conversation's opening events: `session.created`, then `x-server.info`
        (returned: the voices, the random-weights flag, the conversation id, the replica)."""
        client = await cls.connect(url, number=number, **query)
        created = await client.recv()
        assert created["type"] == "session.created", created
        info = await client.recv()
        assert info["type"] == "x-server.info", info
        return client, info

    async def send(self, type: str, **fields) -> None:
        self.sent += 1
        if self.number:
            fields[SEQ_FIELD] = self.sent
        await self.ws.send(json.dumps({"type": type, **fields}))

    async def send_raw(self, data: str | bytes) -> None:
        await self.ws.send(data)

    async def recv(self, timeout: float = 60) -> dict:
        event = json.loads(await asyncio.wait_for(self.ws.recv(), timeout))
        self.events.append(event)
        return event

    async def until(self, type: str, timeout: float = 90) -> list[dict]:
        """Events up to and including the first of `type`."""
        deadline = time.monotonic() + timeout
        out = []
        while True:
            event = await self.recv(max(deadline - time.monotonic(), 0.01))
            out.append(event)
            if event["type"] == type:
                return out

    async def stream(self, pcm: np.ndarray, realtime: float = 0.25) -> None:
        """Send audio in 80 ms chunks, paced at `realtime` × real time (VAD reads audio, not the clock)."""
        for i in range(0, pcm.size, CHUNK):
            chunk = pcm[i : i + CHUNK]
            await self.send("input_audio_buffer.append", audio=base64.b64encode(chunk.tobytes()).decode())
            await asyncio.sleep(0.08 * realtime)

    async def say_text(self, text: str) -> None:
        item = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}
        await self.send("conversation.item.create", item=item)
        await self.send("response.create")

    async def close(self) -> None:
        await self.ws.close()


def expected_frames(transcript: str, limit_s: float = 6.0) -> int:
    """Random weights never emit EOS, so a one-sentence reply lasts exactly the frames allowed for it."""
    from csm.audio import FRAME_MS
    from serve_app.reply import frames_for

    return min(frames_for(transcript), int(limit_s * 1000 / FRAME_MS))


def audio_samples(events: list[dict]) -> int:
    return sum(
        len(base64.b64decode(e["delta"])) // 2 for e in events if e["type"] == "response.output_audio.delta"
    )


# What a spoken turn with a reply must produce, in this order of first appearance.
SPOKEN_TURN = (
    "input_audio_buffer.speech_started",
    "input_audio_buffer.speech_stopped",
    "input_audio_buffer.committed",
    "response.created",  # at once: the reply starts while the transcript is being made
    "conversation.item.input_audio_transcription.completed",
    "response.output_audio.delta",
    "response.done",
)


def assert_spoken_turn(events: list[dict]) -> None:
    types = [e["type"] for e in events]
    missing = [name for name in SPOKEN_TURN if name not in types]
    assert not missing, f"missing {missing} in {types}"
    firsts = [types.index(name) for name in SPOKEN_TURN]
    assert firsts == sorted(firsts), f"out of order: {types}"


def whole_reply(events: list[dict]) -> str:
    """The reply's transcript, once its audio is checked whole: every frame its text allows, none lost."""
    reply = of_type(events, "response.output_audio_transcript.done")[0]["transcript"]
    assert audio_samples(events) == expected_frames(reply) * CHUNK, reply
    return reply


def of_type(events: list[dict], type: str) -> list[dict]:
    return [e for e in events if e["type"] == type]
