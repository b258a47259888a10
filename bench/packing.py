"""Which CPU matmuls to prepack for oneDNN: every one (the old path) against only those of at least
`csm.model.PACK_MIN_WEIGHTS` weights (the engine's default), in one process; frame steps and a prefill.

    python bench/packing.py                          # `tiny` (the demo's) and `small`, 1/4/8 streams
    python bench/packing.py --presets tiny --streams 1,8 --frames 100

A packed oneDNN call pays ~20 us of its own overhead where a dense one pays ~3 us, and saves the weight's
re-layout, which only a large matrix repays. Per preset and side: the median frame step (`Engine.step`
with every stream in the batch; one torch thread, as a replica runs it) at each stream count, and the
median of a 256-row prefill step with its first frame (two threads, as `prefill_threads` gives it), then
the old ÷ new ratios (above 1: the threshold is faster). The sides alternate frame by frame, so a busy
machine weighs on both alike. Needs only torch (no Ray), with the repository on PYTHONPATH.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.engine import make_prompts
from bench.report import machine_line, markdown
from csm.engine import Engine, EngineConfig, SamplingParams
from csm.loading import random_model
from csm.model import PACK_MIN_WEIGHTS, Linear
from csm.sampling import TEMPERATURE, TOP_K

SIDES = {"every matrix packed": 0, f"packed from {PACK_MIN_WEIGHTS:,} weights": PACK_MIN_WEIGHTS}
PREFILL_ROWS = 256


def engine_for(preset: str, min_weights: int, slots: int) -> Engine:
    model = random_model(preset).model.pack_cpu(min_weights)  # `setup` keeps what is packed already
    return Engine(model, EngineConfig(max_slots=slots, prefill_chunk=PREFILL_ROWS, prefill_threads=2)).setup()


def packed_share(engine: Engine) -> str:
    linears = [m for m in engine.model.modules() if isinstance(m, Linear)]
    return f"{sum(m.packed is not None for m in linears)}/{len(linears)}"


def add_streams(engine: Engine, n: int, frames: int, rows: int, seed: int) -> None:
    """n streams of `frames` frames, after `rows` frames of heard audio (bench/engine.py's prompts)."""
    for i, p in enumerate(make_prompts(engine.args, n, rows, frames)):
        engine.add(p.tokens, p.mask, frames, SamplingParams(TEMPERATURE, TOP_K, seed=seed + i))


def frame_steps(engines: list[Engine], streams: int, frames: int) -> list[list[float]]:
    """Per engine, the times of its frame steps with every stream in the batch, steps interleaved."""
    for e in engines:
        add_streams(e, streams, frames + 8, 60, seed=streams)
    times: list[list[float]] = [[] for _ in engines]
    while any(e.has_work for e in engines):
        for e, out in zip(engines, times, strict=True):
            if not e.has_work:
                continue
            prefills = e.stats.prefill_steps
            t0 = time.perf_counter()
            e.step()
            dt = time.perf_counter() - t0
            if e.stats.prefill_steps == prefills and e.stats.batch_sizes[-1] == streams:
                out.append(dt)
    return times


def prefills(engines: list[Engine], repeats: int) -> list[list[float]]:
    """Per engine, `repeats` times of one PREFILL_ROWS-row prompt's prefill step and first frame."""
    times: list[list[float]] = [[] for _ in engines]
    for r in range(repeats):
        for e, out in zip(engines, times, strict=True):
            add_streams(e, 1, 1, PREFILL_ROWS - 40, seed=1000 + r)  # with its text rows: ~PREFILL_ROWS
            t0 = time.perf_counter()
            while e.has_work:
                e.step()
            out.append(time.perf_counter() - t0)
    return times


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", default="tiny,small")
    ap.add_argument("--streams", default="1,4,8")
    ap.add_argument("--frames", type=int, default=60, help="frame steps per stream count")
    ap.add_argument("--prefills", type=int, default=10)
    args = ap.parse_args()
    torch.set_num_threads(1)
    counts = [int(s) for s in args.streams.split(",")]
    names = list(SIDES)
    header = ["preset", "what", *names, "old ÷ new"]
    rows = []
    for preset in args.presets.split(","):
        engines = [engine_for(preset, m, max(counts)) for m in SIDES.values()]
        rows.append([preset, "linears packed", *(packed_share(e) for e in engines), ""])
        for n in counts:
            medians = [statistics.median(t) for t in frame_steps(engines, n, args.frames)]
            rows.append(
                [preset, f"frame step ms, {n} streams", *(f"{m * 1000:.1f}" for m in medians),
                 f"{medians[0] / medians[1]:.2f}"]
            )  # fmt: skip
        medians = [statistics.median(t) for t in prefills(engines, args.prefills)]
        rows.append(
            [preset, f"{PREFILL_ROWS}-row prefill + frame ms", *(f"{m * 1000:.1f}" for m in medians),
             f"{medians[0] / medians[1]:.2f}"]
        )  # fmt: skip
    print(machine_line())
    print(f"# torch threads 1 (prefill 2), cpu float32, random weights; medians over {args.frames} frame "
          f"steps per stream count and {args.prefills} prefills; sides interleaved")  # fmt: skip
    print(markdown(header, rows, left={0, 1}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
