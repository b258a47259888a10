"""Conversations belong to their principal, on a real Serve app with two named tokens ("owners", under
`/owners`): the server makes the ids, a resume by anyone else is refused with the same answer as a
resume of an id that never existed, the newest socket holds a conversation, and the bounds hold; then
the same through the API Gateway emulator, with Cognito users as the principals."""

from __future__ import annotations

import base64
import json
import os
import re
from collections.abc import Callable, Iterator

import httpx
import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from ray import serve
from websockets.exceptions import ConnectionClosed, InvalidStatus

from devtools.local_gateway import LocalGateway
from devtools.realtime_client import Client, of_type
from serve_app.app import build_app
from serve_app.ingress import ConversationIngress, IngressConfig, access
from tests.conftest import APP_TOKEN, GATEWAY_BRIDGE
from tests.standins import http_server
from tests.test_authorizer_jwt import id_claims, jwk, leave_pool, sign, use_pool

APP = "owners"
ALICE, BOB = "alice-s3cret", "bob-0ther"


@pytest.fixture(scope="module")
def owners(serve_app):
    args = {**serve_app["args"]}
    args["ingress"] = {**args["ingress"], "tokens": {"alice": ALICE, "bob": BOB}}
    serve.run(build_app(args), name=APP, route_prefix=f"/{APP}")
    try:
        yield {
            "ws": serve_app["ws"].replace("/v1/realtime", f"/{APP}/v1/realtime"),
            "history": serve_app["args"]["ingress"]["history_dir"],
        }
    finally:
        serve.delete(APP)


async def refused(url: str, **query) -> tuple[dict, int]:
    """Connect; the one `error` event the server sends, and the close code that follows."""
    client = await Client.connect(url, **query)
    error = await client.recv()
    assert error["type"] == "error", error
    with pytest.raises(ConnectionClosed) as closed:
        await client.recv()
    return error["error"], closed.value.rcvd.code


async def talk(client: Client, text: str) -> None:
    await client.say_text(text)
    done = of_type(await client.until("response.done"), "response.done")[0]["response"]
    assert done["status"] == "completed"


async def test_the_server_makes_the_ids_and_another_principal_cannot_resume(owners):
    alice, info = await Client.open(owners["ws"], token=ALICE)
    conversation = info["conversation_id"]
    assert re.fullmatch(r"conv_[0-9a-f]{32}", conversation)
    await talk(alice, "my bank password is blue")
    await alice.close()
    path = f"{owners['history']}/{conversation}.jsonl"
    before = open(path, "rb").read()

    by_bob, bob_code = await refused(owners["ws"], token=BOB, conversation_id=conversation)
    never, never_code = await refused(owners["ws"], token=BOB, conversation_id="conv_" + "0" * 32)
    chosen, chosen_code = await refused(owners["ws"], token=ALICE, conversation_id="my_own_id")
    assert by_bob["code"] == "conversation_not_found" and bob_code == 1008
    assert (by_bob, bob_code) == (never, never_code) == (chosen, chosen_code)  # the same: nothing leaks
    assert open(path, "rb").read() == before  # refused attempts leave the history as it was
    assert not any(name.startswith("my_own_id") for name in os.listdir(owners["history"]))

    again, info = await Client.open(owners["ws"], token=ALICE, conversation_id=conversation)
    assert info["conversation_id"] == conversation
    await again.send("response.create")  # the echo answers the last turn it finds: hers
    events = await again.until("response.done")
    said = of_type(events, "response.output_audio_transcript.done")[0]["transcript"]
    assert said == "You said: my bank password is blue."
    await again.close()


async def test_a_newer_socket_takes_the_conversation_over(owners):
    """The second socket of the owner on a live conversation gets it (a page reconnecting after a
    dropped connection need not wait for the server to notice); the first is told, then closed (4001)."""
    first, info = await Client.open(owners["ws"], token=ALICE)
    conversation = info["conversation_id"]
    await talk(first, "first words")
    second, again = await Client.open(owners["ws"], token=ALICE, conversation_id=conversation)
    assert again["conversation_id"] == conversation
    error = (await first.until("error"))[-1]["error"]
    assert error["code"] == "conversation_taken_over"
    with pytest.raises(ConnectionClosed) as closed:
        await first.recv()
    assert closed.value.rcvd.code == 4001
    await second.send("response.create")  # the history is the conversation's, on the new socket
    said = of_type(await second.until("response.done"), "response.output_audio_transcript.done")
    assert said[0]["transcript"] == "You said: first words."
    await second.close()
    by_bob, code = await refused(owners["ws"], token=BOB, conversation_id=conversation)
    assert by_bob["code"] == "conversation_not_found" and code == 1008  # taking over is the owner's alone


async def test_item_ids_are_the_servers(owners):
    client, _ = await Client.open(owners["ws"], token=ALICE)
    item = {
        "id": "item_mine",
        "type": "message",
        "role": "user",
        "content": [{"type": "input_text", "text": "x"}],
    }
    await client.send("conversation.item.create", item=item)
    error = (await client.until("error"))[-1]["error"]
    assert error["code"] == "invalid_event" and "assigned by the server" in error["message"]
    await client.close()


async def test_system_notes_and_instructions_are_bounded(owners, serve_app):
    limits = serve_app["args"]["ingress"].get("limits", {})
    notes = limits.get("max_system_notes", 32)
    client, _ = await Client.open(owners["ws"], token=BOB)
    note = {"type": "message", "role": "system", "content": [{"type": "input_text", "text": "be brief"}]}
    for _ in range(notes):
        await client.send("conversation.item.create", item=note)
        await client.until("conversation.item.done")
    await client.send("conversation.item.create", item=note)
    error = (await client.until("error"))[-1]["error"]
    assert error["code"] == "limit_exceeded" and "system notes" in error["message"]
    await client.send("response.create", response={"instructions": "x" * 2001})
    error = (await client.until("error"))[-1]["error"]
    assert error["code"] == "limit_exceeded" and error["param"] == "response.instructions"
    await client.close()


async def test_audio_faster_than_the_budget_is_refused(owners, serve_app):
    limits = serve_app["args"]["ingress"]["limits"]
    allowed_s = limits["audio_burst_s"] + 1.0  # the burst, and the little real time the test takes
    client, _ = await Client.open(owners["ws"], token=BOB)
    chunk = base64.b64encode(np.zeros(24_000, np.int16).tobytes()).decode()  # 1 s each, all at once
    for _ in range(int(allowed_s) + 4):
        await client.send("input_audio_buffer.append", audio=chunk)
    error = (await client.until("error"))[-1]["error"]
    assert error["code"] == "rate_limited" and "real time" in error["message"]
    await client.close()


async def test_commits_wait_while_two_turns_are_being_finished(owners):
    client, _ = await Client.open(owners["ws"], token=BOB)
    await client.send("session.update", session={"audio": {"input": {"turn_detection": None}}})
    await client.until("session.updated")
    speech = base64.b64encode(
        (np.random.default_rng(0).standard_normal(9600) * 3000).astype(np.int16)
    ).decode()
    for _ in range(3):  # three turns committed at once: the third waits for one of the first two
        await client.send("input_audio_buffer.append", audio=speech)
        await client.send("input_audio_buffer.commit")
    events = await client.until("error")
    assert len(of_type(events, "input_audio_buffer.committed")) == 2
    assert events[-1]["error"]["code"] == "limit_exceeded" and "still being" in events[-1]["error"]["message"]
    await client.until("conversation.item.input_audio_transcription.completed")
    await client.send("input_audio_buffer.commit")  # the third turn's audio was kept: it commits now
    assert (await client.until("input_audio_buffer.committed"))[-1]["type"] == "input_audio_buffer.committed"
    await client.close()


def test_no_token_means_closed_unless_anonymous_is_asked_for():
    with pytest.raises(ValueError, match="CSM_ALLOW_ANONYMOUS"):
        access(IngressConfig(), {})
    assert access(IngressConfig(), {"CSM_ALLOW_ANONYMOUS": "1"}) == ({}, True)
    assert access(IngressConfig(allow_anonymous=True), {}) == ({}, True)
    assert access(IngressConfig(), {"CSM_TOKEN": "t"}) == ({"token": "t"}, False)
    assert access(IngressConfig(), {"CSM_TOKENS": "alice=a1, bob=b2", "CSM_ALLOW_ANONYMOUS": "1"}) == (
        {"alice": "a1", "bob": "b2"},
        False,  # a configured token always closes the anonymous door
    )
    with pytest.raises(ValueError, match="name=token"):
        access(IngressConfig(), {"CSM_TOKENS": "alice"})


async def test_x_server_info_names_no_internal_replica(serve_app):
    client, info = await Client.open(serve_app["ws"], token=APP_TOKEN)
    assert re.fullmatch(r"[0-9a-f]{12}", info["replica"])  # an opaque tag, not the Serve actor's name
    await client.close()


# ---- the same through the API Gateway emulator, with Cognito users as principals ------------------------


@pytest.fixture
def cognito(monkeypatch) -> Iterator[Callable[[str], str]]:
    """A user pool with a real key and JWKS on loopback; `cognito(sub)` is a signed id token for `sub`."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwks = json.dumps({"keys": [jwk("k1", key)]}).encode()
    with http_server(lambda *_: (200, {}, jwks)) as (url, _):
        use_pool(monkeypatch, url)
        yield lambda sub: sign(key, {"alg": "RS256", "kid": "k1"}, id_claims(sub=sub))
    leave_pool()


async def test_through_the_gateway_a_conversation_is_its_users_alone(serve_app, cognito):
    """The authorizer's principal owns the conversation: another user's resume, and a made-up id, are
    refused at the handshake (404, the same for both), the history untouched; the owner's newer
    connection takes it over and the older one is told, then closed."""
    bridge = {"token": APP_TOKEN, "use_authorizer": True, **GATEWAY_BRIDGE}
    async with LocalGateway(serve_app["url"], **bridge) as gw:
        alice, info = await Client.open(gw.url, token=cognito("alice"))
        conversation = info["conversation_id"]
        await talk(alice, "over the gateway")
        await alice.close()
        path = f"{serve_app['args']['ingress']['history_dir']}/{conversation}.jsonl"
        before = open(path, "rb").read()
        answers = []
        for sub, wanted in (("bob", conversation), ("alice", "my_own_id"), ("bob", "conv_" + "0" * 32)):
            with pytest.raises(InvalidStatus) as refused:
                await Client.connect(gw.url, token=cognito(sub), conversation_id=wanted)
            answers.append((refused.value.response.status_code, refused.value.response.body))
        assert answers[0][0] == 404 and answers[0] == answers[1] == answers[2]
        assert open(path, "rb").read() == before

        first, _ = await Client.open(gw.url, token=cognito("alice"), conversation_id=conversation)
        second, _ = await Client.open(gw.url, token=cognito("alice"), conversation_id=conversation)
        error = (await first.until("error", timeout=30))[-1]["error"]
        assert error["code"] == "conversation_taken_over"
        with pytest.raises(ConnectionClosed):  # the bridge deletes the older API Gateway connection
            await first.recv(timeout=30)
        await second.send("response.create")
        said = of_type(await second.until("response.done"), "response.output_audio_transcript.done")
        assert said[0]["transcript"] == "You said: over the gateway."
        await second.close()


@serve.deployment
class _BrokenResponder:
    """A stand-in whose `info` fails with an internal detail, as a misconfigured backend might."""

    def info(self) -> dict:
        raise RuntimeError("connection to 10.0.3.7:5432 refused (user=csm_admin)")


async def test_readyz_keeps_a_failures_details_in_the_log(serve_app):
    name = "broken_ready"
    handles = [
        serve.get_deployment_handle(deployment, "csm")
        for deployment in ("CSMGenerator", "AudioDecoder", "AudioTokenizer", "SpeechRecognizer")
    ]
    config = {**serve_app["args"]["ingress"]}
    serve.run(
        ConversationIngress.bind(*handles, _BrokenResponder.bind(), config),
        name=name,
        route_prefix=f"/{name}",
    )
    try:
        async with httpx.AsyncClient(base_url=f"{serve_app['url']}/{name}", timeout=60) as http:
            answer = await http.get("/readyz")
        assert answer.status_code == 503 and answer.json()["ready"] is False
        assert "10.0.3.7" not in answer.text and "csm_admin" not in answer.text and "Error" not in answer.text
    finally:
        serve.delete(name)
