"""CPU-prepacked weights (csm.model.PackedWeights): the same products as the dense weights, never stale."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from csm.loading import random_model
from csm.model import Linear


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.fixture
def tiny():
    return random_model("tiny").model.pack_cpu(min_weights=0)  # every matrix, small as they are


def test_every_projection_and_head_is_packed_on_this_cpu(tiny):
    linears = [m for m in tiny.modules() if isinstance(m, Linear)]
    assert linears and all(m.packed is not None for m in linears)
    assert tiny.packed_head is not None and len(tiny.packed_head.weights) == tiny.args.num_codebooks - 1
    # Packing again (every engine set up on this model does) keeps what is packed and unchanged.
    packed, head = [m.packed for m in linears], tiny.packed_head
    tiny.pack_cpu(min_weights=0)
    assert all(m.packed is p for m, p in zip(linears, packed, strict=True)) and tiny.packed_head is head


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3, 16, 200])
@torch.inference_mode()
def test_packed_products_match_dense(dtype, rows):
    model = random_model("tiny", dtype=dtype).model.pack_cpu(min_weights=0)
    g = torch.Generator().manual_seed(rows)
    lin = model.backbone.layers[0].mlp.gate_up_proj
    x = torch.randn(rows, 1, lin.in_features, generator=g).to(dtype)
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    assert rel_err(lin(x), F.linear(x.float(), lin.weight.float())) <= tol
    h = torch.randn(rows, model.args.decoder.dim, generator=g).to(dtype)
    for i in (1, model.args.num_codebooks - 1):
        assert rel_err(model.codebook_logits(i, h), h.float() @ model.audio_head[i - 1].float()) <= tol


@torch.no_grad()
def test_a_weight_edited_after_packing_is_used_not_the_stale_copy(tiny):
    lin = tiny.codebook0_head
    x = torch.randn(4, lin.in_features)
    before = lin(x)
    lin.weight.mul_(-2)  # in place: same tensor, new version
    assert torch.allclose(lin(x), -2 * before, rtol=1e-5, atol=1e-6)
    h = torch.randn(2, tiny.args.decoder.dim)
    tiny.audio_head[4].zero_()
    assert not tiny.codebook_logits(5, h).any()
    assert tiny.codebook_logits(6, h).any()


@torch.no_grad()
def test_a_weight_replaced_after_packing_is_used(tiny):
    lin = tiny.projection
    x = torch.randn(3, lin.in_features)
    new = torch.randn_like(lin.weight)
    tiny.load_state_dict({"projection.weight": new}, strict=False, assign=True)  # a new tensor
    assert torch.allclose(lin(x), x @ new.T, rtol=1e-5, atol=1e-6)
    lin.weight.data = -new  # new storage under the same parameter object
    assert torch.allclose(lin(x), -(x @ new.T), rtol=1e-5, atol=1e-6)
    # Packing again puts the new weight on the fast path.
    tiny.pack_cpu(min_weights=0)
    assert lin.packed.matches(lin.weight) and torch.allclose(lin(x), -(x @ new.T), rtol=1e-5, atol=1e-6)


def test_small_matrices_stay_dense():
    """Under PACK_MIN_WEIGHTS, oneDNN's per-call overhead costs more than packing saves: the engine's
    default packing leaves them dense, and packs those above it (here the threshold set between them)."""
    model = random_model("tiny").model.pack_cpu()
    assert model.packed_head is None
    assert all(m.packed is None for m in model.modules() if isinstance(m, Linear))
    head = model.codebook0_head  # the largest [2051, 64] projection
    model.pack_cpu(min_weights=head.weight.numel())
    assert head.packed is not None and model.backbone.layers[0].attn.o_proj.packed is None
