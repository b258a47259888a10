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


def uniform_noise(seed: Tensor, step: Tensor, token: Tensor) -> Tensor:
    """Uniform (0, 1) noise per (seed, step, token). seed, step: [B] int64; token: [B, K] -> [B, K]."""
    key = _mix32(_mix32(seed) ^ ((seed >> 32) & _M32))
    key = _mix32(key ^ _mix32(step + 0x9E3779B9))  # [B]
    bits = _mix32(key[:, None] ^ _mix32(token * 0x61C88647 + 1))
    # 24 high bits: exactly representable in float32, never 0 or 1.
    return ((bits >> 8).float() + 0.5) * (1.0 / (1 << 24))


def sample(
    logits: Tensor, temperature: Tensor, top_k: Tensor, k_max: int, seed: Tensor, step: Tensor
) -> Tensor:
    """One token per row: greedy where temperature is 0, else temperature then top-k.

    logits: [B, V]; temperature: [B] float; top_k: [B] long in [1, k_max]; seed, step: [B] int64.
    Returns [B] long. Only the k_max candidates get noise, keyed by token id, so a row's draw does not
    depend on k_max (which follows the batch) and costs O(k) instead of O(V).
    """
    logits = logits.float()
    greedy = logits.argmax(-1)
    vals, idx = torch.topk(logits, k_max, dim=-1)  # [B, k_max], descending
    t = torch.where(temperature > 0, temperature, torch.ones_like(temperature))
    scores = vals / t[:, None] - torch.log(-torch.log(uniform_noise(seed, step, idx)))  # + Gumbel
    outside = torch.arange(k_max, device=logits.device)[None, :] >= top_k[:, None]
    pick = scores.masked_fill(outside, float("-inf")).argmax(-1, keepdim=True)
    return torch.where(temperature > 0, idx.gather(-1, pick)[:, 0], greedy)
