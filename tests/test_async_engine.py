"""The asyncio front: frames stream to each consumer as made; leaving early cancels and frees the slot."""

from __future__ import annotations

import asyncio
import os
import sys
import threading

import numpy as np
import pytest
import torch

from csm.async_engine import AsyncEngine, chunks, item_frames
from csm.audio import FRAME_SECONDS
from csm.engine import Engine, EngineConfig, EngineFull, SamplingParams
from csm.loading import random_model
from csm.prompt import PromptBuilder, Segment
from csm.tokenizer import ByteTokenizer


@pytest.fixture(scope="module")
def model():
    return random_model("tiny", seed=1).model


@pytest.fixture
def engine(model):
    eng = AsyncEngine(Engine(model, EngineConfig(max_slots=2)))
    yield eng
    eng.close()


def prompt(model, text):
    ctx = [Segment(0, "context", torch.randint(0, 2048, (3, 32), generator=torch.Generator().manual_seed(0)))]
    return PromptBuilder(ByteTokenizer(), model.args).build(ctx, 1, text, 16)


async def collect(engine, p, frames, seed):
    return [f async for f in engine.generate(p.tokens, p.mask, frames, SamplingParams(seed=seed))]


async def test_concurrent_streams_get_their_own_frames(engine, model):
    p1, p2 = prompt(model, "first"), prompt(model, "second")
    a, b = await asyncio.wait_for(asyncio.gather(collect(engine, p1, 6, 1), collect(engine, p2, 9, 2)), 60)
    assert len(a) == 6 and len(b) == 9
    assert all(f.shape == (32,) and f.dtype == np.int64 for f in a + b)
    again = await asyncio.wait_for(collect(engine, p1, 6, 1), 60)
    np.testing.assert_array_equal(np.stack(again), np.stack(a))  # same seed, same frames
    assert max(engine.engine.stats.batch_sizes) == 2


async def test_a_reply_streams_its_first_frames_together_then_chunks(engine, model):
    p = prompt(model, "chunked")
    frames = engine.generate(p.tokens, p.mask, 7, SamplingParams(seed=3))
    items = [c async for c in chunks(frames, 2, 2, 2)]  # items that never grow
    assert [c.shape for c in items] == [(2, 32), (2, 32), (2, 32), (1, 32)]  # the rest comes last
    assert all(c.dtype == np.int16 for c in items)
    frames = await collect(engine, p, 7, 3)  # the same frames as they came, in order
    np.testing.assert_array_equal(np.concatenate(items), np.stack(frames))
    single = [c async for c in chunks(engine.generate(p.tokens, p.mask, 1, SamplingParams(seed=3)))]
    assert [c.shape[0] for c in single] == [1]  # a reply shorter than FIRST_FRAMES is still sent


class _Playback:
    """A clock that a fake engine moves on by `step_s` for each frame it makes."""

    def __init__(self, step_s: float) -> None:
        self.step_s, self.now = step_s, 0.0

    def __call__(self) -> float:
        return self.now

    async def frames(self, n: int):
        for i in range(n):
            self.now += self.step_s
            yield np.full(32, i, dtype=np.int64)


async def sizes(clock: _Playback, n: int, **kw) -> list[int]:
    items = [c async for c in chunks(clock.frames(n), clock=clock, **kw)]
    got = np.concatenate(items)
    np.testing.assert_array_equal(got[:, 0], np.arange(n))  # every frame once, in order
    return [len(c) for c in items]


def test_an_item_holds_up_to_half_the_lead_between_its_bounds():
    assert item_frames(0.0) == item_frames(-1.0) == 2  # a listener about to run dry: the smallest
    assert item_frames(6 * FRAME_SECONDS) == 3
    assert item_frames(8 * FRAME_SECONDS) == 4
    assert item_frames(60.0) == 4 and item_frames(60.0, per=1, most=6) == 6


async def test_items_grow_as_the_reply_gets_ahead_of_its_playback():
    # Made far faster than real time: the lead grows with every item, and so do the items, up to 4.
    assert await sizes(_Playback(0.0), 30) == [3, 2, 2, 3, 4, 4, 4, 4, 4]
    # Made at real time, the lead stays the first item's: every item after it is the smallest.
    assert await sizes(_Playback(FRAME_SECONDS), 13) == [3, 2, 2, 2, 2, 2]
    # Slower than real time: the same.
    assert await sizes(_Playback(1.5 * FRAME_SECONDS), 8) == [3, 2, 2, 1]
    # Bounds as given; the rest comes last.
    assert await sizes(_Playback(0.0), 20, first=1, per=1, most=8) == [1, 1, 1, 1, 2, 3, 4, 6, 1]


async def test_leaving_early_cancels_and_frees_the_slot(engine, model):
    p = prompt(model, "long one")
    frames = engine.generate(p.tokens, p.mask, 500)
    engine.generate(p.tokens, p.mask, 500)  # a second stream holds the other slot, never read
    async for _ in frames:
        break
    await frames.aclose()
    for _ in range(100):  # the cancel is applied by the engine thread at its next step
        if engine.engine.n_running == 1:
            break
        await asyncio.sleep(0.05)
    assert engine.engine.n_running == 1
    got = await asyncio.wait_for(collect(engine, p, 3, 5), 60)
    assert len(got) == 3


async def test_full_engine_refuses_at_once(engine, model):
    p = prompt(model, "x")
    engine.generate(p.tokens, p.mask, 200)
    engine.generate(p.tokens, p.mask, 200)
    with pytest.raises(EngineFull):
        engine.generate(p.tokens, p.mask, 200)
    with pytest.raises(ValueError, match="max_frames"):
        engine.generate(p.tokens, p.mask, 0)


@pytest.mark.skipif(sys.platform != "linux", reason="a thread's own nice value is Linux's")
def test_the_engine_thread_can_run_below_the_rest_of_the_process(model):
    base = os.getpriority(os.PRIO_PROCESS, 0)
    eng = AsyncEngine(Engine(model, EngineConfig(max_slots=1)), nice=3)
    try:
        for _ in range(100):  # the thread lowers itself as it starts
            if os.getpriority(os.PRIO_PROCESS, eng._thread.native_id) != base:
                break
            threading.Event().wait(0.01)
        assert os.getpriority(os.PRIO_PROCESS, eng._thread.native_id) == min(base + 3, 19)
        assert os.getpriority(os.PRIO_PROCESS, 0) == base  # the caller's thread keeps its priority
    finally:
        eng.close()
