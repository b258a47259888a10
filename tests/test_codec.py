"""csm.codec: streaming decode/encode against transformers' whole-clip Mimi, slots, recovery, loading.

Everything runs on the random `tiny` preset (fixed seed, fp32, CPU). Its attention window is 8 frames, so
sequences longer than that exercise the KV ring wrapping around.
"""

import json
import subprocess

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers.models.mimi.modeling_mimi import MimiRotaryEmbedding

from csm.audio import read_wav, to_mimi_rate
from csm.codec import (
    FRAME_SIZE,
    NUM_CODEBOOKS,
    checkpoint_state_dict,
    load_codec,
    preset_config,
    random_codec,
)
from csm.codec_streaming import RECOVERY_FRAMES, StreamingDecoder, StreamingEncoder

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def codec():
    return random_codec("tiny", seed=0)


def _codes(frames: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2048, (NUM_CODEBOOKS, frames), generator=generator)


def _relative_rms(estimate: torch.Tensor, reference: torch.Tensor) -> float:
    return float((estimate - reference).pow(2).mean().sqrt() / reference.pow(2).mean().sqrt())


def _snr_db(estimate: torch.Tensor, reference: torch.Tensor) -> float:
    return float(10 * torch.log10(reference.pow(2).sum() / (estimate - reference).pow(2).sum()))


@pytest.mark.parametrize("k", [1, 2, 5])
def test_streaming_decode_matches_whole_decode(codec, k: int) -> None:
    codes = _codes(23, seed=1)  # not a multiple of 2 or 5: the last step is shorter
    whole = codec.decode(codes[None])[0]
    decoder = StreamingDecoder(codec, num_slots=1, max_frames_per_step=5)
    decoder.open(0)
    chunks = [decoder.step(codes[None, :, t : t + k]) for t in range(0, codes.shape[1], k)]
    streamed = torch.cat(chunks, dim=-1)[0]
    assert streamed.shape == whole.shape == (23 * FRAME_SIZE,)
    assert _relative_rms(streamed, whole) <= 1e-5


def test_streams_opened_at_different_frames_each_match_their_whole_decode(codec) -> None:
    # slot -> (codes, step at which the stream opens); slot 1 is reused by a second stream after closing.
    plan = [(0, _codes(14, seed=10), 0), (1, _codes(5, seed=11), 3), (2, _codes(11, seed=12), 6)]
    reuse = (1, _codes(6, seed=13), 10)
    decoder = StreamingDecoder(codec, num_slots=4, max_frames_per_step=1)
    outputs: dict[int, list[torch.Tensor]] = {0: [], 1: [], 2: [], 3: []}
    streams = [*plan, reuse]
    for step in range(17):
        batch = torch.randint(0, 2048, (4, NUM_CODEBOOKS, 1))  # rows of inactive slots must not matter
        live = []
        for index, (slot, codes, start) in enumerate(streams):
            if step == start:
                decoder.open(slot)
            if start <= step < start + codes.shape[1]:
                batch[slot, :, 0] = codes[:, step - start]
                live.append((index, slot))
            elif step == start + codes.shape[1] and bool(decoder.active[slot]):
                decoder.close(slot)
        pcm = decoder.step(batch)
        assert torch.all(pcm[~decoder.active] == 0)
        for index, slot in live:
            outputs.setdefault(100 + index, []).append(pcm[slot])
    for index, (_, codes, _) in enumerate(streams):
        streamed = torch.cat(outputs[100 + index])
        assert _relative_rms(streamed, codec.decode(codes[None])[0]) <= 1e-5


def test_inactive_slot_state_is_untouched(codec) -> None:
    codes = _codes(6, seed=20)
    decoder = StreamingDecoder(codec, num_slots=2, max_frames_per_step=2)
    decoder.open(0)
    first = decoder.step(torch.stack([codes[:, :2], codes[:, :2]]))[0]
    decoder.close(0)
    decoder.open(1)
    for _ in range(3):  # slot 0 sits out three steps
        decoder.step(torch.randint(0, 2048, (2, NUM_CODEBOOKS, 2)))
    decoder.open(0)  # reopening resets; the stream restarts
    decoder.close(1)
    again = decoder.step(torch.stack([codes[:, :2], codes[:, :2]]))[0]
    assert _relative_rms(again, first) <= 1e-6
    rest = [decoder.step(torch.stack([codes[:, t : t + 2]] * 2))[0] for t in (2, 4)]
    assert _relative_rms(torch.cat([again, *rest]), codec.decode(codes[None])[0]) <= 1e-5


def test_stream_sitting_out_steps_continues_seamlessly(codec) -> None:
    # Slot 0 has no chunk at some steps (the engine was late); slot 1 keeps going. Both stay exact. While
    # slot 0 sits out, its rows are still computed and their keys land in its KV ring: never to be read.
    codes = [_codes(20, seed=50), _codes(40, seed=51)]
    decoder = StreamingDecoder(codec, num_slots=2, max_frames_per_step=2)
    decoder.open(0)
    decoder.open(1)
    produced: list[list[torch.Tensor]] = [[], []]
    cursor = [0, 0]
    for step in range(22):
        wants = [step % 4 < 2 or step >= 16, True]
        advance = torch.tensor([wants[s] and cursor[s] < codes[s].shape[1] for s in range(2)])
        batch = torch.randint(0, 2048, (2, NUM_CODEBOOKS, 2))  # rows of slots sitting out must not matter
        for slot in range(2):
            if advance[slot]:
                batch[slot] = codes[slot][:, cursor[slot] : cursor[slot] + 2]
        pcm = decoder.step(batch, advance)
        for slot in range(2):
            if advance[slot]:
                produced[slot].append(pcm[slot])
                cursor[slot] += 2
            else:
                assert torch.all(pcm[slot] == 0)
    for slot in range(2):
        assert cursor[slot] == codes[slot].shape[1]
        whole = codec.decode(codes[slot][None])[0]
        assert _relative_rms(torch.cat(produced[slot]), whole) <= 1e-5


def test_streaming_encode_matches_whole_encode(codec) -> None:
    generator = torch.Generator().manual_seed(3)
    clips = [0.3 * torch.randn(n, generator=generator) for n in (22 * FRAME_SIZE + 777, 9 * FRAME_SIZE, 1000)]
    pieces = [1, 500, 3000, 1919, 1921, 7000, 13, 4 * FRAME_SIZE]  # uneven sizes, cycled
    encoder = StreamingEncoder(codec, num_slots=3, max_frames_per_step=4)
    for slot in range(3):
        encoder.open(slot)
    got: list[list[torch.Tensor]] = [[], [], []]
    offsets = [0, 0, 0]
    turn = 0
    while any(offset < clip.shape[0] for offset, clip in zip(offsets, clips, strict=True)):
        for slot, clip in enumerate(clips):
            size = pieces[(turn + slot) % len(pieces)]
            encoder.push(slot, clip[offsets[slot] : offsets[slot] + size])
            offsets[slot] += size
        turn += 1
        for slot, codes in enumerate(encoder.encode_ready()):
            got[slot].append(codes)
    for slot, clip in enumerate(clips):
        got[slot].append(encoder.flush(slot))
        streamed = torch.cat(got[slot], dim=-1)
        whole = codec.encode(clip)[0]
        assert streamed.shape == whole.shape
        assert torch.equal(streamed, whole)
    assert not any(encoder.active)


def test_codec_steps_keep_onednn_conv_shapes_bounded(codec) -> None:
    """oneDNN compiles and keeps a kernel per conv shape: a step's stream count is padded to a power of two,
    and a flushed partial frame (of any length) runs on ATen's convolution, not oneDNN's."""
    seen: list[tuple[tuple[int, ...], bool]] = []

    def record(module, args) -> None:
        seen.append((tuple(args[0].shape), torch.backends.mkldnn.enabled))

    convs = [m for m in codec.parts.encoder_seanet.modules() if isinstance(m, torch.nn.Conv1d)]
    hooks = [m.register_forward_pre_hook(record) for m in convs]
    g = torch.Generator().manual_seed(5)
    encoder = StreamingEncoder(codec, num_slots=32)
    try:
        for streams in (3, 5, 7):
            for slot in range(streams):
                encoder.open(slot)
                encoder.push(slot, 0.3 * torch.randn(2 * FRAME_SIZE, generator=g))
            encoder.encode_ready()
            for slot in range(streams):
                encoder.close(slot)
        assert {shape[0] for shape, _ in seen} == {4, 8}
        by_tail = []
        for tail in (100, 777, 1500):
            seen.clear()
            encoder.open(0)
            encoder.push(0, 0.3 * torch.randn(FRAME_SIZE + tail, generator=g))
            encoder.flush(0)
            on = sorted(shape for shape, enabled in seen if enabled)
            assert len(on) == len(convs) and sum(not enabled for _, enabled in seen) == len(convs)
            by_tail.append(on)
        assert by_tail[0] == by_tail[1] == by_tail[2]  # oneDNN saw the whole frame's shapes only
        assert torch.backends.mkldnn.enabled
    finally:
        for hook in hooks:
            hook.remove()


def test_espeak_speech_round_trips_to_its_length(codec, tmp_path) -> None:
    wav = tmp_path / "speech.wav"
    subprocess.run(["espeak-ng", "-w", str(wav), "Hello, this is a test of the Mimi codec."], check=True)
    audio, rate = read_wav(wav)
    speech = to_mimi_rate(audio, rate)
    encoder = StreamingEncoder(codec, num_slots=1)
    encoder.open(0)
    parts = []
    for start in range(0, speech.shape[0], 4000):  # 4000 samples ≈ the size of a websocket audio message
        encoder.push(0, speech[start : start + 4000])
        parts.append(encoder.encode_ready()[0])
    parts.append(encoder.flush(0))
    codes = torch.cat(parts, dim=-1)
    decoder = StreamingDecoder(codec, num_slots=1)
    decoder.open(0)
    pcm = torch.cat([decoder.step(codes[None, :, t : t + 8]) for t in range(0, codes.shape[1], 8)], dim=-1)[0]
    assert abs(pcm.shape[0] - speech.shape[0]) <= FRAME_SIZE
    assert torch.isfinite(pcm).all()


def test_state_recovery_from_last_frames_reaches_measured_snr(codec) -> None:
    # Measured (bench/codec.py --recovery --preset tiny): N=4 → ≥29 dB, N ≥ 12 → exact (>120 dB).
    codes = _codes(40, seed=30)
    point = 15
    exact = codec.decode(codes[None])[0, point * FRAME_SIZE :]
    decoder = StreamingDecoder(codec, num_slots=2)
    decoder.open(1)  # a neighbour in the batch must not disturb the recovery
    snr = {}
    for frames in (0, 4, RECOVERY_FRAMES):
        decoder.recover(0, codes[:, :point], frames=frames)
        tail = [decoder.step(torch.stack([codes[:, t : t + 5]] * 2))[0] for t in range(point, 40, 5)]
        snr[frames] = _snr_db(torch.cat(tail), exact)
    assert snr[0] < 20  # a fresh state is audibly wrong: the recovery is doing the work
    assert snr[4] > 25
    assert snr[RECOVERY_FRAMES] > 100


def _write_checkpoints(codec, root):
    config = codec.config.to_dict()
    flat = {name: tensor.contiguous() for name, tensor in checkpoint_state_dict(codec.model).items()}
    mimi, csm = root / "mimi", root / "csm"
    mimi.mkdir()
    csm.mkdir()
    (mimi / "config.json").write_text(json.dumps(config))
    save_file(flat, mimi / "model.safetensors")
    # Real CSM configs carry a few legacy and bookkeeping keys in their codec_config.
    legacy = config | {"_name_or_path": "kyutai/mimi", "architectures": ["MimiModel"], "frame_rate": 12.5}
    (csm / "config.json").write_text(json.dumps({"model_type": "csm", "codec_config": legacy}))
    # A CSM checkpoint holds the backbone too, split over shards; only `codec_model.*` is the codec.
    prefixed = {f"codec_model.{name}": tensor for name, tensor in flat.items()}
    names = sorted(prefixed)
    save_file(
        {name: prefixed[name] for name in names[::2]} | {"backbone.w": torch.ones(2)}, csm / "a.safetensors"
    )
    save_file({name: prefixed[name] for name in names[1::2]}, csm / "b.safetensors")
    return mimi, csm, flat


def test_both_checkpoint_layouts_load_to_identical_outputs(codec, tmp_path) -> None:
    mimi_dir, csm_dir, _ = _write_checkpoints(codec, tmp_path)
    codes = _codes(4, seed=40)[None]
    pcm = 0.2 * torch.randn(1, 3 * FRAME_SIZE, generator=torch.Generator().manual_seed(41))
    expected_audio, expected_codes = codec.decode(codes), codec.encode(pcm)
    for directory in (mimi_dir, csm_dir):
        loaded = load_codec(directory)
        assert torch.equal(loaded.decode(codes), expected_audio)
        assert torch.equal(loaded.encode(pcm), expected_codes)
    half = load_codec(csm_dir, dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16
    rotaries = [m for m in half.model.modules() if isinstance(m, MimiRotaryEmbedding)]
    assert rotaries and all(m.inv_freq.dtype == torch.float32 for m in rotaries)


def _rewrite(directory, change) -> None:
    state = {}
    for file in sorted(directory.glob("*.safetensors")):
        state |= load_file(file)
        file.unlink()
    change(state)
    save_file(state, directory / "model.safetensors")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda s: s.pop("codec_model.decoder.layers.0.conv.weight"),
            "missing.*decoder.layers.0.conv.weight",
        ),
        (
            lambda s: s.update({"codec_model.decoder.extra.weight": torch.ones(3)}),
            "unknown.*decoder.extra.weight",
        ),
        (
            lambda s: s.update({"codec_model.upsample.conv.weight": torch.ones(64, 1, 3)}),
            r"mis-shaped.*upsample.conv.weight \(64, 1, 3\)",
        ),
    ],
)
def test_bad_checkpoint_tensors_are_named(codec, tmp_path, change, message: str) -> None:
    _, csm_dir, _ = _write_checkpoints(codec, tmp_path)
    _rewrite(csm_dir, change)
    with pytest.raises(ValueError, match=message):
        load_codec(csm_dir)


def test_config_dispatch_rejects_unknown_or_incomplete_configs(tmp_path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="neither 'csm' nor 'mimi'"):
        load_codec(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "csm"}))
    with pytest.raises(ValueError, match="codec_config"):
        load_codec(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        load_codec(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="unknown codec preset"):
        preset_config("mimi-large")


def test_presets_keep_the_real_mimi_geometry() -> None:
    for name in ("tiny", "mimi"):
        config = preset_config(name)
        assert (config.num_quantizers, config.codebook_size, config.frame_size) == (32, 2048, FRAME_SIZE)
        assert config.frame_rate == 12.5
    real, default = preset_config("mimi").to_dict(), type(preset_config("mimi"))().to_dict()
    assert real == default
