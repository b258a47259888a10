"""OpenAI's speech API (`/v1/audio/speech`, `/v1/models`) on the real Serve app, spoken to by the real
`openai` client: every format decodes to the frames the engine made, the first bytes arrive while the
engine is still making frames (its frame counter says so, not a clock), and every refusal is OpenAI's
JSON shape with its status. Random weights never end a sentence early, so each sentence's length is known:
`frames_for(sentence)` frames of 1920 samples."""

from __future__ import annotations

import asyncio
import base64
import io
import json

import av
import numpy as np
import openai
import pytest
from fastapi.responses import JSONResponse
from ray import serve

from csm.engine import EngineFull
from devtools.realtime_client import Client
from serve_app.reply import frames_for
from serve_app.speech_api import SpeechApi, SpeechConfig
from serve_app.voices import VoiceLibrary
from tests.conftest import APP_TOKEN, second_ingress

FRAME = 1920
SENTENCES = ["Hello there.", "And a second one, after it."]
SHORT = "Hi."  # 12 frames, the least a sentence is given
TEXT = " ".join(SENTENCES)
SAMPLES = sum(frames_for(s) for s in SENTENCES) * FRAME


@pytest.fixture(scope="module")
def app(serve_app):
    return serve_app


def client(app, key: str = APP_TOKEN, url: str | None = None) -> openai.OpenAI:
    return openai.OpenAI(api_key=key, base_url=f"{url or app['url']}/v1", max_retries=0)


def generated_frames() -> int:
    return serve.get_deployment_handle("CSMGenerator", "csm").info.remote().result()["frames"]


def speak(app, **fields) -> bytes:
    fields = {"model": "csm-1b", "voice": "narrator", "input": TEXT, **fields}
    with client(app).audio.speech.with_streaming_response.create(**fields) as response:
        return response.read()


def decoded_samples(data: bytes, container: str) -> int:
    with av.open(io.BytesIO(data), format=container) as audio:
        return sum(frame.samples for frame in audio.decode(audio=0))


def test_pcm_streams_while_the_engine_still_makes_frames(app):
    before = generated_frames()
    chunks, at_first_byte = [], None
    with client(app).audio.speech.with_streaming_response.create(
        model="csm-1b", voice="narrator", input=TEXT, response_format="pcm"
    ) as response:
        assert response.headers["content-type"] == "audio/pcm"
        for chunk in response.iter_bytes():
            if at_first_byte is None:
                at_first_byte = generated_frames() - before
            chunks.append(chunk)
    made = generated_frames() - before
    assert made == SAMPLES // FRAME  # every sentence spoken, in full
    assert at_first_byte is not None and at_first_byte < made  # the first bytes came before the last frame
    pcm = np.frombuffer(b"".join(chunks), np.int16)
    assert pcm.size == SAMPLES and np.abs(pcm).max() > 0


def test_wav_and_the_compressed_formats_decode_to_the_speech(app):
    wav = speak(app, response_format="wav", input=SHORT)
    assert wav[:4] == b"RIFF" and wav[8:16] == b"WAVEfmt "
    one = frames_for(SHORT) * FRAME
    assert len(wav) - 44 == one * 2 and decoded_samples(wav, "wav") == one
    mp3 = speak(app, response_format="mp3", input=SHORT, voice={"id": "narrator"})  # OpenAI's default
    # An MP3 frame is 1152 samples: the encoder's delay and last frame's padding add under two of them.
    assert one <= decoded_samples(mp3, "mp3") < one + 2 * 1152
    opus = speak(app, response_format="opus", input=SHORT)  # Ogg Opus, decoded at 48 kHz
    assert abs(decoded_samples(opus, "ogg") - 2 * one) <= 960


def test_sse_sends_audio_deltas_then_done_with_usage(app):
    with client(app).audio.speech.with_streaming_response.create(
        model="gpt-4o-mini-tts",  # a framework's default model and voice names: CSM answers them
        voice="alloy",
        input=SENTENCES[0],
        response_format="pcm",
        stream_format="sse",
    ) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: ")]
    assert [e["type"] for e in events[:-1]] == ["speech.audio.delta"] * (len(events) - 1) and len(events) > 2
    pcm = b"".join(base64.b64decode(e["audio"]) for e in events[:-1])
    assert len(pcm) == frames_for(SENTENCES[0]) * FRAME * 2
    done = events[-1]
    assert done["type"] == "speech.audio.done"
    usage = done["usage"]
    assert usage["output_tokens"] == frames_for(SENTENCES[0]) and usage["input_tokens"] > 0
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]


def test_models_lists_csm(app):
    assert [m.id for m in client(app).models.list()] == ["csm-1b"]
    with pytest.raises(openai.AuthenticationError):
        client(app, key="wrong").models.list()


def refusal(app, status: int, key: str = APP_TOKEN, url: str | None = None, **fields) -> dict:
    """The error of a refused request, checked for OpenAI's shape and `status`."""
    fields = {"model": "csm-1b", "voice": "narrator", "input": "Hi.", "response_format": "pcm", **fields}
    with pytest.raises(openai.APIStatusError) as refused:
        with client(app, key, url).audio.speech.with_streaming_response.create(**fields) as response:
            response.read()
    assert refused.value.status_code == status
    body = refused.value.response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    return body["error"]


@pytest.mark.parametrize(
    ("status", "fields", "param", "code"),
    [
        (401, {"key": "wrong"}, None, "invalid_api_key"),
        (400, {"speed": 1.5}, "speed", "unsupported_value"),
        (400, {"speed": 9.0}, "speed", "invalid_value"),
        (400, {"voice": "maya"}, "voice", "invalid_value"),
        (400, {"response_format": "ogg"}, "response_format", "invalid_value"),
        (400, {"input": "  "}, "input", "invalid_value"),
        (400, {"instructions": "whisper"}, "instructions", "unsupported_value"),
        (400, {"extra_body": {"volume": 2}}, "volume", "unknown_parameter"),
        (404, {"model": "whisper-1"}, "model", "model_not_found"),
        (413, {"input": "a" * 4097}, "input", "input_too_long"),
    ],
)
def test_bad_requests_get_openais_error_shape(app, status, fields, param, code):
    error = refusal(app, status, **fields)
    assert (error["param"], error["code"]) == (param, code)
    assert error["type"] == "invalid_request_error"


@pytest.fixture(scope="module")
def tight(serve_app):
    """A second ingress on the same models: two places in all, one per token, three tokens."""
    name = "speech_tight"
    config = {
        **serve_app["args"]["ingress"],
        "token": None,
        "tokens": {"a": "token-a", "b": "token-b", "c": "token-c"},
        "max_conversations": 2,
        "max_conversations_per_token": 1,
    }
    with second_ingress(serve_app, name, config) as url:
        yield {"url": url, "ws": serve_app["ws"].replace("/v1/", f"/{name}/v1/")}


async def test_a_speech_request_counts_as_a_conversation(serve_app, tight):
    """Open conversations and speech requests share the ingress's places: a token holding its one gets a
    429; a full server a 503; a place given back is free again."""
    held = [(await Client.open(tight["ws"], token="token-a"))[0]]
    error = refusal(serve_app, 429, key="token-a", url=tight["url"])
    assert (error["code"], error["type"]) == ("rate_limit_exceeded", "requests")
    held.append((await Client.open(tight["ws"], token="token-b"))[0])
    error = refusal(serve_app, 503, key="token-c", url=tight["url"])
    assert (error["code"], error["type"]) == ("server_busy", "server_error")
    await held.pop().close()
    for _ in range(50):  # the ingress sees the socket close a moment later
        try:
            with client(serve_app, "token-c", tight["url"]).audio.speech.with_streaming_response.create(
                model="csm-1b", voice="none", input="Hi.", response_format="pcm"
            ) as response:
                assert len(response.read()) == frames_for("Hi.") * FRAME * 2
                break
        except openai.InternalServerError:  # 503: not yet
            await asyncio.sleep(0.1)
    else:
        pytest.fail("the place was never given back")
    await held.pop().close()


class _FullEngine:
    """A reply stream whose generator is full: the engine refuses before the first frame."""

    def __init__(self) -> None:
        self.frames: list = []
        self.prompts: list = []

    async def speak(self, request):
        raise EngineFull("every slot runs a sequence")
        yield  # pragma: no cover

    def codes(self):
        return np.zeros((0, 32), np.int16)

    async def close(self) -> None:
        pass


async def test_a_full_engine_is_a_503_and_gives_the_place_back():
    given_back = []

    async def admit(principal: str):
        return lambda: given_back.append(principal)

    api = SpeechApi(_FullEngine, VoiceLibrary(None, None), SpeechConfig(), admit)
    body = {"model": "csm-1b", "voice": "none", "input": "Hi."}
    response = await api.respond(json.dumps(body).encode(), "anonymous")
    assert isinstance(response, JSONResponse) and response.status_code == 503
    assert json.loads(response.body)["error"]["code"] == "server_busy"
    assert given_back == ["anonymous"]


@pytest.mark.parametrize(
    ("fmt", "container", "rate"),
    [("aac", "aac", 1), ("flac", "flac", 1), ("opus", "ogg", 2), ("mp3", "mp3", 1)],
)
def test_each_compressed_format_streams_and_decodes_whole(fmt: str, container: str, rate: int):
    """Pushed a frame at a time, as the speech streams: bytes leave before the end, and the file decodes to
    the samples pushed (plus the codec's padding: AAC's and Opus's 1024/960-sample frames)."""
    from speech.audio_formats import encoder

    pcm = (np.sin(np.arange(25 * FRAME) / 9) * 8000).astype(np.int16)
    enc = encoder(fmt)
    parts = [enc.push(pcm[i : i + FRAME]) for i in range(0, pcm.size, FRAME)]
    assert sum(map(len, parts[:12])) > 0  # streamed, not held to the end
    samples = decoded_samples(b"".join(parts) + enc.finish(), container)
    assert rate * pcm.size <= samples < rate * (pcm.size + 3 * 1024)
