"""The CSM model: a Llama backbone over 33-wide rows and a small Llama depth decoder over codebooks.

Modules and math only. KV caches are plain tensors owned by the caller (the engine), so the model holds
no per-sequence state; every forward says which cache rows it reads and which positions it writes.

Conventions: RoPE uses the rotate-half layout (transformers'); original Sesame checkpoints store q/k in
the interleaved layout and are permuted on load (`csm.loading`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from csm.presets import ModelArgs, TransformerArgs


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # Normalise in fp32 and scale in the input dtype, as the reference and transformers do.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_inv_freq(args: TransformerArgs) -> Tensor:
    d = args.head_dim
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    s = args.rope_scaling
    if s is None:
        return inv_freq
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


def rope_table(args: TransformerArgs, n_positions: int) -> Tensor:
    """cos and sin for every position, fp32: [n_positions, 2, head_dim]."""
    freqs = torch.arange(n_positions, dtype=torch.float32)[:, None] * rope_inv_freq(args)[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    return torch.stack([emb.cos(), emb.sin()], dim=1)


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    # x: [B, H, T, D]; cos, sin: [B, 1, T, D]
    return x * cos + _rotate_half(x) * sin


@dataclass
class CacheView:
    """Where one forward reads and writes a layer's KV cache ([S, Hkv, T_max, D] tensors).

    `rows` picks the cache rows (slots) of the batch: a slice (a view, no copy) or an index tensor.
    Query token (b, t) is written at `write_pos[b, t]`; a caller points tokens that must leave no trace
    (inactive slots, padding) at a scratch column that no mask ever exposes. Keys `[0, kv_len)` are read,
    filtered by `mask` ([B, 1, T, kv_len] bool, or None for full causal over a fresh span).
    """

    rows: slice | Tensor
    write_pos: Tensor  # [B, T] long
    kv_len: int
    mask: Tensor | None


class Attention(nn.Module):
    def __init__(self, args: TransformerArgs) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.q_proj = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.k_proj = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.v_proj = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.o_proj = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)

    def forward(
        self, x: Tensor, rope: tuple[Tensor, Tensor], k_cache: Tensor, v_cache: Tensor, view: CacheView
    ):
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = rope
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)

        rows = view.rows
        if isinstance(rows, slice):
            idx_rows = torch.arange(rows.start, rows.stop, device=x.device)[:, None]
        else:
            idx_rows = rows[:, None]
        # Advanced indices around a slice put the indexed dims first: [B, T, Hkv, D].
        k_cache[idx_rows, :, view.write_pos] = k.transpose(1, 2)
        v_cache[idx_rows, :, view.write_pos] = v.transpose(1, 2)
        keys = k_cache[rows, :, : view.kv_len]
        values = v_cache[rows, :, : view.kv_len]
        out = F.scaled_dot_product_attention(
            q, keys, values, attn_mask=view.mask, is_causal=view.mask is None and t > 1, enable_gqa=True
        )
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    def __init__(self, args: TransformerArgs) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(args.dim, args.intermediate_size, bias=False)
        self.up_proj = nn.Linear(args.dim, args.intermediate_size, bias=False)
        self.down_proj = nn.Linear(args.intermediate_size, args.dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, args: TransformerArgs) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(args.dim, args.norm_eps)
        self.attn = Attention(args)
        self.mlp_norm = RMSNorm(args.dim, args.norm_eps)
        self.mlp = MLP(args)

    def forward(self, x, rope, k_cache, v_cache, view: CacheView) -> Tensor:
        x = x + self.attn(self.attn_norm(x), rope, k_cache, v_cache, view)
        return x + self.mlp(self.mlp_norm(x))


class Transformer(nn.Module):
    """A Llama decoder stack without token embeddings or output head (CSM supplies both)."""

    def __init__(self, args: TransformerArgs) -> None:
        super().__init__()
        self.args = args
        self.layers = nn.ModuleList(Block(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.register_buffer("rope", torch.empty(0), persistent=False)
        self.init_buffers()

    def init_buffers(self, device: torch.device | str | None = None) -> None:
        # +1 position: the scratch column that absorbs writes that must leave no trace.
        self.rope = rope_table(self.args, self.args.max_seq_len + 1).to(device)

    def forward(
        self, x: Tensor, positions: Tensor, k_cache: Tensor, v_cache: Tensor, view: CacheView
    ) -> Tensor:
        # x: [B, T, dim]; positions: [B, T] (rope positions); caches: [L, S, Hkv, T_max, D]
        cs = self.rope[positions].to(x.dtype)  # [B, T, 2, D]
        rope = (cs[:, None, :, 0], cs[:, None, :, 1])
        for i, layer in enumerate(self.layers):
            x = layer(x, rope, k_cache[i], v_cache[i], view)
        return self.norm(x)

    def new_cache(self, n_rows: int, n_positions: int, device, dtype) -> tuple[Tensor, Tensor]:
        a = self.args
        shape = (a.n_layers, n_rows, a.n_kv_heads, n_positions, a.head_dim)
        return torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype)


class CSM(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        bdim, ddim, v = args.backbone.dim, args.decoder.dim, args.audio_vocab_size
        self.backbone = Transformer(args.backbone)
        self.decoder = Transformer(args.decoder)
        self.text_embeddings = nn.Embedding(args.text_vocab_size, bdim)
        # Codebook k, code c lives at row c + k * audio_vocab_size of one shared table.
        self.audio_embeddings = nn.Embedding(v * args.num_codebooks, bdim)
        self.projection = nn.Linear(bdim, ddim, bias=False)
        self.codebook0_head = nn.Linear(bdim, v, bias=False)
        self.audio_head = nn.Parameter(torch.empty(args.num_codebooks - 1, ddim, v))
        self.register_buffer("codebook_offsets", torch.empty(0, dtype=torch.long), persistent=False)
        self.init_buffers()

    def init_buffers(self, device: torch.device | str | None = None) -> None:
        """(Re)compute the non-persistent buffers, e.g. after building on `meta` and loading weights."""
        self.codebook_offsets = (
            torch.arange(self.args.num_codebooks, device=device) * self.args.audio_vocab_size
        )
        self.backbone.init_buffers(device)
        self.decoder.init_buffers(device)

    def embed_rows(self, tokens: Tensor, mask: Tensor) -> Tensor:
        """Prompt rows -> backbone inputs. tokens, mask: [..., 33] (32 audio columns + text)."""
        text = self.text_embeddings(tokens[..., -1]) * mask[..., -1:]
        audio = self.audio_embeddings(tokens[..., :-1] + self.codebook_offsets)
        audio = (audio * mask[..., :-1, None]).sum(-2)
        return text + audio

    def embed_frame(self, codes: Tensor) -> Tensor:
        # codes: [B, 32] -> [B, dim]: an audio row is the sum of its codebook embeddings
        return self.audio_embeddings(codes + self.codebook_offsets).sum(-2)

    def embed_audio(self, codebook: int, codes: Tensor) -> Tensor:
        return self.audio_embeddings(codes + codebook * self.args.audio_vocab_size)

    def codebook_logits(self, codebook: int, h: Tensor) -> Tensor:
        # h: [B, decoder dim] -> [B, V]
        return h @ self.audio_head[codebook - 1]

    def init_random(self, seed: int = 0, std: float = 0.02) -> CSM:
        """Random weights in place (for the `tiny` preset and benchmarks); deterministic given `seed`."""
        device = next(self.parameters()).device
        g = torch.Generator(device=device).manual_seed(seed)
        with torch.no_grad():
            for name, p in sorted(self.named_parameters()):
                if name.endswith("norm.weight"):
                    p.fill_(1.0)
                else:
                    p.normal_(0.0, std, generator=g)
        return self
