"""Streaming audio encoders for the speech endpoint's `response_format`s: 24 kHz mono PCM16 in, the
format's bytes out, chunk by chunk, so a client plays the first sentence while the rest is generated.

`pcm` and `wav` are written here (a WAV header is 44 bytes); every compressed format (`mp3`, `opus` in Ogg,
`aac` in ADTS, `flac`) is encoded by FFmpeg's own encoders through PyAV, muxed into a sink that hands back
what each call wrote. The WAV header gives the data length as unknown (0xFFFFFFFF), as streaming servers
do: its length is not known when the first bytes leave.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Literal, Protocol

import av
import numpy as np

from csm.audio import SAMPLE_RATE

__all__ = ["FORMATS", "AudioFormat", "StreamEncoder", "encoder"]

AudioFormat = Literal["mp3", "opus", "aac", "flac", "wav", "pcm"]


@dataclass(frozen=True)
class _Codec:
    media_type: str
    container: str | None = None  # FFmpeg's muxer; None: written here
    codec: str | None = None
    bit_rate: int | None = None
    options: tuple[tuple[str, str], ...] = ()  # the muxer's


FORMATS: dict[str, _Codec] = {
    "pcm": _Codec("audio/pcm"),
    "wav": _Codec("audio/wav"),
    "mp3": _Codec("audio/mpeg", "mp3", "libmp3lame", 64_000),
    # An Ogg page per 100 ms (the default is 1 s), so Opus streams as it is made.
    "opus": _Codec("audio/opus", "ogg", "libopus", 32_000, (("page_duration", "100000"),)),
    "aac": _Codec("audio/aac", "adts", "aac", 64_000),
    "flac": _Codec("audio/flac", "flac", "flac"),
}


class StreamEncoder(Protocol):
    media_type: str

    def push(self, pcm: np.ndarray) -> bytes:
        """Encode int16 mono 24 kHz samples; the bytes ready so far (maybe none: codecs work in frames)."""
        ...

    def finish(self) -> bytes:
        """The rest: the codec's buffered frames and the container's trailer."""
        ...


def encoder(fmt: str) -> StreamEncoder:
    """A new stream's encoder for `fmt` (a key of FORMATS; KeyError otherwise)."""
    codec = FORMATS[fmt]
    if codec.container is None:
        return _Raw(codec.media_type, wav=fmt == "wav")
    return _Muxed(codec)


class _Raw:
    """`pcm`: the samples as they are (little-endian int16); `wav`: the same after a streaming header."""

    def __init__(self, media_type: str, wav: bool) -> None:
        self.media_type = media_type
        self._header = _wav_header() if wav else b""

    def push(self, pcm: np.ndarray) -> bytes:
        out, self._header = self._header + pcm.astype("<i2", copy=False).tobytes(), b""
        return out

    def finish(self) -> bytes:
        out, self._header = self._header, b""  # a stream with no samples is still a valid (empty) file
        return out


def _wav_header() -> bytes:
    unknown = 0xFFFFFFFF
    return (
        b"RIFF"
        + struct.pack("<I", unknown)
        + b"WAVEfmt "
        + struct.pack("<IHHIIHH", 16, 1, 1, SAMPLE_RATE, SAMPLE_RATE * 2, 2, 16)
        + b"data"
        + struct.pack("<I", unknown)
    )


class _Sink:
    """Where the muxer writes: a file that only grows (no seek, so muxers write streamable output)."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []

    def write(self, data: bytes) -> int:
        self._parts.append(bytes(data))
        return len(data)

    def take(self) -> bytes:
        out = b"".join(self._parts)
        self._parts.clear()
        return out


class _Muxed:
    """A compressed format: FFmpeg's encoder, muxed into `_Sink`. PyAV re-frames and converts the samples
    to what the codec takes (MP3's 1152-sample s16p frames, Opus's 20 ms float frames)."""

    def __init__(self, codec: _Codec) -> None:
        self.media_type = codec.media_type
        self._sink = _Sink()
        self._out = av.open(self._sink, mode="w", format=codec.container, options=dict(codec.options))
        self._stream = self._out.add_stream(codec.codec, rate=SAMPLE_RATE, layout="mono")
        if codec.bit_rate is not None:
            self._stream.bit_rate = codec.bit_rate
        self._samples = 0
        self._closed = False

    def push(self, pcm: np.ndarray) -> bytes:
        if pcm.size == 0:
            return b""
        frame = av.AudioFrame.from_ndarray(
            np.ascontiguousarray(pcm, dtype=np.int16).reshape(1, -1), format="s16", layout="mono"
        )
        frame.sample_rate = SAMPLE_RATE
        frame.pts = self._samples
        self._samples += pcm.size
        for packet in self._stream.encode(frame):
            self._out.mux(packet)
        return self._sink.take()

    def finish(self) -> bytes:
        if not self._closed:
            self._closed = True
            for packet in self._stream.encode(None):
                self._out.mux(packet)
            self._out.close()
        return self._sink.take()
