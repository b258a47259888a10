"""What a reply asks of the generator and what comes back, and `speak`, which turns the one into the other
on an engine: shared by the generator deployment, the local services, the conversation that calls them
(over Ray or in process) and the tests. No Ray."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from dataclasses import dataclass, field

import numpy as np

from csm.async_engine import FIRST_FRAMES, FRAMES_PER_CHUNK, MAX_FRAMES_PER_CHUNK, AsyncEngine, chunks
from csm.engine import SamplingParams
from csm.prompt import PromptBuilder, Segment
from csm.sampling import TEMPERATURE, TOP_K

__all__ = ["Frames", "PromptUse", "SpeechRequest", "speak"]


@dataclass
class SpeechRequest:
    """One reply to speak: `text` as `speaker`, after `context` (oldest first)."""

    text: str
    speaker: int = 0
    context: list[Segment] = field(default_factory=list)
    keep_first: int = 0  # leading context segments to keep when trimming (the voice's reference)
    max_frames: int = 125
    temperature: float = TEMPERATURE
    top_k: int = TOP_K
    seed: int | None = None
    conversation_id: str | None = None  # whose cached rows to reuse (and the replica to route to)
    voice: str | None = None  # whose reference is `context[0]`: a prefix shared across conversations


@dataclass(frozen=True)
class PromptUse:
    """How a reply's prompt was paid for: rows in all, and of those, rows taken from the engine's cache."""

    rows: int
    reused: int

    @property
    def prefilled(self) -> int:
        return self.rows - self.reused


@dataclass
class Frames:
    """One streamed item: frames as the engine made them (ids past Mimi's codes included: they go back
    into the context as fed, and the decoder hears them as silence), and with the first, the prompt."""

    codes: np.ndarray  # [k, 32] int16
    prompt: PromptUse | None = None


async def speak(
    engine: AsyncEngine,
    builder: PromptBuilder,
    request: SpeechRequest,
    first_frames: int = FIRST_FRAMES,
    frames_per_chunk: int = FRAMES_PER_CHUNK,
    max_frames_per_chunk: int = MAX_FRAMES_PER_CHUNK,
) -> AsyncGenerator[Frames, None]:
    """`request`'s frames as stream items (`chunks`: `first_frames`, with how the prompt was paid for, then
    `frames_per_chunk` to `max_frames_per_chunk` at a time, by how far the reply is ahead of playback). The
    prompt is built here (ValueError for a bad request); the engine reuses the conversation's cached rows
    (`conversation_id`) and the voice's shared prefix. Leaving early cancels the generation, which frees its
    slot (its rows stay parked for the conversation's next reply).
    """
    prompt = builder.build(
        request.context, request.speaker, request.text, request.max_frames, request.keep_first
    )
    frames = engine.generate(
        prompt.tokens,
        prompt.mask,
        request.max_frames,
        SamplingParams(request.temperature, request.top_k, request.seed),
        cache_key=request.conversation_id,
        prefix_key=f"voice:{request.voice}" if request.voice and prompt.pinned_rows else None,
        prefix_rows=prompt.pinned_rows,
    )
    try:
        use: PromptUse | None = None
        async for codes in chunks(frames, first_frames, frames_per_chunk, max_frames_per_chunk):
            first, use = use is None, use or PromptUse(len(prompt), frames.reused or 0)
            yield Frames(codes, use if first else None)
    finally:
        await frames.aclose()
