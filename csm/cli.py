"""`csm-demo`: command-line generation with the batching engine (what `make demo` runs until the Serve app
exists). With no weights it runs the random `tiny` preset and says so: the codes it makes are noise.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import time

import torch

from csm.async_engine import AsyncEngine
from csm.audio import FRAME_SECONDS
from csm.checkpoint import load_checkpoint
from csm.engine import Engine, EngineConfig, SamplingParams
from csm.loading import LoadedModel, parse_dtype
from csm.presets import PRESET_NAMES
from csm.prompt import PromptBuilder, Segment
from csm.tokenizer import TextTokenizer

_LINES = [
    "Hello! How has your day been so far?",
    "I was thinking we could go for a walk later.",
    "That sounds lovely, let me grab my coat.",
    "Did you hear the news this morning?",
]


def _load(args: argparse.Namespace) -> tuple[LoadedModel, TextTokenizer]:
    try:
        return load_checkpoint(args.model_path, None, args.preset, parse_dtype(args.dtype), args.device)
    except (FileNotFoundError, ValueError) as e:  # a missing path, a bad checkpoint: say which, no trace
        raise SystemExit(str(e)) from e


async def _stream(
    engine: AsyncEngine, prompt, frames: int, seed: int, delay: float
) -> tuple[int, float, float]:
    await asyncio.sleep(delay)
    start = time.perf_counter()
    first = None
    n = 0
    async for _codes in engine.generate(prompt.tokens, prompt.mask, frames, SamplingParams(seed=seed)):
        if first is None:
            first = time.perf_counter() - start
        n += 1
    return n, first or 0.0, time.perf_counter() - start


async def _generate(args: argparse.Namespace) -> int:
    loaded, tokenizer = _load(args)
    model = loaded.model
    builder = PromptBuilder(tokenizer, model.args)
    n_params = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"model: {loaded.source} ({loaded.format}), {n_params:.1f}M params")
    engine = AsyncEngine(Engine(model, EngineConfig(max_slots=max(args.streams, 1))))
    rng = torch.Generator().manual_seed(0)
    prompts = []
    for i in range(args.streams):
        # A short "heard" context with random codes stands in for the person's encoded speech.
        heard = Segment(1, _LINES[(i + 1) % len(_LINES)], torch.randint(0, 2048, (12, 32), generator=rng))
        prompts.append(builder.build([heard], 0, _LINES[i % len(_LINES)], args.frames))
    start = time.perf_counter()
    results = await asyncio.gather(
        *(_stream(engine, p, args.frames, i, i * args.stagger) for i, p in enumerate(prompts))
    )
    wall = time.perf_counter() - start
    engine.close()
    total = sum(n for n, _, _ in results)
    for i, (n, first, dur) in enumerate(results):
        rtf = dur / max(n * FRAME_SECONDS, 1e-9)
        print(
            f"stream {i}: {n} frames ({n * FRAME_SECONDS:.2f} s of audio), "
            f"first frame after {first * 1000:.0f} ms, real-time factor {rtf:.2f}"
        )
    batches = engine.engine.stats.batch_sizes
    print(
        f"total: {total} frames in {wall:.2f} s = {total / wall:.1f} frames/s; "
        f"mean batch {sum(batches) / max(len(batches), 1):.1f}, max batch {max(batches, default=0)}"
    )
    return 0


def _download(args: argparse.Namespace) -> int:
    """Fetch a checkpoint from the Hugging Face Hub (needs the internet and, for gated repos, a token)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    token = args.token or os.environ.get("HF_TOKEN")
    try:
        path = snapshot_download(args.repo, revision=args.revision, local_dir=args.dir, token=token)
    except LocalEntryNotFoundError as e:
        print(f"could not download {args.repo}: no connection to the Hub ({e})", file=sys.stderr)
        return 1
    except HfHubHTTPError as e:  # 401/403: gated repo without access; 404: wrong name
        print(f"could not download {args.repo}: {e}", file=sys.stderr)
        if token is None:
            print(
                "sesame/csm-1b is gated: accept its terms on the Hub and pass --token or HF_TOKEN",
                file=sys.stderr,
            )
        return 1
    print(f"downloaded {args.repo} to {path}\nrun with: MODEL_PATH={path} make demo")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="csm-demo", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate frames for several concurrent streams and report speed")
    gen.add_argument("--model-path", help="checkpoint directory (either format); default $MODEL_PATH")
    gen.add_argument(
        "--preset", default="tiny", choices=PRESET_NAMES, help="random-weight preset without weights"
    )
    gen.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    gen.add_argument("--dtype", default="float32")
    gen.add_argument("--streams", type=int, default=4)
    gen.add_argument("--frames", type=int, default=24)
    gen.add_argument("--stagger", type=float, default=0.05, help="seconds between stream starts")
    down = sub.add_parser(
        "download", help="fetch the CSM checkpoint from the Hugging Face Hub (with progress)"
    )
    down.add_argument("--repo", default="sesame/csm-1b")
    down.add_argument("--revision", default=None)
    down.add_argument("--dir", default="weights/csm-1b", help="where to put it (default: weights/csm-1b)")
    down.add_argument("--token", default=None, help="Hub token (default: $HF_TOKEN)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "generate":
        return asyncio.run(_generate(args))
    if args.command == "download":
        return _download(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
