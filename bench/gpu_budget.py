"""What the GPU run (bench/gpu.py) measures and how long it may take: the sizes of the CUDA run and of the
CPU dry run, and the clock that gives each section its deadline inside the run's budget."""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Sizes:
    """Everything that differs between the CUDA run and the CPU dry run."""

    preset: str
    codec_preset: str
    budget_s: float  # the whole run; sections stop early to stay inside it
    batches: tuple[int, ...]
    contexts: tuple[int, ...]  # prompt rows
    timed_frames: int  # pure frame steps timed per cell
    grid_prefill_chunk: int  # large, so every long prompt is in before its first stream runs out of room
    fp16_batches: tuple[int, ...]
    e2e_streams: int
    e2e_frames: int
    mimi_streams: tuple[int, ...]
    mimi_steps: int  # timed decoder steps of FRAMES_PER_CHUNK frames
    conversations: tuple[int, ...]
    reply_frames: int
    person_frames: tuple[int, int]  # the person's turn: that many frames of random codes (inclusive)
    voice_frames: int  # the voice's reference audio, a prefix shared by every conversation
    target_rows: int  # a conversation ends once its next prompt would be longer
    chat_prefill_chunk: int  # the engine's chunk in the conversations (CSMGenerator's default: 256)
    run_cap_s: float  # one conversation run at most
    stop_at_miss: bool  # end a run at its first reply slower than real time (saves the GPU's minutes)
    caps_s: dict[str, float] = field(default_factory=dict)  # per section; the last one gets what is left


GPU = Sizes(
    preset="csm-1b",
    codec_preset="mimi",
    budget_s=380,
    batches=(1, 8, 32, 64, 128),
    contexts=(200, 1800),
    timed_frames=24,
    grid_prefill_chunk=2048,
    fp16_batches=(1, 8, 32),
    e2e_streams=8,
    e2e_frames=48,
    mimi_streams=(1, 8, 32, 64, 128),
    mimi_steps=12,
    conversations=(8, 16, 32, 64, 128),
    reply_frames=40,
    person_frames=(25, 40),
    voice_frames=125,
    target_rows=1500,
    chat_prefill_chunk=256,
    run_cap_s=60,
    stop_at_miss=True,
    caps_s={"engine bf16": 110, "e2e": 25, "mimi": 35, "engine fp16": 70},
)

DRY = Sizes(
    preset="tiny",
    codec_preset="tiny",
    budget_s=100,
    batches=(1, 2),
    contexts=(200, 1800),
    timed_frames=2,
    grid_prefill_chunk=2048,
    fp16_batches=(1, 2),
    e2e_streams=2,
    e2e_frames=3,
    mimi_streams=(1, 2),
    mimi_steps=2,
    conversations=(2, 4),
    reply_frames=5,
    person_frames=(3, 5),
    voice_frames=8,
    target_rows=200,
    chat_prefill_chunk=64,
    run_cap_s=20,
    stop_at_miss=False,  # a loaded CPU is never real time: run every turn so each code path runs
)


class Clock:
    """The run's time budget; each section gets a deadline inside it."""

    def __init__(self, total_s: float) -> None:
        self.start = time.perf_counter()
        self.end = self.start + total_s

    def deadline(self, cap_s: float | None) -> float:
        now = time.perf_counter()
        return self.end if cap_s is None else min(self.end, now + cap_s)

    def left(self) -> float:
        return self.end - time.perf_counter()


class OutOfTime(RuntimeError):
    pass


def check_time(deadline: float, what: str) -> None:
    if time.perf_counter() > deadline:
        raise OutOfTime(f"out of time before {what}")
