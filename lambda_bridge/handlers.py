"""The Lambda handlers behind API Gateway's WebSocket routes: `$connect`, `$disconnect`, `$default`.

Each is a plain function of (event, context). `$default` forwards the client's message untouched to
the ingress and returns: the reply travels back through `@connections`, posted by the Serve side.
When the ingress cannot be reached in time, the person gets an `error` event instead of silence.

Every call to the ingress carries the bridge's own token (`settings.bridge_token`), never the users'.
`$connect` tells the ingress whose conversation it is: the principal the authorizer put in its context
(or, without an authorizer, the one `$connect` itself authenticated), never anything the client sent.
Where replies go is the ingress's configuration, not something the bridge tells it.
"""

from __future__ import annotations

import base64
import functools
import json
import time

from lambda_bridge import connections
from lambda_bridge.authorizer import authenticate, presented_token
from lambda_bridge.logs import bind, logger, update
from lambda_bridge.serve_client import ServeClient, ServeUnavailable
from lambda_bridge.settings import bridge_token, settings

# Leave the Lambda this long after a forward gives up, to post the error and log.
_REPORT_MARGIN_S = 1.0


@functools.cache
def serve() -> ServeClient:
    """The ingress client for this container (kept-alive connections across invocations)."""
    return ServeClient(settings().serve_url, bridge_token())


def deadline(context) -> float:
    """The monotonic instant a forward must finish by: the configured deadline, or sooner if the
    Lambda itself would time out first."""
    budget = settings().forward_deadline_s
    remaining_ms = getattr(context, "get_remaining_time_in_millis", None)
    if remaining_ms is not None:
        budget = min(budget, remaining_ms() / 1000 - _REPORT_MARGIN_S)
    return time.monotonic() + max(budget, 0.1)


def connect(event: dict, context) -> dict:
    ctx = event["requestContext"]
    connection_id = ctx["connectionId"]
    query = event.get("queryStringParameters") or {}
    with bind(connection_id=connection_id, route="$connect", request_id=ctx.get("requestId")):
        log = logger()
        s = settings()
        if s.auth_mode == "handler":
            principal = authenticate(presented_token(query, event.get("headers") or {}) or "")
            if principal is None:
                log.warning("refused: missing or wrong token")
                return {"statusCode": 401, "body": "unauthorized"}
        else:
            # What `authorizer.handler` put in the policy's context; API Gateway passes it on as is.
            principal = (ctx.get("authorizer") or {}).get("principal")
        # Whose conversation: the ingress limits open ones per principal. A missing one is refused there.
        body = {"conversation_id": query.get("conversation_id"), "principal": principal}
        try:
            reply = serve().connect(connection_id, body, deadline(context))
        except ServeUnavailable as e:
            log.error("the server is unreachable: %s", e)
            return {"statusCode": 503, "body": "service unavailable"}
        if reply.ok:
            update(conversation_id=reply.body.get("conversation_id"))
            log.info("connected")
            return {"statusCode": 200}
        if reply.status == 503:
            log.warning("refused: the server is at capacity")
            return {"statusCode": 503, "body": "server busy"}
        if reply.status in (400, 404, 409, 429):
            # The person's own request refused (a bad or someone else's conversation id, one that is open
            # elsewhere, too many open): the handshake fails with that status and the server's reason.
            log.warning("refused (HTTP %s): %s", reply.status, reply.body.get("error"))
            return {"statusCode": reply.status, "body": str(reply.body.get("error"))}
        log.error(
            "the server refused the bridge (HTTP %s: %s): check SERVE_URL and the bridge token",
            reply.status,
            reply.body.get("error"),
        )
        return {"statusCode": 500, "body": "bridge misconfigured"}


def default(event: dict, context) -> dict:
    ctx = event["requestContext"]
    connection_id = ctx["connectionId"]
    body = event.get("body") or ""
    raw = body.encode()
    if event.get("isBase64Encoded"):  # API Gateway refuses binary frames, but never trust a flag
        try:
            raw = base64.b64decode(body, validate=True)
        except ValueError:
            pass  # forwarded as it came: the ingress names what is wrong with it
    with bind(connection_id=connection_id, route="$default", request_id=ctx.get("requestId")):
        log = logger()
        callback = settings().callback_for(ctx)
        try:
            reply = serve().forward(connection_id, raw, deadline(context))
        except ServeUnavailable as e:
            log.error("message not delivered: %s", e)
            message = "the server did not answer in time; the message was not delivered, try again"
            connections.send(
                callback,
                connection_id,
                connections.error_event("service_unavailable", message, _event_id(raw)),
            )
            return {"statusCode": 200}
        update(conversation_id=reply.body.get("conversation_id"))
        if reply.status == 404:
            # The ingress no longer has this conversation (it restarted): say so and close, so that the
            # page reconnects (with its conversation id, the history carries on).
            log.warning("the server has no conversation for this connection; closing it")
            message = "the server lost this conversation (it restarted); reconnect to carry on"
            connections.send(callback, connection_id, connections.error_event("service_unavailable", message))
            connections.close(callback, connection_id)
        elif not reply.ok:
            log.error("the server refused the message (HTTP %s): %s", reply.status, reply.body)
            message = f"the bridge could not deliver the message (HTTP {reply.status})"
            connections.send(
                callback, connection_id, connections.error_event("internal_error", message, _event_id(raw))
            )
        return {"statusCode": 200}


def disconnect(event: dict, context) -> dict:
    ctx = event["requestContext"]
    connection_id = ctx["connectionId"]
    with bind(connection_id=connection_id, route="$disconnect", request_id=ctx.get("requestId")):
        log = logger()
        try:
            reply = serve().disconnect(connection_id, deadline(context))
        except ServeUnavailable as e:
            # The ingress also ends the conversation on its own when posting finds the connection gone.
            log.warning("could not tell the server: %s", e)
            return {"statusCode": 200}
        update(conversation_id=reply.body.get("conversation_id"))
        log.info("disconnected (%s)", ctx.get("disconnectReason") or ctx.get("disconnectStatusCode") or "")
        return {"statusCode": 200}


def _event_id(raw: bytes) -> str | None:
    """The client's `event_id`, so its error names the message that was lost."""
    try:
        event = json.loads(raw)
    except ValueError:
        return None
    value = event.get("event_id") if isinstance(event, dict) else None
    return value if isinstance(value, str) else None
