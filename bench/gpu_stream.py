"""Sections 2 and 3 of the GPU run (bench/gpu.py): prompt -> engine -> streaming Mimi -> int16 PCM on the
host through the plain objects the deployments use, with no Ray; and Mimi fp32 streaming decode by
streams, with its error against the whole-clip decode."""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file too (`--help`)

from bench.gpu_budget import Sizes
from bench.gpu_engine import MIMI_CODES, prompt_of_rows, sampling
from bench.gpu_table import DTYPE_NAMES, Row
from bench.measure import count_kernels, peak_gib, reset_peak
from csm.async_engine import FRAMES_PER_CHUNK, MAX_FRAMES_PER_CHUNK, AsyncEngine, chunks
from csm.audio import FRAME_SECONDS, FRAME_SIZE
from csm.codec import NUM_CODEBOOKS, MimiCodec
from csm.codec_streaming import DecodeChunk, StreamingDecoder, decode_pcm16
from csm.engine import Engine
from csm.prompt import PromptBuilder


def decode_chunks(decoder: StreamingDecoder, chunks: list[tuple[int, np.ndarray, bool]]) -> list[np.ndarray]:
    """(slot, codes [k, 32] int16, fresh) chunks -> int16 PCM on the host, through `decode_pcm16`, the
    plain function `AudioDecoder._step` runs (the deployment module itself imports Ray)."""
    with torch.inference_mode():
        return decode_pcm16(decoder, [DecodeChunk(slot, codes, fresh) for slot, codes, fresh in chunks])


class _DecodeBatcher:
    """AudioDecoder's BatchLoop in a few lines: chunks that wait together run as one step in a thread."""

    def __init__(self, decoder: StreamingDecoder) -> None:
        self.decoder = decoder
        self._queue: asyncio.Queue = asyncio.Queue()
        self._task: asyncio.Task | None = None

    async def decode(self, slot: int, codes: np.ndarray, fresh: bool) -> np.ndarray:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())
        future = asyncio.get_running_loop().create_future()
        await self._queue.put(((slot, codes, fresh), future))
        return await future

    async def _run(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while not self._queue.empty():
                batch.append(self._queue.get_nowait())
            try:
                results = await asyncio.to_thread(decode_chunks, self.decoder, [item for item, _ in batch])
            except Exception as e:  # fail the batch, not the loop
                results = [e] * len(batch)
            for (_, future), result in zip(batch, results, strict=True):
                if future.done():  # its caller went away
                    continue
                if isinstance(result, BaseException):
                    future.set_exception(result)
                else:
                    future.set_result(result)

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()


@dataclass
class _Spoken:
    pcm: np.ndarray
    first_s: float  # request -> first PCM on the host
    last_s: float  # request -> last PCM


async def _speak(
    engine: AsyncEngine, batcher: _DecodeBatcher, builder: PromptBuilder, slot: int, frames: int, rows: int
) -> _Spoken:
    """One reply as CSMGenerator.generate streams it (`csm.async_engine.chunks`: FIRST_FRAMES, then
    FRAMES_PER_CHUNK to MAX_FRAMES_PER_CHUNK at a time, int16 codes as the engine made them) and as
    serve_app/speech.py ReplyStream sends it to AudioDecoder.decode (CSM's special ids, past Mimi's codes,
    heard as code 0)."""
    prompt = prompt_of_rows(builder, rows, seed=1000 + slot)
    start = time.perf_counter()
    pieces: list[np.ndarray] = []
    first = last = 0.0
    async for codes in chunks(engine.generate(prompt.tokens, prompt.mask, frames, sampling(slot))):
        audible = np.where(codes < MIMI_CODES, codes, 0)
        pieces.append(await batcher.decode(slot, audible, fresh=not pieces))
        last = time.perf_counter() - start
        first = first or last
    return _Spoken(np.concatenate(pieces), first, last)


async def _e2e(engine: Engine, builder: PromptBuilder, codec: MimiCodec, sizes: Sizes) -> list[_Spoken]:
    decoder = StreamingDecoder(codec, sizes.e2e_streams, max_frames_per_step=MAX_FRAMES_PER_CHUNK)
    batcher = _DecodeBatcher(decoder)
    front = AsyncEngine(engine)
    rows = sizes.contexts[0]
    try:
        return await asyncio.gather(
            *(_speak(front, batcher, builder, s, sizes.e2e_frames, rows) for s in range(sizes.e2e_streams))
        )
    finally:
        front.close()
        batcher.close()


def e2e_row(engine: Engine, builder: PromptBuilder, codec: MimiCodec, sizes: Sizes) -> Row:
    reset_peak(engine.device)
    start = time.perf_counter()
    spoken = asyncio.run(_e2e(engine, builder, codec, sizes))
    wall = time.perf_counter() - start
    n = sizes.e2e_frames
    for s in spoken:
        ok = isinstance(s.pcm, np.ndarray) and s.pcm.dtype == np.int16 and s.pcm.shape == (n * FRAME_SIZE,)
        if not ok or not s.pcm.any():
            raise RuntimeError(f"bad PCM: {type(s.pcm).__name__} {getattr(s.pcm, 'shape', None)}")
    per_frame = [s.last_s / n for s in spoken]  # request -> last audio, per frame of audio
    first = statistics.median(s.first_s for s in spoken) * 1000
    return Row(
        run="e2e prompt->PCM",
        dtype=f"{DTYPE_NAMES[engine.dtype]}+fp32",
        batch=len(spoken),
        context=sizes.contexts[0],
        ms=statistics.median(per_frame) * 1000,
        frames_s=len(spoken) * n / wall,
        realtime=f"{sum(t <= FRAME_SECONDS for t in per_frame)}/{len(spoken)}",
        peak=peak_gib(engine.device),
        notes=f"int16 PCM on host, {n * FRAME_SIZE} samples/stream; first audio p50 {first:.0f} ms; "
        f"ms/frame = request to last audio / frames; decode: {DECODE_PATH}",
    )


DECODE_PATH = "csm.codec_streaming.decode_pcm16 (what AudioDecoder._step runs)"


def stream_vs_whole(codec: MimiCodec, frames: int) -> float:
    """Max relative error of streaming decode (2-frame steps) against the whole-clip decode."""
    g = torch.Generator().manual_seed(7)
    codes = torch.randint(0, MIMI_CODES, (1, NUM_CODEBOOKS, frames), generator=g).to(codec.device)
    decoder = StreamingDecoder(codec, 1, max_frames_per_step=FRAMES_PER_CHUNK)
    decoder.open(0)
    with torch.inference_mode():
        chunks = range(0, frames, FRAMES_PER_CHUNK)
        steps = [decoder.step(codes[:, :, t : t + FRAMES_PER_CHUNK]) for t in chunks]
        whole = codec.decode(codes)
    streamed = torch.cat(steps, dim=-1)
    return float((streamed - whole).abs().max() / whole.abs().max())


def mimi_row(codec: MimiCodec, streams: int, steps: int) -> Row:
    """Decoder steps of FRAMES_PER_CHUNK frames for every stream at once, int16 PCM to the host each step."""
    dev = codec.device
    decoder = StreamingDecoder(codec, streams, max_frames_per_step=MAX_FRAMES_PER_CHUNK)
    for slot in range(streams):
        decoder.open(slot)
    g = torch.Generator().manual_seed(streams)
    codes = torch.randint(0, MIMI_CODES, (steps + 3, streams, NUM_CODEBOOKS, FRAMES_PER_CHUNK), generator=g)
    codes = codes.to(dev)
    reset_peak(dev)

    def step(i: int) -> None:
        with torch.inference_mode():
            pcm = decoder.step(codes[i])
            (pcm.clamp(-1, 1) * 32767).round().to(torch.int16).cpu()

    for i in range(2):
        step(i)
    times = []
    for i in range(2, steps + 2):
        start = time.perf_counter()
        step(i)
        times.append(time.perf_counter() - start)
    kernels = count_kernels(lambda: step(steps + 2), dev, per="/step")
    per_frame = statistics.median(times) / FRAMES_PER_CHUNK
    mean_step = statistics.mean(times)
    return Row(
        run="mimi fp32 decode",
        dtype=DTYPE_NAMES[codec.dtype],
        batch=streams,
        ms=per_frame * 1000,
        frames_s=streams * FRAMES_PER_CHUNK / mean_step,
        realtime=f"{streams}/{streams}" if mean_step <= FRAME_SECONDS * FRAMES_PER_CHUNK else f"0/{streams}",
        kernels=kernels,
        peak=peak_gib(dev),
        notes=f"{FRAMES_PER_CHUNK}-frame steps (as the generator streams), step p50 "
        f"{statistics.median(times) * 1000:.1f} ms",
    )
