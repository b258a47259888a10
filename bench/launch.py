"""The one way the benchmarks start the app: `serve_config.yaml` deployed as `serve run` deploys it.

`demo_config` is the file with our port, history folder, token, admission limit and ASR mode (what
`make demo` runs, with per-deployment options kept); a benchmark changes what it measures in the dict
(`config_args`) before `start_app`. Ray's workers run at nice 0 here (`RAY_worker_niceness`), not Ray's
default 15: the benchmarks' clients run on the same cores at nice 0 and would starve the server (a real
server has no load generator on its cores). There is no dashboard. SIGTERM stops a benchmark as Ctrl-C
does (`stop_on_sigterm`), so its `finally` shuts Ray down and it prints what it finished.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY_TIMEOUT_S = 600.0
SETTLE_TIMEOUT_S = 60.0  # waiting for the previous run's conversations to end on the server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def demo_config(
    port: int,
    history: str,
    token: str | None,
    max_conversations: int | None,
    asr: str = "streaming",
    recognizers: int | None = None,
) -> dict:
    """serve_config.yaml with our port, history folder, token, admission limit, ASR mode and
    SpeechRecognizer replica count (None: the file's)."""
    config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    config["http_options"] = {"host": "127.0.0.1", "port": port}
    ingress = config_args(config).setdefault("ingress", {})
    ingress["history_dir"] = history
    if token:
        ingress["token"] = token
    else:
        ingress["allow_anonymous"] = True  # loopback only: as `make demo`, which sets CSM_ALLOW_ANONYMOUS
    if max_conversations is not None:
        ingress["max_conversations"] = max_conversations
    ingress["streaming_asr"] = asr == "streaming"
    if recognizers is not None:
        (app,) = config["applications"]
        (options,) = [d for d in app["deployments"] if d["name"] == "SpeechRecognizer"]
        options["num_replicas"] = recognizers
    return config


def config_args(config: dict) -> dict:
    """The args of the config's one application (`serve_app.app:build_app`'s), to change in place."""
    (app,) = config["applications"]
    return app["args"]


def app_name(config: dict) -> str:
    (app,) = config["applications"]
    return app["name"]


def start_app(config: dict) -> str:
    """Start Ray and deploy `config` as `serve run <config file>` does, deployments' options included;
    returns the app's ws://…/v1/realtime URL once it runs."""
    import ray
    from ray import serve
    from ray.serve._private import api
    from ray.serve._private.constants import SERVE_NAMESPACE
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(config)
    os.environ.setdefault("RAY_worker_niceness", "0")
    ray.init(namespace=SERVE_NAMESPACE, include_dashboard=False, log_to_driver=False, configure_logging=False)
    stop_on_sigterm()  # again: ray.init installs its own handler
    # `serve.run` takes an Application and would drop the YAML's per-deployment options (ongoing-request
    # limits, batch sizes): deploy the config itself, with the calls `serve run` makes (ray/serve/scripts.py).
    client = api.serve_start(
        http_options=schema.http_options.model_dump(), proxy_location=schema.proxy_location
    )
    client.deploy_apps(schema)
    name = schema.applications[0].name
    deadline = time.monotonic() + DEPLOY_TIMEOUT_S
    while time.monotonic() < deadline:
        status = serve.status().applications.get(name)
        if status is not None and status.status == "RUNNING":
            return f"ws://127.0.0.1:{config['http_options']['port']}/v1/realtime"
        if status is not None and status.status == "DEPLOY_FAILED":
            raise RuntimeError(f"the app failed to deploy: {status.message}")
        time.sleep(1)
    raise TimeoutError(f"the app was not running after {DEPLOY_TIMEOUT_S:.0f} s")


def stop_app() -> None:
    import ray
    from ray import serve

    try:
        if ray.is_initialized():
            serve.shutdown()
    finally:
        ray.shutdown()


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # the same cleanup as Ctrl-C: clients closed, Ray shut down


def stop_on_sigterm() -> None:
    signal.signal(signal.SIGTERM, _interrupt)


def http_base(ws_url: str) -> str:
    """ws://host:port/… → http://host:port (wss → https)."""
    parts = urlsplit(ws_url)
    return urlunsplit(("https" if parts.scheme == "wss" else "http", parts.netloc, "", "", ""))


async def readyz(base: str) -> dict[str, Any] | None:
    """The app's /readyz body, None when it is not ready (or not answering)."""
    try:
        async with httpx.AsyncClient(timeout=15) as client:
            r = await client.get(f"{base}/readyz")
        return r.json() if r.status_code == 200 else None
    except (httpx.HTTPError, ValueError):
        return None


async def settle(base: str) -> None:
    """Wait (bounded) until the server holds no conversation, so each run starts from an idle server."""
    deadline = time.perf_counter() + SETTLE_TIMEOUT_S
    while time.perf_counter() < deadline:
        ready = await readyz(base)
        if ready is not None and ready.get("conversations", 0) == 0:
            return
        await asyncio.sleep(1)
