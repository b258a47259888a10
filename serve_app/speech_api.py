"""OpenAI's text-to-speech API (`POST /v1/audio/speech`, `GET /v1/models`) over the engine every
conversation uses, so a voice-agent framework (Pipecat, LiveKit Agents, Open WebUI) takes CSM as its TTS.

The ingress owns who may call: the token (the principal, or None) and a request's place among the
conversations (`admit`, which raises `ApiError` 429 or 503). This module owns the request, its speech and
the response. The input is split into sentences (`speech.reply_text.split_sentences`, the splitter of the
replies); each is spoken with the earlier ones as context, as a reply's sentences are, through the same
`ReplyStream` (the generator's frames, decoded in chunks of 2 as they come), so prosody carries on and
the voice's reference prefix is shared in the engine's cache. Bytes leave as frames are decoded: raw
(`stream_format: audio`, chunked) or as `speech.audio.delta` / `speech.audio.done` server-sent events.
Every error is OpenAI's JSON shape, `{"error": {"message", "type", "param", "code"}}`; the status and
headers wait for the first audio, so a request the engine refuses (full) is a 503, not a cut stream.
"""

from __future__ import annotations

import base64
import json
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from typing import Literal

import numpy as np
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from csm.audio import FRAME_MS
from csm.engine import EngineFull
from csm.prompt import Segment
from csm.requests import SpeechRequest
from serve_app.history import sentence_parts
from serve_app.protocol import Sampling
from serve_app.reply import ASSISTANT, frames_for
from serve_app.services import ReplyAudio
from serve_app.voices import NO_VOICE, Voice, VoiceLibrary
from speech.audio_formats import FORMATS, AudioFormat, encoder
from speech.reply_text import split_sentences

log = logging.getLogger(__name__)

__all__ = [
    "MODEL_ALIASES",
    "MODEL_ID",
    "OPENAI_VOICES",
    "ApiError",
    "SpeechApi",
    "SpeechConfig",
    "over_limit",
    "server_busy",
    "unauthorized",
]

MODEL_ID = "csm-1b"
# The model names the frameworks send by default (Pipecat, LiveKit: gpt-4o-mini-tts; Open WebUI: tts-1):
# answered by CSM, so their defaults work; any other name is OpenAI's 404 `model_not_found`.
MODEL_ALIASES = frozenset({"tts-1", "tts-1-hd", "gpt-4o-mini-tts", "gpt-4o-mini-tts-2025-12-15"})
# OpenAI's built-in voices. Some frameworks send only these (Pipecat's OpenAITTSService looks its voice up
# in a table of them), so each speaks with `SpeechConfig.openai_voice`, unless a voice has that name here.
OPENAI_VOICES = frozenset(
    "alloy ash ballad coral echo fable onyx nova sage shimmer verse marin cedar".split()
)


class SpeechConfig(BaseModel):
    """The speech endpoint's own limits (the ingress's `speech`); the conversations' apply as well."""

    model_config = ConfigDict(extra="forbid")

    max_input_chars: int = Field(4096, ge=1)  # OpenAI's limit; longer input is a 413
    max_audio_seconds: float = Field(300.0, gt=0)  # one request's audio; the speech ends there
    openai_voice: str | None = None  # what OpenAI's voice names speak with; None: the ingress's default


class ApiError(Exception):
    """An OpenAI-shaped error answer: `status` and `{"error": {"message", "type", "param", "code"}}`."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        param: str | None = None,
        type: str = "invalid_request_error",  # OpenAI's field name
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.type = status, message, code, param, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def unauthorized() -> ApiError:
    return ApiError(401, "a valid token is required (Authorization: Bearer)", "invalid_api_key")


def server_busy() -> ApiError:
    return ApiError(503, "the server is at capacity; try again shortly", "server_busy", type="server_error")


def over_limit(message: str) -> ApiError:
    return ApiError(429, message, "rate_limit_exceeded", type="requests")


class _VoiceRef(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str


class SpeechBody(BaseModel):
    """The request, as OpenAI's `audio.speech.create` sends it; any other field is refused by name."""

    model_config = ConfigDict(extra="forbid")

    model: str
    input: str
    voice: str | _VoiceRef
    instructions: str | None = None
    response_format: AudioFormat = "mp3"
    speed: float = Field(1.0, ge=0.25, le=4.0)
    stream_format: Literal["audio", "sse"] = "audio"

    @property
    def voice_name(self) -> str:
        return self.voice if isinstance(self.voice, str) else self.voice.id


# A request's place among the conversations: taken (or ApiError 429/503), then given back by the callable.
Admit = Callable[[str], Awaitable[Callable[[], None]]]


class SpeechApi:
    def __init__(
        self,
        reply_audio: Callable[[], ReplyAudio],
        voices: VoiceLibrary,
        config: SpeechConfig,
        admit: Admit,
        default_voice: str = NO_VOICE,
        sampling: Sampling | None = None,
    ) -> None:
        self._reply_audio = reply_audio
        self.voices = voices
        self.config = config
        self.openai_voice = config.openai_voice or default_voice
        self._admit = admit
        self.sampling = sampling or Sampling()

    @staticmethod
    def models() -> dict:
        return {
            "object": "list",
            "data": [{"id": MODEL_ID, "object": "model", "created": 0, "owned_by": "sesame"}],
        }

    async def respond(self, raw: bytes, principal: str | None) -> Response:
        """The answer to one `POST /v1/audio/speech` from `principal` (None: no valid token)."""
        release: Callable[[], None] | None = None
        speech: _Speech | None = None
        try:
            if principal is None:
                raise unauthorized()
            body = self._parse(raw)
            name, voice = await self._voice(body.voice_name)
            release = await self._admit(principal)
            speech = _Speech(self._reply_audio(), body.input, name, voice, self)
            first = await speech.first()
        except ApiError as e:
            return await _refused(e, speech, release)
        except EngineFull:
            return await _refused(server_busy(), speech, release)
        except ValueError as e:  # the generator refused the request (its prompt does not fit, say)
            return await _refused(ApiError(400, str(e)), speech, release)
        except StopAsyncIteration:  # no sentence in it
            return await _refused(
                ApiError(400, "input has nothing to speak", "invalid_value", "input"), speech, release
            )
        except Exception as e:  # a replica died before the first audio, ...: OpenAI's 500, logged
            log.exception("speech request failed before its first audio")
            failed = ApiError(500, f"generating the speech failed ({type(e).__name__})", type="server_error")
            return await _refused(failed, speech, release)
        except BaseException:
            await _refused(None, speech, release)
            raise
        assert speech is not None and release is not None
        sse = body.stream_format == "sse"
        media = "text/event-stream" if sse else FORMATS[body.response_format].media_type
        return StreamingResponse(
            _stream(speech, first, body, release),
            media_type=media,
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
        )

    def _parse(self, raw: bytes) -> SpeechBody:
        try:
            data = json.loads(raw or b"null")
        except ValueError:
            raise ApiError(400, "the body must be JSON") from None
        if not isinstance(data, dict):
            raise ApiError(400, "the body must be a JSON object")
        try:
            body = SpeechBody.model_validate(data)
        except ValidationError as e:
            raise _invalid(e) from None
        if body.model != MODEL_ID and body.model not in MODEL_ALIASES:
            message = f"the model {body.model!r} does not exist; this server has {MODEL_ID!r}"
            raise ApiError(404, message, "model_not_found", "model")
        if not body.input.strip():
            raise ApiError(400, "input is empty", "invalid_value", "input")
        if len(body.input) > self.config.max_input_chars:
            most = self.config.max_input_chars
            message = f"input is {len(body.input)} characters; at most {most} are allowed"
            raise ApiError(413, message, "input_too_long", "input")
        if body.speed != 1.0:
            message = f"speed {body.speed:g} is not supported: CSM speaks at its own pace (use 1.0)"
            raise ApiError(400, message, "unsupported_value", "speed")
        if body.instructions:
            raise ApiError(400, "instructions are not supported by CSM", "unsupported_value", "instructions")
        return body

    async def _voice(self, name: str) -> tuple[str, Voice | None]:
        """The voice's name as spoken here and its reference (None for `none`)."""
        if name in OPENAI_VOICES and not self.voices.exists(name):
            name = self.openai_voice
        if not self.voices.exists(name):
            message = f"unknown voice {name!r}; this server has {self.voices.names()}"
            raise ApiError(400, message, "invalid_value", "voice")
        try:
            return name, await self.voices.get(name)
        except ValueError as e:  # its files are unreadable
            raise ApiError(400, str(e), "invalid_value", "voice") from None


def _invalid(error: ValidationError) -> ApiError:
    """OpenAI's 400 for the first problem of a body, naming its parameter."""
    first = error.errors()[0]
    param = ".".join(str(part) for part in first["loc"]) or None
    if first["type"] == "extra_forbidden":
        return ApiError(400, f"Unrecognized request argument supplied: {param}", "unknown_parameter", param)
    if first["type"] == "missing":
        return ApiError(400, f"you must provide a {param} parameter", "missing_required_parameter", param)
    return ApiError(400, f"invalid {param}: {first['msg']}", "invalid_value", param)


async def _refused(
    error: ApiError | None, speech: _Speech | None, release: Callable[[], None] | None
) -> JSONResponse | None:
    if speech is not None:
        await speech.close()
    if release is not None:
        release()
    return None if error is None else error.response()


class _Speech:
    """One request's audio: its sentences, each spoken after the earlier ones (their text and frames)."""

    def __init__(self, audio: ReplyAudio, text: str, voice_name: str, voice: Voice | None, api: SpeechApi):
        self.audio = audio
        self.voice_name, self.voice = voice_name, voice
        self.sampling = api.sampling
        self.budget = int(api.config.max_audio_seconds * 1000 / FRAME_MS)  # frames
        # Its own cache key: each sentence's prompt extends the one before, so the engine reuses its rows.
        self.key = f"speech_{uuid.uuid4().hex}"
        self._chunks = self._generate(text)

    async def first(self) -> np.ndarray:
        """The first audio (where the engine refuses the request, EngineFull is raised here)."""
        return await anext(self._chunks)

    def rest(self) -> AsyncIterator[np.ndarray]:
        return self._chunks

    async def _generate(self, text: str) -> AsyncIterator[np.ndarray]:
        spoken: list[tuple[str, int]] = []  # each sentence and its frames
        head = [] if self.voice is None else [Segment(ASSISTANT, self.voice.text, self.voice.codes)]
        async for sentence in split_sentences(_once(text)):
            if self.budget <= 0:
                log.info("speech %s: cut at %d frames (max_audio_seconds)", self.key, len(self.audio.frames))
                break
            before = self.frames
            request = SpeechRequest(
                text=sentence,
                speaker=ASSISTANT,
                context=head
                + [Segment(ASSISTANT, s, codes) for s, codes in sentence_parts(spoken, self.audio.codes())],
                keep_first=len(head),
                max_frames=min(frames_for(sentence), self.budget),
                temperature=self.sampling.temperature,
                top_k=self.sampling.top_k,
                conversation_id=self.key,
                voice=self.voice_name if self.voice is not None else None,
            )
            spoken.append((sentence, 0))
            async with aclosing(self.audio.speak(request)) as chunks:  # closed here, not when collected
                async for chunk in chunks:
                    yield chunk.pcm
            spoken[-1] = (sentence, self.frames - before)
            self.budget -= spoken[-1][1]

    @property
    def frames(self) -> int:
        return len(self.audio.frames)

    def usage(self) -> dict:
        """`speech.audio.done`'s usage: prompt rows computed as input tokens, frames made as output."""
        prefilled = sum(use.prefilled for use in self.audio.prompts)
        made = self.frames
        return {"input_tokens": prefilled, "output_tokens": made, "total_tokens": prefilled + made}

    async def close(self) -> None:
        await self._chunks.aclose()  # a generation still running is cancelled, freeing its engine slot
        await self.audio.close()


async def _once(text: str) -> AsyncIterator[str]:
    yield text


def _sse(event: dict) -> bytes:
    return f"data: {json.dumps(event, separators=(',', ':'))}\n\n".encode()


async def _stream(speech: _Speech, first: np.ndarray, body: SpeechBody, release: Callable[[], None]):
    """The response body: encoded audio as it is decoded. A failure after the first bytes ends the audio
    early (a complete file of what was made, logged); the client going away stops the generation."""
    enc = encoder(body.response_format)
    sse = body.stream_format == "sse"

    def out(data: bytes) -> bytes:
        if not sse or not data:
            return data
        return _sse({"type": "speech.audio.delta", "audio": base64.b64encode(data).decode()})

    try:
        if data := out(enc.push(first)):
            yield data
        try:
            async for pcm in speech.rest():
                if data := out(enc.push(pcm)):
                    yield data
        except Exception:
            log.exception("speech %s: failed after %d frames; the audio ends", speech.key, speech.frames)
        if data := out(enc.finish()):
            yield data
        if sse:
            yield _sse({"type": "speech.audio.done", "usage": speech.usage()})
    finally:
        await speech.close()
        release()
