"""The audio paths of a conversation, over whatever holds the streams' state: the model deployments'
handles (`serve_app.services.RayServices`) or plain objects in this process
(`serve_app.local_services.LocalServices`). No Ray here: the calls arrive as callables.

`InputStream`: one person's turn, encoded while they speak (chunks go to the encoder in the background,
in order; an encoder that lost the stream gets the turn again from its start), and recognized while they
speak the same way, so when the turn ends only its last chunk is left to encode and to recognize.
`ReplyStream`: one reply's audio: sentences go to the generator, its frames to the decoder in chunks of
2 frames (the first 3) as soon as they exist, and PCM comes back to the caller with the frames it came from.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

import numpy as np

from csm.audio import FRAME_SIZE
from csm.codec_streaming import RECOVERY_FRAMES
from csm.presets import ModelArgs
from csm.requests import Frames, PromptUse, SpeechRequest

log = logging.getLogger(__name__)

# Audio sent per call while the person speaks (to the encoder, and to the recognizer when it streams):
# 640 ms. Each call costs 3.5-5.5 ms of CPU (Serve's handle and replica, both sides, on 2 cores) whatever
# it carries (bench/serve_calls.py), so fewer, larger calls leave the cores to the models; what is left to
# encode and recognize when the turn ends is at most one such chunk, mostly the VAD's 500 ms of silence.
ENCODE_CHUNK = 8 * FRAME_SIZE

Result = TypeVar("Result")


@dataclass(frozen=True)
class StreamCalls(Generic[Result]):
    """One input stream's calls on what holds its state (the encoder's, or the recognizer's).

    `push(start, pcm, final)`: add int16 audio at sample `start`; the codes or the transcript so far, or
    `None` when the state is lost (send the stream again from sample 0). `close()`: drop the stream."""

    push: Callable[[int, np.ndarray, bool], Awaitable[Result | None]]
    close: Callable[[], Awaitable[None]]


class _Sender(Generic[Result]):
    """One turn's audio sent to one stream deployment in order, in the background: whole frames, at least
    `ENCODE_CHUNK` at a time, while the turn goes on, then the rest with `final`. `call(start, pcm, final)`
    answers `None` when its replica lacks the stream (restarted, or the slot went to another stream); the
    turn is then sent again from sample 0, which the deployment rebuilds the stream from."""

    def __init__(
        self,
        name: str,
        audio: Callable[[], np.ndarray],
        call: Callable[[int, np.ndarray, bool], Awaitable[Result | None]],
        on_result: Callable[[Result], None],
        on_restart: Callable[[], None] = lambda: None,
    ) -> None:
        self.name = name
        self._audio = audio
        self._call = call
        self._on_result = on_result
        self._on_restart = on_restart
        self.sent = 0  # samples the deployment holds
        self.recoveries = 0
        self._task: asyncio.Task | None = None

    def kick(self) -> None:
        """Send what is due, unless a send is under way (it takes whatever came meanwhile)."""
        if self._audio().size - self.sent >= ENCODE_CHUNK and (self._task is None or self._task.done()):
            self._task = asyncio.get_running_loop().create_task(self._drain(final=False))

    async def finish(self) -> None:
        if self._task is not None:
            await self._task
        await self._drain(final=True)

    async def _drain(self, final: bool) -> None:
        while True:
            audio = self._audio()
            if final:
                chunk = audio[self.sent :]
            else:
                whole = (audio.size - self.sent) // FRAME_SIZE * FRAME_SIZE
                if whole < ENCODE_CHUNK:
                    return
                chunk = audio[self.sent : self.sent + whole]
            result = await self._call(self.sent, chunk, final)
            if result is None:
                log.info("%s: stream state lost, sending the turn again", self.name)
                self.sent = 0
                self.recoveries += 1
                self._on_restart()
                continue
            self.sent += chunk.size
            self._on_result(result)
            if final:
                return

    def cancel(self) -> None:
        if self._task is not None:
            self._task.cancel()


class InputStream:
    """The person's audio for one turn: encoded in the background as it arrives, and, with a recognizer,
    recognized as it arrives too (`partial` hears each new transcript so far)."""

    def __init__(
        self,
        stream_id: str,
        encoder: StreamCalls[np.ndarray],
        recognizer: StreamCalls[str] | None = None,
        partial: Callable[[str], None] = lambda text: None,
    ) -> None:
        self.id = stream_id
        self._audio = np.zeros(0, np.int16)  # grows by doubling: the turn's audio is read on every drain
        self.samples = 0
        self._codes: list[np.ndarray] = []
        self.transcript = ""
        self._partial = partial
        self._encoder = _Sender(
            f"input stream {self.id} (encoder)",
            self.audio,
            encoder.push,
            self._codes.append,
            on_restart=self._codes.clear,
        )
        self._senders = [(self._encoder, encoder)]
        self._recognizer: _Sender[str] | None = None
        if recognizer is not None:
            self._recognizer = _Sender(
                f"input stream {self.id} (recognizer)", self.audio, recognizer.push, self._heard
            )
            self._senders.append((self._recognizer, recognizer))

    @property
    def streaming_asr(self) -> bool:
        """Whether the turn is recognized as it arrives (else the caller transcribes it at its end)."""
        return self._recognizer is not None

    def _heard(self, text: str) -> None:
        if text != self.transcript:
            self.transcript = text
            self._partial(text)

    def push(self, pcm: np.ndarray) -> None:
        """Add int16 audio; never blocks (encoding and recognition run in background tasks)."""
        if pcm.size == 0:
            return
        end = self.samples + pcm.size
        if end > self._audio.size:
            grown = np.zeros(max(end, 2 * self._audio.size), np.int16)
            grown[: self.samples] = self._audio[: self.samples]
            self._audio = grown
        self._audio[self.samples : end] = pcm
        self.samples = end
        self._encoder.kick()
        if self._recognizer is not None:
            self._recognizer.kick()

    def audio(self) -> np.ndarray:
        """The turn's audio so far (a view: valid until the next push)."""
        return self._audio[: self.samples]

    async def finish(self) -> np.ndarray:
        """The turn's codes ([frames, 32] int16): waits for the encoder to take the rest of the audio."""
        if self.samples == 0:
            return np.zeros((0, 32), np.int16)
        await self._encoder.finish()
        return np.concatenate(self._codes) if self._codes else np.zeros((0, 32), np.int16)

    async def finish_transcript(self) -> str:
        """The turn's transcript, from the recognizer's stream: only the last chunk is left to decode."""
        assert self._recognizer is not None
        if self.samples == 0:
            return ""
        await self._recognizer.finish()
        return self.transcript

    async def cancel(self) -> None:
        for sender, _ in self._senders:
            sender.cancel()
        for sender, calls in self._senders:
            if sender.sent:
                try:
                    await calls.close()
                except Exception:  # the stream's slot is reclaimed by LRU anyway
                    log.warning("%s: close failed", sender.name, exc_info=True)


@dataclass
class AudioChunk:
    pcm: np.ndarray  # int16, 24 kHz
    codes: np.ndarray  # [frames, 32] int16: the frames this audio was decoded from


class ReplyStream:
    """One reply's audio, sentence after sentence, as one continuous decoder stream.

    `generate(request)`: the request's frames as made (leaving the iteration cancels the generation);
    `decode(start, codes, history)`: PCM16 of frames `start ..` of this stream, `history` being the frames
    before them (to rebuild a lost state from); `close()`: end the decoder stream."""

    def __init__(
        self,
        stream_id: str,
        generate: Callable[[SpeechRequest], AsyncIterator[Frames]],
        decode: Callable[[int, np.ndarray, np.ndarray | None], Awaitable[np.ndarray]],
        close: Callable[[], Awaitable[None]],
    ) -> None:
        self.id = stream_id
        self._generate = generate
        self._decode_call = decode
        self._close_call = close
        self.frames: list[np.ndarray] = []  # every frame decoded so far, in order, as the engine made them
        self.prompts: list[PromptUse] = []  # how each sentence's prompt was paid for

    async def speak(self, request: SpeechRequest) -> AsyncIterator[AudioChunk]:
        """Generate `request` and yield its audio chunk by chunk (the generator's chunks: 3 frames, then 2
        each, `csm.async_engine.chunks`). Decoding runs while the next frames are made. Leaving the
        iteration (a barge-in) cancels the generation too, which frees its engine slot at once."""
        queue: asyncio.Queue[Frames | BaseException | None] = asyncio.Queue()
        stream = self._generate(request)

        async def pump() -> None:
            try:
                async for frames in stream:
                    queue.put_nowait(frames)
                queue.put_nowait(None)
            except BaseException as e:  # surfaced to the consumer below
                queue.put_nowait(e)
                if isinstance(e, asyncio.CancelledError):
                    raise

        pump_task = asyncio.get_running_loop().create_task(pump())
        try:
            while (item := await queue.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                if item.prompt is not None:
                    self.prompts.append(item.prompt)
                yield await self._decode(item.codes)
        finally:
            pump_task.cancel()

    async def _decode(self, codes: np.ndarray) -> AudioChunk:
        start = len(self.frames)
        history = np.stack(self.frames[-RECOVERY_FRAMES:]) if self.frames else None
        # CSM's special ids are never audio (a trained model all but never samples them; random weights
        # do): the decoder hears them as code 0, while the context keeps the frames as the engine fed them.
        audible = np.where(codes < ModelArgs.codebook_size, codes, 0)
        history = None if history is None else np.where(history < ModelArgs.codebook_size, history, 0)
        pcm = await self._decode_call(start, audible, history)
        self.frames.extend(codes)
        return AudioChunk(pcm, codes)

    def codes(self) -> np.ndarray:
        return np.stack(self.frames) if self.frames else np.zeros((0, 32), np.int16)

    async def close(self) -> None:
        if not self.frames:
            return
        try:
            await self._close_call()
        except Exception:
            log.warning("reply stream %s: decoder close failed", self.id, exc_info=True)
