"""The container's health check: `healthcheck.py [--head]`, exit 0 when healthy (Dockerfile.gpu's
HEALTHCHECK and the ECS task definitions run it).

It asks Ray's own health endpoints, which need no token: the local raylet (the dashboard agent's
`/api/local_raylet_healthz`) on every node, and with `--head` the GCS too (the dashboard's
`/api/gcs_healthz`, which only the head runs). It does not ask the Serve app: a head whose app is
still loading weights, or waiting for them to be uploaded, is healthy, and replacing it would not help.
The standard library only, so each check costs a few milliseconds, not a Ray import.
"""

from __future__ import annotations

import os
import socket
import sys
import urllib.request

TIMEOUT_S = 4.0


def node_ip() -> str:
    """The address Ray binds on this node: the one the default route leaves from (no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("203.0.113.1", 80))
            return s.getsockname()[0]
        except OSError:
            return "127.0.0.1"


def ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
            return response.status == 200
    except OSError:
        return False


def healthy(head: bool, env: dict[str, str]) -> bool:
    agent = int(env.get("CSM_RAY_DASHBOARD_AGENT_LISTEN_PORT") or 52365)
    dashboard = int(env.get("CSM_RAY_DASHBOARD_PORT") or 8265)
    raylet = any(ok(f"http://{host}:{agent}/api/local_raylet_healthz") for host in ("127.0.0.1", node_ip()))
    if not head:
        return raylet
    return raylet and ok(f"http://127.0.0.1:{dashboard}/api/gcs_healthz")


def main(argv: list[str]) -> int:
    if argv[1:] not in ([], ["--head"]):
        print("usage: healthcheck.py [--head]", file=sys.stderr)
        return 2
    head = argv[1:] == ["--head"]
    if healthy(head, dict(os.environ)):
        return 0
    print(
        f"unhealthy: the Ray {'head' if head else 'node'} does not answer its health checks", file=sys.stderr
    )
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
