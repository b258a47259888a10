"""The reply text of a voice conversation, streamed sentence by sentence (no Ray: the `Responder`
deployment in `deployments/responder.py` wraps `ReplyWriter`).

Speech synthesis can start as soon as the first sentence exists, so every backend streams text deltas and
`split_sentences` turns them into whole sentences. Backends: `echo` (default; deterministic, no network),
any OpenAI-compatible chat-completions server (`openai`), and Amazon Bedrock's ConverseStream (`bedrock`).
Everything here is plain asyncio and is tested without Ray.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import threading
from collections.abc import AsyncGenerator, AsyncIterable, Sequence
from contextlib import aclosing
from typing import Any, Literal, Protocol

import boto3
import httpx
from botocore.config import Config as BotoConfig
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectTimeoutError,
    EndpointConnectionError,
    ReadTimeoutError,
)
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator

log = logging.getLogger(__name__)

__all__ = [
    "Backend",
    "BedrockBackend",
    "ChatTurn",
    "EchoBackend",
    "OpenAIBackend",
    "ReplyWriter",
    "ResponderConfig",
    "ResponderError",
    "make_backend",
    "parse_turns",
    "split_sentences",
]


class ResponderError(Exception):
    """A reply that could not be written. Picklable, so it crosses Ray Serve handles intact.

    `code` says what kind of failure: `timeout`, `unavailable` (cannot connect), `upstream_error` (the
    server answered with an error or garbage), `bad_request` (nothing to reply to), or the AWS error code
    for Bedrock (`ValidationException`, `ThrottlingException`, ...). `status` is the HTTP status if any.
    """

    def __init__(self, message: str, code: str = "upstream_error", status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.status = status

    def __reduce__(self) -> tuple[type[ResponderError], tuple[str, str, int | None]]:
        return (type(self), (self.message, self.code, self.status))


class ChatTurn(BaseModel):
    """One turn of the conversation as text (what the person said, or what the assistant said)."""

    model_config = ConfigDict(frozen=True)

    role: Literal["user", "assistant"]
    text: str


_TURNS = TypeAdapter(list[ChatTurn])


def parse_turns(turns: list[dict]) -> list[ChatTurn]:
    """The conversation as dicts with `role` and `text` (oldest first), checked; ResponderError if not."""
    try:
        return _TURNS.validate_python(turns)
    except ValidationError as exc:
        raise ResponderError(f"bad turns: {exc}", code="bad_request") from exc


class ResponderConfig(BaseModel):
    """Which backend writes replies, and its knobs (constructor args, overridden by `user_config`)."""

    model_config = ConfigDict(extra="forbid")

    backend: Literal["echo", "openai", "bedrock"] = "echo"
    openai_base_url: str = "http://127.0.0.1:8000/v1"
    openai_model: str = Field("gpt-4o-mini", min_length=1)
    openai_api_key_env: str = "OPENAI_API_KEY"  # name of the variable; no key is fine for local servers
    bedrock_model_id: str = Field("anthropic.claude-3-haiku-20240307-v1:0", min_length=1)
    bedrock_region: str = Field("us-east-1", min_length=1)
    bedrock_endpoint_url: str | None = None
    max_tokens: int = Field(200, gt=0)
    temperature: float = Field(0.7, ge=0.0, le=2.0)
    timeout_s: float = Field(20.0, gt=0)  # whole reply
    connect_timeout_s: float = Field(5.0, gt=0)

    @field_validator("openai_base_url", "bedrock_endpoint_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError(f"expected an http:// or https:// URL, got {value!r}")
        return value


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


# --- backends ----------------------------------------------------------------------------------------


class Backend(Protocol):
    """Streams the text deltas of the assistant's next turn."""

    def stream(self, instructions: str, turns: Sequence[ChatTurn]) -> AsyncGenerator[str, None]: ...

    async def aclose(self) -> None: ...


class EchoBackend:
    """Says back what it heard: deterministic and offline, so the whole app runs and tests without an LLM."""

    MAX_WORDS = 25
    NOT_HEARD = "I didn't catch that."

    def reply(self, turns: Sequence[ChatTurn]) -> str:
        heard = next((turn.text for turn in reversed(turns) if turn.role == "user"), "")
        words = heard.split()
        if not words:
            return self.NOT_HEARD
        if len(words) > self.MAX_WORDS:
            return "You said: " + " ".join(words[: self.MAX_WORDS]).rstrip(".,;:!?…") + "…"
        return "You said: " + " ".join(words).rstrip(".,;:!?…") + "."

    async def stream(self, instructions: str, turns: Sequence[ChatTurn]) -> AsyncGenerator[str, None]:
        # Word by word, like a real backend, so callers exercise the same streaming path.
        for i, word in enumerate(self.reply(turns).split(" ")):
            yield word if i == 0 else " " + word

    async def aclose(self) -> None:
        pass


def _error_message(body: bytes) -> str:
    """The human part of an error body: OpenAI's `{"error": {"message"}}`, FastAPI's `detail`, or text."""
    try:
        data = json.loads(body)
    except ValueError:
        return body.decode("utf-8", "replace").strip()[:500] or "(empty body)"
    if isinstance(data, dict):
        error = data.get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
        for key in ("error", "message", "detail"):
            if data.get(key):
                return str(data[key])
    return json.dumps(data)[:500]


class OpenAIBackend:
    """Any OpenAI-compatible `/chat/completions` server (OpenAI, vLLM, llama.cpp, Ollama), streamed as SSE."""

    def __init__(self, config: ResponderConfig) -> None:
        self._config = config
        self._url = config.openai_base_url.rstrip("/") + "/chat/completions"
        self._headers = {"Accept": "text/event-stream"}
        key = os.environ.get(config.openai_api_key_env)
        if key:
            self._headers["Authorization"] = f"Bearer {key}"
        # One client per backend: connections are reused across replies.
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(config.timeout_s, connect=config.connect_timeout_s)
        )

    def request_body(self, instructions: str, turns: Sequence[ChatTurn]) -> dict[str, Any]:
        messages = [{"role": "system", "content": instructions}] if instructions.strip() else []
        messages += [{"role": turn.role, "content": turn.text} for turn in turns]
        return {
            "model": self._config.openai_model,
            "messages": messages,
            "stream": True,
            "max_tokens": self._config.max_tokens,
            "temperature": self._config.temperature,
        }

    async def stream(self, instructions: str, turns: Sequence[ChatTurn]) -> AsyncGenerator[str, None]:
        body = self.request_body(instructions, turns)
        try:
            async with self._client.stream("POST", self._url, json=body, headers=self._headers) as response:
                if not response.is_success:
                    detail = _error_message(await response.aread())
                    raise ResponderError(
                        f"{self._url} answered HTTP {response.status_code}: {detail}",
                        code="upstream_error",
                        status=response.status_code,
                    )
                async for line in response.aiter_lines():
                    if not line.startswith("data:"):
                        continue  # blank separators, comments (": keep-alive"), event:/id: fields
                    data = line[len("data:") :].strip()
                    if data == "[DONE]":
                        return
                    content = self._content(data)
                    if content:
                        yield content
        except httpx.ConnectTimeout as exc:
            raise ResponderError(
                f"could not connect to {self._url} within {self._config.connect_timeout_s:g} s",
                code="unavailable",
            ) from exc
        except httpx.TimeoutException as exc:
            raise ResponderError(
                f"{self._url} sent nothing for {self._config.timeout_s:g} s", code="timeout"
            ) from exc
        except httpx.ConnectError as exc:
            raise ResponderError(f"could not connect to {self._url}: {exc}", code="unavailable") from exc
        except httpx.HTTPError as exc:
            raise ResponderError(f"{self._url} failed mid-reply: {exc!r}", code="upstream_error") from exc

    def _content(self, data: str) -> str | None:
        """The text in one `chat.completion.chunk`; a usage-only chunk has none."""
        try:
            chunk = json.loads(data)
        except ValueError as exc:
            raise ResponderError(f"{self._url} sent a bad stream event: {data[:200]!r}") from exc
        if not isinstance(chunk, dict):
            raise ResponderError(f"{self._url} sent a bad stream event: {data[:200]!r}")
        if chunk.get("error"):  # some servers report failures mid-stream this way
            raise ResponderError(f"{self._url} failed mid-reply: {_error_message(data.encode())}")
        choices = chunk.get("choices") or []
        if not choices:
            return None
        return (choices[0].get("delta") or {}).get("content")

    async def aclose(self) -> None:
        await self._client.aclose()


def _bedrock_messages(turns: Sequence[ChatTurn]) -> list[dict[str, Any]]:
    """Turns as Converse messages: Bedrock wants non-blank text, a user first, and roles that alternate."""
    messages: list[dict[str, Any]] = []
    for turn in turns:
        text = turn.text.strip()
        if not text or (not messages and turn.role == "assistant"):
            continue
        if messages and messages[-1]["role"] == turn.role:
            messages[-1]["content"][0]["text"] += "\n" + text
        else:
            messages.append({"role": turn.role, "content": [{"text": text}]})
    return messages


def _bedrock_error(exc: Exception) -> ResponderError:
    if isinstance(exc, ResponderError):
        return exc
    if isinstance(exc, ClientError):  # includes EventStreamError, raised mid-stream
        error = exc.response.get("Error", {})
        code = error.get("Code") or "upstream_error"
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return ResponderError(f"Bedrock {code}: {error.get('Message') or exc}", code=code, status=status)
    if isinstance(exc, ReadTimeoutError):
        return ResponderError(f"Bedrock sent nothing in time: {exc}", code="timeout")
    if isinstance(exc, ConnectTimeoutError | EndpointConnectionError):
        return ResponderError(f"could not connect to Bedrock: {exc}", code="unavailable")
    if isinstance(exc, BotoCoreError):  # e.g. NoCredentialsError
        return ResponderError(f"Bedrock: {exc}", code=type(exc).__name__)
    return ResponderError(f"Bedrock failed: {exc!r}")


class BedrockBackend:
    """Amazon Bedrock's ConverseStream. boto3 blocks, so each reply's events are read in its own thread."""

    def __init__(self, config: ResponderConfig) -> None:
        self._config = config
        # A session per backend: boto3's default session is not safe to share across threads.
        self._client = boto3.session.Session().client(
            "bedrock-runtime",
            region_name=config.bedrock_region,
            endpoint_url=config.bedrock_endpoint_url,
            config=BotoConfig(
                connect_timeout=config.connect_timeout_s,
                read_timeout=config.timeout_s,
                retries={"max_attempts": 2, "mode": "standard"},
            ),
        )

    def request(self, instructions: str, turns: Sequence[ChatTurn]) -> dict[str, Any]:
        messages = _bedrock_messages(turns)
        if not messages:
            raise ResponderError("nothing the user said to reply to", code="bad_request")
        request: dict[str, Any] = {
            "modelId": self._config.bedrock_model_id,
            "messages": messages,
            "inferenceConfig": {
                "maxTokens": self._config.max_tokens,
                "temperature": self._config.temperature,
            },
        }
        if instructions.strip():
            request["system"] = [{"text": instructions}]
        return request

    async def stream(self, instructions: str, turns: Sequence[ChatTurn]) -> AsyncGenerator[str, None]:
        request = self.request(instructions, turns)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        stop = threading.Event()

        def put(kind: str, value: Any) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, (kind, value))
            except RuntimeError:  # the loop closed while this thread was reading
                pass

        def pump() -> None:
            try:
                events = self._client.converse_stream(**request)["stream"]
                try:
                    for event in events:
                        if stop.is_set():
                            break
                        text = event.get("contentBlockDelta", {}).get("delta", {}).get("text")
                        if text:
                            put("text", text)
                finally:
                    events.close()
                put("end", None)
            except Exception as exc:
                put("error", exc)

        # A daemon thread, not the default executor: an abandoned reply may block in a read until
        # `read_timeout`, and must not hold up the event loop's shutdown meanwhile.
        threading.Thread(target=pump, name="bedrock-converse-stream", daemon=True).start()
        try:
            while True:
                kind, value = await queue.get()
                if kind == "text":
                    yield value
                elif kind == "end":
                    return
                else:
                    raise _bedrock_error(value) from value
        finally:
            stop.set()  # the thread stops at its next event

    async def aclose(self) -> None:
        await asyncio.to_thread(self._client.close)


def make_backend(config: ResponderConfig) -> Backend:
    """The backend `config` names. Bedrock's constructor reads botocore's service model: call off the loop."""
    if config.backend == "openai":
        return OpenAIBackend(config)
    if config.backend == "bedrock":
        return BedrockBackend(config)
    return EchoBackend()


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
