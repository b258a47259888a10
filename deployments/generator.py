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
from typing import Annotated, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from ray import serve
from ray.serve import metrics

from csm.async_engine import FIRST_FRAMES, FRAMES_PER_CHUNK, MAX_FRAMES_PER_CHUNK, AsyncEngine
from csm.engine import (
    Engine,
    EngineConfig,
    EngineFull,
    kv_bytes_per_row,
    slot_bytes,
    slots_for_memory,
)
from csm.presets import ModelArgs
from csm.prompt import PromptBuilder
from csm.requests import Frames, PromptUse, SpeechRequest, speak
from deployments.weights import load_csm, pick_device, pick_dtype, set_torch_threads

log = logging.getLogger(__name__)

__all__ = ["CSMGenerator", "EngineFull", "Frames", "GeneratorConfig", "PromptUse", "SpeechRequest"]


class GeneratorConfig(BaseModel):
    """Constructor arguments (fixed for a replica's life: changing them means new replicas)."""

    model_config = ConfigDict(extra="forbid")

    model_path: str | None = None  # default: $MODEL_PATH; none: the random `preset`
    tokenizer_path: str | None = None
    preset: str = "tiny"
    device: str = "auto"
    dtype: str = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    # Sequences at once, parked conversations included. "auto" (CUDA): as many as the replica's share of
    # the GPU holds after the weights; elsewhere "auto" means 8.
    max_slots: Annotated[int, Field(ge=1, le=512)] | Literal["auto"] = 8
    gpu_memory_fraction: float | None = Field(None, gt=0, le=1)  # for "auto"; None: the replica's num_gpus
    prefill_chunk: int = Field(256, ge=16)
    cuda_graphs: bool | None = None
    torch_threads: int | None = Field(None, ge=1)
    prefill_threads: int | None = Field(None, ge=1)  # CPU: threads for prefill steps (EngineConfig)
    first_frames: int = Field(FIRST_FRAMES, ge=1, le=8)  # frames in a reply's first streamed item
    frames_per_chunk: int = Field(FRAMES_PER_CHUNK, ge=1, le=8)  # and in each item after it, at least
    max_frames_per_chunk: int = Field(MAX_FRAMES_PER_CHUNK, ge=1, le=8)  # at most, once the reply is ahead
    prefix_cache: bool = True  # keep each conversation's KV between replies (and share voice prefixes)
    # On CPU, how much lower the engine thread runs than the other replicas (`AsyncEngine`'s `nice`): it
    # makes replies ahead of playback, greedily, while the recognizer must keep pace with speech. 8 people
    # on 2 cores: speech_stopped → transcript p50 0.22-1.26 s in nine runs with 5, 1.34-1.69 s in two with
    # 0 (bench/RESULTS.md). A GPU engine leaves the CPU to the others anyway: it applies to CPU only.
    cpu_nice: int = Field(5, ge=0, le=19)
    host_cache_mb: int = Field(0, ge=0)  # host memory for KV evicted from the device (pinned on CUDA)

    @model_validator(mode="after")
    def _item_sizes(self) -> GeneratorConfig:
        if self.max_frames_per_chunk < self.frames_per_chunk:
            raise ValueError(
                f"max_frames_per_chunk ({self.max_frames_per_chunk}) is below frames_per_chunk"
                f" ({self.frames_per_chunk})"
            )
        return self

    @property
    def largest_item(self) -> int:
        """The most frames one streamed item holds (what the decoder must take in one call)."""
        return max(self.first_frames, self.max_frames_per_chunk)


def auto_slots(args: ModelArgs, dtype: torch.dtype, device: torch.device, fraction: float | None) -> int:
    """Slots that fit in this replica's share of the GPU, after what it holds already (the weights), less
    a reserve for the CUDA graphs' activations; logged. CPU and other devices: 8."""
    if device.type != "cuda":
        return 8
    total = torch.cuda.get_device_properties(device).total_memory
    free, _ = torch.cuda.mem_get_info(device)
    share = fraction if fraction is not None else _gpu_share()
    reserve = 1 << 30  # graph pools, sampling buffers and the allocator's slack
    budget = min(int(share * total) - torch.cuda.memory_allocated(device), free) - reserve
    per = slot_bytes(args, dtype)
    slots = slots_for_memory(budget, per)
    log.info(
        "max_slots auto: %d slots of %.0f MiB in %.1f GiB (share %.2f of %.1f GiB, weights %.1f GiB)",
        slots, per / 2**20, budget / 2**30, share, total / 2**30, torch.cuda.memory_allocated(device) / 2**30,
    )  # fmt: skip
    return slots


def _gpu_share() -> float:
    try:
        import ray

        return float(ray.get_runtime_context().get_assigned_resources().get("GPU", 1.0)) or 1.0
    except Exception:  # not in a Ray worker (tests, scripts): the whole device
        return 1.0


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=16)
class CSMGenerator:
    def __init__(self, config: GeneratorConfig | None = None) -> None:
        cfg = config or GeneratorConfig()
        set_torch_threads(cfg.torch_threads)
        device = pick_device(cfg.device)
        dtype = pick_dtype(cfg.dtype, device)
        model, tokenizer, self.weights = load_csm(
            cfg.model_path, cfg.tokenizer_path, cfg.preset, device, dtype
        )
        slots = cfg.max_slots
        if slots == "auto":
            slots = auto_slots(model.args, dtype, device, cfg.gpu_memory_fraction)
        self.max_slots = slots
        # Segment rows for every slot's whole context (16 slots of `tiny`: 9.7 MB), so each sentence's
        # prompt is made from rows made once, and the cache stops growing.
        self.builder = PromptBuilder(tokenizer, model.args, cache_rows=slots * model.args.max_seq_len)
        self.first_frames = cfg.first_frames
        self.frames_per_chunk = cfg.frames_per_chunk
        self.max_frames_per_chunk = cfg.max_frames_per_chunk
        self.kv_bytes_per_row = kv_bytes_per_row(model.args, dtype)
        engine = Engine(
            model,
            EngineConfig(
                max_slots=slots,
                prefill_chunk=cfg.prefill_chunk,
                prefill_threads=cfg.prefill_threads,
                cuda_graphs=cfg.cuda_graphs,
                prefix_cache=cfg.prefix_cache,
                host_cache_bytes=cfg.host_cache_mb << 20,
            ),
        )
        self.engine = AsyncEngine(engine, nice=cfg.cpu_nice if device.type == "cpu" else 0)
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
            description="From a reply's arrival at the generator to its first streamed item.",
            boundaries=[0.02, 0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2],
        )
        rows = [16, 64, 256, 512, 1024, 2048]
        self._prefilled = metrics.Histogram(
            "csm_generator_prefilled_rows", description="Prompt rows computed per reply.", boundaries=rows
        )
        self._reused = metrics.Histogram(
            "csm_generator_reused_rows",
            description="Prompt rows per reply taken from the KV cache (parked, host tier, voice prefix).",
            boundaries=rows,
        )
        self._parked = metrics.Gauge("csm_generator_parked_slots", description="Slots parked for reuse.")
        self._evictions = metrics.Gauge("csm_generator_evictions", description="Parked slots evicted.")
        self._host_bytes = metrics.Gauge("csm_generator_host_cache_bytes", description="KV in host memory.")
        self._seen_steps = 0
        self._metrics_task: asyncio.Task | None = None

    async def generate(self, request: SpeechRequest) -> AsyncGenerator[Frames, None]:
        """Chunks of frames as they are made (`csm.requests.speak`): `first_frames`, with how the prompt was
        paid for, then `frames_per_chunk` to `max_frames_per_chunk` at a time, more as the reply gets ahead
        of its playback (`csm.async_engine.chunks`). ValueError for a bad request, EngineFull when busy.
        Call with `handle.options(stream=True).generate.remote(request)`; cancelling the call frees the slot
        (its rows stay parked for the conversation's next reply)."""
        self._ensure_metrics_task()
        loop = asyncio.get_running_loop()
        start = loop.time()
        sizes = self.first_frames, self.frames_per_chunk, self.max_frames_per_chunk
        async for item in speak(self.engine, self.builder, request, *sizes):
            if item.prompt is not None:
                self._ttff.observe(loop.time() - start)
                self._prefilled.observe(item.prompt.prefilled)
                self._reused.observe(item.prompt.reused)
            yield item

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
            "prefilled_rows": stats.prefilled_rows,
            "reused_rows": stats.reused_rows,
            "cache": self.cache_info(),
        }
        if steps_since is not None:
            info["batch_sizes"], info["step_seconds"] = stats.steps_since(steps_since)
        return info

    def cache_info(self) -> dict:
        """The KV cache's budget and use (for /readyz, `x-server.info` and the README's sizing)."""
        engine, stats = self.engine.engine, self.engine.engine.stats
        return {
            "enabled": engine.config.prefix_cache,
            "slots": self.max_slots,
            "kv_bytes_per_row": self.kv_bytes_per_row,
            "slot_rows": self.builder.args.max_seq_len,
            "parked": engine.n_parked,
            "evictions": stats.evictions,
            "host_budget_bytes": engine.config.host_cache_bytes,
            "host_bytes": engine.host_bytes,
            "host_entries": engine.n_host,
            "host_restores": stats.host_restores,
            "shared_prefix_hits": stats.shared_prefix_hits,
        }

    def record_replica_metadata(self) -> dict:
        """Read once by Serve when the replica is ready: the router (`deployments.routing`) learns how many
        sequences this replica takes before its engine refuses (with `max_slots: auto`, only it knows)."""
        return {"max_slots": self.max_slots}

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
            self._parked.set(self.engine.engine.n_parked)
            self._evictions.set(stats.evictions)
            self._host_bytes.set(self.engine.engine.host_bytes)
            await asyncio.sleep(1.0)

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.close()
