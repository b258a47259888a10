"""The model's fused ops against their plain forms: RoPE as one matmul, a residual added inside a matmul."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from csm.loading import random_model
from csm.model import apply_rope, rope_rotation, rope_table
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
        model.pack_cpu()
    lin = model.backbone.layers[0].mlp.down_proj
    assert (lin.packed is not None) == packed
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 1, lin.in_features, generator=g).to(dtype)
    residual = torch.randn(rows, 1, lin.out_features, generator=g).to(dtype)
    ref = F.linear(x.float(), lin.weight.float()) + residual.float()
    got = lin(x, residual)
    assert got.shape == residual.shape and got.dtype == dtype
    assert rel_err(got, ref) <= (1e-6 if dtype == torch.float32 else 1e-2)
