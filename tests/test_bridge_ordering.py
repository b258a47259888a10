"""A connection's events keep their order when API Gateway invokes `$default` for them concurrently.

The gateway emulator's concurrent-delivery mode starts each message's `$default` at once, after a random
delay, so the real handlers post them to the real app in a shuffled order. The client numbers its events
(`x-seq`) and the ingress applies them in that order (serve_app/ordering.py): the spoken turn comes out as
it does in order. The same shuffle without the numbers garbles it, which is what the numbers are for."""

from __future__ import annotations

from devtools.local_gateway import LocalGateway
from devtools.realtime_client import Client, audio_samples, of_type, speech
from tests.conftest import APP_TOKEN, GATEWAY_BRIDGE

# Chunks go out every 20 ms (80 ms of audio at 4× real time) and each waits up to 0.3 s: about 15 are in
# flight at once, in any order; the ingress's window (1 s) outlasts the delay, so nothing is stepped over.
JITTER_S = 0.3


async def spoken_turn(serve_app, folder, *, concurrent: bool, number: bool) -> tuple[str, int] | None:
    """(transcript, reply samples) of one spoken turn through the gateway; None when no reply came."""
    async with LocalGateway(
        serve_app["url"],
        token=APP_TOKEN,
        concurrent_delivery=concurrent,
        delivery_jitter_s=JITTER_S,
        seed=7,
        **GATEWAY_BRIDGE,
    ) as gw:
        client, _ = await Client.open(gw.url, number=number, token=APP_TOKEN)
        await client.stream(speech("hello world how are you", folder))
        try:
            events = await client.until("response.done", timeout=45)
        except TimeoutError:
            return None
        finally:
            await client.close()
    transcript = of_type(events, "conversation.item.input_audio_transcription.completed")[0]["transcript"]
    return transcript, audio_samples(events)


async def test_numbered_events_survive_concurrent_delivery(serve_app, tmp_path):
    in_order = await spoken_turn(serve_app, tmp_path, concurrent=False, number=True)
    assert in_order is not None and in_order[0] and in_order[1] > 0
    assert await spoken_turn(serve_app, tmp_path, concurrent=True, number=True) == in_order
    # The control: the same shuffled delivery without `x-seq` does not give the in-order turn.
    assert await spoken_turn(serve_app, tmp_path, concurrent=True, number=False) != in_order
