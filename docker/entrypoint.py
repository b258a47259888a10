"""The container's entry point: `entrypoint.py head` or `entrypoint.py worker` (see Dockerfile.gpu).

- `head` starts the Ray head (GCS, dashboard on loopback only), the CloudWatch publisher
  (`serve_app.cloudwatch_metrics`) that the worker service scales on and, when `CSM_DRAIN_QUEUE_URL`
  names the Spot notices' queue, the drain handler (`serve_app.node_drain`), waits for the weights to be
  on EFS, then `serve deploy`s `serve_config.yaml` with the production overrides of
  `serve_config.prod.yaml` merged in.
- `worker` waits until the head answers, then joins it (`ray start --address`).

Both run `ray start --block` as a child in its own session and stay in the foreground: when any Ray
process dies, `ray start --block` exits, and so does this script, so ECS replaces the task. On SIGTERM
(ECS stopping the task) `ray start` is told to stop (it drains the node first), and whatever is left of
its session is killed after a grace period. `ray stop` is never used: it stops every Ray instance on the
machine, not just ours.

Every port is fixed (the security group allows Ray's ports between the cluster's tasks) and can be
changed through `CSM_RAY_<NAME>_PORT` variables, which the tests use to run beside other Ray instances.
The standard library only, plus PyYAML for the Serve config: this runs before anything else is up.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import yaml

log = logging.getLogger("entrypoint")

APP_ROOT = Path(os.environ.get("CSM_APP_ROOT", Path(__file__).resolve().parents[1]))
# How long `ray start` may take to stop after SIGTERM (it drains the node for up to 30 s first) before its
# processes are killed. ECS waits the container's stopTimeout (120 s) before killing the task.
STOP_GRACE_S = float(os.environ.get("CSM_STOP_GRACE_S", "45"))


@dataclass(frozen=True)
class Ports:
    """Ray's listening ports. Defaults are Ray's own where it has one, fixed where Ray would pick at
    random, so that the security group and the health check know them."""

    gcs: int = 6379
    dashboard: int = 8265
    client_server: int = 10001
    node_manager: int = 6380
    object_manager: int = 6381
    metrics_export: int = 8080
    dashboard_agent_listen: int = 52365
    dashboard_agent_grpc: int = 52366
    runtime_env_agent: int = 52367
    min_worker: int = 10002
    max_worker: int = 10999
    serve_http: int = 8000

    @classmethod
    def from_env(cls, env: dict[str, str]) -> Ports:
        values = {}
        for name in cls.__dataclass_fields__:
            raw = env.get(f"CSM_RAY_{name.upper()}_PORT")
            if raw:
                values[name] = int(raw)
        return cls(**values)


def ray_start_args(role: str, ports: Ports, env: dict[str, str]) -> list[str]:
    """`ray start` for this node. The dashboard listens on loopback only: it has no authentication of
    its own beyond Ray's token, and nothing outside the task needs it (`serve deploy` runs here)."""
    args = [
        "ray",
        "start",
        "--block",
        "--disable-usage-stats",
        f"--node-manager-port={ports.node_manager}",
        f"--object-manager-port={ports.object_manager}",
        f"--metrics-export-port={ports.metrics_export}",
        f"--dashboard-agent-listen-port={ports.dashboard_agent_listen}",
        f"--dashboard-agent-grpc-port={ports.dashboard_agent_grpc}",
        f"--runtime-env-agent-port={ports.runtime_env_agent}",
        f"--min-worker-port={ports.min_worker}",
        f"--max-worker-port={ports.max_worker}",
    ]
    if role == "head":
        args += [
            "--head",
            f"--port={ports.gcs}",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={ports.dashboard}",
            f"--ray-client-server-port={ports.client_server}",
        ]
    else:
        args.append(f"--address={head_address(env, ports)}")
    for option, variable in (
        ("--num-cpus", "CSM_RAY_NUM_CPUS"),
        ("--num-gpus", "CSM_RAY_NUM_GPUS"),
        ("--object-store-memory", "CSM_RAY_OBJECT_STORE_BYTES"),
        ("--temp-dir", "CSM_RAY_TEMP_DIR"),
        # Neither is needed on ECS (Ray finds the task's address; a GPU is a GPU); tests use them to run
        # several nodes on one machine, each with an address and a placement of its own.
        ("--node-ip-address", "CSM_RAY_NODE_IP"),
        ("--resources", "CSM_RAY_RESOURCES"),
    ):
        if env.get(variable):
            args.append(f"{option}={env[variable]}")
    return args


def head_address(env: dict[str, str], ports: Ports) -> str:
    """The head's GCS address: `CSM_RAY_HEAD` (the head's Cloud Map name in ECS), port optional."""
    head = env.get("CSM_RAY_HEAD")
    if not head:
        raise SystemExit("CSM_RAY_HEAD is not set: a worker needs the head's address (host or host:port)")
    return head if ":" in head else f"{head}:{ports.gcs}"


# ---- the Serve config -------------------------------------------------------------------------------------
def merge(base: object, override: object) -> object:
    """`override` over `base`: mappings key by key, lists of named mappings (`applications`,
    `deployments`) item by item by `name`, anything else replaced."""
    if isinstance(base, dict) and isinstance(override, dict):
        merged = dict(base)
        for key, value in override.items():
            merged[key] = merge(base[key], value) if key in base else value
        return merged
    if isinstance(base, list) and isinstance(override, list) and _named(base) and _named(override):
        by_name = {item["name"]: item for item in base}
        merged_list = [merge(item, _find(override, item["name"]) or {}) for item in base]
        merged_list += [item for item in override if item["name"] not in by_name]
        return merged_list
    return override


def _named(items: list) -> bool:
    return all(isinstance(item, dict) and "name" in item for item in items)


def _find(items: list[dict], name: str) -> dict | None:
    return next((item for item in items if item["name"] == name), None)


def production_config(env: dict[str, str], ports: Ports) -> dict:
    """serve_config.yaml + serve_config.prod.yaml (+ the HTTP port and host from the environment)."""
    base = yaml.safe_load((APP_ROOT / env.get("SERVE_CONFIG", "serve_config.yaml")).read_text())
    overlay_name = env.get("SERVE_CONFIG_OVERLAY", "serve_config.prod.yaml")
    overlay = yaml.safe_load((APP_ROOT / overlay_name).read_text()) if overlay_name else {}
    config = merge(base, overlay or {})
    http = config.setdefault("http_options", {})
    http["port"] = ports.serve_http
    http["host"] = env.get("SERVE_HTTP_HOST", http.get("host", "0.0.0.0"))
    return config


# ---- processes ---------------------------------------------------------------------------------------------
class RaySession:
    """`ray start --block` in a session of its own, so one signal reaches all of its processes."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        log.info("starting: %s", " ".join(args))
        self.process = subprocess.Popen(args, env=env, start_new_session=True)

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> None:
        """SIGTERM to `ray start` (which drains the node, then stops its processes), then SIGKILL to
        whatever of the session is left. Ray's workers run in sessions of their own and exit when
        their raylet does."""
        if self.alive():
            self.process.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(STOP_GRACE_S)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()


class _Stop(Exception):
    """Raised by the SIGTERM/SIGINT handler to unwind to the cleanup in `main`."""


def _on_signal(signum: int, _frame: FrameType | None) -> None:
    # One stop is enough: a second signal must not interrupt the cleanup the first one started.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise _Stop(signal.Signals(signum).name)


def wait_for(what: str, ready, timeout_s: float, every_s: float = 2.0, alive=lambda: True) -> None:
    """Poll `ready()` until it is true; give up after `timeout_s` or when `alive()` turns false."""
    deadline = time.monotonic() + timeout_s
    while not ready():
        if not alive():
            raise SystemExit(f"gave up waiting for {what}: Ray exited")
        if time.monotonic() > deadline:
            raise SystemExit(f"gave up waiting for {what} after {timeout_s:.0f} s")
        time.sleep(every_s)


def reachable(address: str) -> bool:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=3):
            return True
    except OSError:
        return False


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=3) as response:
            return response.status == 200
    except OSError:
        return False


def weights_present(env: dict[str, str]) -> bool:
    """True when `MODEL_PATH` is unset (the random `tiny` preset) or holds a checkpoint's config.json."""
    model_path = env.get("MODEL_PATH")
    return not model_path or (Path(model_path) / "config.json").is_file()


def serve_deploy(config: dict, ports: Ports, env: dict[str, str], workdir: Path) -> bool:
    path = workdir / "serve_config.deployed.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    address = f"http://127.0.0.1:{ports.dashboard}"
    result = subprocess.run(["serve", "deploy", str(path), "--address", address], env=env, check=False)
    return result.returncode == 0


def start_sidecars(ports: Ports, env: dict[str, str]) -> list[subprocess.Popen]:
    """The head's helpers, each when configured: the CloudWatch publisher (`CSM_METRICS_NAMESPACE` names
    where to publish) and the Spot drain handler (`CSM_DRAIN_QUEUE_URL` names the notices' queue)."""
    started = []
    if env.get("CSM_METRICS_NAMESPACE"):
        discovery = Path(env.get("CSM_RAY_TEMP_DIR", "/tmp/ray")) / "prom_metrics_service_discovery.json"
        started.append(
            _python_module("serve_app.cloudwatch_metrics", ["--discovery-file", str(discovery)], env)
        )
    else:
        log.info("CSM_METRICS_NAMESPACE is not set: no CloudWatch metrics")
    if env.get("CSM_DRAIN_QUEUE_URL"):
        started.append(
            _python_module("serve_app.node_drain", ["--gcs-address", f"127.0.0.1:{ports.gcs}"], env)
        )
    else:
        log.info("CSM_DRAIN_QUEUE_URL is not set: no Spot drain handler")
    return started


def _python_module(module: str, args: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", module, *args], env=env, cwd=APP_ROOT)


# ---- the two roles -----------------------------------------------------------------------------------------
def run_head(env: dict[str, str], ports: Ports, workdir: Path) -> int:
    config = production_config(env, ports)  # fail before starting anything if the config is broken
    ray = RaySession(ray_start_args("head", ports, env), env)
    sidecars: list[subprocess.Popen] = []
    try:
        gcs_health = f"http://127.0.0.1:{ports.dashboard}/api/gcs_healthz"
        wait_for("the Ray head", lambda: http_ok(gcs_health), 300, alive=ray.alive)
        sidecars = start_sidecars(ports, env)  # from now on: the alarms watch for the publisher's metrics
        if not weights_present(env):
            log.warning("waiting for weights: %s/config.json is not there yet", env["MODEL_PATH"])
        wait_for("the weights", lambda: weights_present(env), float("inf"), every_s=30, alive=ray.alive)
        wait_for("serve deploy", lambda: serve_deploy(config, ports, env, workdir), 300, 5, ray.alive)
        log.info("Serve config submitted; the app comes up as its replicas start")
        return ray.process.wait()
    finally:
        for sidecar in sidecars:
            sidecar.terminate()
        for sidecar in sidecars:
            with contextlib.suppress(subprocess.TimeoutExpired):
                sidecar.wait(5)
        ray.stop()


def run_worker(env: dict[str, str], ports: Ports) -> int:
    address = head_address(env, ports)
    log.info("waiting for the head at %s", address)
    wait_for(f"the head at {address}", lambda: reachable(address), 900, every_s=5)
    ray = RaySession(ray_start_args("worker", ports, env), env)
    try:
        return ray.process.wait()
    finally:
        ray.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("role", choices=("head", "worker"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    env = dict(os.environ)
    ports = Ports.from_env(env)
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    workdir = Path(tempfile.mkdtemp(prefix="csm-entrypoint-"))
    try:
        return run_head(env, ports, workdir) if args.role == "head" else run_worker(env, ports)
    except _Stop as stop:
        log.info("%s: stopping Ray", stop)
        return 0
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
