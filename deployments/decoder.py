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

import numpy as np
import torch
from pydantic import Field
from ray import serve
from ray.serve import metrics

from csm.async_engine import MAX_FRAMES_PER_CHUNK
from csm.codec import NUM_CODEBOOKS
from csm.codec_streaming import RECOVERY_FRAMES, DecodeChunk, StreamingDecoder, decode_pcm16
from deployments.streams import CodecConfig, CodecReplica

log = logging.getLogger(__name__)

__all__ = ["RECOVERY_FRAMES", "AudioDecoder", "DecoderConfig"]


class DecoderConfig(CodecConfig):
    """Constructor arguments: the codec's, and the most frames one `decode` call may carry (at least the
    generator's largest item: `AppArgs` checks)."""

    max_frames_per_call: int = Field(MAX_FRAMES_PER_CHUNK, ge=1, le=16)


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=256)
class AudioDecoder(CodecReplica):
    def __init__(self, config: DecoderConfig | None = None) -> None:
        cfg = config or DecoderConfig()
        codec = self._setup(
            cfg, self._step, "csm_decoder_batch_size", "Reply streams decoded together in one Mimi step."
        )
        self.codebook_size = codec.config.codebook_size
        self.max_frames_per_call = cfg.max_frames_per_call
        self.decoder = StreamingDecoder(codec, cfg.num_slots, max_frames_per_step=cfg.max_frames_per_call)
        self._recoveries = metrics.Counter(
            "csm_decoder_recoveries", description="Decoder states rebuilt from a reply's recent frames."
        )
        self.recoveries = 0

    async def decode(self, start: int, codes: np.ndarray, history: np.ndarray | None = None) -> np.ndarray:
        """PCM16 audio ([k * 1920] int16, 24 kHz) of frames `start .. start + k` of the stream named by
        the request's multiplexed model id. codes: [k, 32]; history: the frames before `start` (the last
        RECOVERY_FRAMES are used if this replica lacks the stream's state)."""
        stream_id = await self._stream_id("decode")
        codes = self._check_codes(codes, "codes")
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
            if start > 0:
                self.recoveries += 1
                self._recoveries.inc()
                log.info("decoder: rebuilding stream %s at frame %d", stream_id, start)
        replay = (
            self._check_codes(history, "history")[-RECOVERY_FRAMES:] if needs_state and start > 0 else None
        )
        chunk = DecodeChunk(stream.slot, codes, needs_state, replay)
        stream.position = start + codes.shape[0]
        return await self.loop.submit(chunk)

    async def close(self) -> None:
        """End the stream named by the request's multiplexed model id (its slot is free again)."""
        stream = self.streams.close(serve.get_multiplexed_model_id())
        if stream is not None:
            self.decoder.close(stream.slot)

    def _step(self, chunks: Sequence[DecodeChunk]) -> list[np.ndarray]:
        """Worker thread: the batch's chunks decoded together (see `decode_pcm16`)."""
        with torch.inference_mode():
            return decode_pcm16(self.decoder, chunks)

    def info(self) -> dict:
        return {**super().info(), "recoveries": self.recoveries}

    def _check_codes(self, codes: np.ndarray | None, name: str) -> np.ndarray:
        if not isinstance(codes, np.ndarray) or codes.ndim != 2 or codes.shape[1] != NUM_CODEBOOKS:
            shape = getattr(codes, "shape", None)
            raise ValueError(f"{name} must be a [frames, {NUM_CODEBOOKS}] integer array, got {shape}")
        limit = self.codebook_size
        if not np.issubdtype(codes.dtype, np.integer) or (
            codes.size and (codes.min() < 0 or codes.max() >= limit)
        ):
            raise ValueError(f"{name} must hold integer codes in [0, {limit})")
        return codes
