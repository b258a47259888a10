"""`LocalServices`: a conversation's `Services` over plain objects in this process, with real models and
no Ray: the CSM engine (`csm.async_engine`), the streaming Mimi codec (`csm.codec_streaming`), speech
recognition (`speech.asr`) and the reply text (`speech.reply_text`). For tests, and for one conversation in
one process; the Serve app runs the same objects behind its deployments (`serve_app.services.RayServices`).

The conversation's own streams (`serve_app.speech.InputStream`, `ReplyStream`) run unchanged on top: only
their calls land here. Each codec direction and the recognizer work in a thread of their own (one at a
time each, like one replica's batch loop), so the event loop stays free, and the engine in its own thread.
Streams hold codec slots, as on a replica; all `max_streams` taken, a new stream fails at its first call.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Literal, TypeVar

import numpy as np
import torch

from csm.async_engine import FIRST_FRAMES, FRAMES_PER_CHUNK, MAX_FRAMES_PER_CHUNK, AsyncEngine
from csm.codec import MimiCodec
from csm.codec_streaming import (
    DecodeChunk,
    EncodeChunk,
    StreamingDecoder,
    StreamingEncoder,
    decode_pcm16,
    encode_pcm16,
)
from csm.engine import Engine, EngineConfig
from csm.prompt import PromptBuilder
from csm.requests import Frames, SpeechRequest, speak
from deployments.weights import load_csm, load_mimi, pick_device, pick_dtype
from serve_app.services import new_stream_id
from serve_app.speech import InputStream, ReplyStream, StreamCalls
from speech.asr import MIN_TRANSCRIBE_SAMPLES, Push, RecognitionStream, Transcriber, make_transcriber
from speech.pcm import check_pcm
from speech.reply_text import ReplyWriter, ResponderConfig, parse_turns

__all__ = ["LocalServices"]

T = TypeVar("T")


def _inference(fn: Callable[..., T], *args: object) -> T:
    with torch.inference_mode():  # thread-local: entered in the worker thread
        return fn(*args)


class _Slots:
    """The slot indices of one streaming codec, handed to streams as they start."""

    def __init__(self, n: int, what: str) -> None:
        self._free = list(range(n - 1, -1, -1))
        self._n, self._what = n, what

    def take(self) -> int:
        if not self._free:
            raise RuntimeError(f"all {self._n} {self._what} streams are in use")
        return self._free.pop()

    def give(self, slot: int) -> None:
        self._free.append(slot)


class _Worker:
    """One thread, one job at a time, in order: a codec's state is touched by it alone, and a stream's
    close always runs after the steps it was queued behind."""

    def __init__(self, name: str) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, _inference, fn, *args)

    def later(self, fn: Callable[..., object], *args: object) -> None:
        self._pool.submit(_inference, fn, *args)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


class _CodecStream:
    """One stream's slot in a streaming codec: taken at its first chunk, and at its end (or on a failure)
    closed on the codec's worker and given back (its next stream opens it after the close: the worker
    keeps order)."""

    def __init__(self, slots: _Slots, worker: _Worker, close_slot: Callable[[int], object]) -> None:
        self._slots, self._worker, self._close_slot = slots, worker, close_slot
        self._slot: int | None = None

    async def close(self) -> None:
        self._release()

    def _release(self) -> None:
        slot, self._slot = self._slot, None
        if slot is not None:
            self._worker.later(self._close_slot, slot)
            self._slots.give(slot)


class _Encoding(_CodecStream):
    """One turn's encoder stream (an input stream's `StreamCalls`)."""

    def __init__(self, encoder: StreamingEncoder, slots: _Slots, worker: _Worker) -> None:
        super().__init__(slots, worker, encoder.close)
        self._encoder = encoder

    async def push(self, start: int, pcm: np.ndarray, final: bool) -> np.ndarray | None:
        fresh = self._slot is None
        if fresh and start != 0:
            return None  # no state for this stream: the caller sends it again from sample 0
        if fresh:
            self._slot = self._slots.take()
        assert self._slot is not None
        try:
            (codes,) = await self._worker.run(
                encode_pcm16, self._encoder, [EncodeChunk(self._slot, pcm, fresh, final)]
            )
        except BaseException:  # cancelled (the turn was cleared) or failed: the stream is over
            self._release()
            raise
        if final:
            self._release()
        return codes


class _Recognition:
    """One turn's recognizer stream (an input stream's `StreamCalls`)."""

    def __init__(self, transcriber: Transcriber, worker: _Worker) -> None:
        self._transcriber, self._worker = transcriber, worker
        self._stream: RecognitionStream | None = None

    async def push(self, start: int, pcm: np.ndarray, final: bool) -> str | None:
        if self._stream is None:
            if start != 0:
                return None
            self._stream = self._transcriber.open()
        push = Push(self._stream, pcm.astype(np.float32) / 32768.0, final)
        try:
            (text,) = await self._worker.run(self._transcriber.step, [push])
        except BaseException:
            self._release()
            raise
        if final:
            self._stream = None  # a final step ends the stream in the backend
        return text

    async def close(self) -> None:
        self._release()

    def _release(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None and not stream.done:
            self._worker.later(self._transcriber.close, stream)


class _Decoding(_CodecStream):
    """One reply's decoder stream (a reply stream's `decode` and `close`)."""

    def __init__(self, decoder: StreamingDecoder, slots: _Slots, worker: _Worker) -> None:
        super().__init__(slots, worker, decoder.close)
        self._decoder = decoder
        self._position = 0

    async def decode(self, start: int, codes: np.ndarray, history: np.ndarray | None) -> np.ndarray:
        fresh = self._slot is None or self._position != start
        if self._slot is None:
            self._slot = self._slots.take()
        replay = history if fresh and start > 0 else None
        self._position = start + codes.shape[0]
        try:
            (pcm,) = await self._worker.run(
                decode_pcm16, self._decoder, [DecodeChunk(self._slot, codes, fresh, replay)]
            )
        except BaseException:
            self._release()
            raise
        return pcm


class LocalServices:
    """`serve_app.services.Services` in this process. `load()` builds the models; `aclose()` stops them."""

    def __init__(
        self,
        engine: AsyncEngine,
        builder: PromptBuilder,
        codec: MimiCodec,
        transcriber: Transcriber,
        writer: ReplyWriter,
        max_streams: int = 4,
        first_frames: int = FIRST_FRAMES,
        frames_per_chunk: int = FRAMES_PER_CHUNK,
        max_frames_per_chunk: int = MAX_FRAMES_PER_CHUNK,
    ) -> None:
        self.engine = engine
        self.builder = builder
        self.transcriber = transcriber
        self.writer = writer
        self.first_frames = first_frames
        self.frames_per_chunk = frames_per_chunk
        self.max_frames_per_chunk = max_frames_per_chunk
        self.encoder = StreamingEncoder(codec, max_streams)
        per_step = max(first_frames, frames_per_chunk, max_frames_per_chunk)
        self.decoder = StreamingDecoder(codec, max_streams, max_frames_per_step=per_step)
        self._encoder_slots = _Slots(max_streams, "encoder")
        self._decoder_slots = _Slots(max_streams, "decoder")
        self._encode = _Worker("local-encoder")
        self._decode = _Worker("local-decoder")
        self._asr = _Worker("local-asr")

    @classmethod
    def load(
        cls,
        preset: str = "tiny",
        device: str = "cpu",
        max_slots: int = 4,
        asr_backend: Literal["pocketsphinx", "whisper"] = "pocketsphinx",
        whisper_path: str | None = None,
        responder: ResponderConfig | None = None,
    ) -> LocalServices:
        """The models as the deployments load them: `MODEL_PATH` / `MIMI_PATH` if set, else the random
        `preset` (noise); `max_slots` engine sequences and codec streams each."""
        dev = pick_device(device)
        model, tokenizer, _ = load_csm(None, None, preset, dev, pick_dtype("auto", dev))
        codec, _ = load_mimi(None, None, preset, dev)
        engine = AsyncEngine(Engine(model, EngineConfig(max_slots=max_slots)))
        return cls(
            engine,
            PromptBuilder(tokenizer, model.args),
            codec,
            make_transcriber(asr_backend, whisper_path),
            ReplyWriter(responder or ResponderConfig()),
            max_streams=max_slots,
        )

    async def aclose(self) -> None:
        await self.writer.aclose()
        self.engine.close()
        for worker in (self._encode, self._decode, self._asr):
            worker.close()

    # ---- Services ---------------------------------------------------------------------------------
    def input_stream(self, partial: Callable[[str], None], streaming_asr: bool) -> InputStream:
        encoding = _Encoding(self.encoder, self._encoder_slots, self._encode)
        recognizer = None
        if streaming_asr:
            recognition = _Recognition(self.transcriber, self._asr)
            recognizer = StreamCalls(recognition.push, recognition.close)
        return InputStream(
            new_stream_id("in"), StreamCalls(encoding.push, encoding.close), recognizer, partial
        )

    async def transcribe(self, audio: np.ndarray) -> str:
        samples = check_pcm(audio)
        if samples.shape[0] < MIN_TRANSCRIBE_SAMPLES:  # as `SpeechRecognizer.transcribe`
            return ""
        (text,) = await self._asr.run(self.transcriber.transcribe, [samples])
        return text

    def reply_text(self, instructions: str, history: list[dict]) -> AsyncIterator[str]:
        return self.writer.respond(instructions, parse_turns(history))

    def reply_audio(self) -> ReplyStream:
        decoding = _Decoding(self.decoder, self._decoder_slots, self._decode)
        return ReplyStream(new_stream_id("out"), self._generate, decoding.decode, decoding.close)

    def _generate(self, request: SpeechRequest) -> AsyncIterator[Frames]:
        """As `CSMGenerator.generate`, less its metrics (`csm.requests.speak`). Started lazily, so a reply
        cancelled before it starts holds no engine slot; leaving early cancels the generation."""
        sizes = self.first_frames, self.frames_per_chunk, self.max_frames_per_chunk
        return speak(self.engine, self.builder, request, *sizes)
