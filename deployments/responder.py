"""`Responder`: the reply text of every conversation, a thin Serve wrapper over `speech.reply_text`."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator

from ray import serve

from speech.reply_backends import make_backend
from speech.reply_config import ResponderConfig, ResponderError
from speech.reply_text import ReplyWriter, parse_turns

log = logging.getLogger(__name__)

__all__ = ["Responder"]


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=100)
class Responder:
    """Reply text for every conversation. `user_config` keys override the constructor's config, live."""

    def __init__(self, config: ResponderConfig | None = None) -> None:
        self._base = config or ResponderConfig()
        self._writer = ReplyWriter(self._base)
        log.info("responder backend: %s", self._base.backend)

    async def reconfigure(self, user_config: dict) -> None:
        config = ResponderConfig.model_validate({**self._base.model_dump(), **(user_config or {})})
        writer = ReplyWriter(config, await asyncio.to_thread(make_backend, config))
        old, self._writer = self._writer, writer
        await old.aclose()
        log.info("responder backend: %s", config.backend)

    def info(self) -> dict:
        """The config in effect (for /readyz and the tests)."""
        return self._writer.config.model_dump()

    async def respond(self, instructions: str, turns: list[dict]) -> AsyncGenerator[str, None]:
        """Sentences of the reply to `turns` (dicts with `role` and `text`, oldest first).

        Call with `handle.options(stream=True).respond.remote(instructions, turns)`.
        """
        chat = parse_turns(turns)
        try:
            async for sentence in self._writer.respond(instructions, chat):
                yield sentence
        except ResponderError as exc:
            log.warning("reply failed (%s): %s", exc.code, exc.message)
            raise
