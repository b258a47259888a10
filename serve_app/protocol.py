"""The realtime wire protocol: one pydantic class per event, client events parsed once, strictly.

We speak a subset of the OpenAI Realtime API (GA event names and shapes) so that existing clients,
the official ``openai`` Python package's ``client.realtime.connect(...)`` included, work unchanged.
Everything the server sends or accepts over the socket is defined here and nowhere else; the
connection loop only calls :func:`parse_client_event` and ``ServerEvent.to_json()``.

Client → server (the :data:`ClientEvent` union, discriminated on ``type``)::

    session.update             SessionUpdate            partial update of the session (see below)
    input_audio_buffer.append  InputAudioBufferAppend   base64 PCM16 mono 24 kHz, decoded once here
    input_audio_buffer.commit  InputAudioBufferCommit
    input_audio_buffer.clear   InputAudioBufferClear
    conversation.item.create   ConversationItemCreate   a typed text message (role user or system)
    conversation.item.truncate ConversationItemTruncate what was actually heard after a barge-in
    response.create            ResponseCreate
    response.cancel            ResponseCancel

Server → client: one :class:`ServerEvent` subclass per GA event (``session.created``,
``response.output_audio.delta``, ``error``, ...). Each instance gets a fresh ``event_id`` and is
serialized with :meth:`ServerEvent.to_json`, which keeps ``null`` fields: in this protocol a null is
meaningful (``turn_detection: null`` means push-to-talk, ``error.param: null`` means "no field").

Parsing rules (why: a bad message must cost one ``error`` event, never the conversation):

- Strict: a wrong JSON type is an error, never coerced (``"5"`` is not an integer, ``1`` is not
  ``true``); NaN and infinities are rejected.
- Unknown parameters are refused, as OpenAI refuses them: an ``unknown_parameter`` error
  (``invalid_request_error``) naming the parameter (``param: "session.voice"``), and nothing of the
  event is applied; the conversation goes on. The beta API's names (``session.voice``,
  ``session.modalities``, ``session.turn_detection``, ...) are not aliases: the error names the GA
  place instead (``session.audio.output.voice``). Fields of the GA schema that this server does not
  implement (``tools``, ``tracing``, ``noise_reduction``, ...) are accepted and ignored
  (:data:`Ignored`), so a client that sends the openai package's optional fields still works; in
  ``response.create``, which asks for one reply, they are refused instead (:data:`Refused`: an
  ``unsupported_feature`` error naming the field), since a reply without the tools or input asked for
  would be a silent wrong answer. ``tests/test_protocol_conformance.py`` checks every model's fields
  against that package's types.
- The size limit is checked before any JSON is parsed; audio is base64-decoded during validation
  and kept as bytes (``InputAudioBufferAppend.audio``), so nothing is decoded twice.
- Any bad input raises :class:`ProtocolError` (code, message, param, the client's event_id) and
  nothing else; ``ProtocolError.to_event()`` is the ``error`` event to send back.

Audio: only ``{"type": "audio/pcm", "rate": 24000}`` (PCM16 little-endian, mono) in either direction,
Mimi's native rate, so nothing is resampled on the hot path. Other formats or rates are an
``unsupported_format`` error.

Extension: ``session.x-sampling`` (also accepted as ``response.x-sampling`` for one reply) carries
CSM's sampling knobs, named like the design's ``x-`` extension events so that no OpenAI field is
ever shadowed::

    {"type": "session.update", "session": {"x-sampling":
        {"temperature": 0.9, "top_k": 50, "seed": 7, "max_reply_seconds": 30}}}

``temperature`` 0–2, ``top_k`` 1–256 (the engine's `MAX_TOP_K` candidates per draw), ``seed`` a
non-negative 63-bit integer or null (random), ``max_reply_seconds`` in (0, 120] (the server may clamp it
further).

Error codes (``error.code``; ``error.type`` is ``server_error`` for the server's own faults and
``invalid_request_error`` otherwise) are the :data:`ErrorCode` literals.

What the official openai client needs from the server (openai-python's realtime resource):

- It connects to ``{base_url with ws/wss scheme}/realtime?model=<model>`` (``websocket_base_url``
  overrides the base), so ``OpenAI(base_url="http://host:8000/v1")`` reaches ``/v1/realtime``. It sends
  ``Authorization: Bearer <api_key>`` (an api_key is required to build the client, any string works)
  plus the package's default headers; no ``OpenAI-Beta`` header, no subprotocol, no compression.
- It parses every incoming text or binary frame with ``json.loads`` and ``construct`` (no
  validation): any JSON object with a ``type`` is delivered, ``x-`` events included; a frame that
  is not JSON raises in the client. It requires no particular first event, but real servers
  send ``session.created`` at once, and so should we. ``dispatch_events()`` raises on an ``error``
  event unless the application registered an ``error`` handler.
- It reconnects (only when the application asks for it) after close codes 1001, 1005, 1006, 1011,
  1012, 1013, 1015; other close codes, 1000 and 1008 included, end the session for good.
"""

from __future__ import annotations

import base64
import binascii
import re
import secrets
from typing import Annotated, Any, Literal, Self, TypeVar, get_args

import numpy as np
import pydantic_core
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    PlainValidator,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    model_validator,
)
from pydantic_core import PydanticCustomError

from csm.audio import SAMPLE_RATE  # all audio on the wire, both directions, is at Mimi's rate
from csm.sampling import MAX_TOP_K, TEMPERATURE, TOP_K
from speech.vad import PREFIX_PADDING_MS, SILENCE_DURATION_MS, THRESHOLD, PaddingMs, SilenceMs, Threshold

AUDIO_FORMAT = "audio/pcm"
"""The only audio format: signed 16-bit little-endian mono PCM."""
DEFAULT_MAX_MESSAGE_BYTES = 128 * 1024
"""API Gateway's WebSocket message limit; the direct socket uses the same so both paths agree."""
SEQ_FIELD = "x-seq"
"""A client event's number (our extension: OpenAI's protocol has none); see ``_ClientEvent.x_seq``."""
DEFAULT_MODEL = "csm-1b"
DEFAULT_VOICE = "default"

ErrorCode = Literal[
    "invalid_json",  # not JSON, not UTF-8, or nested too deeply
    "unknown_parameter",  # a field that is not in the GA schema (a typo, or a beta API name)
    "unknown_event",  # `type` names no event this server accepts
    "invalid_event",  # not an object, no `type`, or a field has the wrong type or value
    "invalid_audio",  # audio is not base64, or not whole 16-bit samples
    "message_too_large",  # message, or the audio in one append, over its limit
    "unsupported_format",  # an audio format other than audio/pcm at 24000 Hz
    "unsupported_feature",  # valid OpenAI input this server does not do (semantic_vad, input_audio, ...)
    "item_not_found",  # an item_id that is not in the conversation
    "empty_buffer",  # commit with no audio, response.create with nothing to reply to
    "response_in_progress",  # response.create while a response is running
    "no_active_response",  # response.cancel with nothing to cancel
    "limit_exceeded",  # audio seconds per turn, reply length, conversation length
    "rate_limited",  # too many events per second
    "server_busy",  # admission control: no capacity for another conversation
    "unauthorized",  # missing or wrong token
    "response_failed",  # generation failed (a replica died); the conversation goes on
    "internal_error",  # a bug; the message says nothing secret
    "service_unavailable",  # the bridge could not reach the server (down, slow, or restarted)
    "conversation_not_found",  # resume of an id that is not this principal's (or does not exist: the same)
    "conversation_taken_over",  # the conversation was opened on a newer connection; this one closes (4001)
]
ERROR_CODES: frozenset[str] = frozenset(get_args(ErrorCode))
_SERVER_FAULTS = frozenset({"server_busy", "response_failed", "internal_error", "service_unavailable"})


def new_id(prefix: str) -> str:
    """A fresh random id such as ``event_3f9c...``; prefixes follow OpenAI's (event, item, resp, sess)."""
    return f"{prefix}_{secrets.token_hex(10)}"


def _error(code: str, message: str) -> PydanticCustomError:
    """A validation error whose pydantic type is our error code (so it maps straight to ``error.code``).

    The text goes through the context, never the template, so braces in client input stay inert.
    """
    return PydanticCustomError(code, "{message}", {"message": message})


def _supported(*allowed: str) -> BeforeValidator:
    """Turn a known-but-unsupported string value into an ``unsupported_feature`` error.

    Non-strings fall through to the field's own (Literal) validation, which reports the type.
    """

    def check(value: object) -> object:
        if isinstance(value, str) and value not in allowed:
            expected = " or ".join(repr(a) for a in allowed)
            raise _error("unsupported_feature", f"{value[:64]!r} is not supported; use {expected}")
        return value

    return BeforeValidator(check)


def _server_id(value: object) -> None:
    if value is not None:
        raise _error("invalid_event", "item ids are assigned by the server: leave item.id out")
    return None


# ---------------------------------------------------------------------------------------------
# Shared shapes: the session object is both what a client sends (partially) and what we echo.


class _ClientModel(BaseModel):
    """Strict: wrong JSON types are errors, never coerced; unknown fields are errors (``Ignored`` fields
    name the GA ones that are accepted and do nothing).

    Frozen, because sessions share nested objects between versions (``apply`` copies shallowly).
    """

    model_config = ConfigDict(
        strict=True, extra="forbid", allow_inf_nan=False, populate_by_name=True, frozen=True
    )


# A GA field this server accepts and ignores (any value; never echoed back).
Ignored = Annotated[Any, Field(None, exclude=True)]

# The beta API's names, refused with where the GA API has them (OpenAI's beta → GA migration).
_BETA_NAMES = {
    "session.voice": "session.audio.output.voice",
    "session.modalities": "session.output_modalities",
    "session.input_audio_format": "session.audio.input.format",
    "session.output_audio_format": "session.audio.output.format",
    "session.turn_detection": "session.audio.input.turn_detection",
    "session.input_audio_transcription": "session.audio.input.transcription",
    "session.input_audio_noise_reduction": "session.audio.input.noise_reduction",
    "session.speed": "session.audio.output.speed",
    "session.temperature": "session.x-sampling.temperature",
    "session.max_response_output_tokens": "session.max_output_tokens",
    "response.modalities": "response.output_modalities",
    "response.voice": "response.audio.output.voice",
    "response.output_audio_format": "response.audio.output.format",
    "response.temperature": "response.x-sampling.temperature",
    "response.max_response_output_tokens": "response.max_output_tokens",
}


class AudioFormat(_ClientModel):
    """``{"type": "audio/pcm", "rate": 24000}``, the only format; both keys may be omitted."""

    type: str = AUDIO_FORMAT
    rate: int = SAMPLE_RATE

    @model_validator(mode="after")
    def _only_pcm_24k(self) -> Self:
        if self.type != AUDIO_FORMAT or self.rate != SAMPLE_RATE:
            got = f"{self.type[:64]!r} at {str(self.rate)[:16]} Hz"
            raise _error(
                "unsupported_format", f"only {AUDIO_FORMAT} at {SAMPLE_RATE} Hz is supported, got {got}"
            )
        return self


class ServerVad(_ClientModel):
    """Server-side end-of-turn detection; ``null`` in its place means the client commits turns itself."""

    type: Annotated[Literal["server_vad"], _supported("server_vad")] = "server_vad"
    threshold: Threshold = THRESHOLD
    prefix_padding_ms: PaddingMs = PREFIX_PADDING_MS
    silence_duration_ms: SilenceMs = SILENCE_DURATION_MS
    create_response: bool = True
    interrupt_response: bool = True
    idle_timeout_ms: Ignored


class InputTranscription(_ClientModel):
    """Transcription of the person's audio; ``model`` is accepted but the server's ASR is used."""

    model: str | None = None
    language: str | None = None
    prompt: str | None = None
    delay: Ignored
    keywords: Ignored
    languages: Ignored


class AudioInput(_ClientModel):
    format: AudioFormat = Field(default_factory=AudioFormat)
    turn_detection: ServerVad | None = Field(default_factory=ServerVad)
    transcription: InputTranscription | None = Field(default_factory=InputTranscription)
    noise_reduction: Ignored


_VOICE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def _voice_name(value: object) -> str:
    """A voice is a name (it picks a reference segment on the server); ``{"id": name}`` is accepted too.

    The character set keeps a name safe to use as a file name: no separators, no leading dot.
    """
    if isinstance(value, dict) and set(value) == {"id"}:
        value = value["id"]
    if not isinstance(value, str):
        raise _error("string_type", "should be a string")
    if not _VOICE_NAME.fullmatch(value):
        raise _error("voice_name", f"{value[:64]!r} is not a voice name (letters, digits, '_', '-', '.')")
    return value


VoiceName = Annotated[str, PlainValidator(_voice_name)]


class AudioOutput(_ClientModel):
    format: AudioFormat = Field(default_factory=AudioFormat)
    voice: VoiceName = DEFAULT_VOICE
    speed: float = Field(1.0, ge=0.25, le=1.5)


class AudioConfig(_ClientModel):
    input: AudioInput = Field(default_factory=AudioInput)
    output: AudioOutput = Field(default_factory=AudioOutput)


class Sampling(_ClientModel):
    """CSM's sampling knobs, our ``x-sampling`` extension (the reference's defaults, `csm.sampling`)."""

    temperature: float = Field(TEMPERATURE, ge=0.0, le=2.0)
    top_k: int = Field(TOP_K, ge=1, le=MAX_TOP_K)
    seed: int | None = Field(None, ge=0, lt=2**63)
    max_reply_seconds: float = Field(30.0, gt=0.0, le=120.0)


def _max_output_tokens(value: object) -> int | str:
    # One custom check instead of `int | Literal["inf"]`, whose union would report two errors.
    if value == "inf" or (type(value) is int and 1 <= value <= 4096):
        return value  # type: ignore[return-value]
    raise _error("max_output_tokens", "should be an integer from 1 to 4096 or 'inf'")


MaxOutputTokens = Annotated[int | Literal["inf"], PlainValidator(_max_output_tokens)]
OutputModality = Annotated[Literal["audio"], _supported("audio")]


class SessionConfig(_ClientModel):
    """The settable part of the GA ``session`` object; in ``session.update`` every field is optional.

    Only the fields a client sent are applied (``model_fields_set``, recursively): see
    :meth:`RealtimeSession.apply`.
    """

    type: Annotated[Literal["realtime"], _supported("realtime")] = "realtime"
    instructions: str = ""
    output_modalities: list[OutputModality] = Field(default_factory=lambda: ["audio"], min_length=1)
    max_output_tokens: MaxOutputTokens = "inf"
    audio: AudioConfig = Field(default_factory=AudioConfig)
    x_sampling: Sampling = Field(default_factory=Sampling, alias="x-sampling")
    # GA, not done here: tools, prompts, tracing (the model is the server's; `RealtimeSession.model`).
    model: Ignored
    include: Ignored
    parallel_tool_calls: Ignored
    prompt: Ignored
    reasoning: Ignored
    tool_choice: Ignored
    tools: Ignored
    tracing: Ignored
    truncation: Ignored


_M = TypeVar("_M", bound=BaseModel)


def merge_update(current: _M, update: BaseModel) -> _M:
    """``current`` with the fields the client actually sent in ``update``, nested models merged.

    Partial-update semantics for everything a client may send partially: ``session.update``
    (see :meth:`RealtimeSession.apply`) and per-response overrides such as
    ``merge_update(session.x_sampling, params.x_sampling)``, where ``{"top_k": 5}`` keeps the
    session's temperature instead of resetting it to the default.
    """
    changes: dict[str, Any] = {}
    for name in update.model_fields_set:
        if type(update).model_fields[name].exclude:  # an `Ignored` GA field: it changes nothing
            continue
        new, old = getattr(update, name), getattr(current, name)
        if isinstance(new, BaseModel) and type(old) is type(new):
            new = merge_update(old, new)
        changes[name] = new
    return current.model_copy(update=changes)


class RealtimeSession(SessionConfig):
    """The full session as the server sends it in ``session.created`` / ``session.updated``."""

    id: str = Field(default_factory=lambda: new_id("sess"))
    object: Literal["realtime.session"] = "realtime.session"
    model: str = DEFAULT_MODEL

    def apply(self, update: SessionConfig) -> RealtimeSession:
        """The session after a ``session.update``: only the fields present in it change.

        Nested objects merge (sending ``{"audio": {"output": {"voice": "x"}}}`` keeps the format and
        speed); an explicit ``null`` (``turn_detection``, ``transcription``) switches the thing off.
        """
        return merge_update(self, update)


# ---------------------------------------------------------------------------------------------
# Client → server events.


class _ClientEvent(_ClientModel):
    event_id: str | None = None
    """Optional client-chosen id, echoed in ``error.event_id`` when this event is rejected."""
    x_seq: int | None = Field(None, alias=SEQ_FIELD, ge=1)
    """Our extension: the client's number for this event (1, 2, ... per connection), by which the ingress
    puts events back in order when they arrive out of it (``serve_app.ordering``); none: arrival order."""


class SessionUpdate(_ClientEvent):
    type: Literal["session.update"] = "session.update"
    session: SessionConfig


def _decode_pcm16(value: object, info: ValidationInfo) -> bytes:
    """Base64 → PCM16 bytes, checked: strict alphabet and padding, whole samples, size cap.

    ``info.context["max_audio_bytes"]`` (set by :func:`parse_client_event`) caps one append.
    """
    if isinstance(value, str):
        try:
            value = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise _error("invalid_audio", f"not valid base64 ({exc})") from None
    elif not isinstance(value, bytes):
        raise _error("string_type", "should be a base64 string")
    if len(value) % 2:
        raise _error("invalid_audio", f"{len(value)} bytes is not a whole number of 16-bit samples")
    limit = (info.context or {}).get("max_audio_bytes")
    if limit is not None and len(value) > limit:
        raise _error("message_too_large", f"{len(value)} bytes of audio; at most {limit} per append")
    return value


Pcm16Base64 = Annotated[
    bytes,
    BeforeValidator(_decode_pcm16),
    PlainSerializer(lambda pcm: base64.b64encode(pcm).decode("ascii"), return_type=str),
]


class InputAudioBufferAppend(_ClientEvent):
    """A chunk of the person's audio; after validation ``audio`` holds the decoded PCM16 bytes."""

    type: Literal["input_audio_buffer.append"] = "input_audio_buffer.append"
    audio: Pcm16Base64 = Field(repr=False)  # kept out of log lines

    @property
    def samples(self) -> np.ndarray:
        """The audio as int16 samples: a read-only view of ``audio``, no copy."""
        return np.frombuffer(self.audio, dtype="<i2")

    @property
    def duration_ms(self) -> float:
        return len(self.audio) / 2 / SAMPLE_RATE * 1000


class InputAudioBufferCommit(_ClientEvent):
    type: Literal["input_audio_buffer.commit"] = "input_audio_buffer.commit"


class InputAudioBufferClear(_ClientEvent):
    type: Literal["input_audio_buffer.clear"] = "input_audio_buffer.clear"


class InputText(_ClientModel):
    """A text content part (also used in the items the server sends back)."""

    type: Annotated[Literal["input_text"], _supported("input_text")] = "input_text"
    text: str
    # GA fields of other content types (input_audio, input_image): their `type` is refused first.
    audio: Ignored
    detail: Ignored
    image_url: Ignored
    transcript: Ignored


class InputMessage(_ClientModel):
    """A message item created by the client: typed text from the person, or a system note.

    Audio content is not accepted here (send it through the input audio buffer); assistant
    messages are not accepted (CSM would have to speak them to keep its context consistent).
    """

    # Item ids are the server's: a client's own id could collide with (and, on reload, replace) a turn.
    id: Annotated[None, BeforeValidator(_server_id)] = None
    type: Annotated[Literal["message"], _supported("message")] = "message"
    role: Annotated[Literal["user", "system"], _supported("user", "system")]
    content: list[InputText] = Field(min_length=1)
    object: Ignored
    status: Ignored

    @property
    def text(self) -> str:
        return "\n".join(part.text for part in self.content)

    def to_item(self) -> Item:
        """The conversation item to echo in ``conversation.item.added`` / ``.done``."""
        return Item(id=new_id("item"), role=self.role, content=list(self.content))


class ConversationItemCreate(_ClientEvent):
    type: Literal["conversation.item.create"] = "conversation.item.create"
    previous_item_id: str | None = None
    item: InputMessage


class ConversationItemTruncate(_ClientEvent):
    """After a barge-in: only the first ``audio_end_ms`` of the assistant's item was heard."""

    type: Literal["conversation.item.truncate"] = "conversation.item.truncate"
    item_id: str = Field(min_length=1)
    content_index: int = Field(ge=0)
    audio_end_ms: int = Field(ge=0)


class ResponseAudioOutput(_ClientModel):
    format: AudioFormat | None = None
    voice: VoiceName | None = None


class ResponseAudio(_ClientModel):
    output: ResponseAudioOutput | None = None


def _metadata(value: dict[str, str]) -> dict[str, str]:
    # OpenAI's limits on `metadata`: 16 pairs, keys up to 64 characters, values up to 512.
    if len(value) > 16:
        raise _error("invalid_event", f"metadata holds at most 16 pairs, got {len(value)}")
    for key, text in value.items():
        if len(key) > 64 or len(text) > 512:
            raise _error(
                "invalid_event", f"metadata {key[:64]!r}: keys up to 64 characters, values up to 512"
            )
    return value


Metadata = Annotated[dict[str, str], AfterValidator(_metadata)]


def _refused(value: object) -> None:
    if value is None:
        return None
    raise _error("unsupported_feature", "not supported by this server; leave it out")


# A GA field of ``response.create`` this server does not do: any value but null is an ``unsupported_feature``
# error naming it (``param: "response.tools"``), rather than a reply made without it (even ``input: []``
# asks for something: an empty context).
Refused = Annotated[Any, PlainValidator(_refused), Field(None, exclude=True)]


class ResponseParams(_ClientModel):
    """Per-response overrides in ``response.create``; unset fields use the session's values.

    ``audio.output.voice`` speaks this reply in another voice; ``metadata`` is echoed on the response;
    ``max_output_tokens`` (here and in the session) caps the reply's audio frames, one token a frame (80 ms),
    under ``x-sampling.max_reply_seconds``; ``conversation`` is only ``auto``, ``output_modalities`` only
    ``["audio"]``. Tools, prompts, reasoning and out-of-band input are refused (:data:`Refused`).
    """

    instructions: str | None = None
    conversation: Annotated[Literal["auto"], _supported("auto")] | None = None
    output_modalities: list[OutputModality] | None = Field(None, min_length=1)
    max_output_tokens: MaxOutputTokens | None = None
    audio: ResponseAudio | None = None
    metadata: Metadata | None = None
    x_sampling: Sampling | None = Field(None, alias="x-sampling")
    input: Refused
    parallel_tool_calls: Refused
    prompt: Refused
    reasoning: Refused
    tool_choice: Refused
    tools: Refused


class ResponseCreate(_ClientEvent):
    type: Literal["response.create"] = "response.create"
    response: ResponseParams | None = None


class ResponseCancel(_ClientEvent):
    type: Literal["response.cancel"] = "response.cancel"
    response_id: str | None = None


ClientEvent = Annotated[
    SessionUpdate
    | InputAudioBufferAppend
    | InputAudioBufferCommit
    | InputAudioBufferClear
    | ConversationItemCreate
    | ConversationItemTruncate
    | ResponseCreate
    | ResponseCancel,
    Field(discriminator="type"),
]
_CLIENT_EVENTS: TypeAdapter[ClientEvent] = TypeAdapter(ClientEvent)
CLIENT_EVENT_TYPES: tuple[str, ...] = tuple(
    cls.model_fields["type"].default for cls in get_args(get_args(ClientEvent)[0])
)
# Real OpenAI events this server does not implement: named as such rather than "unknown".
_UNSUPPORTED_EVENT_TYPES = frozenset(
    {
        "conversation.item.delete",
        "conversation.item.retrieve",
        "output_audio_buffer.clear",
        "transcription_session.update",
    }
)


# ---------------------------------------------------------------------------------------------
# Server → client events.


class _ServerModel(BaseModel):
    model_config = ConfigDict(populate_by_name=True)


class ServerEvent(_ServerModel):
    """Base of every event the server sends; each instance gets a fresh ``event_id``."""

    event_id: str = Field(default_factory=lambda: new_id("event"))

    def to_json(self) -> str:
        """The wire form. Nulls are kept: they carry meaning (VAD off, no param) and match OpenAI."""
        return self.model_dump_json(by_alias=True)


class InputAudio(_ServerModel):
    type: Literal["input_audio"] = "input_audio"
    transcript: str | None = None


class OutputAudio(_ServerModel):
    type: Literal["output_audio"] = "output_audio"
    transcript: str = ""


class Item(_ServerModel):
    """A conversation item as the server reports it (user turn, typed text, assistant reply)."""

    id: str = Field(default_factory=lambda: new_id("item"))
    object: Literal["realtime.item"] = "realtime.item"
    type: Literal["message"] = "message"
    status: Literal["completed", "incomplete", "in_progress"] = "completed"
    role: Literal["user", "assistant", "system"]
    content: list[InputText | InputAudio | OutputAudio]


class AudioPart(_ServerModel):
    """The content part in ``response.content_part.*`` (GA calls it ``audio`` there)."""

    type: Literal["audio"] = "audio"
    transcript: str = ""


class ResponseError(_ServerModel):
    type: str
    code: str | None = None
    message: str | None = None


class ResponseStatusDetails(_ServerModel):
    """Why a response ended other than ``completed``: ``cancelled`` (turn_detected/client_cancelled),
    ``incomplete`` (max_output_tokens), or ``failed`` (with ``error``)."""

    type: Literal["completed", "cancelled", "incomplete", "failed"]
    reason: Literal["turn_detected", "client_cancelled", "max_output_tokens", "content_filter"] | None = None
    error: ResponseError | None = None


class PromptRows(_ServerModel):
    """Our ``x-prompt`` extension on ``response.done``: CSM prompt rows of the reply's sentences, and how
    they were paid for. ``reused_rows`` came from the generator's KV cache (the conversation's earlier
    replies, a voice's shared prefix); only ``prefilled_rows`` were computed."""

    rows: int
    reused_rows: int
    prefilled_rows: int
    sentences: int

    @classmethod
    def of(cls, prompts: list[tuple[int, int]]) -> PromptRows:
        """From (rows, reused rows) per sentence."""
        rows, reused = sum(r for r, _ in prompts), sum(u for _, u in prompts)
        return cls(rows=rows, reused_rows=reused, prefilled_rows=rows - reused, sentences=len(prompts))


class RealtimeResponse(_ServerModel):
    """The ``response`` object of ``response.created`` (in_progress) and ``response.done``."""

    id: str = Field(default_factory=lambda: new_id("resp"))
    object: Literal["realtime.response"] = "realtime.response"
    status: Literal["in_progress", "completed", "cancelled", "failed", "incomplete"] = "in_progress"
    status_details: ResponseStatusDetails | None = None
    output: list[Item] = Field(default_factory=list)
    conversation_id: str | None = None
    output_modalities: list[Literal["audio"]] = Field(default_factory=lambda: ["audio"])
    max_output_tokens: int | Literal["inf"] = "inf"
    audio: ResponseAudio | None = None
    metadata: dict[str, str] | None = None
    x_prompt: PromptRows | None = Field(None, alias="x-prompt")


class TranscriptionUsage(_ServerModel):
    type: Literal["duration"] = "duration"
    seconds: float


class SessionCreated(ServerEvent):
    type: Literal["session.created"] = "session.created"
    session: RealtimeSession


class SessionUpdated(ServerEvent):
    type: Literal["session.updated"] = "session.updated"
    session: RealtimeSession


class InputAudioBufferSpeechStarted(ServerEvent):
    type: Literal["input_audio_buffer.speech_started"] = "input_audio_buffer.speech_started"
    audio_start_ms: int
    item_id: str


class InputAudioBufferSpeechStopped(ServerEvent):
    type: Literal["input_audio_buffer.speech_stopped"] = "input_audio_buffer.speech_stopped"
    audio_end_ms: int
    item_id: str


class InputAudioBufferCommitted(ServerEvent):
    type: Literal["input_audio_buffer.committed"] = "input_audio_buffer.committed"
    item_id: str
    previous_item_id: str | None = None


class InputAudioBufferCleared(ServerEvent):
    type: Literal["input_audio_buffer.cleared"] = "input_audio_buffer.cleared"


class ConversationItemAdded(ServerEvent):
    type: Literal["conversation.item.added"] = "conversation.item.added"
    item: Item
    previous_item_id: str | None = None


class ConversationItemDone(ServerEvent):
    type: Literal["conversation.item.done"] = "conversation.item.done"
    item: Item
    previous_item_id: str | None = None


class ConversationItemInputAudioTranscriptionDelta(ServerEvent):
    """Words of the person's turn recognized while they speak: each delta appends to the ones before.
    Only words two successive hypotheses agree on are sent, so a delta is never taken back; the
    `completed` event's transcript is the final word (it may still differ at the end)."""

    type: Literal["conversation.item.input_audio_transcription.delta"] = (
        "conversation.item.input_audio_transcription.delta"
    )
    item_id: str
    content_index: int = 0
    delta: str


class ConversationItemInputAudioTranscriptionCompleted(ServerEvent):
    type: Literal["conversation.item.input_audio_transcription.completed"] = (
        "conversation.item.input_audio_transcription.completed"
    )
    item_id: str
    content_index: int = 0
    transcript: str
    usage: TranscriptionUsage


class ConversationItemTruncated(ServerEvent):
    type: Literal["conversation.item.truncated"] = "conversation.item.truncated"
    item_id: str
    content_index: int = 0
    audio_end_ms: int


class ResponseCreated(ServerEvent):
    type: Literal["response.created"] = "response.created"
    response: RealtimeResponse


class ResponseOutputItemAdded(ServerEvent):
    type: Literal["response.output_item.added"] = "response.output_item.added"
    response_id: str
    output_index: int = 0
    item: Item


class ResponseOutputItemDone(ServerEvent):
    type: Literal["response.output_item.done"] = "response.output_item.done"
    response_id: str
    output_index: int = 0
    item: Item


class ResponseContentPartAdded(ServerEvent):
    type: Literal["response.content_part.added"] = "response.content_part.added"
    response_id: str
    item_id: str
    output_index: int = 0
    content_index: int = 0
    part: AudioPart = Field(default_factory=AudioPart)


class ResponseContentPartDone(ServerEvent):
    type: Literal["response.content_part.done"] = "response.content_part.done"
    response_id: str
    item_id: str
    output_index: int = 0
    content_index: int = 0
    part: AudioPart


class ResponseOutputAudioTranscriptDelta(ServerEvent):
    type: Literal["response.output_audio_transcript.delta"] = "response.output_audio_transcript.delta"
    response_id: str
    item_id: str
    output_index: int = 0
    content_index: int = 0
    delta: str


class ResponseOutputAudioTranscriptDone(ServerEvent):
    type: Literal["response.output_audio_transcript.done"] = "response.output_audio_transcript.done"
    response_id: str
    item_id: str
    output_index: int = 0
    content_index: int = 0
    transcript: str


class ResponseOutputAudioDelta(ServerEvent):
    """A chunk of the reply: ``delta`` is base64 PCM16 (build it with :func:`encode_pcm16`)."""

    type: Literal["response.output_audio.delta"] = "response.output_audio.delta"
    response_id: str
    item_id: str
    output_index: int = 0
    content_index: int = 0
    delta: str


class ResponseOutputAudioDone(ServerEvent):
    type: Literal["response.output_audio.done"] = "response.output_audio.done"
    response_id: str
    item_id: str
    output_index: int = 0
    content_index: int = 0


class ResponseDone(ServerEvent):
    type: Literal["response.done"] = "response.done"
    response: RealtimeResponse


def item_created(item: Item, previous_item_id: str | None, *between: ServerEvent) -> list[ServerEvent]:
    """A conversation item the server adds (a typed message, the person's turn): ``conversation.item.added``,
    what comes between (the turn's transcript), ``conversation.item.done``."""
    added = ConversationItemAdded(item=item, previous_item_id=previous_item_id)
    return [added, *between, ConversationItemDone(item=item, previous_item_id=previous_item_id)]


def output_started(response_id: str, item: Item) -> list[ServerEvent]:
    """A reply's item and its one audio content part, opened before the first delta."""
    return [
        ResponseOutputItemAdded(response_id=response_id, item=item),
        ResponseContentPartAdded(response_id=response_id, item_id=item.id),
    ]


def output_done(response_id: str, item: Item, transcript: str) -> list[ServerEvent]:
    """What `output_started` opened, closed in reverse order (the audio, its transcript, the part, the item);
    `response.done` follows."""
    return [
        ResponseOutputAudioDone(response_id=response_id, item_id=item.id),
        ResponseOutputAudioTranscriptDone(response_id=response_id, item_id=item.id, transcript=transcript),
        ResponseContentPartDone(
            response_id=response_id, item_id=item.id, part=AudioPart(transcript=transcript)
        ),
        ResponseOutputItemDone(response_id=response_id, item=item),
    ]


class ErrorDetail(_ServerModel):
    type: Literal["invalid_request_error", "server_error"]
    code: ErrorCode
    message: str
    param: str | None = None
    event_id: str | None = None
    """The ``event_id`` of the client event that caused this error, when it had one."""


class CacheBudget(_ServerModel):
    """What the generator keeps of a conversation between replies (its KV cache), in `x-server.info`."""

    enabled: bool
    slots: int  # sequences on the device at once, running or parked
    slot_rows: int  # prompt rows one slot holds
    kv_bytes_per_row: int
    host_budget_bytes: int  # host memory for KV evicted from the device

    @classmethod
    def of(cls, info: dict) -> CacheBudget:
        return cls.model_validate({k: info[k] for k in cls.model_fields})


class ServerInfo(ServerEvent):
    """``x-server.info``, our extension, sent right after ``session.created``: what a page shows before
    the first turn (the voices to pick from, and loudly, whether the weights are random noise). It
    travels on the socket so that a page that reaches the server only through API Gateway gets it too.
    """

    type: Literal["x-server.info"] = "x-server.info"
    conversation_id: str  # reconnect with ``?conversation_id=`` to carry on with the same history
    voices: list[str]
    default_voice: str
    random_weights: bool
    max_reply_seconds: float
    replica: str  # the ingress replica holding the conversation: for logs, support and fault tests
    cache: CacheBudget | None = None  # one generator replica's KV cache (every replica runs the same config)


class ErrorEvent(ServerEvent):
    type: Literal["error"] = "error"
    error: ErrorDetail


def error_event(
    code: ErrorCode, message: str, *, param: str | None = None, event_id: str | None = None
) -> ErrorEvent:
    """The ``error`` event for ``code``; ``event_id`` is the offending client event's id, if any."""
    kind = "server_error" if code in _SERVER_FAULTS else "invalid_request_error"
    detail = ErrorDetail(type=kind, code=code, message=message, param=param, event_id=event_id)
    return ErrorEvent(error=detail)


def encode_pcm16(samples: np.ndarray | bytes) -> str:
    """Base64 of PCM16 little-endian audio, for ``response.output_audio.delta``.

    Takes int16 samples (any shape, flattened) or raw bytes; float audio must be converted by the
    caller, because clipping and scaling are a decoder decision, not a protocol one.
    """
    if isinstance(samples, np.ndarray):
        if samples.dtype != np.int16:
            raise TypeError(f"expected int16 samples, got {samples.dtype}")
        samples = np.ascontiguousarray(samples, dtype="<i2").tobytes()
    return base64.b64encode(samples).decode("ascii")


def decode_pcm16(data: str) -> np.ndarray:
    """Inverse of :func:`encode_pcm16` (for clients and tests): base64 → int16 samples."""
    return np.frombuffer(base64.b64decode(data, validate=True), dtype="<i2")


# ---------------------------------------------------------------------------------------------
# Parsing.


class ProtocolError(Exception):
    """A client message the server rejects; becomes one ``error`` event, and the connection goes on."""

    def __init__(
        self, code: ErrorCode, message: str, param: str | None = None, event_id: str | None = None
    ) -> None:
        super().__init__(message)
        self.code: ErrorCode = code
        self.message = message
        self.param = param
        self.event_id = event_id

    def __repr__(self) -> str:
        details = f"param={self.param!r}, event_id={self.event_id!r}"
        return f"ProtocolError({self.code!r}, {self.message!r}, {details})"

    def to_event(self) -> ErrorEvent:
        return error_event(self.code, self.message, param=self.param, event_id=self.event_id)


def parse_client_event(
    raw: str | bytes, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, *, max_audio_bytes: int | None = None
) -> ClientEvent:
    """One WebSocket text (or binary) message → one validated client event.

    Raises only :class:`ProtocolError`, for any input. ``max_bytes`` bounds the UTF-8 size of the
    message and is checked before parsing; ``max_audio_bytes`` bounds the decoded audio of one append.
    """
    if not isinstance(raw, str | bytes):
        raw = bytes(raw) if isinstance(raw, bytearray | memoryview) else str(raw)
    size = _utf8_size(raw, max_bytes)
    if size > max_bytes:
        raise ProtocolError("message_too_large", f"message is {size} bytes; the limit is {max_bytes}")
    try:
        return _CLIENT_EVENTS.validate_json(raw, context={"max_audio_bytes": max_audio_bytes})
    except ValidationError as exc:
        raise _to_protocol_error(raw, exc) from None
    except (ValueError, TypeError, RecursionError, OverflowError) as exc:  # pragma: no cover - safety net
        raise ProtocolError("invalid_event", f"could not parse message ({type(exc).__name__})") from None


def sequence_number(raw: str | bytes) -> int | None:
    """The ``x-seq`` of a message that was not taken (unparsable, or dropped as over the rate), so that
    the events after it need not wait for it; None when it has none."""
    try:
        message = pydantic_core.from_json(raw)
    except ValueError:
        return None
    seq = message.get(SEQ_FIELD) if isinstance(message, dict) else None
    return seq if type(seq) is int and seq >= 1 else None


def _utf8_size(raw: str | bytes, limit: int) -> int:
    """Bytes on the wire; a str longer than the limit is over it without encoding it."""
    if isinstance(raw, bytes) or len(raw) > limit or raw.isascii():
        return len(raw)
    return len(raw.encode("utf-8", "surrogatepass"))


_JSON_TYPE_NAMES = {dict: "object", list: "array", str: "string", int: "number", float: "number"}


def _to_protocol_error(raw: str | bytes, exc: ValidationError) -> ProtocolError:
    """Name the first problem concisely: what, where (``param``), and the client's event_id."""
    errors = exc.errors(include_url=False, include_input=False)
    first = errors[0]
    kind, loc = first["type"], first["loc"]
    if kind in ("json_invalid", "string_unicode"):
        if isinstance(raw, bytes) and not _is_utf8(raw):
            return ProtocolError("invalid_json", "message is not valid UTF-8")
        detail = (first.get("ctx") or {}).get("error", "not valid Unicode text")
        return ProtocolError("invalid_json", f"invalid JSON: {detail}")

    try:  # Error path only: the same parser, for the raw type and event_id to report.
        message = pydantic_core.from_json(raw)
    except ValueError:
        message = None
    if not isinstance(message, dict):
        got = "null" if message is None else _JSON_TYPE_NAMES.get(type(message), "boolean")
        return ProtocolError("invalid_event", f"a message must be a JSON object with a 'type', got {got}")
    event_id = message.get("event_id") if isinstance(message.get("event_id"), str) else None
    event_type = message.get("type")

    if kind == "union_tag_not_found":
        return ProtocolError("invalid_event", "message has no 'type'", param="type", event_id=event_id)
    if kind == "union_tag_invalid" and loc == ():
        if not isinstance(event_type, str):
            return ProtocolError(
                "invalid_event", "'type' should be a string", param="type", event_id=event_id
            )
        shown = event_type[:100]
        if event_type in _UNSUPPORTED_EVENT_TYPES:
            text = f"event type {shown!r} is not supported by this server"
        else:
            text = f"unknown event type {shown!r}; expected one of: {', '.join(CLIENT_EVENT_TYPES)}"
        return ProtocolError("unknown_event", text, param="type", event_id=event_id)

    code = kind if kind in ERROR_CODES else "invalid_event"
    path = _path(loc[1:] if loc and loc[0] == event_type else loc)
    if kind == "extra_forbidden":
        ga = _BETA_NAMES.get(path)
        text = f"Unknown parameter: '{path}'." + (f" The GA API has it at '{ga}'." if ga else "")
        return ProtocolError("unknown_parameter", text, param=path, event_id=event_id)
    text = f"{path}: {first['msg']}" if path else first["msg"]
    if len(errors) > 1:
        text += f" (and {len(errors) - 1} more)"
    return ProtocolError(code, text, param=path or None, event_id=event_id)  # type: ignore[arg-type]


def _path(loc: tuple[int | str, ...]) -> str:
    """``('item', 'content', 0, 'text')`` → ``item.content[0].text``."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _is_utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


__all__ = [
    "AUDIO_FORMAT",
    "CLIENT_EVENT_TYPES",
    "DEFAULT_MAX_MESSAGE_BYTES",
    "DEFAULT_MODEL",
    "DEFAULT_VOICE",
    "ERROR_CODES",
    "SAMPLE_RATE",
    "AudioConfig",
    "AudioFormat",
    "AudioInput",
    "AudioOutput",
    "AudioPart",
    "ClientEvent",
    "ConversationItemAdded",
    "ConversationItemCreate",
    "ConversationItemDone",
    "ConversationItemInputAudioTranscriptionCompleted",
    "ConversationItemInputAudioTranscriptionDelta",
    "ConversationItemTruncate",
    "ConversationItemTruncated",
    "ErrorCode",
    "ErrorDetail",
    "ErrorEvent",
    "InputAudio",
    "InputAudioBufferAppend",
    "InputAudioBufferClear",
    "InputAudioBufferCleared",
    "InputAudioBufferCommit",
    "InputAudioBufferCommitted",
    "InputAudioBufferSpeechStarted",
    "InputAudioBufferSpeechStopped",
    "InputMessage",
    "InputText",
    "InputTranscription",
    "Item",
    "OutputAudio",
    "ProtocolError",
    "RealtimeResponse",
    "RealtimeSession",
    "ResponseAudio",
    "ResponseAudioOutput",
    "ResponseCancel",
    "ResponseContentPartAdded",
    "ResponseContentPartDone",
    "ResponseCreate",
    "ResponseCreated",
    "ResponseDone",
    "ResponseError",
    "ResponseOutputAudioDelta",
    "ResponseOutputAudioDone",
    "ResponseOutputAudioTranscriptDelta",
    "ResponseOutputAudioTranscriptDone",
    "ResponseOutputItemAdded",
    "ResponseOutputItemDone",
    "ResponseParams",
    "ResponseStatusDetails",
    "Sampling",
    "ServerEvent",
    "ServerVad",
    "SessionConfig",
    "SessionCreated",
    "SessionUpdate",
    "SessionUpdated",
    "TranscriptionUsage",
    "decode_pcm16",
    "encode_pcm16",
    "error_event",
    "item_created",
    "merge_update",
    "new_id",
    "output_done",
    "output_started",
    "parse_client_event",
]
