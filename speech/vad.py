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
import queue
import threading
import warnings
from collections.abc import Sequence
from concurrent.futures import Future
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
    "VadBatcher",
    "VadConfig",
    "VadEvent",
    "load_vad_model",
    "push_many",
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
    Its inner `_model` is stateless: features (an STFT and four convolutions) of each window on its own,
    then an LSTM cell over the windows in order. We call those parts ourselves: the features of every
    window waiting, of every stream, in one batch, then one LSTM step per window position for all the
    streams that have one. Each `TurnDetector` keeps its own state and context; one copy of the weights
    (~2 MB) serves all streams.
    """

    context_samples = 64  # the wrapper prepends the previous window's last 64 samples
    state_shape = (2, 1, 128)  # (h, c) of its LSTM cell, batch 1

    def __init__(self, path: str | Path) -> None:
        with warnings.catch_warnings():
            # torch 2.x deprecates torch.jit.load in favour of torch.export; silero ships only TorchScript.
            warnings.simplefilter("ignore", FutureWarning)
            wrapper = torch.jit.load(str(path), map_location="cpu")
        self._net = wrapper._model.eval()
        # TorchScript's profiling executor optimises a graph after its first runs, per input shape; warm the
        # small batches up here so no conversation sees the slow calls.
        for streams in (1, 2, 3, 4):
            for _ in range(3):
                windows = [torch.zeros(3, self.context_samples + _WINDOW)] * streams
                self.probabilities(windows, [torch.zeros(self.state_shape)] * streams)

    @torch.inference_mode()
    def probabilities(
        self, windows: Sequence[Tensor], states: Sequence[Tensor]
    ) -> tuple[list[list[float]], list[Tensor]]:
        """Streams' windows ([k, 64 + 512] each: context then 32 ms at 16 kHz, in order) and LSTM states
        ([2, 1, 128] each) → each window's speech probability, and each stream's state after its windows."""
        net = self._net
        counts = [w.shape[0] for w in windows]
        features = net.encoder(net.run_extractors(torch.cat(list(windows)))) if sum(counts) else None
        firsts = np.cumsum([0, *counts[:-1]]).tolist()
        probs: list[list[float]] = [[] for _ in windows]
        out_states = list(states)
        for step in range(max(counts, default=0)):
            rows = [i for i, k in enumerate(counts) if k > step]
            assert features is not None
            x = features[[firsts[i] + step for i in rows]]
            y, state = net.decoder(x, torch.cat([out_states[i] for i in rows], dim=1))
            for j, (i, p) in enumerate(zip(rows, y.squeeze(1).mean(dim=1).tolist(), strict=True)):
                probs[i].append(p)
                out_states[i] = state[:, j : j + 1]
        return probs, out_states


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

    Cost (`bench/vad.py`, one torch thread, 80 ms pushes): ~0.65 ms per 32 ms window pushed alone (≈2% of a
    core per conversation); `push_many` / `VadBatcher` score many detectors' pushes together, 0.23 ms a
    window for 8 conversations, 0.18 ms for 16. With two torch threads on a busy machine each step took
    2.5–30 ms: every small op waits for the second OpenMP thread. Run it in a process pinned to one torch
    thread (`CSM_TORCH_THREADS=1`), as the Serve replicas are.
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
        return push_many([(self, pcm)])[0]

    def _inputs(self, samples: np.ndarray) -> Tensor:
        """The model inputs ([k, 64 + 512]) of the k windows that `samples` (checked float PCM) complete;
        the rest waits."""
        buffer = np.concatenate([self._pending, samples])
        k = max((buffer.shape[0] - _SEGMENT_IN) // _WINDOW_IN + 1, 0)
        self._pending = buffer[k * _WINDOW_IN :].copy()
        if k == 0:
            return torch.zeros(0, SileroVad.context_samples + _WINDOW)
        segments = np.lib.stride_tricks.sliding_window_view(buffer, _SEGMENT_IN)[::_WINDOW_IN][:k]
        audio = torch.from_numpy(resample_block(np.ascontiguousarray(segments)))  # [k, 512]
        context = torch.cat([self._context, audio[:-1, -SileroVad.context_samples :]])
        self._context = audio[-1:, -SileroVad.context_samples :]
        return torch.cat([context, audio], dim=1)

    def _advance(self, prob: float) -> VadEvent | None:
        """One window's speech probability through the speaking/silent state machine."""
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


def push_many(pushes: Sequence[tuple[TurnDetector, np.ndarray]]) -> list[list[VadEvent]]:
    """`detector.push(pcm)` for several detectors of one model at once (each at most once), scored in one
    batch: each gets the events its own push would give (batched sums round differently, by ~1e-8)."""
    if len({id(d) for d, _ in pushes}) < len(pushes):
        raise ValueError("a detector appears twice in one batch: push its audio as one chunk")
    if len({id(d._model) for d, _ in pushes}) > 1:
        raise ValueError("detectors of different VAD models cannot be scored together")
    if not pushes:
        return []
    samples = [check_pcm(pcm) for _, pcm in pushes]  # bad audio fails before any detector moves on
    inputs = [d._inputs(pcm) for (d, _), pcm in zip(pushes, samples, strict=True)]
    probs, states = pushes[0][0]._model.probabilities(inputs, [d._state for d, _ in pushes])
    out = []
    for (detector, _), p, state in zip(pushes, probs, states, strict=True):
        detector._state = state
        out.append([e for prob in p if (e := detector._advance(prob)) is not None])
    return out


class VadBatcher:
    """Every conversation's `TurnDetector` pushes in one process, scored in one worker thread: the pushes
    that arrive while a batch is scored make the next batch (`push_many`), so conversations whose audio
    waits together share one pass of the model. A caller waits on the future of its push; one push per
    detector at a time."""

    def __init__(self, max_batch: int = 64) -> None:
        self.max_batch = max_batch
        self.batches = 0  # scored batches, and the pushes they held (the mean batch is pushes / batches)
        self.pushes = 0
        self._jobs: queue.SimpleQueue[tuple[TurnDetector, np.ndarray, Future]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def submit(self, detector: TurnDetector, pcm: np.ndarray) -> Future[list[VadEvent]]:
        """The events of `detector.push(pcm)`, once scored; bad audio raises here, before it is queued."""
        future: Future[list[VadEvent]] = Future()
        self._jobs.put((detector, check_pcm(pcm), future))
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="vad", daemon=True)
                self._thread.start()
        return future

    def _run(self) -> None:
        while True:
            jobs = [self._jobs.get()]
            while len(jobs) < self.max_batch and not self._jobs.empty():
                jobs.append(self._jobs.get_nowait())
            # A caller that gave up (its connection closed) is skipped: that detector is not used again.
            jobs = [job for job in jobs if job[2].set_running_or_notify_cancel()]
            while jobs:  # from a detector seen twice, or another model, on: the next round, in order
                batch, later, seen = [], [], set()
                for job in jobs:
                    detector = job[0]
                    fits = not later and id(detector) not in seen
                    fits = fits and (not batch or detector._model is batch[0][0]._model)
                    (batch if fits else later).append(job)
                    seen.add(id(detector))
                jobs = later
                self._score(batch)

    def _score(self, batch: list[tuple[TurnDetector, np.ndarray, Future]]) -> None:
        self.batches += 1
        self.pushes += len(batch)
        try:
            events = push_many([(detector, pcm) for detector, pcm, _ in batch])
        except Exception as e:  # a failed batch fails its pushes, never the thread
            for *_, future in batch:
                future.set_exception(e)
            return
        for (*_, future), found in zip(batch, events, strict=True):
            future.set_result(found)
