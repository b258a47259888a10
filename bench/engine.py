"""Engine benchmark: our continuous-batching engine against transformers' CSM `generate` on the same
weights, same machine, same batch, in one run; prints a table with ratios.

    python bench/engine.py                                  # `small` preset on this CPU, 1/4/16 streams
    python bench/engine.py --preset csm-1b --device cuda --dtype bf16 --streams 1,8,32,128 --no-peer --floor

Columns: aggregate frames/s over all streams; per-stream real-time factor (seconds of compute per 80 ms
frame: below 1 is faster than real time); mean time to first frame. For our engine also the steady frame
step time (median over steps with no prefill in them). `--floor` adds the memory-bandwidth floor: bytes of
parameters read per frame divided by measured device copy bandwidth. Needs only torch and transformers
(no Ray), with the repository on PYTHONPATH.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from csm.engine import Engine, EngineConfig, SamplingParams
from csm.loading import load_model, parse_dtype, random_model
from csm.model import CSM
from csm.presets import ModelArgs, preset
from csm.prompt import Prompt, PromptBuilder, Segment
from csm.tokenizer import ByteTokenizer

FRAME_S = 0.08
TEMPERATURE, TOP_K = 0.9, 50


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def make_prompts(args: ModelArgs, n: int, context_frames: int, max_frames: int) -> list[Prompt]:
    """n prompts of equal length (so the peer needs no padding) with different audio context."""
    builder = PromptBuilder(ByteTokenizer(), args)
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        heard = Segment(
            1, f"tell me about the weather {i:03d}", torch.randint(0, 2048, (context_frames, 32), generator=g)
        )
        out.append(builder.build([heard], 0, f"it is sunny and warm today {i:03d}", max_frames))
    return out


def run_ours(engine: Engine, prompts: list[Prompt], frames: int) -> dict:
    device = engine.device
    sync(device)
    t0 = time.perf_counter()
    ids = [
        engine.add(p.tokens, p.mask, frames, SamplingParams(TEMPERATURE, TOP_K, seed=i))
        for i, p in enumerate(prompts)
    ]
    first: dict[str, float] = {}
    total = 0
    steady: list[float] = []
    while engine.has_work:
        before = engine.stats.prefill_steps
        s0 = time.perf_counter()
        events = engine.step()  # returns after the frame's codes reached the host: timing is synced
        if engine.stats.prefill_steps == before:
            steady.append(time.perf_counter() - s0)
        now = time.perf_counter() - t0
        for ev in events:
            if ev.codes is not None:
                total += 1
                first.setdefault(ev.request_id, now)
    wall = time.perf_counter() - t0
    assert total == frames * len(prompts), "a stream ended early"
    return {
        "frames_s": total / wall,
        "rtf": (wall / frames) / FRAME_S,
        "ttff": statistics.mean(first[i] for i in ids),
        "step_ms": statistics.median(steady) * 1000 if steady else float("nan"),
    }


class _FirstFrame:
    """A transformers streamer that notes when the first frame of codes arrives."""

    def __init__(self, t0: float) -> None:
        self.t0, self.first = t0, None

    def put(self, value: torch.Tensor) -> None:
        if self.first is None and value.ndim == 2 and value.shape[-1] == 32:
            self.first = time.perf_counter() - self.t0

    def end(self) -> None:
        pass


@torch.no_grad()
def run_peer(hf, prompts: list[Prompt], frames: int, device: torch.device) -> dict:
    rows = []
    for p in prompts:
        text = hf.embed_text_tokens(p.tokens[:, -1].to(device))
        audio = hf.backbone_model.embed_tokens(p.tokens[None, :, :-1].to(device))[0]
        rows.append(torch.where(p.mask[:, :1].to(device), audio, text))
    emb = torch.stack(rows)
    sync(device)
    t0 = time.perf_counter()
    streamer = _FirstFrame(t0)
    out = hf.generate(
        inputs_embeds=emb,
        attention_mask=torch.ones(emb.shape[:2], dtype=torch.long, device=device),
        do_sample=True,
        temperature=TEMPERATURE,
        top_k=TOP_K,
        depth_decoder_do_sample=True,
        depth_decoder_temperature=TEMPERATURE,
        depth_decoder_top_k=TOP_K,
        max_new_tokens=frames,
        streamer=streamer,
    )
    sync(device)
    wall = time.perf_counter() - t0
    made = out.shape[1]
    return {
        "frames_s": made * len(prompts) / wall,
        "rtf": (wall / made) / FRAME_S,
        "ttff": streamer.first or wall,
        "step_ms": float("nan"),
    }


def build_pair(name: str, device: torch.device, dtype: torch.dtype, peer: bool):
    """Our model and (optionally) transformers' CSM holding the very same weights."""
    if not peer:
        return random_model(name, dtype=dtype, device=device).model, None
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from checkpoints import hf_csm  # the tests' writer: a tiny codec rides along, unused here

    hf = hf_csm(preset(name), seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        ours = load_model(tmp, dtype=dtype, device=device).model
    return ours, hf.to(device=device, dtype=dtype).eval()


def bandwidth_floor_ms(model: CSM, device: torch.device) -> tuple[float, float, float]:
    """(GB read per frame at batch 1, measured copy GB/s, floor in ms)."""
    size = lambda m: sum(p.numel() * p.element_size() for p in m.parameters())  # noqa: E731
    n_dec = model.args.num_codebooks - 1
    per_frame = (
        size(model.backbone)
        + model.codebook0_head.weight.numel() * model.codebook0_head.weight.element_size()
        + n_dec
        * (size(model.decoder) + model.projection.weight.numel() * model.projection.weight.element_size())
        + model.audio_head.numel() * model.audio_head.element_size()
    )
    buf = torch.empty(256 * 2**20, dtype=torch.float32, device=device)  # 1 GiB
    dst = torch.empty_like(buf)
    for _ in range(3):
        dst.copy_(buf)
    sync(device)
    reps = 10
    t0 = time.perf_counter()
    for _ in range(reps):
        dst.copy_(buf)
    sync(device)
    gbps = 2 * buf.numel() * 4 * reps / (time.perf_counter() - t0) / 1e9  # read + write
    return per_frame / 1e9, gbps, per_frame / 1e9 / gbps * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--streams", default="1,4,16")
    ap.add_argument("--frames", type=int, default=24)
    ap.add_argument("--context-frames", type=int, default=40)
    ap.add_argument("--no-peer", action="store_true", help="skip transformers' generate (e.g. on a GPU)")
    ap.add_argument("--floor", action="store_true", help="also report the memory-bandwidth floor")
    ap.add_argument("--prefill-chunk", type=int, default=256, help="prompt rows per prefill step")
    ap.add_argument("--no-cuda-graphs", action="store_true", help="run the frame step eagerly on CUDA")
    a = ap.parse_args()
    device, dtype = torch.device(a.device), parse_dtype(a.dtype)
    streams = [int(s) for s in a.streams.split(",")]
    torch.manual_seed(0)
    t_build = time.perf_counter()
    ours, hf = build_pair(a.preset, device, dtype, peer=not a.no_peer)
    config = EngineConfig(
        max_slots=max(streams), prefill_chunk=a.prefill_chunk, cuda_graphs=False if a.no_cuda_graphs else None
    )
    engine = Engine(ours, config).setup()
    print(
        f"# {a.preset} preset, {a.device} {a.dtype}, {a.frames} frames per stream, setup "
        f"{time.perf_counter() - t_build:.1f} s, CUDA graphs captured: {engine.n_graphs}"
    )
    warm = make_prompts(ours.args, 2, a.context_frames, a.frames)
    run_ours(engine, warm, 4)
    if hf is not None:
        run_peer(hf, warm[:1], 2, device)

    header = (
        f"{'streams':>7} | {'engine':>6} | {'frames/s':>9} | {'RTF/stream':>10} | {'first frame':>11} | "
        f"{'step ms':>8}"
    )
    print(header)
    print("-" * len(header))
    rows = []
    for n in streams:
        prompts = make_prompts(ours.args, n, a.context_frames, a.frames)
        mine = run_ours(engine, prompts, a.frames)
        peer = run_peer(hf, prompts, a.frames, device) if hf is not None else None
        for label, r in (("ours", mine), ("peer", peer)):
            if r is None:
                continue
            print(
                f"{n:>7} | {label:>6} | {r['frames_s']:>9.1f} | {r['rtf']:>10.3f} | "
                f"{r['ttff'] * 1000:>8.0f} ms | {r['step_ms']:>8.2f}"
            )
        rows.append((n, mine, peer))
    if hf is not None:
        print("\nratios (ours / peer): frames/s higher is better, first frame lower is better")
        for n, mine, peer in rows:
            print(
                f"{n:>7} streams: frames/s x{mine['frames_s'] / peer['frames_s']:.2f}, "
                f"first frame x{mine['ttff'] / peer['ttff']:.2f}"
            )
    # Steady state: every active stream gets one frame per step, so a step under 80 ms is real time.
    realtime = [n for n, mine, _ in rows if mine["step_ms"] < FRAME_S * 1000]
    best = max(realtime) if realtime else "none"
    print(f"\nlargest stream count with every stream faster than real time (step < 80 ms): {best}")
    if a.floor:
        gb, gbps, floor = bandwidth_floor_ms(ours, device)
        b1 = next((m["step_ms"] for n, m, _ in rows if n == 1), float("nan"))
        print(
            f"batch-1 frame: {b1:.2f} ms; floor: {gb:.2f} GB read per frame / {gbps:.0f} GB/s copy bandwidth "
            f"= {floor:.2f} ms; ratio to floor x{b1 / floor:.2f}"
        )


if __name__ == "__main__":
    main()
