"""The person's audio until a turn is committed: the rate budget, turn detection, the turn being spoken.

Every `input_audio_buffer.append` lands in `Listener.append`. With server VAD the listener keeps the last
`prefix_padding_ms` of audio while nobody speaks, starts a turn (`InputTurn`: its encoder and recognizer
stream) when the detector hears speech, and asks the conversation to commit it when the detector hears the
turn end; with push-to-talk (`turn_detection: null`) everything until the client's commit is the turn. What
a committed turn becomes (transcript, history) is the conversation's.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from csm.audio import FRAME_SIZE, SAMPLE_RATE, SAMPLES_PER_MS
from serve_app import protocol as p
from serve_app.services import Services
from speech.asr import AgreedWords
from speech.vad import SileroVad, TurnDetector, VadBatcher, VadConfig

if TYPE_CHECKING:
    from serve_app.conversation import Limits

# The VAD runs here for every conversation of the replica, in one worker thread (torch at one thread, see
# TurnDetector) that scores the chunks of the conversations waiting together as one batch: a burst of
# audio never stalls the event loop's sockets, and chunks that coincide share a pass (bench/vad.py).
_VAD = VadBatcher()


class InputTurn:
    """One turn of the person's, from its first sample to the commit; partial transcripts go out as
    the recognizer agrees on them."""

    def __init__(
        self,
        services: Services,
        start_ms: int,
        streaming_asr: bool,
        send: Callable[[p.ServerEvent], None],
    ) -> None:
        self.item_id = p.new_id("item")
        self._send = send
        self._words = AgreedWords()
        self.committed = False  # partials stop at the commit: `completed` has the final transcript
        self.stream = services.input_stream(self._partial, streaming_asr)
        self.start_ms = start_ms
        self.started_at = time.time()

    def _partial(self, text: str) -> None:
        delta = "" if self.committed else self._words.update(text)
        if delta:
            self._send(p.ConversationItemInputAudioTranscriptionDelta(item_id=self.item_id, delta=delta))


class Listener:
    """One conversation's input audio. `speech_started` is called when server VAD hears the person start
    (the conversation stops its reply if the session says so); `end_turn(auto_response)` when the turn is
    over (VAD heard silence, or the turn is full), and the conversation commits it then."""

    def __init__(
        self,
        services: Services,
        limits: Limits,
        vad_model: SileroVad,
        streaming_asr: bool,
        send: Callable[[p.ServerEvent], None],
        report: Callable[[p.ProtocolError], None],
        speech_started: Callable[[p.ServerVad], None],
        end_turn: Callable[[bool], None],
    ) -> None:
        self._services, self._limits, self._streaming_asr = services, limits, streaming_asr
        self._vad_model = vad_model
        self._send, self._report = send, report  # to the client: events, and refusals as `error`
        self._speech_started, self._end_turn = speech_started, end_turn  # to the conversation
        self.vad: p.ServerVad | None = p.ServerVad()  # the session's turn detection; None: push-to-talk
        self.detector: TurnDetector | None = TurnDetector(_vad_config(self.vad), vad_model)
        self.turn: InputTurn | None = None
        self._prefix = np.zeros(0, np.int16)  # the last prefix_padding_ms of audio outside a turn
        self._heard_samples = 0  # input audio since the detector started (its timeline)
        self._budget = limits.audio_burst_s * SAMPLE_RATE
        self._budget_at = time.monotonic()

    def configure(self, vad: p.ServerVad | None) -> None:
        """The session's turn detection changed (or was sent again)."""
        was, self.vad = self.vad, vad
        if vad is None:
            self.detector = None
        elif was is None or self.detector is None:
            self.detector = TurnDetector(_vad_config(vad), self._vad_model)
            self._heard_samples = 0
        else:
            self.detector.update(_vad_config(vad))

    def _allowed(self, samples: int) -> bool:
        """The audio budget: `audio_rate` × real time sustained, `audio_burst_s` at once."""
        now = time.monotonic()
        rate = self._limits.audio_rate * SAMPLE_RATE
        burst = self._limits.audio_burst_s * SAMPLE_RATE + samples
        self._budget = min(burst, self._budget + (now - self._budget_at) * rate)
        self._budget_at = now
        if samples > self._budget:
            return False
        self._budget -= samples
        return True

    async def append(self, pcm: np.ndarray) -> None:
        if pcm.size == 0:
            return
        if not self._allowed(pcm.size):
            raise p.ProtocolError(
                "rate_limited",
                f"audio arrives faster than {self._limits.audio_rate:g}x real time; this chunk was dropped",
                "audio",
            )
        vad = self.vad
        if vad is None:  # push-to-talk: everything until the commit is the turn
            if self.turn is None:
                self.turn = self._new_turn(0)
            self._push(pcm)
            return
        assert self.detector is not None
        detector = self.detector
        events = await asyncio.wrap_future(_VAD.submit(detector, pcm.astype(np.float32) / 32768.0))
        if self.detector is not detector:  # the session changed the turn detection meanwhile
            return
        if self.turn is None:
            keep = vad.prefix_padding_ms * SAMPLES_PER_MS + pcm.size + 2 * FRAME_SIZE
            self._prefix = np.concatenate([self._prefix, pcm])[-keep:]
        else:
            self._push(pcm)
        self._heard_samples += pcm.size
        for ev in events:
            if ev.kind == "speech_started" and self.turn is None:
                self._start_turn(ev.audio_ms, vad)
            elif ev.kind == "speech_stopped" and self.turn is not None:
                self._send(
                    p.InputAudioBufferSpeechStopped(audio_end_ms=ev.audio_ms, item_id=self.turn.item_id)
                )
                self._end_turn(vad.create_response)

    def _start_turn(self, at_ms: int, vad: p.ServerVad) -> None:
        start_ms = max(at_ms - vad.prefix_padding_ms, 0)
        self.turn = self._new_turn(start_ms)
        # The audio since `start_ms` is at the end of the prefix buffer (the detector trails the input).
        since = (self._heard_samples - start_ms * SAMPLES_PER_MS) if self._heard_samples else 0
        self._push(self._prefix[-since:] if since > 0 else self._prefix[:0])
        self._prefix = self._prefix[:0]
        self._send(p.InputAudioBufferSpeechStarted(audio_start_ms=start_ms, item_id=self.turn.item_id))
        self._speech_started(vad)

    def _new_turn(self, start_ms: int) -> InputTurn:
        return InputTurn(self._services, start_ms, self._streaming_asr, self._send)

    def _push(self, pcm: np.ndarray) -> None:
        assert self.turn is not None
        limit = int(self._limits.max_turn_seconds * SAMPLE_RATE)
        room = limit - self.turn.stream.samples
        self.turn.stream.push(pcm[: max(room, 0)])
        if room < pcm.size:
            self._report(
                p.ProtocolError(
                    "limit_exceeded",
                    f"a turn holds at most {self._limits.max_turn_seconds:g} s of audio; it was ended there",
                )
            )
            self._end_turn(self.vad is not None and self.vad.create_response)

    def take_turn(self) -> InputTurn | None:
        """The turn spoken so far, now committed; None when there was no audio (the buffer is empty then)."""
        turn, self.turn = self.turn, None
        if turn is None or turn.stream.samples == 0:
            return None
        turn.committed = True
        if self.detector is not None and self.detector.speaking:
            self.detector.reset()  # a manual commit mid-speech: the next speech is a new turn
            self._heard_samples = 0
        return turn

    async def drop(self) -> None:
        """Forget the turn being spoken (the connection is gone)."""
        if self.turn is not None:
            await self.turn.stream.cancel()
            self.turn = None

    async def clear(self) -> None:
        """`input_audio_buffer.clear`: the turn being spoken, the prefix and the detector's state go."""
        await self.drop()
        if self.detector is not None:
            self.detector.reset()
        self._heard_samples = 0
        self._prefix = self._prefix[:0]


def _vad_config(vad: p.ServerVad) -> VadConfig:
    return VadConfig(**vad.model_dump(include=set(VadConfig.model_fields)))
