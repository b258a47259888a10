"""Faults on a real Ray Serve app: replicas killed mid-reply, a slow and a broken reply writer.

A second application ("faults", under `/faults`) runs beside the shared test app on the same Serve
instance, so that killing its replicas disturbs no other test. Its ingress has two replicas (a killed one
must not take the other's conversations with it), Serve health-checks every second (so a dead replica is
replaced quickly), and its Responder speaks to a local OpenAI-compatible server the tests can slow down
or break. What must hold every time: the affected reply ends with an `error` (or recovers), the
conversation and every other one go on, the next reply works once Serve has replaced the replica, and
the history on disk has every finished turn.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time

import pytest
import ray
from ray import serve
from websockets.exceptions import ConnectionClosed

from devtools.realtime_client import Client, audio_samples, of_type
from serve_app.app import build_app
from tests.conftest import APP_TOKEN
from tests.standins import FakeLLM, http_server

APP = "faults"
REPLY = "Fine, thanks. And you?"
# Long enough that a replica killed after the first audio is always killed mid-reply, even on a slow run.
LONG_REPLY = " ".join(f"This is sentence number {i} of a long story about the sea." for i in range(8))


@pytest.fixture(scope="module")
def faults(serve_app, tmp_path_factory):
    llm = FakeLLM(REPLY)
    history = tmp_path_factory.mktemp("faults-history")
    with http_server(llm) as (llm_url, _):
        args = {
            **serve_app["args"],
            "responder": {"backend": "openai", "openai_base_url": f"{llm_url}/v1", "timeout_s": 2.0},
            "options": {
                name: {"health_check_period_s": 1, "health_check_timeout_s": 5}
                for name in ("generator", "decoder", "tokenizer", "recognizer", "responder", "ingress")
            },
        }
        args["ingress"] = {
            **args["ingress"],
            "history_dir": str(history),
            "limits": {**args["ingress"]["limits"], "max_reply_seconds": 60.0},
        }
        args["options"]["ingress"]["num_replicas"] = 2
        serve.run(build_app(args), name=APP, route_prefix=f"/{APP}")
        try:
            yield {
                "ws": serve_app["ws"].replace("/v1/realtime", f"/{APP}/v1/realtime"),
                "llm": llm,
                "history": history,
            }
        finally:
            serve.delete(APP)


async def connect(faults, **query) -> tuple[Client, dict]:
    return await Client.open(faults["ws"], token=APP_TOKEN, **query)


def replicas(deployment: str) -> list[str]:
    prefix = f"SERVE_REPLICA::{APP}#{deployment}#"
    return sorted(
        a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix)
    )


def replica_tag(name: str) -> str:
    """What `x-server.info` shows of an ingress replica: an opaque digest of its id, not its name."""
    return hashlib.sha256(name.encode()).hexdigest()[:12]  # the actor's name is the replica's full id


def kill(replica: str) -> None:
    ray.kill(ray.get_actor(replica, namespace="serve"), no_restart=True)


async def replaced(deployment: str, dead: str, count: int = 1, timeout: float = 90) -> None:
    """Wait until Serve runs `count` healthy replicas of `deployment` again, none of them `dead`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = serve.status().applications[APP].deployments[deployment]
        names = replicas(deployment)
        if status.status == "HEALTHY" and dead not in names and len(names) == count:
            return
        await asyncio.sleep(0.5)
    pytest.fail(f"{deployment} was not replaced within {timeout:g} s")


async def reply_completes(client: Client, text: str) -> list[dict]:
    await client.say_text(text)
    events = await client.until("response.done", timeout=120)
    assert of_type(events, "response.done")[0]["response"]["status"] == "completed", events[-1]
    assert audio_samples(events) > 0
    return events


def history(faults, conversation_id: str) -> list[tuple[str, str]]:
    with open(faults["history"] / f"{conversation_id}.jsonl") as f:
        records = [json.loads(line) for line in f]
    return [(r["role"], r["text"]) for r in records if r["kind"] == "turn"]


@pytest.mark.parametrize("deployment", ["CSMGenerator", "AudioDecoder"])
async def test_a_model_replica_dying_mid_reply(faults, deployment):
    talker, info = await connect(faults)
    other, _ = await connect(faults)
    faults["llm"].reply = LONG_REPLY
    try:
        await talker.say_text("tell me about the sea")
        await talker.until("response.output_audio.delta")
        (victim,) = replicas(deployment)
        kill(victim)
        events = await talker.until("response.done", timeout=120)
    finally:
        faults["llm"].reply = REPLY
    status = of_type(events, "response.done")[0]["response"]["status"]
    if status == "failed":  # the reply ends with an error naming what happened...
        (error,) = of_type(events, "error")
        assert error["error"]["code"] == "response_failed"
    else:  # ...or the audio path recovered it (the decoder rebuilds its state from the last frames) and
        # it ran to its end, or to the reply-length limit ("incomplete")
        assert status in ("completed", "incomplete") and deployment == "AudioDecoder", status
        assert not of_type(events, "error")
    await replaced(deployment, victim)
    await reply_completes(talker, "are you back")
    await reply_completes(other, "and me")
    await talker.close()
    await other.close()
    turns = history(faults, info["conversation_id"])
    assert turns[0] == ("user", "tell me about the sea") and ("user", "are you back") in turns
    assert ("assistant", REPLY) in turns  # the reply that completed after the restart


async def test_an_ingress_replica_dying_with_sockets_open(faults):
    """Its sockets close; the other replica's conversations go on; a person who reconnects with their
    conversation id carries on with the history."""
    by_replica: dict[str, tuple[Client, str]] = {}
    spare: list[Client] = []
    for _ in range(12):
        client, info = await connect(faults)
        if info["replica"] in by_replica:
            spare.append(client)
        else:
            by_replica[info["replica"]] = (client, info["conversation_id"])
        if len(by_replica) == 2:
            break
    assert len(by_replica) == 2, "the proxy never used the second ingress replica"
    for client in spare:
        await client.close()
    (tag, (lost, lost_id)), (_, (survivor, _)) = sorted(by_replica.items())
    (victim,) = [name for name in replicas("ConversationIngress") if replica_tag(name) == tag]
    await reply_completes(lost, "first words")
    kill(victim)
    with pytest.raises(ConnectionClosed):
        await lost.until("never", timeout=30)
    await reply_completes(survivor, "still here")
    await replaced("ConversationIngress", victim, count=2)
    back, _ = await connect(faults, conversation_id=lost_id)
    await reply_completes(back, "I am back")
    await back.close()
    await survivor.close()
    assert history(faults, lost_id) == [
        ("user", "first words"),
        ("assistant", REPLY),
        ("user", "I am back"),
        ("assistant", REPLY),
    ]


@pytest.mark.parametrize("mode", ["slow", "error"])
async def test_a_slow_or_broken_reply_writer(faults, mode):
    client, _ = await connect(faults)
    faults["llm"].mode, faults["llm"].delay_s = mode, 4.0  # slow: twice the responder's 2 s timeout
    try:
        await client.say_text("hello")
        started = time.monotonic()
        events = await client.until("response.done", timeout=30)
        assert time.monotonic() - started < 10
        (error,) = of_type(events, "error")
        assert error["error"]["code"] == "response_failed"
        assert ("longer than 2 s" if mode == "slow" else "500") in error["error"]["message"]
        assert of_type(events, "response.done")[0]["response"]["status"] == "failed"
    finally:
        faults["llm"].mode = "ok"
    await reply_completes(client, "hello again")
    await client.close()


async def test_the_responder_replica_dying(faults):
    client, _ = await connect(faults)
    (victim,) = replicas("Responder")
    kill(victim)
    await client.say_text("anyone there")
    events = await client.until("response.done", timeout=60)
    status = of_type(events, "response.done")[0]["response"]["status"]
    assert status == "completed" or of_type(events, "error")[0]["error"]["code"] == "response_failed"
    await replaced("Responder", victim)
    await reply_completes(client, "now")
    await client.close()
