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
import dataclasses
import platform
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.gpu_budget import DRY, GPU, Clock, OutOfTime, check_time
from bench.gpu_chat import chat_sweep
from bench.gpu_engine import build_engine, grid_rows
from bench.gpu_stream import e2e_row, mimi_row, stream_vs_whole
from bench.gpu_table import COLUMNS, Row
from bench.measure import bandwidth_floor_ms, free_memory, init_profiler
from bench.report import StreamedTable
from csm.async_engine import FRAMES_PER_CHUNK
from csm.codec import MimiCodec, random_codec
from csm.loading import random_model
from csm.model import CSM
from csm.prompt import PromptBuilder
from csm.tokenizer import ByteTokenizer

T4_GBPS = 320.0  # a T4's peak memory bandwidth: its floor, from the same bytes per frame


class Sections:
    """The main table, one section after another: a section that fails becomes a FAILED row (traceback on
    stderr), one out of time a SKIPPED row, and the run goes on."""

    def __init__(self) -> None:
        self.table = StreamedTable(COLUMNS)
        self.failures: list[str] = []

    def emit(self, row: Row) -> None:
        self.table.row(row.cells())

    def run(self, name: str, dtype: str, fn: Callable[[], None]) -> None:
        try:
            fn()
        except OutOfTime as e:
            self.emit(Row(run=name, dtype=dtype, notes=f"SKIPPED: {e}"))
        except Exception as e:
            traceback.print_exc()
            self.failures.append(name)
            self.emit(Row(run=name, dtype=dtype, notes=f"FAILED: {type(e).__name__}: {e}"[:300]))
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
    sections = Sections()
    held: dict[str, object] = {}  # what one section leaves to the next: the bf16 engine, the codec

    def codec() -> MimiCodec:
        if "codec" not in held:  # fp32, as deployments/weights.py load_mimi runs it
            held["codec"] = random_codec(sizes.codec_preset, device=device, dtype=torch.float32)
        return held["codec"]

    def engine_bf16() -> None:
        deadline = clock.deadline(sizes.caps_s.get("engine bf16"))
        engine, note = build_engine(bf16, max(sizes.batches), sizes.grid_prefill_chunk)
        held["engine"] = engine
        grid_rows(
            sections.emit,
            "engine bf16 graphs",
            engine,
            builder,
            sizes,
            sizes.batches,
            bf16_floor,
            deadline,
            note,
        )

    def e2e() -> None:
        check_time(clock.deadline(sizes.caps_s.get("e2e")), "the end-to-end smoke")
        engine = held.pop("engine", None)
        if engine is None:  # the grid failed; a small engine of its own
            engine, _ = build_engine(bf16, sizes.e2e_streams, sizes.grid_prefill_chunk)
        sections.emit(e2e_row(engine, builder, codec(), sizes))

    def mimi() -> None:
        deadline = clock.deadline(sizes.caps_s.get("mimi"))
        exact = stream_vs_whole(codec(), 8 * FRAMES_PER_CHUNK)
        tf32 = " (cudnn TF32 on)" if device.type == "cuda" and torch.backends.cudnn.allow_tf32 else ""
        for i, streams in enumerate(sizes.mimi_streams):
            check_time(deadline, f"Mimi at {streams} streams")
            row = mimi_row(codec(), streams, sizes.mimi_steps)
            if i == 0:
                row.notes += f"; streamed vs whole-clip: max rel err {exact:.1e}{tf32}"
            sections.emit(row)

    def engine_fp16() -> None:
        deadline = clock.deadline(sizes.caps_s.get("engine fp16"))
        fp16 = random_model(sizes.preset, dtype=torch.float16, device=device).model
        gb, _, floor_ms = bandwidth_floor_ms(fp16, device)
        t4 = lambda ms: f"T4 floor {gb / T4_GBPS * 1000:.1f} ms at {T4_GBPS:.0f} GB/s"  # noqa: E731
        engine, note = build_engine(fp16, max(sizes.fp16_batches), sizes.grid_prefill_chunk)
        grid_rows(
            sections.emit,
            "engine fp16 (T4 shape)",
            engine,
            builder,
            sizes,
            sizes.fp16_batches,
            floor_ms,
            deadline,
            note,
            t4,
        )

    sections.run("engine bf16 graphs", "bf16", engine_bf16)
    sections.run("e2e prompt->PCM", "bf16+fp32", e2e)
    sections.run("mimi fp32 decode", "fp32", mimi)
    held.clear()
    sections.run("engine fp16 (T4 shape)", "fp16", engine_fp16)
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
        sections.failures.append("conversations")
        print(f"conversations: FAILED: {type(e).__name__}: {e}", flush=True)
    print(f"\n# done in {time.perf_counter() - clock.start:.0f} s", flush=True)
    if sections.failures:
        print(f"# FAILED sections: {', '.join(sections.failures)}", flush=True)
    return 1 if sections.failures else 0


if __name__ == "__main__":
    sys.exit(main())
