"""End-of-turn detection (VAD) for the conversation server, one `TurnDetector` per conversation.

It sees every 24 kHz chunk the person sends and says when their speech starts and when their turn ends
(OpenAI Realtime `server_vad` semantics).

We never import the `silero_vad` package: its `model.py` calls `torch.set_num_threads(1)` at import time,
which would silently slow every other torch user in the process. The TorchScript file it ships is loaded by
path instead.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from csm.audio import SAMPLE_RATE
from speech.pcm import PAD_IN, SPEECH_SAMPLE_RATE, check_pcm, resample_block

log = logging.getLogger(__name__)

__all__ = [
    "PREFIX_PADDING_MS",
    "SILENCE_DURATION_MS",
    "THRESHOLD",
    "VAD_SAMPLE_RATE",
    "PaddingMs",
    "SilenceMs",
    "SileroVad",
    "Threshold",
    "TurnDetector",
    "VadConfig",
    "VadEvent",
    "load_vad_model",
]

VAD_SAMPLE_RATE = SPEECH_SAMPLE_RATE
_WINDOW = 512  # samples at 16 kHz that silero scores at once: 32 ms
_WINDOW_MS = _WINDOW * 1000 // VAD_SAMPLE_RATE
_WINDOW_IN = _WINDOW * SAMPLE_RATE // VAD_SAMPLE_RATE  # the same 32 ms at 24 kHz: 768 samples
_SEGMENT_IN = PAD_IN + _WINDOW_IN + PAD_IN  # a window with its resampling context (see speech.pcm)


# The one home of turn detection's defaults and bounds, OpenAI's `server_vad` ones: the realtime protocol's
# `ServerVad` takes them from here, so whatever a client may set, a `VadConfig` accepts as it is.
THRESHOLD = 0.5
PREFIX_PADDING_MS = 300
SILENCE_DURATION_MS = 500
Threshold = Annotated[float, Field(ge=0.0, le=1.0)]  # speech probability that counts as speech
PaddingMs = Annotated[int, Field(ge=0, le=5_000)]  # audio the caller keeps before speech starts
SilenceMs = Annotated[int, Field(ge=0, le=10_000)]  # silence that ends a turn


class VadConfig(BaseModel):
    """Turn detection settings, with the meaning of the OpenAI Realtime API's `server_vad`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    threshold: Threshold = THRESHOLD
    prefix_padding_ms: PaddingMs = PREFIX_PADDING_MS
    silence_duration_ms: SilenceMs = SILENCE_DURATION_MS

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


class TurnDetector:
    """End-of-turn detection for one conversation: 24 kHz float PCM in, `VadEvent`s out.

    Audio is cut into 32 ms windows of the stream (at 24 kHz: 768 samples; the detector lags the input by
    `PAD_IN` samples, 2 ms, for the resampler) and each window is resampled on its own with fixed padding,
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
        self._pending = np.zeros(PAD_IN, dtype=np.float32)  # the stream starts after silence
        self._windows = 0
        self._state = torch.zeros(SileroVad.state_shape)
        self._context = torch.zeros(1, SileroVad.context_samples)
        self._speaking = False
        self._silence_start: int | None = None  # window index where the current silence began

    def push(self, pcm: np.ndarray) -> list[VadEvent]:
        """Add float mono 24 kHz samples (any chunk size) and return the events they complete, in order."""
        buffer = np.concatenate([self._pending, check_pcm(pcm)])
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
        window = torch.cat([self._context, torch.from_numpy(resample_block(segment))[None]], dim=1)
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
