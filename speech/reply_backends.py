"""The reply-text backends, each streaming the text deltas of the assistant's next turn: `echo` (default;
deterministic, no network), any OpenAI-compatible chat-completions server (`openai`), and Amazon Bedrock's
ConverseStream (`bedrock`). `make_backend` picks one by the config's name."""

from __future__ import annotations

import asyncio
import json
import os
import threading
from collections.abc import AsyncGenerator, Sequence
from typing import Any, Protocol

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

from speech.reply_config import ChatTurn, ResponderConfig, ResponderError

__all__ = ["Backend", "BedrockBackend", "EchoBackend", "OpenAIBackend", "make_backend"]


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
