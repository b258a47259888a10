"""The realtime protocol against the installed `openai` package's GA types: every client model takes
exactly the GA fields (plus our `x-` extensions), every event type we send or take is a GA one, and, on
the real app over a raw WebSocket, an unknown parameter (the beta API's `session.voice`) costs one
`unknown_parameter` error and the conversation goes on."""

from __future__ import annotations

import typing

import pytest
from openai.types.realtime import (
    RealtimeClientEvent,
    RealtimeServerEvent,
    audio_transcription_param,
    conversation_item_create_event_param,
    conversation_item_truncate_event_param,
    input_audio_buffer_append_event_param,
    realtime_audio_config_input_param,
    realtime_audio_config_output_param,
    realtime_audio_config_param,
    realtime_audio_formats_param,
    realtime_audio_input_turn_detection_param,
    realtime_conversation_item_user_message_param,
    realtime_response_create_audio_output_param,
    realtime_response_create_params_param,
    realtime_session_create_request_param,
    response_cancel_event_param,
    response_create_event_param,
    session_update_event_param,
)
from pydantic import BaseModel

from devtools.realtime_client import Client, of_type, whole_reply
from serve_app import protocol as p
from tests.conftest import APP_TOKEN

FRAME = 1920
EXTENSIONS = {"x-sampling", "x-seq"}  # ours, named so that no OpenAI field is shadowed

PAIRS: list[tuple[type[BaseModel], type]] = [
    (p.SessionUpdate, session_update_event_param.SessionUpdateEventParam),
    (p.SessionConfig, realtime_session_create_request_param.RealtimeSessionCreateRequestParam),
    (p.AudioConfig, realtime_audio_config_param.RealtimeAudioConfigParam),
    (p.AudioInput, realtime_audio_config_input_param.RealtimeAudioConfigInputParam),
    (p.AudioOutput, realtime_audio_config_output_param.RealtimeAudioConfigOutputParam),
    (p.AudioFormat, realtime_audio_formats_param.AudioPCM),
    (p.ServerVad, realtime_audio_input_turn_detection_param.ServerVad),
    (p.InputTranscription, audio_transcription_param.AudioTranscriptionParam),
    (p.InputAudioBufferAppend, input_audio_buffer_append_event_param.InputAudioBufferAppendEventParam),
    (p.ConversationItemCreate, conversation_item_create_event_param.ConversationItemCreateEventParam),
    (p.InputMessage, realtime_conversation_item_user_message_param.RealtimeConversationItemUserMessageParam),
    (p.InputText, realtime_conversation_item_user_message_param.Content),
    (p.ConversationItemTruncate, conversation_item_truncate_event_param.ConversationItemTruncateEventParam),
    (p.ResponseCreate, response_create_event_param.ResponseCreateEventParam),
    (p.ResponseParams, realtime_response_create_params_param.RealtimeResponseCreateParamsParam),
    (p.ResponseAudioOutput, realtime_response_create_audio_output_param.Output),
    (p.ResponseCancel, response_cancel_event_param.ResponseCancelEventParam),
]


def accepted(model: type[BaseModel]) -> set[str]:
    return {field.alias or name for name, field in model.model_fields.items()}


@pytest.mark.parametrize(("ours", "theirs"), PAIRS, ids=[ours.__name__ for ours, _ in PAIRS])
def test_each_client_model_takes_exactly_the_ga_fields(ours: type[BaseModel], theirs: type) -> None:
    assert accepted(ours) - EXTENSIONS == set(typing.get_type_hints(theirs))


def _types(union: object) -> set[str]:
    """The `type` literals of a (possibly Annotated) union of the package's event models."""
    out: set[str] = set()
    for member in typing.get_args(union):
        if isinstance(member, type) and issubclass(member, BaseModel):
            out |= set(typing.get_args(member.model_fields["type"].annotation))
        else:
            out |= _types(member)
    return out


def test_every_event_type_is_a_ga_one() -> None:
    server = {cls.model_fields["type"].default for cls in _subclasses(p.ServerEvent)}
    ours = {t for t in server if not t.startswith("x-")}
    assert ours <= _types(RealtimeServerEvent), ours - _types(RealtimeServerEvent)
    assert {"conversation.item.added", "conversation.item.done"} <= ours  # what GA clients wait for
    assert set(p.CLIENT_EVENT_TYPES) <= _types(RealtimeClientEvent)


def _subclasses(cls: type) -> list[type]:
    out = []
    for sub in cls.__subclasses__():
        out += [sub, *_subclasses(sub)]
    return out


async def test_an_unknown_parameter_is_refused_and_the_conversation_goes_on(serve_app):
    client, _ = await Client.open(serve_app["ws"], token=APP_TOKEN)
    # The beta API put the voice here; the GA API has it at session.audio.output.voice.
    await client.send("session.update", event_id="beta", session={"voice": "narrator"})
    error = (await client.until("error"))[-1]["error"]
    assert (error["type"], error["code"], error["param"]) == (
        "invalid_request_error",
        "unknown_parameter",
        "session.voice",
    )
    assert error["event_id"] == "beta" and "session.audio.output.voice" in error["message"]
    await client.send("session.update", session={"audio": {"output": {"voice": "narrator"}}, "tools": []})
    updated = (await client.until("session.updated"))[-1]["session"]
    assert updated["audio"]["output"]["voice"] == "narrator" and "tools" not in updated
    await client.say_text("Hello there")
    events = await client.until("response.done")
    assert of_type(events, "response.done")[0]["response"]["status"] == "completed"
    whole_reply(events)
    await client.close()
