"""A local stand-in for API Gateway's WebSocket API, running the real bridge handlers in-process.

    CSM_BRIDGE_TOKEN=B CSM_BRIDGE_CALLBACK_URL=http://127.0.0.1:8766/local \
        python -m devtools.local_gateway --serve-url http://127.0.0.1:8000 --token SECRET --port 8765

Browsers connect to `ws://127.0.0.1:8765/?token=SECRET`. The handlers present the bridge token to the
ingress, and `@connections` is served where the ingress is configured to post (its port and stage are
taken from `CSM_BRIDGE_CALLBACK_URL`): run the ingress with the same two variables. Like API Gateway, it:
- runs the `$connect` authorizer (with `--authorizer`) and the `$connect` handler during the
  handshake, and refuses the socket with the status they return;
- accepts text frames only (a binary frame closes the socket with 1003), frames up to 32 KB and
  messages up to 128 KB (over either: 1009), closes idle sockets (10 min) and old ones (2 h) with 1001;
- invokes `$default` with each message, in an event shaped like API Gateway's (`requestContext`:
  routeKey, connectionId, eventType, domainName, stage, ...), and `$disconnect` when a socket ends;
- serves `@connections` (POST, GET, DELETE; `devtools.connections_api`) on a second port, where the boto3
  `apigatewaymanagementapi` client posts: a message over 128 KB gets 413, an unknown connection 410
  `GoneException`; messages over 32 KB reach the browser in 32 KB fragments. Every request's SigV4
  signature is checked with botocore's signer against the gateway's known credentials
  (`devtools.sigv4`; by default `testing`/`testing` and the pair in its own environment): a bad one gets
  AWS's 403.

By default it invokes a connection's messages one at a time, in order. API Gateway may run them
concurrently; `concurrent_delivery=True` (`--concurrent-delivery`) does that too: each message's `$default`
starts at once, after a random delay of up to `delivery_jitter_s`, so they can reach the ingress in any
order. It is a development and test tool and is never deployed.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import logging
import os
import random
import secrets
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from http import HTTPStatus
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.frames import Frame, Opcode
from websockets.http11 import Request, Response

from devtools.connections_api import (
    FRAME_LIMIT,
    MESSAGE_LIMIT,
    Connection,
    ConnectionsApi,
    default_credentials,
)
from lambda_bridge import authorizer as authorizer_module
from lambda_bridge import handlers
from lambda_bridge import settings as settings_module

log = logging.getLogger("local_gateway")  # not under "lambda_bridge": those lines are the Lambdas'

IDLE_TIMEOUT_S = 10 * 60
MAX_CONNECTION_S = 2 * 60 * 60
API_ID = "local"
Handler = Callable[[dict, object], dict]
UNAUTHORIZED: dict = {}  # what `_invoke` returns when a handler raised "Unauthorized" (compared by identity)


@dataclass
class Routes:
    """The Lambda functions behind each route (the real ones unless a test swaps one)."""

    connect: Handler = handlers.connect
    default: Handler = handlers.default
    disconnect: Handler = handlers.disconnect
    authorizer: Handler | None = None


class LambdaContext:
    """The parts of Lambda's context object the handlers use."""

    def __init__(self, function_name: str, timeout_s: float) -> None:
        self.function_name = function_name
        self.aws_request_id = str(uuid.uuid4())
        self._ends = time.monotonic() + timeout_s

    def get_remaining_time_in_millis(self) -> int:
        return max(0, int((self._ends - time.monotonic()) * 1000))


class _GatewayConnection(ServerConnection):
    """Enforces API Gateway's frame rules, which websockets (which checks whole messages) does not."""

    def process_event(self, event) -> None:
        if self.request is not None and isinstance(event, Frame):
            if event.opcode is Opcode.BINARY or (
                event.opcode is Opcode.CONT and getattr(self, "_binary", False)
            ):
                self._binary = True
                self._violate(1003, "binary frames are not supported")
                return
            if event.opcode in (Opcode.TEXT, Opcode.CONT) and len(event.data) > FRAME_LIMIT:
                self._violate(1009, "frame exceeds 32 KB")
                return
        super().process_event(event)

    def _violate(self, code: int, reason: str) -> None:
        if not getattr(self, "_violated", False):
            self._violated = True
            self.loop.create_task(self.close(code, reason))


class LocalGateway:
    """API Gateway's WebSocket API and `@connections` endpoint on loopback; see the module docstring."""

    def __init__(
        self,
        serve_url: str,
        *,
        token: str | None = None,
        bridge_token: str | None = None,
        use_authorizer: bool = False,
        host: str = "127.0.0.1",
        port: int = 0,
        management_port: int = 0,
        stage: str = "local",
        idle_timeout_s: float = IDLE_TIMEOUT_S,
        max_connection_s: float = MAX_CONNECTION_S,
        lambda_timeout_s: float = 29.0,
        forward_deadline_s: float | None = None,
        deliver_disconnect: bool = True,
        routes: Routes | None = None,
        credentials: Mapping[str, str] | None = None,
        concurrent_delivery: bool = False,
        delivery_jitter_s: float = 0.05,
        seed: int | None = None,
    ) -> None:
        self.serve_url = serve_url
        self.token = token
        self.bridge_token = bridge_token  # the handlers' credential for the ingress (BRIDGE_TOKEN)
        self.routes = routes or Routes(authorizer=authorizer_module.handler if use_authorizer else None)
        self.host, self.port = host, port
        self.stage = stage
        self.idle_timeout_s = idle_timeout_s
        self.max_connection_s = max_connection_s
        self.lambda_timeout_s = lambda_timeout_s
        self.forward_deadline_s = forward_deadline_s
        self.deliver_disconnect = deliver_disconnect  # False: a lost $disconnect, as API Gateway may do
        # Who may sign @connections requests: the given pairs, or the known ones and this process's own.
        self.credentials = dict(credentials) if credentials is not None else default_credentials()
        self.connections: dict[str, Connection] = {}
        self.invocations: list[tuple[str, dict]] = []  # (route, event): what the handlers were given
        self.api = ConnectionsApi(
            self.connections,
            host=host,
            port=management_port,
            stage=stage,
            credentials=self.credentials,
            spawn=self._spawn,
        )
        self.concurrent_delivery = concurrent_delivery
        self.delivery_jitter_s = delivery_jitter_s
        self._rng = random.Random(seed)
        self._ws: Server | None = None
        self._tasks: set[asyncio.Task] = set()

    @property
    def url(self) -> str:
        return f"ws://{self.host}:{self.port}/"

    @property
    def callback_url(self) -> str:
        return self.api.url

    @property
    def throttle_posts(self) -> int:
        """The next N `@connections` posts get 429 LimitExceededException."""
        return self.api.throttle_posts

    @throttle_posts.setter
    def throttle_posts(self, n: int) -> None:
        self.api.throttle_posts = n

    @property
    def refused_signatures(self) -> int:
        return self.api.refused_signatures

    async def start(self) -> None:
        await self.api.start()
        self._ws = await serve(
            self._serve_socket,
            self.host,
            self.port,
            process_request=self._handshake,
            create_connection=_GatewayConnection,
            max_size=MESSAGE_LIMIT,
            ping_interval=None,  # API Gateway sends no pings; idleness is its own timer
            open_timeout=self.lambda_timeout_s * 2 + 5,  # the authorizer and $connect run in the handshake
            compression=None,
        )
        self.port = self._ws.sockets[0].getsockname()[1] if not self.port else self.port
        self._configure_handlers()
        log.info("gateway at %s, @connections at %s → %s", self.url, self.callback_url, self.serve_url)

    async def stop(self) -> None:
        if self._ws is not None:
            self._ws.close()
            await self._ws.wait_closed()
        await self.api.stop()
        for task in list(self._tasks):
            task.cancel()

    async def __aenter__(self) -> LocalGateway:
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    def _configure_handlers(self) -> None:
        """The environment the Lambda functions would get from the CDK stack, pointing here."""
        env = {"SERVE_URL": self.serve_url, "CALLBACK_URL": self.callback_url}
        env["AUTH_MODE"] = "authorizer" if self.routes.authorizer else "handler"
        if self.token is not None:
            env["TOKEN"] = self.token
        if self.bridge_token is not None:
            env["BRIDGE_TOKEN"] = self.bridge_token
        else:
            os.environ.pop("BRIDGE_TOKEN", None)  # one gateway's token is not the next one's
        if self.forward_deadline_s is not None:
            env["FORWARD_DEADLINE_S"] = str(self.forward_deadline_s)
        os.environ.update(env)
        # The handlers' boto3 signs its @connections posts with this process's credentials.
        key, secret = next(iter(self.credentials.items()))
        if os.environ.get("AWS_ACCESS_KEY_ID") not in self.credentials:
            os.environ.update(AWS_ACCESS_KEY_ID=key, AWS_SECRET_ACCESS_KEY=secret)
        os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
        settings_module.reset()
        handlers.serve.cache_clear()

    # ---- Lambda invocations -----------------------------------------------------------------------
    def _context(self, connection_id: str, route: str, event_type: str, **extra) -> dict:
        now = time.time()
        known = self.connections.get(connection_id)
        if known is not None:
            extra.setdefault("identity", {"sourceIp": known.source_ip, "userAgent": known.user_agent})
        return {
            "routeKey": route,
            "eventType": event_type,
            "connectionId": connection_id,
            "domainName": f"{self.host}:{self.port}",
            "stage": self.stage,
            "apiId": API_ID,
            "requestId": secrets.token_urlsafe(12),
            "extendedRequestId": secrets.token_urlsafe(12),
            "requestTimeEpoch": int(now * 1000),
            "requestTime": datetime.fromtimestamp(now, UTC).strftime("%d/%b/%Y:%H:%M:%S +0000"),
            "messageDirection": "IN",
            "connectedAt": int((known.connected_at if known else now) * 1000),
            **extra,
        }

    async def _invoke(self, name: str, function: Handler, event: dict) -> dict | None:
        self.invocations.append((name, event))
        context = LambdaContext(name, self.lambda_timeout_s)
        try:
            return await asyncio.wait_for(asyncio.to_thread(function, event, context), self.lambda_timeout_s)
        except TimeoutError:
            log.error("%s timed out after %gs", name, self.lambda_timeout_s)
            return None
        except Exception as e:
            log.error("%s raised %s: %s", name, type(e).__name__, e)
            if str(e) == "Unauthorized":  # an authorizer's way of asking API Gateway for a 401
                return UNAUTHORIZED
            return None

    async def _invoke_later(self, delay_s: float, event: dict) -> None:
        await asyncio.sleep(delay_s)
        await self._invoke("$default", self.routes.default, event)

    def _spawn(self, work) -> None:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ---- the browser's socket ---------------------------------------------------------------------
    async def _handshake(self, socket: ServerConnection, request: Request) -> Response | None:
        """`$connect`: the authorizer, then the handler; a refusal is an HTTP status, as in API Gateway."""
        parts = urlsplit(request.path)
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        headers = {k: v for k, v in request.headers.raw_items()}
        # Shaped like API Gateway's (base64 of 10 bytes): '=' and sometimes '/' or '+' in it.
        connection_id = base64.b64encode(secrets.token_bytes(10)).decode()
        identity = {
            "sourceIp": socket.remote_address[0] if socket.remote_address else "127.0.0.1",
            "userAgent": request.headers.get("User-Agent", ""),
        }
        base = {
            "headers": headers,
            "multiValueHeaders": {k: [v] for k, v in headers.items()},
            "queryStringParameters": query or None,
            "multiValueQueryStringParameters": {k: v for k, v in parse_qs(parts.query).items()} or None,
            "isBase64Encoded": False,
        }
        authorized: dict | None = None
        if self.routes.authorizer is not None:
            event = {
                **base,
                "type": "REQUEST",
                "methodArn": f"arn:aws:execute-api:us-east-1:000000000000:{API_ID}/{self.stage}/$connect",
                "requestContext": self._context(connection_id, "$connect", "CONNECT", identity=identity),
            }
            result = await self._invoke("authorizer", self.routes.authorizer, event)
            if result is UNAUTHORIZED or not result:
                return _refuse(
                    HTTPStatus.UNAUTHORIZED if result is UNAUTHORIZED else HTTPStatus.INTERNAL_SERVER_ERROR
                )
            statement = result["policyDocument"]["Statement"][0]
            if statement["Effect"] != "Allow":
                return _refuse(HTTPStatus.FORBIDDEN)
            authorized = {"principalId": result["principalId"], **result.get("context", {})}
        context = self._context(connection_id, "$connect", "CONNECT", identity=identity)
        if authorized:
            context["authorizer"] = authorized
        result = await self._invoke("$connect", self.routes.connect, {**base, "requestContext": context})
        status = int((result or {}).get("statusCode", 500))
        if not 200 <= status < 300:
            return _refuse(
                HTTPStatus(status) if status in HTTPStatus._value2member_map_ else HTTPStatus.BAD_GATEWAY
            )
        # Registered once the handshake completes: until then `@connections` answers 410, as in AWS.
        socket.gateway_connection = Connection(  # type: ignore[attr-defined]
            connection_id,
            socket,
            source_ip=identity["sourceIp"],
            user_agent=identity["userAgent"],
            authorizer=authorized,
        )
        return None

    async def _serve_socket(self, socket: ServerConnection) -> None:
        connection: Connection = socket.gateway_connection  # type: ignore[attr-defined]
        connection_id = connection.id
        self.connections[connection_id] = connection
        status, reason = 1005, "client closed"
        try:
            while True:
                left = (
                    min(
                        connection.last_active + self.idle_timeout_s,
                        connection.connected_at + self.max_connection_s,
                    )
                    - time.time()
                )
                try:
                    message = await asyncio.wait_for(socket.recv(), max(left, 0.001))
                except TimeoutError:
                    idle = time.time() - connection.last_active >= self.idle_timeout_s
                    status, reason = 1001, "Going away" if idle else "Connection duration exceeded"
                    await socket.close(1001, "Going away")
                    break
                connection.last_active = time.time()
                context = self._context(
                    connection_id, "$default", "MESSAGE", messageId=secrets.token_urlsafe(12)
                )
                if connection.authorizer:
                    context["authorizer"] = connection.authorizer
                event = {"requestContext": context, "body": message, "isBase64Encoded": False}
                if self.concurrent_delivery:
                    self._spawn(self._invoke_later(self._rng.random() * self.delivery_jitter_s, event))
                else:
                    await self._invoke("$default", self.routes.default, event)
        except ConnectionClosed as e:
            if e.rcvd is not None:
                status, reason = e.rcvd.code, e.rcvd.reason or "client closed"
            elif e.sent is not None:
                status, reason = e.sent.code, e.sent.reason
        finally:
            self.connections.pop(connection_id, None)
            if self.deliver_disconnect:
                context = self._context(
                    connection_id,
                    "$disconnect",
                    "DISCONNECT",
                    disconnectStatusCode=status,
                    disconnectReason=reason,
                )
                if connection.authorizer:
                    context["authorizer"] = connection.authorizer
                await self._invoke(
                    "$disconnect", self.routes.disconnect, {"requestContext": context, "headers": {}}
                )


def _refuse(status: HTTPStatus) -> Response:
    return Response(status.value, status.phrase, Headers([("Content-Length", "0")]), b"")


# Where `@connections` is served unless CSM_BRIDGE_CALLBACK_URL says otherwise.
DEFAULT_CALLBACK_URL = "http://127.0.0.1:8766/local"


def main() -> None:
    callback = urlsplit(os.environ.get("CSM_BRIDGE_CALLBACK_URL") or DEFAULT_CALLBACK_URL)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--serve-url", default="http://127.0.0.1:8000", help="the Serve ingress")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765, help="WebSocket port")
    parser.add_argument(
        "--management-port",
        type=int,
        default=callback.port or 80,
        help="@connections port (default: CSM_BRIDGE_CALLBACK_URL's, else 8766; 0: any free)",
    )
    parser.add_argument(
        "--stage", default=callback.path.strip("/") or "local", help="(default: CSM_BRIDGE_CALLBACK_URL's)"
    )
    parser.add_argument(
        "--token", default=os.environ.get("CSM_TOKEN"), help="shared token (default $CSM_TOKEN)"
    )
    parser.add_argument(
        "--bridge-token",
        default=os.environ.get("CSM_BRIDGE_TOKEN"),
        help="the bridge's token for the ingress (default $CSM_BRIDGE_TOKEN; the ingress's must match)",
    )
    parser.add_argument(
        "--idle-timeout", type=float, default=IDLE_TIMEOUT_S, help="seconds (API Gateway: 600)"
    )
    parser.add_argument("--authorizer", action="store_true", help="check the token in the Lambda authorizer")
    delivery = "invoke $default for each message at once, with random delays, as API Gateway may"
    parser.add_argument("--concurrent-delivery", action="store_true", help=delivery)
    args = parser.parse_args()
    if not args.bridge_token:
        parser.error("the ingress opens its bridge routes only to the bridge's token: set CSM_BRIDGE_TOKEN")
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    async def run() -> None:
        gateway = LocalGateway(
            args.serve_url,
            token=args.token,
            bridge_token=args.bridge_token,
            use_authorizer=args.authorizer,
            host=args.host,
            port=args.port,
            management_port=args.management_port,
            stage=args.stage,
            idle_timeout_s=args.idle_timeout,
            concurrent_delivery=args.concurrent_delivery,
        )
        async with gateway:
            # The ingress must post exactly here: its CSM_BRIDGE_CALLBACK_URL.
            print(f"ready: {gateway.url} (@connections at {gateway.callback_url})", flush=True)
            await asyncio.Future()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run())


if __name__ == "__main__":
    main()
