"""`AudioTokenizer`: streaming Mimi encode of what people say, batched across every stream on the replica.

The person's audio is encoded while they speak, so when their turn ends its codes are ready for the
reply's context. A turn is a stream: the caller sends its audio a chunk at a time with
`multiplexed_model_id=<stream id>` (same replica, same state) and `start` = the chunk's first sample.
A replica that lacks the state answers `None` ("send the turn again from its start"), which the caller
can always do: it keeps the turn's audio for speech recognition anyway.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch
from ray import serve

from csm.codec_streaming import EncodeChunk, StreamingEncoder, encode_pcm16
from deployments.streams import CodecConfig, CodecReplica

log = logging.getLogger(__name__)

__all__ = ["AudioTokenizer", "TokenizerConfig"]


class TokenizerConfig(CodecConfig):
    """Constructor arguments (the codec's; nothing of its own)."""


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=256)
class AudioTokenizer(CodecReplica):
    def __init__(self, config: TokenizerConfig | None = None) -> None:
        cfg = config or TokenizerConfig()
        codec = self._setup(
            cfg, self._step, "csm_tokenizer_batch_size", "Input streams encoded together in one Mimi step."
        )
        self.encoder = StreamingEncoder(codec, cfg.num_slots)

    async def encode(self, start: int, pcm: np.ndarray, final: bool = False) -> np.ndarray | None:
        """Codes ([F, 32] int16) of every whole frame complete after adding `pcm` (int16, 24 kHz) at sample
        `start` of the stream; with `final`, also the last partial frame, and the stream ends. `None`: this
        replica lacks the stream's state; send the stream again from sample 0."""
        stream_id = await self._stream_id("encode")
        if not isinstance(pcm, np.ndarray) or pcm.dtype != np.int16 or pcm.ndim != 1:
            raise ValueError("pcm must be a 1-D int16 array")
        stream = self.streams.get(stream_id)
        fresh = stream is None or stream.position != start
        if fresh:
            if start != 0:
                return None
            stream = self.streams.open(stream_id)
        stream.position = start + pcm.shape[0]
        try:
            return await self.loop.submit(EncodeChunk(stream.slot, pcm, fresh, final))
        finally:
            if final:  # only now: the slot must not be handed out while its last audio is being flushed
                self.streams.close(stream_id)

    async def close(self) -> None:
        """Drop the stream named by the request's multiplexed model id (the turn was cleared)."""
        stream = self.streams.close(serve.get_multiplexed_model_id())
        if stream is not None:
            self.encoder.close(stream.slot)

    def _step(self, chunks: Sequence[EncodeChunk]) -> list[np.ndarray]:
        """Worker thread: the batch's chunks encoded together (see `encode_pcm16`)."""
        with torch.inference_mode():
            return encode_pcm16(self.encoder, chunks)
