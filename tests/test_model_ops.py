"""The model's fused ops against their plain forms: RoPE as one matmul, a residual added inside a matmul, the
grouped q|k|v layout, the depth decoder's span cache, decode masks, the projected audio table."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from csm.loading import random_model
from csm.model import (
    CSM,
    CacheView,
    apply_rope,
    fuse_projections,
    rope_rotation,
    rope_table,
    split_projections,
)
from csm.presets import preset


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def rotate_half_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # transformers' apply_rotary_pos_emb for one tensor; x: [..., D]
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


def test_rope_as_one_matmul_is_rotate_half_rope():
    args = preset("tiny").backbone
    table = rope_table(args, 40)  # [40, 2, D]: cos, signed sin
    cos = table[:, 0]
    sin = table[:, 1].clone()
    sin[:, : args.head_dim // 2] *= -1  # back to the plain sine
    g = torch.Generator().manual_seed(0)
    positions = torch.tensor([[3, 4, 5], [30, 31, 39]])  # [B, T]
    x = torch.randn(2, 3, 5, args.head_dim, generator=g)  # [B, T, heads, D]
    ref = rotate_half_rope(x, cos[positions][:, :, None], sin[positions][:, :, None])
    assert rel_err(apply_rope(x, rope_rotation(table[positions])), ref) <= 1e-6
    # One rotation shared by every row (the depth decoder's) gives each row the same as its own.
    shared = rope_rotation(table[positions[:1]])
    assert torch.allclose(apply_rope(x, shared), apply_rope(x, shared.expand(2, -1, -1, -1)))


@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3, 200])
@torch.inference_mode()
def test_a_residual_added_inside_the_matmul_is_linear_plus_residual(packed, dtype, rows):
    model = random_model("tiny", dtype=dtype).model
    if packed:
        model.pack_cpu(min_weights=0)
    lin = model.backbone.layers[0].mlp.down_proj
    # oneDNN packs bf16 only on CPUs with bf16 support (avx512_bf16, AMX); elsewhere bf16 stays dense.
    packable = dtype == torch.float32 or torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert (lin.packed is not None) == (packed and packable)
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 1, lin.in_features, generator=g).to(dtype)
    residual = torch.randn(rows, 1, lin.out_features, generator=g).to(dtype)
    ref = F.linear(x.float(), lin.weight.float()) + residual.float()
    got = lin(x, residual)
    assert got.shape == residual.shape and got.dtype == dtype
    assert rel_err(got, ref) <= (1e-6 if dtype == torch.float32 else 1e-2)


def _op_names(fn) -> list[str]:
    """The aten ops `fn` dispatches that do more than alias an input (the benchmark's `--op-count` rule)."""
    names = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            inputs = {a.untyped_storage()._cdata for a in args if isinstance(a, torch.Tensor)}
            outs = out if isinstance(out, (list, tuple)) else [out]
            aliases = all(isinstance(o, torch.Tensor) and o.untyped_storage()._cdata in inputs for o in outs)
            if not (func.is_view and aliases):
                names.append(str(func.overloadpacket).removeprefix("aten."))
            return out

    with torch.inference_mode(), Record():
        fn()
    return names


def test_fused_projections_group_heads_by_kv_head_and_split_back():
    args = preset("tiny")
    model = random_model("tiny").model
    split = split_projections(model.state_dict(), args)
    fused = fuse_projections(split, args)
    assert all(torch.equal(fused[k], v) for k, v in model.state_dict().items())
    # kv head j's rows: its query heads', then its key head's, then its value head's.
    a, attn = args.backbone, model.backbone.layers[0].attn
    d, g = a.head_dim, a.n_heads // a.n_kv_heads
    q = split["backbone.layers.0.attn.q_proj.weight"]
    k = split["backbone.layers.0.attn.k_proj.weight"]
    v = split["backbone.layers.0.attn.v_proj.weight"]
    group1 = attn.qkv_proj.weight[(g + 2) * d : 2 * (g + 2) * d]
    assert torch.equal(group1, torch.cat([q[g * d : 2 * g * d], k[d : 2 * d], v[d : 2 * d]]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.inference_mode()
def test_the_depth_decoder_step_by_step_through_its_span_cache_is_the_whole_sequence(dtype):
    # The frame step's path (`forward_span`: q|k|v rotated straight into one cache, pass 1 over positions
    # 0..1, then one position a pass) against one causal forward over all 32 positions.
    model = random_model("tiny", dtype=dtype, seed=1).model
    dec, b = model.decoder, 3
    x = (torch.randn(b, 32, dec.args.dim, generator=torch.Generator().manual_seed(2)) * 0.5).to(dtype)
    k, v = dec.new_cache(b, 33, "cpu", dtype)
    whole = dec(x, dec.rope_at(torch.arange(32)[None], dtype), k, v, CacheView(slice(0, b), 0, 32, None))
    cache = dec.new_span_cache(b, 33, "cpu", dtype)
    steps = [
        dec.forward_span(x[:, :2], dec.span_rope(0, 2, dtype), cache, CacheView(slice(0, b), 0, 2, None))
    ]
    for i in range(2, 32):
        view = CacheView(slice(0, b), i, i + 1, None)
        steps.append(dec.forward_span(x[:, i : i + 1], dec.span_rope(i, 1, dtype), cache, view))
    assert rel_err(torch.cat(steps, 1), whole) <= (1e-5 if dtype == torch.float32 else 2e-2)
    # Keys and values land where the general path puts them, values passed through unrotated.
    g = dec.args.n_heads // dec.args.n_kv_heads
    grouped = cache.unflatten(2, (dec.args.n_kv_heads, g + 2))  # [L, B, Hkv, G + 2, T, D]
    assert rel_err(grouped[:, :, :, g, :32], k[:, :, :, :32]) <= (1e-6 if dtype == torch.float32 else 1e-2)
    assert rel_err(grouped[:, :, :, g + 1, :32], v[:, :, :, :32]) <= (
        1e-6 if dtype == torch.float32 else 1e-2
    )
    # The identity is exact: layer 0's value heads at the last position are its projection's.
    attn = dec.layers[0].attn
    heads = attn.qkv_proj(dec.layers[0].attn_norm(x[:, 31])).unflatten(-1, (dec.args.n_kv_heads, g + 2, -1))
    assert torch.equal(grouped[0, :, :, g + 1, 31], heads[:, :, g + 1])


def test_span_rope_rotates_query_and_key_heads_and_passes_values_through():
    dec = random_model("tiny").model.decoder
    a = dec.args
    g, d = a.n_heads // a.n_kv_heads, a.head_dim
    rope = dec.span_rope(5, 2, torch.float32).unflatten(1, (a.n_kv_heads, g + 2))  # [2, Hkv, G + 2, D, D]
    rotations = dec.rope_at(torch.arange(5, 7)[None], torch.float32)[0]  # [2, D, D]
    assert torch.equal(rope[:, :, : g + 1], rotations[:, None, None].expand_as(rope[:, :, : g + 1]))
    assert torch.equal(rope[:, :, g + 1], torch.eye(d).expand_as(rope[:, :, g + 1]))


def test_a_decode_mask_is_additive_per_kv_head_and_aligned():
    mask = torch.arange(13)[None, :] <= torch.tensor([3, 12])[:, None]  # [2, 13]
    view = CacheView(slice(0, 2), torch.zeros(2, 1, dtype=torch.long), 13, mask[:, None, None, :])
    bias = view.decode_mask(3, torch.float16)
    assert bias.shape == (6, 1, 1, 13) and bias.dtype == torch.float16
    assert all(s % 8 == 0 for s in bias.stride()[:-1]) and bias.stride(-1) == 1
    assert torch.equal(bias[:, 0, 0] == 0, mask.repeat_interleave(3, 0))
    assert torch.isneginf(bias[~(bias == 0)]).all()
    assert view.decode_mask(3, torch.float16) is bias  # made once, for every layer


@torch.no_grad()
def test_the_projected_audio_table_is_the_projection_and_never_stale():
    model = random_model("tiny").model.project_audio()
    codes = torch.randint(0, 2048, (4,), generator=torch.Generator().manual_seed(3))
    for i in (0, 5, model.args.num_codebooks - 2):
        want = model.projection(model.embed_audio(i, codes))
        assert rel_err(model.decoder_input(i, codes), want) <= 1e-6
    model.projection.weight.mul_(-1)  # edited in place: the table no longer matches
    assert torch.allclose(model.decoder_input(3, codes), model.projection(model.embed_audio(3, codes)))
    assert model.project_audio().projected_audio.matches(
        model.audio_embeddings.weight, model.projection.weight
    )


def test_a_depth_decoder_layer_step_is_ten_ops_on_an_accelerator():
    # On `meta` (an accelerator's path: no CPU prepacking, SDPA for decode): norm, q|k|v projection, one
    # matmul that rotates and writes q|k|v into the cache, attention, output projection + residual, norm,
    # gate|up projection, silu, mul, down projection + residual. Views are free.
    with torch.device("meta"):
        model = CSM(preset("tiny"))
    model.init_buffers("meta")
    dec = model.decoder
    cache = dec.new_span_cache(4, 33, "meta", torch.float32)
    x, rope = torch.empty(4, 1, dec.args.dim, device="meta"), dec.span_rope(7, 1, torch.float32)
    ops = _op_names(lambda: dec.forward_span(x, rope, cache, CacheView(slice(0, 4), 7, 8, None)))
    step = ["rms_norm", "linear", "bmm", "scaled_dot_product_attention", "addmm"]
    step += ["rms_norm", "linear", "silu", "mul", "addmm"]
    assert ops == step * dec.args.n_layers + ["rms_norm"]
