"""`CSMGenerator`: the CSM backbone and depth decoder, one continuous-batching engine per replica.

Every conversation's reply is one streaming call: the replica builds the prompt (it owns the tokenizer and
knows the context budget), hands it to the engine loop that runs in a background thread, and yields each
frame of codes as it is made. Sequences join and leave between frames, so every reply in flight on this
replica shares one forward per 80 ms frame. A full engine refuses at once (`EngineFull`), never queues.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.serve import metrics

from csm.async_engine import AsyncEngine
from csm.engine import Engine, EngineConfig, EngineFull, SamplingParams
from csm.prompt import PromptBuilder, Segment
from deployments.weights import load_csm, pick_device, pick_dtype, set_torch_threads

log = logging.getLogger(__name__)

MIMI_CODES = 2048

__all__ = ["CSMGenerator", "EngineFull", "GeneratorConfig", "SpeechRequest"]


class GeneratorConfig(BaseModel):
    """Constructor arguments (fixed for a replica's life: changing them means new replicas)."""

    model_config = ConfigDict(extra="forbid")

    model_path: str | None = None  # default: $MODEL_PATH; none: the random `preset`
    tokenizer_path: str | None = None
    preset: str = "tiny"
    device: str = "auto"
    dtype: str = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    max_slots: int = Field(8, ge=1, le=512)
    prefill_chunk: int = Field(256, ge=16)
    cuda_graphs: bool | None = None
    torch_threads: int | None = Field(None, ge=1)
    frames_per_chunk: int = Field(2, ge=1, le=8)  # frames per streamed item after the first


@dataclass
class SpeechRequest:
    """One reply to speak: `text` as `speaker`, after `context` (oldest first)."""

    text: str
    speaker: int = 0
    context: list[Segment] = field(default_factory=list)
    keep_first: int = 0  # leading context segments to keep when trimming (the voice's reference)
    max_frames: int = 125
    temperature: float = 0.9
    top_k: int = 50
    seed: int | None = None


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=16)
class CSMGenerator:
    def __init__(self, config: dict | None = None) -> None:
        cfg = GeneratorConfig.model_validate(config or {})
        set_torch_threads(cfg.torch_threads)
        device = pick_device(cfg.device)
        model, tokenizer, self.weights = load_csm(
            cfg.model_path, cfg.tokenizer_path, cfg.preset, device, pick_dtype(cfg.dtype, device)
        )
        self.builder = PromptBuilder(tokenizer, model.args)
        self.max_slots = cfg.max_slots
        self.frames_per_chunk = cfg.frames_per_chunk
        engine = Engine(
            model,
            EngineConfig(
                max_slots=cfg.max_slots, prefill_chunk=cfg.prefill_chunk, cuda_graphs=cfg.cuda_graphs
            ),
        )
        self.engine = AsyncEngine(engine)
        self._batch = metrics.Histogram(
            "csm_generator_batch_size",
            description="Sequences in each frame step of the CSM engine.",
            boundaries=[1, 2, 4, 8, 16, 32, 64, 128, 256],
        )
        self._frame_s = metrics.Histogram(
            "csm_generator_frame_seconds",
            description="Wall time of one batched frame step (backbone + 31 depth-decoder steps).",
            boundaries=[0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64],
        )
        self._active = metrics.Gauge("csm_generator_active_sequences", description="Sequences in the engine.")
        self._ttff = metrics.Histogram(
            "csm_generator_first_frame_seconds",
            description="From a reply's arrival at the generator to its first frame.",
            boundaries=[0.02, 0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2],
        )
        self._seen_steps = 0
        self._metrics_task: asyncio.Task | None = None

    async def generate(self, request: SpeechRequest) -> AsyncGenerator[np.ndarray, None]:
        """Chunks of frames ([k, 32] int16) as they are made: the first frame alone (first audio sooner),
        then `frames_per_chunk` at a time (fewer stream items and decoder calls: the overhead per item is
        paid by every conversation on the replica's machine). ValueError for a bad request, EngineFull
        when busy. Call with `handle.options(stream=True).generate.remote(request)`; cancelling the call
        frees the slot."""
        self._ensure_metrics_task()
        prompt = self.builder.build(
            request.context, request.speaker, request.text, request.max_frames, request.keep_first
        )
        sampling = SamplingParams(request.temperature, request.top_k, request.seed)
        loop = asyncio.get_running_loop()
        start = loop.time()
        frames = self.engine.generate(prompt.tokens, prompt.mask, request.max_frames, sampling)
        pending: list[np.ndarray] = []
        sent = 0
        async for codes in frames:
            if sent == 0 and not pending:
                self._ttff.observe(loop.time() - start)
            # The heads have 2051 outputs; ids past Mimi's 2048 codes are never audio (a trained model
            # all but never samples them; random weights do). The engine continues from what it drew.
            pending.append(np.where(codes < MIMI_CODES, codes, 0).astype(np.int16))
            if len(pending) >= (self.frames_per_chunk if sent else 1):
                sent += len(pending)
                yield np.stack(pending)
                pending = []
        if pending:
            yield np.stack(pending)

    def info(self, steps_since: int | None = None) -> dict:
        """What this replica runs and how busy it is (for /readyz and the tests). With `steps_since` (a
        `frame_steps` value from an earlier call), also the batch sizes and times of the steps since."""
        stats = self.engine.engine.stats
        info = {
            "weights": self.weights.description,
            "random_weights": self.weights.random,
            "max_seq_len": self.builder.args.max_seq_len,
            "max_slots": self.max_slots,
            "running": self.engine.engine.n_running,
            "frames": stats.frames,
            "frame_steps": stats.frame_steps,
            "max_batch_size": max(stats.batch_sizes, default=0),
        }
        if steps_since is not None:
            info["batch_sizes"], info["step_seconds"] = stats.steps_since(steps_since)
        return info

    def check_health(self) -> None:
        if not self.engine.alive:
            raise RuntimeError("the engine thread has stopped")

    def _ensure_metrics_task(self) -> None:
        if self._metrics_task is None or self._metrics_task.done():
            self._metrics_task = asyncio.get_running_loop().create_task(self._export_metrics())

    async def _export_metrics(self) -> None:
        # The engine thread only appends to bounded deques; reading them here keeps metrics off its path.
        while True:
            stats = self.engine.engine.stats
            seen, self._seen_steps = self._seen_steps, stats.frame_steps
            for b, t in zip(*stats.steps_since(seen), strict=True):
                self._batch.observe(b)
                self._frame_s.observe(t)
            self._active.set(self.engine.engine.n_running)
            await asyncio.sleep(1.0)

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.close()
