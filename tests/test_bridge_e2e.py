"""The AWS-shaped path, all on this machine: WebSocket client → local API Gateway emulator → the real
Lambda handlers → the real Serve app → boto3 `post_to_connection` → the emulator → the client.

The handlers present the bridge's own token (`GATEWAY_BRIDGE`), and the emulator serves `@connections` at
the one callback URL the app is configured with (`BRIDGE_CALLBACK_URL`)."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
from ray import serve
from websockets.exceptions import InvalidStatus

from devtools.local_gateway import LocalGateway
from devtools.realtime_client import Client, assert_spoken_turn, of_type, speech, whole_reply
from tests.conftest import APP_TOKEN, BRIDGE_CALLBACK_URL, GATEWAY_BRIDGE, second_ingress

FRAME = 1920


@pytest.fixture
async def gateway(serve_app):
    async with LocalGateway(serve_app["url"], token=APP_TOKEN, **GATEWAY_BRIDGE) as gw:
        assert gw.callback_url == BRIDGE_CALLBACK_URL  # where the app posts its replies
        yield gw


async def connect(gateway: LocalGateway, **query) -> Client:
    client, info = await Client.open(gateway.url, token=APP_TOKEN, **query)
    assert info["random_weights"] is True
    return client


async def test_a_spoken_turn_through_the_gateway(gateway, tmp_path):
    client = await connect(gateway)
    await client.stream(speech("hello world", tmp_path))
    events = await client.until("response.done")
    assert_spoken_turn(events)
    assert of_type(events, "response.done")[0]["response"]["status"] == "completed"
    whole_reply(events)
    await client.close()
    # Every client message went through `$default`, and each was one event the ingress took.
    appends = [e for route, e in gateway.invocations if route == "$default"]
    assert len(appends) == len(speech("hello world", tmp_path)) // 1920 + 1


async def test_a_typed_turn_and_a_bad_message_through_the_gateway(gateway):
    client = await connect(gateway)
    await client.send_raw("not json")
    assert (await client.recv())["error"]["code"] == "invalid_json"
    await client.say_text("what is the weather like")
    events = await client.until("response.done")
    reply = whole_reply(events)
    assert reply == "You said: what is the weather like."
    await client.close()


async def active_conversations(url: str) -> int:
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        return (await http.get("/readyz")).json()["conversations"]


async def test_leaving_mid_reply_cancels_it_and_keeps_the_history(serve_app):
    """The person closes the tab and API Gateway's `$disconnect` never comes (it is best-effort): the
    ingress learns it from `GoneException`, stops the reply, frees the engine slot, keeps the history."""
    generator = serve.get_deployment_handle("CSMGenerator", "csm")
    before = await active_conversations(serve_app["url"])
    async with LocalGateway(
        serve_app["url"], token=APP_TOKEN, deliver_disconnect=False, **GATEWAY_BRIDGE
    ) as gw:
        client, info = await Client.open(gw.url, token=APP_TOKEN)
        await client.say_text("tell me a long story about the sea")
        await client.until("response.output_audio.delta")
        await client.close()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if (
                await active_conversations(serve_app["url"]) == before
                and (await generator.info.remote())["running"] == 0
            ):
                break
            await asyncio.sleep(0.2)
        else:
            pytest.fail("the conversation outlived its connection")
    assert not [route for route, _ in gw.invocations if route == "$disconnect"]
    with open(f"{serve_app['args']['ingress']['history_dir']}/{info['conversation_id']}.jsonl") as f:
        records = [json.loads(line) for line in f]
    turns = [(r["role"], r["text"]) for r in records if r["kind"] == "turn"]
    assert turns[0] == ("user", "tell me a long story about the sea")
    assert turns[1][0] == "assistant"  # what was said before the person left


async def test_a_disconnect_ends_the_conversation(serve_app):
    before = await active_conversations(serve_app["url"])
    async with LocalGateway(serve_app["url"], token=APP_TOKEN, **GATEWAY_BRIDGE) as gw:
        client = await connect(gw)
        assert await active_conversations(serve_app["url"]) == before + 1
        await client.close()
        deadline = time.monotonic() + 10
        while await active_conversations(serve_app["url"]) != before:
            assert time.monotonic() < deadline, "the conversation outlived its connection"
            await asyncio.sleep(0.1)
    assert [route for route, _ in gw.invocations if route == "$disconnect"]


@pytest.mark.parametrize("bridge_token", [APP_TOKEN, "guess", None])
async def test_the_bridge_needs_its_own_token(serve_app, bridge_token):
    """Handlers holding the users' token (or a wrong one, or none) are refused by the ingress: the person's
    handshake fails with 500 (`bridge misconfigured`) and no conversation is opened."""
    before = await active_conversations(serve_app["url"])
    bridge = {**GATEWAY_BRIDGE, "bridge_token": bridge_token}
    async with LocalGateway(serve_app["url"], token=APP_TOKEN, **bridge) as gw:
        with pytest.raises(InvalidStatus) as refused:
            await Client.connect(gw.url, token=APP_TOKEN)
    assert refused.value.response.status_code == 500
    assert await active_conversations(serve_app["url"]) == before


@pytest.fixture(scope="module")
def one_per_principal(serve_app):
    """A second ingress on the same models, holding one open conversation per principal."""
    config = {**serve_app["args"]["ingress"], "max_conversations_per_token": 1}
    with second_ingress(serve_app, "bridge_principals", config) as url:
        yield url


async def test_the_authorizers_principal_is_the_one_counted(one_per_principal):
    """The principal the authorizer put in its context is whom the ingress counts; a `principal` the
    person adds to the query changes nothing."""
    async with LocalGateway(one_per_principal, token=APP_TOKEN, use_authorizer=True, **GATEWAY_BRIDGE) as gw:
        first = await connect(gw)
        with pytest.raises(InvalidStatus) as refused:
            await Client.connect(gw.url, token=APP_TOKEN, principal="someone-else")
        assert refused.value.response.status_code == 429
        await first.close()
        await asyncio.sleep(0.5)
        again = await connect(gw)  # its place is free again
        await again.close()
    connects = [e for route, e in gw.invocations if route == "$connect"]
    assert {e["requestContext"]["authorizer"]["principal"] for e in connects} == {"shared-token"}
