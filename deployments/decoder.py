"""`AudioDecoder`: streaming Mimi decode of replies, batched across every reply on the replica.

A reply is a stream: the caller sends its frames a chunk at a time (`decode`), with
`multiplexed_model_id=<reply id>` so chunks reach the replica that holds the stream's decoder state, and
`start` = the index of the chunk's first frame. With each chunk goes the recent history (the frames just
before it, up to `RECOVERY_FRAMES`): a replica without the state (restarted, evicted) rebuilds it from
those frames and goes on; the audio is then close to, not bit-equal to, the exact decode.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.serve import metrics

from csm.codec import NUM_CODEBOOKS
from csm.codec_streaming import RECOVERY_FRAMES, StreamingDecoder
from deployments.streams import MAX_STREAM_IDS, BatchLoop, Stream, StreamTable
from deployments.weights import load_mimi, pick_device, set_torch_threads

log = logging.getLogger(__name__)

__all__ = ["RECOVERY_FRAMES", "AudioDecoder", "DecoderConfig"]


class DecoderConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    mimi_path: str | None = None  # default: $MIMI_PATH, else the codec inside $MODEL_PATH
    model_path: str | None = None
    preset: str = "tiny"  # random codec preset when no weights are found
    device: str = "auto"
    num_slots: int = Field(32, ge=1)
    max_frames_per_call: int = Field(4, ge=1, le=16)
    torch_threads: int | None = Field(None, ge=1)


class DecoderOptions(BaseModel):
    """`user_config`: may change while running."""

    max_batch_size: int = Field(32, ge=1)


@dataclass
class _Chunk:
    stream: Stream
    codes: np.ndarray  # [k, 32]
    fresh: bool  # the slot's state must be reset first (a new stream, or one this replica lost)
    history: np.ndarray | None  # [n, 32]: the frames before `codes`, replayed into a fresh state


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=256)
class AudioDecoder:
    def __init__(self, config: dict | None = None) -> None:
        cfg = DecoderConfig.model_validate(config or {})
        set_torch_threads(cfg.torch_threads)
        codec, self.weights = load_mimi(cfg.mimi_path, cfg.model_path, cfg.preset, pick_device(cfg.device))
        self.max_frames_per_call = cfg.max_frames_per_call
        self.decoder = StreamingDecoder(codec, cfg.num_slots, max_frames_per_step=cfg.max_frames_per_call)
        self.streams = StreamTable(cfg.num_slots)
        self._batch_size = metrics.Histogram(
            "csm_decoder_batch_size",
            description="Reply streams decoded together in one Mimi step.",
            boundaries=[1, 2, 4, 8, 16, 32, 64, 128],
        )
        self._recoveries = metrics.Counter(
            "csm_decoder_recoveries", description="Decoder states rebuilt from a reply's recent frames."
        )
        self.recoveries = 0
        self.loop = BatchLoop(self._step, DecoderOptions().max_batch_size, self._batch_size.observe)

    def reconfigure(self, user_config: dict) -> None:
        self.loop.max_batch = DecoderOptions.model_validate(user_config).max_batch_size

    @serve.multiplexed(max_num_models_per_replica=MAX_STREAM_IDS)
    async def _route(self, stream_id: str) -> str:
        # Only for Serve's routing affinity: the state itself lives in `self.streams`.
        return stream_id

    async def decode(self, start: int, codes: np.ndarray, history: np.ndarray | None = None) -> np.ndarray:
        """PCM16 audio ([k * 1920] int16, 24 kHz) of frames `start .. start + k` of the stream named by
        the request's multiplexed model id. codes: [k, 32]; history: the frames before `start` (the last
        RECOVERY_FRAMES are used if this replica lacks the stream's state)."""
        stream_id = serve.get_multiplexed_model_id()
        if not stream_id:
            raise ValueError("decode needs multiplexed_model_id=<stream id>")
        await self._route(stream_id)
        codes = _check_codes(codes, "codes")
        if not 1 <= codes.shape[0] <= self.max_frames_per_call:
            raise ValueError(f"{codes.shape[0]} frames in one call; allowed 1..{self.max_frames_per_call}")
        stream = self.streams.get(stream_id)
        needs_state = stream is None or stream.position != start
        if needs_state:
            if start > 0 and history is None:
                raise ValueError(
                    f"stream {stream_id!r}: no state for frame {start} and no history to rebuild it"
                )
            stream = self.streams.open(stream_id)
            stream.position = start
            if start > 0:
                self.recoveries += 1
                self._recoveries.inc()
                log.info("decoder: rebuilding stream %s at frame %d", stream_id, start)
        replay = _check_codes(history, "history")[-RECOVERY_FRAMES:] if needs_state and start > 0 else None
        chunk = _Chunk(stream, codes, needs_state, replay)
        stream.position = start + codes.shape[0]
        return await self.loop.submit(chunk)

    async def close(self) -> None:
        """End the stream named by the request's multiplexed model id (its slot is free again)."""
        stream = self.streams.close(serve.get_multiplexed_model_id())
        if stream is not None:
            self.decoder.close(stream.slot)

    def _step(self, chunks: Sequence[_Chunk]) -> list[np.ndarray | BaseException]:
        """Worker thread: one Mimi step per group of chunks of equal length (usually one group)."""
        results: dict[int, np.ndarray | BaseException] = {}
        with torch.inference_mode():
            for c in chunks:
                if c.history is not None and len(c.history):
                    self.decoder.recover(c.stream.slot, torch.from_numpy(c.history.T.astype(np.int64)))
                elif c.fresh:
                    self.decoder.open(c.stream.slot)
            for k in sorted({c.codes.shape[0] for c in chunks}):
                group = [i for i, c in enumerate(chunks) if c.codes.shape[0] == k]
                codes = torch.zeros(self.decoder.num_slots, NUM_CODEBOOKS, k, dtype=torch.long)
                advance = torch.zeros(self.decoder.num_slots, dtype=torch.bool)
                for i in group:
                    slot = chunks[i].stream.slot
                    codes[slot] = torch.from_numpy(chunks[i].codes.T.astype(np.int64))
                    advance[slot] = True
                pcm = self.decoder.step(codes, advance)
                for i in group:
                    audio = pcm[chunks[i].stream.slot].clamp(-1, 1)
                    results[i] = (audio * 32767).round().to(torch.int16).numpy()
        return [results[i] for i in range(len(chunks))]

    def info(self) -> dict:
        return {
            "weights": self.weights.description,
            "random_weights": self.weights.random,
            "streams": len(self.streams),
            "recoveries": self.recoveries,
        }


def _check_codes(codes: np.ndarray | None, name: str) -> np.ndarray:
    if not isinstance(codes, np.ndarray) or codes.ndim != 2 or codes.shape[1] != NUM_CODEBOOKS:
        shape = getattr(codes, "shape", None)
        raise ValueError(f"{name} must be a [frames, {NUM_CODEBOOKS}] integer array, got {shape}")
    if not np.issubdtype(codes.dtype, np.integer) or (
        codes.size and (codes.min() < 0 or codes.max() >= 2048)
    ):
        raise ValueError(f"{name} must hold integer codes in [0, 2048)")
    return codes
