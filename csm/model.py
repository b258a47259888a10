"""The CSM model: a Llama backbone over 33-wide rows and a small Llama depth decoder over codebooks.

Modules and math only. KV caches are plain tensors owned by the caller (the engine), so the model holds
no per-sequence state; every forward says which cache rows it reads and which positions it writes.

Conventions: RoPE uses the rotate-half layout (transformers'); original Sesame checkpoints store q/k in
the interleaved layout and are permuted on load (`csm.loading`). RoPE is one matmul per layer with a
rotation matrix that also carries the attention scale: queries and keys both leave it multiplied by
head_dim**-0.25, so q·k comes out already scaled (no scale op, and no unscaled product to overflow fp16);
the KV caches hold keys scaled that way.

The fused q|k|v projection groups its heads by key/value head: for each kv head, the G = heads / kv heads
query heads that read it, then its key head, then its value head (`fuse_projections`). So a batch of
rows' queries, keys and values is a view with (row, kv head) as one batch dimension, and attention for one
query token per row (every frame step) is one SDPA call over that batch with each kv head's G query heads
as its G queries: no GQA support needed (a T4's memory-efficient kernel has none), no key repeated per
query head, no copy in or out (`decode_attention`).

The depth decoder's frame step (every row at the same positions) has a cache of its own that also keeps
each position's queries, so that one matmul rotates q|k, passes v through and writes all three there
(`Attention.write_span`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from csm.presets import ModelArgs, TransformerArgs


def _onednn_ready(weight: Tensor) -> bool:
    if weight.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    if weight.dtype == torch.bfloat16:
        return torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return weight.dtype == torch.float32  # oneDNN's fp16 path needs CPU features few servers have


def _stamp(t: Tensor) -> tuple[int, int, int | None]:
    """A tensor's storage, offset and in-place version as they are now (no version for an inference tensor:
    it cannot be edited in place outside inference mode). The storage's handle, not its data pointer: fake
    and meta tensors have one too."""
    return t.untyped_storage()._cdata, t.storage_offset(), None if t.is_inference() else t._version


# Weights (per matrix) from which a prepacked oneDNN matmul pays: a packed call costs ~15-20 us of oneDNN's
# own overhead where a dense one costs ~3 us, and saves the weight's re-layout, which grows with its size.
# Measured on a 2-core EPYC, one thread, us dense / packed at 1 and 8 rows: 64 x 256, 3/14 and 6/17;
# 256 x 512, 14/31 and 36/34; 512 x 512, 23/32 and 73/57; 512 x 2048, 89/71 and 308/171. The `tiny`
# preset's matrices are all under it: with them packed its frame step took 1.7x as long.
PACK_MIN_WEIGHTS = 1 << 18


class PackedWeights:
    """CPU copies of weights in oneDNN's prepacked (blocked) layout, bound to the parameter they came from.

    The dense CPU matmul works from the weight as stored and re-lays it out call after call; a weight
    packed once skips that. On the `small` preset on a 2-core EPYC the frame step at 4-16 streams runs
    ~30% faster (about even at one), and a prefill chunk ~25% faster, in fp32 and bf16 alike; matrices
    under `PACK_MIN_WEIGHTS` stay dense. The copy costs the weight's memory again. It is used only while
    the parameter is the same tensor, unmodified (same storage, same in-place version): a weight replaced
    or edited after packing is read densely, never computed with from a stale copy.
    """

    def __init__(self, source: Tensor, weights: list[Tensor]) -> None:
        self.source = source
        self.stamp = _stamp(source)
        self.weights = weights

    @classmethod
    def of(
        cls,
        source: Tensor,
        weights: list[Tensor],
        current: PackedWeights | None = None,
        min_weights: int = PACK_MIN_WEIGHTS,
    ) -> PackedWeights | None:
        """Pack `weights` (each [out, in], derived from `source`); None where oneDNN cannot run them, or
        where a matrix has fewer than `min_weights` entries. `current` is kept when it was packed from
        `source` as it is now (packing again is a no-op)."""
        if current is not None and current.matches(source):
            return current
        try:
            if not _onednn_ready(source) or min(w.numel() for w in weights) < min_weights:
                return None
            packed = [torch.ops.mkldnn._reorder_linear_weight(w.detach().contiguous()) for w in weights]
        except (AttributeError, RuntimeError):  # a torch build or CPU without these ops: dense is correct
            return None
        return cls(source, packed)

    def matches(self, source: Tensor) -> bool:
        return source is self.source and _stamp(source) == self.stamp

    def linear(self, x: Tensor, i: int = 0, residual: Tensor | None = None) -> Tensor:
        if residual is not None:  # oneDNN adds it in the matmul's epilogue
            return torch.ops.mkldnn._linear_pointwise.binary(x, residual, self.weights[i], None, "add")
        return torch.ops.mkldnn._linear_pointwise(x, self.weights[i], None, "none", [], "")


class Derived:
    """A tensor computed from parameters, used only while each is the same tensor, unmodified (PackedWeights'
    rule): a weight edited or replaced afterwards is never shadowed by a stale result."""

    def __init__(self, value: Tensor, sources: tuple[Tensor, ...]) -> None:
        self.value = value
        self.sources = sources
        self.stamps = [_stamp(t) for t in sources]

    def matches(self, *sources: Tensor) -> bool:
        return len(sources) == len(self.sources) and all(
            s is t and _stamp(s) == stamp
            for s, t, stamp in zip(sources, self.sources, self.stamps, strict=True)
        )


class Linear(nn.Linear):
    """nn.Linear that runs from a prepacked weight on CPU once `pack_cpu` is called (see PackedWeights),
    and can add a residual inside its matmul (one op where linear-then-add is two)."""

    packed: PackedWeights | None = None

    def pack_cpu(self, min_weights: int = PACK_MIN_WEIGHTS) -> None:
        self.packed = PackedWeights.of(self.weight, [self.weight], self.packed, min_weights)

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        """`residual + x @ weight.T (+ bias)`; x: [..., in], residual: [..., out] or None."""
        # Only a CPU weight is ever packed, and a weight moved since no longer matches.
        if self.packed is not None and self.packed.matches(self.weight):
            return self.packed.linear(x, residual=residual)
        if residual is None:
            return super().forward(x)
        if self.bias is not None:
            return residual + super().forward(x)
        flat = torch.addmm(
            residual.reshape(-1, self.out_features), x.reshape(-1, self.in_features), self.weight.T
        )
        return flat.view(residual.shape)


class RMSNorm(nn.Module):
    """F.rms_norm: it squares and averages in fp32 whatever the input dtype (a 16-bit input is upcast
    inside the op), so fp16 activations whose squares exceed fp16's range normalise correctly."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


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
    """cos and signed sin (see `rope_rotation`) for every position, fp32: [n_positions, 2, head_dim]."""
    freqs = torch.arange(n_positions, dtype=torch.float32)[:, None] * rope_inv_freq(args)[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    sin = emb.sin()
    sin[:, : sin.shape[1] // 2] *= -1  # signed: rotate_half(x) * sin == roll(x, D/2) * sin_signed
    return torch.stack([emb.cos(), sin], dim=1)


def rope_rotation(cos_sin: Tensor) -> Tensor:
    """[..., 2, D] (cos, signed sin) -> [..., D, D] R with `x @ R == rotate_half_rope(x)`.

    Rotate-half RoPE is out = x * cos + roll(x, D/2) * sin_signed: each output j mixes x_j and
    x_{j -+ D/2}, so R has cos on the diagonal and the signed sine D/2 rows off it. One matmul with R
    replaces a roll and three elementwise ops in every layer; R is built once per forward.
    """
    cos, sin = cos_sin.unbind(-2)  # [..., D] each
    return torch.diag_embed(cos) + torch.diag_embed(sin).roll(cos.shape[-1] // 2, dims=-2)


def apply_rope(x: Tensor, rotation: Tensor) -> Tensor:
    """x: [B, T, N, D] (N heads); rotation: [B or 1, T, D, D] from `Transformer.rope_at` -> [B, T, N, D].

    A bmm over (row, token) pairs: both reshapes are views (x is a slice of the qkv projection, rows of
    one token contiguous; a rotation shared by every row is a stride-0 expand), where `x @ rotation` would
    copy the broadcast rotations first.
    """
    b, t, n, d = x.shape
    rot = rotation.expand(b, t, d, d).reshape(b * t, d, d)
    return torch.bmm(x.reshape(b * t, n, d), rot).view(b, t, n, d)


@dataclass
class CacheView:
    """Where one forward reads and writes a layer's KV cache ([S, Hkv, T_max, D] tensors).

    `rows` picks the cache rows (slots) of the batch: a slice (a view, no copy) or an index tensor.
    `write` says where the new keys go: an int is the start of a span shared by every row (the depth
    decoder), a [B, T] tensor gives each token its own position; a caller points tokens that must leave
    no trace (inactive slots, padding) at a scratch column no mask exposes. Keys `[0, kv_len)` are read,
    filtered by `mask` ([B, 1, T, kv_len] bool, or None for plain causal over a span starting at 0).
    """

    rows: slice | Tensor
    write: int | Tensor
    kv_len: int
    mask: Tensor | None
    row_index: Tensor | None = field(init=False, default=None)  # [B, 1]: computed once, used by every layer
    _decode_mask: tuple[tuple, Tensor] | None = field(init=False, default=None, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.write, Tensor):
            rows = self.rows
            if isinstance(rows, slice):
                rows = torch.arange(rows.start, rows.stop, device=self.write.device)
            self.row_index = rows[:, None]
        elif not isinstance(self.rows, slice):
            raise ValueError("a span write needs contiguous rows")

    def update(self, cache: Tensor, new: Tensor) -> Tensor:
        """Write `new` ([B, T, Hkv, D]) into `cache` ([S, Hkv, T_max, D]); return the keys to attend."""
        if isinstance(self.write, int):
            rows = cache[self.rows]  # a view: rows are a slice here
            rows[:, :, self.write : self.write + new.shape[1]] = new.transpose(1, 2)
            return rows[:, :, : self.kv_len]
        # Advanced indices around a slice put the indexed dims first: [B, T, Hkv, D].
        cache[self.row_index, :, self.write] = new
        return cache[self.rows, :, : self.kv_len]

    def decode_mask(self, n_kv_heads: int, dtype: torch.dtype) -> Tensor | None:
        """`mask` as `decode_attention` takes it for one query token per row: additive (0 or -inf), in
        `dtype`, one row per (row, kv head): [B * Hkv, 1, 1, kv_len]. Made for the first layer that asks and
        read by the others (SDPA would convert a bool mask in every layer); its rows are padded to a multiple
        of 8 entries, the alignment SDPA's memory-efficient kernel needs (it copies an unaligned mask)."""
        if self.mask is None:
            return None
        key = (n_kv_heads, dtype)
        if self._decode_mask is None or self._decode_mask[0] != key:
            b, n = self.mask.shape[0], self.mask.shape[-1]
            width = -(-n // 8) * 8
            bias = torch.full((b, n_kv_heads, 1, width), float("-inf"), dtype=dtype, device=self.mask.device)
            bias[..., :n].masked_fill_(self.mask, 0.0)  # the mask ([B, 1, 1, n]) broadcasts over kv heads
            self._decode_mask = key, bias.flatten(0, 1)[:, None, :, :n]
        return self._decode_mask[1]


def decode_attention(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float | None = None
) -> Tensor:
    """Attention for one query token per row: q [B, Hkv, G, 1, D] (each kv head's G query heads), k and v
    [B, Hkv, L, D], mask from `CacheView.decode_mask` or None -> [B * Hkv, 1, G, D], in memory the query
    heads in order ([B, H * D]). `scale` defaults to D**-0.5.

    One SDPA call with (row, kv head) as its batch, one head, and the G query heads as its queries: each
    key head is read once for its group, no kernel is asked for GQA support, and the inputs are views
    (the grouped head layout, see the module docstring). The fused kernels write [batch, queries, heads,
    D], with one head the output projection's input as it is. In fp16 the scores cannot overflow unless
    the scaled ones would: the fused kernels accumulate in fp32, and the math path scales before the product.
    """
    b, hkv, g, _, d = q.shape
    n = b * hkv
    return F.scaled_dot_product_attention(
        q.reshape(n, 1, g, d), k.reshape(n, 1, -1, d), v.reshape(n, 1, -1, d), attn_mask=mask, scale=scale
    )


def grouped_decode_attention(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float | None = None
) -> Tensor:
    """`decode_attention` for heads in order: q [B, H, 1, D], k and v [B, Hkv, L, D], mask [B, 1, 1, L]
    bool or None -> [B, H, 1, D]."""
    b, h, _, d = q.shape
    hkv = k.shape[1]
    if mask is not None:
        mask = mask.expand(b, hkv, 1, -1).reshape(b * hkv, 1, 1, -1)
    return decode_attention(q.reshape(b, hkv, h // hkv, 1, d), k, v, mask, scale).reshape(b, h, 1, d)


def _attention(q: Tensor, k: Tensor, v: Tensor, view: CacheView, scale: float) -> Tensor:
    """q [B, Hkv, G, T, D] (grouped), k and v [B, Hkv, L, D] -> [B, T, H * D], query heads in order."""
    if q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16):
        # In 16-bit the CPU kernel rounds the attention weights to 16 bits before they meet the values; in
        # fp32 only the output is rounded, at about the same speed (measured at decode shapes).
        return _attention(q.float(), k.float(), v.float(), view, scale).to(q.dtype)
    b, hkv, g, t, d = q.shape
    if t == 1:
        return decode_attention(q, k, v, view.decode_mask(hkv, q.dtype), scale).reshape(b, 1, -1)
    out = F.scaled_dot_product_attention(
        q.reshape(b, hkv * g, t, d),  # a copy: grouped, the query heads of two kv heads are not adjacent
        k,
        v,
        attn_mask=view.mask,
        is_causal=view.mask is None,
        scale=scale,
        enable_gqa=True,
    )
    return out.transpose(1, 2).reshape(b, t, -1)


def _bmm_into(a: Tensor, b: Tensor, out: Tensor) -> None:
    """`out = a @ b` ([N, M, K] @ [N, K, P]) into `out`, a strided view (cache positions). Elsewhere than on
    CPU one matmul that writes there (cuBLAS takes a strided output as it is); on CPU into a fresh tensor
    and a copy, 2-4x faster than its bmm into a strided output (measured at the depth decoder's shapes)."""
    if out.device.type == "cpu":
        out.copy_(torch.bmm(a, b))
    else:
        torch.bmm(a, b, out=out)


class Attention(nn.Module):
    def __init__(self, args: TransformerArgs) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.group = args.n_heads // args.n_kv_heads  # G: query heads per kv head
        # q, k and v in one matmul, heads grouped by kv head (checkpoints store them apart and in order;
        # see `fuse_projections`).
        self.qkv_proj = Linear(args.dim, (args.n_heads + 2 * args.n_kv_heads) * args.head_dim, bias=False)
        self.o_proj = Linear(args.n_heads * args.head_dim, args.dim, bias=False)

    def write_cache(
        self, x: Tensor, rope: Tensor, k_cache: Tensor, v_cache: Tensor, view: CacheView
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Project x and write its keys and values; return (rotated queries [B, Hkv, G, T, D], keys to
        attend, values)."""
        b, t, _ = x.shape
        hkv, g, d = self.n_kv_heads, self.group, self.head_dim
        qkv = self.qkv_proj(x).view(b, t, hkv * (g + 2), d)
        # One matmul rotates (and scales) every head, values too: grouped, q and k are not one span of
        # heads, and a view over all of them costs less than a copy of some. The rotated values go unused.
        rotated = apply_rope(qkv, rope).view(b, t, hkv, g + 2, d)
        v = qkv.view(b, t, hkv, g + 2, d)[:, :, :, g + 1]
        q = rotated[:, :, :, :g].permute(0, 2, 3, 1, 4)
        return q, view.update(k_cache, rotated[:, :, :, g]), view.update(v_cache, v)

    def write_span(
        self, x: Tensor, rope: Tensor, cache: Tensor, view: CacheView
    ) -> tuple[Tensor, Tensor, Tensor]:
        """`write_cache` for rows that all sit at the same positions (`view.write` an int: the depth
        decoder's frame step), with one cache for queries, keys and values ([S, N, T_max, D], from
        `Transformer.new_span_cache`) and `rope` from `Transformer.span_rope` ([T, N, D, D]). One batched
        matmul per token rotates its query and key heads, passes its value heads through (an identity)
        and writes them all into the cache: keys and values cost no copy of their own."""
        b, t, _ = x.shape
        hkv, g, d = self.n_kv_heads, self.group, self.head_dim
        heads = self.qkv_proj(x).view(b, t, hkv * (g + 2), d)
        rows = cache[view.rows]  # [B, N, T_max, D], a view: rows are a slice here
        for j in range(t):
            _bmm_into(heads[:, j].transpose(0, 1), rope[j], rows[:, :, view.write + j].transpose(0, 1))
        grouped = rows.unflatten(1, (hkv, g + 2))  # [B, Hkv, G + 2, T_max, D]
        q = grouped[:, :, :g, view.write : view.write + t]
        return q, grouped[:, :, g, : view.kv_len], grouped[:, :, g + 1, : view.kv_len]

    def forward(
        self,
        x: Tensor,
        rope: Tensor,
        k_cache: Tensor,
        v_cache: Tensor,
        view: CacheView,
        residual: Tensor | None = None,
    ) -> Tensor:
        """`residual + attention(x)` (the residual is added inside the output projection's matmul)."""
        q, keys, values = self.write_cache(x, rope, k_cache, v_cache, view)
        # q and k each carry head_dim**-0.25 (see `Transformer.rope_at`): the product is already scaled.
        return self.o_proj(_attention(q, keys, values, view, scale=1.0), residual)

    def forward_span(
        self, x: Tensor, rope: Tensor, cache: Tensor, view: CacheView, residual: Tensor | None = None
    ) -> Tensor:
        """`forward` through `write_span`."""
        q, keys, values = self.write_span(x, rope, cache, view)
        return self.o_proj(_attention(q, keys, values, view, scale=1.0), residual)


class MLP(nn.Module):
    def __init__(self, args: TransformerArgs) -> None:
        super().__init__()
        self.gate_up_proj = Linear(args.dim, 2 * args.intermediate_size, bias=False)
        self.down_proj = Linear(args.intermediate_size, args.dim, bias=False)

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up, residual)


class Block(nn.Module):
    def __init__(self, args: TransformerArgs) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(args.dim, args.norm_eps)
        self.attn = Attention(args)
        self.mlp_norm = RMSNorm(args.dim, args.norm_eps)
        self.mlp = MLP(args)

    def forward(self, x, rope, k_cache, v_cache, view: CacheView) -> Tensor:
        x = self.attn(self.attn_norm(x), rope, k_cache, v_cache, view, residual=x)
        return self.mlp(self.mlp_norm(x), residual=x)

    def forward_span(self, x: Tensor, rope: Tensor, cache: Tensor, view: CacheView) -> Tensor:
        x = self.attn.forward_span(self.attn_norm(x), rope, cache, view, residual=x)
        return self.mlp(self.mlp_norm(x), residual=x)


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
        # +1 position: the scratch column that absorbs writes that must leave no trace. Scaled by
        # head_dim**-0.25 for queries and keys alike (see the module docstring).
        table = rope_table(self.args, self.args.max_seq_len + 1) * self.args.head_dim**-0.25
        self.rope = table.to(device)

    def rope_at(self, positions: Tensor, dtype: torch.dtype) -> Tensor:
        """The RoPE rotations for `positions` ([B, T]), [B, T, D, D] in `dtype`, for `forward`: built in
        fp32 and cast once, scaled by head_dim**-0.25 (see the module docstring)."""
        return rope_rotation(self.rope[positions]).to(dtype)

    def span_rope(self, start: int, n: int, dtype: torch.dtype) -> Tensor:
        """RoPE for `forward_span` over positions [start, start + n): [n, N, D, D], one matrix per head of
        the grouped q|k|v (N = heads + 2 kv heads): the position's rotation (as `rope_at`'s) for query
        and key heads, the identity for value heads. Built once: the depth decoder's positions are the
        same every frame (at csm-1b its 32 positions take 12.6 MB in bf16)."""
        a = self.args
        g, d = a.n_heads // a.n_kv_heads, a.head_dim
        rotation = rope_rotation(self.rope[start : start + n])  # [n, D, D], fp32
        identity = torch.eye(d, device=rotation.device).expand(n, 1, d, d)
        group = torch.cat([rotation[:, None].expand(n, g + 1, d, d), identity], dim=1)  # q heads, k, v
        return group.repeat(1, a.n_kv_heads, 1, 1).to(dtype)

    def forward(self, x: Tensor, rope: Tensor, k_cache: Tensor, v_cache: Tensor, view: CacheView) -> Tensor:
        # x: [B, T, dim]; rope: from `rope_at`; caches: [L, S, Hkv, T_max, D]
        for i, layer in enumerate(self.layers):
            x = layer(x, rope, k_cache[i], v_cache[i], view)
        return self.norm(x)

    def forward_span(self, x: Tensor, rope: Tensor, cache: Tensor, view: CacheView) -> Tensor:
        """`forward` for rows that all sit at the same positions (the depth decoder's frame step: `view`
        writes a span), through a cache from `new_span_cache` and a rope from `span_rope`; see
        `Attention.write_span`."""
        for i, layer in enumerate(self.layers):
            x = layer.forward_span(x, rope, cache[i], view)
        return self.norm(x)

    def fill_cache(self, x: Tensor, rope: Tensor, k_cache: Tensor, v_cache: Tensor, view: CacheView) -> None:
        """`forward` for rows whose outputs nobody reads (a prefill): only the caches are written, so the
        last layer stops at its keys and values (its attention, MLP and the final norm are skipped)."""
        *body, last = self.layers
        for i, layer in enumerate(body):
            x = layer(x, rope, k_cache[i], v_cache[i], view)
        last.attn.write_cache(last.attn_norm(x), rope, k_cache[-1], v_cache[-1], view)

    def new_cache(self, n_rows: int, n_positions: int, device, dtype) -> tuple[Tensor, Tensor]:
        a = self.args
        shape = (a.n_layers, n_rows, a.n_kv_heads, n_positions, a.head_dim)
        return torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype)

    def new_span_cache(self, n_rows: int, n_positions: int, device, dtype) -> Tensor:
        """Queries, keys and values for `forward_span`: [L, S, N, T, D], heads grouped as q|k|v's."""
        a = self.args
        shape = (a.n_layers, n_rows, a.n_heads + 2 * a.n_kv_heads, n_positions, a.head_dim)
        return torch.zeros(shape, device=device, dtype=dtype)


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
        self.projection = Linear(bdim, ddim, bias=False)
        self.codebook0_head = Linear(bdim, v, bias=False)
        self.audio_head = nn.Parameter(torch.empty(args.num_codebooks - 1, ddim, v))
        self.packed_head: PackedWeights | None = None
        self.projected_audio: Derived | None = None  # see `project_audio`
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
        # One weighted bag per row: no [rows, 32, dim] intermediate (30x faster for a prefill chunk on CPU).
        n = self.args.num_codebooks
        audio = F.embedding_bag(
            (tokens[..., :-1] + self.codebook_offsets).reshape(-1, n),
            self.audio_embeddings.weight,
            mode="sum",
            per_sample_weights=mask[..., :-1].reshape(-1, n).to(self.audio_embeddings.weight.dtype),
        )
        return text + audio.view(*tokens.shape[:-1], -1)

    def embed_frame(self, codes: Tensor) -> Tensor:
        # codes: [B, 32] -> [B, dim]: an audio row is the sum of its codebook embeddings
        return self.audio_embeddings(codes + self.codebook_offsets).sum(-2)

    def embed_audio(self, codebook: int, codes: Tensor) -> Tensor:
        # codes: [...] -> [..., dim], from codebook's rows of the shared table (a view: no offset add)
        v = self.args.audio_vocab_size
        return F.embedding(codes, self.audio_embeddings.weight.narrow(0, codebook * v, v))

    def decoder_input(self, codebook: int, codes: Tensor) -> Tensor:
        """`projection(embed_audio(codebook, codes))`: [...] -> [..., decoder dim], the depth decoder's input
        for sampled codes; one row lookup where `project_audio` made the table from the current weights."""
        table = self.projected_audio
        if table is not None and table.matches(self.audio_embeddings.weight, self.projection.weight):
            v = self.args.audio_vocab_size
            return F.embedding(codes, table.value.narrow(0, codebook * v, v))
        return self.projection(self.embed_audio(codebook, codes))

    def project_audio(self) -> CSM:
        """Make `decoder_input`'s table: the audio embeddings of the codebooks the depth decoder reads (all
        but the last) through the projection, once. A frame then reads the projection weight (4 MiB in bf16
        at csm-1b) once instead of 31 times, and makes 30 ops fewer, for (num_codebooks - 1) *
        audio_vocab_size * decoder dim more values: 31 * 2051 * 1024, 130 MB in bf16 at csm-1b (4% of the
        model's weights). `csm.loading` makes it with the weights (so that memory measured after loading,
        the slot budget, counts it) and an engine's setup again where they changed since."""
        emb, proj = self.audio_embeddings.weight, self.projection.weight
        if self.projected_audio is None or not self.projected_audio.matches(emb, proj):
            n = (self.args.num_codebooks - 1) * self.args.audio_vocab_size
            with torch.no_grad():
                self.projected_audio = Derived(self.projection(emb[:n]), (emb, proj))
        return self

    def codebook_logits(self, codebook: int, h: Tensor) -> Tensor:
        # h: [B, decoder dim] -> [B, V]
        head = self.packed_head
        if head is not None and head.matches(self.audio_head):
            return head.linear(h, codebook - 1)
        return h @ self.audio_head[codebook - 1]

    def pack_cpu(self, min_weights: int = PACK_MIN_WEIGHTS) -> CSM:
        """Prepack every projection and head of at least `min_weights` weights for CPU inference (see
        PackedWeights). Weights packed already and unchanged are kept; elsewhere than on CPU this does
        nothing."""
        for module in self.modules():
            if isinstance(module, Linear):
                module.pack_cpu(min_weights)
        head = self.audio_head.detach()
        self.packed_head = PackedWeights.of(
            self.audio_head, [head[i].T for i in range(head.shape[0])], self.packed_head, min_weights
        )
        return self

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


# ---- checkpoint layout <-> this model's fused projections ----------------------------------------------
def _stack_args(key: str, args: ModelArgs) -> TransformerArgs:
    return args.backbone if key.startswith("backbone.") else args.decoder


def fuse_projections(state: dict[str, Tensor], args: ModelArgs) -> dict[str, Tensor]:
    """Layer weights as checkpoints store them (q/k/v, gate/up apart) -> this model's fused weights, q|k|v
    rows grouped by kv head: for each, its query heads' rows, its key head's, its value head's."""
    out = dict(state)
    for key in [k for k in state if k.endswith(".attn.q_proj.weight")]:
        p = key.removesuffix("q_proj.weight")
        hkv = _stack_args(key, args).n_kv_heads
        parts = [out.pop(f"{p}{n}_proj.weight").unflatten(0, (hkv, -1)) for n in "qkv"]
        out[p + "qkv_proj.weight"] = torch.cat(parts, dim=1).flatten(0, 1)
    for key in [k for k in state if k.endswith(".mlp.gate_proj.weight")]:
        p = key.removesuffix("gate_proj.weight")
        out[p + "gate_up_proj.weight"] = torch.cat(
            [out.pop(p + "gate_proj.weight"), out.pop(p + "up_proj.weight")]
        )
    return out


def split_projections(state: dict[str, Tensor], args: ModelArgs) -> dict[str, Tensor]:
    """The inverse of `fuse_projections` (shapes for loading checks, checkpoint writers)."""
    out = {}
    for key, t in state.items():
        stack = _stack_args(key, args)
        if key.endswith(".attn.qkv_proj.weight"):
            p = key.removesuffix("qkv_proj.weight")
            d, g = stack.head_dim, stack.n_heads // stack.n_kv_heads
            groups = t.unflatten(0, (stack.n_kv_heads, -1))  # [Hkv, (G + 2) * D, dim]
            for name, part in zip("qkv", groups.split([g * d, d, d], dim=1), strict=True):
                out[f"{p}{name}_proj.weight"] = part.flatten(0, 1)
        elif key.endswith(".mlp.gate_up_proj.weight"):
            p = key.removesuffix("gate_up_proj.weight")
            out[p + "gate_proj.weight"], out[p + "up_proj.weight"] = t.chunk(2)
        else:
            out[key] = t
    return out
