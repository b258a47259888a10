"""Prefill widths on CPU: aligned (`EngineConfig.prefill_align`, 16) against exact, in one process; what each
costs in time and in memory that stays.

    python bench/prefill_shapes.py                      # `tiny` (the demo's), 300 prompts per side
    python bench/prefill_shapes.py --preset small --prompts 200

On CPU the engine's matmuls run on oneDNN from prepacked weights, and oneDNN (with PyTorch's ideep
wrapper) builds and caches a primitive per matmul shape: JIT-compiled code and, for some shapes, the
weight in another layout. A conversation's prompts have as many lengths as its turns, so exact prefill
widths make a new shape nearly every reply, and the caches (1,024 entries each by default) fill for
hours. Each side prefills `--prompts` fresh prompts of distinct lengths (`--min-rows` to `--max-rows`,
shuffled, the same on both sides) and makes one frame from each: median and mean ms from `add` to that
frame, the distinct widths its prefill steps computed, and the growth of the process's anonymous
memory (RssAnon) over the side. Aligned runs first, so exact pays for its own new shapes only. Run it
with the app's allocator settings (serve_config.yaml's runtime_env) for memory that frees to show as
freed:

    MALLOC_ARENA_MAX=2 MALLOC_MMAP_THRESHOLD_=65536 MALLOC_TRIM_THRESHOLD_=131072 \
        python bench/prefill_shapes.py

Needs only torch (no Ray), with the repository on PYTHONPATH.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.load_procs import rss_mb
from bench.report import machine_line, markdown
from csm.engine import Engine, EngineConfig, SamplingParams
from csm.loading import random_model


def rss_anon_mb() -> float:
    return rss_mb(os.getpid(), "RssAnon")


def run_side(model, align: int, lengths: list[int], chunk: int) -> dict:
    engine = Engine(model, EngineConfig(max_slots=2, prefill_chunk=chunk, prefill_align=align)).setup()
    widths: set[int] = set()
    fill = model.backbone.fill_cache

    def recording(x, *args):
        widths.add(x.shape[0] * x.shape[1])  # the rows of every matmul in the step
        return fill(x, *args)

    args = model.args
    g = torch.Generator().manual_seed(align)
    times = []
    model.backbone.fill_cache = recording
    before = rss_anon_mb()
    try:
        for n in lengths:
            tokens = torch.randint(0, args.audio_vocab_size - 1, (n, args.num_codebooks + 1), generator=g)
            tokens[:, -1] = torch.randint(0, 256, (n,), generator=g)
            mask = torch.ones_like(tokens, dtype=torch.bool)
            start = time.perf_counter()
            engine.add(tokens, mask, 1, SamplingParams(temperature=0.0))
            engine.run_to_completion()
            times.append(time.perf_counter() - start)
    finally:
        del model.backbone.fill_cache
    return {
        "ms_p50": statistics.median(times) * 1000,
        "ms_mean": statistics.fmean(times) * 1000,
        "widths": len(widths),
        "mb": rss_anon_mb() - before,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--prompts", type=int, default=300)
    ap.add_argument("--min-rows", type=int, default=20)
    ap.add_argument("--max-rows", type=int, default=600, help="past prefill_chunk: several steps per prompt")
    ap.add_argument("--prefill-chunk", type=int, default=256)
    ap.add_argument("--align", type=int, default=EngineConfig().prefill_align)
    a = ap.parse_args()
    if not 1 <= a.min_rows <= a.max_rows or a.max_rows - a.min_rows + 1 < a.prompts:
        ap.error("need --prompts distinct lengths in [--min-rows, --max-rows]")
    torch.set_num_threads(1)  # as a replica runs
    model = random_model(a.preset, seed=0).model
    lengths = random.Random(7).sample(range(a.min_rows, a.max_rows + 1), a.prompts)
    run_side(model, a.align, lengths[:8], a.prefill_chunk)  # warm-up: first-call costs off both sides
    aligned = run_side(model, a.align, lengths, a.prefill_chunk)
    exact = run_side(model, 1, lengths, a.prefill_chunk)
    print(machine_line())
    print(
        f"# {a.preset} preset, cpu float32, 1 torch thread; {a.prompts} prompts of {a.min_rows}-{a.max_rows} "
        f"rows (distinct), prefill_chunk {a.prefill_chunk}; add → first frame"
    )
    rows = [
        [name, str(s["widths"]), f"{s['ms_p50']:.1f}", f"{s['ms_mean']:.1f}", f"{s['mb']:+.0f}"]
        for name, s in ((f"aligned ({a.align})", aligned), ("exact", exact))
    ]
    rows.append(
        [
            "exact ÷ aligned",
            f"{exact['widths'] / aligned['widths']:.1f}",
            f"{exact['ms_p50'] / aligned['ms_p50']:.2f}",
            f"{exact['ms_mean'] / aligned['ms_mean']:.2f}",
            "",
        ]
    )
    print(markdown(["prefill widths", "distinct step sizes", "ms p50", "ms mean", "RssAnon MB"], rows))


if __name__ == "__main__":
    main()
