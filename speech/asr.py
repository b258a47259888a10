"""Speech to text, for whole utterances and for turns recognized while they are spoken: what every backend
shares, and the backend by name.

A `Transcriber` does both:
- `transcribe(batch)`: the text of each whole utterance (the end-of-turn path, when the ingress's
  `streaming_asr` is off, and the `SpeechRecognizer.transcribe` call);
- `open()` → a stream, then `step(pushes)`: each push adds a chunk of one stream's audio and returns its
  transcript so far (its final transcript when the push is the stream's last). One step takes pushes of
  many streams; a backend decodes them together where it can.

Backends (`make_transcriber`): `speech.asr_pocketsphinx` (bundled model, CPU) decodes incrementally, so at
a turn's end only the last chunk is left to decode; `speech.asr_whisper` (weights needed; for GPU nodes)
decodes in stretches closed by pauses, batched across streams. Everything here is plain Python (no Ray);
`deployments/recognizer.py` serves it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import numpy as np
import torch

from csm.audio import SAMPLE_RATE, resample
from speech.pcm import SPEECH_SAMPLE_RATE, StreamResampler, check_pcm, is_silent

__all__ = [
    "MIN_TRANSCRIBE_SAMPLES",
    "AgreedWords",
    "Push",
    "RecognitionStream",
    "Transcriber",
    "make_transcriber",
    "to_asr_rate",
]

MIN_TRANSCRIBE_SAMPLES = SAMPLE_RATE // 10  # under 100 ms at 24 kHz there is no word to find


def to_asr_rate(pcm: np.ndarray) -> np.ndarray:
    """float mono 24 kHz → float32 16 kHz, checked; empty if there is nothing to decode (silence)."""
    samples = check_pcm(pcm)
    if is_silent(samples):
        return samples[:0]
    return resample(torch.from_numpy(samples), SAMPLE_RATE, SPEECH_SAMPLE_RATE).numpy()


class RecognitionStream:
    """One turn's recognition state: what every backend's stream tracks (a backend adds its own)."""

    def __init__(self) -> None:
        self.samples = 0  # 24 kHz input samples pushed
        self.loud = False  # any sample above digital silence: until then there is nothing to hear
        self.done = False
        self._resampler = StreamResampler()

    def take(self, pcm: np.ndarray, final: bool) -> np.ndarray:
        """Account for a 24 kHz chunk; its audio at 16 kHz (with the stream's tail when `final`)."""
        if self.done:
            raise ValueError("the stream has ended")
        samples = check_pcm(pcm)
        self.samples += samples.size
        self.loud = self.loud or not is_silent(samples)
        audio = self._resampler.push(samples)
        if final:
            audio = np.concatenate([audio, self._resampler.flush()])
            self.done = True
        return audio

    @property
    def audible(self) -> bool:
        """Whether the stream may hold a word: not digital silence and at least 100 ms long."""
        return self.loud and self.samples >= MIN_TRANSCRIBE_SAMPLES


@dataclass
class Push:
    stream: RecognitionStream
    pcm: np.ndarray  # float32 mono 24 kHz
    final: bool = False


class Transcriber(Protocol):
    def transcribe(self, batch: list[np.ndarray]) -> list[str]:
        """Text of each utterance (float32 mono 24 kHz), in order; "" where nothing was recognised."""
        ...

    def open(self) -> RecognitionStream:
        """A new stream (a turn starting)."""
        ...

    def step(self, pushes: Sequence[Push]) -> list[str]:
        """Decode each push's audio; each stream's transcript so far, final for a final push. A stream
        appears at most once per step (its pushes are ordered by the caller)."""
        ...

    def close(self, stream: RecognitionStream) -> None:
        """Release what an unfinished stream holds (a turn cleared, or a slot reclaimed)."""
        ...


class AgreedWords:
    """Partial transcripts → append-only deltas, by local agreement: a word is sent once two successive
    hypotheses agree on it and on everything before it, so a sent word is never taken back (a later
    hypothesis that revises it is held until it agrees again, past what was sent)."""

    def __init__(self) -> None:
        self.sent: list[str] = []
        self._last: list[str] = []

    def update(self, hypothesis: str) -> str:
        """The delta to send for this hypothesis ("" for none): new agreed words, space-joined."""
        words = hypothesis.split()
        agreed: list[str] = []
        for a, b in zip(self._last, words, strict=False):
            if a != b:
                break
            agreed.append(a)
        self._last = words
        n = len(self.sent)
        if len(agreed) <= n or agreed[:n] != self.sent:
            return ""
        new = agreed[n:]
        self.sent += new
        return (" " if n else "") + " ".join(new)


def make_transcriber(
    backend: Literal["pocketsphinx", "whisper"],
    whisper_path: str | Path | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Transcriber:
    """The ASR backend by exact name; Whisper needs its weights directory."""
    # Each backend's module is imported only when it is chosen: they import this one, and each loads its
    # own native library or model code.
    if backend == "pocketsphinx":
        from speech.asr_pocketsphinx import PocketsphinxTranscriber

        return PocketsphinxTranscriber()
    if backend == "whisper":
        if whisper_path is None:
            raise ValueError("the whisper backend needs whisper_path: a local Whisper weights directory")
        from speech.asr_whisper import WhisperTranscriber

        return WhisperTranscriber(whisper_path, device=device, dtype=dtype)
    raise ValueError(f"unknown ASR backend {backend!r}: expected 'pocketsphinx' or 'whisper'")
