"""Speech recognition for the conversation server: end-of-turn detection (VAD) and speech-to-text (ASR).

`TurnDetector` runs in the ingress, one per conversation: it sees every 24 kHz chunk the person sends and
says when their speech starts and when their turn ends (OpenAI Realtime `server_vad` semantics). ASR runs
once per turn, batched across conversations, in the `SpeechRecognizer` deployment at the bottom; the
backends above it (`PocketsphinxTranscriber`, `WhisperTranscriber`) are plain objects usable without Ray.

We never import the `silero_vad` package: its `model.py` calls `torch.set_num_threads(1)` at import time,
which would silently slow every other torch user in the process. The TorchScript file it ships is loaded by
path instead.
"""

from __future__ import annotations

import asyncio
import functools
import importlib.util
import logging
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from torch import Tensor
from torchaudio.transforms import Resample

from csm.audio import SAMPLE_RATE, resample
from csm.host import to_host
from deployments.weights import pick_dtype, set_torch_threads

log = logging.getLogger(__name__)

__all__ = [
    "VAD_SAMPLE_RATE",
    "PocketsphinxTranscriber",
    "RecognizerOptions",
    "SileroVad",
    "SpeechRecognizer",
    "Transcriber",
    "TurnDetector",
    "VadConfig",
    "VadEvent",
    "WhisperTranscriber",
    "load_vad_model",
    "make_transcriber",
]

VAD_SAMPLE_RATE = 16_000
ASR_SAMPLE_RATE = 16_000  # both ASR backends take 16 kHz
MIN_TRANSCRIBE_SAMPLES = SAMPLE_RATE // 10  # under 100 ms at 24 kHz there is no word to find
# Peak level below which an utterance is digital silence (−60 dBFS): decoders hallucinate words in it
# (pocketsphinx hears "in" in one second of zeros), so it is not decoded at all.
SILENCE_PEAK = 1e-3

_WINDOW = 512  # samples at 16 kHz that silero scores at once: 32 ms
_WINDOW_MS = _WINDOW * 1000 // VAD_SAMPLE_RATE
_WINDOW_IN = _WINDOW * SAMPLE_RATE // VAD_SAMPLE_RATE  # the same 32 ms at 24 kHz: 768 samples
# Input samples resampled on each side of a window. The 24→16 kHz sinc kernel reaches 13 input samples;
# a multiple of 3 keeps every block on the same output-sample grid as resampling the whole stream.
_PAD_IN = 48
_SEGMENT_IN = _PAD_IN + _WINDOW_IN + _PAD_IN
_PAD_OUT = _PAD_IN * VAD_SAMPLE_RATE // SAMPLE_RATE


def _check_pcm(pcm: np.ndarray) -> np.ndarray:
    """float32 mono samples, or a ValueError naming what is wrong (int16 would pass as huge floats)."""
    samples = np.asarray(pcm)
    if samples.ndim != 1:
        raise ValueError(f"pcm must be mono with shape [n], not {samples.shape}")
    if not np.issubdtype(samples.dtype, np.floating):
        raise ValueError(f"pcm must be float samples in [-1, 1], not {samples.dtype}")
    if not np.isfinite(samples).all():
        raise ValueError("pcm contains NaN or inf")
    return samples.astype(np.float32, copy=False)


class VadConfig(BaseModel):
    """Turn detection settings, with the meaning of the OpenAI Realtime API's `server_vad`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    threshold: float = Field(0.5, gt=0.0, lt=1.0, description="speech probability that counts as speech")
    prefix_padding_ms: int = Field(300, ge=0, description="audio the caller keeps before speech starts")
    silence_duration_ms: int = Field(500, ge=0, description="silence that ends a turn")

    @property
    def negative_threshold(self) -> float:
        """Silero's hysteresis: silence is below threshold − 0.15, so a dip in a word does not end a turn."""
        return max(self.threshold - 0.15, 0.01)


@dataclass(frozen=True)
class VadEvent:
    kind: Literal["speech_started", "speech_stopped"]
    audio_ms: int  # position in the stream since the detector was created or reset


class SileroVad:
    """Silero VAD's 16 kHz network, shared by every conversation in the process.

    The TorchScript wrapper (`silero_vad.jit`) keeps one stream's RNN state and context in attributes
    (`_state`, `_context`) and resets them when the batch size changes, so it cannot serve many streams.
    Its inner `_model.forward(x, state) -> (prob, state)` is stateless; we call that, and each
    `TurnDetector` keeps its own state and context. One copy of the weights (~2 MB) serves all streams.
    """

    context_samples = 64  # the wrapper prepends the previous window's last 64 samples
    state_shape = (2, 1, 128)  # (h, c) of its LSTM cell, batch 1

    def __init__(self, path: str | Path) -> None:
        with warnings.catch_warnings():
            # torch 2.x deprecates torch.jit.load in favour of torch.export; silero ships only TorchScript.
            warnings.simplefilter("ignore", FutureWarning)
            wrapper = torch.jit.load(str(path), map_location="cpu")
        self._net = wrapper._model.eval()
        # TorchScript's profiling executor optimises a graph after its first runs; warm it up here so no
        # conversation sees the slow calls and every stream runs the same optimised graph.
        state = torch.zeros(self.state_shape)
        window = torch.zeros(1, self.context_samples + _WINDOW)
        for _ in range(3):
            self.step(window, state)

    @torch.inference_mode()
    def step(self, window: Tensor, state: Tensor) -> tuple[float, Tensor]:
        """Speech probability of `window` ([1, 64 + 512]: context then 32 ms at 16 kHz) and the next state."""
        prob, state = self._net(window, state)
        return float(prob), state


def _silero_jit_path() -> Path:
    """The JIT file inside the installed `silero_vad` package, found without importing the package.

    `find_spec` on a top-level name does not execute it; `importlib.resources.files("silero_vad.data")`
    would import `silero_vad/__init__.py` and with it the `set_num_threads(1)` in `model.py`.
    """
    spec = importlib.util.find_spec("silero_vad")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("silero-vad is not installed (pip install silero-vad)")
    for location in spec.submodule_search_locations:
        path = Path(location) / "data" / "silero_vad.jit"
        if path.is_file():
            return path
    raise FileNotFoundError(f"silero_vad.jit not found under {list(spec.submodule_search_locations)}")


@functools.cache
def load_vad_model() -> SileroVad:
    """The process's one silero model (loaded on first call; later calls return the same object)."""
    path = _silero_jit_path()
    log.info("VAD: silero from %s", path)
    return SileroVad(path)


@functools.cache
def _resampler() -> Resample:
    return Resample(SAMPLE_RATE, VAD_SAMPLE_RATE)  # kernel computed once, shared (stateless)


class TurnDetector:
    """End-of-turn detection for one conversation: 24 kHz float PCM in, `VadEvent`s out.

    Audio is cut into 32 ms windows of the stream (at 24 kHz: 768 samples; the detector lags the input by
    `_PAD_IN` samples, 2 ms, for the resampler) and each window is resampled on its own with fixed padding,
    so the events depend only on the audio, never on how it was split into chunks. `speech_started`
    reports the start of the first window scored as speech (the caller applies `prefix_padding_ms`);
    `speech_stopped` reports where silence began, once `silence_duration_ms` of it has passed.

    Cost: one silero step per window, measured at 0.3–0.6 ms per 32 ms window with torch pinned to one
    thread on a busy 2-core machine (≈1–2% of a core per conversation). With two torch threads on the same
    busy machine each step took 2.5–30 ms: every small op waits for the second OpenMP thread. Run it in a
    process pinned to one torch thread (`CSM_TORCH_THREADS=1`), as the Serve replicas are.
    Not thread-safe: one conversation's pushes come from one task.
    """

    def __init__(self, config: VadConfig | None = None, model: SileroVad | None = None) -> None:
        self._config = config or VadConfig()
        self._model = model or load_vad_model()
        self.reset()

    @property
    def config(self) -> VadConfig:
        return self._config

    @property
    def speaking(self) -> bool:
        """Whether the person is mid-turn: speech started and the turn has not ended yet."""
        return self._speaking

    @property
    def position_ms(self) -> int:
        """How much of the stream the detector has scored (it trails the input by at most 34 ms)."""
        return self._windows * _WINDOW_MS

    def update(self, config: VadConfig) -> None:
        """New settings from the next window on; a silence already being timed is judged by the new length."""
        self._config = config

    def reset(self) -> None:
        """Forget the stream: the next sample pushed is position 0, and nobody is speaking."""
        self._pending = np.zeros(_PAD_IN, dtype=np.float32)  # the stream starts after silence
        self._windows = 0
        self._state = torch.zeros(SileroVad.state_shape)
        self._context = torch.zeros(1, SileroVad.context_samples)
        self._speaking = False
        self._silence_start: int | None = None  # window index where the current silence began

    def push(self, pcm: np.ndarray) -> list[VadEvent]:
        """Add float mono 24 kHz samples (any chunk size) and return the events they complete, in order."""
        buffer = np.concatenate([self._pending, _check_pcm(pcm)])
        events: list[VadEvent] = []
        start = 0
        while start + _SEGMENT_IN <= buffer.shape[0]:
            event = self._score(buffer[start : start + _SEGMENT_IN])
            if event is not None:
                events.append(event)
            start += _WINDOW_IN
        self._pending = buffer[start:].copy()
        return events

    def _score(self, segment: np.ndarray) -> VadEvent | None:
        """Resample one padded window, score it, and advance the speaking/silent state machine."""
        with torch.inference_mode():
            resampled = _resampler()(torch.from_numpy(segment)[None])  # [1, 576]
        window = torch.cat([self._context, resampled[:, _PAD_OUT : _PAD_OUT + _WINDOW]], dim=1)
        prob, self._state = self._model.step(window, self._state)
        self._context = window[:, -SileroVad.context_samples :]
        index = self._windows
        self._windows += 1

        config = self._config
        if prob >= config.threshold:
            self._silence_start = None
            if not self._speaking:
                self._speaking = True
                return VadEvent("speech_started", index * _WINDOW_MS)
        elif self._speaking and prob < config.negative_threshold and self._silence_start is None:
            self._silence_start = index
        if self._speaking and self._silence_start is not None:
            silent_ms = (self._windows - self._silence_start) * _WINDOW_MS
            if silent_ms >= config.silence_duration_ms:
                start_ms = self._silence_start * _WINDOW_MS
                self._speaking = False
                self._silence_start = None
                return VadEvent("speech_stopped", start_ms)
        return None


# ---- speech to text ------------------------------------------------------------------------------------


class Transcriber(Protocol):
    def transcribe(self, batch: list[np.ndarray]) -> list[str]:
        """Text of each utterance (float32 mono 24 kHz), in order; "" where nothing was recognised."""
        ...


def _to_asr_rate(pcm: np.ndarray) -> np.ndarray:
    """float mono 24 kHz → float32 16 kHz, checked; empty if there is nothing to decode (silence)."""
    samples = _check_pcm(pcm)
    if samples.size == 0 or float(np.abs(samples).max()) < SILENCE_PEAK:
        return samples[:0]
    return resample(torch.from_numpy(samples), SAMPLE_RATE, ASR_SAMPLE_RATE).numpy()


class PocketsphinxTranscriber:
    """CMU PocketSphinx with its bundled US-English model: no downloads, CPU only, rough but always there.

    A decoder takes ~0.3 s to build and is not thread-safe, so each instance keeps one behind a lock;
    decoding costs ~0.2–0.7 s per second of speech on one core.
    """

    def __init__(self) -> None:
        from pocketsphinx import Decoder  # imported here: only this backend needs the C extension

        self._decoder = Decoder(samprate=ASR_SAMPLE_RATE, loglevel="FATAL")
        self._lock = threading.Lock()

    def transcribe(self, batch: list[np.ndarray]) -> list[str]:
        return [self._one(_to_asr_rate(pcm)) for pcm in batch]

    def _one(self, audio: np.ndarray) -> str:
        if audio.size == 0:
            return ""
        pcm16 = np.round(np.clip(audio, -1.0, 1.0) * 32767.0).astype("<i2").tobytes()
        with self._lock:
            self._decoder.start_utt()
            self._decoder.process_raw(pcm16, full_utt=True)
            self._decoder.end_utt()
            hyp = self._decoder.hyp()
        return hyp.hypstr.strip() if hyp is not None else ""


class WhisperTranscriber:
    """OpenAI Whisper through transformers, from a local directory (config, weights, processor files).

    The batch is decoded in one `generate` call. Whisper sees 30 s at a time, so longer utterances are
    cut into 30 s pieces, decoded in the same batch, and their texts joined.
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
        # The feature extractor's window: 30 s at 16 kHz.
        self._piece = self._processor.feature_extractor.n_samples

    def transcribe(self, batch: list[np.ndarray]) -> list[str]:
        pieces: list[np.ndarray] = []
        owners: list[int] = []
        for i, pcm in enumerate(batch):
            audio = _to_asr_rate(pcm)
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
            pieces, sampling_rate=ASR_SAMPLE_RATE, return_tensors="pt", return_attention_mask=True
        )
        kwargs: dict = {"max_new_tokens": self._max_new_tokens}
        if self._language is not None:
            kwargs["language"] = self._language
        with self._lock, torch.inference_mode():
            tokens = self._model.generate(
                features.input_features.to(self._device, self._dtype),
                attention_mask=features.attention_mask.to(self._device),
                **kwargs,
            )
        texts = self._processor.batch_decode(to_host(tokens), skip_special_tokens=True)
        return [text.strip() for text in texts]


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


# ---- Serve deployment ----------------------------------------------------------------------------------


class RecognizerOptions(BaseModel):
    """`user_config`: batching limits, may change while running."""

    model_config = ConfigDict(extra="forbid")

    max_batch_size: int = Field(8, ge=1)
    batch_wait_timeout_s: float = Field(0.01, ge=0.0)


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=64)
class SpeechRecognizer:
    """ASR of whole turns, batched across conversations. (VAD runs per chunk in the ingress, not here.)"""

    def __init__(
        self,
        backend: str = "pocketsphinx",
        whisper_path: str | None = None,
        max_batch_size: int = 8,
        batch_wait_timeout_s: float = 0.01,
    ) -> None:
        set_torch_threads(None)  # CSM_TORCH_THREADS, default 1: replicas share the machine's cores
        device = torch.device("cuda" if backend == "whisper" and torch.cuda.is_available() else "cpu")
        dtype = pick_dtype("auto", device)
        self.transcriber = make_transcriber(backend, whisper_path, device=device, dtype=dtype)
        self.backend = backend
        self.options = RecognizerOptions(
            max_batch_size=max_batch_size, batch_wait_timeout_s=batch_wait_timeout_s
        )
        self._apply(self.options)

    def reconfigure(self, user_config: dict) -> None:
        """Keys left out keep their current value."""
        self.options = RecognizerOptions.model_validate({**self.options.model_dump(), **user_config})
        self._apply(self.options)

    def _apply(self, options: RecognizerOptions) -> None:
        self.transcribe_batch.set_max_batch_size(options.max_batch_size)
        self.transcribe_batch.set_batch_wait_timeout_s(options.batch_wait_timeout_s)

    async def transcribe(self, pcm: np.ndarray) -> str:
        """Text of one utterance (float mono 24 kHz); "" for audio too short to hold a word."""
        samples = _check_pcm(pcm)
        if samples.shape[0] < MIN_TRANSCRIBE_SAMPLES:
            return ""
        return await self.transcribe_batch(samples)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def transcribe_batch(self, batch: list[np.ndarray]) -> list[str]:
        # In a worker thread: decoding takes up to a second and must not stall the replica's event loop.
        return await asyncio.to_thread(self.transcriber.transcribe, batch)

    def info(self) -> dict:
        return {"backend": self.backend, **self.options.model_dump()}
