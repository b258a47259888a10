"""Bridged conversations: the Lambda path, where no WebSocket reaches the ingress.

API Gateway holds the browser's socket; the bridge Lambda posts each client message to the ingress
(`/bridge/connections/{id}/...`), and the conversation's events go back through an `EventSink`. The
production sink posts to API Gateway's `@connections` API with boto3 (the callback URL comes with the
connect call); tests may plug in any sink with the same two methods.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol

log = logging.getLogger(__name__)


class EventSink(Protocol):
    async def send(self, connection_id: str, data: str) -> bool:
        """Deliver one event; False when the connection is gone (the person left)."""
        ...

    async def close(self, connection_id: str) -> None: ...


class ApiGatewaySink:
    """Posts events to API Gateway's `@connections` management API (one boto3 client per callback URL)."""

    def __init__(self, callback_url: str, region: str | None = None) -> None:
        import boto3  # only bridged deployments need it loaded

        self.client = boto3.client("apigatewaymanagementapi", endpoint_url=callback_url, region_name=region)
        self._gone = self.client.exceptions.GoneException

    async def send(self, connection_id: str, data: str) -> bool:
        try:
            await asyncio.to_thread(
                self.client.post_to_connection, ConnectionId=connection_id, Data=data.encode()
            )
        except self._gone:
            return False
        return True

    async def close(self, connection_id: str) -> None:
        try:
            await asyncio.to_thread(self.client.delete_connection, ConnectionId=connection_id)
        except self._gone:
            pass
