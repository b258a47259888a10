"""Publish the cluster's load to CloudWatch, so that ECS can scale the GPU worker service on it.

ECS sees CPUs and memory, not conversations: the signal that more GPUs are needed lives inside Ray. The
Ray head runs this (`python -m serve_app.cloudwatch_metrics`, started by `docker/entrypoint.py head`).
Every `--interval` seconds it reads Ray's Prometheus endpoints (one per node, listed in the service
discovery file that Ray's head keeps for Prometheus), adds them up and sends one `put_metric_data`:

| metric | what | used by |
|---|---|---|
| `OngoingRequests` | requests being handled by `CSMGenerator` replicas (replies being spoken) | dashboard |
| `OngoingRequestsPerNode` | the same per Ray node (one GPU each) | worker scaling |
| `QueuedRequests` | requests waiting for any deployment's replica (Serve's queue depth) | scaling, alarm |
| `Conversations` | open conversations (the ingress's `csm_conversations_active`) | dashboard |
| `Nodes` | Ray nodes answering; missing data means this publisher is down | alarm |
| `GpuUtilization` | mean GPU utilisation over the nodes, percent (absent without GPUs) | alarm |

All carry the dimension `ClusterName`. The standard library, boto3 and prometheus_client (a Ray
dependency) only; a failed scrape or put is logged and retried next interval, never fatal.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

log = logging.getLogger(__name__)

GENERATOR = "CSMGenerator"
SCRAPE_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class Load:
    """One reading of the whole cluster."""

    nodes: int
    ongoing: float
    queued: float
    conversations: float
    gpu_utilization: float | None  # percent; None when no node reports a GPU

    @property
    def ongoing_per_node(self) -> float:
        return self.ongoing / max(self.nodes, 1)


def _samples(text: str) -> Iterable[tuple[str, dict[str, str], float]]:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            yield sample.name, sample.labels, sample.value


def summarize(pages: list[str], deployment: str = GENERATOR) -> Load:
    """Add up the Prometheus pages of every node (one page per node that answered)."""
    ongoing = queued = conversations = 0.0
    gpus: list[float] = []
    for page in pages:
        for name, labels, value in _samples(page):
            if name == "ray_serve_replica_processing_queries" and labels.get("deployment") == deployment:
                ongoing += value
            elif name == "ray_serve_deployment_queued_queries":
                queued += value
            elif name == "ray_csm_conversations_active":
                conversations += value
            elif name == "ray_node_gpus_utilization":
                gpus.append(value)
    utilization = sum(gpus) / len(gpus) if gpus else None
    return Load(len(pages), ongoing, queued, conversations, utilization)


def metric_data(load: Load, cluster: str) -> list[dict]:
    """The `MetricData` of one `put_metric_data` call."""
    dimensions = [{"Name": "ClusterName", "Value": cluster}]
    values = [
        ("OngoingRequests", load.ongoing, "Count"),
        ("OngoingRequestsPerNode", load.ongoing_per_node, "Count"),
        ("QueuedRequests", load.queued, "Count"),
        ("Conversations", load.conversations, "Count"),
        ("Nodes", float(load.nodes), "Count"),
    ]
    if load.gpu_utilization is not None:
        values.append(("GpuUtilization", load.gpu_utilization, "Percent"))
    return [{"MetricName": n, "Dimensions": dimensions, "Value": v, "Unit": u} for n, v, u in values]


def targets(discovery_file: Path) -> list[str]:
    """`host:port` of every node's metrics endpoint, from Ray's Prometheus service discovery file."""
    try:
        groups = json.loads(discovery_file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        log.warning("no service discovery file yet (%s): %s", discovery_file, e)
        return []
    return [target for group in groups for target in group.get("targets", [])]


def scrape(target: str) -> str | None:
    """One node's metrics page, or None when the node does not answer (it is not counted then)."""
    try:
        with urllib.request.urlopen(f"http://{target}/metrics", timeout=SCRAPE_TIMEOUT_S) as response:
            return response.read().decode()
    except OSError as e:
        log.warning("could not scrape %s: %s", target, e)
        return None


def read_load(discovery_file: Path) -> Load:
    pages = [page for page in map(scrape, targets(discovery_file)) if page is not None]
    # Ray lists its autoscaler's and dashboard's own endpoints too; only raylet pages count as nodes.
    nodes = [page for page in pages if "ray_node_cpu_count" in page or "ray_node_mem_total" in page]
    load = summarize(pages)
    return Load(len(nodes), load.ongoing, load.queued, load.conversations, load.gpu_utilization)


def cloudwatch_sink(namespace: str) -> Callable[[list[dict]], None]:
    import boto3

    client = boto3.client("cloudwatch")
    return lambda data: client.put_metric_data(Namespace=namespace, MetricData=data)


def log_sink(namespace: str) -> Callable[[list[dict]], None]:
    """`--dry-run`: print what would be published, one JSON line per interval."""
    return lambda data: print(json.dumps({"namespace": namespace, "metric_data": data}), flush=True)


def publish_once(discovery_file: Path, cluster: str, put: Callable[[list[dict]], None]) -> bool:
    """One interval's reading and put; False (logged) when it failed."""
    try:
        put(metric_data(read_load(discovery_file), cluster))
    except Exception:  # a bad interval must not stop the publishing: the alarms watch for gaps
        log.exception("publishing the cluster's load failed; retrying next interval")
        return False
    return True


def run(discovery_file: Path, cluster: str, put: Callable[[list[dict]], None], interval_s: float) -> None:
    while True:
        started = time.monotonic()
        publish_once(discovery_file, cluster, put)
        time.sleep(max(0.0, interval_s - (time.monotonic() - started)))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Publish the Ray Serve cluster's load to CloudWatch.")
    parser.add_argument(
        "--discovery-file", type=Path, default=Path("/tmp/ray/prom_metrics_service_discovery.json")
    )
    parser.add_argument("--namespace", default=os.environ.get("CSM_METRICS_NAMESPACE", "CSM/Serve"))
    parser.add_argument("--cluster", default=os.environ.get("CSM_CLUSTER_NAME", "csm"))
    parser.add_argument(
        "--interval", type=float, default=float(os.environ.get("CSM_METRICS_INTERVAL_S", "60"))
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        default=os.environ.get("CSM_METRICS_DRY_RUN") == "1",
        help="print the metric data instead of sending it",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    sink = log_sink if args.dry_run else cloudwatch_sink
    run(args.discovery_file, args.cluster, sink(args.namespace), args.interval)


if __name__ == "__main__":
    main()
