"""What the stream deployments share: per-stream slots on a replica, routing by stream id, a loop that
batches requests, and `CodecReplica`, the two codec deployments' common part (config, Mimi, batch limits,
info). The recognizer keeps its streams the same way.

A stream (one person's turn being encoded or recognized, one reply being decoded) keeps state in a slot
of a replica. Callers send every request of a stream with `multiplexed_model_id=<stream id>`, which makes
Serve route them to the replica that already holds that id; the stream itself carries its position
(`start`), so a replica that lacks the state (restarted, evicted, or routed to under pressure) notices
and rebuilds it instead of producing wrong audio.

`serve.batch` cannot be used here: it splits batches by multiplexed model id, which would leave every
batch with one stream. `BatchLoop` collects whatever requests arrived while the previous batch ran and
runs them as one step in a worker thread (the event loop stays free to accept more).
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.serve import metrics

from csm.codec import MimiCodec
from deployments.weights import load_mimi, pick_device, set_torch_threads

# Routing affinity only: the slots (below) bound what a replica holds, so Serve's own cache may be large.
MAX_STREAM_IDS = 4096


@dataclass(eq=False)
class Stream:
    id: str
    slot: int
    position: int = 0  # frames (decoder) or samples (encoder) consumed so far
    last_used: float = 0.0


class StreamTable:
    """Stream id → slot. When every slot is taken, the least recently used stream loses its slot (its next
    request finds no state and recovers), so a burst beyond capacity degrades, never fails."""

    def __init__(self, num_slots: int) -> None:
        self.num_slots = num_slots
        self._free = list(range(num_slots - 1, -1, -1))
        self._streams: OrderedDict[str, Stream] = OrderedDict()
        self.evictions = 0

    def get(self, stream_id: str) -> Stream | None:
        stream = self._streams.get(stream_id)
        if stream is not None:
            self._streams.move_to_end(stream_id)
            stream.last_used = time.monotonic()
        return stream

    def open(self, stream_id: str) -> Stream:
        """A fresh slot for `stream_id` (replacing any it had); the caller resets the slot's state."""
        self.close(stream_id)
        if not self._free:
            _, victim = self._streams.popitem(last=False)
            self._free.append(victim.slot)
            self.evictions += 1
        stream = Stream(stream_id, self._free.pop(), last_used=time.monotonic())
        self._streams[stream_id] = stream
        return stream

    def close(self, stream_id: str) -> Stream | None:
        stream = self._streams.pop(stream_id, None)
        if stream is not None:
            self._free.append(stream.slot)
        return stream

    def __len__(self) -> int:
        return len(self._streams)

    def __contains__(self, stream_id: str) -> bool:  # without touching the LRU order
        return stream_id in self._streams


Item = TypeVar("Item")
Result = TypeVar("Result")


class BatchLoop(Generic[Item, Result]):
    """`await submit(item)` → that item's result from `process(items)`, run on up to `max_batch` items that
    were waiting together. `process` runs in a worker thread, one batch at a time, and returns results in
    order (an exception instance in a result's place fails just that item)."""

    def __init__(
        self,
        process: Callable[[Sequence[Item]], Sequence[Result | BaseException]],
        max_batch: int,
        observe: Callable[[int], None] | None = None,
    ) -> None:
        self._process = process
        self.max_batch = max_batch
        self._observe = observe
        self._queue: asyncio.Queue[tuple[Item, asyncio.Future]] = asyncio.Queue()
        self._task: asyncio.Task | None = None

    async def submit(self, item: Item) -> Result:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        await self._queue.put((item, future))
        return await future

    async def _run(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while len(batch) < self.max_batch and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            batch = [(item, fut) for item, fut in batch if not fut.cancelled()]
            if not batch:
                continue
            if self._observe is not None:
                self._observe(len(batch))
            try:
                results = await asyncio.to_thread(self._process, [item for item, _ in batch])
            except Exception as e:  # a failed step fails its batch, never the loop
                results = [e] * len(batch)
            for (_, fut), result in zip(batch, results, strict=True):
                if fut.done():
                    continue
                if isinstance(result, BaseException):
                    fut.set_exception(result)
                else:
                    fut.set_result(result)


class CodecConfig(BaseModel):
    """Constructor arguments of a codec deployment."""

    model_config = ConfigDict(extra="forbid")

    mimi_path: str | None = None  # default: $MIMI_PATH, else the codec inside $MODEL_PATH
    model_path: str | None = None
    preset: str = "tiny"  # random codec preset when no weights are found
    device: str = "auto"
    num_slots: int = Field(32, ge=1)
    torch_threads: int | None = Field(None, ge=1)


class BatchOptions(BaseModel):
    """`user_config` of a codec deployment: may change while running."""

    max_batch_size: int = Field(32, ge=1)


class StreamRouting:
    """Per-stream affinity for a deployment that keeps stream state: a request names its stream with
    `multiplexed_model_id`, and Serve routes it to the replica that already holds that id."""

    @serve.multiplexed(max_num_models_per_replica=MAX_STREAM_IDS)
    async def _route(self, stream_id: str) -> str:
        return stream_id  # routing affinity only: the state lives in the replica's stream table

    async def _stream_id(self, call: str) -> str:
        """The request's stream id (its multiplexed model id), registered for Serve's routing."""
        stream_id = serve.get_multiplexed_model_id()
        if not stream_id:
            raise ValueError(f"{call} needs multiplexed_model_id=<stream id>")
        await self._route(stream_id)
        return stream_id


class CodecReplica(StreamRouting):
    """The common part of `AudioTokenizer` and `AudioDecoder`: Mimi, the stream slots, the batch loop."""

    def _setup(self, cfg: CodecConfig, process: Callable, metric: str, description: str) -> MimiCodec:
        set_torch_threads(cfg.torch_threads)
        codec, self.weights = load_mimi(cfg.mimi_path, cfg.model_path, cfg.preset, pick_device(cfg.device))
        self.streams = StreamTable(cfg.num_slots)
        batch_size = metrics.Histogram(
            metric, description=description, boundaries=[1, 2, 4, 8, 16, 32, 64, 128]
        )
        self.loop = BatchLoop(process, BatchOptions().max_batch_size, batch_size.observe)
        return codec

    def reconfigure(self, user_config: dict) -> None:
        self.loop.max_batch = BatchOptions.model_validate(user_config).max_batch_size

    def info(self) -> dict:
        return {
            "weights": self.weights.description,
            "random_weights": self.weights.random,
            "streams": len(self.streams),
        }
