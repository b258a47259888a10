"""16-bit compute: the dtype each device gets, and fp16 that stays close to fp32 where fp16 overflows easily.

fp16 (what a T4 runs) has 5 exponent bits: anything past 65504 is inf. The two places a Llama overflows
first are the attention scores (q·k before the 1/sqrt(D) scale) and RMSNorm's mean of squares.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from csm.loading import dtype_for, random_model
from csm.model import CacheView, RMSNorm, grouped_decode_attention
from deployments.weights import pick_dtype
from tests.test_parity import make_prompt, rel_err

# Measured on the `tiny` preset (random weights, CPU, seeds 4/7/11): relative error of the logits in fp16
# 5.5e-4..6.4e-4 (codebook 0) and 7.3e-4..1.1e-3 (depth decoder); bf16 gives 5e-3..9e-3. fp16 has 10
# mantissa bits (2**-11 ≈ 5e-4 per rounding); about three times the worst measured is allowed.
FP16_LOGITS_TOLERANCE = 3e-3


@pytest.mark.parametrize(
    ("capability", "dtype"),
    [
        (None, torch.float32),  # not a CUDA device
        ((6, 1), torch.float16),  # P4 / P40
        ((7, 0), torch.float16),  # V100
        ((7, 5), torch.float16),  # T4: fp16 tensor cores only
        ((8, 0), torch.bfloat16),  # A100
        ((8, 6), torch.bfloat16),  # A10G
        ((8, 9), torch.bfloat16),  # L4
        ((9, 0), torch.bfloat16),  # H100 / H200
        ((10, 0), torch.bfloat16),
    ],
)
def test_dtype_for_capability(capability, dtype):
    assert dtype_for(capability) == dtype


def test_auto_dtype_asks_the_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    assert pick_dtype("auto", torch.device("cuda")) == torch.float16
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert pick_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert pick_dtype("auto", torch.device("cpu")) == torch.float32
    assert pick_dtype("fp16", torch.device("cpu")) == torch.float16


def test_decode_attention_scales_before_the_product_in_fp16():
    # One key wins with q·k = 80000 unscaled (past fp16's 65504) and 10000 scaled (D = 64).
    d, length = 64, 12
    g = torch.Generator().manual_seed(0)
    q = torch.full((1, 4, 1, d), 40.0)
    w = torch.rand(1, 2, length, 1, generator=g) * 25  # the other keys score at most 8000 scaled
    w[:, :, 5] = 31.25
    k = w.expand(1, 2, length, d).clone()
    v = torch.randn(1, 2, length, d, generator=g)
    ref = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    got = grouped_decode_attention(q.half(), k.half(), v.half(), None)
    assert torch.isfinite(got).all()
    assert rel_err(got.float(), ref) <= 1e-3


def test_rms_norm_squares_in_fp32():
    norm = RMSNorm(64, 1e-5).half()
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(1)) * 300  # squares reach ~1e6
    got = norm(x.half())
    assert torch.isfinite(got).all()
    assert rel_err(got.float(), F.rms_norm(x.half().float(), (64,), eps=1e-5)) <= 1e-3


@torch.inference_mode()
def _prefill_frame_logits(model, prompt, codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Codebook-0 logits after a prefill and one frame step, and the depth decoder's logits for `codes`
    (teacher-forced, so both dtypes follow the same path): [1, V] and [1, 31, V], fp32."""
    dtype = next(model.parameters()).dtype
    bb, args = model.backbone, model.args
    t = prompt.tokens.shape[0]
    k, v = bb.new_cache(1, args.max_seq_len + 1, "cpu", dtype)
    x = model.embed_rows(prompt.tokens, prompt.mask)[None].to(dtype)
    pos = torch.arange(t)[None]
    head = pos[:, :-1]
    bb.fill_cache(x[:, :-1], bb.rope_at(head, dtype), k, v, CacheView(slice(0, 1), head, t - 1, None))
    last = pos[:, -1:]
    mask = torch.ones(1, 1, 1, t, dtype=torch.bool)
    h = bb(x[:, -1:], bb.rope_at(last, dtype), k, v, CacheView(slice(0, 1), last, t, mask))[:, 0]
    logits0 = model.codebook0_head(h)
    rows = torch.cat([h[:, None], torch.stack([model.embed_audio(i, codes[:, i]) for i in range(31)], 1)], 1)
    dk, dv = model.decoder.new_cache(1, 33, "cpu", dtype)
    out = model.decoder(
        model.projection(rows),
        model.decoder.rope_at(torch.arange(32)[None], dtype),
        dk,
        dv,
        CacheView(slice(0, 1), 0, 32, None),
    )
    decoder_logits = torch.stack([model.codebook_logits(i, out[:, i]) for i in range(1, 32)], 1)
    return logits0.float(), decoder_logits.float()


def test_fp16_logits_stay_close_to_fp32(tiny_args):
    fp32 = random_model("tiny", seed=4).model
    fp16 = copy.deepcopy(fp32).half()
    fp16.init_buffers()  # RoPE tables stay fp32, as a loaded model's do
    prompt = make_prompt(tiny_args, 20, "sixteen bits", seed=5, max_frames=4)
    codes = torch.randint(0, 2048, (1, 32), generator=torch.Generator().manual_seed(6))
    ref0, ref_dec = _prefill_frame_logits(fp32, prompt, codes)
    got0, got_dec = _prefill_frame_logits(fp16, prompt, codes)
    assert rel_err(got0, ref0) <= FP16_LOGITS_TOLERANCE
    assert rel_err(got_dec, ref_dec) <= FP16_LOGITS_TOLERANCE
