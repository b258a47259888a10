"""What one Serve call between deployments costs in CPU, with Serve's defaults and with the app's
`serve_app.app.REPLICA_ENV`, measured in one run.

    RAY_worker_niceness=0 python bench/serve_calls.py            # 2 rounds of 1,000 calls per setting

A caller replica awaits 1,000 calls in a row on a callee replica, each carrying what the ingress sends the
recognizer and the encoder while a person speaks (a 640 ms int16 chunk, `serve_app.speech.ENCODE_CHUNK`,
with a multiplexed stream id), and the callee answers a short string at once. Per setting: CPU of the
caller's and the callee's processes per call (from /proc, so every thread of each counts), and wall time
per call; the ratio is against Serve's defaults in the same run. The two settings alternate, round by
round, in one local Ray cluster (2 CPUs).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from datetime import datetime
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ray
from ray import serve

from bench.report import machine_line, markdown
from serve_app.app import REPLICA_ENV
from serve_app.speech import ENCODE_CHUNK

CALLS = 1000


@serve.deployment(ray_actor_options={"num_cpus": 0}, logging_config={"enable_access_log": False})
class Callee:
    async def push(self, start: int, pcm: np.ndarray, final: bool = False) -> str:
        return "so far"

    def pid(self) -> int:
        return os.getpid()


@serve.deployment(ray_actor_options={"num_cpus": 0})
class Caller:
    def __init__(self, callee) -> None:
        self.callee = callee.options(multiplexed_model_id="stream-1")

    async def run(self, calls: int) -> float:
        """Wall seconds for `calls` calls, one after another."""
        pcm = np.zeros(ENCODE_CHUNK, np.int16)
        began = time.perf_counter()
        for i in range(calls):
            await self.callee.push.remote(i * pcm.size, pcm)
        return time.perf_counter() - began

    async def pids(self) -> tuple[int, int]:
        return os.getpid(), await self.callee.pid.remote()


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def measure(handle, pids: tuple[int, int], calls: int) -> tuple[float, float, float]:
    """(caller CPU, callee CPU, wall) per call, in seconds."""
    before = [cpu_seconds(p) for p in pids]
    wall = handle.run.remote(calls).result()
    after = [cpu_seconds(p) for p in pids]
    return (after[0] - before[0]) / calls, (after[1] - before[1]) / calls, wall / calls


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    settings = {"Serve's defaults": {}, "REPLICA_ENV (the app's)": REPLICA_ENV}
    handles = {}
    try:
        for i, (name, env) in enumerate(settings.items()):
            actor = {"num_cpus": 0, "runtime_env": {"env_vars": env}}
            app = Caller.options(ray_actor_options=actor).bind(Callee.options(ray_actor_options=actor).bind())
            handle = serve.run(app, name=f"calls{i}", route_prefix=None)
            pids = handle.pids.remote().result()
            handle.run.remote(50).result()  # warm: routers, connections
            handles[name] = (handle, pids)
        totals = {name: np.zeros(3) for name in settings}
        for _ in range(args.rounds):
            for name, (handle, pids) in handles.items():
                totals[name] += measure(handle, pids, CALLS)
    finally:
        serve.shutdown()
        ray.shutdown()
    base = totals["Serve's defaults"][:2].sum()
    rows = []
    for name, total in totals.items():
        caller, callee, wall = total / args.rounds * 1000
        rows.append([name, f"{caller:.2f}", f"{callee:.2f}", f"{caller + callee:.2f}", f"{wall:.2f}"])
        rows[-1].append(f"{total[:2].sum() / base:.2f}")
    print(machine_line())
    print(f"# date: {datetime.now().astimezone():%Y-%m-%d %H:%M %Z}; command: python bench/serve_calls.py")
    print(f"# {args.rounds} rounds of {CALLS} calls a setting, alternating; {ENCODE_CHUNK} samples a call\n")
    header = ["setting", "caller CPU ms", "callee CPU ms", "both ms", "wall ms", "CPU vs defaults"]
    print(markdown(header, rows, left={0}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
