"""Model shapes: one dataclass per transformer, one for the whole CSM model, and the named presets.

`tiny` runs in tests and when no weights are given; `small` is fixed for CPU benchmarks so numbers stay
comparable across runs; `csm-1b` is the real shape (Llama-3.2-1B backbone, 100M-class depth decoder).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3 frequency scaling (what torchtune's Llama3ScaledRoPE and transformers' "llama3" compute)."""

    factor: float = 32.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class TransformerArgs:
    n_layers: int
    dim: int
    n_heads: int
    n_kv_heads: int
    intermediate_size: int
    max_seq_len: int
    norm_eps: float = 1e-5
    rope_theta: float = 500_000.0
    rope_scaling: RopeScaling | None = field(default_factory=RopeScaling)
    head_dim: int = 0  # derived when 0

    def __post_init__(self) -> None:
        if self.head_dim == 0:
            object.__setattr__(self, "head_dim", self.dim // self.n_heads)
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")


@dataclass(frozen=True)
class ModelArgs:
    backbone: TransformerArgs
    decoder: TransformerArgs
    text_vocab_size: int = 128_256
    audio_vocab_size: int = 2051  # 2048 Mimi codes + specials
    num_codebooks: int = 32
    codebook_size: int = 2048  # valid Mimi code range is [0, codebook_size)

    def __post_init__(self) -> None:
        if self.decoder.max_seq_len < self.num_codebooks + 1:
            raise ValueError("the depth decoder needs num_codebooks + 1 positions")

    @property
    def max_seq_len(self) -> int:
        return self.backbone.max_seq_len

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelArgs:
        def transformer(t: dict) -> TransformerArgs:
            t = dict(t)
            scaling = t.pop("rope_scaling", None)
            return TransformerArgs(**t, rope_scaling=RopeScaling(**scaling) if scaling else None)

        d = dict(d)
        return cls(backbone=transformer(d.pop("backbone")), decoder=transformer(d.pop("decoder")), **d)


# Transformer "flavors" as the original Sesame checkpoints name them (config.json: backbone_flavor,
# decoder_flavor), plus the flavors of our own presets so tests can write checkpoints in that format.
FLAVORS: dict[str, TransformerArgs] = {
    "llama-1B": TransformerArgs(
        n_layers=16, dim=2048, n_heads=32, n_kv_heads=8, intermediate_size=8192, max_seq_len=2048
    ),
    "llama-100M": TransformerArgs(
        n_layers=4, dim=1024, n_heads=8, n_kv_heads=2, intermediate_size=8192, max_seq_len=2048
    ),
    "small-backbone": TransformerArgs(
        n_layers=8, dim=512, n_heads=8, n_kv_heads=2, intermediate_size=2048, max_seq_len=2048
    ),
    "small-decoder": TransformerArgs(
        n_layers=2, dim=256, n_heads=4, n_kv_heads=2, intermediate_size=1024, max_seq_len=33
    ),
    "tiny-backbone": TransformerArgs(
        n_layers=2, dim=64, n_heads=4, n_kv_heads=2, intermediate_size=128, max_seq_len=2048
    ),
    "tiny-decoder": TransformerArgs(
        n_layers=2, dim=32, n_heads=2, n_kv_heads=1, intermediate_size=64, max_seq_len=33
    ),
}

# name -> (backbone flavor, decoder flavor, text vocab size)
_PRESETS: dict[str, tuple[str, str, int]] = {
    "tiny": ("tiny-backbone", "tiny-decoder", 320),
    "small": ("small-backbone", "small-decoder", 128_256),
    "csm-1b": ("llama-1B", "llama-100M", 128_256),
}

PRESET_NAMES = tuple(_PRESETS)


def flavor(name: str) -> TransformerArgs:
    try:
        return FLAVORS[name]
    except KeyError:
        raise ValueError(f"unknown transformer flavor {name!r}; known: {sorted(FLAVORS)}") from None


def preset(name: str) -> ModelArgs:
    """The model shape of a named preset; an unknown name is an error, never a guess."""
    try:
        backbone, decoder, text_vocab = _PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; known: {list(_PRESETS)}") from None
    dec = dataclasses.replace(flavor(decoder), max_seq_len=33)
    return ModelArgs(backbone=flavor(backbone), decoder=dec, text_vocab_size=text_vocab)
