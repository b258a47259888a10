"""The asyncio front: frames stream to each consumer as made; leaving early cancels and frees the slot."""

from __future__ import annotations

import asyncio
import os
import sys
import threading

import numpy as np
import pytest
import torch

from csm.async_engine import AsyncEngine, chunks
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
    items = [c async for c in chunks(engine.generate(p.tokens, p.mask, 7, SamplingParams(seed=3)), 2, 2)]
    assert [c.shape for c in items] == [(2, 32), (2, 32), (2, 32), (1, 32)]  # the rest comes last
    assert all(c.dtype == np.int16 for c in items)
    frames = await collect(engine, p, 7, 3)  # the same frames as they came, in order
    np.testing.assert_array_equal(np.concatenate(items), np.stack(frames))
    single = [c async for c in chunks(engine.generate(p.tokens, p.mask, 1, SamplingParams(seed=3)))]
    assert [c.shape[0] for c in single] == [1]  # a reply shorter than FIRST_FRAMES is still sent


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
