"""The reply text of a voice conversation, streamed sentence by sentence (no Ray: the `Responder`
deployment in `deployments/responder.py` wraps `ReplyWriter`).

Speech synthesis can start as soon as the first sentence exists, so every backend (`speech.reply_backends`)
streams text deltas and `split_sentences` turns them into whole sentences. Everything here is plain
asyncio and is tested without Ray.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncGenerator, AsyncIterable, Sequence
from contextlib import aclosing

from pydantic import TypeAdapter, ValidationError

from speech.reply_backends import Backend, make_backend
from speech.reply_config import ChatTurn, ResponderConfig, ResponderError

__all__ = ["ReplyWriter", "parse_turns", "split_sentences"]


_TURNS = TypeAdapter(list[ChatTurn])


def parse_turns(turns: list[dict]) -> list[ChatTurn]:
    """The conversation as dicts with `role` and `text` (oldest first), checked; ResponderError if not."""
    try:
        return _TURNS.validate_python(turns)
    except ValidationError as exc:
        raise ResponderError(f"bad turns: {exc}", code="bad_request") from exc


# --- sentences ---------------------------------------------------------------------------------------

# A run of terminators (plus closing quotes/brackets) that whitespace follows, or a newline. Requiring the
# whitespace means "3.5" never splits, and a terminator at the end of the buffer waits for the next delta.
_BOUNDARY = re.compile(r"[.!?…]+[\"'”’)\]]*(?=\s)|\n")
# Not "etc." or "no.": those end sentences more often than not.
_ABBREVIATIONS = frozenset("mr mrs ms dr prof sr jr st vs approx dept est fig inc ltd mt vol".split())
_DOTTED = re.compile(r"(?:[A-Za-z]\.)+[A-Za-z]")  # e.g, i.e, U.S, a.m: the token before the final dot


def _is_abbreviation(text_before: str, terminator: str) -> bool:
    """Whether the "." closing `text_before` belongs to an abbreviation or an initial, not a sentence."""
    if terminator != ".":
        return False
    words = text_before.split()
    if not words:
        return False
    token = words[-1].lstrip("\"'“‘([")
    if len(token) == 1:
        return token.isupper()  # an initial, as in "J. R. R. Tolkien"; a bad split would sound worse
    return token.lower() in _ABBREVIATIONS or _DOTTED.fullmatch(token) is not None


def _take_sentences(buffer: str) -> tuple[list[str], str]:
    """The whole sentences at the start of `buffer`, and what is left over."""
    sentences: list[str] = []
    start = 0
    for match in _BOUNDARY.finditer(buffer):
        if _is_abbreviation(buffer[start : match.start()], match.group().rstrip("\"'”’)]")):
            continue
        sentence = buffer[start : match.end()].strip()
        if sentence:
            sentences.append(sentence)
        start = match.end()
    return sentences, buffer[start:]


async def split_sentences(deltas: AsyncIterable[str]) -> AsyncGenerator[str, None]:
    """Whole sentences from a stream of text deltas, each yielded as soon as it is known to be complete."""
    buffer = ""
    async for delta in deltas:
        buffer += delta
        sentences, buffer = _take_sentences(buffer)
        for sentence in sentences:
            yield sentence
    tail = buffer.strip()
    if tail:
        yield tail


# --- replies -----------------------------------------------------------------------------------------


class ReplyWriter:
    """Sentences of the assistant's reply, within `timeout_s` of waiting on the backend.

    Only time spent waiting on the backend counts against the budget, so a caller that speaks each
    sentence before asking for the next one is not cut off by its own pace.
    """

    def __init__(self, config: ResponderConfig, backend: Backend | None = None) -> None:
        self.config = config
        self.backend = backend if backend is not None else make_backend(config)
        self._active = 0
        self._closing = False

    async def respond(self, instructions: str, turns: Sequence[ChatTurn]) -> AsyncGenerator[str, None]:
        """Yield whole sentences; raise ResponderError on a backend failure or when the budget runs out."""
        loop = asyncio.get_running_loop()
        remaining = self.config.timeout_s
        self._active += 1
        try:
            async with (
                aclosing(self.backend.stream(instructions, list(turns))) as deltas,
                aclosing(split_sentences(deltas)) as sentences,
            ):
                while True:
                    started = loop.time()
                    try:
                        async with asyncio.timeout(remaining):
                            sentence = await anext(sentences)
                    except StopAsyncIteration:
                        return
                    except TimeoutError as exc:
                        raise ResponderError(
                            f"the reply took longer than {self.config.timeout_s:g} s", code="timeout"
                        ) from exc
                    remaining -= loop.time() - started
                    yield sentence
        finally:
            self._active -= 1
            if self._closing and self._active == 0:
                await self.backend.aclose()

    async def aclose(self) -> None:
        """Release the backend once the replies in flight are done (they keep working until then)."""
        self._closing = True
        if self._active == 0:
            await self.backend.aclose()
