"""A voice-agent framework's own TTS client speaks through the real Serve app: LiveKit Agents' OpenAI
plugin (`livekit.plugins.openai.TTS`), set up as the README says, with its default model and stream
format (`gpt-4o-mini-tts` asks for `sse`). Its frames must add up to every frame the engine made for the
text, which the byte-wise tests check in `test_speech_api.py`; here the point is that the framework's
parsing, decoding and error mapping accept what the endpoint sends.

Pipecat's `OpenAITTSService` is not tested: `pipecat-ai` pins protobuf 6, which would downgrade the
protobuf 7 that Ray and OpenTelemetry here are installed with."""

from __future__ import annotations

import pytest
from livekit.agents import APIStatusError
from livekit.plugins import openai as livekit_openai

from csm.audio import FRAME_SIZE, SAMPLE_RATE
from serve_app.reply import frames_for
from tests.conftest import APP_TOKEN

SENTENCES = ["Hello from an agent.", "It speaks a second sentence."]


def tts(app, **options) -> livekit_openai.TTS:
    return livekit_openai.TTS(base_url=f"{app['url']}/v1", api_key=APP_TOKEN, **options)


async def synthesized(engine: livekit_openai.TTS, text: str) -> tuple[int, set[int]]:
    frames = []
    async with engine.synthesize(text) as stream:
        frames = [audio.frame async for audio in stream]
    # LiveKit's emitter may end a segment with a 10 ms silent marker frame of its own making.
    last = frames[-1] if frames else None
    if last is not None and last.samples_per_channel == last.sample_rate // 100 and not any(last.data):
        frames.pop()
    return sum(f.samples_per_channel * f.num_channels for f in frames), {f.sample_rate for f in frames}


@pytest.mark.parametrize("response_format", ["pcm", "mp3"])
async def test_livekit_openai_tts_speaks_every_frame(serve_app, response_format):
    engine = tts(serve_app, voice="narrator", response_format=response_format)
    try:
        samples, rates = await synthesized(engine, " ".join(SENTENCES))
    finally:
        await engine.aclose()
    expected = sum(frames_for(s) for s in SENTENCES) * FRAME_SIZE
    assert rates == {SAMPLE_RATE}
    if response_format == "pcm":
        assert samples == expected
    else:  # MP3's encoder delay and its last frame's padding: under two 1152-sample frames
        assert expected <= samples < expected + 2 * 1152


async def test_livekit_sees_our_refusal_as_an_api_status_error(serve_app):
    engine = tts(serve_app, voice="narrator", speed=1.5)  # CSM speaks at its own pace: a 400
    try:
        with pytest.raises(APIStatusError) as refused:
            await synthesized(engine, SENTENCES[0])
    finally:
        await engine.aclose()
    assert refused.value.status_code == 400
    assert refused.value.body["param"] == "speed"  # the openai client hands on the inner error
