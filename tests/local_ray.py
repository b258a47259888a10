"""Ray nodes as ECS runs them, on this machine: `docker/entrypoint.py head` and `... worker` processes with
ports, addresses and a temp dir of their own, so they run beside any other Ray instance here.

Used by the entry points' test and the Spot drain test. Nothing here runs `ray stop` (which stops every
Ray instance on the machine): `Nodes` kills what it started, and what those started, by process id.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]
ENTRYPOINT = ROOT / "docker" / "entrypoint.py"
VENV_BIN = Path(sys.executable).parent

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


def node_env(temp: Path) -> dict[str, str]:
    """What every test node shares: this machine's Python, CPU, the random `tiny` weights (no
    MODEL_PATH), a small object store, and nothing of the caller's Ray or app settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "CSM_", "MODEL_", "MIMI_"))}
    env.update(
        PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        CSM_DEVICE="cpu",
        CSM_RAY_TEMP_DIR=str(temp),
        CSM_RAY_NUM_GPUS="0",
        CSM_RAY_OBJECT_STORE_BYTES=str(200 * 1024**2),
        CSM_STOP_GRACE_S="15",
        HISTORY_DIR=str(temp / "history"),
        CSM_TOKEN=secrets.token_hex(16),  # the task's secret, as ECS injects it: no token, no ingress
        RAY_USAGE_STATS_ENABLED="0",
        RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="2",  # production drains for 30 s; nothing to drain here
    )
    return env


def head_env(base: dict[str, str]) -> dict[str, str]:
    return {**base, **port_env(PORT_NAMES, free_ports(len(PORT_NAMES))), "SERVE_HTTP_HOST": "127.0.0.1"}


def worker_env(base: dict[str, str], head: dict[str, str]) -> dict[str, str]:
    return {
        **base,
        **port_env(NODE_PORT_NAMES, free_ports(len(NODE_PORT_NAMES))),
        "CSM_RAY_HEAD": f"127.0.0.1:{head['CSM_RAY_GCS_PORT']}",
    }


class Nodes:
    """`with Nodes(temp) as nodes:` `nodes.start("head", env)` runs an entry point, its output in
    temp/<name>.log; on leaving, everything they started is killed."""

    def __init__(self, temp: Path) -> None:
        self.temp = temp
        self.processes: list[subprocess.Popen] = []
        self.logs: list[Path] = []
        self.seen: set[int] = set()

    def start(self, role: str, env: dict[str, str], name: str | None = None) -> subprocess.Popen:
        log = self.temp / f"{name or role}.log"
        with log.open("w") as out:
            process = subprocess.Popen(
                [sys.executable, str(ENTRYPOINT), role], env=env, stdout=out, stderr=subprocess.STDOUT
            )
        self.processes.append(process)
        self.logs.append(log)
        return process

    def wait_until(self, what: str, check, timeout_s: float, *, watch: list[subprocess.Popen] | None = None):
        """`check()`'s first truthy result; fails at the timeout, or when a watched node exits (all of
        them unless `watch` says which)."""
        watched = self.processes if watch is None else watch
        pairs = [(p, log) for p, log in zip(self.processes, self.logs, strict=True) if p in watched]
        return wait_until(what, check, timeout_s, [p for p, _ in pairs], [log for _, log in pairs])

    def tails(self, chars: int = 3000) -> str:
        return "\n".join(f"--- {log.name}\n{log.read_text()[-chars:]}" for log in self.logs)

    def stop(self, process: subprocess.Popen, timeout_s: float = 90) -> int:
        """SIGTERM, as ECS stops a task; the exit status."""
        self.seen |= descendants(process.pid)
        process.send_signal(signal.SIGTERM)
        return process.wait(timeout_s)

    def __enter__(self) -> Nodes:
        return self

    def __exit__(self, *exc) -> None:
        for process in self.processes:
            self.seen |= descendants(process.pid)
        for pid in self.seen:
            with contextlib.suppress(ProcessLookupError):
                if alive(pid):
                    os.kill(pid, signal.SIGKILL)


def wait_gone(pids: set[int], timeout_s: float = 30) -> list[int]:
    """The pids still alive after up to `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and any(alive(pid) for pid in pids):
        time.sleep(0.5)
    return [pid for pid in pids if alive(pid)]


def ready(url: str) -> dict | None:
    """/readyz's body once the app says it is ready."""
    with contextlib.suppress(httpx.HTTPError):
        response = httpx.get(f"{url}/readyz", timeout=15)
        if response.status_code == 200 and response.json().get("ready"):
            return response.json()
    return None
