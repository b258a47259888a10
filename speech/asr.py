"""Speech to text, for whole utterances and for turns recognized while they are spoken.

A `Transcriber` does both:
- `transcribe(batch)`: the text of each whole utterance (the end-of-turn path, `RecognizerOptions.streaming`
  off, and the `SpeechRecognizer.transcribe` call);
- `open()` → a stream, then `step(pushes)`: each push adds a chunk of one stream's audio and returns its
  transcript so far (its final transcript when the push is the stream's last). One step takes pushes of
  many streams; a backend decodes them together where it can.

Backends: `PocketsphinxTranscriber` (bundled model, CPU) decodes incrementally, so at a turn's end only the
last chunk is left to decode. `WhisperTranscriber` (weights needed; for GPU nodes) decodes in stretches
closed by pauses, batched across streams. Everything here is plain Python (no Ray);
`deployments/recognizer.py` serves it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import numpy as np
import torch

from csm.audio import SAMPLE_RATE, resample
from csm.host import to_host
from speech.pcm import SPEECH_SAMPLE_RATE, StreamResampler, check_pcm, is_silent

log = logging.getLogger(__name__)

__all__ = [
    "MIN_TRANSCRIBE_SAMPLES",
    "AgreedWords",
    "PocketsphinxTranscriber",
    "Push",
    "RecognitionStream",
    "Stretcher",
    "Transcriber",
    "WhisperTranscriber",
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


def _pcm16(audio: np.ndarray) -> bytes:
    return np.round(np.clip(audio, -1.0, 1.0) * 32767.0).astype("<i2").tobytes()


class _SphinxStream(RecognitionStream):
    def __init__(self) -> None:
        super().__init__()
        self.decoder = None  # taken from the pool at the stream's first audio
        self.text = ""


# The live streams' search, measured by bench/asr.py on espeak-ng sentences (bench/RESULTS.md): the default
# second pass (`fwdflat`) re-decodes the whole utterance at `end_utt`, 0.4-0.7 s after a 4 s turn, which is
# the end-of-turn wait streaming is for; without it, and with the first pass's active HMMs and words per
# frame capped, live decoding costs about half the CPU, `end_utt` takes ~50 ms, and as many key words are
# heard. Whole utterances (`transcribe`, the end-of-turn path) keep the defaults: there the second pass is
# all the work anyway, and it hears short clips better ("hello world", without it "oh where are all").
SPHINX_SEARCH = {"fwdflat": False, "maxhmmpf": 3000, "maxwpf": 10}


class _DecoderPool:
    """Idle decoders of one configuration: a decoder takes ~0.3 s to build and holds ~90 MB."""

    def __init__(self, make, max_idle: int) -> None:
        self._make = make
        self._idle: list = []
        self._max_idle = max_idle
        self._lock = threading.Lock()  # each decoder is used by one caller at a time

    def take(self):
        with self._lock:
            if self._idle:
                return self._idle.pop()
        return self._make()

    def give(self, decoder) -> None:
        with self._lock:
            if len(self._idle) < self._max_idle:
                self._idle.append(decoder)


class PocketsphinxTranscriber:
    """CMU PocketSphinx with its bundled US-English model: no downloads, CPU only, rough but always there.

    A decoder decodes one utterance at a time, so decoders are pooled (one pool per search: live streams
    use `SPHINX_SEARCH`, whole utterances the defaults): a stream takes one at its first audio and gives
    it back at its end; at most `max_idle` wait. Live decoding costs ~0.2–0.35 s per second of speech on
    one core and holds the GIL all along (measured: a Python thread beside `process_raw` ran at 1% of its
    speed), so threads cannot decode two streams at once: concurrency comes from replicas, each decoding
    its streams' chunks in turn.
    A stream is decoded live (`process_raw` per chunk), as the person speaks; `transcribe` decodes a whole
    utterance at once (batch CMN), which can differ slightly. Live decoding adapts its cepstral mean (CMN)
    to the channel as it goes and a decoder keeps it from one stream to the next, as pocketsphinx means
    it to: starting every stream from the model's prior instead was measured worse ("hello world" heard
    as "oh the world"), since a turn's first second would be decoded against a mean far from the mic's.
    """

    def __init__(self, max_idle: int = 4) -> None:
        from pocketsphinx import Decoder  # imported here: only this backend needs the C extension

        self._live = _DecoderPool(
            lambda: Decoder(samprate=SPEECH_SAMPLE_RATE, loglevel="FATAL", **SPHINX_SEARCH), max_idle
        )
        self._whole = _DecoderPool(lambda: Decoder(samprate=SPEECH_SAMPLE_RATE, loglevel="FATAL"), max_idle)
        self._live.give(self._live.take())  # one built now: the first stream does not wait for it

    def transcribe(self, batch: list[np.ndarray]) -> list[str]:
        return [self._one(to_asr_rate(pcm)) for pcm in batch]

    def _one(self, audio: np.ndarray) -> str:
        if audio.size == 0:
            return ""
        decoder = self._whole.take()
        try:
            decoder.start_utt()
            decoder.process_raw(_pcm16(audio), full_utt=True)
            decoder.end_utt()
            hyp = decoder.hyp()
        finally:
            self._whole.give(decoder)
        return hyp.hypstr.strip() if hyp is not None else ""

    def open(self) -> _SphinxStream:
        return _SphinxStream()

    def step(self, pushes: Sequence[Push]) -> list[str]:
        return [self._push(push) for push in pushes]

    def _push(self, push: Push) -> str:
        stream = push.stream
        assert isinstance(stream, _SphinxStream)
        audio = stream.take(push.pcm, push.final)
        if stream.decoder is None and stream.loud:  # silence before the first sound is not decoded
            stream.decoder = self._live.take()
            stream.decoder.start_utt()
        if stream.decoder is not None:
            if audio.size:
                stream.decoder.process_raw(_pcm16(audio), False, False)
            if push.final:
                stream.decoder.end_utt()
            hyp = stream.decoder.hyp()
            stream.text = hyp.hypstr.strip() if hyp is not None else ""
        if push.final:
            self.close(stream)
            return stream.text if stream.audible else ""
        return stream.text

    def close(self, stream: RecognitionStream) -> None:
        assert isinstance(stream, _SphinxStream)
        decoder, stream.decoder = stream.decoder, None
        if decoder is None:
            return
        if not stream.done:
            decoder.end_utt()  # an abandoned utterance; the decoder is clean for its next stream
        self._live.give(decoder)


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


# ---- Whisper: stretches -------------------------------------------------------------------------------

_FRAME = SPEECH_SAMPLE_RATE // 50  # 20 ms: the unit of the pause detector


class Stretcher:
    """Cuts one stream's 16 kHz audio into stretches at pauses, as it arrives.

    A stretch closes once it holds at least `min_s` of audio and then `pause_s` of quiet (20 ms frames
    whose RMS is under `quiet` of the stream's loudest frame so far); it is cut in the middle of the pause.
    A stretch that reaches `max_s` without a pause is cut at its quietest frame in the last `max_s / 4`.
    Every sample belongs to exactly one stretch, in order.
    """

    def __init__(self, min_s: float = 1.0, pause_s: float = 0.3, max_s: float = 15.0, quiet: float = 0.1):
        self.min_len = int(min_s * SPEECH_SAMPLE_RATE)
        self.pause_frames = max(1, round(pause_s * SPEECH_SAMPLE_RATE / _FRAME))
        self.max_len = int(max_s * SPEECH_SAMPLE_RATE)
        self.quiet = quiet
        self._open = np.zeros(0, np.float32)  # the open stretch
        self._peak_rms = 0.0

    def push(self, audio: np.ndarray, final: bool = False) -> list[np.ndarray]:
        """The stretches `audio` closes (with `final`, the rest as the last one, if any)."""
        self._open = np.concatenate([self._open, audio.astype(np.float32, copy=False)])
        closed = []
        while (cut := self._cut()) is not None:
            closed.append(self._open[:cut])
            self._open = self._open[cut:]
        if final and self._open.size:
            closed.append(self._open)
            self._open = self._open[:0]
        return closed

    def _cut(self) -> int | None:
        n = self._open.size // _FRAME
        if n == 0:
            return None
        rms = np.sqrt(np.mean(self._open[: n * _FRAME].reshape(n, _FRAME) ** 2, axis=1))
        self._peak_rms = max(self._peak_rms, float(rms.max()))
        quiet = rms < self.quiet * self._peak_rms
        run = 0
        for i in range(self.min_len // _FRAME, n):  # pauses that end a stretch of at least min_len
            run = run + 1 if quiet[i] else 0
            if run == self.pause_frames:
                return (i + 1 - run // 2) * _FRAME  # the middle of the pause
        if self._open.size >= self.max_len:
            lo = (self.max_len - self.max_len // 4) // _FRAME
            return (lo + int(np.argmin(rms[lo : self.max_len // _FRAME]))) * _FRAME
        return None


class _WhisperStream(RecognitionStream):
    def __init__(self) -> None:
        super().__init__()
        self.stretcher = Stretcher()
        self.texts: list[str] = []

    def text(self, final: bool) -> str:
        if final and not self.audible:
            return ""
        return " ".join(self.texts)


class WhisperTranscriber:
    """OpenAI Whisper through transformers, from a local directory (config, weights, processor files).

    The batch is decoded in one `generate` call. Whisper sees 30 s at a time, so longer utterances are
    cut into 30 s pieces, decoded in the same batch, and their texts joined.

    While a turn is spoken it is decoded in stretches (see `Stretcher`): each stretch is decoded once,
    when a pause closes it, in one `generate` with every other stream's closed stretches; at the turn's end
    only its last stretch is left. Stretches are cut inside pauses, so they share no audio and miss none,
    and the transcript is their texts in order.
    """

    def __init__(
        self,
        path: str | Path,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        max_new_tokens: int = 128,
        language: str | None = None,
    ) -> None:
        from transformers import AutoConfig, WhisperConfig, WhisperForConditionalGeneration, WhisperProcessor

        directory = Path(path)
        if not directory.is_dir():
            raise FileNotFoundError(f"Whisper weights directory {directory}: no such directory")
        try:
            config = AutoConfig.from_pretrained(directory, local_files_only=True)
        except (OSError, ValueError) as error:
            raise ValueError(f"{directory} is not a transformers checkpoint: {error}") from error
        if not isinstance(config, WhisperConfig):
            raise ValueError(f"{directory} holds a {config.model_type!r} model, not Whisper")
        try:
            self._processor = WhisperProcessor.from_pretrained(directory, local_files_only=True)
        except (OSError, ValueError, TypeError) as error:
            raise ValueError(
                f"{directory}: no Whisper processor (preprocessor_config.json and tokenizer files): {error}"
            ) from error
        model = WhisperForConditionalGeneration.from_pretrained(directory, local_files_only=True, dtype=dtype)
        self._model = model.to(device).eval()
        self._device = torch.device(device)
        self._dtype = dtype
        self._max_new_tokens = max_new_tokens
        self._language = language
        self._lock = threading.Lock()  # generate is not re-entrant on one model
        self.generate_calls = 0
        # The feature extractor's window: 30 s at 16 kHz.
        self._piece = self._processor.feature_extractor.n_samples

    def transcribe(self, batch: list[np.ndarray]) -> list[str]:
        pieces: list[np.ndarray] = []
        owners: list[int] = []
        for i, pcm in enumerate(batch):
            audio = to_asr_rate(pcm)
            for start in range(0, audio.shape[0], self._piece):
                pieces.append(audio[start : start + self._piece])
                owners.append(i)
        texts = self._generate(pieces) if pieces else []
        out: list[list[str]] = [[] for _ in batch]
        for owner, text in zip(owners, texts, strict=True):
            if text:
                out[owner].append(text)
        return [" ".join(parts) for parts in out]

    def _generate(self, pieces: list[np.ndarray]) -> list[str]:
        features = self._processor.feature_extractor(
            pieces, sampling_rate=SPEECH_SAMPLE_RATE, return_tensors="pt", return_attention_mask=True
        )
        kwargs: dict = {"max_new_tokens": self._max_new_tokens}
        if self._language is not None:
            kwargs["language"] = self._language
        with self._lock, torch.inference_mode():
            self.generate_calls += 1
            tokens = self._model.generate(
                features.input_features.to(self._device, self._dtype),
                attention_mask=features.attention_mask.to(self._device),
                **kwargs,
            )
        texts = self._processor.batch_decode(to_host(tokens), skip_special_tokens=True)
        return [text.strip() for text in texts]

    def open(self) -> _WhisperStream:
        return _WhisperStream()

    def step(self, pushes: Sequence[Push]) -> list[str]:
        closed: list[tuple[_WhisperStream, np.ndarray]] = []
        for push in pushes:
            stream = push.stream
            assert isinstance(stream, _WhisperStream)
            closed += [
                (stream, s) for s in stream.stretcher.push(stream.take(push.pcm, push.final), push.final)
            ]
        audible = [(stream, s) for stream, s in closed if not is_silent(s)]
        texts = self._generate([s for _, s in audible]) if audible else []
        for (stream, _), text in zip(audible, texts, strict=True):
            if text:
                stream.texts.append(text)
        return [push.stream.text(push.final) for push in pushes]

    def close(self, stream: RecognitionStream) -> None:
        pass


def make_transcriber(
    backend: Literal["pocketsphinx", "whisper"],
    whisper_path: str | Path | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Transcriber:
    """The ASR backend by exact name; Whisper needs its weights directory."""
    if backend == "pocketsphinx":
        return PocketsphinxTranscriber()
    if backend == "whisper":
        if whisper_path is None:
            raise ValueError("the whisper backend needs whisper_path: a local Whisper weights directory")
        return WhisperTranscriber(whisper_path, device=device, dtype=dtype)
    raise ValueError(f"unknown ASR backend {backend!r}: expected 'pocketsphinx' or 'whisper'")
