"""Pocketsphinx search settings: decoding cost, end-of-turn wait and words heard, per setting, in one run.

    python bench/asr.py                # every setting below, 3 passes over 6 espeak-ng sentences

Each sentence (bench/load_client.py's four and the browser test's) is decoded live as the recognizer does
it: `process_raw` per 640 ms chunk (the ingress's) with a partial `hyp()` after each, then `end_utt`. Per
setting: CPU seconds per second of speech (process time, this process only), the slowest `end_utt` (what
is left to do when the turn ends), the key words heard (out of the sentences' key words), and the CPU
ratio against pocketsphinx's defaults measured in the same run. `speech.asr_pocketsphinx.SPHINX_SEARCH`
is the setting the app uses.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.load_client import SENTENCES
from bench.report import machine_line
from csm.audio import SAMPLE_RATE
from devtools.realtime_client import speech
from serve_app.speech import ENCODE_CHUNK
from speech.asr import to_asr_rate
from speech.asr_pocketsphinx import SPHINX_SEARCH, pcm16
from speech.pcm import SPEECH_SAMPLE_RATE

TEXTS = (*SENTENCES, "What is the weather like today? One two three four five.", "hello world")
KEY_WORDS = (  # words a listener needs; a setting is judged by how many it hears
    ("weather", "tomorrow", "morning"),
    ("table", "two", "people", "eight"),
    ("walk", "train", "station"),
    ("remind", "sister", "lunch", "friday"),
    ("weather", "three", "four", "five"),
    ("hello", "world"),
)
SETTINGS: dict[str, dict] = {
    "defaults": {},
    "no fwdflat": {"fwdflat": False},
    "no fwdflat, no bestpath": {"fwdflat": False, "bestpath": False},
    "app (SPHINX_SEARCH)": SPHINX_SEARCH,
    "fwdflat on, hmm 3000, wpf 10": {"maxhmmpf": 3000, "maxwpf": 10},
    "no fwdflat, topn 2": {"fwdflat": False, "topn": 2},
    "no fwdflat, ds 2": {"fwdflat": False, "ds": 2},
    "no fwdflat, narrow beams": {"fwdflat": False, "beam": 1e-40, "wbeam": 1e-30, "pbeam": 1e-40},
    "app, hmm 1500, wpf 5": {**SPHINX_SEARCH, "maxhmmpf": 1500, "maxwpf": 5},
    "app, narrow beams": {**SPHINX_SEARCH, "beam": 1e-40, "wbeam": 1e-30, "pbeam": 1e-40},
    "app, pl_window 5": {**SPHINX_SEARCH, "pl_window": 5},
}
PASSES = 3
CHUNK = ENCODE_CHUNK * SPEECH_SAMPLE_RATE // SAMPLE_RATE  # the ingress's chunk, at 16 kHz


def decode(decoder, audio: np.ndarray) -> tuple[str, float, float]:
    """(hypothesis, CPU s of the whole decode, CPU s of `end_utt` and the final hyp)."""
    t0 = time.process_time()
    decoder.start_utt()
    for i in range(0, audio.size, CHUNK):
        decoder.process_raw(pcm16(audio[i : i + CHUNK]), False, False)
        decoder.hyp()
    t1 = time.process_time()
    decoder.end_utt()
    hyp = decoder.hyp()
    t2 = time.process_time()
    return (hyp.hypstr if hyp is not None else ""), t2 - t0, t2 - t1


def main() -> int:
    argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    ).parse_args()
    from pocketsphinx import Decoder

    folder = Path(tempfile.mkdtemp(prefix="asr_bench_"))
    try:
        audios = [to_asr_rate(speech(t, folder, 0.3, 0.5).astype(np.float32) / 32768.0) for t in TEXTS]
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    seconds = sum(a.size for a in audios) / SPEECH_SAMPLE_RATE
    rows, heard_by = [], {}
    for name, options in SETTINGS.items():
        decoder = Decoder(samprate=SPEECH_SAMPLE_RATE, loglevel="FATAL", **options)
        cpu, worst_end, hyps = 0.0, 0.0, []
        for _ in range(PASSES):
            hyps = []
            for audio in audios:
                hyp, total, end = decode(decoder, audio)
                cpu, worst_end = cpu + total, max(worst_end, end)
                hyps.append(hyp)
        heard = sum(w in h.split() for h, words in zip(hyps, KEY_WORDS, strict=True) for w in words)
        rows.append((name, cpu / (PASSES * seconds), worst_end, heard))
        heard_by[name] = hyps
    base = rows[0][1]
    total_words = sum(len(w) for w in KEY_WORDS)
    print(machine_line())
    print(f"# date: {datetime.now().astimezone():%Y-%m-%d %H:%M %Z}; command: python bench/asr.py")
    print(f"# {len(TEXTS)} espeak-ng sentences, {seconds:.1f} s of audio, {PASSES} passes; live decode\n")
    print("| setting | CPU s per s of speech | vs defaults | slowest end_utt ms | key words heard |")
    print("|---|---:|---:|---:|---:|")
    for name, rtf, end, heard in rows:
        print(f"| {name} | {rtf:.3f} | {rtf / base:.2f} | {end * 1000:.0f} | {heard} / {total_words} |")
    print()
    for name, hyps in heard_by.items():
        print(f"{name}:")
        for hyp in hyps:
            print(f"    {hyp}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
