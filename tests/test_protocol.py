"""The realtime protocol module: client events parse strictly, server events are what OpenAI clients read.

Compatibility is checked against the installed official ``openai`` package, three ways: events built
with its own pydantic models and TypedDict params parse here; every server event validates as its
GA model; and its realtime client runs a whole exchange against a tiny server made of this module.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import json
import random
from typing import Any

import numpy as np
import pytest
from openai import AsyncOpenAI
from openai._models import construct_type_unchecked
from openai._utils import maybe_transform
from openai.types.realtime import (
    AudioTranscription,
    ConversationItemAdded,
    ConversationItemCreateEvent,
    ConversationItemDone,
    ConversationItemInputAudioTranscriptionCompletedEvent,
    ConversationItemInputAudioTranscriptionDeltaEvent,
    ConversationItemTruncatedEvent,
    ConversationItemTruncateEvent,
    InputAudioBufferAppendEvent,
    InputAudioBufferClearedEvent,
    InputAudioBufferClearEvent,
    InputAudioBufferCommitEvent,
    InputAudioBufferCommittedEvent,
    InputAudioBufferSpeechStartedEvent,
    InputAudioBufferSpeechStoppedEvent,
    RealtimeAudioConfig,
    RealtimeAudioConfigInput,
    RealtimeAudioConfigOutput,
    RealtimeClientEventParam,
    RealtimeConversationItemSystemMessage,
    RealtimeConversationItemUserMessage,
    RealtimeErrorEvent,
    RealtimeResponseCreateParams,
    RealtimeServerEvent,
    RealtimeSessionCreateRequest,
    RealtimeSessionCreateResponse,
    ResponseAudioDeltaEvent,
    ResponseAudioDoneEvent,
    ResponseAudioTranscriptDeltaEvent,
    ResponseAudioTranscriptDoneEvent,
    ResponseCancelEvent,
    ResponseContentPartAddedEvent,
    ResponseContentPartDoneEvent,
    ResponseCreatedEvent,
    ResponseCreateEvent,
    ResponseDoneEvent,
    ResponseOutputItemAddedEvent,
    ResponseOutputItemDoneEvent,
    SessionCreatedEvent,
    SessionUpdatedEvent,
    SessionUpdateEvent,
)
from openai.types.realtime.realtime_audio_formats import AudioPCM
from openai.types.realtime.realtime_audio_input_turn_detection import ServerVad as OpenAIServerVad
from openai.types.realtime.response_create_event_with_references_param import (
    ResponseCreateEventWithReferencesParam,
)
from pydantic import ValidationError

from serve_app import protocol as p
from speech.vad import VadConfig

PCM = np.array([0, 1, -1, 32767, -32768, 1234], dtype=np.int16)
PCM_B64 = base64.b64encode(PCM.astype("<i2").tobytes()).decode()


def parse(message: Any, **kwargs: Any) -> p.ClientEvent:
    return p.parse_client_event(
        message if isinstance(message, str | bytes) else json.dumps(message), **kwargs
    )


def reject(message: Any, **kwargs: Any) -> p.ProtocolError:
    with pytest.raises(p.ProtocolError) as info:
        parse(message, **kwargs)
    return info.value


# ---------------------------------------------------------------------------------------------
# Client events: round trips from realistic JSON.

CLIENT_EVENTS: list[tuple[dict[str, Any], type]] = [
    (
        {
            "type": "session.update",
            "event_id": "evt_1",
            "session": {
                "type": "realtime",
                "instructions": "Be brief.",
                "output_modalities": ["audio"],
                "max_output_tokens": 200,
                "audio": {
                    "input": {
                        "format": {"type": "audio/pcm", "rate": 24000},
                        "turn_detection": {
                            "type": "server_vad",
                            "threshold": 0.6,
                            "prefix_padding_ms": 200,
                            "silence_duration_ms": 400,
                            "create_response": True,
                            "interrupt_response": False,
                        },
                        "transcription": {"model": "whisper-1", "language": "en"},
                    },
                    "output": {"format": {"type": "audio/pcm", "rate": 24000}, "voice": "maya", "speed": 1.0},
                },
                "x-sampling": {"temperature": 0.7, "top_k": 40, "seed": 1234, "max_reply_seconds": 12.5},
            },
        },
        p.SessionUpdate,
    ),
    ({"type": "session.update", "session": {"audio": {"input": {"turn_detection": None}}}}, p.SessionUpdate),
    ({"type": "input_audio_buffer.append", "event_id": "evt_2", "audio": PCM_B64}, p.InputAudioBufferAppend),
    ({"type": "input_audio_buffer.commit", "event_id": "evt_3"}, p.InputAudioBufferCommit),
    ({"type": "input_audio_buffer.clear"}, p.InputAudioBufferClear),
    (
        {
            "type": "conversation.item.create",
            "previous_item_id": "item_0",
            "item": {
                "type": "message",
                "role": "user",
                "content": [{"type": "input_text", "text": "Hello there"}],
            },
        },
        p.ConversationItemCreate,
    ),
    (
        {
            "type": "conversation.item.create",
            "item": {
                "type": "message",
                "role": "system",
                "content": [{"type": "input_text", "text": "Whisper."}],
            },
        },
        p.ConversationItemCreate,
    ),
    (
        {"type": "conversation.item.truncate", "item_id": "item_9", "content_index": 0, "audio_end_ms": 1500},
        p.ConversationItemTruncate,
    ),
    ({"type": "response.create"}, p.ResponseCreate),
    (
        {
            "type": "response.create",
            "response": {
                "instructions": "Answer in one sentence.",
                "conversation": "auto",
                "output_modalities": ["audio"],
                "max_output_tokens": "inf",
                "audio": {"output": {"voice": "maya", "format": {"type": "audio/pcm", "rate": 24000}}},
                "metadata": {"turn": "3"},
                "x-sampling": {"temperature": 0.0, "top_k": 1},
            },
        },
        p.ResponseCreate,
    ),
    ({"type": "response.cancel", "response_id": "resp_1"}, p.ResponseCancel),
    ({"type": "response.cancel"}, p.ResponseCancel),
]


@pytest.mark.parametrize(
    ("message", "cls"), CLIENT_EVENTS, ids=lambda v: v["type"] if isinstance(v, dict) else ""
)
def test_client_events_round_trip(message: dict[str, Any], cls: type) -> None:
    event = parse(message)
    assert type(event) is cls
    assert json.loads(event.model_dump_json(by_alias=True, exclude_unset=True)) == message
    # str and bytes frames are the same message.
    assert parse(json.dumps(message).encode()) == event


def test_append_decodes_audio_once_into_samples() -> None:
    event = parse({"type": "input_audio_buffer.append", "audio": PCM_B64})
    assert isinstance(event, p.InputAudioBufferAppend)
    assert event.audio == PCM.astype("<i2").tobytes()
    assert event.samples.dtype == np.int16 and np.array_equal(event.samples, PCM)
    assert not event.samples.flags.writeable  # a view of the bytes, not a copy
    assert event.duration_ms == pytest.approx(len(PCM) / 24)
    assert parse({"type": "input_audio_buffer.append", "audio": ""}).audio == b""
    # Python callers may pass bytes directly.
    assert p.InputAudioBufferAppend(audio=b"\x01\x00").samples.tolist() == [1]


def test_session_update_fields_and_extension() -> None:
    event = parse(CLIENT_EVENTS[0][0])
    assert isinstance(event, p.SessionUpdate)
    session = event.session
    assert session.audio.input.turn_detection is not None
    assert session.audio.input.turn_detection.threshold == 0.6
    assert session.audio.output.voice == "maya"
    assert session.x_sampling == p.Sampling(temperature=0.7, top_k=40, seed=1234, max_reply_seconds=12.5)
    assert session.max_output_tokens == 200
    # A voice object ({"id": ...}) is accepted as the name.
    voiced = parse({"type": "session.update", "session": {"audio": {"output": {"voice": {"id": "maya"}}}}})
    assert isinstance(voiced, p.SessionUpdate) and voiced.session.audio.output.voice == "maya"


def test_item_create_text_and_item() -> None:
    event = parse(
        {
            "type": "conversation.item.create",
            "item": {
                "type": "message",
                "role": "user",
                "content": [{"type": "input_text", "text": "one"}, {"text": "two"}],
            },
        }
    )
    assert isinstance(event, p.ConversationItemCreate)
    assert event.item.text == "one\ntwo"
    item = event.item.to_item()
    assert item.id.startswith("item_") and item.role == "user" and item.status == "completed"
    added = p.ConversationItemAdded(item=item, previous_item_id=None)
    parsed = ConversationItemAdded.model_validate_json(added.to_json())
    assert isinstance(parsed.item, RealtimeConversationItemUserMessage)
    assert parsed.item.content[1].text == "two"


# ---------------------------------------------------------------------------------------------
# What the openai package sends parses here.

OPENAI_SESSION = RealtimeSessionCreateRequest(
    type="realtime",
    instructions="You are a helpful voice.",
    output_modalities=["audio"],
    max_output_tokens="inf",
    audio=RealtimeAudioConfig(
        input=RealtimeAudioConfigInput(
            format=AudioPCM(type="audio/pcm", rate=24000),
            noise_reduction=None,
            transcription=AudioTranscription(model="gpt-4o-transcribe", language="en"),
            turn_detection=OpenAIServerVad(
                type="server_vad", threshold=0.5, silence_duration_ms=600, interrupt_response=True
            ),
        ),
        output=RealtimeAudioConfigOutput(
            format=AudioPCM(type="audio/pcm", rate=24000), voice="marin", speed=1.1
        ),
    ),
    tools=[],
    tool_choice="auto",
    tracing="auto",
)

OPENAI_MODELS = [
    SessionUpdateEvent(type="session.update", event_id="e1", session=OPENAI_SESSION),
    InputAudioBufferAppendEvent(type="input_audio_buffer.append", audio=PCM_B64),
    InputAudioBufferCommitEvent(type="input_audio_buffer.commit"),
    InputAudioBufferClearEvent(type="input_audio_buffer.clear", event_id="e2"),
    ConversationItemCreateEvent(
        type="conversation.item.create",
        previous_item_id="root",
        item=RealtimeConversationItemUserMessage(
            type="message", role="user", content=[{"type": "input_text", "text": "hi"}]
        ),
    ),
    ConversationItemCreateEvent(
        type="conversation.item.create",
        item=RealtimeConversationItemSystemMessage(
            type="message", role="system", content=[{"type": "input_text", "text": "be calm"}]
        ),
    ),
    ConversationItemTruncateEvent(
        type="conversation.item.truncate", item_id="item_a", content_index=0, audio_end_ms=640
    ),
    ResponseCreateEvent(
        type="response.create",
        response=RealtimeResponseCreateParams(
            instructions="Short.", output_modalities=["audio"], conversation="auto", metadata={"k": "v"}
        ),
    ),
    ResponseCancelEvent(type="response.cancel", response_id="resp_1"),
]


@pytest.mark.parametrize("model", OPENAI_MODELS, ids=lambda m: m.type)
def test_openai_pydantic_events_parse(model: Any) -> None:
    # Exactly what the client's send() writes for a model instance.
    wire = model.to_json(use_api_names=True, exclude_unset=True)
    event = p.parse_client_event(wire)
    assert event.type == model.type
    assert event.event_id == model.event_id
    if isinstance(event, p.SessionUpdate):
        assert event.session.audio.output.voice == "marin"
        assert event.session.audio.output.speed == 1.1
        assert event.session.audio.input.turn_detection is not None
        assert event.session.audio.input.turn_detection.silence_duration_ms == 600
        assert event.session.audio.input.transcription == p.InputTranscription(
            model="gpt-4o-transcribe", language="en"
        )
    if isinstance(event, p.InputAudioBufferAppend):
        assert np.array_equal(event.samples, PCM)
    if isinstance(event, p.ConversationItemTruncate):
        assert (event.item_id, event.content_index, event.audio_end_ms) == ("item_a", 0, 640)


OPENAI_PARAMS: list[dict[str, Any]] = [
    {
        "type": "session.update",
        "session": {
            "type": "realtime",
            "instructions": "Hi",
            "audio": {
                "input": {
                    "format": {"type": "audio/pcm", "rate": 24000},
                    "turn_detection": {"type": "server_vad", "create_response": False},
                    "noise_reduction": {"type": "near_field"},
                },
                "output": {"voice": "cedar"},
            },
            "include": ["item.input_audio_transcription.logprobs"],
            "x-sampling": {"temperature": 1.1},
        },
    },
    {"type": "input_audio_buffer.append", "audio": PCM_B64, "event_id": "a1"},
    {
        "type": "conversation.item.create",
        "item": {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "typed"}]},
    },
    {"type": "conversation.item.truncate", "item_id": "i", "content_index": 0, "audio_end_ms": 0},
    {"type": "response.create", "response": {"instructions": "x", "audio": {"output": {"voice": "cedar"}}}},
    {"type": "response.cancel"},
]


@pytest.mark.parametrize("params", OPENAI_PARAMS, ids=lambda d: d["type"])
def test_openai_typeddict_params_parse(params: dict[str, Any]) -> None:
    # Exactly what the client's send() writes for a TypedDict (connection.session.update(...) etc.).
    wire = json.dumps(
        maybe_transform(params, RealtimeClientEventParam | ResponseCreateEventWithReferencesParam)
    )
    event = p.parse_client_event(wire)
    assert event.type == params["type"]
    if isinstance(event, p.SessionUpdate):
        assert event.session.x_sampling.temperature == 1.1
        assert event.session.audio.input.turn_detection is not None
        assert event.session.audio.input.turn_detection.create_response is False


# ---------------------------------------------------------------------------------------------
# Server events: each one is what the openai package expects.


def _server_events() -> list[tuple[p.ServerEvent, type]]:
    session = p.RealtimeSession(instructions="hello")
    user_item = p.Item(role="user", content=[p.InputAudio(transcript="hi there")])
    reply = p.Item(role="assistant", status="in_progress", content=[p.OutputAudio(transcript="")])
    response = p.RealtimeResponse(
        audio=p.ResponseAudio(output=p.ResponseAudioOutput(format=p.AudioFormat(), voice="default"))
    )
    done = response.model_copy(
        update={
            "status": "cancelled",
            "status_details": p.ResponseStatusDetails(type="cancelled", reason="turn_detected"),
            "output": [reply.model_copy(update={"status": "incomplete"})],
        }
    )
    failed = response.model_copy(
        update={
            "status": "failed",
            "status_details": p.ResponseStatusDetails(
                type="failed", error=p.ResponseError(type="server_error", code="response_failed", message="x")
            ),
        }
    )
    ids = {"response_id": response.id, "item_id": reply.id}
    return [
        (p.SessionCreated(session=session), SessionCreatedEvent),
        (p.SessionUpdated(session=session), SessionUpdatedEvent),
        (
            p.InputAudioBufferSpeechStarted(audio_start_ms=120, item_id=user_item.id),
            InputAudioBufferSpeechStartedEvent,
        ),
        (
            p.InputAudioBufferSpeechStopped(audio_end_ms=900, item_id=user_item.id),
            InputAudioBufferSpeechStoppedEvent,
        ),
        (p.InputAudioBufferCommitted(item_id=user_item.id), InputAudioBufferCommittedEvent),
        (p.InputAudioBufferCleared(), InputAudioBufferClearedEvent),
        (p.ConversationItemAdded(item=user_item, previous_item_id="item_0"), ConversationItemAdded),
        (p.ConversationItemDone(item=user_item), ConversationItemDone),
        (
            p.ConversationItemInputAudioTranscriptionDelta(item_id=user_item.id, delta="hi"),
            ConversationItemInputAudioTranscriptionDeltaEvent,
        ),
        (
            p.ConversationItemInputAudioTranscriptionCompleted(
                item_id=user_item.id, transcript="hi there", usage=p.TranscriptionUsage(seconds=0.9)
            ),
            ConversationItemInputAudioTranscriptionCompletedEvent,
        ),
        (p.ConversationItemTruncated(item_id=reply.id, audio_end_ms=640), ConversationItemTruncatedEvent),
        (p.ResponseCreated(response=response), ResponseCreatedEvent),
        (p.ResponseOutputItemAdded(response_id=response.id, item=reply), ResponseOutputItemAddedEvent),
        (p.ResponseContentPartAdded(**ids), ResponseContentPartAddedEvent),
        (p.ResponseOutputAudioTranscriptDelta(**ids, delta="Hel"), ResponseAudioTranscriptDeltaEvent),
        (p.ResponseOutputAudioDelta(**ids, delta=p.encode_pcm16(PCM)), ResponseAudioDeltaEvent),
        (p.ResponseOutputAudioDone(**ids), ResponseAudioDoneEvent),
        (p.ResponseOutputAudioTranscriptDone(**ids, transcript="Hello"), ResponseAudioTranscriptDoneEvent),
        (
            p.ResponseContentPartDone(**ids, part=p.AudioPart(transcript="Hello")),
            ResponseContentPartDoneEvent,
        ),
        (p.ResponseOutputItemDone(response_id=response.id, item=reply), ResponseOutputItemDoneEvent),
        (p.ResponseDone(response=done), ResponseDoneEvent),
        (p.ResponseDone(response=failed), ResponseDoneEvent),
        (p.error_event("invalid_audio", "bad", param="audio", event_id="evt_9"), RealtimeErrorEvent),
    ]


@pytest.mark.parametrize(("event", "openai_cls"), _server_events(), ids=lambda v: getattr(v, "type", ""))
def test_server_events_parse_as_openai_types(event: p.ServerEvent, openai_cls: type) -> None:
    wire = event.to_json()
    # Full validation against the GA model (required fields present, right types) ...
    validated = openai_cls.model_validate_json(wire)
    assert validated.type == event.type  # type: ignore[attr-defined]
    # ... and the client's own parsing path lands on the same class.
    received = construct_type_unchecked(value=json.loads(wire), type_=RealtimeServerEvent)
    assert isinstance(received, openai_cls)
    assert received.event_id == event.event_id and event.event_id.startswith("event_")


def test_server_event_details() -> None:
    events = [e for e, _ in _server_events()]
    assert len({e.event_id for e in events}) == len(events)  # a fresh id each

    session = json.loads(p.SessionCreated(session=p.RealtimeSession(model="csm-1b")).to_json())["session"]
    assert session["type"] == "realtime" and session["object"] == "realtime.session"
    assert session["id"].startswith("sess_") and session["model"] == "csm-1b"
    assert session["output_modalities"] == ["audio"]
    assert session["audio"]["input"]["format"] == {"type": "audio/pcm", "rate": 24000}
    assert session["audio"]["output"]["format"] == {"type": "audio/pcm", "rate": 24000}
    assert session["audio"]["input"]["turn_detection"]["type"] == "server_vad"
    assert session["x-sampling"] == {"temperature": 0.9, "top_k": 50, "seed": None, "max_reply_seconds": 30.0}
    ga = RealtimeSessionCreateResponse.model_validate(session)
    assert ga.audio is not None and ga.audio.output is not None and ga.audio.output.voice == "default"

    # Nulls are sent, not dropped: turn_detection null means "VAD off".
    off = p.RealtimeSession().apply(
        p.SessionConfig.model_validate({"audio": {"input": {"turn_detection": None}}})
    )
    assert (
        json.loads(p.SessionUpdated(session=off).to_json())["session"]["audio"]["input"]["turn_detection"]
        is None
    )

    delta = json.loads(
        p.ResponseOutputAudioDelta(response_id="r", item_id="i", delta=p.encode_pcm16(PCM)).to_json()
    )
    assert np.array_equal(p.decode_pcm16(delta["delta"]), PCM)
    assert (delta["output_index"], delta["content_index"]) == (0, 0)

    error = json.loads(p.error_event("server_busy", "full", event_id=None).to_json())
    assert error == {
        "event_id": error["event_id"],
        "type": "error",
        "error": {
            "type": "server_error",
            "code": "server_busy",
            "message": "full",
            "param": None,
            "event_id": None,
        },
    }
    assert (
        json.loads(p.error_event("invalid_event", "x").to_json())["error"]["type"] == "invalid_request_error"
    )
    with pytest.raises(ValidationError):
        p.error_event("no_such_code", "x")  # type: ignore[arg-type]


def test_encode_pcm16() -> None:
    assert p.encode_pcm16(PCM) == PCM_B64
    assert p.encode_pcm16(PCM.astype(">i2").astype(np.int16)) == PCM_B64
    assert p.encode_pcm16(PCM.tobytes()) == PCM_B64
    assert p.encode_pcm16(np.stack([PCM, PCM])[:, ::2]) == p.encode_pcm16(
        np.concatenate([PCM[::2], PCM[::2]])
    )
    with pytest.raises(TypeError, match="int16"):
        p.encode_pcm16(PCM.astype(np.float32))


# ---------------------------------------------------------------------------------------------
# Session state: a session.update changes only what it names.


def test_session_apply_merges_only_given_fields() -> None:
    base = p.RealtimeSession(instructions="base")

    def update(session: dict[str, Any]) -> p.RealtimeSession:
        event = parse({"type": "session.update", "session": session})
        assert isinstance(event, p.SessionUpdate)
        return base.apply(event.session)

    voiced = update({"audio": {"output": {"voice": "maya"}}})
    assert voiced.audio.output.voice == "maya" and voiced.audio.output.speed == 1.0
    assert voiced.instructions == "base" and voiced.id == base.id and voiced.audio.input == base.audio.input
    assert base.audio.output.voice == p.DEFAULT_VOICE  # apply returns a new session

    vad = update({"audio": {"input": {"turn_detection": {"silence_duration_ms": 900}}}})
    assert vad.audio.input.turn_detection == p.ServerVad(silence_duration_ms=900)

    off = update({"audio": {"input": {"turn_detection": None, "transcription": None}}})
    assert off.audio.input.turn_detection is None and off.audio.input.transcription is None
    back = off.apply(
        p.SessionConfig.model_validate({"audio": {"input": {"turn_detection": {"threshold": 0.9}}}})
    )
    assert back.audio.input.turn_detection == p.ServerVad(threshold=0.9)

    sampled = update({"x-sampling": {"top_k": 5}}).apply(
        p.SessionConfig.model_validate({"x-sampling": {"seed": 3}})
    )
    assert sampled.x_sampling == p.Sampling(top_k=5, seed=3)

    # A per-response override merges the same way.
    create = parse({"type": "response.create", "response": {"x-sampling": {"temperature": 0.2}}})
    assert isinstance(create, p.ResponseCreate) and create.response and create.response.x_sampling
    merged = p.merge_update(sampled.x_sampling, create.response.x_sampling)
    assert merged == p.Sampling(temperature=0.2, top_k=5, seed=3)
    assert update({"instructions": ""}).instructions == ""


# ---------------------------------------------------------------------------------------------
# Bad input: one ProtocolError each, naming the problem.

APPEND = {"type": "input_audio_buffer.append", "event_id": "evt_bad"}

BAD: list[tuple[Any, str, str, str | None]] = [
    # (message, code, words in the message, param)
    ("{not json", "invalid_json", "invalid JSON", None),
    (b'{"type": "input_audio_buffer.commit", "event_id": "\xff"}', "invalid_json", "UTF-8", None),
    (b"\xff\xfe{}", "invalid_json", "UTF-8", None),
    ('{"type": "input_audio_buffer.commit", "event_id": "\\ud800"}', "invalid_json", "invalid JSON", None),
    ("[" * 100_000, "invalid_json", "recursion", None),
    ('{"type": "x", "n": 1' + "0" * 5000 + "}", "invalid_json", "number", None),
    ("", "invalid_json", "invalid JSON", None),
    ("[1, 2]", "invalid_event", "JSON object", None),
    ('"session.update"', "invalid_event", "got string", None),
    ("null", "invalid_event", "got null", None),
    ({"event_id": "evt_bad"}, "invalid_event", "no 'type'", "type"),
    ({"type": 5, "event_id": "evt_bad"}, "invalid_event", "'type' should be a string", "type"),
    ({"type": "session.create", "event_id": "evt_bad"}, "unknown_event", "'session.create'", "type"),
    ({"type": "conversation.item.delete", "item_id": "x"}, "unknown_event", "not supported", "type"),
    ({**APPEND, "audio": "not base64!"}, "invalid_audio", "base64", "audio"),
    ({**APPEND, "audio": "AAA"}, "invalid_audio", "base64", "audio"),
    ({**APPEND, "audio": "AAAA"}, "invalid_audio", "16-bit", "audio"),
    ({**APPEND, "audio": "AA\nAA=="}, "invalid_audio", "base64", "audio"),
    ({**APPEND, "audio": "AA-_"}, "invalid_audio", "base64", "audio"),
    ({**APPEND, "audio": "ÄÄÄÄ"}, "invalid_audio", "base64", "audio"),
    ({**APPEND, "audio": 12}, "invalid_event", "base64 string", "audio"),
    (APPEND, "invalid_event", "Field required", "audio"),
    (
        {"type": "conversation.item.truncate", "event_id": "evt_bad", "item_id": "i", "content_index": 0},
        "invalid_event",
        "audio_end_ms: Field required",
        "audio_end_ms",
    ),
    (
        {"type": "conversation.item.truncate", "item_id": "i", "content_index": -1, "audio_end_ms": 5},
        "invalid_event",
        "greater than or equal to 0",
        "content_index",
    ),
    (
        {"type": "conversation.item.truncate", "item_id": "i", "content_index": 0, "audio_end_ms": "5"},
        "invalid_event",
        "valid integer",
        "audio_end_ms",
    ),
    (
        {"type": "conversation.item.truncate", "item_id": "i", "content_index": 0, "audio_end_ms": 5.0},
        "invalid_event",
        "valid integer",
        "audio_end_ms",
    ),
    ({"type": "input_audio_buffer.commit", "event_id": 7}, "invalid_event", "valid string", "event_id"),
    (
        {
            "type": "conversation.item.create",
            "item": {"id": "item_mine", "role": "user", "content": [{"type": "input_text", "text": "hi"}]},
        },
        "invalid_event",
        "assigned by the server",
        "item.id",
    ),
    ({"type": "session.update"}, "invalid_event", "session: Field required", "session"),
    ({"type": "session.update", "session": "realtime"}, "invalid_event", "object", "session"),
    (
        {"type": "session.update", "session": {"instructions": 3}},
        "invalid_event",
        "valid string",
        "session.instructions",
    ),
    (
        {"type": "session.update", "session": {"type": "transcription"}},
        "unsupported_feature",
        "'transcription'",
        "session.type",
    ),
    (
        {"type": "session.update", "session": {"output_modalities": ["text"]}},
        "unsupported_feature",
        "'text'",
        "session.output_modalities[0]",
    ),
    (
        {"type": "session.update", "session": {"max_output_tokens": 0}},
        "invalid_event",
        "4096",
        "session.max_output_tokens",
    ),
    (
        {"type": "session.update", "session": {"audio": {"input": {"format": {"type": "audio/pcmu"}}}}},
        "unsupported_format",
        "audio/pcm at 24000 Hz",
        "session.audio.input.format",
    ),
    (
        {
            "type": "session.update",
            "session": {"audio": {"output": {"format": {"type": "audio/pcm", "rate": 16000}}}},
        },
        "unsupported_format",
        "16000",
        "session.audio.output.format",
    ),
    (
        {"type": "session.update", "session": {"audio": {"input": {"format": "pcm16"}}}},
        "invalid_event",
        "object",
        "session.audio.input.format",
    ),
    (
        {
            "type": "session.update",
            "session": {"audio": {"input": {"turn_detection": {"type": "semantic_vad"}}}},
        },
        "unsupported_feature",
        "'semantic_vad'",
        "session.audio.input.turn_detection.type",
    ),
    (
        {"type": "session.update", "session": {"audio": {"input": {"turn_detection": {"threshold": 1.5}}}}},
        "invalid_event",
        "less than or equal to 1",
        "session.audio.input.turn_detection.threshold",
    ),
    (
        {
            "type": "session.update",
            "session": {"audio": {"input": {"turn_detection": {"create_response": 1}}}},
        },
        "invalid_event",
        "valid boolean",
        "session.audio.input.turn_detection.create_response",
    ),
    (
        {"type": "session.update", "session": {"audio": {"output": {"voice": "../../etc/passwd"}}}},
        "invalid_event",
        "not a voice name",
        "session.audio.output.voice",
    ),
    (
        {"type": "session.update", "session": {"audio": {"output": {"speed": 9}}}},
        "invalid_event",
        "1.5",
        "session.audio.output.speed",
    ),
    (
        {"type": "session.update", "session": {"x-sampling": {"temperature": 2.5}}},
        "invalid_event",
        "2",
        "session.x-sampling.temperature",
    ),
    (
        {"type": "session.update", "session": {"x-sampling": {"top_k": 0}}},
        "invalid_event",
        "1",
        "session.x-sampling.top_k",
    ),
    (
        {"type": "session.update", "session": {"x-sampling": {"top_k": 257}}},
        "invalid_event",
        "256",
        "session.x-sampling.top_k",
    ),
    (
        {"type": "session.update", "session": {"x-sampling": {"seed": -1}}},
        "invalid_event",
        "0",
        "session.x-sampling.seed",
    ),
    (
        {"type": "session.update", "session": {"x-sampling": {"max_reply_seconds": 0}}},
        "invalid_event",
        "0",
        "session.x-sampling.max_reply_seconds",
    ),
    (
        '{"type": "session.update", "session": {"x-sampling": {"temperature": NaN}}}',
        "invalid_event",
        "finite",
        "session.x-sampling.temperature",
    ),
    (
        '{"type": "session.update", "session": {"x-sampling": {"temperature": 1e999}}}',
        "invalid_event",
        "finite",
        "session.x-sampling.temperature",
    ),
    (
        {
            "type": "conversation.item.create",
            "item": {
                "type": "message",
                "role": "assistant",
                "content": [{"type": "input_text", "text": "x"}],
            },
        },
        "unsupported_feature",
        "'assistant'",
        "item.role",
    ),
    (
        {
            "type": "conversation.item.create",
            "item": {
                "type": "message",
                "role": "user",
                "content": [{"type": "input_audio", "audio": PCM_B64}],
            },
        },
        "unsupported_feature",
        "'input_audio'",
        "item.content[0].type",
    ),
    (
        {"type": "conversation.item.create", "item": {"type": "function_call_output", "output": "{}"}},
        "unsupported_feature",
        "'function_call_output'",
        "item.type",
    ),
    (
        {"type": "conversation.item.create", "item": {"type": "message", "role": "user", "content": []}},
        "invalid_event",
        "at least 1",
        "item.content",
    ),
    (
        {
            "type": "conversation.item.create",
            "item": {"type": "message", "role": "user", "content": [{"type": "input_text", "text": None}]},
        },
        "invalid_event",
        "valid string",
        "item.content[0].text",
    ),
    (
        {"type": "response.create", "response": {"conversation": "none"}},
        "unsupported_feature",
        "'none'",
        "response.conversation",
    ),
    (
        {"type": "response.create", "response": {"x-sampling": {"top_k": "50"}}},
        "invalid_event",
        "integer",
        "response.x-sampling.top_k",
    ),
    ({"type": "response.cancel", "response_id": ["r"]}, "invalid_event", "valid string", "response_id"),
    # GA fields of response.create this server does not do: refused by name, never silently dropped.
    (
        {"type": "response.create", "response": {"tools": [{"type": "function", "name": "f"}]}},
        "unsupported_feature",
        "not supported",
        "response.tools",
    ),
    (
        {"type": "response.create", "response": {"tool_choice": "auto"}},
        "unsupported_feature",
        "not supported",
        "response.tool_choice",
    ),
    (
        {"type": "response.create", "response": {"input": []}},
        "unsupported_feature",
        "not supported",
        "response.input",
    ),
    (
        {"type": "response.create", "response": {"prompt": {"id": "p"}}},
        "unsupported_feature",
        "not supported",
        "response.prompt",
    ),
    (
        {"type": "response.create", "response": {"reasoning": {}}},
        "unsupported_feature",
        "not supported",
        "response.reasoning",
    ),
    (
        {"type": "response.create", "response": {"parallel_tool_calls": True}},
        "unsupported_feature",
        "not supported",
        "response.parallel_tool_calls",
    ),
    (
        {"type": "response.create", "response": {"metadata": {str(i): "v" for i in range(17)}}},
        "invalid_event",
        "16 pairs",
        "response.metadata",
    ),
    (
        {"type": "response.create", "response": {"metadata": {"k": "v" * 513}}},
        "invalid_event",
        "values up to 512",
        "response.metadata",
    ),
]


@pytest.mark.parametrize(("message", "code", "words", "param"), BAD)
def test_bad_input_is_one_protocol_error(message: Any, code: str, words: str, param: str | None) -> None:
    err = reject(message)
    assert err.code == code, err
    assert words in err.message, err
    assert err.param == param, err
    if isinstance(message, dict) and message.get("event_id") == "evt_bad":
        assert err.event_id == "evt_bad"
    event = json.loads(err.to_event().to_json())
    assert event["type"] == "error" and event["error"]["code"] == code
    assert event["error"]["message"] == err.message and event["error"]["param"] == param


def test_errors_are_concise() -> None:
    err = reject(
        {"type": "session.update", "session": {"instructions": 1, "audio": {"output": {"speed": "x"}}}}
    )
    assert err.message == "session.instructions: Input should be a valid string (and 1 more)"
    err = reject({"type": "no.such." + "x" * 10_000})
    assert len(err.message) < 400


def test_size_limits() -> None:
    message = json.dumps({"type": "input_audio_buffer.append", "audio": PCM_B64})
    assert parse(message, max_bytes=len(message)).type == "input_audio_buffer.append"
    err = reject(message, max_bytes=len(message) - 1)
    assert err.code == "message_too_large" and str(len(message)) in err.message
    # Checked before parsing: an oversize message is "too large", even when it is not JSON.
    assert reject("x" * 2_000_000).code == "message_too_large"
    # The limit is in UTF-8 bytes, not characters.
    text = json.dumps({"type": "input_audio_buffer.commit", "event_id": "é" * 10}, ensure_ascii=False)
    assert reject(text, max_bytes=len(text)).code == "message_too_large"
    assert parse(text, max_bytes=len(text.encode())).event_id == "é" * 10
    # The decoded audio of one append has its own cap.
    err = reject(message, max_audio_bytes=len(PCM) * 2 - 2)
    assert (err.code, err.param) == ("message_too_large", "audio")
    assert parse(message, max_audio_bytes=len(PCM) * 2).type == "input_audio_buffer.append"


def test_ga_fields_not_done_here_are_accepted_and_change_nothing() -> None:
    event = parse(
        {
            "type": "session.update",
            "session": {"type": "realtime", "tools": [], "tracing": "auto", "model": "gpt-realtime"},
        }
    )
    assert isinstance(event, p.SessionUpdate)
    session = p.RealtimeSession().apply(event.session)
    assert session.model == p.DEFAULT_MODEL  # the server's model, whatever the client names
    assert set(json.loads(session.model_dump_json(by_alias=True))) == set(
        json.loads(p.RealtimeSession().model_dump_json(by_alias=True))
    )  # and never echoed


@pytest.mark.parametrize(
    ("message", "param", "ga"),
    [
        ({"type": "session.update", "session": {"voice": "narrator"}}, "session.voice", "audio.output.voice"),
        ({"type": "session.update", "session": {"modalities": ["audio"]}}, "session.modalities", "output_"),
        (
            {"type": "session.update", "session": {"audio": {"output": {"voyce": "x"}}}},
            "session.audio.output.voyce",
            None,
        ),
        (
            {"type": "session.update", "session": {"x-sampling": {"temprature": 1.0}}},
            "session.x-sampling.temprature",
            None,
        ),
        ({"type": "response.create", "response": {"voice": "narrator"}}, "response.voice", "response.audio"),
        ({"type": "input_audio_buffer.commit", "extra": {"nested": [[[1]]]}}, "extra", None),
    ],
)  # fmt: skip
def test_unknown_parameters_are_refused_by_name(message: dict, param: str, ga: str | None) -> None:
    err = reject(message)
    assert (err.code, err.param) == ("unknown_parameter", param)
    event = err.to_event()
    assert event.error.type == "invalid_request_error"
    assert f"Unknown parameter: '{param}'." in event.error.message
    if ga is not None:  # a beta name: the error says where the GA API has it
        assert "The GA API has it at" in event.error.message and ga in event.error.message


# ---------------------------------------------------------------------------------------------
# Fuzz: random mutations of valid events only ever parse or raise ProtocolError.

_JUNK: list[Any] = [
    None,
    True,
    False,
    0,
    -1,
    2**70,
    -(2**63),
    1.5,
    1e308,
    float("nan"),
    float("inf"),
    "",
    "x" * 70_000,
    "\u0000\u202e☃😀",
    "\ud800",
    "AAAA",
    [],
    {},
    {"type": "session.update"},
    [[["deep"]]],
    "input_audio_buffer.append",
]


def _nested(depth: int) -> Any:
    value: Any = "bottom"
    for i in range(depth):
        value = [value] if i % 2 else {"k": value}
    return value


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if len(prefix) > 8:  # earlier mutations may have planted deep nesting
        return out
    if isinstance(value, dict):
        for key, child in value.items():
            out += _paths(child, (*prefix, key))
    elif isinstance(value, list):
        for index, child in enumerate(value):
            out += _paths(child, (*prefix, index))
    return out


def _mutate(rng: random.Random, message: dict[str, Any]) -> str | bytes:
    message = copy.deepcopy(message)
    for _ in range(rng.randint(1, 3)):
        path = rng.choice(_paths(message)[1:] or [()])
        if not path:
            break
        parent = message
        for key in path[:-1]:
            parent = parent[key]
        op = rng.randrange(6)
        if op == 0:
            del parent[path[-1]]
        elif op == 1:
            parent[path[-1]] = rng.choice(_JUNK)
        elif op == 2:
            parent[path[-1]] = _nested(rng.choice([2, 50, 199, 201, 600]))
        elif op == 3 and isinstance(parent, dict):
            parent[rng.choice(["type", "event_id", "zzz", "x-sampling", "audio"])] = rng.choice(_JUNK)
        elif op == 4:
            parent[path[-1]] = rng.choice(list(p.CLIENT_EVENT_TYPES))
        else:
            parent[path[-1]] = [parent[path[-1]]] * rng.randint(0, 3)
        if isinstance(parent, list) and parent and rng.random() < 0.1:
            parent.pop()
    try:
        wire = json.dumps(message)  # NaN/Infinity come out as JS tokens, as sloppy clients send them
    except (ValueError, RecursionError):
        wire = "{"
    if rng.random() < 0.3:
        data = bytearray(wire.encode("utf-8", "surrogatepass"))
        for _ in range(rng.randint(1, 4)):
            if not data:
                break
            where = rng.randrange(len(data))
            choice = rng.randrange(3)
            if choice == 0:
                data[where] = rng.randrange(256)
            elif choice == 1:
                del data[where:]
            else:
                data[where:where] = bytes([0xFF, 0xC3, 0x28, 0xED, 0xA0, 0x80])[rng.randrange(6) :]
        return bytes(data)
    return wire


def test_fuzzed_messages_only_parse_or_raise_protocol_error() -> None:
    rng = random.Random(20240601)
    valid = [message for message, _ in CLIENT_EVENTS]
    outcomes = {"ok": 0, "error": 0}
    codes: set[str] = set()
    for _ in range(2000):
        wire = _mutate(rng, rng.choice(valid))
        try:
            event = p.parse_client_event(wire, max_bytes=256 * 1024, max_audio_bytes=64 * 1024)
        except p.ProtocolError as err:
            outcomes["error"] += 1
            codes.add(err.code)
            assert err.code in p.ERROR_CODES and err.message
            assert err.event_id is None or isinstance(err.event_id, str)
            json.loads(err.to_event().to_json())  # the reply is always sendable
        else:
            outcomes["ok"] += 1
            assert event.type in p.CLIENT_EVENT_TYPES
            event.model_dump_json(by_alias=True)
    assert outcomes["ok"] > 50 and outcomes["error"] > 500, outcomes
    assert {"invalid_json", "invalid_event", "unknown_event", "unsupported_feature"} <= codes, codes


# ---------------------------------------------------------------------------------------------
# The official client, end to end, against a server made of this module.


async def _serve_one(ws: Any, seen: dict[str, Any]) -> None:
    """A minimal realtime server: just enough behaviour to exercise every event shape."""
    seen["path"], seen["headers"] = ws.request.path, ws.request.headers
    session = p.RealtimeSession()
    await ws.send(p.SessionCreated(session=session).to_json())
    async for raw in ws:
        try:
            event = p.parse_client_event(raw)
        except p.ProtocolError as err:
            await ws.send(err.to_event().to_json())
            continue
        seen.setdefault("events", []).append(event)
        replies: list[p.ServerEvent] = []
        if isinstance(event, p.SessionUpdate):
            session = session.apply(event.session)
            replies = [p.SessionUpdated(session=session)]
        elif isinstance(event, p.InputAudioBufferCommit):
            replies = [p.InputAudioBufferCommitted(item_id="item_user")]
        elif isinstance(event, p.InputAudioBufferClear):
            replies = [p.InputAudioBufferCleared()]
        elif isinstance(event, p.ConversationItemCreate):
            replies = [p.ConversationItemAdded(item=event.item.to_item())]
        elif isinstance(event, p.ConversationItemTruncate):
            replies = [p.ConversationItemTruncated(item_id=event.item_id, audio_end_ms=event.audio_end_ms)]
        elif isinstance(event, p.ResponseCreate):
            response = p.RealtimeResponse()
            ids = {"response_id": response.id, "item_id": "item_reply"}
            item = p.Item(id="item_reply", role="assistant", content=[p.OutputAudio(transcript="Hi")])
            replies = [
                p.ResponseCreated(response=response),
                p.ResponseOutputAudioTranscriptDelta(**ids, delta="Hi"),
                p.ResponseOutputAudioDelta(**ids, delta=p.encode_pcm16(PCM)),
                p.ResponseOutputAudioDone(**ids),
                p.ResponseDone(
                    response=response.model_copy(update={"status": "completed", "output": [item]})
                ),
            ]
        for reply in replies:
            await ws.send(reply.to_json())


async def test_official_openai_client_end_to_end() -> None:
    from websockets.asyncio.server import serve

    seen: dict[str, Any] = {}
    async with serve(lambda ws: _serve_one(ws, seen), "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        client = AsyncOpenAI(api_key="sk-local", base_url=f"http://127.0.0.1:{port}/v1")
        async with client.realtime.connect(model="csm-1b") as conn:

            async def recv() -> Any:
                return await asyncio.wait_for(conn.recv(), timeout=10)

            created = await recv()
            assert isinstance(created, SessionCreatedEvent) and created.session.type == "realtime"

            await conn.session.update(
                session={
                    "type": "realtime",
                    "audio": {"output": {"voice": "maya"}, "input": {"turn_detection": None}},
                    "x-sampling": {"top_k": 7},  # type: ignore[typeddict-unknown-key]
                }
            )
            updated = await recv()
            assert isinstance(updated, SessionUpdatedEvent)
            session = updated.session
            assert session.audio is not None and session.audio.output is not None
            assert session.audio.output.voice == "maya"
            assert session.audio.input is not None and session.audio.input.turn_detection is None
            assert (session.model_extra or {})["x-sampling"]["top_k"] == 7

            await conn.input_audio_buffer.append(audio=p.encode_pcm16(PCM))
            await conn.input_audio_buffer.commit()
            committed = await recv()
            assert isinstance(committed, InputAudioBufferCommittedEvent) and committed.item_id == "item_user"

            await conn.conversation.item.create(
                item={"type": "message", "role": "user", "content": [{"type": "input_text", "text": "typed"}]}
            )
            added = await recv()
            assert isinstance(added, ConversationItemAdded) and added.item.type == "message"

            await conn.response.create(response={"instructions": "be brief"})
            kinds, audio = [], b""
            while True:
                event = await recv()
                kinds.append(event.type)
                if isinstance(event, ResponseAudioDeltaEvent):
                    audio += base64.b64decode(event.delta)
                if isinstance(event, ResponseDoneEvent):
                    assert event.response.status == "completed"
                    break
            assert kinds == [
                "response.created",
                "response.output_audio_transcript.delta",
                "response.output_audio.delta",
                "response.output_audio.done",
                "response.done",
            ]
            assert np.array_equal(np.frombuffer(audio, dtype="<i2"), PCM)

            await conn.conversation.item.truncate(item_id="item_reply", content_index=0, audio_end_ms=40)
            truncated = await recv()
            assert isinstance(truncated, ConversationItemTruncatedEvent) and truncated.audio_end_ms == 40

            await conn.send({"type": "input_audio_buffer.append", "audio": "%%%", "event_id": "evt_x"})
            error = await recv()
            assert isinstance(error, RealtimeErrorEvent)
            assert (error.error.code, error.error.param, error.error.event_id) == (
                "invalid_audio",
                "audio",
                "evt_x",
            )

            await conn.response.cancel()  # the conversation goes on after the error
            await conn.input_audio_buffer.clear()
            assert isinstance(await recv(), InputAudioBufferClearedEvent)

    assert seen["path"] == "/v1/realtime?model=csm-1b"
    assert seen["headers"]["Authorization"] == "Bearer sk-local"
    assert "OpenAI-Beta" not in seen["headers"]
    types = [event.type for event in seen["events"]]
    assert types == [
        "session.update",
        "input_audio_buffer.append",
        "input_audio_buffer.commit",
        "conversation.item.create",
        "response.create",
        "conversation.item.truncate",
        "response.cancel",
        "input_audio_buffer.clear",
    ]
    assert np.array_equal(seen["events"][1].samples, PCM)


def test_response_params_that_are_done_here_parse() -> None:
    """What `response.create` may ask of one reply, and the server honours (tests/test_conversation_local)."""
    create = parse(
        {
            "type": "response.create",
            "response": {
                "audio": {"output": {"voice": "narrator", "format": {"type": "audio/pcm", "rate": 24000}}},
                "metadata": {"turn": "3"},
                "max_output_tokens": 5,
                "conversation": "auto",
                "output_modalities": ["audio"],
                "tools": None,
            },
        }
    )
    assert isinstance(create, p.ResponseCreate) and create.response is not None
    assert create.response.audio.output.voice == "narrator"
    assert (create.response.metadata, create.response.max_output_tokens) == ({"turn": "3"}, 5)


def test_turn_detection_defaults_and_bounds_have_one_home() -> None:
    """The protocol's server_vad and the detector's config agree: whatever a client may set is a config."""
    assert p.ServerVad().model_dump(include=set(VadConfig.model_fields)) == VadConfig().model_dump()
    for edge in (
        {"threshold": 0.0},
        {"threshold": 1.0},
        {"prefix_padding_ms": 5_000},
        {"silence_duration_ms": 0},
    ):
        vad = p.ServerVad(**edge)
        assert VadConfig(**vad.model_dump(include=set(VadConfig.model_fields))) == VadConfig(**edge)
    for over in ({"threshold": 1.01}, {"prefix_padding_ms": 5_001}, {"silence_duration_ms": 10_001}):
        with pytest.raises(ValueError):
            p.ServerVad(**over)
        with pytest.raises(ValueError):
            VadConfig(**over)


def test_the_added_and_done_sequences() -> None:
    item = p.Item(role="assistant", status="in_progress", content=[p.OutputAudio()])
    started = [e.type for e in p.output_started("resp_1", item)]
    assert started == ["response.output_item.added", "response.content_part.added"]
    done = p.output_done("resp_1", item, "Hello.")
    assert [e.type for e in done] == [
        "response.output_audio.done",
        "response.output_audio_transcript.done",
        "response.content_part.done",
        "response.output_item.done",
    ]
    assert {getattr(e, "item_id", None) or e.item.id for e in done} == {item.id}
    assert done[1].transcript == done[2].part.transcript == "Hello."
    user = p.Item(role="user", content=[p.InputAudio(transcript="hi")])
    between = p.ConversationItemInputAudioTranscriptionCompleted(
        item_id=user.id, transcript="hi", usage=p.TranscriptionUsage(seconds=1.0)
    )
    events = p.item_created(user, "item_0", between)
    assert [e.type for e in events] == [
        "conversation.item.added",
        "conversation.item.input_audio_transcription.completed",
        "conversation.item.done",
    ]
    assert events[0].previous_item_id == events[2].previous_item_id == "item_0"
