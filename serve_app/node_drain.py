"""Drain a Spot worker's Ray node when EC2 warns that it will take the instance away.

    EC2 ──EventBridge rule──► SQS queue (infra_cdk/csm_infra/drain.py) ──► this loop, on the Ray head

The Ray head runs this (`python -m serve_app.node_drain`, started by `docker/entrypoint.py head` when
`CSM_DRAIN_QUEUE_URL` names the queue). For each notice it
1. reads which instance and by when: an "EC2 Spot Instance Interruption Warning" comes two minutes
   before EC2 stops the instance (`INTERRUPTION_NOTICE_S`), so its deadline is the event's time plus
   that; an "EC2 Instance Rebalance Recommendation" has no deadline (the group's capacity rebalancing
   launches a replacement and then terminates the instance, and ECS managed draining stops its task);
2. finds the Ray node on that instance: ECS names the container instance and its running tasks, and a
   task's awsvpc address is the address its Ray node registered with;
3. asks Ray's GCS to drain that node (reason: preemption, with the deadline) - the call `ray drain-node`
   makes. Ray then schedules nothing new there, and Serve starts replacements of the node's replicas on
   the other nodes and stops the old ones once those run, or at the deadline. A reply in flight goes on
   on the old replica meanwhile; a conversation's next request goes to a replica elsewhere;
4. deletes the message. A notice for an instance that is not one of this cluster's, or whose deadline
   has passed, is deleted and logged. A failed lookup or drain leaves the message: SQS hands it out
   again after its visibility timeout, and to the dead-letter queue after a few tries.

The head itself is never drained (it runs on on-demand capacity; draining it would end every
conversation). boto3 and Ray's GCS client only; nothing here touches the Serve app itself.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

log = logging.getLogger(__name__)

INTERRUPTION = "EC2 Spot Instance Interruption Warning"
REBALANCE = "EC2 Instance Rebalance Recommendation"
NOTICE_KINDS = {INTERRUPTION: "interruption", REBALANCE: "rebalance"}
# EC2 sends the interruption warning two minutes before it stops or terminates the instance.
INTERRUPTION_NOTICE_S = 120.0
# SQS long polling: one request waits up to this long for a message.
POLL_WAIT_S = 20
# The reason Ray records for the drain (autoscaler.proto's DrainNodeReason).
DRAIN_REASON = "DRAIN_NODE_REASON_PREEMPTION"


class BadNotice(ValueError):
    """A message that is not an EC2 interruption or rebalance event."""


@dataclass(frozen=True)
class Notice:
    instance_id: str
    kind: str  # "interruption" or "rebalance"
    deadline: float | None  # epoch seconds by which the instance goes; None: no fixed time

    def describe(self) -> str:
        when = "no deadline" if self.deadline is None else f"deadline {_iso(self.deadline)}"
        return f"{self.kind} notice for {self.instance_id} ({when})"


def parse_notice(body: str) -> Notice:
    """The notice in an SQS message body (the EventBridge event, as the rule delivers it)."""
    try:
        event = json.loads(body)
    except json.JSONDecodeError as e:
        raise BadNotice(f"not JSON: {e}") from None
    if not isinstance(event, dict):
        raise BadNotice("not an EventBridge event (a JSON object)")
    kind = NOTICE_KINDS.get(event.get("detail-type"))  # type: ignore[arg-type]
    if kind is None:
        raise BadNotice(
            f"detail-type {event.get('detail-type')!r} is neither {INTERRUPTION!r} nor {REBALANCE!r}"
        )
    detail = event.get("detail")
    instance_id = detail.get("instance-id") if isinstance(detail, dict) else None
    if not isinstance(instance_id, str) or not instance_id.startswith("i-"):
        raise BadNotice(f"detail.instance-id {instance_id!r} is not an EC2 instance id")
    deadline = None
    if kind == "interruption":
        try:
            sent = datetime.fromisoformat(str(event["time"]).replace("Z", "+00:00")).timestamp()
        except (KeyError, ValueError):
            raise BadNotice(f"time {event.get('time')!r} is not an ISO 8601 timestamp") from None
        deadline = sent + INTERRUPTION_NOTICE_S
    return Notice(instance_id, kind, deadline)


def task_addresses(ecs, cluster: str, instance_id: str) -> list[str]:
    """The awsvpc addresses of this cluster's running tasks on the instance ([] when it is not one of the
    cluster's container instances)."""
    found = ecs.list_container_instances(cluster=cluster, filter=f"ec2InstanceId == {instance_id}")
    addresses: list[str] = []
    for container_instance in found.get("containerInstanceArns", []):
        arns = ecs.list_tasks(cluster=cluster, containerInstance=container_instance, desiredStatus="RUNNING")
        if not arns.get("taskArns"):
            continue
        for task in ecs.describe_tasks(cluster=cluster, tasks=arns["taskArns"]).get("tasks", []):
            addresses += _task_address(task)
    return addresses


def _task_address(task: dict) -> list[str]:
    return [
        detail["value"]
        for attachment in task.get("attachments", [])
        if attachment.get("type") == "ElasticNetworkInterface"
        for detail in attachment.get("details", [])
        if detail.get("name") == "privateIPv4Address"
    ]


@dataclass(frozen=True)
class RayNode:
    node_id: str  # hex
    address: str
    is_head: bool


class RayNodes(Protocol):
    def alive(self) -> list[RayNode]: ...

    def drain(self, node_id: str, message: str, deadline: float | None) -> tuple[bool, str]: ...


class GcsNodes:
    """The cluster's nodes and their drain, through Ray's GCS client (what `ray drain-node` uses)."""

    def __init__(self, address: str) -> None:
        from ray._raylet import GcsClient

        self._gcs = GcsClient(address=address)

    def alive(self) -> list[RayNode]:
        from ray.core.generated.gcs_pb2 import GcsNodeInfo

        return [
            RayNode(node_id.hex(), info.node_manager_address, info.is_head_node)
            for node_id, info in self._gcs.get_all_node_info().items()
            if info.state == GcsNodeInfo.ALIVE
        ]

    def drain(self, node_id: str, message: str, deadline: float | None) -> tuple[bool, str]:
        from ray.core.generated.autoscaler_pb2 import DrainNodeReason

        deadline_ms = 0 if deadline is None else int(deadline * 1000)  # 0: no deadline, as GCS reads it
        accepted, refusal = self._gcs.drain_node(
            node_id, DrainNodeReason.Value(DRAIN_REASON), message, deadline_ms
        )
        return bool(accepted), str(refusal)


class Drainer:
    """Turns notices into drains: `handle` for one notice, `poll` for one receive from the queue."""

    def __init__(
        self,
        *,
        nodes: RayNodes,
        ecs,
        cluster: str,
        sqs=None,
        queue_url: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.nodes, self.ecs, self.cluster = nodes, ecs, cluster
        self.sqs, self.queue_url, self.clock = sqs, queue_url, clock
        self.counts = {"drained": 0, "head": 0, "not_ours": 0, "stale": 0, "bad": 0, "failed": 0}

    def handle(self, notice: Notice) -> list[str]:
        """Drain the Ray node(s) on the notice's instance; the ids of those drained. Raises when ECS or Ray
        cannot be asked or refuse, so that the message is tried again."""
        if notice.deadline is not None and notice.deadline <= self.clock():
            log.info("%s: the deadline has passed; nothing left to drain", notice.describe())
            self.counts["stale"] += 1
            return []
        addresses = set(task_addresses(self.ecs, self.cluster, notice.instance_id))
        targets = [node for node in self.nodes.alive() if node.address in addresses]
        if any(node.is_head for node in targets):
            log.error(
                "%s: it runs the Ray head, which is never drained (it belongs on on-demand capacity)",
                notice.describe(),
            )
            self.counts["head"] += 1
            return []
        if not targets:
            log.info("%s: no Ray worker of cluster %s runs there", notice.describe(), self.cluster)
            self.counts["not_ours"] += 1
            return []
        drained = []
        for node in targets:
            accepted, refusal = self.nodes.drain(node.node_id, notice.describe(), notice.deadline)
            if not accepted:
                self.counts["failed"] += 1
                raise RuntimeError(f"Ray refused to drain node {node.node_id} ({node.address}): {refusal}")
            log.warning("draining Ray node %s at %s: %s", node.node_id, node.address, notice.describe())
            drained.append(node.node_id)
        self.counts["drained"] += len(drained)
        return drained

    def poll(self, wait_s: int = POLL_WAIT_S) -> int:
        """One long-poll receive; every message handled is deleted. The number of messages received."""
        assert self.sqs is not None and self.queue_url is not None, "poll needs the queue"
        reply = self.sqs.receive_message(
            QueueUrl=self.queue_url, MaxNumberOfMessages=10, WaitTimeSeconds=wait_s
        )
        messages = reply.get("Messages", [])
        for message in messages:
            if self._handled(message.get("Body", "")):
                self.sqs.delete_message(QueueUrl=self.queue_url, ReceiptHandle=message["ReceiptHandle"])
        return len(messages)

    def _handled(self, body: str) -> bool:
        """Whether the message is done with (handled, or never handleable); False leaves it for a retry."""
        try:
            notice = parse_notice(body)
        except BadNotice as e:
            log.error("dropped a message that is no drain notice: %s", e)
            self.counts["bad"] += 1
            return True
        try:
            self.handle(notice)
        except Exception:
            log.exception("%s: not drained; SQS will hand the notice out again", notice.describe())
            return False
        return True

    def run(self, stop: threading.Event, errors_backoff_s: float = 5.0) -> None:
        while not stop.is_set():
            try:
                self.poll()
            except Exception:
                log.exception("receiving from %s failed; retrying", self.queue_url)
                stop.wait(errors_backoff_s)


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch).astimezone().isoformat(timespec="seconds")


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queue-url", default=os.environ.get("CSM_DRAIN_QUEUE_URL"))
    parser.add_argument("--cluster", default=os.environ.get("CSM_CLUSTER_NAME"), help="the ECS cluster")
    parser.add_argument("--gcs-address", default=os.environ.get("CSM_RAY_GCS_ADDRESS", "127.0.0.1:6379"))
    args = parser.parse_args(list(argv) if argv is not None else None)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if not args.queue_url or not args.cluster:
        parser.error("--queue-url (CSM_DRAIN_QUEUE_URL) and --cluster (CSM_CLUSTER_NAME) are required")
    import boto3

    # botocore reads AWS_DEFAULT_REGION only; ECS task definitions here set AWS_REGION.
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    drainer = Drainer(
        nodes=GcsNodes(args.gcs_address),
        ecs=boto3.client("ecs", region_name=region),
        cluster=args.cluster,
        sqs=boto3.client("sqs", region_name=region),
        queue_url=args.queue_url,
    )
    for signum in (signal.SIGTERM, signal.SIGINT):  # a long poll must not hold up the head's stop
        signal.signal(signum, _exit)
    log.info("draining Spot workers of %s on notices from %s", args.cluster, args.queue_url)
    drainer.run(threading.Event())
    return 0


def _exit(signum: int, _frame) -> None:
    raise SystemExit(0)


if __name__ == "__main__":
    raise SystemExit(main())
