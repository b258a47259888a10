"""`/v1/audio/speech` under concurrency: time to first byte and real-time factor at 1, 4 and 8 concurrent
requests (by default) on the CPU demo app (`serve_config.yaml`, started by bench/launch.py),
or on a running server (`--url`). Loopback only; every loop is bounded (`--requests` per client).

    .venv/bin/python bench/speech_api.py                    # the CPU demo, 1,4,8 concurrent
    .venv/bin/python bench/speech_api.py --concurrency 1,4 --requests 1 --url http://127.0.0.1:8000

Per request: TTFB (request sent → first audio byte) and RTF (its wall time / its audio's length). Per
level: aggregate RTF = the level's wall time / all the audio it made (below 1: the server speaks faster
than real time in all), and its throughput (audio seconds per second) as a ratio to the first level's,
measured in the same run: what batching across requests buys. Random weights never end a sentence early,
so the audio's length is the most the text allows (`serve_app.conversation.frames_for`); real weights end
sooner.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.launch import demo_config, free_port, start_app, stop_app
from bench.report import markdown, quantile
from csm.audio import SAMPLE_RATE

TEXT = "Hello, and welcome back. This is a short test of the speech endpoint. It sounds the same throughout."


@dataclass
class Result:
    ttfb_s: float
    wall_s: float
    audio_s: float


async def one(http: httpx.AsyncClient, url: str, token: str | None, text: str) -> Result:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    body = {"model": "csm-1b", "voice": "none", "input": text, "response_format": "pcm"}
    start = time.perf_counter()
    first, size = None, 0
    async with http.stream("POST", f"{url}/v1/audio/speech", json=body, headers=headers) as response:
        if response.status_code != 200:
            raise RuntimeError(f"{response.status_code}: {(await response.aread()).decode()[:200]}")
        async for chunk in response.aiter_bytes():
            if first is None and chunk:
                first = time.perf_counter() - start
            size += len(chunk)
    wall = time.perf_counter() - start
    return Result(first if first is not None else wall, wall, size / 2 / SAMPLE_RATE)


async def level(
    url: str, token: str | None, clients: int, requests: int, text: str
) -> tuple[list[Result], float]:
    async with httpx.AsyncClient(timeout=httpx.Timeout(300.0)) as http:

        async def client() -> list[Result]:
            return [await one(http, url, token, text) for _ in range(requests)]

        start = time.perf_counter()
        results = await asyncio.gather(*(client() for _ in range(clients)))
        return [r for rs in results for r in rs], time.perf_counter() - start


HEADER = (
    "concurrent",
    "requests",
    "TTFB p50 s",
    "TTFB p95 s",
    "RTF p50",
    "audio s",
    "wall s",
    "aggregate RTF",
    "throughput × 1",
)


async def run(url: str, token: str | None, levels: list[int], requests: int, text: str) -> list[list[str]]:
    async with httpx.AsyncClient(timeout=300.0) as http:
        await one(http, url, token, "Warm up.")  # first-use costs stay out of the table
    rows: list[list[str]] = []
    base: float | None = None  # audio seconds per wall second at the first level
    for n in levels:
        results, wall = await level(url, token, n, requests, text)
        audio = sum(r.audio_s for r in results)
        base = base or audio / wall
        rows.append(
            [
                str(n),
                str(len(results)),
                f"{quantile([r.ttfb_s for r in results], 50):.2f}",
                f"{quantile([r.ttfb_s for r in results], 95):.2f}",
                f"{statistics.median(r.wall_s / r.audio_s for r in results):.2f}",
                f"{audio:.1f}",
                f"{wall:.1f}",
                f"{wall / audio:.2f}",
                f"{audio / wall / base:.2f}",
            ]
        )
        print(markdown(HEADER, rows[-1:]), file=sys.stderr)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="a running server's base URL (default: start the CPU demo here)")
    parser.add_argument("--token", help="the server's token (the demo started here needs none)")
    parser.add_argument("--concurrency", default="1,4,8", help="comma-separated levels (at most 16)")
    parser.add_argument("--requests", type=int, default=2, help="requests per client at each level (1-10)")
    parser.add_argument("--text", default=TEXT)
    args = parser.parse_args(argv)
    levels = [int(x) for x in args.concurrency.split(",")]
    if not all(1 <= n <= 16 for n in levels) or not 1 <= args.requests <= 10:
        parser.error("levels are 1..16 concurrent requests, 1..10 requests per client")
    url = args.url
    try:
        if url is None:
            port = free_port()
            start_app(demo_config(port, tempfile.mkdtemp(prefix="speech_bench_"), None, None))
            url = f"http://127.0.0.1:{port}"
        rows = asyncio.run(run(url.rstrip("/"), args.token, levels, args.requests, args.text))
    finally:
        if args.url is None:
            stop_app()
    print(markdown(HEADER, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
