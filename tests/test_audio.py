"""csm.audio: PCM16 conversion, resampling, WAV files, and the ValueError for every kind of bad audio."""

import math
import wave

import numpy as np
import pytest
import torch

from csm.audio import (
    SAMPLE_RATE,
    check_audio,
    float_to_pcm16,
    pcm16_to_float,
    read_wav,
    resample,
    to_mimi_rate,
    write_wav,
)


def _sine(freq: float, rate: int, seconds: float = 1.0) -> torch.Tensor:
    t = torch.arange(int(rate * seconds), dtype=torch.float64) / rate
    return (0.5 * torch.sin(2 * math.pi * freq * t)).float()


def test_pcm16_known_values() -> None:
    data = np.array([0, 16384, -16384, 32767, -32768], dtype="<i2").tobytes()
    audio = pcm16_to_float(data)
    assert audio.dtype == torch.float32
    assert audio.tolist() == [0.0, 0.5, -0.5, 32767 / 32768, -1.0]


def test_pcm16_round_trip_and_clipping() -> None:
    audio = torch.linspace(-1, 1, 1001)
    back = pcm16_to_float(float_to_pcm16(audio))
    assert torch.max(torch.abs(back - audio)) <= 1 / 32768
    clipped = np.frombuffer(float_to_pcm16(torch.tensor([1.5, -3.0])), dtype="<i2")
    assert clipped.tolist() == [32767, -32768]


@pytest.mark.parametrize("rate", [16_000, 22_050, 44_100, 48_000])
def test_resample_to_and_from_24k_keeps_the_tone(rate: int) -> None:
    up = to_mimi_rate(_sine(440, rate), rate)
    assert up.shape[0] == SAMPLE_RATE
    expected = _sine(440, SAMPLE_RATE)
    middle = slice(1000, -1000)  # the sinc filter's edges see zeros beyond the clip
    assert torch.max(torch.abs(up[middle] - expected[middle])) < 2e-3
    down = resample(expected, SAMPLE_RATE, rate)
    assert down.shape[0] == rate
    assert torch.max(torch.abs(down[1000:-1000] - _sine(440, rate)[1000:-1000])) < 2e-3


def test_resample_same_rate_is_identity() -> None:
    audio = _sine(100, SAMPLE_RATE, 0.1)
    assert resample(audio, SAMPLE_RATE, SAMPLE_RATE) is audio


def test_wav_round_trip(tmp_path) -> None:
    audio = _sine(300, 16_000, 0.25)
    write_wav(tmp_path / "a.wav", audio, 16_000)
    back, rate = read_wav(tmp_path / "a.wav")
    assert rate == 16_000
    assert back.shape == audio.shape
    assert torch.max(torch.abs(back - audio)) <= 1 / 32768


def test_read_wav_averages_stereo(tmp_path) -> None:
    left, right = np.full(100, 8192, dtype="<i2"), np.full(100, -16384, dtype="<i2")
    with wave.open(str(tmp_path / "s.wav"), "wb") as writer:
        writer.setnchannels(2)
        writer.setsampwidth(2)
        writer.setframerate(48_000)
        writer.writeframes(np.stack([left, right], axis=1).tobytes())
    audio, rate = read_wav(tmp_path / "s.wav")
    assert rate == 48_000
    assert audio.shape == (100,)
    assert torch.allclose(audio, torch.full((100,), (0.25 - 0.5) / 2))


def _write_raw_wav(path, width: int, frames: bytes) -> None:
    with wave.open(str(path), "wb") as writer:
        writer.setnchannels(1)
        writer.setsampwidth(width)
        writer.setframerate(8000)
        writer.writeframes(frames)


@pytest.mark.parametrize(
    ("width", "frames", "message"),
    [(1, bytes(100), "8-bit"), (4, bytes(400), "32-bit"), (2, b"", "no audio")],
)
def test_read_wav_rejects_unsupported_files(tmp_path, width: int, frames: bytes, message: str) -> None:
    _write_raw_wav(tmp_path / "x.wav", width, frames)
    with pytest.raises(ValueError, match=message):
        read_wav(tmp_path / "x.wav")


def test_read_wav_rejects_non_wav(tmp_path) -> None:
    (tmp_path / "x.wav").write_bytes(b"not a wav file at all")
    with pytest.raises(ValueError, match="not a PCM WAV"):
        read_wav(tmp_path / "x.wav")


@pytest.mark.parametrize(
    ("audio", "message"),
    [
        (torch.tensor([1, 2, 3], dtype=torch.int16), "float dtype"),
        (torch.tensor([0.1, float("nan")]), "NaN or inf"),
        (torch.tensor([0.1, float("inf")]), "NaN or inf"),
        (torch.tensor([0.1, -float("inf")]), "NaN or inf"),
        (torch.zeros(0), "empty"),
        (torch.zeros(2, 10), "mono"),
        ([0.1, 0.2], "torch.Tensor"),
    ],
)
def test_bad_audio_raises_value_error_everywhere(audio, message: str, tmp_path) -> None:
    with pytest.raises(ValueError, match=message):
        check_audio(audio)
    with pytest.raises(ValueError, match=message):
        float_to_pcm16(audio)
    with pytest.raises(ValueError, match=message):
        resample(audio, 16_000, SAMPLE_RATE)
    with pytest.raises(ValueError, match=message):
        write_wav(tmp_path / "bad.wav", audio)


@pytest.mark.parametrize(
    ("data", "message"), [(b"", "empty"), (b"\x00\x01\x02", "odd byte count"), ("abcd", "must be bytes")]
)
def test_bad_pcm16_bytes_raise_value_error(data, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        pcm16_to_float(data)


@pytest.mark.parametrize("rate", [0, -16_000, 16_000.0, True])
def test_bad_sample_rates_raise_value_error(rate, tmp_path) -> None:
    audio = _sine(100, 16_000, 0.1)
    with pytest.raises(ValueError, match="positive int"):
        resample(audio, rate, SAMPLE_RATE)
    with pytest.raises(ValueError, match="positive int"):
        resample(audio, SAMPLE_RATE, rate)
    with pytest.raises(ValueError, match="positive int"):
        write_wav(tmp_path / "bad.wav", audio, rate)
