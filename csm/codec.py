"""Mimi audio codec: presets, weight loading, and whole-clip encode/decode through transformers' MimiModel.

Everything between 24 kHz PCM and Mimi codes (32 codebooks, 12.5 Hz frames of 1920 samples) that is not
streaming. The exact batched streaming encoder and decoder live in `csm.codec_streaming`; they reuse the
modules and weights gathered here (`MimiCodec.parts`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor, nn
from transformers import MimiConfig, MimiModel
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.mimi.modeling_mimi import (
    MimiConv1d,
    MimiConvTranspose1d,
    MimiLayerScale,
    MimiRotaryEmbedding,
    MimiTransformerModel,
)

from csm.audio import FRAME_SIZE, SAMPLE_RATE

NUM_CODEBOOKS = 32  # CSM uses the first 32 Mimi codebooks


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
class MimiParts:
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


def _mimi_parts(model: MimiModel) -> MimiParts:
    if _nested_layout(model):
        encoder, decoder = model.encoder, model.decoder
        return MimiParts(
            encoder.encoder_seanet.layers,
            encoder.encoder_transformer,
            encoder.downsample,
            model.quantizer,
            decoder.upsample,
            decoder.decoder_transformer,
            decoder.decoder_seanet.layers,
        )
    return MimiParts(
        model.encoder.layers,
        model.encoder_transformer,
        model.downsample,
        model.quantizer,
        model.upsample,
        model.decoder_transformer,
        model.decoder.layers,
    )


def rotary(model: MimiTransformerModel) -> MimiRotaryEmbedding:
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
