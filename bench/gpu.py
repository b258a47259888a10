"""The GPU benchmarks in one process, for `bench/gpu.sh`: one lease, one run, one table (plus the
conversation sweep), every section bounded in time.

    python bench/gpu.py               # a CUDA machine: csm-1b shape, random weights, about 6 minutes
    python bench/gpu.py --dry-run     # the same code on this CPU at tiny sizes, in well under a minute

Needs only torch and transformers (no Ray), with the repository on PYTHONPATH. Sections, in order:

1. engine bf16: the csm-1b engine with its CUDA graphs, every graph replayed once before anything is timed;
   then per-frame step time at each batch x context length (prompt rows), with frames/s, real-time
   streams, CUDA kernels of one frame step (torch.profiler) and peak memory; the batch-1 rows beside the
   memory-bandwidth floor (`bench/engine.py --floor`'s computation).
2. e2e: prompt -> engine -> streaming Mimi (fp32) -> int16 PCM on the host, through the plain objects the
   deployments use (`PromptBuilder`, `AsyncEngine`, `StreamingDecoder`), with no Ray.
3. Mimi fp32 streaming decode (as production runs it), by streams.
4. engine fp16: the same engine and shape in fp16, the T4-shaped check (T4s have no bf16).
5. conversations (issue 14): multi-turn conversations at csm-1b shape with KV reuse on and off; the largest
   number of conversations whose every reply stays faster than real time.

A section that fails prints a FAILED row and the others still run; the exit status is 1 if any failed.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import math
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import transformers
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.engine import bandwidth_floor_ms
from csm.async_engine import FRAMES_PER_CHUNK, AsyncEngine, chunks
from csm.codec import FRAME_SIZE, NUM_CODEBOOKS, MimiCodec, random_codec
from csm.codec_streaming import DecodeChunk, StreamingDecoder, decode_pcm16
from csm.engine import Engine, EngineConfig, EngineFull, SamplingParams
from csm.loading import random_model
from csm.model import CSM
from csm.prompt import Prompt, PromptBuilder, Segment
from csm.tokenizer import ByteTokenizer

FRAME_S = 0.08  # one Mimi frame of audio
MIMI_CODES = 2048  # ids past these are never audio (deployments/generator.py maps them to 0)
DECODER_MAX_FRAMES = 4  # AudioDecoder's default max_frames_per_call
T4_GBPS = 320.0  # a T4's peak memory bandwidth: its floor, from the same bytes per frame
SAMPLING = (0.9, 50)  # temperature, top-k: the reference defaults
DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


@dataclass(frozen=True)
class Sizes:
    """Everything that differs between the CUDA run and the CPU dry run."""

    preset: str
    codec_preset: str
    budget_s: float  # the whole run; sections stop early to stay inside it
    batches: tuple[int, ...]
    contexts: tuple[int, ...]  # prompt rows
    timed_frames: int  # pure frame steps timed per cell
    grid_prefill_chunk: int  # large, so every long prompt is in before its first stream runs out of room
    fp16_batches: tuple[int, ...]
    e2e_streams: int
    e2e_frames: int
    mimi_streams: tuple[int, ...]
    mimi_steps: int  # timed decoder steps of FRAMES_PER_CHUNK frames
    conversations: tuple[int, ...]
    reply_frames: int
    person_frames: tuple[int, int]  # the person's turn: that many frames of random codes (inclusive)
    voice_frames: int  # the voice's reference audio, a prefix shared by every conversation
    target_rows: int  # a conversation ends once its next prompt would be longer
    chat_prefill_chunk: int  # the engine's chunk in the conversations (CSMGenerator's default: 256)
    run_cap_s: float  # one conversation run at most
    stop_at_miss: bool  # end a run at its first reply slower than real time (saves the GPU's minutes)
    caps_s: dict[str, float] = field(default_factory=dict)  # per section; the last one gets what is left


GPU = Sizes(
    preset="csm-1b",
    codec_preset="mimi",
    budget_s=380,
    batches=(1, 8, 32, 64, 128),
    contexts=(200, 1800),
    timed_frames=24,
    grid_prefill_chunk=2048,
    fp16_batches=(1, 8, 32),
    e2e_streams=8,
    e2e_frames=48,
    mimi_streams=(1, 8, 32, 64, 128),
    mimi_steps=12,
    conversations=(8, 16, 32, 64, 128),
    reply_frames=40,
    person_frames=(25, 40),
    voice_frames=125,
    target_rows=1500,
    chat_prefill_chunk=256,
    run_cap_s=60,
    stop_at_miss=True,
    caps_s={"engine bf16": 110, "e2e": 25, "mimi": 35, "engine fp16": 70},
)

DRY = Sizes(
    preset="tiny",
    codec_preset="tiny",
    budget_s=100,
    batches=(1, 2),
    contexts=(200, 1800),
    timed_frames=2,
    grid_prefill_chunk=2048,
    fp16_batches=(1, 2),
    e2e_streams=2,
    e2e_frames=3,
    mimi_streams=(1, 2),
    mimi_steps=2,
    conversations=(2, 4),
    reply_frames=5,
    person_frames=(3, 5),
    voice_frames=8,
    target_rows=200,
    chat_prefill_chunk=64,
    run_cap_s=20,
    stop_at_miss=False,  # a loaded CPU is never real time: run every turn so each code path runs
)


# ---- timing, memory, kernels ---------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class _OpCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


def count_kernels(fn: Callable[[], object], device: torch.device, per: str = "") -> str:
    """What one call of `fn` launches, labelled: CUDA kernels (torch.profiler traces the kernels inside a
    graph replay too), or on CPU the aten ops it dispatches."""
    if device.type != "cuda":
        with _OpCounter() as counter:
            fn()
        return f"{counter.n} aten ops{per}"
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    sync(device)
    try:
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            fn()
            sync(device)
    except RuntimeError as e:  # no CUPTI, or not allowed to use it: the row still counts
        return f"n/a ({type(e).__name__})"
    kernels = [
        e
        for e in prof.events()
        if e.device_type == DeviceType.CUDA and not e.name.startswith(("Memcpy", "Memset"))
    ]
    return f"{len(kernels)} CUDA kernels{per}" if kernels else "n/a (none traced)"


def init_profiler(device: torch.device) -> None:
    """Start (and stop) the CUDA profiler once before any graph is captured: profiling graphs captured
    before the profiler's first start has crashed or hung (pytorch/pytorch#75504), which would cost the
    whole lease."""
    if device.type == "cuda":
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]):
            torch.zeros(1, device=device).add_(1)
        sync(device)


class Clock:
    """The run's time budget; each section gets a deadline inside it."""

    def __init__(self, total_s: float) -> None:
        self.start = time.perf_counter()
        self.end = self.start + total_s

    def deadline(self, cap_s: float | None) -> float:
        now = time.perf_counter()
        return self.end if cap_s is None else min(self.end, now + cap_s)

    def left(self) -> float:
        return self.end - time.perf_counter()


class OutOfTime(RuntimeError):
    pass


def check_time(deadline: float, what: str) -> None:
    if time.perf_counter() > deadline:
        raise OutOfTime(f"out of time before {what}")


# ---- the table ---------------------------------------------------------------------------------------
COLUMNS = (
    ("run", 22),
    ("dtype", 9),
    ("batch", 5),
    ("context", 7),
    ("ms/frame p50", 12),
    ("floor ms (x)", 13),
    ("frames/s", 8),
    ("real-time streams", 17),
    ("kernels/frame", 18),
    ("peak GiB", 8),
    ("notes", 0),
)


@dataclass
class Row:
    run: str
    dtype: str
    batch: int | str = "-"
    context: int | str = "-"
    ms: float | None = None
    floor: str = "-"
    frames_s: float | None = None
    realtime: str = "-"
    kernels: str = "-"
    peak: float | None = None
    notes: str = ""

    def cells(self) -> list[str]:
        num = lambda x, fmt: "-" if x is None else format(x, fmt)  # noqa: E731
        return [
            self.run,
            self.dtype,
            str(self.batch),
            str(self.context),
            num(self.ms, ".2f"),
            self.floor,
            num(self.frames_s, ".0f"),
            self.realtime,
            self.kernels,
            num(self.peak, ".1f"),
            self.notes,
        ]


def print_row(cells: list[str], widths: tuple[int, ...]) -> None:
    print("| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |", flush=True)


def print_header(columns: tuple[tuple[str, int], ...]) -> tuple[int, ...]:
    widths = tuple(w for _, w in columns)
    print_row([name for name, _ in columns], widths)
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|", flush=True)
    return widths


# ---- prompts -----------------------------------------------------------------------------------------
def prompt_of_rows(builder: PromptBuilder, rows: int, seed: int) -> Prompt:
    """A prompt of exactly `rows` rows: a heard utterance (random codes), then the reply's text rows.

    Put together from the builder's rows rather than by `build`, whose context policy leaves room for a
    long reply (REPLY_RESERVE) and so would cut a 1,800-row context."""
    heard, reply = f"tell me about the weather {seed:04d}", f"it is sunny today {seed:04d}"
    tail = builder.text_rows(0, reply)
    fixed = len(builder.text_rows(1, heard)[0]) + 1 + len(tail[0])  # + the heard segment's EOS row
    if rows <= fixed:
        raise ValueError(f"a prompt needs more than {fixed} rows")
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, MIMI_CODES, (rows - fixed, builder.args.num_codebooks), generator=g)
    heard_rows = builder.segment_rows(Segment(1, heard, codes))
    tokens, mask = (torch.cat([a, b]) for a, b in zip(heard_rows, tail, strict=True))
    return Prompt(tokens=tokens, mask=mask, n_context=1)


def sampling(seed: int) -> SamplingParams:
    return SamplingParams(*SAMPLING, seed=seed)


# ---- 1 and 4: the engine grid ------------------------------------------------------------------------
def build_engine(model: CSM, slots: int, chunk: int, **extra) -> tuple[Engine, str]:
    """An engine with its graphs captured and each replayed once (so no timed step pays a graph's first
    launch), and a note saying so."""
    start = time.perf_counter()
    engine = Engine(model, EngineConfig(max_slots=slots, prefill_chunk=chunk, **extra)).setup()
    setup_s = time.perf_counter() - start
    replayed = warm_graphs(engine)
    if replayed != engine.n_graphs:
        raise RuntimeError(f"replayed {replayed} of {engine.n_graphs} graphs (has Engine._graphs moved?)")
    return engine, f"setup {setup_s:.0f} s, {engine.n_graphs} graphs captured, {replayed} replayed"


def warm_graphs(engine: Engine) -> int:
    """Replay every captured (batch bucket, KV bucket) graph once. With no slot active a replay leaves no
    trace (inactive rows write to the scratch column: see csm/engine.py), so this is safe at any time no
    sequence is running; the engine keeps no public handle on its graphs, hence the private attribute."""
    graphs = getattr(engine, "_graphs", {})
    for graph in graphs.values():
        graph.replay()
    sync(engine.device)
    return len(graphs)


def drain(engine: Engine, request_ids: list[str], limit_steps: int = 100_000) -> None:
    for request_id in request_ids:
        engine.cancel(request_id)
    for _ in range(limit_steps):
        if not engine.has_work:
            return
        engine.step()
    raise RuntimeError("the engine did not drain")


def grid_cell(
    engine: Engine, builder: PromptBuilder, batch: int, rows: int, frames: int, deadline: float, kernels: bool
) -> tuple[float, float, str, float | None]:
    """Median and mean wall time of pure frame steps with `batch` streams of `rows`-row prompts (step
    returns once the frame's codes are on the host, so each is synced), the kernels of one more step (if
    asked), and the peak memory. Streams get all the room the model has, so none ends while the others
    prefill."""
    dev = engine.device
    max_frames = engine.max_seq_len - rows
    prompts = [prompt_of_rows(builder, rows, seed=i) for i in range(batch)]
    reset_peak(dev)
    ids = [engine.add(p.tokens, p.mask, max_frames, sampling(i)) for i, p in enumerate(prompts)]
    try:
        times: list[float] = []
        while len(times) < frames:
            check_time(deadline, f"batch {batch} x {rows} rows was timed")
            prefills, steps = engine.stats.prefill_steps, engine.stats.frame_steps
            start = time.perf_counter()
            events = engine.step()
            elapsed = time.perf_counter() - start
            if any(ev.done for ev in events):
                raise RuntimeError("a stream ended before its cell was timed")
            pure = engine.stats.prefill_steps == prefills and engine.stats.frame_steps == steps + 1
            if pure and engine.stats.batch_sizes[-1] == batch:
                times.append(elapsed)
        counted = count_kernels(engine.step, dev) if kernels else "-"
        return statistics.median(times), statistics.mean(times), counted, peak_gib(dev)
    finally:
        drain(engine, ids)


def grid_rows(
    label: str,
    engine: Engine,
    builder: PromptBuilder,
    sizes: Sizes,
    batches: tuple[int, ...],
    floor_ms: float,
    deadline: float,
    setup_note: str,
    floor_note: Callable[[float], str] = lambda _: "",
) -> list[Row]:
    rows, dtype = [], DTYPE_NAMES[engine.dtype]
    for rows_in_prompt in sizes.contexts:
        for batch in batches:
            # Each profiler session costs the GPU run about a second: the smallest and largest batch only.
            count = batch in (batches[0], batches[-1])
            p50, mean, kernels, peak = grid_cell(
                engine, builder, batch, rows_in_prompt, sizes.timed_frames, deadline, count
            )
            realtime = mean <= FRAME_S
            notes = [f"RTF {mean / FRAME_S:.2f}"]
            if batch == 1:
                notes.append(floor_note(p50 * 1000))
            if not rows:
                notes.append(setup_note)
            row = Row(
                run=label,
                dtype=dtype,
                batch=batch,
                context=rows_in_prompt,
                ms=p50 * 1000,
                floor=f"{floor_ms:.2f} (x{p50 * 1000 / floor_ms:.1f})" if batch == 1 else "-",
                frames_s=batch / mean,
                realtime=f"{batch}/{batch}" if realtime else f"0/{batch}",
                kernels=kernels,
                peak=peak,
                notes="; ".join(n for n in notes if n),
            )
            emit(row)
            rows.append(row)
    return rows


# ---- 2: end to end, no Ray -----------------------------------------------------------------------------
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
    FRAMES_PER_CHUNK at a time, int16 codes as the engine made them) and as serve_app/speech.py ReplyStream
    sends it to AudioDecoder.decode (CSM's special ids, past Mimi's codes, heard as code 0)."""
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
    decoder = StreamingDecoder(codec, sizes.e2e_streams, max_frames_per_step=DECODER_MAX_FRAMES)
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
        realtime=f"{sum(t <= FRAME_S for t in per_frame)}/{len(spoken)}",
        peak=peak_gib(engine.device),
        notes=f"int16 PCM on host, {n * FRAME_SIZE} samples/stream; first audio p50 {first:.0f} ms; "
        f"ms/frame = request to last audio / frames; decode: {DECODE_PATH}",
    )


DECODE_PATH = "csm.codec_streaming.decode_pcm16 (what AudioDecoder._step runs)"


# ---- 3: Mimi fp32 -------------------------------------------------------------------------------------
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
    decoder = StreamingDecoder(codec, streams, max_frames_per_step=DECODER_MAX_FRAMES)
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
        realtime=f"{streams}/{streams}" if mean_step <= FRAME_S * FRAMES_PER_CHUNK else f"0/{streams}",
        kernels=kernels,
        peak=peak_gib(dev),
        notes=f"{FRAMES_PER_CHUNK}-frame steps (as the generator streams), step p50 "
        f"{statistics.median(times) * 1000:.1f} ms",
    )


# ---- 5: conversations --------------------------------------------------------------------------------
@dataclass
class _Reply:
    turn: int
    prompt_rows: int
    added: float
    reused: int = 0
    first: float | None = None
    last: float | None = None
    frames: int = 0

    @property
    def ms_per_frame(self) -> float:
        """Request to last frame, per frame made: a reply is real time when this is at most 80 ms."""
        return (self.last - self.added) / max(self.frames, 1) * 1000


@dataclass
class _Conversation:
    index: int
    key: str
    context: list[Segment]
    start_at: float
    turn: int = 0
    request: str | None = None
    reply_text: str = ""
    codes: list[np.ndarray] = field(default_factory=list)
    done: bool = False


@dataclass
class ChatRun:
    reuse: bool
    conversations: int
    replies: list[_Reply]
    realtime: bool
    reason: str
    wall_s: float
    max_rows: int
    counters: dict[str, int]


def _stat(engine: Engine, name: str) -> int | None:
    # Counters of the prefix-cache engine; None if this engine has no such counter.
    value = getattr(engine.stats, name, None)
    return int(value) if value is not None else None


OUT_OF_TIME = "out of time"


class ChatScenario:
    """C conversations on one engine, each turn the person's (random codes, 2-3 s, and text) then a reply
    of `reply_frames` frames, until the context reaches about `target_rows`. A conversation's next prompt
    extends its previous one row for row: the previous context, the reply's frames exactly as the engine
    made them (ids past Mimi's codes included, as csm/prompt.py allows, so the engine's held rows are a
    prefix of the next prompt), the person's new turn, the next reply's text. Every conversation shares
    the voice's reference segment as its first, pinned segment.

    Replies run back to back (the person's speaking time is not waited out: a heavier load than real
    conversations put on the engine, which keeps the sweep inside its time), conversations start staggered
    over one reply so turns do not all begin in the same frame."""

    def __init__(
        self, engine: Engine, builder: PromptBuilder, sizes: Sizes, conversations: int, reuse: bool
    ) -> None:
        self.engine, self.builder, self.sizes = engine, builder, sizes
        self.n, self.reuse = conversations, reuse
        self.rng = np.random.default_rng(conversations)
        voice_codes = self._codes(sizes.voice_frames)
        self.voice = Segment(0, "a calm clear voice", voice_codes)
        self.voice_rows = builder.segment_rows(self.voice)[0].shape[0]

    def _codes(self, frames: int) -> torch.Tensor:
        return torch.from_numpy(self.rng.integers(0, MIMI_CODES, (frames, NUM_CODEBOOKS)))

    def _start_turn(self, conv: _Conversation, now: float) -> _Reply | None:
        """The person's turn and the request for the reply; None once the context is long enough."""
        s = self.sizes
        person = Segment(1, f"turn {conv.turn} ok", self._codes(int(self.rng.integers(*s.person_frames))))
        # Short texts: the byte tokenizer spends one row per byte, the Llama-3 one about one per word.
        reply_text = f"reply {conv.turn} ok"
        context = [*conv.context, person]
        prompt = self.builder.build(context, 0, reply_text, s.reply_frames, keep_first=1)
        if len(prompt) > s.target_rows:
            conv.done = True
            return None
        conv.context, conv.reply_text, conv.codes = context, reply_text, []
        # Reuse off names no key at all, so it is today's engine whatever a prefix-cache engine keeps.
        keys = dict(cache_key=conv.key, prefix_key="voice", prefix_rows=self.voice_rows) if self.reuse else {}
        conv.request = self.engine.add(
            prompt.tokens,
            prompt.mask,
            s.reply_frames,
            sampling(conv.index * 1000 + conv.turn),
            request_id=f"{conv.key}-t{conv.turn}",
            **keys,
        )
        return _Reply(conv.turn, len(prompt), now)

    def _end_turn(self, conv: _Conversation) -> None:
        codes = np.stack(conv.codes) if conv.codes else np.zeros((0, NUM_CODEBOOKS), np.int64)
        conv.context.append(Segment(0, conv.reply_text, torch.from_numpy(codes.astype(np.int64))))
        conv.request, conv.turn = None, conv.turn + 1

    def run(self, deadline: float) -> ChatRun:
        s, engine = self.sizes, self.engine
        before = {k: _stat(engine, k) for k in ("prefilled_rows", "reused_rows", "evictions")}
        stagger = s.reply_frames * FRAME_S / self.n
        t0 = time.perf_counter()
        convs = [_Conversation(i, f"c{self.n}-{i}", [self.voice], t0 + i * stagger) for i in range(self.n)]
        by_request: dict[str, tuple[_Conversation, _Reply]] = {}
        replies: list[_Reply] = []
        reason = miss = ""
        while not reason and not all(c.done for c in convs):
            now = time.perf_counter()
            if now > deadline:
                reason = OUT_OF_TIME
                break
            for conv in convs:
                if not conv.done and conv.request is None and now >= conv.start_at:
                    try:
                        reply = self._start_turn(conv, now)
                    except EngineFull:
                        reason = "engine full"
                        break
                    if reply is not None:
                        by_request[conv.request] = (conv, reply)
            if not engine.has_work:
                time.sleep(0.001)  # staggered starts still to come
                continue
            events = engine.step()
            now = time.perf_counter()
            for ev in events:
                conv, reply = by_request[ev.request_id]
                if getattr(ev, "reused", None) is not None:
                    reply.reused = ev.reused
                if ev.codes is not None:
                    reply.first = reply.first or now
                    reply.frames += 1
                    conv.codes.append(ev.codes)
                if ev.done:
                    reply.last = now
                    replies.append(reply)
                    del by_request[ev.request_id]
                    self._end_turn(conv)
                    if reply.ms_per_frame > FRAME_S * 1000 and not miss:
                        miss = f"a reply at turn {reply.turn} took {reply.ms_per_frame:.1f} ms/frame"
                        reason = miss if s.stop_at_miss else ""
        drain(engine, list(by_request))
        counters = {
            k: v - before[k] for k in before if (v := _stat(engine, k)) is not None and before[k] is not None
        }
        max_rows = max((r.prompt_rows for r in replies), default=0)
        wall = time.perf_counter() - t0
        reason = reason or miss
        return ChatRun(self.reuse, self.n, replies, not reason, reason, wall, max_rows, counters)


CHAT_COLUMNS = (
    ("reuse", 5),
    ("conversations", 13),
    ("replies", 7),
    ("context rows (max)", 18),
    ("prefill rows/reply", 18),
    ("reused rows/reply", 17),
    ("first frame mean/p95 ms", 23),
    ("first frame turn 0 -> last", 26),
    ("worst ms/frame", 14),
    ("real time", 9),
    ("wall s", 6),
    ("notes", 0),
)


def _p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(0.95 * len(ordered)) - 1)]


def chat_cells(run: ChatRun) -> list[str]:
    replies = run.replies
    if not replies:
        return ["on" if run.reuse else "off", str(run.conversations), "0", *["-"] * 6, "no", "-", run.reason]
    prefill = [r.prompt_rows - r.reused for r in replies]  # the engine's counters (in notes) add cancels
    by_turn = [(r.turn, (r.first - r.added) * 1000) for r in replies if r.first is not None]
    ttff = [t for _, t in by_turn]
    last = max((turn for turn, _ in by_turn), default=0)
    turn_mean = lambda k: statistics.mean([t for turn, t in by_turn if turn == k] or [math.nan])  # noqa: E731
    notes = [run.reason] if run.reason else []
    notes += [f"{k} {v}" for k, v in run.counters.items()]
    return [
        "on" if run.reuse else "off",
        str(run.conversations),
        str(len(replies)),
        str(run.max_rows),
        f"{statistics.mean(prefill):.0f}",
        f"{statistics.mean(r.reused for r in replies):.0f}",
        f"{statistics.mean(ttff):.0f} / {_p95(ttff):.0f}" if ttff else "-",
        f"{turn_mean(0):.0f} -> {turn_mean(last):.0f} (turn {last})",
        f"{max(r.ms_per_frame for r in replies):.0f}",
        "yes" if run.realtime else "no",
        f"{run.wall_s:.0f}",
        "; ".join(notes),
    ]


def chat_sweep(model: CSM, builder: PromptBuilder, sizes: Sizes, deadline: float) -> dict[bool, str]:
    """Sweep the number of conversations upwards, reuse on and off side by side, each mode until it fails
    (or the time is out); the largest count that stayed real time, per mode."""
    slots = max(sizes.conversations)
    engines: dict[bool, Engine] = {}
    for reuse in (True, False):
        engines[reuse], note = build_engine(model, slots, sizes.chat_prefill_chunk, prefix_cache=reuse)
        print(f"# conversations, reuse {'on' if reuse else 'off'}: {note}", flush=True)
    print(
        f"# {sizes.reply_frames}-frame replies back to back, person turns of {sizes.person_frames[0]}-"
        f"{sizes.person_frames[1]} frames, a {sizes.voice_frames}-frame voice prefix, until ~"
        f"{sizes.target_rows} rows; prefill chunk {sizes.chat_prefill_chunk}; real time = every reply's "
        "request-to-last-frame time / frames <= 80 ms",
        flush=True,
    )
    widths = print_header(CHAT_COLUMNS)
    passed: dict[bool, int | None] = {True: None, False: None}
    failed: dict[bool, int | None] = {True: None, False: None}
    stopped = ""
    for n in sizes.conversations:
        for reuse in (True, False):
            if failed[reuse] is not None or stopped:
                continue
            if deadline - time.perf_counter() < 5:
                stopped = "out of time"
                continue
            scenario = ChatScenario(engines[reuse], builder, sizes, n, reuse)
            run = scenario.run(min(deadline, time.perf_counter() + sizes.run_cap_s))
            print_row(chat_cells(run), widths)
            if run.realtime:
                passed[reuse] = n
            elif run.reason == OUT_OF_TIME:  # unknown, not a failure
                stopped = OUT_OF_TIME
            else:
                failed[reuse] = n
        if stopped or all(f is not None for f in failed.values()):
            break
    engines.clear()
    free_memory()
    return {reuse: _largest(passed[reuse], failed[reuse], stopped) for reuse in (True, False)}


def _largest(passed: int | None, failed: int | None, stopped: str) -> str:
    """The largest count that passed, and why the sweep went no further."""
    why = f"{failed} failed" if failed is not None else stopped or "the largest tried"
    return f"{passed if passed is not None else 'none'} ({why})"


# ---- the run -------------------------------------------------------------------------------------------
_failures: list[str] = []
_widths: tuple[int, ...] = ()


def emit(row: Row) -> None:
    print_row(row.cells(), _widths)


def section(name: str, dtype: str, fn: Callable[[], None]) -> None:
    """Run one section; a failure becomes a FAILED row (traceback on stderr), and the run goes on."""
    try:
        fn()
    except OutOfTime as e:
        emit(Row(run=name, dtype=dtype, notes=f"SKIPPED: {e}"))
    except Exception as e:
        traceback.print_exc()
        _failures.append(name)
        emit(Row(run=name, dtype=dtype, notes=f"FAILED: {type(e).__name__}: {e}"[:300]))
    free_memory()


def floor_of(model: CSM, device: torch.device) -> tuple[float, float, float]:
    gb, gbps, floor_ms = bandwidth_floor_ms(model, device)
    print(
        f"# floor, {next(model.parameters()).dtype}: {gb:.2f} GB read per frame at batch 1 / {gbps:.0f} GB/s"
        f" measured copy bandwidth = {floor_ms:.2f} ms",
        flush=True,
    )
    return gb, gbps, floor_ms


def main() -> int:
    global _widths
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny presets and sizes (the test runs this)")
    ap.add_argument("--budget-s", type=float, help="the whole run's time budget (default: the preset's)")
    a = ap.parse_args()
    sizes = DRY if a.dry_run else GPU
    if a.budget_s:
        sizes = dataclasses.replace(sizes, budget_s=a.budget_s)
    device = torch.device("cpu" if a.dry_run else "cuda")
    if a.dry_run:
        torch.set_num_threads(1)  # tiny ops on a shared CPU: a second thread only adds wake-ups
    elif not torch.cuda.is_available():
        raise SystemExit("no CUDA device (use --dry-run on a CPU)")
    torch.manual_seed(0)
    clock = Clock(sizes.budget_s)
    init_profiler(device)
    name = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu"
    print(
        f"# {name}; python {platform.python_version()}, torch {torch.__version__} "
        f"(cuda {torch.version.cuda}), transformers {transformers.__version__}; presets {sizes.preset} + "
        f"Mimi {sizes.codec_preset}, random weights; budget {sizes.budget_s:.0f} s",
        flush=True,
    )
    start = time.perf_counter()
    bf16 = random_model(sizes.preset, dtype=torch.bfloat16, device=device).model  # built on the device
    print(f"# {sizes.preset} bf16 built on {device} in {time.perf_counter() - start:.1f} s", flush=True)
    builder = PromptBuilder(ByteTokenizer(), bf16.args)
    _, _, bf16_floor = floor_of(bf16, device)
    _widths = print_header(COLUMNS)
    held: dict[str, object] = {}  # what one section leaves to the next: the bf16 engine, the codec

    def codec() -> MimiCodec:
        if "codec" not in held:  # fp32, as deployments/weights.py load_mimi runs it
            held["codec"] = random_codec(sizes.codec_preset, device=device, dtype=torch.float32)
        return held["codec"]

    def engine_bf16() -> None:
        deadline = clock.deadline(sizes.caps_s.get("engine bf16"))
        engine, note = build_engine(bf16, max(sizes.batches), sizes.grid_prefill_chunk)
        held["engine"] = engine
        grid_rows("engine bf16 graphs", engine, builder, sizes, sizes.batches, bf16_floor, deadline, note)

    def e2e() -> None:
        check_time(clock.deadline(sizes.caps_s.get("e2e")), "the end-to-end smoke")
        engine = held.pop("engine", None)
        if engine is None:  # the grid failed; a small engine of its own
            engine, _ = build_engine(bf16, sizes.e2e_streams, sizes.grid_prefill_chunk)
        emit(e2e_row(engine, builder, codec(), sizes))

    def mimi() -> None:
        deadline = clock.deadline(sizes.caps_s.get("mimi"))
        exact = stream_vs_whole(codec(), 8 * FRAMES_PER_CHUNK)
        tf32 = " (cudnn TF32 on)" if device.type == "cuda" and torch.backends.cudnn.allow_tf32 else ""
        for i, streams in enumerate(sizes.mimi_streams):
            check_time(deadline, f"Mimi at {streams} streams")
            row = mimi_row(codec(), streams, sizes.mimi_steps)
            if i == 0:
                row.notes += f"; streamed vs whole-clip: max rel err {exact:.1e}{tf32}"
            emit(row)

    def engine_fp16() -> None:
        deadline = clock.deadline(sizes.caps_s.get("engine fp16"))
        fp16 = random_model(sizes.preset, dtype=torch.float16, device=device).model
        gb, _, floor_ms = bandwidth_floor_ms(fp16, device)
        t4 = lambda ms: f"T4 floor {gb / T4_GBPS * 1000:.1f} ms at {T4_GBPS:.0f} GB/s"  # noqa: E731
        engine, note = build_engine(fp16, max(sizes.fp16_batches), sizes.grid_prefill_chunk)
        grid_rows(
            "engine fp16 (T4 shape)", engine, builder, sizes, sizes.fp16_batches, floor_ms, deadline, note, t4
        )

    section("engine bf16 graphs", "bf16", engine_bf16)
    section("e2e prompt->PCM", "bf16+fp32", e2e)
    section("mimi fp32 decode", "fp32", mimi)
    held.clear()
    section("engine fp16 (T4 shape)", "fp16", engine_fp16)
    print(flush=True)
    try:
        largest = chat_sweep(bf16, builder, sizes, clock.deadline(None))
        print(
            f"\nconversations per GPU with every reply faster than real time: reuse on {largest[True]}, "
            f"reuse off {largest[False]}",
            flush=True,
        )
    except Exception as e:
        traceback.print_exc()
        _failures.append("conversations")
        print(f"conversations: FAILED: {type(e).__name__}: {e}", flush=True)
    print(f"\n# done in {time.perf_counter() - clock.start:.0f} s", flush=True)
    if _failures:
        print(f"# FAILED sections: {', '.join(_failures)}", flush=True)
    return 1 if _failures else 0


if __name__ == "__main__":
    sys.exit(main())
