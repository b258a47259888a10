"""The responder against real servers on 127.0.0.1: an OpenAI-compatible SSE server and a Bedrock Runtime
emulator that answers the real boto3 client in AWS's binary event-stream format. No mocks, no network."""

from __future__ import annotations

import asyncio
import json
import pickle
import socket
import struct
import threading
import time
import zlib
from collections.abc import AsyncGenerator, AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
import uvicorn
from botocore.eventstream import EventStreamBuffer
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from deployments.responder import Responder
from speech.reply_backends import BedrockBackend, EchoBackend, OpenAIBackend, make_backend
from speech.reply_config import ChatTurn, ResponderConfig, ResponderError
from speech.reply_text import ReplyWriter, split_sentences

# The OpenAI-compatible server streams this reply in pieces cut at awkward places.
REPLY_PIECES = ["Hel", "lo there", ". It is 3", ".5 degrees, e", ".g. mild", " with Mr", ". Smith", "!\nBye"]
REPLY_SENTENCES = ["Hello there.", "It is 3.5 degrees, e.g. mild with Mr. Smith!", "Bye"]
BEDROCK_PIECES = ["Hi", " from Bed", "rock. How", " can I help?"]
INSTRUCTIONS = "You are a friendly voice assistant. Answer in one or two short sentences."


def turns(*pairs: tuple[str, str]) -> list[ChatTurn]:
    return [ChatTurn(role=role, text=text) for role, text in pairs]  # type: ignore[arg-type]


async def collect(
    writer: ReplyWriter, history: Sequence[ChatTurn], instructions: str = INSTRUCTIONS
) -> list[str]:
    return [sentence async for sentence in writer.respond(instructions, history)]


async def from_pieces(pieces: Sequence[str]) -> AsyncIterator[str]:
    for piece in pieces:
        await asyncio.sleep(0)
        yield piece


# --- split_sentences ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pieces", "expected"),
    [
        (["Hello", " world", ". How ar", "e you?", " Fine"], ["Hello world.", "How are you?", "Fine"]),
        (["Pi is 3", ".", "14 today. Ok"], ["Pi is 3.14 today.", "Ok"]),  # the dot arrives alone
        (
            ["Bring fruit, e", ".", "g", ". apples", ". Ask Dr", ". Who", ". "],
            ["Bring fruit, e.g. apples.", "Ask Dr. Who."],
        ),
        (
            ["Mr. and Mrs. Smith i.e. the Smiths", " left at 5 p.m. today."],
            ["Mr. and Mrs. Smith i.e. the Smiths left at 5 p.m. today."],
        ),
        (["J. R. R. Tolkien wrote it. Yes."], ["J. R. R. Tolkien wrote it.", "Yes."]),
        (["Wait", ".", ".", ". What?! No… ", "really"], ["Wait...", "What?!", "No…", "really"]),
        (['He said "stop." Then', " left."], ['He said "stop."', "Then left."]),
        (["line one\nline", " two\n\n", "  \nthree"], ["line one", "line two", "three"]),
        (["no terminator at all"], ["no terminator at all"]),
        (["Ends with a dot."], ["Ends with a dot."]),
        (["  ", "\n", " . "], ["."]),
        ([], []),
        (["", "   ", "\n\n"], []),
    ],
)
async def test_split_sentences(pieces: list[str], expected: list[str]) -> None:
    assert [s async for s in split_sentences(from_pieces(pieces))] == expected


async def test_split_sentences_yields_each_sentence_before_the_stream_ends() -> None:
    """The first sentence must be out as soon as the whitespace after it arrives (speech starts on it)."""
    release = asyncio.Event()

    async def deltas() -> AsyncIterator[str]:
        yield "First one."
        yield " Sec"
        await release.wait()
        yield "ond one."

    sentences = split_sentences(deltas())
    assert await asyncio.wait_for(anext(sentences), 1) == "First one."
    release.set()
    assert [s async for s in sentences] == ["Second one."]


# --- echo --------------------------------------------------------------------------------------------


async def test_echo_says_back_what_it_heard() -> None:
    writer = ReplyWriter(ResponderConfig())
    assert isinstance(writer.backend, EchoBackend)
    history = turns(("user", "hi"), ("assistant", "You said: hi."), ("user", "  what is the   weather? "))
    assert await collect(writer, history) == ["You said: what is the weather."]
    assert await collect(writer, history) == ["You said: what is the weather."]  # deterministic


@pytest.mark.parametrize("history", [[], turns(("user", "   ")), turns(("user", "hello"), ("user", "\n"))])
async def test_echo_blank_input(history: list[ChatTurn]) -> None:
    assert await collect(ReplyWriter(ResponderConfig()), history) == ["I didn't catch that."]


async def test_echo_caps_long_input() -> None:
    words = [f"word{i}" for i in range(60)]
    (reply,) = await collect(ReplyWriter(ResponderConfig()), turns(("user", " ".join(words))))
    assert reply == "You said: " + " ".join(words[:25]) + "…"


# --- a real OpenAI-compatible server and Bedrock emulator ----------------------------------------------


def chunk(model: str, delta: dict[str, Any], finish_reason: str | None = None) -> str:
    """One SSE event in OpenAI's wire format."""
    body = {
        "id": "chatcmpl-test",
        "object": "chat.completion.chunk",
        "created": 1_700_000_000,
        "model": model,
        "system_fingerprint": None,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
    }
    return f"data: {json.dumps(body, separators=(',', ':'))}\n\n"


def event_message(headers: dict[str, str], payload: bytes) -> bytes:
    """One AWS event-stream message: prelude (lengths + CRC), string headers, payload, message CRC."""
    header_bytes = b"".join(
        bytes([len(name)]) + name.encode() + b"\x07" + struct.pack(">H", len(value.encode())) + value.encode()
        for name, value in headers.items()
    )
    prelude = struct.pack(">II", 12 + len(header_bytes) + len(payload) + 4, len(header_bytes))
    message = prelude + struct.pack(">I", zlib.crc32(prelude)) + header_bytes + payload
    return message + struct.pack(">I", zlib.crc32(message))


def bedrock_event(event_type: str, body: dict[str, Any]) -> bytes:
    headers = {":event-type": event_type, ":content-type": "application/json", ":message-type": "event"}
    return event_message(headers, json.dumps({**body, "p": "abcdefgh"}).encode())  # Bedrock pads with "p"


def bedrock_exception(exception_type: str, message: str) -> bytes:
    headers = {
        ":exception-type": exception_type,
        ":content-type": "application/json",
        ":message-type": "exception",
    }
    return event_message(headers, json.dumps({"message": message}).encode())


@dataclass
class FakeServer:
    url: str
    requests: list[dict[str, Any]] = field(default_factory=list)

    def last(self) -> dict[str, Any]:
        return self.requests[-1]


def fake_app(requests: list[dict[str, Any]]) -> FastAPI:
    app = FastAPI()

    async def record(request: Request) -> dict[str, Any]:
        body = await request.json()
        requests.append({"path": request.url.path, "headers": dict(request.headers), "body": body})
        return body

    @app.post("/v1/chat/completions")
    @app.post("/{mode}/v1/chat/completions")
    async def chat_completions(request: Request, mode: str = "ok") -> Response:
        body = await record(request)
        if mode == "error":
            error = {
                "message": "The server is overloaded",
                "type": "server_error",
                "param": None,
                "code": None,
            }
            return JSONResponse({"error": error}, status_code=500)

        async def events() -> AsyncIterator[str]:
            model = body["model"]
            yield chunk(model, {"role": "assistant", "content": "", "refusal": None})
            for piece in REPLY_PIECES if mode != "stall" else ["Hello there. ", "And then"]:
                yield chunk(model, {"content": piece})
                if mode == "slow":
                    await asyncio.sleep(0.05)
            if mode == "stall":
                await asyncio.sleep(10)
            yield chunk(model, {}, "stop")
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/model/{model_id}/converse-stream")
    async def converse_stream(model_id: str, request: Request) -> Response:
        await record(request)
        requests[-1]["model_id"] = model_id
        if model_id == "broken-model":
            return JSONResponse(
                {"message": "The provided model identifier is invalid."},
                status_code=400,
                headers={"x-amzn-ErrorType": "ValidationException"},
            )

        async def events() -> AsyncIterator[bytes]:
            yield bedrock_event("messageStart", {"role": "assistant"})
            for piece in BEDROCK_PIECES:
                yield bedrock_event("contentBlockDelta", {"delta": {"text": piece}, "contentBlockIndex": 0})
                if model_id == "failing-model":
                    yield bedrock_exception("modelStreamErrorException", "The model stopped unexpectedly.")
                    return
            yield bedrock_event("contentBlockStop", {"contentBlockIndex": 0})
            yield bedrock_event("messageStop", {"stopReason": "end_turn"})
            usage = {"inputTokens": 30, "outputTokens": 9, "totalTokens": 39}
            yield bedrock_event("metadata", {"usage": usage, "metrics": {"latencyMs": 120}})

        return StreamingResponse(
            events(),
            media_type="application/vnd.amazon.eventstream",
            headers={"x-amzn-RequestId": "00000000-0000-0000-0000-000000000000"},
        )

    return app


@pytest.fixture(scope="module")
def server() -> Iterator[FakeServer]:
    """Both fake services, served by uvicorn in a background thread on a free port."""
    requests: list[dict[str, Any]] = []
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        fake_app(requests), log_level="warning", lifespan="off", timeout_graceful_shutdown=1
    )
    uv = uvicorn.Server(config)
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not uv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the fake server did not start"
        time.sleep(0.01)
    yield FakeServer(f"http://127.0.0.1:{port}", requests)
    uv.should_exit = True
    thread.join(5)
    sock.close()


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    """Dummy credentials, and nothing from this machine's AWS config."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDTESTTESTTEST")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test-secret")
    for name in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_DEFAULT_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
async def writers() -> AsyncIterator[list[ReplyWriter]]:
    """Writers made by a test, closed after it (their HTTP clients hold connections)."""
    made: list[ReplyWriter] = []
    yield made
    for writer in made:
        await writer.aclose()


# --- OpenAI-compatible -------------------------------------------------------------------------------


async def test_openai_streams_sentences_in_order(
    server: FakeServer, writers: list[ReplyWriter], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    config = ResponderConfig(backend="openai", openai_base_url=f"{server.url}/v1/", openai_model="local-llm")
    writer = ReplyWriter(config)
    writers.append(writer)
    assert isinstance(writer.backend, OpenAIBackend)
    history = turns(("user", "hi"), ("assistant", "Hello! How can I help?"), ("user", "what is the weather"))

    assert await collect(writer, history) == REPLY_SENTENCES

    request = server.last()
    assert request["path"] == "/v1/chat/completions"
    assert "authorization" not in request["headers"]
    assert request["body"] == {
        "model": "local-llm",
        "messages": [
            {"role": "system", "content": INSTRUCTIONS},
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "Hello! How can I help?"},
            {"role": "user", "content": "what is the weather"},
        ],
        "stream": True,
        "max_tokens": 200,
        "temperature": 0.7,
    }
    # The client is reused: a second reply on the same writer works too.
    assert await collect(writer, history) == REPLY_SENTENCES


async def test_openai_sends_the_key_from_the_named_env_var(
    server: FakeServer, writers: list[ReplyWriter], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TEST_LLM_KEY", "sk-test-123")
    config = ResponderConfig(
        backend="openai", openai_base_url=f"{server.url}/v1", openai_api_key_env="TEST_LLM_KEY", max_tokens=50
    )
    writers.append(writer := ReplyWriter(config))
    assert await collect(writer, turns(("user", "hi")), instructions="") == REPLY_SENTENCES
    request = server.last()
    assert request["headers"]["authorization"] == "Bearer sk-test-123"
    assert request["body"]["messages"] == [{"role": "user", "content": "hi"}]  # no blank system message
    assert request["body"]["max_tokens"] == 50


async def test_openai_http_error_names_status_and_message(
    server: FakeServer, writers: list[ReplyWriter]
) -> None:
    writers.append(
        writer := ReplyWriter(ResponderConfig(backend="openai", openai_base_url=f"{server.url}/error/v1"))
    )
    with pytest.raises(ResponderError) as caught:
        await collect(writer, turns(("user", "hi")))
    assert caught.value.status == 500
    assert caught.value.code == "upstream_error"
    assert "500" in str(caught.value) and "The server is overloaded" in str(caught.value)


async def test_openai_stall_times_out(server: FakeServer, writers: list[ReplyWriter]) -> None:
    config = ResponderConfig(backend="openai", openai_base_url=f"{server.url}/stall/v1", timeout_s=0.5)
    writers.append(writer := ReplyWriter(config))
    got: list[str] = []
    start = time.monotonic()
    with pytest.raises(ResponderError) as caught:
        async for sentence in writer.respond(INSTRUCTIONS, turns(("user", "hi"))):
            got.append(sentence)
    assert time.monotonic() - start < 0.5 + 1.0
    assert caught.value.code == "timeout"
    assert got == ["Hello there."]  # what came before the stall was already out


async def test_openai_connection_refused(writers: list[ReplyWriter]) -> None:
    config = ResponderConfig(backend="openai", openai_base_url=f"http://127.0.0.1:{closed_port()}/v1")
    writers.append(writer := ReplyWriter(config))
    with pytest.raises(ResponderError) as caught:
        await collect(writer, turns(("user", "hi")))
    assert caught.value.code == "unavailable"
    assert "could not connect" in str(caught.value)


# --- Bedrock -----------------------------------------------------------------------------------------


def test_event_stream_encoder_matches_botocore() -> None:
    """The emulator's encoder is checked against botocore's own decoder (prelude and message CRCs)."""
    buffer = EventStreamBuffer()
    buffer.add_data(
        bedrock_event("contentBlockDelta", {"delta": {"text": "Hello there. "}, "contentBlockIndex": 0})
    )
    (message,) = list(buffer)
    assert message.headers == {
        ":event-type": "contentBlockDelta",
        ":content-type": "application/json",
        ":message-type": "event",
    }
    assert json.loads(message.payload)["delta"] == {"text": "Hello there. "}


async def test_bedrock_streams_sentences(
    server: FakeServer, writers: list[ReplyWriter], aws_env: None
) -> None:
    config = ResponderConfig(
        backend="bedrock", bedrock_endpoint_url=server.url, bedrock_region="eu-west-1", temperature=0.3
    )
    writers.append(writer := ReplyWriter(config, await asyncio.to_thread(make_backend, config)))
    assert isinstance(writer.backend, BedrockBackend)
    history = turns(
        ("assistant", "Hi, I'm your assistant."),  # Bedrock wants a user first: dropped
        ("user", "hello"),
        ("user", "are you there?"),  # consecutive user turns: merged
        ("assistant", "Yes."),
        ("user", "  "),  # blank: dropped
        ("user", "who are you"),
    )

    assert await collect(writer, history) == ["Hi from Bedrock.", "How can I help?"]

    request = server.last()
    assert request["model_id"] == "anthropic.claude-3-haiku-20240307-v1:0"
    assert request["body"] == {
        "messages": [
            {"role": "user", "content": [{"text": "hello\nare you there?"}]},
            {"role": "assistant", "content": [{"text": "Yes."}]},
            {"role": "user", "content": [{"text": "who are you"}]},
        ],
        "system": [{"text": INSTRUCTIONS}],
        "inferenceConfig": {"maxTokens": 200, "temperature": 0.3},
    }
    # Signed with the dummy credentials, for Bedrock in the configured region.
    assert "Credential=AKIDTESTTESTTEST/" in request["headers"]["authorization"]
    assert "/eu-west-1/bedrock/aws4_request" in request["headers"]["authorization"]


async def test_bedrock_validation_error_carries_the_aws_code(
    server: FakeServer, writers: list[ReplyWriter], aws_env: None
) -> None:
    config = ResponderConfig(
        backend="bedrock", bedrock_endpoint_url=server.url, bedrock_model_id="broken-model"
    )
    writers.append(writer := ReplyWriter(config))
    with pytest.raises(ResponderError) as caught:
        await collect(writer, turns(("user", "hi")))
    assert caught.value.code == "ValidationException"
    assert caught.value.status == 400
    assert "The provided model identifier is invalid." in str(caught.value)


async def test_bedrock_error_mid_stream(
    server: FakeServer, writers: list[ReplyWriter], aws_env: None
) -> None:
    config = ResponderConfig(
        backend="bedrock", bedrock_endpoint_url=server.url, bedrock_model_id="failing-model"
    )
    writers.append(writer := ReplyWriter(config))
    with pytest.raises(ResponderError) as caught:
        await collect(writer, turns(("user", "hi")))
    assert caught.value.code == "modelStreamErrorException"
    assert "The model stopped unexpectedly." in str(caught.value)


async def test_bedrock_needs_something_the_user_said(writers: list[ReplyWriter], aws_env: None) -> None:
    writers.append(
        writer := ReplyWriter(ResponderConfig(backend="bedrock", bedrock_endpoint_url="http://127.0.0.1:9"))
    )
    with pytest.raises(ResponderError) as caught:
        await collect(writer, turns(("assistant", "Hello!"), ("user", " ")))
    assert caught.value.code == "bad_request"


# --- the deadline ------------------------------------------------------------------------------------


@dataclass
class ScriptedBackend:
    """A real backend that plays a script: text pieces, and pauses (floats, in seconds) between them."""

    script: list[str | float]
    closed: bool = False

    async def stream(self, instructions: str, turns: Sequence[ChatTurn]) -> AsyncGenerator[str, None]:
        try:
            for step in self.script:
                if isinstance(step, float):
                    await asyncio.sleep(step)
                else:
                    yield step
        finally:
            self.closed = True

    async def aclose(self) -> None:
        pass


async def test_deadline_on_a_slow_backend() -> None:
    backend = ScriptedBackend(["First one. Sec", 0.1, "ond one. ", 10.0, "Never said."])
    writer = ReplyWriter(ResponderConfig(timeout_s=0.4), backend)
    got: list[str] = []
    start = time.monotonic()
    with pytest.raises(ResponderError) as caught:
        async for sentence in writer.respond("", turns(("user", "hi"))):
            got.append(sentence)
    assert 0.35 < time.monotonic() - start < 1.4
    assert caught.value.code == "timeout"
    assert got == ["First one.", "Second one."]
    assert backend.closed


async def test_deadline_does_not_count_the_callers_pace() -> None:
    """A caller that speaks each sentence before asking for the next is not cut off by its own pace."""
    backend = ScriptedBackend(["One. ", 0.05, "Two. ", 0.05, "Three."])
    writer = ReplyWriter(ResponderConfig(timeout_s=0.3), backend)
    got = []
    async for sentence in writer.respond("", turns(("user", "hi"))):
        got.append(sentence)
        await asyncio.sleep(0.2)
    assert got == ["One.", "Two.", "Three."]


async def test_leaving_early_closes_the_backend_stream() -> None:
    backend = ScriptedBackend(["One. Two. ", 10.0, "Three."])
    replies = ReplyWriter(ResponderConfig(), backend).respond("", turns(("user", "hi")))
    assert await anext(replies) == "One."
    await replies.aclose()
    assert backend.closed


# --- config, errors and the deployment class (without Ray) --------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [
        {"backend": "gpt"},
        {"timeout_s": 0},
        {"connect_timeout_s": -1},
        {"max_tokens": 0},
        {"temperature": -0.1},
        {"openai_base_url": "localhost:8000/v1"},
        {"bedrock_endpoint_url": "ftp://x"},
        {"unknown_knob": 1},
    ],
)
def test_config_rejects(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        ResponderConfig.model_validate(bad)


def test_responder_error_pickles_with_its_code() -> None:
    error = pickle.loads(pickle.dumps(ResponderError("Bedrock: slow down", "ThrottlingException", 429)))
    assert isinstance(error, ResponderError)
    assert (str(error), error.code, error.status) == ("Bedrock: slow down", "ThrottlingException", 429)


async def test_deployment_responds_and_reconfigures_live(server: FakeServer) -> None:
    responder = Responder.func_or_class(ResponderConfig(max_tokens=64))
    history = [{"role": "user", "text": "good morning"}]
    assert [s async for s in responder.respond(INSTRUCTIONS, history)] == ["You said: good morning."]

    await responder.reconfigure({"backend": "openai", "openai_base_url": f"{server.url}/slow/v1"})
    assert responder.info()["backend"] == "openai" and responder.info()["max_tokens"] == 64
    in_flight = responder.respond(INSTRUCTIONS, history)
    assert await anext(in_flight) == "Hello there."
    # Swapping the config mid-reply leaves the reply in flight on the old backend, which then closes.
    await responder.reconfigure({"backend": "echo"})
    assert [s async for s in in_flight] == REPLY_SENTENCES[1:]
    assert [s async for s in responder.respond(INSTRUCTIONS, history)] == ["You said: good morning."]

    with pytest.raises(ResponderError) as caught:
        [s async for s in responder.respond(INSTRUCTIONS, [{"role": "system", "text": "x"}])]
    assert caught.value.code == "bad_request"
