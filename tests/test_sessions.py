"""`Sessions` and `BridgedConversations` without Ray: admission gives back every place it took (on a
refusal, an error, a double close), a newer connection takes a conversation over whichever carrier holds
it, and a bridged conversation the server ends closes its API Gateway connection. The conversations are
real (history on disk, the silero VAD); no model is called, since no turn is spoken."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from serve_app import protocol as p
from serve_app.bridge import BridgeAccess, BridgedConversations
from serve_app.conversation import Limits, Shared
from serve_app.history import HistoryStore
from serve_app.ingress_config import IngressConfig
from serve_app.sessions import CLOSE_TAKEN_OVER, Refused, Sessions
from serve_app.voices import VoiceLibrary
from speech.vad import load_vad_model


def info(conversation_id: str) -> p.ServerInfo:
    return p.ServerInfo(
        conversation_id=conversation_id,
        voices=[],
        default_voice="none",
        random_weights=True,
        max_reply_seconds=1.0,
        replica="test",
    )


async def hello(conversation_id: str) -> p.ServerInfo:
    return info(conversation_id)


def sessions_for(tmp_path: Path, hello=hello, **config) -> tuple[Sessions, list[int]]:
    shared = Shared(
        HistoryStore(tmp_path / "history"), VoiceLibrary(None, None), load_vad_model(), Limits(), "none"
    )
    counts: list[int] = []
    return Sessions(IngressConfig(**config), None, shared, hello, counts.append), counts  # type: ignore[arg-type]


def drained(queue: asyncio.Queue) -> list:
    items = []
    while not queue.empty():
        items.append(queue.get_nowait())
    return items


def assert_all_given_back(sessions: Sessions, max_conversations: int) -> None:
    assert sessions.slots._value == max_conversations and not sessions.per_principal
    assert not sessions.active and not sessions.live


async def test_places_are_refused_at_once_and_given_back_once(tmp_path):
    sessions, counts = sessions_for(tmp_path, max_conversations=2, max_conversations_per_token=1)
    alice = await sessions.open("alice", None)
    with pytest.raises(Refused) as refused:
        await sessions.open("alice", None)
    assert refused.value.code == "limit_exceeded" and "1 open conversations" in str(refused.value)
    bob = await sessions.open("bob", None)
    with pytest.raises(Refused) as refused:
        await sessions.open("carol", None)
    assert refused.value.code == "server_busy"
    await sessions.close(alice)
    await sessions.close(alice)  # a second close gives nothing back twice
    assert sessions.slots._value == 1 and dict(sessions.per_principal) == {"bob": 1}
    await sessions.close(bob)
    assert_all_given_back(sessions, 2)
    assert counts == [1, 2, 1, 0]


async def test_a_refused_or_failed_open_keeps_nothing(tmp_path):
    sessions, _ = sessions_for(tmp_path, max_conversations=1)
    with pytest.raises(Refused) as refused:
        await sessions.open("alice", "conv_" + "0" * 32)
    assert refused.value.code == "conversation_not_found"
    assert_all_given_back(sessions, 1)

    async def broken(conversation_id: str) -> p.ServerInfo:
        raise ConnectionError("the generator did not answer")

    sessions, _ = sessions_for(tmp_path, hello=broken, max_conversations=1)
    with pytest.raises(ConnectionError):
        await sessions.open("alice", None)
    assert_all_given_back(sessions, 1)
    assert not list((tmp_path / "history").glob("*.live"))  # the history lease went too


async def test_a_newer_session_takes_the_conversation_over(tmp_path):
    sessions, _ = sessions_for(tmp_path)
    first = await sessions.open("alice", None)
    second = await sessions.open("alice", first.id)
    assert sessions.live[first.id] is second
    events = drained(first.outbox)
    assert events[-1] is None and events[-2].error.code == "conversation_taken_over"
    assert first.close_code == CLOSE_TAKEN_OVER
    await sessions.close(first)
    assert sessions.live[first.id] is second  # the older one's close leaves the newer one's place
    await sessions.close(second)
    assert_all_given_back(sessions, 16)


class RecordingSink:
    def __init__(self, fail: bool = False) -> None:
        self.sent: list[dict] = []
        self.closed: list[str] = []
        self.fail = fail

    async def send(self, connection_id: str, data: str) -> bool:
        if self.fail:
            raise RuntimeError("the sink broke")
        self.sent.append(json.loads(data))
        return True

    async def close(self, connection_id: str) -> None:
        self.closed.append(connection_id)


def bridge_for(sessions: Sessions, sink) -> BridgedConversations:
    return BridgedConversations(BridgeAccess("bridge", "http://gateway"), sessions, lambda url: sink)


async def connect(bridge: BridgedConversations, connection_id: str, **body) -> tuple[int, dict]:
    answer = await bridge.connect(connection_id, json.dumps({"principal": "alice", **body}).encode())
    return answer.status_code, json.loads(answer.body)


async def until(condition, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


async def test_a_bridged_conversation_taken_over_here_is_told_and_its_connection_closed(tmp_path):
    # A bridged session is one of this replica's sessions like a socket's: a newer connection here takes
    # it over at once (not at the next lease check), and its API Gateway connection is deleted.
    sessions, _ = sessions_for(tmp_path)
    sink = RecordingSink()
    bridge = bridge_for(sessions, sink)
    status, body = await connect(bridge, "c1")
    assert status == 200
    assert await connect(bridge, "c1") == (200, body)  # a retried connect opens nothing more
    newer = await sessions.open("alice", body["conversation_id"])
    await until(lambda: sink.closed)
    assert sink.closed == ["c1"] and "c1" not in bridge.connections
    assert [e["type"] for e in sink.sent] == ["session.created", "x-server.info", "error"]
    assert sink.sent[-1]["error"]["code"] == "conversation_taken_over"
    assert (await bridge.disconnect("c1")).body == b'{"conversation_id":null}'
    await sessions.close(newer)
    assert_all_given_back(sessions, 16)


async def test_a_bridged_conversation_ends_cleanly_whatever_ends_it(tmp_path):
    sessions, _ = sessions_for(tmp_path, max_conversations=1)
    sink = RecordingSink()
    bridge = bridge_for(sessions, sink)
    _, body = await connect(bridge, "c1")
    assert (await connect(bridge, "c2"))[0] == 503  # one place, held
    answer = await bridge.disconnect("c1")
    assert json.loads(answer.body) == body and sink.closed == []  # the person left: nothing to close
    assert_all_given_back(sessions, 1)

    # A sink that breaks ends its conversation, gives its place back and closes the connection.
    broken = RecordingSink(fail=True)
    bridge = bridge_for(sessions, broken)
    assert (await connect(bridge, "c3"))[0] == 200
    await until(lambda: broken.closed)
    assert "c3" not in bridge.connections
    assert_all_given_back(sessions, 1)

    # A sink that cannot be made (no region for boto3, say) leaves nothing open.
    def no_sink(url: str):
        raise ValueError("no region")

    bridge = BridgedConversations(BridgeAccess("bridge", "http://gateway"), sessions, no_sink)
    with pytest.raises(ValueError):
        await connect(bridge, "c4")
    assert_all_given_back(sessions, 1)


def typed(seq: int, text: str) -> str:
    item = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}
    return json.dumps({"type": "conversation.item.create", "item": item, "x-seq": seq})


def typed_texts(session) -> list[str]:
    return [
        e.item.content[0].text
        for e in drained(session.outbox)
        if e is not None and e.type == "conversation.item.added"
    ]


async def test_numbered_events_are_applied_in_the_clients_order(tmp_path):
    sessions, _ = sessions_for(tmp_path)
    session = await sessions.open("alice", None)
    drained(session.outbox)
    for seq in (3, 1, 2):  # as concurrent `$default` invocations may deliver them
        await session.receive(typed(seq, f"turn {seq}"))
    assert typed_texts(session) == ["turn 1", "turn 2", "turn 3"]
    # A numbered message the server does not take (bad JSON for the protocol) holds nothing up after it.
    await session.receive(json.dumps({"type": "conversation.item.create", "x-seq": 4}))
    await session.receive(typed(5, "turn 5"))
    assert typed_texts(session) == ["turn 5"] and session.order.waiting == 0
    # One that never comes is stepped over at close: what waited for it is applied, nothing is lost.
    await session.receive(typed(7, "turn 7"))
    assert typed_texts(session) == [] and session.order.waiting == 1
    await sessions.close(session)
    assert typed_texts(session) == ["turn 7"] and session.order.stats.gaps == 1
