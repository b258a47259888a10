"""The person's audio as the speech modules take it: checked float PCM, and 24 kHz → 16 kHz in a stream.

Both the turn detector and the recognizers run at 16 kHz; the page sends 24 kHz. A stream is resampled in
blocks, each with fixed padding of real neighbouring samples, so what comes out depends only on the audio,
never on how it was split into chunks (up to float rounding, the same as resampling the whole stream).
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from torchaudio.transforms import Resample

from csm.audio import SAMPLE_RATE

__all__ = ["SILENCE_PEAK", "SPEECH_SAMPLE_RATE", "StreamResampler", "check_pcm", "is_silent"]

SPEECH_SAMPLE_RATE = 16_000  # silero and both ASR backends take 16 kHz
# Peak level below which audio is digital silence (−60 dBFS): decoders hallucinate words in it
# (pocketsphinx hears "in" in one second of zeros), so it is not decoded at all.
SILENCE_PEAK = 1e-3

# Input samples resampled on each side of a block. The 24→16 kHz sinc kernel reaches 13 input samples;
# multiples of 3 keep every block on the same output-sample grid as resampling the whole stream.
PAD_IN = 48
PAD_OUT = PAD_IN * SPEECH_SAMPLE_RATE // SAMPLE_RATE
_STEP = SAMPLE_RATE // 8_000  # 3 input samples make 2 output samples


def check_pcm(pcm: np.ndarray) -> np.ndarray:
    """float32 mono samples, or a ValueError naming what is wrong (int16 would pass as huge floats)."""
    samples = np.asarray(pcm)
    if samples.ndim != 1:
        raise ValueError(f"pcm must be mono with shape [n], not {samples.shape}")
    if not np.issubdtype(samples.dtype, np.floating):
        raise ValueError(f"pcm must be float samples in [-1, 1], not {samples.dtype}")
    if not np.isfinite(samples).all():
        raise ValueError("pcm contains NaN or inf")
    return samples.astype(np.float32, copy=False)


def is_silent(samples: np.ndarray) -> bool:
    return samples.size == 0 or float(np.abs(samples).max()) < SILENCE_PEAK


@functools.cache
def resampler() -> Resample:
    return Resample(SAMPLE_RATE, SPEECH_SAMPLE_RATE)  # kernel computed once, shared (stateless)


def resample_block(segment: np.ndarray) -> np.ndarray:
    """`segment` = PAD_IN samples, a block (a multiple of 3), PAD_IN samples → the block at 16 kHz. Several
    segments of one length ([n, length]) are resampled in one call, row by row."""
    with torch.inference_mode():
        out = resampler()(torch.from_numpy(segment))
    n = (segment.shape[-1] - 2 * PAD_IN) * SPEECH_SAMPLE_RATE // SAMPLE_RATE
    return out[..., PAD_OUT : PAD_OUT + n].numpy()


class StreamResampler:
    """24 kHz float PCM in, any chunk size; 16 kHz out, trailing the input by PAD_IN samples (2 ms) until
    `flush`, which pads the stream's end with silence. The stream starts after silence."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._pending = np.zeros(PAD_IN, dtype=np.float32)

    def push(self, pcm: np.ndarray) -> np.ndarray:
        buffer = np.concatenate([self._pending, check_pcm(pcm)])
        block = (buffer.shape[0] - 2 * PAD_IN) // _STEP * _STEP
        if block <= 0:
            self._pending = buffer
            return np.zeros(0, np.float32)
        out = resample_block(buffer[: block + 2 * PAD_IN])
        self._pending = buffer[block:]
        return out

    def flush(self) -> np.ndarray:
        """The rest of the stream (its last samples, against silence); the resampler starts over."""
        tail = self._pending.shape[0] - PAD_IN  # samples not yet resampled
        if tail <= 0:
            self.reset()
            return np.zeros(0, np.float32)
        block = -(-tail // _STEP) * _STEP
        segment = np.zeros(block + 2 * PAD_IN, np.float32)
        segment[: self._pending.shape[0]] = self._pending
        self.reset()
        return resample_block(segment)[: tail * SPEECH_SAMPLE_RATE // SAMPLE_RATE]
