"""CMU PocketSphinx as a `speech.asr.Transcriber`: the bundled US-English model, CPU only, no downloads."""

from __future__ import annotations

import threading
from collections.abc import Sequence

import numpy as np

from speech.asr import Push, RecognitionStream, to_asr_rate
from speech.pcm import SPEECH_SAMPLE_RATE

__all__ = ["SPHINX_SEARCH", "PocketsphinxTranscriber", "pcm16"]


def pcm16(audio: np.ndarray) -> bytes:
    """float samples in [-1, 1] → little-endian 16-bit PCM, as `Decoder.process_raw` takes them."""
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


# Idle decoders kept per search. Beyond it a stream's decoder is built at its first audio (~0.3 s of a core,
# holding the GIL) and freed at its end; 8 people talking to one replica churned through ~90 MB decoders
# with 4 (the replica's RSS swung by 150-300 MB from minute to minute), so the pool keeps as many as 8 people
# use at once.
MAX_IDLE_DECODERS = 8


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

    def __init__(self, max_idle: int = MAX_IDLE_DECODERS) -> None:
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
            decoder.process_raw(pcm16(audio), full_utt=True)
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
                stream.decoder.process_raw(pcm16(audio), False, False)
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
