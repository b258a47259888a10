"""The GPU image's entry points (docker/entrypoint.py, docker/healthcheck.py), run here on CPU.

The production config merge is checked on its own; then one test starts a real Ray head through the
head entry point (Ray, `serve deploy` of serve_config.yaml + serve_config.prod.yaml, the CloudWatch
publisher in dry-run mode) and a worker through the worker entry point, with overrides so it runs on
this machine: CPU, the random `tiny` weights (no MODEL_PATH), free ports, a temp dir of its own and
Ray's token authentication on. It waits for `/readyz`, checks the worker joined and the health checks
pass, then stops both with SIGTERM (as ECS does). It never runs `ray stop`, which would stop every
Ray instance on the machine; whatever of ours is left at the end is killed by process id.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]
ENTRYPOINT = ROOT / "docker" / "entrypoint.py"
HEALTHCHECK = ROOT / "docker" / "healthcheck.py"
VENV_BIN = Path(sys.executable).parent

sys.path.insert(0, str(ROOT / "docker"))
import entrypoint  # noqa: E402  (docker/ is a folder of scripts, not a package)

from tests import local_ray  # noqa: E402
from tests.local_ray import Nodes, free_ports, node_env, ready, wait_gone  # noqa: E402

sys.path.remove(str(ROOT / "docker"))


# ---- the production config ----------------------------------------------------------------------------
def test_merge_overrides_by_key_and_by_name():
    base = {
        "http_options": {"host": "127.0.0.1", "port": 8000},
        "applications": [
            {
                "name": "csm",
                "args": {"device": "cpu", "preset": "tiny"},
                "deployments": [{"name": "A", "x": 1}],
            }
        ],
    }
    overlay = {
        "http_options": {"host": "0.0.0.0"},
        "applications": [{"name": "csm", "args": {"device": "cuda"}, "deployments": [{"name": "B", "y": 2}]}],
    }
    merged = entrypoint.merge(base, overlay)
    assert merged["http_options"] == {"host": "0.0.0.0", "port": 8000}
    app = merged["applications"][0]
    assert app["args"] == {"device": "cuda", "preset": "tiny"}
    assert app["deployments"] == [{"name": "A", "x": 1}, {"name": "B", "y": 2}]


def test_production_config_listens_on_the_task_address_and_autoscales_on_the_gpu():
    config = entrypoint.production_config({}, entrypoint.Ports())
    assert config["http_options"] == {"host": "0.0.0.0", "port": 8000}
    (app,) = config["applications"]
    assert app["import_path"] == "serve_app.app:build_app"
    assert app["args"]["device"] == "cuda"
    deployments = {d["name"]: d for d in app["deployments"]}
    # The engine's slots (auto on the GPU) bound the replies in flight, not Serve's queue, and its KV cache
    # spills to host memory; the generator's other settings are kept from serve_config.yaml.
    assert deployments["CSMGenerator"]["max_ongoing_requests"] == 256
    # (`prefill_threads` comes from serve_config.yaml too: CPU only, the engine ignores it on CUDA.)
    assert app["args"]["generator"] == {"max_slots": "auto", "host_cache_mb": 2048, "prefill_threads": 2}
    assert deployments["AudioDecoder"]["user_config"]["max_batch_size"] == 32  # kept from serve_config.yaml
    for name in ("CSMGenerator", "AudioDecoder", "AudioTokenizer", "SpeechRecognizer"):
        assert deployments[name]["autoscaling_config"]["min_replicas"] == 1
    # A production override must not bring a key Serve does not know: the schema validates it.
    from ray.serve.schema import ServeDeploySchema

    ServeDeploySchema.model_validate(config)


def test_worker_needs_the_head_address():
    with pytest.raises(SystemExit, match="CSM_RAY_HEAD"):
        entrypoint.ray_start_args("worker", entrypoint.Ports(), {})
    args = entrypoint.ray_start_args("worker", entrypoint.Ports(), {"CSM_RAY_HEAD": "ray-head.csm.internal"})
    assert "--address=ray-head.csm.internal:6379" in args


def test_head_dashboard_listens_on_loopback_only():
    args = entrypoint.ray_start_args("head", entrypoint.Ports(), {})
    assert "--dashboard-host=127.0.0.1" in args
    assert "--head" in args and "--port=6379" in args


def test_the_head_waits_for_weights_on_efs(tmp_path):
    assert entrypoint.weights_present({})  # no MODEL_PATH: the random `tiny` preset
    assert not entrypoint.weights_present({"MODEL_PATH": str(tmp_path / "csm-1b")})
    (tmp_path / "csm-1b").mkdir()
    (tmp_path / "csm-1b" / "config.json").write_text("{}")
    assert entrypoint.weights_present({"MODEL_PATH": str(tmp_path / "csm-1b")})


# ---- the real thing, on CPU ----------------------------------------------------------------------------
def published(log: Path) -> list[dict]:
    """The publisher's dry-run lines: {metric name: value} per interval."""
    readings = []
    for line in log.read_text().splitlines():
        if line.startswith('{"namespace"'):
            data = json.loads(line)["metric_data"]
            readings.append({d["MetricName"]: d["Value"] for d in data})
    return readings


def test_head_and_worker_entry_points_run_a_cluster_on_cpu():
    temp = Path(tempfile.mkdtemp(prefix="csmray", dir="/tmp"))  # short: Ray's socket paths have a limit
    base = {**node_env(temp), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    head_env = {
        **local_ray.head_env(base),
        "CSM_RAY_NUM_CPUS": "4",
        "CSM_METRICS_NAMESPACE": "CSM/Test",
        "CSM_METRICS_DRY_RUN": "1",
        "CSM_METRICS_INTERVAL_S": "2",
    }
    worker_env = {**local_ray.worker_env(base, head_env), "CSM_RAY_NUM_CPUS": "1"}
    try:
        with Nodes(temp) as nodes:
            head = nodes.start("head", head_env)
            worker = nodes.start("worker", worker_env)  # at once, as ECS would: it waits for the head
            url = f"http://127.0.0.1:{head_env['CSM_RAY_SERVE_HTTP_PORT']}"
            body = nodes.wait_until("/readyz", lambda: ready(url), 300)
            assert body["random_weights"] is True  # no MODEL_PATH: the tiny preset, said loudly
            assert httpx.get(f"{url}/healthz", timeout=10).json() == {"ok": True}

            head_log = temp / "head.log"
            readings = nodes.wait_until(
                "the publisher to count both nodes",
                lambda: [r for r in published(head_log) if r["Nodes"] == 2],
                90,
            )
            assert {"OngoingRequests", "OngoingRequestsPerNode", "QueuedRequests", "Conversations"} <= set(
                readings[-1]
            )

            for env, args in ((head_env, ["--head"]), (worker_env, [])):
                check = subprocess.run(
                    [sys.executable, str(HEALTHCHECK), *args], env=env, capture_output=True, timeout=30
                )
                assert check.returncode == 0, check.stderr.decode()

            for process in (worker, head):
                assert nodes.stop(process) == 0, nodes.tails()
            assert not wait_gone(nodes.seen), "Ray processes outlived their entry point"
    finally:
        shutil.rmtree(temp, ignore_errors=True)


def test_healthcheck_fails_when_nothing_answers():
    ports = free_ports(2)
    env = {
        **os.environ,
        "CSM_RAY_DASHBOARD_AGENT_LISTEN_PORT": str(ports[0]),
        "CSM_RAY_DASHBOARD_PORT": str(ports[1]),
    }
    check = subprocess.run(
        [sys.executable, str(HEALTHCHECK), "--head"], env=env, capture_output=True, timeout=30
    )
    assert check.returncode == 1
    assert b"unhealthy" in check.stderr
