"""Device to host: the codec steps of the serving path run on a (fake) CUDA device without a GPU.

PyTorch's fake tensors carry a device and a shape but no data, so the decoder's step can be traced on a
"cuda" device on any CPU: ops that mix devices raise as they would on a GPU, so do data-dependent ops
that need a host sync (`nonzero`, `int(tensor)`), and `.numpy()` raises too. Every device-to-host copy
must go through `csm.host.to_host`, which the tests replace with a stand-in that checks what it is given.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from transformers import MimiModel

import csm.codec_streaming as streaming
from csm.codec import FRAME_SIZE, NUM_CODEBOOKS, MimiCodec, _materialize_buffers, random_codec
from csm.codec_streaming import DecodeChunk, StreamingDecoder, StreamingEncoder, decode_pcm16
from csm.host import to_host, to_host_each

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CUDA = torch.device("cuda", 0)


@pytest.fixture(scope="module")
def codec():
    return random_codec("tiny", seed=0)


@pytest.fixture
def fake_cuda():
    # Real inputs are allowed: a step's codes arrive as numpy on the host (they become fake on use).
    return FakeTensorMode(allow_non_fake_inputs=True)


def fake_cuda_codec(codec: MimiCodec, mode: FakeTensorMode) -> MimiCodec:
    """`codec` as `load_codec(..., device="cuda")` would build it: on meta, weights assigned on the device."""
    with torch.device("meta"):
        model = MimiModel(codec.config)
    with mode:
        model.load_state_dict(
            {name: mode.from_tensor(t).to(CUDA) for name, t in codec.model.state_dict().items()}, assign=True
        )
        _materialize_buffers(model, CUDA)
    return MimiCodec(model)


def _codes(frames: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 2048, (frames, NUM_CODEBOOKS))


def test_decode_step_on_cuda_copies_to_the_host_once_per_step(codec, fake_cuda, monkeypatch) -> None:
    copies = []

    def host_stand_in(batch: torch.Tensor) -> np.ndarray:
        copies.append((batch.device, batch.dtype, tuple(batch.shape)))
        return np.zeros(batch.shape, np.int16)

    monkeypatch.setattr(streaming, "to_host", host_stand_in)
    chunks = [
        DecodeChunk(slot=2, codes=_codes(2, 1), fresh=True),
        DecodeChunk(slot=0, codes=_codes(1, 2), fresh=True, history=_codes(3, 3)),  # a recovered stream
        DecodeChunk(slot=3, codes=_codes(2, 4), fresh=True),
    ]
    gpu = fake_cuda_codec(codec, fake_cuda)
    with fake_cuda, torch.inference_mode():
        decoder = StreamingDecoder(gpu, num_slots=4, max_frames_per_step=2)
        assert decoder.active.device == CUDA
        audio = decode_pcm16(decoder, chunks)
    # One copy per chunk length, each of the whole group, already int16 on the device.
    assert sorted(copies) == [(CUDA, torch.int16, (1, FRAME_SIZE)), (CUDA, torch.int16, (2, 2 * FRAME_SIZE))]
    assert [a.shape for a in audio] == [(2 * FRAME_SIZE,), (FRAME_SIZE,), (2 * FRAME_SIZE,)]


def test_encode_steps_on_cuda_need_no_host_sync(codec, fake_cuda) -> None:
    gpu = fake_cuda_codec(codec, fake_cuda)
    with fake_cuda, torch.inference_mode():
        encoder = StreamingEncoder(gpu, num_slots=4, max_frames_per_step=2)
        for slot in (1, 2):
            encoder.open(slot)
        encoder.push(1, torch.zeros(3 * FRAME_SIZE))
        encoder.push(2, torch.zeros(FRAME_SIZE + 100))
        ready = encoder.encode_ready()
        tail = encoder.flush(2)  # the last, partial frame
    assert [tuple(c.shape) for c in ready[1:3]] == [(NUM_CODEBOOKS, 3), (NUM_CODEBOOKS, 1)]
    assert ready[1].device == CUDA and tuple(tail.shape) == (NUM_CODEBOOKS, 1)


def test_decode_step_gives_each_chunk_its_streams_audio(codec) -> None:
    chunks = [DecodeChunk(1, _codes(2, 5), fresh=True), DecodeChunk(3, _codes(1, 6), fresh=True)]
    with torch.inference_mode():
        audio = decode_pcm16(StreamingDecoder(codec, num_slots=4, max_frames_per_step=2), chunks)
        for chunk, got in zip(chunks, audio, strict=True):
            alone = StreamingDecoder(codec, num_slots=1, max_frames_per_step=2)
            alone.open(0)
            pcm = alone.step(torch.from_numpy(chunk.codes.T[None]))[0]
            assert got.dtype == np.int16
            np.testing.assert_array_equal(got, (pcm.clamp(-1, 1) * 32767).round().to(torch.int16).numpy())


def test_to_host_each_splits_one_copy_back_into_the_parts() -> None:
    parts = [torch.arange(6).view(2, 3), torch.arange(0), torch.arange(4).view(4, 1) + 10]
    got = to_host_each(parts)
    assert [g.shape for g in got] == [(2, 3), (0,), (4, 1)]
    for g, p in zip(got, parts, strict=True):
        np.testing.assert_array_equal(g, p.numpy())
    assert to_host_each([]) == []
    np.testing.assert_array_equal(to_host(torch.ones(2, requires_grad=True)), np.ones(2, np.float32))
