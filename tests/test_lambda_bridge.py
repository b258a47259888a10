"""The Lambda bridge on its own: handlers, authorizer, secrets, the `@connections` sink, and the local
gateway emulator's API Gateway rules, against stand-in servers (no Ray). The whole path through the
real Serve app is in test_bridge_e2e.py."""

from __future__ import annotations

import ast
import asyncio
import base64
import io
import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import pytest
import websockets
from websockets.exceptions import ConnectionClosed, InvalidStatus

from devtools.local_gateway import LocalGateway
from lambda_bridge import authorizer, handlers, logs, settings
from serve_app import bridge
from serve_app.bridge import MAX_MESSAGE_BYTES, ApiGatewaySink, BridgeAccess, BridgeRefused, split_message
from tests.standins import FakeIngress, aws_json_api, http_server

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "bridge-secret"


@pytest.fixture(autouse=True)
def clean_settings(monkeypatch):
    """Each test sets its own environment; the handlers' per-container caches start empty."""
    for name in (
        "TOKEN",
        "TOKEN_SECRET_ARN",
        "TOKEN_PARAMETER",
        "BRIDGE_TOKEN",
        "BRIDGE_TOKEN_SECRET_ARN",
        "BRIDGE_TOKEN_PARAMETER",
        "CALLBACK_URL",
        "AUTH_MODE",
        "FORWARD_DEADLINE_S",
    ):
        monkeypatch.delenv(name, raising=False)
    for name in ("COGNITO_USER_POOL_ID", "COGNITO_CLIENT_ID", "COGNITO_REGION", "COGNITO_JWKS_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SERVE_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    settings.reset()
    handlers.serve.cache_clear()
    authorizer.signing_keys.cache_clear()
    yield
    settings.reset()
    handlers.serve.cache_clear()
    authorizer.signing_keys.cache_clear()


# ---- what the deployed code may import -------------------------------------------------------------
DEPLOYED = ["__init__", "settings", "logs", "serve_client", "connections", "handlers", "authorizer"]


def test_handlers_import_only_the_standard_library_and_boto3():
    allowed = set(sys.stdlib_module_names) | {"boto3", "botocore", "lambda_bridge", "__future__"}
    for name in DEPLOYED:
        tree = ast.parse((ROOT / "lambda_bridge" / f"{name}.py").read_text())
        for node in ast.walk(tree):  # every import, including ones inside functions
            if isinstance(node, ast.Import):
                roots = [alias.name.split(".")[0] for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                roots = [(node.module or "").split(".")[0]]
            else:
                continue
            assert set(roots) <= allowed, f"lambda_bridge/{name}.py imports {roots}"
    # And at run time: loading the handlers pulls in nothing else of this project or its heavy stack.
    code = (
        "import sys, lambda_bridge.handlers, lambda_bridge.authorizer, lambda_bridge.connections;"
        "print(' '.join(sorted({m.split('.')[0] for m in sys.modules})))"
    )
    loaded = set(
        subprocess.run(
            [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.split()
    )
    assert not loaded & {"torch", "ray", "fastapi", "numpy", "websockets", "serve_app", "deployments", "csm"}


# ---- API Gateway's 128 KB message limit on what the Serve side posts ---------------------------------
def test_an_oversize_audio_delta_is_split_into_deltas_of_whole_samples():
    audio = bytes(range(256)) * 1200  # 307,200 bytes: 6.4 s of PCM16 at 24 kHz
    event = {
        "type": "response.output_audio.delta",
        "event_id": "event_1",
        "response_id": "resp_1",
        "item_id": "item_1",
        "output_index": 0,
        "content_index": 0,
        "delta": base64.b64encode(audio).decode(),
    }
    parts = split_message(json.dumps(event))
    assert len(parts) >= 4
    assert all(len(part.encode()) <= MAX_MESSAGE_BYTES for part in parts)
    decoded = [json.loads(part) for part in parts]
    pieces = [base64.b64decode(d["delta"]) for d in decoded]
    assert b"".join(pieces) == audio and all(len(piece) % 2 == 0 for piece in pieces)
    assert {d["item_id"] for d in decoded} == {"item_1"} and len({d["event_id"] for d in decoded}) == len(
        parts
    )
    small = json.dumps({**event, "delta": base64.b64encode(audio[:3840]).decode()})
    assert split_message(small) == [small]


def test_an_oversize_event_of_another_kind_becomes_an_error_event():
    big = json.dumps(
        {"type": "response.output_audio_transcript.delta", "event_id": "e", "delta": "x" * 200_000}
    )
    (only,) = split_message(big)
    error = json.loads(only)
    assert error["type"] == "error" and error["error"]["code"] == "internal_error"
    assert "too large" in error["error"]["message"]


# ---- the shared token: Secrets Manager or SSM, once per container -----------------------------------
def test_the_token_comes_from_secrets_manager_once_per_container(monkeypatch):
    arn = "arn:aws:secretsmanager:us-east-1:000000000000:secret:csm-token"
    with http_server(aws_json_api({arn: json.dumps({"token": "from-secrets-manager"})})) as (url, seen):
        monkeypatch.setenv("AWS_ENDPOINT_URL_SECRETS_MANAGER", url)
        monkeypatch.setenv("TOKEN_SECRET_ARN", arn)
        settings.reset()
        assert settings.shared_token() == "from-secrets-manager"
        assert settings.shared_token() == "from-secrets-manager"
    assert len(seen) == 1


def test_the_token_comes_from_an_ssm_parameter(monkeypatch):
    with http_server(aws_json_api({"/csm/token": "from-ssm"})) as (url, seen):
        monkeypatch.setenv("AWS_ENDPOINT_URL_SSM", url)
        monkeypatch.setenv("TOKEN_PARAMETER", "/csm/token")
        settings.reset()
        assert settings.shared_token() == "from-ssm"
    assert json.loads(seen[0][2]) == {"Name": "/csm/token", "WithDecryption": True}


def test_the_bridge_token_comes_from_its_own_secret(monkeypatch):
    """Two secrets, two readers: the bridge's token is not the users' and never falls back to it."""
    users, bridges = "arn:aws:secretsmanager:us-east-1:0:secret:users", "arn:aws:secretsmanager:::bridge"
    values = {users: "the-users-token", bridges: json.dumps({"token": "the-bridge-token"}), "/csm/b": "b-ssm"}
    with http_server(aws_json_api(values)) as (url, seen):
        monkeypatch.setenv("AWS_ENDPOINT_URL_SECRETS_MANAGER", url)
        monkeypatch.setenv("AWS_ENDPOINT_URL_SSM", url)
        monkeypatch.setenv("TOKEN_SECRET_ARN", users)
        settings.reset()
        assert settings.bridge_token() is None  # no bridge secret configured: nothing, not the users' token
        monkeypatch.setenv("BRIDGE_TOKEN_SECRET_ARN", bridges)
        settings.reset()
        assert (settings.bridge_token(), settings.shared_token()) == ("the-bridge-token", "the-users-token")
        assert settings.bridge_token() == "the-bridge-token"  # once per container
        monkeypatch.delenv("BRIDGE_TOKEN_SECRET_ARN")
        monkeypatch.setenv("BRIDGE_TOKEN_PARAMETER", "/csm/b")
        settings.reset()
        assert settings.bridge_token() == "b-ssm"
    assert [json.loads(body).get("SecretId") or json.loads(body)["Name"] for _, _, body in seen] == [
        bridges,
        users,
        "/csm/b",
    ]


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="SERVE_URL"):
        settings.Settings.from_env({"SERVE_URL": "ray-head:8000"})
    with pytest.raises(ValueError, match="AUTH_MODE"):
        settings.Settings.from_env({"SERVE_URL": "http://x", "AUTH_MODE": "maybe"})
    with pytest.raises(ValueError, match="FORWARD_DEADLINE_S"):
        settings.Settings.from_env({"SERVE_URL": "http://x", "FORWARD_DEADLINE_S": "40"})


# ---- the authorizer ---------------------------------------------------------------------------------
ARN = "arn:aws:execute-api:us-east-1:000000000000:api/prod/$connect"


def authorize(query: dict | None = None, headers: dict | None = None) -> dict:
    event = {"type": "REQUEST", "methodArn": ARN, "queryStringParameters": query, "headers": headers or {}}
    return authorizer.handler({**event, "requestContext": {"connectionId": "c1="}}, None)


def effect(result: dict) -> str:
    return result["policyDocument"]["Statement"][0]["Effect"]


def test_authorizer_checks_the_shared_token(monkeypatch):
    monkeypatch.setenv("TOKEN", TOKEN)
    settings.reset()
    allowed = authorize({"token": TOKEN})
    assert effect(allowed) == "Allow" and allowed["policyDocument"]["Statement"][0]["Resource"] == ARN
    assert effect(authorize(headers={"Authorization": f"Bearer {TOKEN}"})) == "Allow"
    assert effect(authorize({"token": "guess"})) == "Deny"
    with pytest.raises(Exception, match=r"^Unauthorized$"):
        authorize({})


def test_with_nothing_configured_the_authorizer_lets_no_one_in_unless_told_to(monkeypatch):
    unset = ("TOKEN", "TOKEN_SECRET_ARN", "TOKEN_PARAMETER", "COGNITO_USER_POOL_ID", "CSM_ALLOW_ANONYMOUS")
    for name in unset:
        monkeypatch.delenv(name, raising=False)
    settings.reset()
    assert effect(authorize({"token": "anything"})) == "Deny"  # a lost secret is not an open door
    monkeypatch.setenv("CSM_ALLOW_ANONYMOUS", "1")
    allowed = authorize({"token": "anything"})
    assert effect(allowed) == "Allow" and allowed["context"]["principal"] == "anonymous"


def test_authorizer_accepts_a_valid_cognito_jwt_and_nothing_else(monkeypatch):
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding, rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    numbers = key.public_key().public_numbers()

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    def as_b64(n: int) -> str:
        return b64(n.to_bytes((n.bit_length() + 7) // 8, "big"))

    jwks = {
        "keys": [
            {
                "kty": "RSA",
                "kid": "k1",
                "alg": "RS256",
                "use": "sig",
                "n": as_b64(numbers.n),
                "e": as_b64(numbers.e),
            }
        ]
    }
    issuer = "https://cognito-idp.eu-west-1.amazonaws.com/eu-west-1_pool"

    def token(claims: dict, alg: str = "RS256", signer=key) -> str:
        head = b64(json.dumps({"alg": alg, "kid": "k1"}).encode())
        body = b64(json.dumps(claims).encode())
        signature = signer.sign(f"{head}.{body}".encode(), padding.PKCS1v15(), hashes.SHA256())
        return f"{head}.{body}.{b64(signature)}"

    good = {"sub": "user-1", "iss": issuer, "token_use": "id", "aud": "app-client", "exp": time.time() + 600}
    route = lambda *_: (200, {"Content-Type": "application/json"}, json.dumps(jwks).encode())  # noqa: E731
    with http_server(route) as (url, seen):
        for name, value in (
            ("TOKEN", TOKEN),
            ("COGNITO_USER_POOL_ID", "eu-west-1_pool"),
            ("COGNITO_CLIENT_ID", "app-client"),
            ("COGNITO_REGION", "eu-west-1"),
            ("COGNITO_JWKS_URL", url),
        ):
            monkeypatch.setenv(name, value)
        settings.reset()
        allowed = authorize({"token": token(good)})
        assert effect(allowed) == "Allow" and allowed["context"]["principal"] == "cognito:user-1"
        access = {
            "sub": "user-2",
            "iss": issuer,
            "token_use": "access",
            "client_id": "app-client",
            "exp": time.time() + 60,
        }
        assert effect(authorize({"token": token(access)})) == "Allow"
        assert effect(authorize({"token": TOKEN})) == "Allow"  # the shared token still works
        other_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        for bad in (
            token({**good, "exp": time.time() - 3600}),  # expired
            token({**good, "aud": "another-client"}),
            token({**good, "iss": "https://cognito-idp.eu-west-1.amazonaws.com/other"}),
            token(good, signer=other_key),  # signed by someone else
            token(good).rsplit(".", 1)[0] + "." + b64(b"\x00" * 256),
            token(good, alg="none"),
            "not.a.jwt",
        ):
            assert effect(authorize({"token": bad})) == "Deny"
    assert len(seen) == 1  # the JWKS is fetched once per container


# ---- the emulator's API Gateway rules, with a stand-in ingress ---------------------------------------
async def open_socket(gateway: LocalGateway, token: str | None = TOKEN, **kw) -> websockets.ClientConnection:
    url = gateway.url + (f"?token={token}" if token else "")
    return await websockets.connect(url, max_size=None, **kw)


async def close_code(ws: websockets.ClientConnection, timeout: float = 10) -> int:
    with pytest.raises(ConnectionClosed) as closed:
        while True:
            await asyncio.wait_for(ws.recv(), timeout)
    return closed.value.rcvd.code if closed.value.rcvd else closed.value.sent.code


async def test_a_missing_or_wrong_token_is_refused_at_connect():
    fake = FakeIngress()
    with http_server(fake) as (url, seen):
        async with LocalGateway(url, token=TOKEN) as gateway:
            for token in (None, "wrong"):
                with pytest.raises(InvalidStatus) as refused:
                    await open_socket(gateway, token)
                assert refused.value.response.status_code == 401
            ws = await open_socket(gateway)
            await ws.close()
    assert [method for method, _, _ in seen].count("POST") == 1  # only the good one reached the server


async def test_the_authorizer_refuses_with_401_or_403_and_passes_its_principal_on():
    with http_server(FakeIngress()) as (url, _):
        async with LocalGateway(url, token=TOKEN, use_authorizer=True) as gateway:
            with pytest.raises(InvalidStatus) as missing:
                await open_socket(gateway, None)
            assert missing.value.response.status_code == 401
            with pytest.raises(InvalidStatus) as wrong:
                await open_socket(gateway, "wrong")
            assert wrong.value.response.status_code == 403
            ws = await open_socket(gateway)
            await ws.send(json.dumps({"type": "response.create"}))
            await ws.close()
            await asyncio.sleep(0.2)
    routes = [route for route, _ in gateway.invocations]
    assert routes.count("authorizer") == 3 and routes.count("$connect") == 1
    message = next(event for route, event in gateway.invocations if route == "$default")
    assert message["requestContext"]["authorizer"]["principal"] == "shared-token"
    assert (
        message["requestContext"]["routeKey"] == "$default"
        and message["requestContext"]["eventType"] == "MESSAGE"
    )


def recording(route):
    """`route`, and the headers of every request it answers (the `seen` of http_server has no headers)."""
    headers: list[dict[str, str]] = []

    def answer(method: str, path: str, request_headers: dict[str, str], body: bytes):
        headers.append(request_headers)
        return route(method, path, request_headers, body)

    return answer, headers


async def test_the_handlers_present_the_bridge_token_and_the_authorizers_principal():
    """Every call to the ingress carries the bridge's token, never the users'; `$connect` says whom the
    authorizer admitted and nothing else (no callback URL: the ingress has its own), whatever the person
    adds to the query."""
    route, headers = recording(FakeIngress())
    with http_server(route) as (url, seen):
        async with LocalGateway(url, token=TOKEN, bridge_token="bridge-only", use_authorizer=True) as gateway:
            ws = await websockets.connect(f"{gateway.url}?token={TOKEN}&principal=mallory&callback_url=x")
            await ws.send(json.dumps({"type": "response.create"}))
            await ws.close()
            await asyncio.sleep(0.3)
    assert [method for method, _, _ in seen] == ["POST", "POST", "DELETE"]
    assert {h["Authorization"] for h in headers} == {"Bearer bridge-only"}
    assert json.loads(seen[0][2]) == {"conversation_id": None, "principal": "shared-token"}


def test_connect_forwards_the_principal_from_the_authorizers_context(monkeypatch):
    """`requestContext.authorizer.principal` is what `authorizer.handler` put in the policy's context."""
    fake = FakeIngress()
    with http_server(fake) as (url, seen):
        monkeypatch.setenv("SERVE_URL", url)
        monkeypatch.setenv("AUTH_MODE", "authorizer")
        monkeypatch.setenv("BRIDGE_TOKEN", "bridge-only")
        settings.reset()
        context = {
            "connectionId": "c1=",
            "domainName": "api",
            "stage": "prod",
            "authorizer": {"principalId": "cognito:alice", "principal": "cognito:alice"},
        }
        event = {"requestContext": context, "queryStringParameters": {"principal": "bob"}}
        assert handlers.connect(event, None) == {"statusCode": 200}
        del context["authorizer"]["principal"]  # an authorizer that said nothing: the ingress refuses it
        handlers.connect(event, None)
    assert [json.loads(body)["principal"] for _, _, body in seen] == ["cognito:alice", None]


async def test_binary_frames_and_oversize_messages_are_refused_as_api_gateway_does():
    with http_server(FakeIngress()) as (url, seen):
        async with LocalGateway(url, token=TOKEN) as gateway:
            ws = await open_socket(gateway)
            await ws.send(b"\x00\x01binary")
            assert await close_code(ws) == 1003
            ws = await open_socket(gateway)
            await ws.send("x" * (40 * 1024))  # one 40 KB frame
            assert await close_code(ws) == 1009
            ws = await open_socket(gateway)
            await ws.send(["y" * (30 * 1024)] * 5)  # 150 KB in 30 KB fragments
            assert await close_code(ws) == 1009
            ws = await open_socket(gateway)
            await ws.send(["z" * (30 * 1024)] * 4)  # 120 KB in fragments: allowed
            await ws.close()
            await asyncio.sleep(0.3)
    forwarded = [body for method, path, body in seen if path.endswith("/events")]
    assert forwarded == [b"z" * (120 * 1024)]  # nothing refused reached the server
    assert [route for route, _ in gateway.invocations].count("$disconnect") == 4


async def test_an_idle_socket_is_closed_with_1001():
    with http_server(FakeIngress()) as (url, _):
        async with LocalGateway(url, token=TOKEN, idle_timeout_s=1.0) as gateway:
            ws = await open_socket(gateway)
            started = time.monotonic()
            assert await close_code(ws) == 1001
            assert 0.9 < time.monotonic() - started < 5


async def test_serve_down_refuses_the_connect_quickly():
    async with LocalGateway("http://127.0.0.1:9", token=TOKEN, forward_deadline_s=1.5) as gateway:
        started = time.monotonic()
        with pytest.raises(InvalidStatus) as refused:
            await open_socket(gateway)
        assert refused.value.response.status_code == 503
        assert time.monotonic() - started < 5


@pytest.mark.parametrize("mode", ["slow", "unavailable"])
async def test_serve_slow_or_unavailable_gives_an_error_event_within_the_deadline(mode):
    fake = FakeIngress()
    with http_server(fake) as (url, seen):
        async with LocalGateway(url, token=TOKEN, forward_deadline_s=1.5) as gateway:
            ws = await open_socket(gateway)
            fake.mode, fake.delay_s = mode, 5.0
            started = time.monotonic()
            await ws.send(json.dumps({"type": "input_audio_buffer.commit", "event_id": "evt_lost"}))
            error = json.loads(await asyncio.wait_for(ws.recv(), 10))
            took = time.monotonic() - started
            assert error["type"] == "error" and error["error"]["code"] == "service_unavailable"
            assert error["error"]["event_id"] == "evt_lost"
            assert took < 4  # the deadline (1.5 s) plus posting the error; never API Gateway's 29 s
            fake.mode = "ok"  # the server is back: the next message goes through
            await ws.send(json.dumps({"type": "input_audio_buffer.clear"}))
            await asyncio.sleep(0.3)
            await ws.close()
    events = [body for method, path, body in seen if path.endswith("/events")]
    if mode == "unavailable":
        assert len(events) >= 3  # retried with backoff before giving up
    else:
        assert events.count(events[0]) == 1  # a request that timed out is never repeated
    assert events[-1] == b'{"type": "input_audio_buffer.clear"}'


async def test_a_server_that_lost_the_conversation_says_so_and_closes_the_socket():
    fake = FakeIngress()
    with http_server(fake) as (url, _):
        async with LocalGateway(url, token=TOKEN) as gateway:
            ws = await open_socket(gateway)
            fake.mode = "forgetful"
            await ws.send(json.dumps({"type": "response.create"}))
            error = json.loads(await asyncio.wait_for(ws.recv(), 10))
            assert (
                error["error"]["code"] == "service_unavailable" and "reconnect" in error["error"]["message"]
            )
            assert await close_code(ws) == 1000


async def test_the_connections_api_through_boto3(monkeypatch):
    """The unmodified boto3 client against the emulator: fragments past 32 KB, 413 past 128 KB, 410 for a
    connection that is gone, 403 unsigned; the sink splits big audio and rides out throttling."""
    import boto3
    import httpx

    with http_server(FakeIngress()) as (url, _):
        async with LocalGateway(url, token=TOKEN) as gateway:
            ws = await open_socket(gateway)
            await asyncio.sleep(0.1)
            (connection_id,) = gateway.connections
            api = boto3.client("apigatewaymanagementapi", endpoint_url=gateway.callback_url)
            big = json.dumps(
                {"type": "x-test", "text": "é" * 30_000}, ensure_ascii=False
            )  # 60 KB: sent as fragments
            await asyncio.to_thread(api.post_to_connection, ConnectionId=connection_id, Data=big.encode())
            assert await asyncio.wait_for(ws.recv(), 5) == big
            with pytest.raises(api.exceptions.PayloadTooLargeException):
                await asyncio.to_thread(
                    api.post_to_connection, ConnectionId=connection_id, Data=b"x" * 140_000
                )
            info = await asyncio.to_thread(api.get_connection, ConnectionId=connection_id)
            assert info["Identity"]["SourceIp"] == "127.0.0.1"
            async with httpx.AsyncClient() as http:
                unsigned = await http.post(
                    f"{gateway.callback_url}/@connections/{connection_id}", content=b"{}"
                )
            assert unsigned.status_code == 403

            sink = ApiGatewaySink(gateway.callback_url)
            gateway.throttle_posts = 3
            audio = bytes(4000) * 60  # 240 KB of silence: over the limit, so several deltas
            delta = {
                "type": "response.output_audio.delta",
                "event_id": "e",
                "item_id": "i",
                "delta": base64.b64encode(audio).decode(),
            }
            assert await sink.send(connection_id, json.dumps(delta))
            assert gateway.throttle_posts == 0
            received = b""
            while len(received) < len(audio):
                received += base64.b64decode(json.loads(await asyncio.wait_for(ws.recv(), 5))["delta"])
            assert received == audio

            await ws.close()
            await asyncio.sleep(0.2)
            with pytest.raises(api.exceptions.GoneException):
                await asyncio.to_thread(api.post_to_connection, ConnectionId=connection_id, Data=b"{}")
            sink._connecting_until = 0.0
            assert await sink.send(connection_id, "{}") is False


async def test_every_log_line_is_json_with_the_connection_and_conversation():
    stream = io.StringIO()
    capture = logging.StreamHandler(stream)
    capture.setFormatter(logs.JsonFormatter())
    bridge_log = logs.logger()
    bridge_log.addHandler(capture)
    fake = FakeIngress()
    try:
        with http_server(fake) as (url, _):
            async with LocalGateway(url, token=TOKEN, forward_deadline_s=1.0) as gateway:
                ws = await open_socket(gateway)
                fake.mode = "unavailable"
                await ws.send(json.dumps({"type": "response.create"}))
                await asyncio.wait_for(ws.recv(), 10)
                fake.mode = "ok"
                await ws.close()
                await asyncio.sleep(0.3)
    finally:
        bridge_log.removeHandler(capture)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    (connection_id,) = {line["connection_id"] for line in lines}
    assert connection_id and {line["route"] for line in lines} == {"$connect", "$default", "$disconnect"}
    assert {"time", "level", "message", "request_id"} <= set(lines[0])
    connected = next(line for line in lines if line["message"] == "connected")
    assert connected["conversation_id"] == "conv_fake"


# ---- the ingress's side of the bridge: its own credential and its one callback URL ---------------------
CALLBACK = "https://abc123.execute-api.us-east-1.amazonaws.com/prod"


def test_bridge_access_needs_the_bridges_token_and_is_off_without_one(monkeypatch):
    monkeypatch.delenv("CSM_BRIDGE_TOKEN", raising=False)
    monkeypatch.delenv("CSM_BRIDGE_CALLBACK_URL", raising=False)
    access = BridgeAccess.resolve("bridge-secret", CALLBACK)
    access.check("Bearer bridge-secret")
    for wrong in ("Bearer users-token", "Bearer ", "bridge-secret", None):
        with pytest.raises(BridgeRefused) as refused:
            access.check(wrong)
        assert refused.value.status == 401
    for off in (BridgeAccess.resolve(None, CALLBACK), BridgeAccess.resolve("bridge-secret", None)):
        with pytest.raises(BridgeRefused, match="the bridge is off") as refused:
            off.check("Bearer bridge-secret")
        assert refused.value.status == 403
    monkeypatch.setenv("CSM_BRIDGE_TOKEN", "from-env")
    monkeypatch.setenv("CSM_BRIDGE_CALLBACK_URL", CALLBACK + "/")
    assert BridgeAccess.resolve(None, None) == BridgeAccess("from-env", CALLBACK)
    with pytest.raises(ValueError, match="http"):
        BridgeAccess.resolve("t", "file:///etc/passwd")


def test_bridge_access_sends_replies_only_to_the_configured_callback():
    access = BridgeAccess("bridge-secret", CALLBACK)
    assert access.callback(None) == access.callback(CALLBACK) == access.callback(CALLBACK + "/") == CALLBACK
    for elsewhere in ("http://169.254.169.254/latest", CALLBACK.replace("abc123", "evil"), 42, ""):
        with pytest.raises(BridgeRefused) as refused:
            access.callback(elsewhere)
        assert refused.value.status == 400


def test_the_sinks_client_cache_stays_bounded():
    bridge._client.cache_clear()
    for n in range(3 * bridge._CLIENTS):
        ApiGatewaySink(f"https://api{n}.execute-api.us-east-1.amazonaws.com/prod")
    assert bridge._client.cache_info().currsize == bridge._CLIENTS
    bridge._client.cache_clear()
