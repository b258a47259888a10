"""An asyncio front for `Engine`: a background thread runs the engine loop; each request is an async
iterator of frames. Used by the Serve deployment, the benchmarks and the CLI.

The thread sleeps while there is no work. Frames reach their consumer through the consumer's own event
loop (`call_soon_threadsafe`), so any number of event loops may share one engine. Leaving an iterator
early (break, cancellation, an exception) cancels the request and frees its slot.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import threading
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass

import numpy as np
from torch import Tensor

from csm.audio import FRAME_SECONDS
from csm.engine import Engine, FrameEvent, SamplingParams

log = logging.getLogger(__name__)

# How a reply streams (CSMGenerator, the local services, bench/gpu.py): its first item holds FIRST_FRAMES,
# 240 ms, so a player starts at once (the page's pre-roll is 120 ms) and the next item has 240 ms to be
# made. One 80 ms frame alone left 28 of 34 underruns in replies' first 0.5 s under load; two (160 ms) still
# 14 of 16 at 8 people on 2 cores, where the next two frames and their decode took about as long as they
# play; three: 2 of 12, for one frame step more before the first audio (bench/RESULTS.md, "Load"). Then
# FRAMES_PER_CHUNK at a time while the listener's buffer is short, and up to MAX_FRAMES_PER_CHUNK once the
# reply is ahead of its playback. Every item costs a stream item, a decoder call and a socket message (an
# API Gateway post in production): 4-frame items took the decoder, ingress and proxy replicas from 0.31 to
# about 0.23 cores at 2 people on 2 cores, but a fixed 4-frame item right after the first left the player
# 115 ms less slack and more replies underran (bench/RESULTS.md, "Load", 2026-12-08).
FIRST_FRAMES = 3
FRAMES_PER_CHUNK = 2
MAX_FRAMES_PER_CHUNK = 4


def item_frames(lead_s: float, per: int = FRAMES_PER_CHUNK, most: int = MAX_FRAMES_PER_CHUNK) -> int:
    """Frames the next item may hold when the listener has `lead_s` of the reply's audio not yet played:
    up to half of it (so the player still holds the other half when the item arrives, at real-time
    generation), between `per` and `most`."""
    return max(per, min(most, int(lead_s / (2 * FRAME_SECONDS))))


async def chunks(
    frames: AsyncIterator[np.ndarray],
    first: int = FIRST_FRAMES,
    per: int = FRAMES_PER_CHUNK,
    most: int = MAX_FRAMES_PER_CHUNK,
    clock: Callable[[], float] = time.monotonic,
) -> AsyncGenerator[np.ndarray, None]:
    """`frames` ([32] each) as stream items ([k, 32] int16): `first` frames, then `item_frames(lead)` at a
    time, then whatever is left when the frames end. The lead is what the listener has not played yet,
    counted from the first item's yield, as a player that starts at the first item plays: the audio
    yielded less the time since. Held frames wait at most for the item to fill: it is sized to half the
    lead, so the player keeps the other half meanwhile."""
    pending: list[np.ndarray] = []
    want, sent, started = first, 0, 0.0
    async for codes in frames:
        pending.append(codes.astype(np.int16))
        if sent:
            want = item_frames(sent * FRAME_SECONDS - (clock() - started), per, most)
        if len(pending) >= want:
            if not sent:
                started = clock()
            yield np.stack(pending)
            sent, pending = sent + len(pending), []
    if pending:
        yield np.stack(pending)


class Generation:
    """One request's frames, an async iterator, and what the engine reported about its prompt."""

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self.reused: int | None = None  # prompt rows taken from the engine's cache (with the first frame)
        self.frames: AsyncGenerator[np.ndarray, None]

    def __aiter__(self) -> Generation:
        return self

    async def __anext__(self) -> np.ndarray:
        return await anext(self.frames)

    async def aclose(self) -> None:
        await self.frames.aclose()


@dataclass
class _Consumer:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[FrameEvent | BaseException]


class AsyncEngine:
    """`nice`: how much lower than the process's other threads the engine thread runs (Linux, where a
    thread has its own nice value; 0 elsewhere). On a CPU shared with other work the engine makes frames
    ahead of playback as fast as it can; a lower priority lets the work that must keep pace with a
    conversation (speech recognition, the codecs) go first, and the engine takes what they leave."""

    def __init__(self, engine: Engine, nice: int = 0) -> None:
        self.engine = engine.setup()
        self.nice = nice if sys.platform == "linux" else 0
        self._consumers: dict[str, _Consumer] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="csm-engine", daemon=True)
        self._thread.start()

    def generate(
        self,
        tokens: Tensor,
        mask: Tensor,
        max_frames: int,
        sampling: SamplingParams | None = None,
        request_id: str | None = None,
        cache_key: str | None = None,
        prefix_key: str | None = None,
        prefix_rows: int = 0,
    ) -> Generation:
        """Frames ([num_codebooks] int64 arrays) as they are made: `async for frame in engine.generate(...)`.

        Call it from a running event loop. EngineFull and ValueError are raised here, before any frame.
        `cache_key`, `prefix_key` and `prefix_rows` are `Engine.add`'s (prefix reuse)."""
        consumer = _Consumer(asyncio.get_running_loop(), asyncio.Queue())
        request_id = request_id or uuid.uuid4().hex
        with self._lock:  # registered before the engine can make its first frame
            if request_id in self._consumers:
                raise ValueError(f"request id {request_id!r} is already running")
            self._consumers[request_id] = consumer
        try:
            self.engine.add(
                tokens, mask, max_frames, sampling, request_id, cache_key, prefix_key, prefix_rows
            )
        except BaseException:
            with self._lock:
                self._consumers.pop(request_id, None)
            raise
        self._wake.set()
        generation = Generation(request_id)
        generation.frames = self._frames(request_id, consumer, generation)
        return generation

    async def _frames(
        self, request_id: str, consumer: _Consumer, generation: Generation
    ) -> AsyncIterator[np.ndarray]:
        finished = False
        try:
            while True:
                item = await consumer.queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                if item.reused is not None:
                    generation.reused = item.reused
                if item.codes is not None:
                    yield item.codes
                if item.done:
                    finished = True
                    return
        finally:
            with self._lock:
                self._consumers.pop(request_id, None)
            if not finished:
                self.engine.cancel(request_id)
                self._wake.set()

    def _run(self) -> None:
        if self.nice:
            thread = threading.get_native_id()
            lower = min(os.getpriority(os.PRIO_PROCESS, thread) + self.nice, 19)
            os.setpriority(os.PRIO_PROCESS, thread, lower)
        while not self._stop:
            if not self.engine.has_work:
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            try:
                events = self.engine.step()
            except Exception as e:  # a failed step must not leave consumers waiting forever
                log.exception("engine step failed")
                self._fail_all(e)
                continue
            with self._lock:
                targets = [(ev, self._consumers.get(ev.request_id)) for ev in events]
            for ev, consumer in targets:
                if consumer is not None:
                    self._deliver(ev.request_id, consumer, ev)

    def _deliver(self, request_id: str, consumer: _Consumer, item: FrameEvent | BaseException) -> None:
        try:
            consumer.loop.call_soon_threadsafe(consumer.queue.put_nowait, item)
        except RuntimeError:  # the consumer's event loop is closed: nobody will read this stream
            with self._lock:
                self._consumers.pop(request_id, None)
            self.engine.cancel(request_id)

    def _fail_all(self, error: Exception) -> None:
        with self._lock:
            consumers = list(self._consumers.items())
        for request_id, consumer in consumers:
            self.engine.cancel(request_id)
            self._deliver(request_id, consumer, RuntimeError(f"generation failed: {error}"))

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def close(self) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=5)
