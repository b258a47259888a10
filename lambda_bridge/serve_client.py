"""HTTP calls from the bridge to the Serve ingress: kept-alive connections, retries, a hard deadline.

`http.client` (the standard library under urllib) so that a warm Lambda container reuses its TCP
connection across invocations instead of paying a handshake per audio chunk. Every call carries the
connection id as `serve_multiplexed_model_id`, so all of a connection's calls reach the ingress
replica that holds its conversation.

Retries: connection errors before a response, and 502/503/504 (the proxy had no replica to give it
to), with exponential backoff and jitter, all inside the caller's deadline. A request that timed out
waiting for its response is not retried: the server may have acted on it, and an audio chunk played
twice is worse than one reported lost.
"""

from __future__ import annotations

import http.client
import json
import random
import threading
import time
from dataclasses import dataclass
from urllib.parse import quote, urlsplit

RETRY_STATUSES = frozenset({502, 503, 504})
_BACKOFF_BASE_S = 0.1
_BACKOFF_MAX_S = 2.0


class ServeUnavailable(Exception):
    """No answer from the ingress within the deadline (down, overloaded, or slow)."""


@dataclass
class Reply:
    status: int
    body: dict

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300


class ServeClient:
    """One ingress base URL; one kept-alive connection per thread (the emulator invokes in threads)."""

    def __init__(self, base_url: str, token: str | None = None) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {base_url!r}")
        self.scheme = parts.scheme
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.prefix = parts.path.rstrip("/")
        self.token = token
        self._local = threading.local()

    def connect(self, connection_id: str, body: dict, deadline: float) -> Reply:
        return self._call("POST", connection_id, "", json.dumps(body).encode(), deadline)

    def forward(self, connection_id: str, message: bytes, deadline: float) -> Reply:
        return self._call("POST", connection_id, "/events", message, deadline)

    def disconnect(self, connection_id: str, deadline: float) -> Reply:
        return self._call("DELETE", connection_id, "", b"", deadline)

    def _call(self, method: str, connection_id: str, suffix: str, body: bytes, deadline: float) -> Reply:
        """`deadline` is a `time.monotonic()` instant; ServeUnavailable once it cannot be met."""
        path = f"{self.prefix}/bridge/connections/{quote(connection_id, safe='')}{suffix}"
        headers = {"Content-Type": "application/json", "serve_multiplexed_model_id": connection_id}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        attempt, last = 0, "no attempt"
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ServeUnavailable(f"{method} {path}: {last}")
            sent = reused = False
            try:
                conn = self._connection(left)
                reused = conn.sock is not None
                conn.request(method, path, body=body, headers=headers)
                sent = True
                response = conn.getresponse()
                data = response.read()
            except TimeoutError as e:
                self._drop()
                if sent:  # it may have been acted on: report, never repeat
                    raise ServeUnavailable(f"{method} {path}: no response in time") from e
                last = "connect timed out"
            except (OSError, http.client.HTTPException) as e:
                self._drop()
                last = f"{type(e).__name__}: {e}"
                stale = reused and isinstance(e, (ConnectionResetError, http.client.RemoteDisconnected))
                if sent and not stale:
                    raise ServeUnavailable(f"{method} {path}: {last}") from e
                # A kept-alive connection the server had closed fails on first use: safe to repeat.
            else:
                if response.status not in RETRY_STATUSES:
                    return Reply(response.status, _json(data))
                last = f"HTTP {response.status}"
            attempt += 1
            pause = min(_BACKOFF_MAX_S, _BACKOFF_BASE_S * 2**attempt) * random.uniform(0.5, 1.0)
            time.sleep(max(0.0, min(pause, deadline - time.monotonic())))

    def _connection(self, timeout: float) -> http.client.HTTPConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            cls = http.client.HTTPSConnection if self.scheme == "https" else http.client.HTTPConnection
            conn = cls(self.host, self.port, timeout=timeout)
            self._local.conn = conn
        conn.timeout = timeout
        if conn.sock is not None:
            conn.sock.settimeout(timeout)
        return conn

    def _drop(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None


def _json(data: bytes) -> dict:
    try:
        value = json.loads(data or b"{}")
    except ValueError:
        return {"error": data[:200].decode(errors="replace")}
    return value if isinstance(value, dict) else {"value": value}
