"""Sampling: temperature then top-k, per row, with counter-based noise so a seeded request is reproducible
whatever else shares its batch (no global RNG state, no host sync).

The noise for (seed, step, vocabulary index) comes from an integer hash, so row b's draw depends only on
its own seed and step. Gumbel-max over `logits / T + g` samples the same distribution as the reference's
`argmax(softmax(logits / T) / Exp(1))`.
"""

from __future__ import annotations

import torch
from torch import Tensor

_M32 = 0xFFFFFFFF


def _mix32(x: Tensor) -> Tensor:
    # "lowbias32" integer hash (Wellons' hash prospector). Constants < 2^31 keep int64 products exact.
    x = x & _M32
    x = x ^ (x >> 16)
    x = (x * 0x21F0AAAD) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x735A2D97) & _M32
    return x ^ (x >> 15)


def uniform_noise(seed: Tensor, step: Tensor, vocab: int) -> Tensor:
    """Uniform (0, 1) noise. seed: [B] int64; step: [B, N] int64 -> [B, N, vocab] float32."""
    key = _mix32(_mix32(seed) ^ ((seed >> 32) & _M32))[:, None]  # [B, 1]
    key = _mix32(key ^ _mix32(step + 0x9E3779B9))  # [B, N]
    idx = torch.arange(vocab, device=seed.device, dtype=torch.int64)
    bits = _mix32(key[..., None] ^ _mix32(idx * 0x61C88647 + 1))
    # 24 high bits: exactly representable in float32, never 0 or 1.
    return ((bits >> 8).float() + 0.5) * (1.0 / (1 << 24))


def gumbel_noise(seed: Tensor, step: Tensor, vocab: int) -> Tensor:
    """Gumbel(0, 1) noise for steps `step` ([B, N]) of each row: [B, N, vocab]."""
    return -torch.log(-torch.log(uniform_noise(seed, step, vocab)))


def sample(logits: Tensor, temperature: Tensor, top_k: Tensor, k_max: int, gumbel: Tensor) -> Tensor:
    """One token per row.

    logits: [B, V]; temperature: [B] float (0 = greedy); top_k: [B] long in [1, k_max];
    gumbel: [B, V] noise from `gumbel_noise`. Returns [B] long.
    """
    logits = logits.float()
    greedy = logits.argmax(-1)
    t = torch.where(temperature > 0, temperature, torch.ones_like(temperature))
    scaled = logits / t[:, None]
    top = torch.topk(scaled, k_max, dim=-1).values  # [B, k_max], descending
    kth = top.gather(-1, (top_k - 1).clamp(0, k_max - 1)[:, None])  # [B, 1]
    scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    drawn = (scaled + gumbel).argmax(-1)
    return torch.where(temperature > 0, drawn, greedy)
