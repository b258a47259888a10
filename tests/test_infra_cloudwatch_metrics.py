"""The load publisher the GPU worker service scales on (serve_app/cloudwatch_metrics.py), against
Prometheus pages shaped like Ray's and served from this machine. The whole publisher against a real
Ray cluster runs in test_docker_entrypoints.py; its real `put_metric_data` call goes to a local CloudWatch
stand-in (devtools/cloudwatch.py) here."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import boto3
import pytest

from devtools.cloudwatch import LocalCloudWatch
from serve_app import cloudwatch_metrics as cw

NODE_WITH_GPU = """\
# TYPE ray_node_cpu_count gauge
ray_node_cpu_count{ip="10.0.0.1"} 4.0
# TYPE ray_node_gpus_utilization gauge
ray_node_gpus_utilization{GpuIndex="0",ip="10.0.0.1"} 80.0
# TYPE ray_serve_replica_processing_queries gauge
ray_serve_replica_processing_queries{application="csm",deployment="CSMGenerator",replica="a"} 9.0
ray_serve_replica_processing_queries{application="csm",deployment="AudioDecoder",replica="b"} 30.0
# TYPE ray_serve_deployment_queued_queries gauge
ray_serve_deployment_queued_queries{application="csm",deployment="CSMGenerator",handle="h1"} 2.0
# TYPE ray_csm_conversations_active gauge
ray_csm_conversations_active{application="csm",deployment="ConversationIngress"} 7.0
"""
SECOND_NODE = """\
# TYPE ray_node_cpu_count gauge
ray_node_cpu_count{ip="10.0.0.2"} 4.0
# TYPE ray_node_gpus_utilization gauge
ray_node_gpus_utilization{GpuIndex="0",ip="10.0.0.2"} 40.0
# TYPE ray_serve_replica_processing_queries gauge
ray_serve_replica_processing_queries{application="csm",deployment="CSMGenerator",replica="c"} 5.0
# TYPE ray_serve_deployment_queued_queries gauge
ray_serve_deployment_queued_queries{application="csm",deployment="AudioTokenizer",handle="h2"} 1.0
"""
DASHBOARD = "# TYPE ray_dashboard_up gauge\nray_dashboard_up 1.0\n"  # listed, but not a node


# What one publish of the two nodes above sends (the dead endpoint listed beside them adds nothing).
PUBLISHED = {
    "OngoingRequests": 14.0,
    "OngoingRequestsPerNode": 7.0,
    "QueuedRequests": 3.0,
    "Conversations": 7.0,
    "Nodes": 2.0,
    "GpuUtilization": 60.0,
}


def test_summarize_adds_up_the_nodes():
    load = cw.summarize([NODE_WITH_GPU, SECOND_NODE])
    assert load.nodes == 2
    assert load.ongoing == 14  # CSMGenerator only: the GPU's work
    assert load.queued == 3  # every deployment's queue
    assert load.conversations == 7
    assert load.gpu_utilization == 60
    assert load.ongoing_per_node == 7


def test_metric_data_carries_the_cluster_and_leaves_out_absent_gpus():
    data = cw.metric_data(cw.Load(nodes=1, ongoing=3, queued=0, conversations=2, gpu_utilization=None), "c1")
    names = {d["MetricName"]: d for d in data}
    assert set(names) == {
        "OngoingRequests",
        "OngoingRequestsPerNode",
        "QueuedRequests",
        "Conversations",
        "Nodes",
    }
    assert all(d["Dimensions"] == [{"Name": "ClusterName", "Value": "c1"}] for d in data)
    assert names["Nodes"]["Value"] == 1.0 and names["OngoingRequests"]["Unit"] == "Count"
    with_gpu = cw.metric_data(cw.Load(1, 0, 0, 0, 55.0), "c1")
    assert {
        "MetricName": "GpuUtilization",
        "Dimensions": [{"Name": "ClusterName", "Value": "c1"}],
        "Value": 55.0,
        "Unit": "Percent",
    } in with_gpu


@pytest.fixture
def ray_metrics_servers():
    """Three endpoints as Ray's service discovery file lists them: two nodes and the dashboard."""
    servers = []
    for page in (NODE_WITH_GPU, SECOND_NODE, DASHBOARD):

        class Handler(BaseHTTPRequestHandler):
            body = page.encode()

            def do_GET(self):
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.end_headers()
                self.wfile.write(self.body)

            def log_message(self, *args):
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
    yield [f"127.0.0.1:{s.server_address[1]}" for s in servers]
    for server in servers:
        server.shutdown()
        server.server_close()


def test_publish_once_reads_every_listed_endpoint(tmp_path, ray_metrics_servers):
    discovery = tmp_path / "prom_metrics_service_discovery.json"
    dead = "127.0.0.1:9"  # a node that went away between listing and scraping: not counted
    discovery.write_text(json.dumps([{"labels": {"job": "ray"}, "targets": [*ray_metrics_servers, dead]}]))
    sent: list[list[dict]] = []
    assert cw.publish_once(discovery, "csm-voice", sent.append)
    (data,) = sent
    values = {d["MetricName"]: d["Value"] for d in data}
    assert values == PUBLISHED


def test_a_failed_put_is_reported_not_raised(tmp_path):
    def refuse(_data):
        raise RuntimeError("throttled")

    assert not cw.publish_once(tmp_path / "missing.json", "csm-voice", refuse)
    sent: list[list[dict]] = []
    assert cw.publish_once(tmp_path / "missing.json", "csm-voice", sent.append)  # no file yet: zero nodes
    assert {d["MetricName"]: d["Value"] for d in sent[0]}["Nodes"] == 0.0


def test_the_real_put_metric_data_call_reaches_a_cloudwatch_stand_in(
    tmp_path, ray_metrics_servers, monkeypatch
):
    """`cloudwatch_sink`'s own boto3 client, pointed at the stand-in the way boto3 allows
    (`AWS_ENDPOINT_URL_CLOUDWATCH`): the call is signed, encoded and answered as CloudWatch's would be."""
    discovery = tmp_path / "prom_metrics_service_discovery.json"
    discovery.write_text(json.dumps([{"targets": ray_metrics_servers}]))
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDHEAD")
    monkeypatch.setattr(boto3, "DEFAULT_SESSION", None)
    with LocalCloudWatch({"AKIDHEAD": "head-secret"}) as stand_in:
        monkeypatch.setenv("AWS_ENDPOINT_URL_CLOUDWATCH", stand_in.url)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "head-secret")
        assert cw.publish_once(discovery, "csm-voice", cw.cloudwatch_sink("CSM/Voice"))
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
        monkeypatch.setattr(boto3, "DEFAULT_SESSION", None)  # it keeps the credentials it first read
        assert not cw.publish_once(
            discovery, "csm-voice", cw.cloudwatch_sink("CSM/Voice")
        )  # logged, not raised
    (call,) = stand_in.calls
    assert stand_in.refused == ["InvalidSignatureException"]
    assert call.operation == "PutMetricData" and call.access_key == "AKIDHEAD"
    assert call.params["Namespace"] == "CSM/Voice"
    sent = {d["MetricName"]: d for d in call.params["MetricData"]}
    assert {name: d["Value"] for name, d in sent.items()} == PUBLISHED
    assert sent["GpuUtilization"]["Unit"] == "Percent"
    assert sent["Nodes"]["Dimensions"] == [{"Name": "ClusterName", "Value": "csm-voice"}]
