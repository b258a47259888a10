"""What the calls that carry a person's audio cost in CPU, by chunk size: the ingress sends each turn to
the encoder and the recognizer `serve_app.speech.ENCODE_CHUNK` at a time (640 ms; 320 ms before).

    RAY_worker_niceness=0 python bench/serve_calls.py            # 2 rounds of 1,000 calls per size

A caller replica awaits 1,000 calls in a row on a callee replica, each carrying one chunk of int16 audio
with a multiplexed stream id (as `push` on `AudioTokenizer` and `SpeechRecognizer` takes it), and the
callee answers a short string at once: what is measured is Serve's share, not a model's. Per size: CPU of
the caller's and the callee's processes per call (from /proc, so every thread of each counts), wall time
per call, and CPU per second of audio sent, with its ratio against 320 ms chunks in the same run. The
sizes alternate, round by round, in one local Ray cluster (2 CPUs). Serve's defaults throughout: with
RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD=0 and RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP=0 on both replicas,
calls of 640 ms cost 0.96-0.97 of the CPU (bench/RESULTS.md), too little to give up Serve's default of
user code on a loop of its own.
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

from bench.load_procs import cpu_seconds
from bench.report import machine_line, markdown
from csm.audio import FRAME_MS, FRAME_SIZE, SAMPLE_RATE
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

    async def run(self, calls: int, samples: int) -> float:
        """Wall seconds for `calls` calls of `samples` int16 samples, one after another."""
        pcm = np.zeros(samples, np.int16)
        began = time.perf_counter()
        for i in range(calls):
            await self.callee.push.remote(i * pcm.size, pcm)
        return time.perf_counter() - began

    async def pids(self) -> tuple[int, int]:
        return os.getpid(), await self.callee.pid.remote()


def measure(handle, pids: tuple[int, int], calls: int, samples: int) -> tuple[float, float, float]:
    """(caller CPU, callee CPU, wall) per call, in seconds."""
    before = [cpu_seconds(p) for p in pids]
    wall = handle.run.remote(calls, samples).result()
    after = [cpu_seconds(p) for p in pids]
    return (after[0] - before[0]) / calls, (after[1] - before[1]) / calls, wall / calls


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    sizes = {f"{n * FRAME_MS} ms": n * FRAME_SIZE for n in (4, ENCODE_CHUNK // FRAME_SIZE)}
    try:
        handle = serve.run(Caller.bind(Callee.bind()), name="calls", route_prefix=None)
        pids = handle.pids.remote().result()
        handle.run.remote(50, ENCODE_CHUNK).result()  # warm: routers, connections
        totals = {name: np.zeros(3) for name in sizes}
        for _ in range(args.rounds):
            for name, samples in sizes.items():
                totals[name] += measure(handle, pids, CALLS, samples)
    finally:
        serve.shutdown()
        ray.shutdown()
    per_audio_s = {name: totals[name][:2].sum() / args.rounds * SAMPLE_RATE / sizes[name] for name in sizes}
    base = next(iter(per_audio_s.values()))
    rows = []
    for name, total in totals.items():
        caller, callee, wall = total / args.rounds * 1000
        cells = [f"{caller:.2f}", f"{callee:.2f}", f"{caller + callee:.2f}", f"{wall:.2f}"]
        rows.append([name, *cells, f"{per_audio_s[name] * 1000:.1f}", f"{per_audio_s[name] / base:.2f}"])
    print(machine_line())
    print(f"# date: {datetime.now().astimezone():%Y-%m-%d %H:%M %Z}; command: python bench/serve_calls.py")
    print(f"# {args.rounds} rounds of {CALLS} calls per chunk size, alternating\n")
    header = ["chunk", "caller CPU ms", "callee CPU ms", "both ms", "wall ms", "CPU ms per audio s", "ratio"]
    print(markdown(header, rows, left={0}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
