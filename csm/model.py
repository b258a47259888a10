"""The CSM model: a Llama backbone over 33-wide rows and a small Llama depth decoder over codebooks.

Modules and math only. KV caches are plain tensors owned by the caller (the engine), so the model holds
no per-sequence state; every forward says which cache rows it reads and which positions it writes.

Conventions: RoPE uses the rotate-half layout (transformers'); original Sesame checkpoints store q/k in
the interleaved layout and are permuted on load (`csm.loading`). RoPE is one matmul per layer with a
rotation matrix that also carries the attention scale: queries and keys both leave it multiplied by
head_dim**-0.25, so q·k comes out already scaled (no scale op, and no unscaled product to overflow fp16);
the KV caches hold keys scaled that way.
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


class PackedWeights:
    """CPU copies of weights in oneDNN's prepacked (blocked) layout, bound to the parameter they came from.

    The dense CPU matmul works from the weight as stored and re-lays it out call after call; a weight
    packed once skips that. On the `small` preset on a 2-core EPYC the frame step at 4-16 streams runs
    ~30% faster (about even at one), and a prefill chunk ~25% faster, in fp32 and bf16 alike. The copy
    costs the weight's memory again. It is used only while the parameter is the same tensor, unmodified
    (same storage, same in-place version): a weight replaced or edited after packing is read densely,
    never computed with from a stale copy.
    """

    def __init__(self, source: Tensor, weights: list[Tensor]) -> None:
        self.source = source
        self.ptr = source.data_ptr()
        self.version = None if source.is_inference() else source._version
        self.weights = weights

    @classmethod
    def of(
        cls, source: Tensor, weights: list[Tensor], current: PackedWeights | None = None
    ) -> PackedWeights | None:
        """Pack `weights` (each [out, in], derived from `source`); None where oneDNN cannot run them.
        `current` is kept when it was packed from `source` as it is now (packing again is a no-op)."""
        if current is not None and current.matches(source):
            return current
        try:
            if not _onednn_ready(source):
                return None
            packed = [torch.ops.mkldnn._reorder_linear_weight(w.detach().contiguous()) for w in weights]
        except (AttributeError, RuntimeError):  # a torch build or CPU without these ops: dense is correct
            return None
        return cls(source, packed)

    def matches(self, source: Tensor) -> bool:
        return (
            source is self.source
            and source.data_ptr() == self.ptr
            and (self.version is None or source._version == self.version)
        )

    def linear(self, x: Tensor, i: int = 0, residual: Tensor | None = None) -> Tensor:
        if residual is not None:  # oneDNN adds it in the matmul's epilogue
            return torch.ops.mkldnn._linear_pointwise.binary(x, residual, self.weights[i], None, "add")
        return torch.ops.mkldnn._linear_pointwise(x, self.weights[i], None, "none", [], "")


class Linear(nn.Linear):
    """nn.Linear that runs from a prepacked weight on CPU once `pack_cpu` is called (see PackedWeights),
    and can add a residual inside its matmul (one op where linear-then-add is two)."""

    packed: PackedWeights | None = None

    def pack_cpu(self) -> None:
        self.packed = PackedWeights.of(self.weight, [self.weight], self.packed)

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


def grouped_decode_attention(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float | None = None
) -> Tensor:
    """Attention for one query token per row, GQA without repeating keys: q [B, H, 1, D], k and v
    [B, Hkv, L, D], mask [B, 1, 1, L] bool or None -> [B, H, 1, D]. `scale` defaults to D**-0.5.

    Each key/value head is read once for its whole group of query heads (a batched matmul), where SDPA's
    GQA path with a mask materialises the keys once per query head (on CUDA, and on CPU too, where that
    copy was ~7% of the batched frame step). Everything stays in the inputs' dtype: q is scaled before
    the product, so in fp16 the scores cannot overflow unless the scaled ones would, and softmax
    accumulates in fp32 inside the kernel for 16-bit inputs (a cast each way would add two ops per layer
    and no precision: the product is rounded to the model dtype either way).
    """
    b, h, _, d = q.shape
    hkv = k.shape[1]
    scale = d**-0.5 if scale is None else scale
    if scale != 1.0:
        q = q * scale
    scores = q.view(b, hkv, h // hkv, d) @ k.transpose(-1, -2)  # [B, Hkv, G, L]
    if mask is not None:
        scores = torch.where(mask.view(b, 1, 1, -1), scores, float("-inf"))
    return (scores.softmax(-1) @ v).view(b, h, 1, d)


def _attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, causal: bool, scale: float) -> Tensor:
    if q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16):
        # The CPU kernel is ~4x slower in 16-bit than in fp32 at decode shapes; fp32 is also more exact.
        return _attention(q.float(), k.float(), v.float(), mask, causal, scale).to(q.dtype)
    if q.shape[2] == 1:
        return grouped_decode_attention(q, k, v, mask, scale)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=True
    )


class Attention(nn.Module):
    def __init__(self, args: TransformerArgs) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        # q, k and v in one matmul (checkpoints store them apart; see `fuse_projections`).
        self.qkv_proj = Linear(args.dim, (args.n_heads + 2 * args.n_kv_heads) * args.head_dim, bias=False)
        self.o_proj = Linear(args.n_heads * args.head_dim, args.dim, bias=False)

    def write_cache(
        self, x: Tensor, rope: Tensor, k_cache: Tensor, v_cache: Tensor, view: CacheView
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Project x and write its keys and values; return (rotated queries, keys to attend, values)."""
        b, t, _ = x.shape
        h, hkv = self.n_heads, self.n_kv_heads
        qk, v = self.qkv_proj(x).view(b, t, h + 2 * hkv, self.head_dim).split([h + hkv, hkv], dim=2)
        q, k = apply_rope(qk, rope).split([h, hkv], dim=2)  # q and k rotated (and scaled) together
        return q.transpose(1, 2), view.update(k_cache, k), view.update(v_cache, v)

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
        b, t, _ = x.shape
        q, keys, values = self.write_cache(x, rope, k_cache, v_cache, view)
        # q and k each carry head_dim**-0.25 (see `Transformer.rope_at`): the product is already scaled.
        out = _attention(q, keys, values, view.mask, causal=view.mask is None and t > 1, scale=1.0)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1), residual)


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

    def forward(self, x: Tensor, rope: Tensor, k_cache: Tensor, v_cache: Tensor, view: CacheView) -> Tensor:
        # x: [B, T, dim]; rope: from `rope_at`; caches: [L, S, Hkv, T_max, D]
        for i, layer in enumerate(self.layers):
            x = layer(x, rope, k_cache[i], v_cache[i], view)
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

    def codebook_logits(self, codebook: int, h: Tensor) -> Tensor:
        # h: [B, decoder dim] -> [B, V]
        head = self.packed_head
        if head is not None and head.matches(self.audio_head):
            return head.linear(h, codebook - 1)
        return h @ self.audio_head[codebook - 1]

    def pack_cpu(self) -> CSM:
        """Prepack every projection and head for CPU inference (see PackedWeights). Weights packed already
        and unchanged are kept; elsewhere than on CPU this does nothing."""
        for module in self.modules():
            if isinstance(module, Linear):
                module.pack_cpu()
        head = self.audio_head.detach()
        self.packed_head = PackedWeights.of(
            self.audio_head, [head[i].T for i in range(head.shape[0])], self.packed_head
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
def fuse_projections(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Layer weights as checkpoints store them (q/k/v, gate/up apart) -> this model's fused weights."""
    out = dict(state)
    for key in [k for k in state if k.endswith(".attn.q_proj.weight")]:
        p = key.removesuffix("q_proj.weight")
        out[p + "qkv_proj.weight"] = torch.cat([out.pop(f"{p}{n}_proj.weight") for n in "qkv"])
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
        stack = args.backbone if key.startswith("backbone.") else args.decoder
        if key.endswith(".attn.qkv_proj.weight"):
            p = key.removesuffix("qkv_proj.weight")
            q, kv = stack.n_heads * stack.head_dim, stack.n_kv_heads * stack.head_dim
            for name, part in zip("qkv", t.split([q, kv, kv]), strict=True):
                out[f"{p}{name}_proj.weight"] = part
        elif key.endswith(".mlp.gate_up_proj.weight"):
            p = key.removesuffix("gate_up_proj.weight")
            out[p + "gate_proj.weight"], out[p + "up_proj.weight"] = t.chunk(2)
        else:
            out[key] = t
    return out
