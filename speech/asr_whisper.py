"""OpenAI Whisper (through transformers, from local weights) as a `speech.asr.Transcriber`, and the
`Stretcher` that cuts a live turn into stretches at its pauses so each is decoded once."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from csm.host import to_host
from speech.asr import Push, RecognitionStream, to_asr_rate
from speech.pcm import SPEECH_SAMPLE_RATE, is_silent

__all__ = ["Stretcher", "WhisperTranscriber"]

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
