"""Turn detection for many conversations: each detector pushed alone against all pushed together in one
batch (`speech.vad.push_many`, what the ingress's `VadBatcher` does with pushes that wait together).

    python bench/vad.py                   # 1, 2, 4, 8 and 16 conversations, 80 ms pushes

Every conversation pushes the same kind of audio the page sends (80 ms chunks of an espeak-ng sentence
between silences, each conversation offset by a few windows), one torch thread. Per count: CPU per 32 ms
window scored, alone and together (median of 3 trials, alternating), and the ratio. Both sides' events are
checked equal first.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import machine_line, markdown
from csm.audio import FRAME_SIZE, SAMPLE_RATE
from devtools.realtime_client import speech
from speech.vad import _WINDOW_IN, TurnDetector, push_many

TRIALS = 3


def run(streams: list[np.ndarray], together: bool) -> tuple[float, list]:
    """(CPU seconds, every detector's events) for pushing `streams` in 80 ms chunks, in lockstep."""
    detectors = [TurnDetector() for _ in streams]
    events: list = [[] for _ in streams]
    began = time.process_time()
    for start in range(0, streams[0].size, FRAME_SIZE):
        chunks = [s[start : start + FRAME_SIZE] for s in streams]
        if together:
            for i, found in enumerate(push_many(list(zip(detectors, chunks, strict=True)))):
                events[i] += found
        else:
            for i, (detector, chunk) in enumerate(zip(detectors, chunks, strict=True)):
                events[i] += detector.push(chunk)
    return time.process_time() - began, events


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--conversations", default="1,2,4,8,16", type=lambda s: [int(x) for x in s.split(",")])
    args = ap.parse_args()
    torch.set_num_threads(1)
    folder = Path(tempfile.mkdtemp(prefix="vad_bench_"))
    try:
        said = speech("What is the weather like tomorrow morning?", folder, 0.5, 1.0)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    audio = said.astype(np.float32) / 32768.0
    rows = []
    for n in args.conversations:
        streams = [np.roll(audio, 3 * _WINDOW_IN * i) for i in range(n)]
        windows = n * (audio.size // _WINDOW_IN)
        _, alone_events = run(streams, together=False)
        _, together_events = run(streams, together=True)
        if alone_events != together_events:
            raise SystemExit(f"{n} conversations: the events differ")
        times: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(TRIALS):
            for together in (False, True):
                times[together].append(run(streams, together)[0] / windows * 1000)
        alone, batched = statistics.median(times[False]), statistics.median(times[True])
        rows.append([str(n), f"{alone:.3f}", f"{batched:.3f}", f"{alone / batched:.2f}"])
    print(machine_line())
    print(f"# date: {datetime.now().astimezone():%Y-%m-%d %H:%M %Z}; command: python bench/vad.py")
    print(f"# {audio.size / SAMPLE_RATE:.1f} s a conversation, 80 ms pushes; {TRIALS} trials; events equal\n")
    print(markdown(["conversations", "alone ms per window", "together ms per window", "ratio"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
