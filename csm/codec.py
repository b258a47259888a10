"""Mimi audio codec: presets, weight loading, and exact batched streaming encode/decode.

This module owns everything between 24 kHz PCM and Mimi codes (32 codebooks, 12.5 Hz frames of 1920
samples). It wraps transformers' `MimiModel` and reuses its modules and weights, but adds what that model
lacks for serving: streaming with per-stream state for every causal conv (left context), every transposed
conv (overlap tail), and the transformers' sliding-window KV caches, batched over a fixed number of slots.

Streaming contract (for `StreamingDecoder` and `StreamingEncoder`):
- state is allocated once, with fixed shapes, for `num_slots` streams; slots are indices;
- `open(slot)` resets that slot's state in place; `close(slot)` marks it inactive;
- one `step` advances every active slot by the same number of frames; an inactive slot behaves as if its
  step never happened (its state is untouched, its output rows are zeros);
- decoding or encoding a stream in chunks of any size gives the same result as transformers' whole-clip
  `MimiModel.decode` / `MimiModel.encode` (up to float rounding: ~1e-7 relative in fp32).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import Tensor, nn
from transformers import MimiConfig, MimiModel
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.mimi.modeling_mimi import (
    MimiConv1d,
    MimiConvTranspose1d,
    MimiLayerScale,
    MimiResnetBlock,
    MimiRotaryEmbedding,
    MimiTransformerLayer,
    MimiTransformerModel,
    apply_rotary_pos_emb,
    repeat_kv,
)

NUM_CODEBOOKS = 32  # CSM uses the first 32 Mimi codebooks
SAMPLE_RATE = 24_000
FRAME_SIZE = 1920  # samples per 80 ms frame at 24 kHz

# Frames of codes replayed into a fresh slot to rebuild a lost decoder state (`StreamingDecoder.recover`).
# Measured with `bench/codec.py --recovery --threads 1 --preset {tiny,mimi}`: SNR (dB, mean / min of 4
# random 161-frame code sequences, random weights, fp32, CPU) of the 2 s decoded right after frame 136,
# against the exact decode of the whole sequence:
#
#   N frames                   0      1      2      4      8     16     32     64    128    132
#   tiny (window 8 frames)   11.9   14.2   17.1   31.0   94.9  125.4  125.4  125.4  125.4  125.4
#                            10.2   12.3   15.3   30.6   92.6  125.3  125.3  125.3  125.3  125.3
#   mimi (window 125 fr.)    11.3   13.8   16.8   28.9   56.2   58.6   61.6   66.0  109.1  115.5
#                            11.2   13.5   16.1   27.8   55.9   57.9   60.1   65.1  107.8  115.3
#
# The convolutions' memory (~5 frames) dominates: SNR jumps from ~29 to ~56 dB between N=4 and N=8; after
# that the missing attention context costs little (+10 dB by N=64), and N >= 125 + 5 frames rebuilds the
# state exactly for any weights (the attention window is 250 positions at 25 Hz). Default: 16 frames
# (1.3 s of codes, one batch-1 decode of 2 steps), twice the conv memory, ≥58 dB at real dims. Random
# weights may lean on long context less than trained ones; callers that can afford it pass frames=130.
RECOVERY_FRAMES = 16

_CSM_CODEC_PREFIX = "codec_model."

# Mimi checkpoints (kyutai/mimi, and `codec_model.*` inside CSM checkpoints) use the original flat layout;
# transformers' `MimiModel` nests the two halves. Both layouts load; they cannot be confused.
_FLAT_TO_MODULE = (
    ("encoder.layers.", "encoder.encoder_seanet.layers."),
    ("encoder_transformer.", "encoder.encoder_transformer."),
    ("downsample.", "encoder.downsample."),
    ("upsample.", "decoder.upsample."),
    ("decoder_transformer.", "decoder.decoder_transformer."),
    ("decoder.layers.", "decoder.decoder_seanet.layers."),
)


# ---------------------------------------------------------------------------------------------- presets


@dataclass(frozen=True)
class CodecPreset:
    """Mimi dimensions; everything not named here is transformers' `MimiConfig` default (the real Mimi)."""

    hidden_size: int = 512
    num_filters: int = 64
    num_hidden_layers: int = 8
    num_attention_heads: int = 8
    intermediate_size: int = 2048
    codebook_dim: int = 256
    upsample_groups: int = 512
    sliding_window: int = 250
    codebook_size: int = 2048
    num_quantizers: int = NUM_CODEBOOKS
    upsampling_ratios: tuple[int, ...] = (8, 6, 5, 4)
    frame_size: int = field(init=False)

    def __post_init__(self) -> None:
        # The encoder downsamples by prod(ratios), then by 2 to the 12.5 Hz frame rate.
        ratio_product = 1
        for ratio in self.upsampling_ratios:
            ratio_product *= ratio
        object.__setattr__(self, "frame_size", 2 * ratio_product)
        if self.frame_size != FRAME_SIZE:
            raise ValueError(f"preset frame size {self.frame_size} != {FRAME_SIZE} samples")
        if self.hidden_size % self.num_attention_heads or self.hidden_size % self.upsample_groups:
            raise ValueError("hidden_size must be divisible by num_attention_heads and upsample_groups")

    def mimi_config(self) -> MimiConfig:
        return MimiConfig(
            hidden_size=self.hidden_size,
            num_filters=self.num_filters,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_attention_heads,
            intermediate_size=self.intermediate_size,
            codebook_dim=self.codebook_dim,
            vector_quantization_hidden_dimension=self.codebook_dim,
            upsample_groups=self.upsample_groups,
            sliding_window=self.sliding_window,
            codebook_size=self.codebook_size,
            num_quantizers=self.num_quantizers,
            upsampling_ratios=list(self.upsampling_ratios),
        )


PRESETS: dict[str, CodecPreset] = {
    # Small dims, same structure; a short attention window (8 frames) so tests cover the ring buffer wrap.
    "tiny": CodecPreset(
        hidden_size=64,
        num_filters=8,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        codebook_dim=32,
        upsample_groups=64,
        sliding_window=16,
    ),
    # Mid-size, fixed for CPU benchmarks: real structure and window, a quarter of the width.
    "small": CodecPreset(
        hidden_size=256,
        num_filters=16,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=1024,
        codebook_dim=128,
        upsample_groups=256,
    ),
    # The real Mimi dims (transformers' MimiConfig defaults), for benchmarks with random weights.
    "mimi": CodecPreset(),
}


def preset_config(name: str) -> MimiConfig:
    """The `MimiConfig` of a preset, looked up exactly."""
    if name not in PRESETS:
        raise ValueError(f"unknown codec preset {name!r}; known: {sorted(PRESETS)}")
    return PRESETS[name].mimi_config()


# ---------------------------------------------------------------------------------------------- the codec


class MimiCodec:
    """A loaded Mimi (transformers' `MimiModel`, eval mode, no grads) with whole-clip encode and decode."""

    def __init__(self, model: MimiModel) -> None:
        _check_streamable(model.config)
        self.model = model.eval().requires_grad_(False)
        self.config: MimiConfig = model.config
        self.parts = _mimi_parts(model)
        self.sample_rate = SAMPLE_RATE
        self.frame_size = FRAME_SIZE
        self.num_codebooks = NUM_CODEBOOKS

    @property
    def device(self) -> torch.device:
        return self.model.quantizer.semantic_residual_vector_quantizer.layers[0].codebook.embed_sum.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.quantizer.semantic_residual_vector_quantizer.layers[0].codebook.embed_sum.dtype

    @torch.no_grad()
    def encode(self, pcm: Tensor) -> Tensor:
        """Whole-clip encode. pcm: [B, L] or [L] float at 24 kHz → codes [B, 32, ceil(L / 1920)] int64."""
        batch = pcm.reshape(-1, 1, pcm.shape[-1]).to(self.device, self.dtype)
        return self.model.encode(batch, num_quantizers=NUM_CODEBOOKS).audio_codes

    @torch.no_grad()
    def decode(self, codes: Tensor) -> Tensor:
        """Whole-clip decode. codes: [B, 32, F] → pcm [B, F * 1920] float32."""
        audio = self.model.decode(codes.to(self.device)).audio_values  # [B, 1, F * 1920]
        return audio[:, 0].float()


def _check_streamable(config: MimiConfig) -> None:
    """Streaming here assumes the real Mimi's structure; reject configs it would silently get wrong."""
    problems = []
    if not config.use_causal_conv:
        problems.append("use_causal_conv must be true")
    if config.trim_right_ratio != 1.0:
        problems.append(f"trim_right_ratio must be 1.0, not {config.trim_right_ratio}")
    if config.pad_mode not in ("constant", "replicate"):
        problems.append(f"pad_mode {config.pad_mode!r} is not streamable")
    if config.num_quantizers < NUM_CODEBOOKS:
        problems.append(f"num_quantizers {config.num_quantizers} < {NUM_CODEBOOKS}")
    if config.sampling_rate != SAMPLE_RATE or config.frame_size != FRAME_SIZE:
        problems.append(f"needs {SAMPLE_RATE} Hz audio and {FRAME_SIZE}-sample frames")
    if config.encodec_frame_rate == config.frame_rate:
        problems.append("needs the upsample/downsample layers (frame_rate != encodec_frame_rate)")
    if problems:
        raise ValueError("unsupported Mimi config: " + "; ".join(problems))


@dataclass(frozen=True)
class _MimiParts:
    """The modules streaming runs, wherever this transformers version keeps them."""

    encoder_seanet: nn.ModuleList
    encoder_transformer: MimiTransformerModel
    downsample: MimiConv1d
    quantizer: nn.Module
    upsample: MimiConvTranspose1d
    decoder_transformer: MimiTransformerModel
    decoder_seanet: nn.ModuleList


def _nested_layout(model: MimiModel) -> bool:
    # Recent transformers (5.2x) split MimiModel into encoder/decoder halves; earlier ones (4.x) keep it flat.
    return hasattr(model.decoder, "decoder_seanet")


def _mimi_parts(model: MimiModel) -> _MimiParts:
    if _nested_layout(model):
        encoder, decoder = model.encoder, model.decoder
        return _MimiParts(
            encoder.encoder_seanet.layers,
            encoder.encoder_transformer,
            encoder.downsample,
            model.quantizer,
            decoder.upsample,
            decoder.decoder_transformer,
            decoder.decoder_seanet.layers,
        )
    return _MimiParts(
        model.encoder.layers,
        model.encoder_transformer,
        model.downsample,
        model.quantizer,
        model.upsample,
        model.decoder_transformer,
        model.decoder.layers,
    )


def _rotary(model: MimiTransformerModel) -> MimiRotaryEmbedding:
    # One shared rotary module in recent transformers, one per attention layer (all equal) before.
    return getattr(model, "rotary_emb", None) or model.layers[0].self_attn.rotary_emb


def random_codec(
    preset: str = "tiny",
    *,
    seed: int = 0,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> MimiCodec:
    """A Mimi with random weights (no checkpoint needed): output is noise, shapes and costs are real.

    transformers initializes codebooks to zeros (every code would decode alike) and layer scales to 0.01
    (the transformers would barely matter); random codebooks and 0.1 layer scales make both count, which the
    streaming tests and the recovery measurement need.
    """
    config = preset_config(preset)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = MimiModel(config)
        for module in model.modules():
            if isinstance(module, MimiLayerScale):
                module.scale.data.fill_(0.1)
        for name, buffer in model.named_buffers():
            if name.endswith("codebook.embed_sum"):
                buffer.normal_()
    finally:
        torch.random.set_rng_state(generator_state)
    model.to(device=device, dtype=dtype)
    _materialize_buffers(model, torch.device(device))
    return MimiCodec(model)


# ---------------------------------------------------------------------------------------------- loading


def read_codec_config(path: str | Path) -> tuple[MimiConfig, str]:
    """The Mimi config of a checkpoint directory and the prefix of its codec tensors.

    Dispatches on config.json's `model_type`: "csm" (its `codec_config`, tensors under `codec_model.`) or
    "mimi" (the whole directory is the codec).
    """
    config_path = Path(path) / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"no config.json in {path}")
    raw = json.loads(config_path.read_text())
    model_type = raw.get("model_type")
    if model_type == "csm":
        codec = raw.get("codec_config")
        if not isinstance(codec, dict):
            raise ValueError(f"{config_path}: a CSM config needs a `codec_config` object")
        if codec.get("model_type", "mimi") != "mimi":
            raise ValueError(
                f"{config_path}: codec_config.model_type is {codec.get('model_type')!r}, not 'mimi'"
            )
        return MimiConfig.from_dict(codec), _CSM_CODEC_PREFIX
    if model_type == "mimi":
        return MimiConfig.from_dict(raw), ""
    raise ValueError(f"{config_path}: model_type {model_type!r} is neither 'csm' nor 'mimi'")


def load_codec(
    path: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> MimiCodec:
    """Load Mimi from an HF-format CSM checkpoint directory or a standalone Mimi directory.

    The model is built on the meta device and the checkpoint tensors are assigned into it, so the weights
    exist once. Missing, unknown or mis-shaped tensors raise a ValueError naming them.
    """
    config, prefix = read_codec_config(path)
    with torch.device("meta"):
        model = MimiModel(config)
    expected = {name: tensor.shape for name, tensor in model.state_dict().items()}
    rename = module_key if _nested_layout(model) else str
    state = _read_codec_tensors(Path(path), prefix, expected, rename, torch.device(device), dtype)
    model.load_state_dict(state, strict=True, assign=True)
    _materialize_buffers(model, torch.device(device))
    return MimiCodec(model)


def module_key(checkpoint_key: str) -> str:
    """Map a flat Mimi checkpoint key to a nested-layout `MimiModel`'s name (nested names pass unchanged)."""
    for flat, nested in _FLAT_TO_MODULE:
        if checkpoint_key.startswith(flat):
            return nested + checkpoint_key[len(flat) :]
    return checkpoint_key


def checkpoint_key(module_name: str) -> str:
    """Map a `MimiModel` parameter name to the flat key Mimi checkpoints store it under."""
    for flat, nested in _FLAT_TO_MODULE:
        if module_name.startswith(nested):
            return flat + module_name[len(nested) :]
    return module_name


def checkpoint_state_dict(model: MimiModel) -> dict[str, Tensor]:
    """`model`'s tensors under the flat key names Mimi checkpoints use (for writing test checkpoints)."""
    return {checkpoint_key(name): tensor for name, tensor in model.state_dict().items()}


def _read_codec_tensors(
    directory: Path,
    prefix: str,
    expected: dict[str, torch.Size],
    rename: Callable[[str], str],
    device: torch.device,
    dtype: torch.dtype,
) -> dict[str, Tensor]:
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {directory}")
    state: dict[str, Tensor] = {}
    unknown, misshaped = [], []
    for file in files:
        # safe_open reads only the tensors asked for: a CSM checkpoint's backbone is never loaded here.
        with safe_open(str(file), framework="pt", device="cpu") as reader:
            for key in reader.keys():
                if not key.startswith(prefix):
                    continue
                name = rename(key[len(prefix) :])
                if name not in expected:
                    unknown.append(key)
                    continue
                tensor = reader.get_tensor(key)
                if tensor.shape != expected[name]:
                    misshaped.append(f"{key} {tuple(tensor.shape)} (expected {tuple(expected[name])})")
                    continue
                if tensor.is_floating_point():
                    tensor = tensor.to(dtype)
                state[name] = tensor.to(device)
    missing = [prefix + checkpoint_key(name) for name in expected if name not in state]
    problems = []
    for label, names in (("missing", missing), ("unknown", unknown), ("mis-shaped", misshaped)):
        if names:
            shown = ", ".join(names[:8]) + (f", ... ({len(names)} in all)" if len(names) > 8 else "")
            problems.append(f"{label} tensors: {shown}")
    if problems:
        raise ValueError(f"Mimi checkpoint {directory} does not match its config: " + "; ".join(problems))
    return state


def _materialize_buffers(model: MimiModel, device: torch.device) -> None:
    """Recompute the buffers checkpoints do not hold (conv geometry, RoPE frequencies) on `device`.

    Also keeps RoPE frequencies in fp32 whatever the model dtype, as transformers' forward expects.
    """
    for module in model.modules():
        if isinstance(module, MimiConv1d):
            conv = module.conv
            kernel = (conv.kernel_size[0] - 1) * conv.dilation[0] + 1
            module.stride = torch.tensor(conv.stride[0], device=device)
            module.kernel_size = torch.tensor(kernel, device=device)
            module.padding_total = torch.tensor(kernel - conv.stride[0], device=device)
            module.padding_right = module.padding_total // 2
            module.padding_left = module.padding_total - module.padding_right
        elif isinstance(module, MimiRotaryEmbedding):
            init = getattr(module, "rope_init_fn", None)  # older transformers keep it on the module
            if init is None:
                init = (
                    module.compute_default_rope_parameters
                    if module.rope_type == "default"
                    else ROPE_INIT_FUNCTIONS[module.rope_type]
                )
            inv_freq, module.attention_scaling = init(module.config, device=device)
            module.inv_freq = inv_freq.to(device=device, dtype=torch.float32)
            module.original_inv_freq = module.inv_freq.clone()
    left = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise ValueError(f"tensors left uninitialized after loading: {', '.join(left)}")


# ---------------------------------------------------------------------------------------------- stream state


@dataclass
class _ConvState:
    """Left context of one causal conv: its last `padding_total` inputs, per slot."""

    context: Tensor  # [S, C_in, P]
    fresh: Tensor  # [S] bool: nothing seen yet (replicate padding then copies the first input)
    replicate: bool

    def reset(self, mask: Tensor) -> None:
        self.context.masked_fill_(mask[:, None, None], 0.0)
        self.fresh |= mask


@dataclass
class _ConvTransposeState:
    """Overlap tail of one transposed conv: its last K - stride outputs (no bias), owed to the next chunk."""

    tail: Tensor  # [S, C_out, K - stride]

    def reset(self, mask: Tensor) -> None:
        self.tail.masked_fill_(mask[:, None, None], 0.0)


@dataclass
class _ResnetState:
    """Contexts of a SEANet residual block's convs (and its conv shortcut, if any)."""

    convs: list[_ConvState]
    shortcut: _ConvState | None

    def reset(self, mask: Tensor) -> None:
        for conv in [*self.convs, self.shortcut]:
            if conv is not None:
                conv.reset(mask)


@dataclass
class _SeanetState:
    """One state per SEANet layer (None for the stateless ELUs)."""

    layers: list[_ConvState | _ConvTransposeState | _ResnetState | None]

    def reset(self, mask: Tensor) -> None:
        for layer in self.layers:
            if layer is not None:
                layer.reset(mask)


@dataclass
class _TransformerState:
    """Sliding-window KV cache of every layer, as rings of `capacity` positions, and each slot's position.

    capacity = window + max positions per step - 1: a step writes its keys before attending, and what it
    overwrites is then already out of every query's window, so inactive slots may write garbage freely.
    """

    keys: list[Tensor]  # per layer [S, H_kv, capacity, head_dim]
    values: list[Tensor]
    position: Tensor  # [S] int64: position of the slot's next input
    window: int

    def reset(self, mask: Tensor) -> None:
        self.position.masked_fill_(mask, 0)
        for cache in [*self.keys, *self.values]:
            cache.masked_fill_(mask[:, None, None, None], 0.0)


@dataclass
class _DecoderStreamState:
    """Everything a decoding stream carries between steps."""

    upsample: _ConvTransposeState
    transformer: _TransformerState
    seanet: _SeanetState

    def reset(self, mask: Tensor) -> None:
        self.upsample.reset(mask)
        self.transformer.reset(mask)
        self.seanet.reset(mask)


@dataclass
class _EncoderStreamState:
    """Everything an encoding stream carries between steps."""

    seanet: _SeanetState
    transformer: _TransformerState
    downsample: _ConvState

    def reset(self, mask: Tensor) -> None:
        self.seanet.reset(mask)
        self.transformer.reset(mask)
        self.downsample.reset(mask)


def _slot_view(state: Any, slot: int) -> Any:
    """The same state narrowed to one slot. Views: in-place updates land in the batched state."""
    if isinstance(state, Tensor):
        return state[slot : slot + 1]
    if isinstance(state, list):
        return [_slot_view(item, slot) for item in state]
    if dataclasses.is_dataclass(state):
        narrowed = {f.name: _slot_view(getattr(state, f.name), slot) for f in dataclasses.fields(state)}
        return dataclasses.replace(state, **narrowed)
    return state


# ---------------------------------------------------------------------------------------------- state setup


def _new_conv_state(conv: MimiConv1d, slots: int, like: Tensor) -> _ConvState:
    inner = conv.conv
    padding = (inner.kernel_size[0] - 1) * inner.dilation[0] + 1 - inner.stride[0]
    return _ConvState(
        context=like.new_zeros(slots, inner.in_channels, padding),
        fresh=torch.ones(slots, dtype=torch.bool, device=like.device),
        replicate=conv.pad_mode == "replicate",
    )


def _new_conv_transpose_state(conv: MimiConvTranspose1d, slots: int, like: Tensor) -> _ConvTransposeState:
    inner = conv.conv
    return _ConvTransposeState(
        like.new_zeros(slots, inner.out_channels, inner.kernel_size[0] - inner.stride[0])
    )


def _new_seanet_state(layers: nn.ModuleList, slots: int, like: Tensor) -> _SeanetState:
    states: list[_ConvState | _ConvTransposeState | _ResnetState | None] = []
    for layer in layers:
        if isinstance(layer, MimiConv1d):
            states.append(_new_conv_state(layer, slots, like))
        elif isinstance(layer, MimiConvTranspose1d):
            states.append(_new_conv_transpose_state(layer, slots, like))
        elif isinstance(layer, MimiResnetBlock):
            convs = [_new_conv_state(c, slots, like) for c in layer.block if isinstance(c, MimiConv1d)]
            shortcut = (
                _new_conv_state(layer.shortcut, slots, like)
                if isinstance(layer.shortcut, MimiConv1d)
                else None
            )
            states.append(_ResnetState(convs, shortcut))
        elif isinstance(layer, nn.ELU):
            states.append(None)
        else:
            raise TypeError(f"no streaming rule for SEANet layer {type(layer).__name__}")
    return _SeanetState(states)


def _new_transformer_state(
    model: MimiTransformerModel, config: MimiConfig, slots: int, max_positions: int, like: Tensor
) -> _TransformerState:
    capacity = config.sliding_window + max_positions - 1
    shape = (slots, config.num_key_value_heads, capacity, config.head_dim)
    return _TransformerState(
        keys=[like.new_zeros(shape) for _ in model.layers],
        values=[like.new_zeros(shape) for _ in model.layers],
        position=torch.zeros(slots, dtype=torch.long, device=like.device),
        window=config.sliding_window,
    )


# ------------------------------------------------------------------------------------------ streaming math
# Each function runs one module of transformers' Mimi on a chunk, with that module's weights, and updates the
# state of active slots in place. `active`: [S] bool. `final`: the clip's last, partial chunk, padded on the
# right exactly as transformers pads a whole clip whose length is not a multiple of the frame.


def _conv_step(conv: MimiConv1d, state: _ConvState, x: Tensor, active: Tensor, final: bool = False) -> Tensor:
    # x: [S, C_in, L] → [S, C_out, L / stride]
    context = state.context
    if state.replicate:
        context = torch.where(state.fresh[:, None, None], x[..., :1].expand_as(context), context)
    full = torch.cat([context, x], dim=-1)
    if final:
        extra = int(conv._get_extra_padding_for_conv1d(x))
        full = F.pad(full, (0, extra), mode="replicate" if state.replicate else "constant")
    else:
        keep = full[..., full.shape[-1] - context.shape[-1] :]
        state.context.copy_(torch.where(active[:, None, None], keep, state.context))
    state.fresh &= ~active
    return conv.conv(full)


def _conv_transpose_step(
    conv: MimiConvTranspose1d, state: _ConvTransposeState, x: Tensor, active: Tensor
) -> Tensor:
    # x: [S, C_in, L] → [S, C_out, L * stride]; the whole-clip output is trimmed only on the right
    # (trim_right_ratio 1), so chunk outputs concatenate to it once each tail is added to the next chunk.
    inner = conv.conv
    y = _conv_transpose_no_bias(x, inner)
    overlap = state.tail.shape[-1]
    y = torch.cat([y[..., :overlap] + state.tail, y[..., overlap:]], dim=-1)
    emitted = x.shape[-1] * inner.stride[0]
    state.tail.copy_(torch.where(active[:, None, None], y[..., emitted:], state.tail))
    out = y[..., :emitted]
    return out if inner.bias is None else out + inner.bias[:, None]


def _conv_transpose_no_bias(x: Tensor, conv: nn.ConvTranspose1d) -> Tensor:
    # x: [S, C_in, L] → [S, C_out, (L - 1) * stride + K]. One matmul against the weight as stored, then an
    # overlap-add: on CPU, torch's transposed conv copies a large weight on every call, which dominates a
    # streaming step (46 ms of 60 for real-dims Mimi at batch 1).
    stride, kernel = conv.stride[0], conv.kernel_size[0]
    if conv.groups != 1 or kernel % stride:
        return F.conv_transpose1d(x, conv.weight, None, conv.stride, 0, 0, conv.groups)
    slots, _, length = x.shape
    out_channels, blocks = conv.out_channels, kernel // stride
    cols = x.transpose(1, 2) @ conv.weight.flatten(1)  # [S, L, C_out * K]
    # [S, m, C_out, L, s]: block j of the kernel lands j * stride samples later
    cols = cols.view(slots, length, out_channels, blocks, stride).permute(0, 3, 2, 1, 4)
    y = x.new_zeros(slots, out_channels, (length + blocks - 1) * stride)
    span = length * stride
    for block in range(blocks):
        start = block * stride
        y[..., start : start + span] += cols[:, block].reshape(slots, out_channels, span)
    return y


def _resnet_step(
    block: MimiResnetBlock, state: _ResnetState, x: Tensor, active: Tensor, final: bool
) -> Tensor:
    h = x
    convs = iter(state.convs)
    for layer in block.block:
        h = _conv_step(layer, next(convs), h, active, final) if isinstance(layer, MimiConv1d) else layer(h)
    residual = x if state.shortcut is None else _conv_step(block.shortcut, state.shortcut, x, active, final)
    return residual + h


def _seanet_step(
    layers: nn.ModuleList, state: _SeanetState, x: Tensor, active: Tensor, final: bool = False
) -> Tensor:
    for layer, layer_state in zip(layers, state.layers, strict=True):
        if isinstance(layer, MimiConv1d):
            x = _conv_step(layer, layer_state, x, active, final)
        elif isinstance(layer, MimiConvTranspose1d):
            x = _conv_transpose_step(layer, layer_state, x, active)
        elif isinstance(layer, MimiResnetBlock):
            x = _resnet_step(layer, layer_state, x, active, final)
        else:
            x = layer(x)
    return x


def _transformer_step(
    model: MimiTransformerModel, state: _TransformerState, x: Tensor, active: Tensor
) -> Tensor:
    # x: [S, n, D] → [S, n, D]; positions continue per slot, attention sees the last `window` positions.
    n = x.shape[1]
    capacity = state.keys[0].shape[2]
    if n > capacity - state.window + 1:
        raise ValueError(
            f"{n} positions in one step; the state was allocated for {capacity - state.window + 1}"
        )
    offsets = torch.arange(n, device=x.device)
    query_pos = state.position[:, None] + offsets  # [S, n]
    ring = query_pos % capacity  # [S, n]: where each new key goes
    newest = query_pos[:, -1:]  # [S, 1]
    key_pos = newest - torch.remainder(newest - torch.arange(capacity, device=x.device), capacity)  # [S, C]
    distance = query_pos[:, :, None] - key_pos[:, None, :]  # [S, n, C]
    mask = ((key_pos[:, None, :] >= 0) & (distance >= 0) & (distance < state.window))[:, None]  # [S,1,n,C]
    cos, sin = _rotary(model)(x, query_pos)
    for layer, keys, values in zip(model.layers, state.keys, state.values, strict=True):
        x = _transformer_layer_step(layer, keys, values, ring, mask, x, cos, sin)
    state.position += n * active.long()
    return x


def _transformer_layer_step(
    layer: MimiTransformerLayer,
    keys: Tensor,
    values: Tensor,
    ring: Tensor,
    mask: Tensor,
    x: Tensor,
    cos: Tensor,
    sin: Tensor,
) -> Tensor:
    attn = layer.self_attn
    slots, n, _ = x.shape
    h = layer.input_layernorm(x)
    q = attn.q_proj(h).view(slots, n, -1, attn.head_dim).transpose(1, 2)  # [S, H, n, Dh]
    k = attn.k_proj(h).view(slots, n, -1, attn.head_dim).transpose(1, 2)  # [S, H_kv, n, Dh]
    v = attn.v_proj(h).view(slots, n, -1, attn.head_dim).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    index = ring[:, None, :, None].expand_as(k)
    keys.scatter_(2, index, k)
    values.scatter_(2, index, v)
    groups = attn.num_key_value_groups
    o = F.scaled_dot_product_attention(
        q, repeat_kv(keys, groups), repeat_kv(values, groups), attn_mask=mask, scale=attn.scaling
    )
    x = x + layer.self_attn_layer_scale(attn.o_proj(o.transpose(1, 2).reshape(slots, n, -1)))
    return x + layer.mlp_layer_scale(layer.mlp(layer.post_attention_layernorm(x)))


# ---------------------------------------------------------------------------------------------- decoder


class StreamingDecoder:
    """Exact streaming Mimi decode, batched across `num_slots` streams (see the module docstring's contract).

    `step(codes)` decodes the next k frames of every active slot in one forward; any k up to
    `max_frames_per_step` (fixed at allocation, it sizes the KV rings).
    """

    def __init__(self, codec: MimiCodec, num_slots: int, max_frames_per_step: int = 8) -> None:
        self.codec = codec
        self.num_slots = num_slots
        self.max_frames_per_step = max_frames_per_step
        like = torch.empty(0, device=codec.device, dtype=codec.dtype)
        parts = codec.parts
        positions = max_frames_per_step * parts.upsample.conv.stride[0]
        self._state = _DecoderStreamState(
            upsample=_new_conv_transpose_state(parts.upsample, num_slots, like),
            transformer=_new_transformer_state(
                parts.decoder_transformer, codec.config, num_slots, positions, like
            ),
            seanet=_new_seanet_state(parts.decoder_seanet, num_slots, like),
        )
        self.active = torch.zeros(num_slots, dtype=torch.bool, device=codec.device)

    def open(self, slot: int) -> None:
        """Start a new stream in `slot` (its state is reset in place)."""
        self.reset(_one_slot(slot, self.num_slots, self.active.device))
        self.active[slot] = True

    def close(self, slot: int) -> None:
        """End the stream in `slot`; its state stays as it was until the slot is opened again."""
        self.active[slot] = False

    def reset(self, mask: Tensor) -> None:
        """Reset the state of every slot in `mask` ([S] bool), in place."""
        self._state.reset(mask.to(self.active.device))

    @torch.no_grad()
    def step(self, codes: Tensor, advance: Tensor | None = None) -> Tensor:
        """codes: [S, 32, k] int64 → pcm [S, k * 1920] float32 (zeros for slots that did not advance).

        `advance` ([S] bool, default all): which open slots have a chunk this step; the others sit it out as
        if it never happened and continue seamlessly at a later step. Rows of the others are ignored.
        """
        if codes.shape[0] != self.num_slots or codes.shape[1] != NUM_CODEBOOKS:
            raise ValueError(
                f"codes shape {tuple(codes.shape)}; expected [{self.num_slots}, {NUM_CODEBOOKS}, k]"
            )
        if not 0 < codes.shape[2] <= self.max_frames_per_step:
            raise ValueError(f"{codes.shape[2]} frames in one step; allowed 1..{self.max_frames_per_step}")
        active = self.active if advance is None else self.active & advance.to(self.active.device)
        pcm = _decode_chunk(self.codec.parts, self._state, codes.to(self.active.device), active)
        return torch.where(active[:, None], pcm, 0.0)

    @torch.no_grad()
    def recover(self, slot: int, codes: Tensor, frames: int = RECOVERY_FRAMES) -> None:
        """Rebuild a lost stream in `slot` from its codes so far ([32, T]): open the slot and replay the last
        `frames` frames, discarding their audio. The next `step` continues the stream (see RECOVERY_FRAMES
        for how close that gets)."""
        self.open(slot)
        tail = codes[:, max(0, codes.shape[1] - frames) :].to(self.active.device)
        view = _slot_view(self._state, slot)
        active = torch.ones(1, dtype=torch.bool, device=self.active.device)
        for start in range(0, tail.shape[1], self.max_frames_per_step):
            _decode_chunk(
                self.codec.parts, view, tail[None, :, start : start + self.max_frames_per_step], active
            )


def _one_slot(slot: int, num_slots: int, device: torch.device) -> Tensor:
    if not 0 <= slot < num_slots:
        raise IndexError(f"slot {slot} out of range 0..{num_slots - 1}")
    mask = torch.zeros(num_slots, dtype=torch.bool, device=device)
    mask[slot] = True
    return mask


def _decode_chunk(parts: _MimiParts, state: _DecoderStreamState, codes: Tensor, active: Tensor) -> Tensor:
    # codes: [S, K, k] → pcm [S, k * 1920] float32
    latents = parts.quantizer.decode(codes)  # [S, D, k]: per frame, stateless
    h = _conv_transpose_step(parts.upsample, state.upsample, latents, active)  # [S, D, 2k]
    h = _transformer_step(parts.decoder_transformer, state.transformer, h.transpose(1, 2), active)
    audio = _seanet_step(parts.decoder_seanet, state.seanet, h.transpose(1, 2), active)
    return audio[:, 0].float()


# ---------------------------------------------------------------------------------------------- encoder


class StreamingEncoder:
    """Exact streaming Mimi encode, batched across `num_slots` streams (see the module docstring's contract).

    `push(slot, pcm)` buffers 24 kHz audio of any length; `encode_ready()` encodes every complete 1920-sample
    frame buffered, batched across slots; `flush(slot)` encodes the rest (a partial frame is padded as
    transformers pads a whole clip) and ends the stream. The codes equal `MimiModel.encode` of the whole clip.
    """

    def __init__(self, codec: MimiCodec, num_slots: int, max_frames_per_step: int = 8) -> None:
        self.codec = codec
        self.num_slots = num_slots
        self.max_frames_per_step = max_frames_per_step
        like = torch.empty(0, device=codec.device, dtype=codec.dtype)
        parts = codec.parts
        positions = max_frames_per_step * parts.downsample.conv.stride[0]
        self._state = _EncoderStreamState(
            seanet=_new_seanet_state(parts.encoder_seanet, num_slots, like),
            transformer=_new_transformer_state(
                parts.encoder_transformer, codec.config, num_slots, positions, like
            ),
            downsample=_new_conv_state(parts.downsample, num_slots, like),
        )
        self.device = codec.device
        # Host-side: which slots are open, and their audio not yet encoded (the input arrives on the host).
        self.active = [False] * num_slots
        self._pending: list[Tensor] = [like.new_zeros(0) for _ in range(num_slots)]

    def open(self, slot: int) -> None:
        """Start a new stream in `slot`: state reset in place, buffered audio dropped."""
        self._state.reset(_one_slot(slot, self.num_slots, self.device))
        self._pending[slot] = self._pending[slot].new_zeros(0)
        self.active[slot] = True

    def close(self, slot: int) -> None:
        """End the stream in `slot`, dropping any buffered audio (use `flush` to encode it)."""
        self.active[slot] = False
        self._pending[slot] = self._pending[slot].new_zeros(0)

    def push(self, slot: int, pcm: Tensor) -> None:
        """Buffer float audio ([n], 24 kHz) for an open slot."""
        if not self.active[slot]:
            raise ValueError(f"slot {slot} is not open")
        if pcm.ndim != 1 or not pcm.is_floating_point():
            raise ValueError(f"pcm must be a 1-D float tensor, got {pcm.dtype} {tuple(pcm.shape)}")
        self._pending[slot] = torch.cat([self._pending[slot], pcm.to(self._pending[slot])])

    def pending_samples(self, slot: int) -> int:
        return self._pending[slot].shape[0]

    @torch.no_grad()
    def encode_ready(self) -> list[Tensor]:
        """Encode every complete frame buffered; per slot, codes [32, F] int64 (F may be 0)."""
        out: list[list[Tensor]] = [[] for _ in range(self.num_slots)]
        while True:
            ready = [self.pending_samples(s) // FRAME_SIZE for s in range(self.num_slots)]
            if not any(ready):
                break
            # One forward advances every ready slot by the same number of frames.
            frames = min(min(r for r in ready if r), self.max_frames_per_step)
            length = frames * FRAME_SIZE
            active = torch.tensor([r > 0 for r in ready], device=self.device)
            chunk = self._pending[0].new_zeros(self.num_slots, 1, length)
            for slot, count in enumerate(ready):
                if count:
                    chunk[slot, 0] = self._pending[slot][:length]
                    self._pending[slot] = self._pending[slot][length:]
            codes = _encode_chunk(self.codec.parts, self._state, chunk, active)
            for slot, count in enumerate(ready):
                if count:
                    out[slot].append(codes[slot])
        empty = torch.zeros(NUM_CODEBOOKS, 0, dtype=torch.long, device=self.device)
        return [torch.cat(parts, dim=-1) if parts else empty for parts in out]

    @torch.no_grad()
    def flush(self, slot: int) -> Tensor:
        """Encode everything still buffered for `slot` (the last frame may be partial) and close it."""
        view = _slot_view(self._state, slot)
        active = torch.ones(1, dtype=torch.bool, device=self.device)
        pending = self._pending[slot]
        parts = []
        for start in range(0, pending.shape[0], self.max_frames_per_step * FRAME_SIZE):
            piece = pending[start : start + self.max_frames_per_step * FRAME_SIZE]
            final = piece.shape[0] % FRAME_SIZE != 0
            parts.append(_encode_chunk(self.codec.parts, view, piece[None, None], active, final)[0])
        self.close(slot)
        empty = torch.zeros(NUM_CODEBOOKS, 0, dtype=torch.long, device=self.device)
        return torch.cat(parts, dim=-1) if parts else empty


def _encode_chunk(
    parts: _MimiParts, state: _EncoderStreamState, pcm: Tensor, active: Tensor, final: bool = False
) -> Tensor:
    # pcm: [S, 1, L] → codes [S, K, ceil(L / 1920)]
    h = _seanet_step(parts.encoder_seanet, state.seanet, pcm, active, final)  # [S, D, L / 960]
    h = _transformer_step(parts.encoder_transformer, state.transformer, h.transpose(1, 2), active)
    latents = _conv_step(parts.downsample, state.downsample, h.transpose(1, 2), active, final)
    return parts.quantizer.encode(latents, NUM_CODEBOOKS).transpose(0, 1)
