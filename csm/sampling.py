"""Sampling: temperature then top-k, per row, with counter-based noise so a seeded request is reproducible
whatever else shares its batch (no global RNG state, no host sync).

The noise for (seed, step, rank) comes from an integer hash, so row b's draw depends only on its own seed,
step and logits. Gumbel-max over the top-k `logits / T + g` samples the same distribution as the
reference's `argmax(softmax(top_k(logits) / T) / Exp(1))`; it is computed as `logits + T * g`, which has
the same argmax for T > 0, so that everything but the logits is prepared once per frame. The parts of the
hash that depend on the seed alone (`seed_key`) or on the rank alone (`NoiseTables`) are hashed once, not
every frame.

Candidates are at most the `MAX_TOP_K` best logits: a frame draws 32 times from 2051 codes, and sorting
and hashing all of them when no request may ask for more than a few hundred is wasted work.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, TypeVar

import torch
from torch import Tensor

_M32 = 0xFFFFFFFF

TEMPERATURE = 0.9  # the reference's defaults, for every caller that does not choose
TOP_K = 50
MAX_TOP_K = 256  # the largest top_k a request may ask for; SamplingParams validates against it

_Int = TypeVar("_Int", int, Tensor)


def _mix32(x: _Int) -> _Int:
    # "lowbias32" integer hash (Wellons' hash prospector). Constants < 2^31 keep int64 products exact.
    # Python ints and int64 tensors alike: a request's seed is hashed on the host (`seed_key`).
    x = x & _M32
    x = x ^ (x >> 16)
    x = (x * 0x21F0AAAD) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x735A2D97) & _M32
    return x ^ (x >> 15)


def seed_key(seed: _Int) -> _Int:
    """A seed's part of the noise hash (an int, or an int64 tensor of seeds): what the engine keeps per
    slot, hashed once when the request starts."""
    return _mix32(_mix32(seed) ^ ((seed >> 32) & _M32))


def _rank_hash(rank: Tensor) -> Tensor:
    return _mix32(rank * 0x61C88647 + 1)


@dataclass(frozen=True)
class NoiseTables:
    """What every frame's noise shares, made once (an engine's setup) instead of every frame: the counts
    0..MAX_TOP_K-1 (ranks, and step offsets within a frame) and each rank's part of the hash."""

    counts: Tensor  # [MAX_TOP_K] int64
    rank_hash: Tensor  # [MAX_TOP_K] int64

    @classmethod
    def make(cls, device: torch.device | str | None = None) -> NoiseTables:
        counts = torch.arange(MAX_TOP_K, device=device, dtype=torch.int64)
        return cls(counts, _rank_hash(counts))

    @staticmethod
    def count(n: int, device: torch.device, tables: NoiseTables | None) -> Tensor:
        """0..n-1: a view of the tables' counts where they reach that far."""
        if tables is not None and n <= tables.counts.shape[0]:
            return tables.counts[:n]
        return torch.arange(n, device=device, dtype=torch.int64)


def keyed_noise(key: Tensor, step: Tensor, k: int, tables: NoiseTables | None = None) -> Tensor:
    """Uniform (0, 1) noise per (seed, step, rank). key: [B] from `seed_key`; step: [B, N] int64 ->
    [B, N, k]."""
    key = _mix32(key[:, None] ^ _mix32(step + 0x9E3779B9))  # [B, N]
    if tables is not None and k <= tables.rank_hash.shape[0]:
        rank_hash = tables.rank_hash[:k]
    else:
        rank_hash = _rank_hash(NoiseTables.count(k, key.device, None))
    bits = _mix32(key[..., None] ^ rank_hash)
    # 24 high bits: exactly representable in float32, never 0 or 1.
    return ((bits >> 8).float() + 0.5) * (1.0 / (1 << 24))


def uniform_noise(seed: Tensor, step: Tensor, k: int) -> Tensor:
    """Uniform (0, 1) noise per (seed, step, rank). seed: [B] int64; step: [B, N] int64 -> [B, N, k]."""
    return keyed_noise(seed_key(seed), step, k)


Mode = Literal["sample", "greedy", "mixed"]


@dataclass(frozen=True)
class SamplingInputs:
    """What every draw of one frame needs, computed once per frame instead of once per codebook."""

    sampled: Tensor | None  # [B] bool: rows with temperature > 0, the others greedy ("mixed" mode only)
    noise: Tensor | None  # [B, N, k_max]: T * Gumbel noise for step n, rank r; -inf past each row's top_k
    k_max: int
    mode: Mode  # rows all sampled, all greedy, or mixed (the host knows; a CUDA graph says "mixed")


def sampling_inputs(
    temperature: Tensor,
    top_k: Tensor,
    key: Tensor,
    first_step: Tensor,
    n_steps: int,
    k_max: int,
    mode: Mode,
    tables: NoiseTables | None = None,
) -> SamplingInputs:
    """temperature: [B] (0 = greedy); top_k: [B] in [1, k_max]; key: [B] from `seed_key`; first_step: [B]
    int64; `tables` (optional) saves hashing the ranks again.

    `k_max` is capped at MAX_TOP_K. The noise is keyed by rank, so a row whose top_k fits draws the same
    whatever k_max the batch uses."""
    k_max = min(k_max, MAX_TOP_K)
    noise = None
    if mode != "greedy":
        steps = first_step[:, None] + NoiseTables.count(n_steps, key.device, tables)  # [B, N]
        gumbel = -torch.log(-torch.log(keyed_noise(key, steps, k_max, tables)))  # [B, N, k_max]
        outside = NoiseTables.count(k_max, key.device, tables) >= top_k[:, None]  # [B, k_max]
        noise = (gumbel * temperature[:, None, None]).masked_fill(outside[:, None], float("-inf"))
    sampled = temperature > 0 if mode == "mixed" else None
    return SamplingInputs(sampled=sampled, noise=noise, k_max=k_max, mode=mode)


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
