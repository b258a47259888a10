"""What a conversation calls outside itself, as one small protocol, and its implementation over the
model deployments' handles.

`Services` is all a `Conversation` needs: an input stream per turn of the person's (encoded, and
recognized while spoken), end-of-turn recognition, the reply's sentences, and a reply's audio. Turn-taking,
barge-in, truncation and cancellation live in the conversation, so they run the same over `RayServices`
(the Serve app) and `serve_app.local_services.LocalServices` (plain objects in one process: tests, scripts).

Ray is imported for type checking only: a handle's calls need no import, so a process without Ray (the
local services' tests) can import this module.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np

from csm.requests import Frames, PromptUse, SpeechRequest
from serve_app.speech import AudioChunk, InputStream, ReplyStream, StreamCalls

if TYPE_CHECKING:
    from ray.serve.handle import DeploymentHandle

__all__ = ["Handles", "RayServices", "ReplyAudio", "Services", "TurnAudio", "new_stream_id"]


class TurnAudio(Protocol):
    """One turn of the person's audio, taken in as it arrives (`serve_app.speech.InputStream`)."""

    samples: int  # int16 samples pushed so far

    @property
    def streaming_asr(self) -> bool:
        """Whether the turn is recognized as it arrives (else the caller transcribes it at its end)."""
        ...

    def push(self, pcm: np.ndarray) -> None:
        """Add int16 24 kHz audio; never blocks."""
        ...

    def audio(self) -> np.ndarray:
        """The turn's int16 audio so far."""
        ...

    async def finish(self) -> np.ndarray:
        """The turn's codes ([frames, 32] int16)."""
        ...

    async def finish_transcript(self) -> str:
        """The turn's transcript (only with `streaming_asr`)."""
        ...

    async def cancel(self) -> None:
        """Drop the turn (cleared, or the connection is gone)."""
        ...


class ReplyAudio(Protocol):
    """One reply's audio, sentence after sentence (`serve_app.speech.ReplyStream`)."""

    frames: list[np.ndarray]  # every frame decoded so far, as the engine made them
    prompts: list[PromptUse]  # how each sentence's prompt was paid for

    def speak(self, request: SpeechRequest) -> AsyncIterator[AudioChunk]:
        """The sentence's audio, chunk by chunk; leaving the iteration cancels its generation."""
        ...

    def codes(self) -> np.ndarray:
        """Every frame so far, [frames, 32] int16."""
        ...

    async def close(self) -> None: ...


class Services(Protocol):
    """What one conversation calls."""

    def input_stream(self, partial: Callable[[str], None], streaming_asr: bool) -> TurnAudio:
        """A new turn's stream; with `streaming_asr`, `partial` hears each new transcript so far."""
        ...

    def transcribe(self, audio: np.ndarray) -> Awaitable[str]:
        """The text of one whole turn (float32 mono 24 kHz)."""
        ...

    def reply_text(self, instructions: str, history: list[dict]) -> AsyncIterator[str]:
        """The reply's sentences to `history` (dicts of `role` and `text`, oldest first); raises
        `speech.reply_text.ResponderError` when the text cannot be had."""
        ...

    def reply_audio(self) -> ReplyAudio:
        """A new reply's audio stream."""
        ...


def new_stream_id(kind: str) -> str:
    """A stream's id (`in_…` for a turn, `out_…` for a reply): unique, and the key its state is kept by."""
    return f"{kind}_{uuid.uuid4().hex}"


@dataclass
class Handles:
    generator: DeploymentHandle
    decoder: DeploymentHandle
    tokenizer: DeploymentHandle
    recognizer: DeploymentHandle
    responder: DeploymentHandle


class RayServices:
    """`Services` over the Serve deployments. A stream's calls carry its id as `multiplexed_model_id`,
    so they reach the replica that holds its state."""

    def __init__(self, handles: Handles) -> None:
        self.h = handles
        self._generator = handles.generator.options(stream=True)
        self._responder = handles.responder.options(stream=True)

    def input_stream(self, partial: Callable[[str], None], streaming_asr: bool) -> InputStream:
        stream_id = new_stream_id("in")
        encoder = self.h.tokenizer.options(multiplexed_model_id=stream_id)
        recognizer = None
        if streaming_asr:
            asr = self.h.recognizer.options(multiplexed_model_id=stream_id)
            recognizer = StreamCalls(asr.push.remote, asr.close.remote)
        return InputStream(
            stream_id, StreamCalls(encoder.encode.remote, encoder.close.remote), recognizer, partial
        )

    def transcribe(self, audio: np.ndarray) -> Awaitable[str]:
        return self.h.recognizer.transcribe.remote(audio)

    def reply_text(self, instructions: str, history: list[dict]) -> AsyncIterator[str]:
        return self._responder.respond.remote(instructions, history)

    def reply_audio(self) -> ReplyStream:
        stream_id = new_stream_id("out")
        decoder = self.h.decoder.options(multiplexed_model_id=stream_id)
        return ReplyStream(stream_id, self._generate, decoder.decode.remote, decoder.close.remote)

    async def _generate(self, request: SpeechRequest) -> AsyncIterator[Frames]:
        stream = self._generator.generate.remote(request)
        try:
            async for frames in stream:
                yield frames
        finally:  # leaving early (a barge-in) frees the generation's engine slot at once
            stream.cancel()
