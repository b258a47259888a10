"""The whole app on a real Ray Serve (tiny random weights on CPU), driven over real WebSockets and HTTP."""

from __future__ import annotations

import asyncio
import base64
import json
from urllib.parse import quote, unquote

import httpx
import numpy as np
import pytest
import websockets
from ray import serve

from csm.async_engine import FIRST_FRAMES
from devtools.realtime_client import Client, assert_spoken_turn, audio_samples, of_type, speech, whole_reply
from serve_app.speech import ENCODE_CHUNK
from tests.conftest import APP_TOKEN, MAX_CONVERSATIONS
from tests.standins import http_server

FRAME = 1920
CHUNK = 4 * FRAME  # what the ingress sends the recognizer per push


@pytest.fixture(scope="module")
def app(serve_app):
    return serve_app


async def connect(app, **query) -> Client:
    client, info = await Client.open(app["ws"], token=APP_TOKEN, **query)
    assert info["random_weights"] is True  # what the page shows before the first turn
    assert info["voices"] == ["none", "narrator"] and info["max_reply_seconds"] == 6.0
    assert info["conversation_id"] == query.get("conversation_id", info["conversation_id"])
    return client


async def test_health_ready_and_voices(app):
    async with httpx.AsyncClient(base_url=app["url"], timeout=30) as http:
        assert (await http.get("/healthz")).json() == {"ok": True}
        ready = (await http.get("/readyz")).json()
        assert ready["ready"] and ready["random_weights"] and "RANDOM WEIGHTS" in ready["warning"]
        assert ready["weights"]["csm"] == "random tiny"
        cache = ready["cache"]  # the generator's KV cache: its budget and use
        assert cache["enabled"] and cache["slots"] == 12 and cache["kv_bytes_per_row"] > 0
        assert cache["slot_rows"] == 2048 and cache["host_budget_bytes"] == 0
        voices = (await http.get("/v1/voices")).json()
        assert [v["id"] for v in voices["voices"]] == ["none", "narrator"]
        page = await http.get("/")
        assert page.status_code == 200 and page.text.startswith("<!doctype html>")
        assert (await http.get("/assets/app.js")).text == "console.log('page')"
        assert (await http.get("/assets/..%2Fsecret.txt")).status_code == 404
        assert (await http.get("/assets/missing.js")).status_code == 404
        assert (await http.get("/config.json")).status_code == 404  # none: the page's defaults


async def test_spoken_turn_end_to_end(app, tmp_path):
    client = await connect(app)
    await client.send("session.update", session={"audio": {"output": {"voice": "narrator"}}})
    assert (await client.until("session.updated"))[-1]["session"]["audio"]["output"]["voice"] == "narrator"
    await client.stream(speech("hello world", tmp_path))
    events = await client.until("response.done")
    assert_spoken_turn(events)
    started = of_type(events, "input_audio_buffer.speech_started")[0]
    assert 500 <= started["audio_start_ms"] <= 1200  # speech begins at 1 s; 300 ms of prefix padding
    transcript = of_type(events, "conversation.item.input_audio_transcription.completed")[0]["transcript"]
    assert isinstance(transcript, str)
    done = of_type(events, "response.done")[0]["response"]
    assert done["status"] == "completed"
    whole_reply(events)
    deltas = of_type(events, "response.output_audio.delta")
    sizes = [len(base64.b64decode(d["delta"])) // 2 for d in deltas]
    # FIRST_FRAMES first (240 ms start the page's playback at once), then two to four frames a delta
    # (MAX_FRAMES_PER_CHUNK, as the reply gets ahead of playback); a sentence's last frame may be alone.
    assert sizes[0] == FIRST_FRAMES * FRAME and set(sizes[1:]) <= {FRAME, 2 * FRAME, 3 * FRAME, 4 * FRAME}
    await client.close()


async def test_later_replies_prefill_only_their_new_rows(app):
    """The conversation's prompts are append-only (each sentence its own segment), so the generator reuses
    what it holds: a reply's second sentence and every later reply prefill only their new rows. The voice's
    reference comes first and is kept; `x-server.info` shows the cache's budget."""
    client, info = await Client.open(app["ws"], token=APP_TOKEN)
    assert info["cache"]["enabled"] and info["cache"]["slots"] == 12 and info["cache"]["kv_bytes_per_row"] > 0
    await client.send("session.update", session={"audio": {"output": {"voice": "narrator"}}})
    await client.until("session.updated")
    usage = []
    for text in ["first things first. then a second sentence", "and more", "one last thing to say"]:
        await client.say_text(text)
        done = of_type(await client.until("response.done"), "response.done")[0]["response"]
        assert done["status"] == "completed"
        usage.append(done["x-prompt"])
    first, *later = usage
    assert first["sentences"] == 2 and first["reused_rows"] > 0  # the second sentence reuses the first's
    for u in later:
        assert u["reused_rows"] > 2 * u["prefilled_rows"] > 0
        assert u["rows"] == u["reused_rows"] + u["prefilled_rows"]
    await client.close()


async def test_typed_turn(app):
    client = await connect(app)
    await client.say_text("what is the weather like")
    events = await client.until("response.done")
    reply = whole_reply(events)
    assert reply == "You said: what is the weather like."
    assert of_type(events, "response.done")[0]["response"]["status"] == "completed"
    await client.close()


async def test_barge_in_cancels_and_truncate_trims(app, tmp_path):
    client, info = await Client.open(app["ws"], token=APP_TOKEN)
    conversation_id = info["conversation_id"]
    await client.say_text("tell me a long story about the sea and the sky")
    first = await client.until("response.output_audio.delta")
    item_id = first[-1]["item_id"]
    await client.stream(speech("stop please", tmp_path, lead_s=0.3))
    events = await client.until("response.done")
    assert "input_audio_buffer.speech_started" in [e["type"] for e in events]
    done = of_type(events, "response.done")[0]["response"]
    assert done["status"] == "cancelled" and done["status_details"]["reason"] == "turn_detected"
    # The page reports how much it played; the assistant's turn keeps just that.
    await client.send("conversation.item.truncate", item_id=item_id, content_index=0, audio_end_ms=80)
    truncated = (await client.until("conversation.item.truncated"))[-1]
    assert truncated["item_id"] == item_id and truncated["audio_end_ms"] == 80
    # The person's turn (committed at speech end) gets its reply; the conversation goes on.
    assert (await client.until("response.done"))[-1]["response"]["status"] == "completed"
    await client.close()
    history = (app["args"]["ingress"]["history_dir"]) + f"/{conversation_id}.jsonl"
    with open(history) as f:
        records = [json.loads(line) for line in f]
    assert any(r["kind"] == "truncate" and r["item_id"] == item_id and r["frames"] == 1 for r in records)


async def test_response_cancel(app):
    client = await connect(app)
    await client.say_text("count to ten slowly please")
    await client.until("response.output_audio.delta")
    await client.send("response.cancel")
    done = (await client.until("response.done"))[-1]["response"]
    assert done["status"] == "cancelled" and done["status_details"]["reason"] == "client_cancelled"
    await client.send("response.cancel")  # nothing to cancel now
    assert (await client.until("error"))[-1]["error"]["code"] == "no_active_response"
    await client.say_text("again")
    assert (await client.until("response.done"))[-1]["response"]["status"] == "completed"
    await client.close()


async def test_eight_conversations_are_batched(app):
    generator = serve.get_deployment_handle("CSMGenerator", "csm")
    clients = [await connect(app) for _ in range(8)]
    await asyncio.gather(*(c.say_text(f"number {i} says hello") for i, c in enumerate(clients)))
    results = await asyncio.gather(*(c.until("response.done") for c in clients))
    for events in results:
        whole_reply(events)
        assert of_type(events, "response.done")[0]["response"]["status"] == "completed"
    info = await generator.info.remote()
    assert info["max_batch_size"] > 1
    await asyncio.gather(*(c.close() for c in clients))


BAD_MESSAGES = [
    ("not json at all", "invalid_json"),
    (json.dumps({"type": "no.such.event"}), "unknown_event"),
    (json.dumps({"type": "input_audio_buffer.append", "audio": "@@not base64@@"}), "invalid_audio"),
    (
        json.dumps({"type": "input_audio_buffer.append", "audio": base64.b64encode(b"abc").decode()}),
        "invalid_audio",
    ),
    (json.dumps({"type": "input_audio_buffer.append", "audio": "A" * 200_000}), "message_too_large"),
    (
        json.dumps(
            {"type": "conversation.item.truncate", "item_id": 5, "content_index": 0, "audio_end_ms": 1}
        ),
        "invalid_event",
    ),
    (
        json.dumps({"type": "session.update", "session": {"audio": {"input": {"format": {"rate": 16000}}}}}),
        "unsupported_format",
    ),
    (
        json.dumps({"type": "session.update", "session": {"audio": {"output": {"voice": "nobody"}}}}),
        "invalid_event",
    ),
    (json.dumps({"type": "input_audio_buffer.commit"}), "empty_buffer"),
    (
        json.dumps(
            {"type": "conversation.item.truncate", "item_id": "item_x", "content_index": 0, "audio_end_ms": 1}
        ),
        "item_not_found",
    ),
    (json.dumps([1, 2, 3]), "invalid_event"),
]


async def test_every_bad_message_gets_one_error_and_the_conversation_goes_on(app):
    client = await connect(app)
    for raw, code in BAD_MESSAGES:
        await client.send_raw(raw)
        event = await client.recv()
        assert event["type"] == "error", raw[:80]
        assert event["error"]["code"] == code, (raw[:80], event)
    await client.send_raw(b"\xff\xfe binary junk")
    assert (await client.recv())["type"] == "error"
    await client.say_text("still here")
    events = await client.until("response.done")
    assert not of_type(events, "error")
    assert of_type(events, "response.done")[0]["response"]["status"] == "completed"
    await client.close()


async def test_token_is_required(app):
    for url in (app["ws"], app["ws"] + "?token=wrong"):
        refused = await Client.connect(url)
        event = await refused.recv()
        assert event["type"] == "error" and event["error"]["code"] == "unauthorized"
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await refused.recv()
        assert closed.value.rcvd.code == 1008  # the page stops retrying on 1008


async def test_server_busy_refusal(app):
    clients = [await connect(app) for _ in range(MAX_CONVERSATIONS)]
    refused = await Client.connect(app["ws"], token=APP_TOKEN)
    event = await refused.recv()
    assert event["type"] == "error" and event["error"]["code"] == "server_busy"
    with pytest.raises(websockets.ConnectionClosed) as closed:
        await refused.recv()
    assert closed.value.rcvd.code == 1013
    await asyncio.gather(*(c.close() for c in clients))
    await asyncio.sleep(0.5)
    again = await connect(app)  # capacity is back once they leave
    await again.close()


async def test_openai_realtime_client(app, tmp_path):
    from openai import AsyncOpenAI

    client = AsyncOpenAI(api_key=APP_TOKEN, base_url=app["url"] + "/v1")
    pcm = speech("hello world", tmp_path)
    async with client.realtime.connect(model="csm-1b") as conn:
        await conn.session.update(
            session={
                "type": "realtime",
                "instructions": "Be brief.",
                "audio": {"input": {"turn_detection": None}},
            }
        )
        for i in range(0, pcm.size, 4 * FRAME):
            await conn.input_audio_buffer.append(
                audio=base64.b64encode(pcm[i : i + 4 * FRAME].tobytes()).decode()
            )
        await conn.input_audio_buffer.commit()
        await conn.response.create()
        samples, kinds = 0, []
        async for event in conn:
            kinds.append(event.type)
            if event.type == "response.output_audio.delta":
                samples += len(base64.b64decode(event.delta)) // 2
            if event.type == "response.done":
                assert event.response.status == "completed"
                break
    assert "session.updated" in kinds and "input_audio_buffer.committed" in kinds
    assert samples > 0 and samples % FRAME == 0


async def test_history_survives_a_restart(app):
    from serve_app.app import build_app

    client, info = await Client.open(app["ws"], token=APP_TOKEN)
    await client.say_text("remember the blue door")
    await client.until("response.done")
    await client.close()
    serve.delete("csm")
    serve.run(build_app(app["args"]), name="csm", route_prefix="/")
    client = await connect(app, conversation_id=info["conversation_id"])
    await client.send("response.create")  # no new input: the echo answers the last turn it finds
    events = await client.until("response.done")
    assert (
        of_type(events, "response.output_audio_transcript.done")[0]["transcript"]
        == "You said: remember the blue door."
    )
    await client.close()


async def test_decoder_rebuilds_a_lost_stream_from_its_history(app):
    """A reply's chunk reaching a replica without its state (restarted, evicted) is decoded after the
    state is rebuilt from the frames sent with it, instead of failing or starting from silence."""
    decoder = serve.get_deployment_handle("AudioDecoder", "csm")
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 2048, (12, 32)).astype(np.int16)
    before = (await decoder.info.remote())["recoveries"]
    lost = decoder.options(multiplexed_model_id="out_never_seen")
    pcm = await lost.decode.remote(10, frames[10:12], frames[:10])
    assert pcm.dtype == np.int16 and pcm.shape == (2 * FRAME,)
    assert (await decoder.info.remote())["recoveries"] == before + 1
    with pytest.raises(ValueError, match="no history"):
        await decoder.options(multiplexed_model_id="out_other").decode.remote(5, frames[:1])
    await lost.close.remote()


async def test_encoder_asks_for_the_turn_again_when_it_lost_the_stream(app):
    tokenizer = serve.get_deployment_handle("AudioTokenizer", "csm")
    pcm = (np.random.default_rng(1).standard_normal(4 * FRAME) * 3000).astype(np.int16)
    stream = tokenizer.options(multiplexed_model_id="in_never_seen")
    assert await stream.encode.remote(FRAME, pcm) is None  # mid-turn, no state here: resend from 0
    codes = await stream.encode.remote(0, pcm, True)
    assert codes.shape == (4, 32) and codes.dtype == np.int16


async def test_recognizer_asks_for_the_turn_again_when_it_lost_the_stream(app, tmp_path):
    recognizer = serve.get_deployment_handle("SpeechRecognizer", "csm")
    pcm = speech("hello world", tmp_path, lead_s=0.2, tail_s=0.2)
    stream = recognizer.options(multiplexed_model_id="in_never_heard")
    recoveries = (await recognizer.stats.remote())["recoveries"]
    assert await stream.push.remote(CHUNK, pcm[CHUNK:]) is None  # mid-turn, no state here: resend from 0
    assert isinstance(await stream.push.remote(0, pcm[:CHUNK]), str)
    final = await stream.push.remote(CHUNK, pcm[CHUNK:], True)
    assert "world" in final.split()
    stats = await recognizer.stats.remote()
    assert stats["recoveries"] == recoveries + 1
    record = stats["streams"]["in_never_heard"]
    assert record["pushes"] == 2 and record["samples"] == pcm.size and record["final_samples"] < pcm.size


async def recognizer_records(recognizer) -> dict[str, dict]:
    return (await recognizer.stats.remote())["streams"]


async def test_a_spoken_turn_is_recognized_while_it_is_spoken(app, tmp_path):
    """Words arrive as `...transcription.delta` before the turn ends; at its end only the last chunk is
    left to decode (the recognizer's own record of the stream), and the transcript has the words."""
    recognizer = serve.get_deployment_handle("SpeechRecognizer", "csm")
    before = set(await recognizer_records(recognizer))
    client = await connect(app)
    turn = speech("what is the weather like today", tmp_path)
    await client.stream(turn, realtime=1.0)  # as a microphone does
    events = await client.until("response.done")
    types = [e["type"] for e in events]
    deltas = [i for i, t in enumerate(types) if t == "conversation.item.input_audio_transcription.delta"]
    assert deltas and deltas[0] < types.index("input_audio_buffer.speech_stopped")
    spoken = "".join(events[i]["delta"] for i in deltas)
    transcript = of_type(events, "conversation.item.input_audio_transcription.completed")[0]["transcript"]
    assert "weather" in transcript.split()
    assert transcript.startswith(spoken.split()[0])  # the deltas' words lead the final transcript
    (record,) = [r for k, r in (await recognizer_records(recognizer)).items() if k not in before]
    assert record["pushes"] >= 4 and record["recoveries"] == 0  # chunks that waited go as one
    assert 0 < record["final_samples"] <= ENCODE_CHUNK  # the turn's end: one step, of the last chunk
    assert record["samples"] < turn.size  # the turn is committed when its silence is heard, not at the end
    await client.close()


async def test_concurrent_turns_are_recognized_concurrently(app, tmp_path):
    recognizer = serve.get_deployment_handle("SpeechRecognizer", "csm")
    before = set(await recognizer_records(recognizer))
    clients = [await connect(app) for _ in range(2)]
    turns = [speech("hello world", tmp_path), speech("what is the weather like today", tmp_path)]
    await asyncio.gather(*(c.stream(t, realtime=1.0) for c, t in zip(clients, turns, strict=True)))
    done = await asyncio.gather(*(c.until("response.done") for c in clients))
    texts = [
        of_type(e, "conversation.item.input_audio_transcription.completed")[0]["transcript"] for e in done
    ]
    assert all(texts)  # (the words themselves: test_a_spoken_turn_is_recognized_while_it_is_spoken)
    records = [r for k, r in (await recognizer_records(recognizer)).items() if k not in before]
    assert len(records) == 2
    spans = [(r["intervals"][0][0], r["intervals"][-1][1]) for r in records]
    assert max(a for a, _ in spans) < min(b for _, b in spans)  # the two turns' decoding overlapped
    for c in clients:
        await c.close()


async def test_bridge_endpoint_delivers_events_through_the_connections_api(app):
    """The Lambda path: events are posted for a connection id, replies go out through boto3's
    `apigatewaymanagementapi` client to the configured callback URL (here a local stand-in for API
    Gateway). Only the bridge's own token opens the bridge routes, never the users'; no request can send
    the replies anywhere else, nor open a conversation on behalf of no one."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from tests.conftest import BRIDGE_CALLBACK_PORT, BRIDGE_CALLBACK_URL, BRIDGE_TOKEN

    posted: list[tuple[str, dict]] = []

    class Connections(BaseHTTPRequestHandler):  # HTTP/1.0: no kept-alive connection outlives the test
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            posted.append((unquote(self.path), json.loads(body or b"{}")))
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_DELETE = do_POST

        def log_message(self, *args) -> None:
            pass

    configured = ThreadingHTTPServer(("127.0.0.1", BRIDGE_CALLBACK_PORT), Connections)
    threading.Thread(target=configured.serve_forever, daemon=True).start()
    connection = "conn/abc+123="  # API Gateway's ids are base64: '/', '+' and '=' must survive the path
    path = f"/bridge/connections/{quote(connection, safe='')}"
    users, bridge = {"Authorization": f"Bearer {APP_TOKEN}"}, {"Authorization": f"Bearer {BRIDGE_TOKEN}"}
    opening = {"conversation_id": None, "principal": "cognito:alice"}
    nothing = lambda *_: (200, {}, b"")  # noqa: E731
    try:
        with http_server(nothing) as (elsewhere, elsewhere_seen):
            headers = {"serve_multiplexed_model_id": connection}
            async with httpx.AsyncClient(base_url=app["url"], timeout=30, headers=headers) as http:
                for wrong in (users, {"Authorization": "Bearer guess"}, {}):  # the users' token is not it
                    assert (await http.post(path, json=opening, headers=wrong)).status_code == 401
                assert (await http.post(path, json={**opening, "token": APP_TOKEN})).status_code == 401
                refused = await http.post(path, json={**opening, "callback_url": elsewhere}, headers=bridge)
                assert refused.status_code == 400 and "callback_url" in refused.json()["error"]
                for no_one in ({"principal": ""}, {}):
                    refused = await http.post(path, json=no_one, headers=bridge)
                    assert refused.status_code == 400 and "principal" in refused.json()["error"]
                # A connect may repeat the configured callback URL (never name another).
                named = {**opening, "callback_url": BRIDGE_CALLBACK_URL + "/"}
                opened = await http.post(path, json=named, headers=bridge)
                assert opened.status_code == 200
                again = await http.post(path, json=opening, headers=bridge)  # the bridge retried
                assert again.json() == opened.json()
                for wrong in (users, {}):  # an open conversation takes events from the bridge alone
                    assert (await http.post(path + "/events", content="{}", headers=wrong)).status_code == 401
                    assert (await http.delete(path, headers=wrong)).status_code == 401
                item = {
                    "type": "message",
                    "role": "user",
                    "content": [{"type": "input_text", "text": "over the bridge"}],
                }
                create = {"type": "conversation.item.create", "item": item}
                for event in (create, {"type": "response.create"}):
                    sent = await http.post(path + "/events", content=json.dumps(event), headers=bridge)
                    assert sent.status_code == 200
                for _ in range(300):
                    if any(body.get("type") == "response.done" for _, body in posted):
                        break
                    await asyncio.sleep(0.1)
                assert (await http.delete(path, headers=bridge)).status_code == 200
                assert (await http.post(path + "/events", content="{}", headers=bridge)).status_code == 404
        assert elsewhere_seen == []  # the refused callback URL was never contacted
    finally:
        configured.shutdown()
        configured.server_close()
    events = [body for where, body in posted if where == f"/local/@connections/{connection}"]
    types = [e.get("type") for e in events]
    assert types[0] == "session.created" and "response.done" in types
    assert audio_samples(events) > 0


async def test_a_full_generator_fails_the_reply_not_the_conversation(app):
    """Every engine slot taken: the reply ends with `server_busy` at once (never a hang), and the next
    reply works once slots are free again."""
    from deployments.generator import SpeechRequest

    generator = serve.get_deployment_handle("CSMGenerator", "csm").options(stream=True)
    slots = (await serve.get_deployment_handle("CSMGenerator", "csm").info.remote())["max_slots"]
    hogs = [generator.generate.remote(SpeechRequest(text="hold", max_frames=2000 // 8)) for _ in range(slots)]
    for hog in hogs:
        await hog.__anext__()  # each holds a slot once its first frame exists
    client = await connect(app)
    try:
        await client.say_text("is anyone there")
        events = await client.until("response.done")
        assert [e["error"]["code"] for e in of_type(events, "error")] == ["server_busy"]
        assert of_type(events, "response.done")[0]["response"]["status"] == "failed"
    finally:
        for hog in hogs:
            hog.cancel()
    await asyncio.sleep(1.0)
    await client.say_text("and now")
    assert (await client.until("response.done"))[-1]["response"]["status"] == "completed"
    await client.close()


async def test_too_many_events_are_refused_and_the_conversation_goes_on(app):
    """Past the burst (100 events) at 50 events/s, events are dropped with `rate_limited` errors."""
    client = await connect(app)
    silence = base64.b64encode(np.zeros(480, np.int16).tobytes()).decode()
    message = json.dumps({"type": "input_audio_buffer.append", "audio": silence})
    await asyncio.gather(*(client.send_raw(message) for _ in range(160)))
    errors = []
    while True:
        try:
            event = await client.recv(timeout=2)
        except TimeoutError:
            break
        if event["type"] == "error":
            errors.append(event["error"]["code"])
    assert errors and set(errors) == {"rate_limited"} and len(errors) < 160 - 90
    await asyncio.sleep(1.0)  # the bucket refills
    await client.say_text("calm again")
    assert (await client.until("response.done"))[-1]["response"]["status"] == "completed"
    await client.close()
