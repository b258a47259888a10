"""Hostile input, property-based (hypothesis), against the real Serve app and the real bridge.

Random and mutated realtime events (wrong types, missing and extra fields, huge strings, unicode,
base64 that is not audio, audio at the wrong rate, binary and broken UTF-8 frames) go over real sockets,
directly and through the API Gateway emulator; random payloads hit the ingress's bridge endpoints and
the Lambda handlers. What must hold: the server never crashes, each hostile conversation still answers
afterwards, and a bystander conversation replying meanwhile is not affected.
"""

from __future__ import annotations

import asyncio
import base64
import json
import string

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from devtools.local_gateway import LocalGateway
from devtools.realtime_client import Client, of_type, whole_reply
from lambda_bridge import handlers
from serve_app import protocol as p
from tests.conftest import APP_TOKEN, BRIDGE_TOKEN, GATEWAY_BRIDGE
from tests.standins import FakeIngress, http_server

FRAME = 1920
SETTINGS = settings(
    max_examples=25,
    deadline=None,
    derandomize=True,  # the same examples every run: a failure here is reproducible, never flaky
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    database=None,
)

# ---- what a hostile client sends --------------------------------------------------------------------
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
tone_16k = np.sin(np.arange(1600) * 2 * np.pi * 440 / 16000) * 8000  # 100 ms of audio at the wrong rate
not_audio = st.sampled_from(
    [
        "@@not base64@@",
        base64.b64encode(b"abc").decode(),  # an odd number of bytes: not whole samples
        "A" * 200_000,  # over the per-message audio limit
        base64.b64encode(tone_16k.astype("<i2").tobytes()).decode(),  # valid PCM, wrong rate: accepted
        "",
        "💥",
    ]
)
VALID = [
    {"type": "input_audio_buffer.append", "audio": base64.b64encode(bytes(3840)).decode()},
    {"type": "input_audio_buffer.commit"},
    {"type": "input_audio_buffer.clear"},
    {"type": "session.update", "session": {"audio": {"output": {"voice": "narrator"}}}},
    {
        "type": "session.update",
        "session": {"audio": {"input": {"format": {"type": "audio/pcm", "rate": 16000}}}},
    },
    {"type": "session.update", "session": {"instructions": "be brief", "x-sampling": {"temperature": 0.5}}},
    {
        "type": "conversation.item.create",
        "item": {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]},
    },
    {"type": "conversation.item.truncate", "item_id": "item_x", "content_index": 0, "audio_end_ms": 10},
    {"type": "response.create"},
    {"type": "response.cancel"},
]


@st.composite
def mutated(draw) -> dict:
    event = json.loads(json.dumps(draw(st.sampled_from(VALID))))
    target = event
    while isinstance(target, dict) and draw(st.booleans()):  # walk into a nested object
        nested = [v for v in target.values() if isinstance(v, dict)]
        if not nested:
            break
        target = draw(st.sampled_from(nested))
    key = draw(st.sampled_from(sorted(target)) if target else st.just("type"))
    how = draw(st.sampled_from(["replace", "delete", "huge", "unicode", "audio", "extra"]))
    if how == "replace":
        target[key] = draw(json_values)
    elif how == "delete":
        target.pop(key, None)
    elif how == "huge":
        target[key] = "x" * draw(st.sampled_from([5_000, 140_000]))
    elif how == "unicode":
        target[key] = draw(st.text(alphabet=st.characters(codec="utf-8"), min_size=1, max_size=40))
    elif how == "audio":
        event["audio"] = draw(not_audio)
    else:
        target[draw(st.text(max_size=10))] = draw(json_values)
    return event


def as_wire(value) -> str:
    return json.dumps(value, ensure_ascii=False)


messages = st.one_of(
    mutated().map(as_wire),
    st.sampled_from(VALID).map(as_wire),
    json_values.map(as_wire),
    st.builds(
        lambda t, v: as_wire({"type": t, "payload": v}),
        st.sampled_from([*p.CLIENT_EVENT_TYPES, "x-evil", ""]),
        json_values,
    ),
    st.text(max_size=60),  # not JSON
    st.binary(max_size=60),  # a binary frame (the direct socket answers it with an error; API Gateway closes)
)
text_messages = messages.filter(lambda m: isinstance(m, str))


# ---- the checks -------------------------------------------------------------------------------------
async def open_conversation(url: str, **query) -> Client:
    return (await Client.open(url, token=APP_TOKEN, **query))[0]


async def still_answers(client: Client) -> None:
    """A marker event that must come back as its own error: the conversation reads and answers."""
    await client.send(
        "conversation.item.truncate",
        item_id="item_marker",
        content_index=0,
        audio_end_ms=0,
        event_id="marker",
    )
    while True:
        event = await client.recv(timeout=30)
        if event["type"] == "error" and event["error"]["event_id"] == "marker":
            assert event["error"]["code"] == "item_not_found"
            return


async def hostile(url: str, batch: list[str | bytes]) -> None:
    client = await open_conversation(url)
    try:
        for message in batch:
            await client.send_raw(message)
        await still_answers(client)
    finally:
        await client.close()


async def with_bystander(url: str, fuzz) -> None:
    """Run `fuzz` (blocking: hypothesis drives it) while a bystander's reply streams; then check both."""
    bystander = await open_conversation(url)
    text = "a bystander reply that takes a while to say"
    await bystander.say_text(text)
    events, _ = await asyncio.gather(bystander.until("response.done", timeout=180), asyncio.to_thread(fuzz))
    assert not of_type(events, "error")
    whole_reply(events)
    await bystander.say_text("and again")
    assert (await bystander.until("response.done", timeout=120))[-1]["response"]["status"] == "completed"
    await bystander.close()


async def test_hostile_events_over_the_socket(serve_app):
    @SETTINGS
    @given(batch=st.lists(messages, min_size=1, max_size=8))
    def fuzz(batch):
        asyncio.run(hostile(serve_app["ws"], batch))

    await with_bystander(serve_app["ws"], fuzz)
    # A conversation that took a whole barrage still holds a turn afterwards.
    client = await open_conversation(serve_app["ws"])
    for message in [*VALID[:3], "}{", b"\x00", as_wire({"type": "response.create", "response": [1]})]:
        await client.send_raw(as_wire(message) if isinstance(message, dict) else message)
    await client.say_text("after the storm")
    events = await client.until("response.done", timeout=120)
    assert of_type(events, "response.done")[-1]["response"]["status"] == "completed"
    await client.close()


async def test_hostile_events_through_the_gateway(serve_app):
    async with LocalGateway(serve_app["url"], token=APP_TOKEN, **GATEWAY_BRIDGE) as gateway:

        @settings(SETTINGS, max_examples=12)
        @given(
            batch=st.lists(
                text_messages.filter(lambda m: len(m.encode()) <= 32 * 1024), min_size=1, max_size=6
            )
        )
        def fuzz(batch):
            asyncio.run(hostile(gateway.url, batch))

        # The gateway's handlers run in this process: the fuzz's own event loops use the same ones.
        await with_bystander(gateway.url, fuzz)


ids = st.text(alphabet=string.ascii_letters + string.digits + "+/=-_%.", min_size=1, max_size=40)


async def test_hostile_bridge_payloads_get_4xx_and_break_nothing(serve_app):
    """Random connection ids and bodies on the ingress's bridge endpoints: refused with a 4xx, never a
    5xx, and nothing is opened without the bridge's token."""
    url = serve_app["url"]

    async def poke(connection_id: str, body, authorized: bool) -> list[int]:
        headers = {"serve_multiplexed_model_id": connection_id}
        if authorized:
            headers["Authorization"] = f"Bearer {BRIDGE_TOKEN}"  # the bridge's own: past the first check
        path = f"/bridge/connections/{connection_id.replace('%', '%25')}"
        async with httpx.AsyncClient(base_url=url, timeout=30, headers=headers) as http:
            content = body if isinstance(body, bytes) else as_wire(body)
            return [
                (await http.post(path, content=content)).status_code,
                (await http.post(path + "/events", content=content)).status_code,
                (await http.delete(path)).status_code,
            ]

    @settings(SETTINGS, max_examples=40)
    @given(
        connection_id=ids,
        body=st.one_of(
            json_values,
            st.binary(max_size=40),
            st.fixed_dictionaries({"callback_url": json_values, "conversation_id": json_values}),
            st.fixed_dictionaries({"token": json_values, "callback_url": st.just("http://127.0.0.1:9")}),
        ),
        authorized=st.booleans(),
    )
    def fuzz(connection_id, body, authorized):
        if authorized and isinstance(body, dict) and isinstance(body.get("callback_url"), str):
            body = {**body, "callback_url": 12}  # never open a real conversation towards nowhere
        statuses = asyncio.run(poke(connection_id, body, authorized))
        assert all(400 <= s < 500 for s in statuses[:2]), statuses
        assert statuses[2] in (200, 401) and (statuses[2] == 200) == authorized

    before = await asyncio.to_thread(lambda: httpx.get(f"{url}/readyz", timeout=30).json()["conversations"])
    await asyncio.to_thread(fuzz)
    after = await asyncio.to_thread(lambda: httpx.get(f"{url}/readyz", timeout=30).json()["conversations"])
    assert after == before


@pytest.fixture(scope="module")
def bridge_env():
    """`$default` pointed at a stand-in ingress that accepts everything, and a closed @connections port."""
    import os

    from lambda_bridge import settings as bridge_settings

    saved = dict(os.environ)
    with http_server(FakeIngress()) as (url, _):
        os.environ.update(SERVE_URL=url, CALLBACK_URL="http://127.0.0.1:9/s", FORWARD_DEADLINE_S="2")
        os.environ.update(AWS_ACCESS_KEY_ID="t", AWS_SECRET_ACCESS_KEY="t", AWS_DEFAULT_REGION="us-east-1")
        bridge_settings.reset()
        handlers.serve.cache_clear()
        try:
            yield
        finally:
            os.environ.clear()
            os.environ.update(saved)
            bridge_settings.reset()
            handlers.serve.cache_clear()


@settings(SETTINGS, max_examples=60)
@given(body=st.one_of(st.text(max_size=200), st.none()), b64=st.booleans(), extra=json_values)
def test_the_default_handler_takes_any_body(bridge_env, body, b64, extra):
    """Whatever API Gateway hands `$default`, it forwards it or reports, and always returns 200."""
    event = {
        "requestContext": {"connectionId": "fuzz=", "domainName": "x", "stage": "s", "extra": extra},
        "body": body,
        "isBase64Encoded": b64,
    }
    assert handlers.default(event, None) == {"statusCode": 200}
