"""Benchmark: batched exact streaming Mimi decode vs what a naive server does with transformers' Mimi.

Naive server: for each stream separately, every new frame → `MimiModel.decode` of the whole reply so far,
keep the new 1920-sample tail. Ours: one `StreamingDecoder.step` per frame for all streams at once. Both
run in the same process on the same random-weight codec; the table gives throughput (seconds of audio per
second), per-frame latency (wall time to get the next 80 ms of every stream onto the host) and their ratios.

    python bench/codec.py                                   # CPU, "small" preset, 1/8/32 streams
    python bench/codec.py --preset mimi --device cuda --dtype bfloat16 --streams 1,8,32,64
    python bench/codec.py --recovery --preset mimi          # SNR of state recovery from the last N frames

Needs only torch, transformers and this repository on PYTHONPATH (no Ray). On a CPU shared with other
work, pass `--threads 1`: two OpenMP threads fighting for two busy cores make every small op take ~10 ms.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import quantile
from csm.audio import FRAME_SECONDS, FRAME_SIZE
from csm.codec import NUM_CODEBOOKS, PRESETS, MimiCodec, random_codec
from csm.codec_streaming import StreamingDecoder


def _random_codes(streams: int, frames: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2048, (streams, NUM_CODEBOOKS, frames), generator=generator)


def bench_streaming(codec: MimiCodec, codes: torch.Tensor, warmup: int) -> tuple[float, list[float]]:
    """Total seconds and per-step seconds for decoding all streams one frame per step."""
    streams, _, frames = codes.shape
    codes = codes.to(codec.device)
    decoder = StreamingDecoder(codec, streams, max_frames_per_step=1)
    steps: list[float] = []
    for timed_frames in (min(warmup, frames), frames):  # a warm pass, then the timed one from fresh streams
        for slot in range(streams):
            decoder.open(slot)
        steps = []
        for t in range(timed_frames):
            start = time.perf_counter()
            decoder.step(codes[:, :, t : t + 1]).cpu()
            steps.append(time.perf_counter() - start)
    return sum(steps), steps


def bench_naive(codec: MimiCodec, codes: torch.Tensor, warmup: int) -> tuple[float, list[float]]:
    """Total and per-frame seconds (all streams) of decoding the whole reply so far, stream by stream."""
    streams, _, frames = codes.shape
    codes = codes.to(codec.device)
    for t in range(min(warmup, frames)):
        codec.decode(codes[:1, :, : t + 1])[:, -FRAME_SIZE:].cpu()
    per_frame = [0.0] * frames
    for stream in range(streams):
        for t in range(frames):
            start = time.perf_counter()
            codec.decode(codes[stream : stream + 1, :, : t + 1])[:, -FRAME_SIZE:].cpu()
            per_frame[t] += time.perf_counter() - start
    return sum(per_frame), per_frame


def throughput_table(args: argparse.Namespace) -> None:
    device = torch.device(args.device)
    codec = random_codec(args.preset, device=device, dtype=getattr(torch, args.dtype))
    print(
        f"# Mimi decode, preset {args.preset!r} (random weights), {args.device} {args.dtype}, "
        f"{args.frames} frames ({args.frames * FRAME_SECONDS:.1f} s) per stream, torch threads "
        f"{torch.get_num_threads()}"
    )
    print(
        f"# naive measured on min(streams, {args.naive_streams}) streams, scaled linearly (it is sequential)"
    )
    header = (
        "| streams | ours audio s/s | naive audio s/s | throughput × | ours ms/frame (p50 / p95) "
        "| naive ms/frame (mean / last) | latency × (p50 vs mean) |"
    )
    print(header)
    print("|---" * (header.count("|") - 1) + "|")
    for streams in args.streams:
        codes = _random_codes(streams, args.frames, seed=streams)
        ours_total, ours_steps = bench_streaming(codec, codes, args.warmup)
        measured = min(streams, args.naive_streams)
        naive_total, naive_frames = bench_naive(codec, codes[:measured], args.warmup)
        scale = streams / measured
        naive_total *= scale
        naive_frames = [seconds * scale for seconds in naive_frames]
        audio = streams * args.frames * FRAME_SECONDS
        ours_p50 = statistics.median(ours_steps)
        ours_p95 = quantile(ours_steps, 95)
        naive_mean = naive_total / args.frames
        print(
            f"| {streams} | {audio / ours_total:.1f} | {audio / naive_total:.2f} | "
            f"{naive_total / ours_total:.1f} | {ours_p50 * 1e3:.1f} / {ours_p95 * 1e3:.1f} | "
            f"{naive_mean * 1e3:.1f} / {naive_frames[-1] * 1e3:.1f} | {naive_mean / ours_p50:.1f} |",
            flush=True,
        )


def snr_db(reference: torch.Tensor, estimate: torch.Tensor) -> float:
    noise = (reference - estimate).pow(2).sum().clamp_min(1e-30)
    return float(10 * torch.log10(reference.pow(2).sum() / noise))


def recovery_table(args: argparse.Namespace) -> None:
    """SNR of the audio after rebuilding a stream's state from its last N frames, vs the exact decode."""
    device = torch.device(args.device)
    codec = random_codec(args.preset, device=device, dtype=getattr(torch, args.dtype))
    window_frames = codec.config.sliding_window // 2
    horizon = 25  # the 2 s a listener hears right after the recovery point
    point = max(args.recovery_frames) + 4
    print(
        f"# state recovery, preset {args.preset!r} (random weights, attention window {window_frames} "
        "frames), "
        f"{args.device} {args.dtype}: SNR (dB) of the {horizon * FRAME_SECONDS:.0f} s after frame {point}, "
        f"{args.trials} random code sequences"
    )
    print("| N frames | mean SNR dB | min SNR dB |")
    print("|---|---|---|")
    decoder = StreamingDecoder(codec, 1, max_frames_per_step=8)
    trials = []
    for trial in range(args.trials):
        codes = _random_codes(1, point + horizon, seed=1000 + trial).to(device)
        exact = codec.decode(codes)[0, point * FRAME_SIZE :]
        trials.append((codes, exact))
    for frames in args.recovery_frames:
        snrs = []
        for codes, exact in trials:
            decoder.recover(0, codes[0, :, :point], frames=frames)
            tail = [decoder.step(codes[:, :, t : t + 8]) for t in range(point, point + horizon, 8)]
            snrs.append(snr_db(exact, torch.cat(tail, dim=-1)[0, : exact.shape[0]]))
        print(f"| {frames} | {statistics.mean(snrs):.1f} | {min(snrs):.1f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--preset", default="small", choices=sorted(PRESETS))
    parser.add_argument("--streams", default="1,8,32", type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--frames", default=50, type=int, help="frames per stream (80 ms each)")
    parser.add_argument("--warmup", default=5, type=int, help="untimed frames first")
    parser.add_argument("--naive-streams", default=4, type=int, help="streams the naive decode is timed on")
    parser.add_argument("--threads", default=0, type=int, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--recovery", action="store_true", help="measure state recovery SNR instead")
    parser.add_argument(
        "--recovery-frames",
        default="0,1,2,4,8,16,32,64,128,132",
        type=lambda s: [int(x) for x in s.split(",")],
    )
    parser.add_argument("--trials", default=4, type=int)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    if args.recovery:
        recovery_table(args)
    else:
        throughput_table(args)


if __name__ == "__main__":
    main()
