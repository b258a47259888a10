"""Audio utilities: PCM16 bytes ⇄ float32 tensors, resampling to and from Mimi's 24 kHz, WAV files, checks.

Everything here works on mono float32 tensors of shape [n] with samples in [-1, 1]. Bad input (wrong dtype
or shape, NaN or inf, empty, a byte string that is not whole 16-bit samples) raises a ValueError that names
the problem; nothing is silently repaired except clipping to [-1, 1] when converting to 16-bit.
"""

from __future__ import annotations

import wave
from pathlib import Path

import numpy as np
import torch
import torchaudio.functional as AF
from torch import Tensor

# The one home of the audio clock: Mimi's rate and its frame, which is also CSM's step.
SAMPLE_RATE = 24_000
FRAME_SIZE = 1920  # samples per frame
FRAME_MS = FRAME_SIZE * 1000 // SAMPLE_RATE  # 80
FRAME_SECONDS = FRAME_SIZE / SAMPLE_RATE  # 0.08
SAMPLES_PER_MS = SAMPLE_RATE // 1000
_PCM16_SCALE = 32768.0


def check_audio(audio: Tensor, name: str = "audio") -> Tensor:
    """Return `audio` if it is a non-empty, finite, 1-D float tensor; raise ValueError naming the problem."""
    if not isinstance(audio, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, not {type(audio).__name__}")
    if not audio.is_floating_point():
        raise ValueError(f"{name} must have a float dtype, not {audio.dtype}")
    if audio.ndim != 1:
        raise ValueError(f"{name} must be mono with shape [n], not {tuple(audio.shape)}")
    if audio.numel() == 0:
        raise ValueError(f"{name} is empty")
    if not bool(torch.isfinite(audio).all()):
        raise ValueError(f"{name} contains NaN or inf")
    return audio


def check_sample_rate(sample_rate: int, name: str = "sample_rate") -> int:
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, int) or sample_rate <= 0:
        raise ValueError(f"{name} must be a positive int, not {sample_rate!r}")
    return sample_rate


def pcm16_to_float(data: bytes) -> Tensor:
    """Little-endian signed 16-bit mono PCM → float32 [n] in [-1, 1)."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise ValueError(f"PCM16 data must be bytes, not {type(data).__name__}")
    if len(data) == 0:
        raise ValueError("PCM16 data is empty")
    if len(data) % 2:
        raise ValueError(f"PCM16 data has an odd byte count ({len(data)}): not whole 16-bit samples")
    samples = np.frombuffer(data, dtype="<i2").astype(np.float32) / _PCM16_SCALE
    return torch.from_numpy(samples)


def float_to_pcm16(audio: Tensor) -> bytes:
    """Float [n] → little-endian signed 16-bit PCM bytes; samples outside [-1, 1] are clipped."""
    check_audio(audio)
    scaled = torch.round(audio.detach().float().cpu().clamp(-1.0, 1.0) * _PCM16_SCALE)
    return scaled.clamp(-32768, 32767).numpy().astype("<i2").tobytes()


def resample(audio: Tensor, orig_rate: int, new_rate: int = SAMPLE_RATE) -> Tensor:
    """Resample mono float audio (band-limited sinc interpolation, torchaudio's defaults)."""
    check_audio(audio)
    check_sample_rate(orig_rate, "orig_rate")
    check_sample_rate(new_rate, "new_rate")
    if orig_rate == new_rate:
        return audio
    return AF.resample(audio, orig_rate, new_rate)


def to_mimi_rate(audio: Tensor, sample_rate: int) -> Tensor:
    """Audio at any rate (16/22.05/44.1/48 kHz, ...) → float32 at 24 kHz for Mimi."""
    return resample(audio.float(), sample_rate, SAMPLE_RATE)


def read_wav(path: str | Path) -> tuple[Tensor, int]:
    """Read a 16-bit PCM WAV file → (float32 [n], sample rate). Multi-channel files are averaged to mono."""
    try:
        with wave.open(str(path), "rb") as reader:
            width, channels, rate = reader.getsampwidth(), reader.getnchannels(), reader.getframerate()
            frames = reader.readframes(reader.getnframes())
    except wave.Error as error:
        raise ValueError(f"{path}: not a PCM WAV file ({error})") from error
    if width != 2:
        raise ValueError(f"{path}: {8 * width}-bit samples; only 16-bit PCM is supported")
    if not frames:
        raise ValueError(f"{path}: no audio frames")
    samples = np.frombuffer(frames, dtype="<i2").astype(np.float32) / _PCM16_SCALE
    mono = samples.reshape(-1, channels).mean(axis=1)
    return torch.from_numpy(np.ascontiguousarray(mono)), rate


def write_wav(path: str | Path, audio: Tensor, sample_rate: int = SAMPLE_RATE) -> None:
    """Write mono float audio as a 16-bit PCM WAV file."""
    check_sample_rate(sample_rate)
    data = float_to_pcm16(audio)
    with wave.open(str(path), "wb") as writer:
        writer.setnchannels(1)
        writer.setsampwidth(2)
        writer.setframerate(sample_rate)
        writer.writeframes(data)
