"""A Spot worker drained mid-reply, on a local Ray cluster started through the image's entry points.

The head runs the real drain handler (`serve_app.node_drain`, started by `docker/entrypoint.py head`) on
a stand-in SQS queue and ECS API (tests/standins.py, reached by the unmodified boto3 clients, signatures
checked). The test gives the `CSMGenerator` a custom resource only the workers have, standing in for the
GPU share that pins it to a GPU node. Worker A (127.0.0.2, instance i-0aaa) joins with the head and takes
the replica; worker B (127.0.0.3, i-0bbb) joins next, the capacity that rebalancing or a second Spot pool
brings. While a reply is being spoken, EC2's interruption warning for A's instance reaches the queue. The
reply finishes, the replica moves to B, the conversation's next reply works, and its history holds both
turns.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import shutil
import tempfile
import time
from pathlib import Path

import httpx
import yaml

from devtools.realtime_client import Client, of_type, whole_reply
from serve_app.node_drain import INTERRUPTION
from tests import local_ray
from tests.local_ray import Nodes, node_env, ready
from tests.standins import SpotCluster, http_server
from tests.test_node_drain import event

CLUSTER = "csm-test"
SLOT = "csm_test_gpu"  # the generator's stand-in for a GPU share: the head has none
WORKERS = {"127.0.0.2": "i-0aaa", "127.0.0.3": "i-0bbb"}  # address → EC2 instance
CREDENTIALS = {"AKIDDRAIN": "drain-secret"}

# The test's overrides of serve_config.yaml (no production overlay: CPU, one ingress).
OVERLAY = {
    "applications": [
        {
            "name": "csm",
            "args": {"ingress": {"limits": {"max_reply_seconds": 6}}},
            "deployments": [
                {"name": "CSMGenerator", "ray_actor_options": {"num_cpus": 0, "resources": {SLOT: 1}}}
            ],
        }
    ]
}


def serve_details(dashboard: str, token: str) -> dict:
    """Serve's REST API (`serve status`'s source); {} while it does not answer."""
    try:
        headers = {"Authorization": f"Bearer {token}"}  # Ray's token authentication covers the dashboard
        return httpx.get(f"{dashboard}/api/serve/applications/", headers=headers, timeout=10).json()
    except (httpx.HTTPError, json.JSONDecodeError):
        return {}


def generator_replicas(dashboard: str, token: str) -> list[tuple[str, str]]:
    """(state, node address) of each `CSMGenerator` replica."""
    apps = serve_details(dashboard, token).get("applications", {})
    deployment = apps.get("csm", {}).get("deployments", {}).get("CSMGenerator", {})
    return [(r["state"], r.get("node_ip", "")) for r in deployment.get("replicas", [])]


def history(folder: Path, conversation_id: str) -> list[dict]:
    lines = (folder / f"{conversation_id}.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("kind") == "turn"]


def test_a_drained_spot_worker_hands_its_replica_on_and_the_conversation_goes_on():
    temp = Path(tempfile.mkdtemp(prefix="csmspot", dir="/tmp"))
    (temp / "overlay.yaml").write_text(yaml.safe_dump(OVERLAY))
    spot = SpotCluster(CLUSTER, {i: [address] for address, i in WORKERS.items()}, CREDENTIALS)
    try:
        with http_server(spot) as (aws_url, _), Nodes(temp) as nodes:
            base = {
                **node_env(temp),
                "SERVE_CONFIG_OVERLAY": str(temp / "overlay.yaml"),
                "RAY_AUTH_MODE": "token",  # as on ECS: the drain handler's GCS client needs the token too
                "RAY_AUTH_TOKEN": secrets.token_hex(32),
            }
            head_env = {
                **local_ray.head_env(base),
                "CSM_RAY_NUM_CPUS": "4",
                "CSM_CLUSTER_NAME": CLUSTER,
                "CSM_DRAIN_QUEUE_URL": f"{aws_url}/000000000000/csm-drain",
                "AWS_ENDPOINT_URL_SQS": aws_url,
                "AWS_ENDPOINT_URL_ECS": aws_url,
                "AWS_REGION": "us-east-1",
                "AWS_ACCESS_KEY_ID": "AKIDDRAIN",
                "AWS_SECRET_ACCESS_KEY": "drain-secret",
            }

            def worker(address: str) -> dict[str, str]:
                return {
                    **local_ray.worker_env(base, head_env),
                    "CSM_RAY_NUM_CPUS": "1",
                    "CSM_RAY_NODE_IP": address,
                    "CSM_RAY_RESOURCES": json.dumps({SLOT: 1}),
                }

            held_by, other = WORKERS  # the first worker to join takes the generator
            head = nodes.start("head", head_env)
            nodes.start("worker", worker(held_by), name="worker-a")
            url = f"http://127.0.0.1:{head_env['CSM_RAY_SERVE_HTTP_PORT']}"
            dashboard = f"http://127.0.0.1:{head_env['CSM_RAY_DASHBOARD_PORT']}"
            token = base["RAY_AUTH_TOKEN"]
            nodes.wait_until("/readyz", lambda: ready(url), 300)
            assert generator_replicas(dashboard, token) == [("RUNNING", held_by)]
            # The second joins once the app is up (three nodes starting at once overload two cores; Ray
            # gives a node 30 s to register). `ray start` says when the node has registered.
            nodes.start("worker", worker(other), name="worker-b")
            joined = lambda: "Ray runtime started" in (temp / "worker-b.log").read_text()  # noqa: E731
            nodes.wait_until("worker B to join", joined, 120)

            async def converse() -> tuple[str, list[str]]:
                ws = f"ws://127.0.0.1:{head_env['CSM_RAY_SERVE_HTTP_PORT']}/v1/realtime"
                client, info = await Client.open(ws, token=head_env["CSM_TOKEN"])
                await client.say_text("Hello there, how are you today?")
                first = await client.until("response.output_audio.delta", 120)
                # EC2's two-minute warning for the instance whose worker holds the generator.
                spot.send(event(INTERRUPTION, WORKERS[held_by], at=time.time()))
                rest = await client.until("response.done", 120)
                done = of_type(rest, "response.done")[0]["response"]
                assert done["status"] == "completed", done  # the reply in flight finished
                replies = [whole_reply(first + rest)]

                moved = await asyncio.to_thread(
                    nodes.wait_until,
                    "the generator's replica to move to the other worker",
                    lambda: generator_replicas(dashboard, token) == [("RUNNING", other)],
                    240,
                    watch=[head],
                )
                assert moved and spot.deleted, "the head's drain handler took the notice"

                await client.say_text("And what happens next?")
                second = await client.until("response.done", 120)
                assert of_type(second, "response.done")[0]["response"]["status"] == "completed"
                replies.append(whole_reply(second))
                await client.close()
                return info["conversation_id"], replies

            conversation_id, replies = asyncio.run(converse())
            turns = history(temp / "history", conversation_id)
            assert [(t["role"], t["text"]) for t in turns] == [
                ("user", "Hello there, how are you today?"),
                ("assistant", replies[0]),
                ("user", "And what happens next?"),
                ("assistant", replies[1]),
            ]
            head_log = (temp / "head.log").read_text()
            assert f"at {held_by}: interruption notice for {WORKERS[held_by]}" in head_log
    finally:
        shutil.rmtree(temp, ignore_errors=True)
