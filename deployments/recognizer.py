"""`SpeechRecognizer`: speech to text for every conversation, a thin Serve wrapper over `speech.asr`.

Two calls:
- `push(start, pcm, final)` with `multiplexed_model_id=<stream id>`: one turn recognized while it is
  spoken. The caller sends the turn's audio in chunks as it arrives and gets the transcript so far back;
  the final chunk's answer is the turn's transcript, so at the turn's end only that chunk is decoded.
  Chunks of every stream on the replica that wait together are decoded in one step (`BatchLoop`).
  Recovery: a replica that lacks the stream (restarted, or its slot went to another stream) answers
  `None` to a chunk that does not start at sample 0, and the caller sends the turn again from its start
  (it keeps the turn's audio): one larger step, then the stream goes on.
- `transcribe(pcm)`: one whole utterance (the end-of-turn path), batched with `serve.batch`.

Pocketsphinx holds the GIL while it decodes, so a replica decodes one chunk at a time: streams on a
replica take turns chunk by chunk, and more replicas decode more streams at once (`num_replicas`).
VAD runs per chunk in the ingress, not here.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from ray import serve
from ray.serve import metrics

from deployments.streams import BatchLoop, StreamRouting, StreamTable
from deployments.weights import pick_dtype, set_torch_threads
from speech.asr import MIN_TRANSCRIBE_SAMPLES, Push, RecognitionStream, make_transcriber
from speech.pcm import check_pcm

log = logging.getLogger(__name__)

__all__ = ["RecognizerConfig", "RecognizerOptions", "SpeechRecognizer"]

RECORDS = 256  # finished streams whose decode record `stats()` keeps


class RecognizerConfig(BaseModel):
    """Constructor arguments (fixed for a replica's life)."""

    model_config = ConfigDict(extra="forbid")

    backend: Literal["pocketsphinx", "whisper"] = "pocketsphinx"
    whisper_path: str | None = None  # a local Whisper weights directory (transformers format)
    num_slots: int = Field(32, ge=1)  # streams a replica keeps (LRU beyond)

    @model_validator(mode="after")
    def _whisper_needs_weights(self) -> RecognizerConfig:
        if self.backend == "whisper" and self.whisper_path is None:
            raise ValueError("backend 'whisper' needs whisper_path: a local Whisper weights directory")
        return self


class RecognizerOptions(BaseModel):
    """`user_config`: batching limits, may change while running."""

    model_config = ConfigDict(extra="forbid")

    max_batch_size: int = Field(8, ge=1)
    batch_wait_timeout_s: float = Field(0.01, ge=0.0)


_DEFAULT_OPTIONS = RecognizerOptions()


@dataclass
class StreamRecord:
    """What one stream cost: its decode steps, as intervals of this replica's monotonic clock."""

    pushes: int = 0
    samples: int = 0  # 24 kHz samples decoded (a recovery decodes some twice)
    final_samples: int = 0  # decoded by the final step: what was left when the turn ended
    recoveries: int = 0
    intervals: list[tuple[float, float]] = field(default_factory=list)


@dataclass
class _Job:
    stream_id: str
    pcm: np.ndarray  # float32 24 kHz
    final: bool = False
    fresh: bool = False  # the stream's state starts over (a new stream, or a recovery from sample 0)
    drop: bool = False  # the stream is abandoned (its turn was cleared)


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=256)
class SpeechRecognizer(StreamRouting):
    def __init__(self, config: RecognizerConfig | None = None) -> None:
        cfg = config or RecognizerConfig()
        set_torch_threads(None)  # CSM_TORCH_THREADS, default 1: replicas share the machine's cores
        device = torch.device("cuda" if cfg.backend == "whisper" and torch.cuda.is_available() else "cpu")
        dtype = pick_dtype("auto", device)
        self.transcriber = make_transcriber(cfg.backend, cfg.whisper_path, device=device, dtype=dtype)
        self.backend = cfg.backend
        self.options = _DEFAULT_OPTIONS
        self.streams = StreamTable(cfg.num_slots)  # which streams this replica keeps (LRU beyond num_slots)
        self._states: dict[str, RecognitionStream] = {}  # touched only by the batch thread
        self._records: dict[str, StreamRecord] = {}
        self._finished: deque[str] = deque()
        self.recoveries = 0  # chunks answered None: the caller sends the turn again from its start
        batch_size = metrics.Histogram(
            "csm_recognizer_batch_size",
            description="Recognition streams decoded together in one step.",
            boundaries=[1, 2, 4, 8, 16, 32],
        )
        self.loop = BatchLoop(self._step, self.options.max_batch_size, batch_size.observe)
        self._apply(self.options)

    def reconfigure(self, user_config: dict) -> None:
        """Keys left out keep their current value."""
        self.options = RecognizerOptions.model_validate({**self.options.model_dump(), **user_config})
        self._apply(self.options)

    def _apply(self, options: RecognizerOptions) -> None:
        self.transcribe_batch.set_max_batch_size(options.max_batch_size)
        self.transcribe_batch.set_batch_wait_timeout_s(options.batch_wait_timeout_s)
        self.loop.max_batch = options.max_batch_size

    # ---- streams ----------------------------------------------------------------------------------
    async def push(self, start: int, pcm: np.ndarray, final: bool = False) -> str | None:
        """The stream's transcript after adding `pcm` (int16, 24 kHz) at sample `start` of its turn; with
        `final`, the turn's transcript, and the stream ends. `None`: this replica lacks the stream's
        state; send the turn again from sample 0."""
        stream_id = await self._stream_id("push")
        if not isinstance(pcm, np.ndarray) or pcm.dtype != np.int16 or pcm.ndim != 1:
            raise ValueError("pcm must be a 1-D int16 array")
        stream = self.streams.get(stream_id)
        record = self._records.get(stream_id)
        fresh = stream is None or stream.position != start
        if fresh:
            if start != 0:
                self.recoveries += 1
                if record is not None:
                    record.recoveries += 1
                return None
            stream = self.streams.open(stream_id)
            if record is None:
                record = self._records[stream_id] = StreamRecord()
        assert record is not None
        stream.position = start + pcm.shape[0]
        try:
            return await self.loop.submit(_Job(stream_id, pcm.astype(np.float32) / 32768.0, final, fresh))
        finally:
            if final:  # only now: the slot must not be handed out while its last audio is decoded
                self.streams.close(stream_id)
                self._retire(stream_id)

    async def close(self) -> None:
        """Drop the stream named by the request's multiplexed model id (the turn was cleared)."""
        stream_id = serve.get_multiplexed_model_id()
        if self.streams.close(stream_id) is not None:
            await self.loop.submit(_Job(stream_id, np.zeros(0, np.float32), drop=True))
            self._retire(stream_id)

    def _retire(self, stream_id: str) -> None:
        self._finished.append(stream_id)
        while len(self._finished) > RECORDS:
            self._records.pop(self._finished.popleft(), None)

    def _step(self, jobs: Sequence[_Job]) -> list[str | BaseException]:
        """Worker thread: (re)open states, decode every chunk in one backend step, release ended ones."""
        started = time.monotonic()
        for job in jobs:
            if job.fresh or job.drop:
                self._release(job.stream_id)
            if job.fresh:
                self._states[job.stream_id] = self.transcriber.open()
        work = [job for job in jobs if not job.drop]
        pushes = [Push(self._states[job.stream_id], job.pcm, job.final) for job in work]
        texts = iter(self.transcriber.step(pushes) if pushes else [])
        ended = time.monotonic()
        for job in work:
            record = self._records.get(job.stream_id)
            if record is not None:
                record.pushes += 1
                record.samples += job.pcm.size
                record.final_samples = job.pcm.size if job.final else 0
                record.intervals.append((started, ended))
            if job.final:
                self._release(job.stream_id)
        for stream_id in [s for s in self._states if s not in self.streams]:  # evicted from the table
            self._release(stream_id)
        return ["" if job.drop else next(texts) for job in jobs]

    def _release(self, stream_id: str) -> None:
        state = self._states.pop(stream_id, None)
        if state is not None and not state.done:
            self.transcriber.close(state)

    # ---- whole utterances -------------------------------------------------------------------------
    async def transcribe(self, pcm: np.ndarray) -> str:
        """Text of one utterance (float mono 24 kHz); "" for audio too short to hold a word."""
        samples = check_pcm(pcm)
        if samples.shape[0] < MIN_TRANSCRIBE_SAMPLES:
            return ""
        return await self.transcribe_batch(samples)

    @serve.batch(
        max_batch_size=_DEFAULT_OPTIONS.max_batch_size,
        batch_wait_timeout_s=_DEFAULT_OPTIONS.batch_wait_timeout_s,
    )
    async def transcribe_batch(self, batch: list[np.ndarray]) -> list[str]:
        # In a worker thread: decoding takes up to a second and must not stall the replica's event loop.
        return await asyncio.to_thread(self.transcriber.transcribe, batch)

    def info(self) -> dict:
        return {"backend": self.backend, "streams": len(self.streams), **self.options.model_dump()}

    def stats(self) -> dict:
        """Per stream (the open ones and the last `RECORDS` finished): its decode record."""
        return {
            "evictions": self.streams.evictions,
            "recoveries": self.recoveries,
            "streams": {k: vars(r) | {"intervals": list(r.intervals)} for k, r in self._records.items()},
        }
