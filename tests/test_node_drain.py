"""The Spot drain handler (serve_app/node_drain.py) on its own: notices parsed, instances found through the
real boto3 ECS and SQS clients against a local stand-in that checks their signatures, and the drain asked
of a node table that records it. `test_spot_drain.py` runs the whole path on a local Ray cluster."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import boto3
import pytest
from botocore.exceptions import ClientError

from serve_app.node_drain import (
    INTERRUPTION,
    INTERRUPTION_NOTICE_S,
    REBALANCE,
    BadNotice,
    Drainer,
    RayNode,
    parse_notice,
)
from tests.standins import SpotCluster, http_server

CLUSTER = "csm-voice"
CREDENTIALS = {"AKIDTEST": "secret-test"}
NOW = datetime(2026, 12, 3, 12, 0, tzinfo=UTC).timestamp()


def event(detail_type: str, instance_id: str = "i-0aaa", at: float = NOW) -> str:
    """An EventBridge event as the rule puts it on the queue."""
    return json.dumps(
        {
            "version": "0",
            "id": "7a0d-example",
            "detail-type": detail_type,
            "source": "aws.ec2",
            "account": "000000000000",
            "time": datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "region": "us-east-1",
            "resources": [f"arn:aws:ec2:us-east-1:000000000000:instance/{instance_id}"],
            "detail": {"instance-id": instance_id, "instance-action": "terminate"},
        }
    )


class Nodes:
    """The Ray node table; `drain` records what it is asked and answers `accept`."""

    def __init__(self, nodes: list[RayNode]) -> None:
        self.nodes = nodes
        self.drains: list[tuple[str, float | None]] = []
        self.accept = True

    def alive(self) -> list[RayNode]:
        return list(self.nodes)

    def drain(self, node_id: str, message: str, deadline: float | None) -> tuple[bool, str]:
        self.drains.append((node_id, deadline))
        return (True, "") if self.accept else (False, "the node is already dead")


HEAD = RayNode("aa" * 28, "10.0.1.10", is_head=True)
WORKER = RayNode("bb" * 28, "10.0.1.20", is_head=False)
OTHER = RayNode("cc" * 28, "10.0.2.30", is_head=False)


@pytest.fixture
def aws():
    """A stand-in ECS + SQS with the head on i-0head and one worker on i-0aaa; boto3 clients for it."""
    cluster = SpotCluster(CLUSTER, {"i-0head": [HEAD.address], "i-0aaa": [WORKER.address]}, CREDENTIALS)
    # A session of its own: boto3's default one keeps the credentials an earlier test gave it.
    session = boto3.session.Session(aws_access_key_id="AKIDTEST", aws_secret_access_key="secret-test")
    with http_server(cluster) as (url, _):
        clients = {
            name: session.client(name, region_name="us-east-1", endpoint_url=url) for name in ("ecs", "sqs")
        }
        yield cluster, clients, f"{url}/000000000000/csm-drain"


def drainer(aws, nodes: Nodes, now: float = NOW) -> Drainer:
    _, clients, queue_url = aws
    return Drainer(
        nodes=nodes,
        ecs=clients["ecs"],
        cluster=CLUSTER,
        sqs=clients["sqs"],
        queue_url=queue_url,
        clock=lambda: now,
    )


def test_an_interruption_warning_is_due_two_minutes_after_it_was_sent():
    notice = parse_notice(event(INTERRUPTION, "i-0abc", at=NOW))
    assert (notice.instance_id, notice.kind, notice.deadline) == ("i-0abc", "interruption", NOW + 120)
    assert INTERRUPTION_NOTICE_S == 120


def test_a_rebalance_recommendation_has_no_deadline():
    notice = parse_notice(event(REBALANCE, "i-0abc"))
    assert (notice.kind, notice.deadline) == ("rebalance", None)


@pytest.mark.parametrize(
    ("body", "says"),
    [
        ("not json", "not JSON"),
        ("[1, 2]", "JSON object"),
        (json.dumps({"detail-type": "EC2 Instance State-change Notification", "detail": {}}), "detail-type"),
        (json.dumps({"detail-type": REBALANCE, "detail": {"instance-id": "vol-1"}}), "instance id"),
        (
            json.dumps({"detail-type": INTERRUPTION, "detail": {"instance-id": "i-1"}, "time": "noon"}),
            "ISO 8601",
        ),
    ],
)
def test_a_message_that_is_no_notice_says_why(body, says):
    with pytest.raises(BadNotice, match=says):
        parse_notice(body)


def test_the_notice_drains_the_worker_on_that_instance_with_its_deadline(aws):
    cluster, _, _ = aws
    nodes = Nodes([HEAD, WORKER, OTHER])
    d = drainer(aws, nodes)
    cluster.send(event(INTERRUPTION, "i-0aaa", at=NOW - 10))
    assert d.poll(wait_s=1) == 1
    assert nodes.drains == [(WORKER.node_id, NOW - 10 + 120)]
    assert len(cluster.deleted) == 1 and not cluster.in_flight  # done with: deleted
    assert d.counts["drained"] == 1
    assert {"ListContainerInstances", "ListTasks", "DescribeTasks", "ReceiveMessage", "DeleteMessage"} <= set(
        cluster.calls
    )


def test_the_head_is_never_drained(aws):
    cluster, _, _ = aws
    nodes = Nodes([HEAD, WORKER])
    d = drainer(aws, nodes)
    cluster.send(event(REBALANCE, "i-0head"))
    d.poll(wait_s=1)
    assert nodes.drains == []
    assert d.counts["head"] == 1 and len(cluster.deleted) == 1


def test_other_instances_and_passed_deadlines_are_dropped_without_a_drain(aws):
    cluster, _, _ = aws
    nodes = Nodes([HEAD, WORKER])
    d = drainer(aws, nodes)
    cluster.send(event(INTERRUPTION, "i-0elsewhere"))  # not a container instance of this cluster
    cluster.send(event(INTERRUPTION, "i-0aaa", at=NOW - 300))  # EC2 has taken it already
    cluster.send("{not an event")
    assert d.poll(wait_s=1) == 3
    assert nodes.drains == []
    assert (d.counts["not_ours"], d.counts["stale"], d.counts["bad"]) == (1, 1, 1)
    assert len(cluster.deleted) == 3


def test_a_refused_drain_leaves_the_notice_to_be_tried_again(aws):
    cluster, _, _ = aws
    nodes = Nodes([HEAD, WORKER])
    nodes.accept = False
    d = drainer(aws, nodes)
    cluster.send(event(REBALANCE, "i-0aaa"))
    d.poll(wait_s=1)
    assert cluster.deleted == [] and len(cluster.in_flight) == 1 and d.counts["failed"] == 1
    cluster.release()  # the visibility timeout ends: SQS hands the message out again
    nodes.accept = True
    d.poll(wait_s=1)
    assert [node for node, _ in nodes.drains] == [WORKER.node_id, WORKER.node_id]
    assert len(cluster.deleted) == 1 and d.counts["drained"] == 1


def test_a_badly_signed_request_is_refused_as_aws_refuses_it(aws):
    cluster, _, queue_url = aws
    session = boto3.session.Session(aws_access_key_id="AKIDTEST", aws_secret_access_key="not-the-secret")
    sqs = session.client("sqs", region_name="us-east-1", endpoint_url=queue_url.rsplit("/", 2)[0])
    with pytest.raises(ClientError) as refused:
        sqs.receive_message(QueueUrl=queue_url, WaitTimeSeconds=0)
    assert refused.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    assert "ReceiveMessage" not in cluster.calls
