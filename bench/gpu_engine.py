"""Sections 1 and 4 of the GPU run (bench/gpu.py): the engine grid, per-frame step time at each batch x
prompt length, with frames/s, real-time streams, kernels per frame and peak memory; and the engine helpers
the other sections share (prompts of an exact length, graphs warmed, draining)."""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file too (`--help`)

from bench.gpu_budget import Sizes, check_time
from bench.gpu_table import DTYPE_NAMES, Row
from bench.measure import count_kernels, peak_gib, reset_peak, sync
from csm.audio import FRAME_SECONDS
from csm.engine import Engine, EngineConfig, SamplingParams
from csm.model import CSM
from csm.prompt import Prompt, PromptBuilder, Segment
from csm.sampling import TEMPERATURE, TOP_K

MIMI_CODES = 2048  # ids past these are never audio (deployments/generator.py maps them to 0)


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
    return SamplingParams(TEMPERATURE, TOP_K, seed=seed)


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
    emit: Callable[[Row], None],
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
            realtime = mean <= FRAME_SECONDS
            notes = [f"RTF {mean / FRAME_SECONDS:.2f}"]
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
