"""Limits that hold under abuse, on a real Serve app configured tight ("limits", under `/limits`):
open conversations per token (directly and through the API Gateway emulator), idle conversations closed,
audio per turn. Events per second, message size and reply length are checked on the shared app
(test_serve_app.py)."""

from __future__ import annotations

import asyncio
import time

import pytest
from ray import serve
from websockets.exceptions import ConnectionClosed, InvalidStatus

from devtools.local_gateway import LocalGateway
from devtools.realtime_client import Client, of_type, speech
from serve_app.app import build_app
from tests.conftest import APP_TOKEN, GATEWAY_BRIDGE

APP = "limits"
PER_TOKEN = 2
IDLE_S = 3.0


@pytest.fixture(scope="module")
def limits(serve_app):
    args = {**serve_app["args"]}
    args["ingress"] = {
        **args["ingress"],
        "max_conversations_per_token": PER_TOKEN,
        "idle_timeout_s": IDLE_S,
        "limits": {**args["ingress"]["limits"], "max_turn_seconds": 1.5, "max_reply_seconds": 1.0},
    }
    serve.run(build_app(args), name=APP, route_prefix=f"/{APP}")
    try:
        yield {
            "ws": serve_app["ws"].replace("/v1/realtime", f"/{APP}/v1/realtime"),
            "url": f"{serve_app['url']}/{APP}",
        }
    finally:
        serve.delete(APP)


async def opened(url: str, **query) -> Client:
    return (await Client.open(url, token=APP_TOKEN, **query))[0]


async def test_open_conversations_per_token(limits):
    held = [await opened(limits["ws"]) for _ in range(PER_TOKEN)]
    refused = await Client.connect(limits["ws"], token=APP_TOKEN)
    error = await refused.recv()
    assert error["type"] == "error" and error["error"]["code"] == "limit_exceeded"
    assert "2 open conversations" in error["error"]["message"]
    with pytest.raises(ConnectionClosed) as closed:
        await refused.recv()
    assert closed.value.rcvd.code == 1008
    await held.pop().close()
    await asyncio.sleep(0.5)
    held.append(await opened(limits["ws"]))  # room again once one is closed
    await asyncio.gather(*(c.close() for c in held))


async def test_open_conversations_per_token_through_the_gateway(limits):
    async with LocalGateway(limits["url"], token=APP_TOKEN, **GATEWAY_BRIDGE) as gateway:
        held = [await opened(gateway.url) for _ in range(PER_TOKEN)]
        with pytest.raises(InvalidStatus) as refused:
            await Client.connect(gateway.url, token=APP_TOKEN)
        assert refused.value.response.status_code == 429
        await asyncio.gather(*(c.close() for c in held))
        await asyncio.sleep(0.5)
        again = await opened(gateway.url)  # `$disconnect` gave the places back
        await again.close()


async def test_an_idle_conversation_is_closed(limits):
    client = await opened(limits["ws"])
    started = time.monotonic()
    error = await client.recv(timeout=IDLE_S + 10)
    assert (
        error["type"] == "error"
        and error["error"]["code"] == "limit_exceeded"
        and "idle" in error["error"]["message"]
    )
    with pytest.raises(ConnectionClosed):
        await client.recv(timeout=10)
    assert IDLE_S - 0.5 < time.monotonic() - started < IDLE_S + 5


async def test_idle_time_counts_from_the_end_of_the_last_reply(limits):
    # Not from the person's last message: they were listening to the reply since.
    client = await opened(limits["ws"])
    await client.say_text("are you there")
    await client.until("response.done", timeout=60)
    done = time.monotonic()
    error = await client.recv(timeout=IDLE_S + 10)
    assert error["type"] == "error" and "idle" in error["error"]["message"]
    assert IDLE_S - 0.5 < time.monotonic() - done < IDLE_S + 2


async def test_a_turn_is_cut_at_its_audio_limit_and_the_conversation_goes_on(limits, tmp_path):
    client = await opened(limits["ws"])
    sentence = "the quick brown fox jumps over the lazy dog and keeps on running across the wide fields"
    await client.stream(speech(sentence, tmp_path, lead_s=0.3, tail_s=1.0))  # ~5 s of speech, no pause
    events = await client.until("response.done", timeout=60)
    (error,) = of_type(events, "error")
    assert error["error"]["code"] == "limit_exceeded" and "1.5 s" in error["error"]["message"]
    assert of_type(events, "input_audio_buffer.committed")
    while True:  # the rest of the sentence was a turn of its own (it interrupted the reply): let it end
        try:
            await client.recv(timeout=1.5)
        except TimeoutError:
            break
    await client.say_text("and now")
    assert (await client.until("response.done", timeout=60))[-1]["response"]["status"] in (
        "completed",
        "incomplete",
    )
    await client.close()
