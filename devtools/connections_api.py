"""The gateway emulator's `@connections` management API (devtools.local_gateway), on a port of its own.

What the unmodified boto3 `apigatewaymanagementapi` client calls, answered as API Gateway does: POST a
message to a connection (over 128 KB: 413; an unknown connection: 410 `GoneException`; over 32 KB it
reaches the browser in 32 KB fragments), GET its info, DELETE it. Every request's SigV4 signature is
checked with botocore's signer (`devtools.sigv4`) against the known credentials: a bad one gets AWS's 403.
A small HTTP/1.1 server (kept-alive, Content-Length bodies), enough for boto3.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http import HTTPStatus
from urllib.parse import unquote, urlsplit

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from devtools.sigv4 import SignatureRefused, verify

FRAME_LIMIT = 32 * 1024
MESSAGE_LIMIT = 128 * 1024
KNOWN_CREDENTIALS = {"testing": "testing"}  # access key -> secret: the stand-ins' convention (moto's too)

Answer = tuple[HTTPStatus, bytes, dict[str, str]]


@dataclass
class Connection:
    """One browser socket the gateway holds, as `@connections` GET describes it."""

    id: str
    socket: ServerConnection
    connected_at: float = field(default_factory=time.time)
    last_active: float = field(default_factory=time.time)
    source_ip: str = "127.0.0.1"
    user_agent: str = ""
    authorizer: dict | None = None


def default_credentials() -> dict[str, str]:
    """The known pair, and this process's own (`AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`) if it has one."""
    known = dict(KNOWN_CREDENTIALS)
    key, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
    if key and secret:
        known[key] = secret
    return known


class ConnectionsApi:
    """`@connections` for `connections` (the gateway's, by id), at `http://host:port/<stage>`."""

    def __init__(
        self,
        connections: Mapping[str, Connection],
        *,
        host: str,
        port: int,
        stage: str,
        credentials: Mapping[str, str],
        spawn: Callable[[Coroutine], None],
    ) -> None:
        self.connections = connections
        self.host, self.port, self.stage = host, port, stage
        self.credentials = credentials
        self._spawn = spawn  # runs a socket's close without holding up the DELETE's answer
        self.throttle_posts = 0  # the next N posts get 429 LimitExceededException
        self.refused_signatures = 0  # requests answered 403 for their signature
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/{self.stage}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is None:
            return
        self._server.close()
        # Kept-alive clients (the ingress's boto3 pool) must not be left talking to a gateway that is
        # gone: another may take the same port, as the tests' fixed callback does.
        for writer in list(self._writers):
            writer.close()
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            while True:
                line = await reader.readline()
                if not line:
                    return
                method, target, _ = line.decode("latin-1").split(" ", 2)
                headers: dict[str, str] = {}
                while (header := await reader.readline()) not in (b"\r\n", b"\n", b""):
                    name, _, value = header.decode("latin-1").partition(":")
                    headers[name.strip().lower()] = value.strip()
                body = await reader.readexactly(int(headers.get("content-length", "0") or 0))
                status, payload, extra = await self.answer(method, target, headers, body)
                head = [f"HTTP/1.1 {status.value} {status.phrase}", f"Content-Length: {len(payload)}"]
                head += ["Content-Type: application/json", "Connection: keep-alive"]
                head += [f"{k}: {v}" for k, v in extra.items()]
                writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + payload)
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, ValueError):
            return
        finally:
            self._writers.discard(writer)
            writer.close()

    async def answer(self, method: str, target: str, headers: dict[str, str], body: bytes) -> Answer:
        path = unquote(urlsplit(target).path)
        prefix = f"/{self.stage}/@connections/"
        if not path.startswith(prefix):
            return _error(HTTPStatus.NOT_FOUND, "NotFoundException", f"no route {path}")
        host = headers.get("host", f"{self.host}:{self.port}")
        try:
            verify(method, f"http://{host}{target}", headers, body, self.credentials, "execute-api")
        except SignatureRefused as refused:
            self.refused_signatures += 1
            return _error(HTTPStatus.FORBIDDEN, refused.error_type, refused.message)
        connection = self.connections.get(path[len(prefix) :])
        if connection is None:
            return _error(HTTPStatus.GONE, "GoneException", None)
        if method == "GET":
            info = {
                "connectedAt": _iso(connection.connected_at),
                "lastActiveAt": _iso(connection.last_active),
                "identity": {"sourceIp": connection.source_ip, "userAgent": connection.user_agent},
            }
            return HTTPStatus.OK, json.dumps(info).encode(), {}
        if method == "DELETE":
            self._spawn(connection.socket.close(1000, ""))
            return HTTPStatus.NO_CONTENT, b"", {}
        if method != "POST":
            return _error(HTTPStatus.METHOD_NOT_ALLOWED, "BadRequestException", method)
        if len(body) > MESSAGE_LIMIT:
            return _error(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "PayloadTooLargeException", "Message too long")
        if self.throttle_posts > 0:
            self.throttle_posts -= 1
            return _error(HTTPStatus.TOO_MANY_REQUESTS, "LimitExceededException", "Rate exceeded")
        text = body.decode("utf-8", errors="replace")
        try:
            if len(body) > FRAME_LIMIT:  # API Gateway splits what it sends into 32 KB frames
                await connection.socket.send(fragments(text))
            else:
                await connection.socket.send(text)
        except ConnectionClosed:
            return _error(HTTPStatus.GONE, "GoneException", None)
        return HTTPStatus.OK, b"", {}


def fragments(text: str) -> list[str]:
    """`text` as frames of at most FRAME_LIMIT bytes, never splitting a UTF-8 character."""
    data, pieces, start = text.encode(), [], 0
    while start < len(data):
        end = min(start + FRAME_LIMIT, len(data))
        while end < len(data) and (data[end] & 0xC0) == 0x80:
            end -= 1
        pieces.append(data[start:end].decode())
        start = end
    return pieces


def _error(status: HTTPStatus, code: str, message: str | None) -> Answer:
    return status, json.dumps({"message": message}).encode(), {"x-amzn-ErrorType": code}


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
