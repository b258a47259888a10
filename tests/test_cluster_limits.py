"""With two ingress replicas a principal is limited as with one: its open conversations are counted in
one place for the cluster (serve_app/principals.py), and a conversation's events, all on the one replica
that holds it, are rate-limited once, on the direct socket and through the bridge alike."""

from __future__ import annotations

import asyncio

import pytest
from websockets.exceptions import InvalidStatus

from devtools.local_gateway import LocalGateway
from devtools.realtime_client import Client
from tests.conftest import APP_TOKEN, GATEWAY_BRIDGE, second_ingress

LIMIT = 3
BURST = 5


@pytest.fixture(scope="module")
def two_replicas(serve_app):
    config = {
        **serve_app["args"]["ingress"],
        "max_conversations_per_token": LIMIT,
        "events_per_second": 0.001,  # no refill during a test: exactly BURST events pass
        "event_burst": BURST,
    }
    with second_ingress(serve_app, "two_replicas", config, num_replicas=2) as url:
        yield url


def ws_url(http_url: str) -> str:
    return http_url.replace("http://", "ws://") + "/v1/realtime"


async def open_until_refused(url: str) -> tuple[list[Client], list[str], str | int]:
    """Open conversations for the token until one is refused: (the open ones, their replicas, the
    refusal: the socket's `error` code, or the bridge's handshake status)."""
    clients, replicas = [], []
    for _ in range(2 * LIMIT + 2):
        try:
            client = await Client.connect(url, token=APP_TOKEN)
        except InvalidStatus as e:  # the bridge refuses the handshake
            return clients, replicas, e.response.status_code
        first = await client.recv()
        if first["type"] == "error":  # the direct socket says why, then closes
            await client.close()
            return clients, replicas, first["error"]["code"]
        info = await client.recv()
        clients.append(client)
        replicas.append(info["replica"])
    pytest.fail(f"{len(clients)} conversations opened; the limit is {LIMIT}")


async def rate_limited(client: Client, events: int) -> int:
    """Send `events` harmless events at once; how many were refused as over the rate."""
    for _ in range(events):
        await client.send("input_audio_buffer.clear")
    await client.say_text("and this one")  # two more, both over the rate: refused too
    refused = 0
    for _ in range(events + 2):
        event = await client.recv(timeout=30)
        while event["type"] not in ("input_audio_buffer.cleared", "error"):
            event = await client.recv(timeout=30)
        refused += event["type"] == "error" and event["error"]["code"] == "rate_limited"
    return refused


async def test_a_principal_is_limited_across_replicas_on_the_socket(two_replicas):
    clients, replicas, status = await open_until_refused(ws_url(two_replicas))
    try:
        assert len(clients) == LIMIT and status == "limit_exceeded"
        assert len(set(replicas)) == 2, replicas  # the conversations were spread over both replicas
        assert await rate_limited(clients[0], BURST + 3) == 3 + 2
    finally:
        for client in clients:
            await client.close()
    again, _, _ = await open_until_refused(ws_url(two_replicas))  # the places came back, on both
    assert len(again) == LIMIT
    for client in again:
        await client.close()


async def test_a_principal_is_limited_across_replicas_through_the_bridge(two_replicas):
    # A bridged connection lives on the replica its id hashes to (`ConnectionRouter`): 3 of them all land
    # on one of two replicas a quarter of the time, so the test opens them again until they are spread.
    async with LocalGateway(two_replicas, token=APP_TOKEN, use_authorizer=True, **GATEWAY_BRIDGE) as gw:
        for _ in range(6):
            clients, replicas, status = await open_until_refused(gw.url)
            try:
                assert len(clients) == LIMIT and status == 429  # one limit for both replicas
                if len(set(replicas)) == 2:
                    assert await rate_limited(clients[-1], BURST + 3) == 3 + 2
                    return
            finally:
                for client in clients:
                    await client.close()
            await asyncio.sleep(1.0)  # the closed conversations' places come back
        pytest.fail(f"6 times, every conversation went to one replica: {replicas}")
