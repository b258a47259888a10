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

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]
ENTRYPOINT = ROOT / "docker" / "entrypoint.py"
HEALTHCHECK = ROOT / "docker" / "healthcheck.py"
VENV_BIN = Path(sys.executable).parent

sys.path.insert(0, str(ROOT / "docker"))
import entrypoint  # noqa: E402  (docker/ is a folder of scripts, not a package)

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
PORT_NAMES = (
    "gcs",
    "dashboard",
    "client_server",
    "node_manager",
    "object_manager",
    "metrics_export",
    "dashboard_agent_listen",
    "dashboard_agent_grpc",
    "runtime_env_agent",
    "serve_http",
)
NODE_PORT_NAMES = PORT_NAMES[3:9]


def free_ports(count: int) -> list[int]:
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def port_env(names: tuple[str, ...], ports: list[int]) -> dict[str, str]:
    env = {f"CSM_RAY_{name.upper()}_PORT": str(port) for name, port in zip(names, ports, strict=True)}
    env["CSM_RAY_MIN_WORKER_PORT"] = env["CSM_RAY_MAX_WORKER_PORT"] = "0"  # Ray picks free ones
    return env


def descendants(pid: int) -> set[int]:
    """`pid` and every process below it (Ray's workers start sessions of their own, so process
    groups do not find them; parenthood does)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                stat = (entry / "stat").read_text()
                children.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        current = todo.pop()
        found.add(current)
        todo += children.get(current, [])
    return found


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def wait_until(what: str, check, timeout_s: float, processes: list[subprocess.Popen], logs: list[Path]):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        for process, log in zip(processes, logs, strict=True):
            if process.poll() is not None:
                pytest.fail(
                    f"{what}: {log.name} exited with {process.returncode}:\n{log.read_text()[-4000:]}"
                )
        time.sleep(1)
    tails = "\n".join(f"--- {log.name}\n{log.read_text()[-3000:]}" for log in logs)
    pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}\n{tails}")


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
    head_ports = free_ports(len(PORT_NAMES))
    worker_ports = free_ports(len(NODE_PORT_NAMES))
    base = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "CSM_", "MODEL_", "MIMI_"))}
    base.update(
        PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        CSM_DEVICE="cpu",
        CSM_RAY_TEMP_DIR=str(temp),
        CSM_RAY_NUM_GPUS="0",
        CSM_RAY_OBJECT_STORE_BYTES=str(200 * 1024**2),
        CSM_STOP_GRACE_S="15",
        HISTORY_DIR=str(temp / "history"),
        CSM_TOKEN=secrets.token_hex(16),  # the task's secret, as ECS injects it: no token, no ingress
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=secrets.token_hex(32),
        RAY_USAGE_STATS_ENABLED="0",
        RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="2",  # production drains for 30 s; nothing to drain here
    )
    head_env = {
        **base,
        **port_env(PORT_NAMES, head_ports),
        "CSM_RAY_NUM_CPUS": "4",
        "SERVE_HTTP_HOST": "127.0.0.1",
        "CSM_METRICS_NAMESPACE": "CSM/Test",
        "CSM_METRICS_DRY_RUN": "1",
        "CSM_METRICS_INTERVAL_S": "2",
    }
    worker_env = {
        **base,
        **port_env(NODE_PORT_NAMES, worker_ports),
        "CSM_RAY_NUM_CPUS": "1",
        "CSM_RAY_HEAD": f"127.0.0.1:{head_env['CSM_RAY_GCS_PORT']}",
    }
    head_log, worker_log = temp / "head.log", temp / "worker.log"
    started: list[subprocess.Popen] = []
    seen: set[int] = set()
    try:
        with head_log.open("w") as h, worker_log.open("w") as w:
            head = subprocess.Popen(
                [sys.executable, str(ENTRYPOINT), "head"], env=head_env, stdout=h, stderr=subprocess.STDOUT
            )
            started.append(head)
            # Started at once, as ECS would: the worker waits until the head answers.
            worker = subprocess.Popen(
                [sys.executable, str(ENTRYPOINT), "worker"],
                env=worker_env,
                stdout=w,
                stderr=subprocess.STDOUT,
            )
            started.append(worker)
        logs = [head_log, worker_log]
        url = f"http://127.0.0.1:{head_env['CSM_RAY_SERVE_HTTP_PORT']}"

        def ready():
            with contextlib.suppress(httpx.HTTPError):
                response = httpx.get(f"{url}/readyz", timeout=15)
                if response.status_code == 200 and response.json().get("ready"):
                    return response.json()
            return None

        body = wait_until("/readyz", ready, 300, started, logs)
        assert body["random_weights"] is True  # no MODEL_PATH: the tiny preset, said loudly
        assert httpx.get(f"{url}/healthz", timeout=10).json() == {"ok": True}

        readings = wait_until(
            "the publisher to count both nodes",
            lambda: [r for r in published(head_log) if r["Nodes"] == 2],
            90,
            started,
            logs,
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
            seen |= descendants(process.pid)
            process.send_signal(signal.SIGTERM)
            assert process.wait(90) == 0, (head_log if process is head else worker_log).read_text()[-3000:]
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(alive(pid) for pid in seen):
            time.sleep(0.5)
        assert not [pid for pid in seen if alive(pid)], "Ray processes outlived their entry point"
    finally:
        for process in started:
            seen |= descendants(process.pid)
        for pid in seen:
            with contextlib.suppress(ProcessLookupError):
                if alive(pid):
                    os.kill(pid, signal.SIGKILL)
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
