"""API Gateway's `@connections` management API, as the bridge uses it: tell a person what went wrong
(an `error` event in the realtime protocol's shape), or close their socket."""

from __future__ import annotations

import functools
import json
import secrets

from lambda_bridge.logs import logger


@functools.cache
def client(callback_url: str):
    """One boto3 client per endpoint, kept for the container's life (creating one costs ~100 ms)."""
    import boto3
    from botocore.config import Config

    config = Config(retries={"mode": "standard", "max_attempts": 5}, connect_timeout=2, read_timeout=5)
    return boto3.client("apigatewaymanagementapi", endpoint_url=callback_url, config=config)


def error_event(code: str, message: str, client_event_id: str | None = None) -> str:
    """An `error` event exactly as the Serve ingress would send it (DESIGN section 4)."""
    event = {
        "type": "error",
        "event_id": f"event_{secrets.token_hex(10)}",
        "error": {
            "type": "server_error",
            "code": code,
            "message": message,
            "param": None,
            "event_id": client_event_id,
        },
    }
    return json.dumps(event)


def send(callback_url: str, connection_id: str, data: str) -> bool:
    """Post one message; False when the person has already left (GoneException) or posting failed."""
    api = client(callback_url)
    try:
        api.post_to_connection(ConnectionId=connection_id, Data=data.encode())
    except api.exceptions.GoneException:
        logger().info("the connection is gone; nothing sent")
        return False
    except Exception:
        logger().exception("could not post to the connection")
        return False
    return True


def close(callback_url: str, connection_id: str) -> None:
    """Close the person's socket (API Gateway then invokes `$disconnect`)."""
    api = client(callback_url)
    try:
        api.delete_connection(ConnectionId=connection_id)
    except api.exceptions.GoneException:
        pass
    except Exception:
        logger().exception("could not close the connection")
