"""Bridged conversations: the Lambda path, where no WebSocket reaches the ingress.

API Gateway holds the browser's socket; the bridge Lambda calls the ingress for each of its routes
(`/bridge/connections/{id}`: POST on `$connect`, POST `.../events` per client message on `$default`,
DELETE on `$disconnect`), and `BridgedConversations` answers them on the replica's `Sessions`, with the
same lifecycle as a direct socket. The conversation's events go back through an `EventSink`: the
production sink posts to API Gateway's `@connections` API with boto3; tests may plug in any sink with the
same two methods. `close` deletes the API Gateway connection: the ingress calls it when it ends a
conversation whose browser is still connected (a newer connection took it over), since API Gateway
keeps an idle socket open for up to 10 minutes otherwise.

`BridgeAccess` is what makes those routes safe to expose to the bridge's network: the bridge presents a
token of its own (never the users' token), and the `@connections` URL comes from configuration, never
from a request, so whoever reaches the ingress cannot make it send signed posts elsewhere.

API Gateway's rules the sink keeps: a message is at most 128 KB (an audio delta over that is split
into several deltas of whole samples; anything else that large is a bug and becomes an `error`
event); `GoneException` means the person left (the conversation ends, its history stays); throttling
and transient failures are retried with backoff for a bounded time, after which the connection is
treated as lost rather than letting a reply's audio pile up behind it.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import hmac
import json
import logging
import os
import random
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

from fastapi.responses import JSONResponse

from serve_app import protocol as p
from serve_app.history import check_conversation_id
from serve_app.sessions import Refused, Session, Sessions

log = logging.getLogger(__name__)

# API Gateway's limit on one message (post_to_connection Data), less room for its framing.
MAX_MESSAGE_BYTES = 127 * 1024
RETRY_CODES = frozenset(
    {
        "LimitExceededException",
        "TooManyRequestsException",
        "ThrottlingException",
        "InternalServerErrorException",
    }
)
RETRY_BUDGET_S = 10.0
# API Gateway answers 410 until `$connect` has returned, and the ingress may post before that.
CONNECTING_GRACE_S = 5.0
_BACKOFF_BASE_S = 0.05
_BACKOFF_MAX_S = 1.0
# boto3 calls block; posts for all bridged conversations share these threads (and one client's pool).
_POSTERS = 32
# The ingress only ever posts to its one configured callback URL, so one client is cached in practice;
# the bound is a second lock, so that no caller can grow the cache (and its connection pools) unbounded.
_CLIENTS = 4


class EventSink(Protocol):
    async def send(self, connection_id: str, data: str) -> bool:
        """Deliver one event; False when the connection is gone (the person left)."""
        ...

    async def close(self, connection_id: str) -> None:
        """End the connection: the browser's socket closes (and API Gateway runs `$disconnect`)."""
        ...


def split_message(data: str, limit: int = MAX_MESSAGE_BYTES) -> list[str]:
    """`data` as messages of at most `limit` bytes: an oversize audio delta becomes several deltas
    (whole 16-bit samples each, same item and content index, so a client plays them back to back);
    any other oversize event becomes an `error` event saying so."""
    if len(data.encode()) <= limit:
        return [data]
    event = json.loads(data)
    if event.get("type") != "response.output_audio.delta":
        log.error(
            "an event of %d bytes (%s) is over API Gateway's message limit", len(data), event.get("type")
        )
        too_big = p.error_event("internal_error", f"a {event.get('type')} event was too large to deliver")
        return [too_big.to_json()]
    audio = base64.b64decode(event["delta"])
    overhead = len(json.dumps({**event, "delta": "", "event_id": event["event_id"] + "-000"}).encode())
    # Base64 turns 3 bytes into 4 characters; 6 bytes = 3 whole samples = 8 characters.
    step = (limit - overhead) * 3 // 4 // 6 * 6
    if step <= 0:
        raise ValueError(f"limit {limit} leaves no room for audio")
    parts = []
    for n, start in enumerate(range(0, len(audio), step)):
        piece = base64.b64encode(audio[start : start + step]).decode("ascii")
        parts.append(json.dumps({**event, "event_id": f"{event['event_id']}-{n:03d}", "delta": piece}))
    return parts


class BridgeRefused(Exception):
    """A bridge request the ingress will not act on; `status` is the HTTP answer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class BridgeAccess:
    """The bridge's credential and the one `@connections` endpoint replies go to, both from configuration.

    Without either the bridge routes are off (403): an ingress never serves them open.
    """

    token: str | None = field(repr=False)  # never in a log line
    callback_url: str | None

    @classmethod
    def resolve(cls, token: str | None, callback_url: str | None) -> BridgeAccess:
        """The config's values, else `$CSM_BRIDGE_TOKEN` and `$CSM_BRIDGE_CALLBACK_URL`."""
        token = token or os.environ.get("CSM_BRIDGE_TOKEN") or None
        url = (callback_url or os.environ.get("CSM_BRIDGE_CALLBACK_URL") or "").rstrip("/") or None
        if url is not None and not url.startswith(("http://", "https://")):
            raise ValueError(f"the bridge's callback URL must be http(s), not {url!r}")
        return cls(token, url)

    def check(self, authorization: str | None) -> None:
        """Raise BridgeRefused unless the caller presented the bridge's token (`Authorization: Bearer`)."""
        if self.token is None or self.callback_url is None:
            missing = "CSM_BRIDGE_TOKEN" if self.token is None else "CSM_BRIDGE_CALLBACK_URL"
            raise BridgeRefused(403, f"the bridge is off on this server: {missing} is not configured")
        given = bearer_token(authorization)
        if given is None or not hmac.compare_digest(given.encode(), self.token.encode()):
            raise BridgeRefused(401, "unauthorized: the bridge's own token is required")

    def callback(self, named: object) -> str:
        """The configured callback URL. A request may repeat it, never name another: a different one
        is refused before anything is sent anywhere."""
        assert self.callback_url is not None  # `check` passed
        if named is None or (isinstance(named, str) and named.rstrip("/") == self.callback_url):
            return self.callback_url
        raise BridgeRefused(400, "callback_url: replies go only to the server's configured endpoint")


def bearer_token(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, or None (the ingress's socket uses it too)."""
    if authorization and authorization.lower().startswith("bearer "):
        return authorization[7:].strip() or None
    return None


@functools.lru_cache(maxsize=_CLIENTS)
def _client(callback_url: str):
    import boto3  # only bridged deployments need it loaded
    from botocore.config import Config

    # Retries are ours (below): bounded by time, and a GoneException must never be retried.
    config = Config(
        retries={"max_attempts": 1, "mode": "standard"},
        connect_timeout=2,
        read_timeout=5,
        max_pool_connections=_POSTERS,
    )
    # The region (for SigV4) is the environment's: AWS_REGION on ECS, AWS_DEFAULT_REGION locally.
    return boto3.client("apigatewaymanagementapi", endpoint_url=callback_url, config=config)


@functools.cache
def _posters() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(_POSTERS, thread_name_prefix="connections")


class ApiGatewaySink:
    """Posts events to API Gateway's `@connections` management API (`callback_url`: the configured one)."""

    def __init__(self, callback_url: str, retry_budget_s: float = RETRY_BUDGET_S):
        self.client = _client(callback_url)
        self.retry_budget_s = retry_budget_s
        self._connecting_until = time.monotonic() + CONNECTING_GRACE_S
        self._gone = self.client.exceptions.GoneException

    async def send(self, connection_id: str, data: str) -> bool:
        loop = asyncio.get_running_loop()
        for message in split_message(data):
            if not await loop.run_in_executor(_posters(), self._post, connection_id, message):
                return False
        return True

    async def close(self, connection_id: str) -> None:
        try:
            await asyncio.get_running_loop().run_in_executor(
                _posters(), lambda: self.client.delete_connection(ConnectionId=connection_id)
            )
        except self._gone:
            pass
        except Exception as e:
            log.warning("bridge %s: could not close the connection: %s", connection_id, e)

    def _post(self, connection_id: str, message: str) -> bool:
        from botocore.exceptions import BotoCoreError, ClientError

        deadline = time.monotonic() + self.retry_budget_s
        attempt = 0
        while True:
            try:
                self.client.post_to_connection(ConnectionId=connection_id, Data=message.encode())
                self._connecting_until = 0.0  # from now on a 410 means the person left
                return True
            except self._gone:
                if time.monotonic() > self._connecting_until:
                    return False
                reason = "not connected yet"
            except ClientError as e:
                code = e.response.get("Error", {}).get("Code", "")
                status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
                if code not in RETRY_CODES and status not in (429, 500, 502, 503, 504):
                    log.error("bridge %s: an event was refused (%s); skipped", connection_id, code or status)
                    return True  # this message is lost, the connection is not
                reason = code or str(status)
            except BotoCoreError as e:  # connection errors, timeouts
                reason = type(e).__name__
            attempt += 1
            pause = min(_BACKOFF_MAX_S, _BACKOFF_BASE_S * 2**attempt) * random.uniform(0.5, 1.0)
            if time.monotonic() + pause > deadline:
                log.error(
                    "bridge %s: still failing after %d tries (%s); giving up", connection_id, attempt, reason
                )
                return False
            time.sleep(pause)


# A refused `$connect`'s HTTP status (the Lambda answers the browser's handshake with it).
_REFUSED_STATUS = {"server_busy": 503, "limit_exceeded": 429, "conversation_not_found": 404}


@dataclass(frozen=True)
class _Bridged:
    """One API Gateway connection's conversation, and the task that posts its events."""

    session: Session
    pump: asyncio.Task


class BridgedConversations:
    """The bridge's three calls on this replica's sessions: `connect` opens one (`Sessions.open`), `event`
    hands it a client message, `disconnect` closes it (`Sessions.close`). A conversation that ends on
    the server's side (taken over, or its pump failed) closes its API Gateway connection too."""

    def __init__(
        self, access: BridgeAccess, sessions: Sessions, sink: Callable[[str], EventSink] = ApiGatewaySink
    ) -> None:
        self.access, self.sessions, self._sink = access, sessions, sink
        self.connections: dict[str, _Bridged] = {}

    def refusal(self, authorization: str | None) -> JSONResponse | None:
        """None for the bridge itself; otherwise the answer (the users' token is not the bridge's)."""
        try:
            self.access.check(authorization)
        except BridgeRefused as e:
            return JSONResponse({"error": str(e)}, status_code=e.status)
        return None

    async def connect(self, connection_id: str, raw: bytes) -> JSONResponse:
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        if not isinstance(body, dict):
            return JSONResponse({"error": "the body must be a JSON object"}, status_code=400)
        if (known := self.connections.get(connection_id)) is not None:  # a retry of a connect done
            return JSONResponse({"conversation_id": known.session.id})
        try:
            callback = self.access.callback(body.get("callback_url"))
            requested, principal = _opening(body)
        except BridgeRefused as e:
            return JSONResponse({"error": str(e)}, status_code=e.status)
        try:
            session = await self.sessions.open(principal, requested)
        except Refused as e:
            message = "server busy" if e.code == "server_busy" else str(e)
            return JSONResponse({"error": message}, status_code=_REFUSED_STATUS[e.code])
        try:
            # Made after the session opened: its grace for API Gateway's not-yet-connected 410s starts now.
            sink = self._sink(callback)
        except BaseException:
            await self.sessions.close(session)
            raise
        pump = asyncio.get_running_loop().create_task(self._pump(connection_id, session, sink))
        self.connections[connection_id] = _Bridged(session, pump)
        log.info("bridge %s: conversation %s opened", connection_id, session.id)
        return JSONResponse({"conversation_id": session.id})

    async def event(self, connection_id: str, raw: bytes) -> JSONResponse:
        bridged = self.connections.get(connection_id)
        if bridged is None:
            return JSONResponse({"error": "unknown connection"}, status_code=404)
        await bridged.session.receive(raw)
        return JSONResponse({"conversation_id": bridged.session.id})

    async def disconnect(self, connection_id: str) -> JSONResponse:
        bridged = self.connections.pop(connection_id, None)
        if bridged is None:
            return JSONResponse({"conversation_id": None})
        await self.sessions.close(bridged.session)
        await asyncio.gather(bridged.pump, return_exceptions=True)
        return JSONResponse({"conversation_id": bridged.session.id})

    async def _pump(self, connection_id: str, session: Session, sink: EventSink) -> None:
        """Post the session's events until it closes (`None`) or the person left (the sink says so)."""
        gone = False
        try:
            while (event := await session.outbox.get()) is not None:
                if not await sink.send(connection_id, event.to_json()):
                    log.info("bridge %s: conversation %s: the connection is gone", connection_id, session.id)
                    gone = True
                    break
        except Exception:  # nobody awaits a pump that ends on its own: say why here
            log.exception("bridge %s: conversation %s: posting its events failed", connection_id, session.id)
        finally:
            bridged = self.connections.get(connection_id)
            ended_here = bridged is not None and bridged.session is session  # not by `$disconnect`
            if ended_here:
                del self.connections[connection_id]
            await self.sessions.close(session)
            if ended_here and not gone:  # taken over, or the pump failed: the browser is still connected
                await sink.close(connection_id)


def _opening(body: dict) -> tuple[str | None, str]:
    """(conversation to resume or None, principal) of a connect. The principal is whom the bridge's
    authorizer admitted; it is taken as given because the bridge's token authenticated the caller, and
    it is required: it owns the conversation and counts against its limit."""
    requested = body.get("conversation_id") or None
    principal = body.get("principal")
    if not isinstance(principal, str) or not principal:
        raise BridgeRefused(400, "principal (whom the authorizer admitted) is required")
    try:
        return (None if requested is None else check_conversation_id(requested)), principal
    except ValueError as e:
        raise BridgeRefused(400, str(e)) from e
