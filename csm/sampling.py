"""Sampling: temperature then top-k, per row, with counter-based noise so a seeded request is reproducible
whatever else shares its batch (no global RNG state, no host sync).

The noise for (seed, step, rank) comes from an integer hash, so row b's draw depends only on its own seed,
step and logits. Gumbel-max over the top-k `logits / T + g` samples the same distribution as the
reference's `argmax(softmax(top_k(logits) / T) / Exp(1))`; it is computed as `logits + T * g`, which has
the same argmax for T > 0, so that everything but the logits is prepared once per frame.

Candidates are at most the `MAX_TOP_K` best logits: a frame draws 32 times from 2051 codes, and sorting
and hashing all of them when no request may ask for more than a few hundred is wasted work.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

_M32 = 0xFFFFFFFF

MAX_TOP_K = 256  # the largest top_k a request may ask for; SamplingParams validates against it


def _mix32(x: Tensor) -> Tensor:
    # "lowbias32" integer hash (Wellons' hash prospector). Constants < 2^31 keep int64 products exact.
    x = x & _M32
    x = x ^ (x >> 16)
    x = (x * 0x21F0AAAD) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x735A2D97) & _M32
    return x ^ (x >> 15)


def uniform_noise(seed: Tensor, step: Tensor, k: int) -> Tensor:
    """Uniform (0, 1) noise per (seed, step, rank). seed: [B] int64; step: [B, N] int64 -> [B, N, k]."""
    key = _mix32(_mix32(seed) ^ ((seed >> 32) & _M32))[:, None]  # [B, 1]
    key = _mix32(key ^ _mix32(step + 0x9E3779B9))  # [B, N]
    rank = torch.arange(k, device=seed.device, dtype=torch.int64)
    bits = _mix32(key[..., None] ^ _mix32(rank * 0x61C88647 + 1))
    # 24 high bits: exactly representable in float32, never 0 or 1.
    return ((bits >> 8).float() + 0.5) * (1.0 / (1 << 24))


Mode = Literal["sample", "greedy", "mixed"]


@dataclass(frozen=True)
class SamplingInputs:
    """What every draw of one frame needs, computed once per frame instead of once per codebook."""

    sampled: Tensor  # [B] bool: rows with temperature > 0 (the others are greedy)
    noise: Tensor | None  # [B, N, k_max]: T * Gumbel noise for step n, rank r; -inf past each row's top_k
    k_max: int
    mode: Mode  # rows all sampled, all greedy, or mixed (the host knows; a CUDA graph says "mixed")


def sampling_inputs(
    temperature: Tensor, top_k: Tensor, seed: Tensor, first_step: Tensor, n_steps: int, k_max: int, mode: Mode
) -> SamplingInputs:
    """temperature: [B] (0 = greedy); top_k: [B] in [1, k_max]; seed, first_step: [B] int64.

    `k_max` is capped at MAX_TOP_K. The noise is keyed by rank, so a row whose top_k fits draws the same
    whatever k_max the batch uses."""
    k_max = min(k_max, MAX_TOP_K)
    noise = None
    if mode != "greedy":
        steps = first_step[:, None] + torch.arange(n_steps, device=seed.device)
        gumbel = -torch.log(-torch.log(uniform_noise(seed, steps, k_max)))  # [B, N, k_max]
        outside = torch.arange(k_max, device=seed.device) >= top_k[:, None]  # [B, k_max]
        noise = (gumbel * temperature[:, None, None]).masked_fill(outside[:, None], float("-inf"))
    return SamplingInputs(sampled=temperature > 0, noise=noise, k_max=k_max, mode=mode)


def sample(logits: Tensor, inputs: SamplingInputs, n: int) -> Tensor:
    """Draw step n of the frame: one token per row. logits: [B, V] -> [B] long.

    Gumbel-max over the top-k candidates samples softmax(logits / T) restricted to the top k. The noise is
    keyed by rank, so a row's draw depends only on its own seed, step and logits, never on the batch.
    Logits stay in the model's dtype: adding the fp32 noise upcasts them exactly, and the order is the same.
    """
    if inputs.mode == "greedy":
        return logits.argmax(-1)
    vals, idx = torch.topk(logits, inputs.k_max, dim=-1)  # [B, k_max], descending
    drawn = idx.gather(-1, (vals + inputs.noise[:, n]).argmax(-1, keepdim=True))[:, 0]
    if inputs.mode == "sample":
        return drawn
    return torch.where(inputs.sampled, drawn, logits.argmax(-1))
