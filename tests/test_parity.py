"""Parity with transformers' CsmForConditionalGeneration on random weights, loaded through our loaders."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from csm.engine import Engine, EngineConfig, SamplingParams
from csm.loading import load_model
from csm.model import CacheView, grouped_decode_attention
from csm.prompt import PromptBuilder, Segment
from csm.tokenizer import ByteTokenizer
from tests.checkpoints import hf_prompt_embeds, sesame_state_dict, write_sesame

GREEDY = SamplingParams(temperature=0.0)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def make_prompt(args, n_context_frames: int, text: str, seed: int, max_frames: int):
    g = torch.Generator().manual_seed(seed)
    context = [
        Segment(1, "hello, how are you?", torch.randint(0, 2048, (n_context_frames, 32), generator=g)),
        Segment(0, "fine thanks", torch.randint(0, 2048, (3, 32), generator=g)),
    ]
    return PromptBuilder(ByteTokenizer(), args).build(context, 1, text, max_frames)


def engine_codes(model, prompts, max_frames, joins=None, chunk=16):
    """Run prompts through one engine; prompt i joins before step joins[i]. Returns codes per prompt."""
    joins = joins or [0] * len(prompts)
    engine = Engine(model, EngineConfig(max_slots=len(prompts), prefill_chunk=chunk))
    ids: list[str | None] = [None] * len(prompts)
    frames: dict[str, list[np.ndarray]] = {}
    step = 0
    while step <= max(joins) or engine.has_work:
        for i, j in enumerate(joins):
            if j == step:
                ids[i] = engine.add(prompts[i].tokens, prompts[i].mask, max_frames, GREEDY)
        for ev in engine.step():
            if ev.codes is not None:
                frames.setdefault(ev.request_id, []).append(ev.codes)
        step += 1
    return [np.stack(frames[i]) for i in ids]


def hf_greedy(hf, prompt, max_frames):
    emb = hf_prompt_embeds(hf, prompt.tokens, prompt.mask)
    with torch.no_grad():
        out = hf.generate(
            inputs_embeds=emb,
            attention_mask=torch.ones(1, emb.shape[1], dtype=torch.long),
            do_sample=False,
            depth_decoder_do_sample=False,
            max_new_tokens=max_frames,
        )
    return out[0].numpy()


@pytest.fixture(params=["dense", "packed"])
def tiny_variant(request, hf_tiny_dir):
    """A fresh copy of our tiny model, on dense weights or on the CPU-prepacked ones the engine uses."""
    model = load_model(hf_tiny_dir).model
    return model.pack_cpu(min_weights=0) if request.param == "packed" else model


def test_the_oracle_uses_llama3_rope(hf_tiny):
    assert hf_tiny.config.rope_parameters["rope_type"] == "llama3"
    assert hf_tiny.config.depth_decoder_config.rope_parameters["rope_type"] == "llama3"


@torch.no_grad()
def test_backbone_logits_match_transformers(hf_tiny, tiny_variant, tiny_args):
    tiny_model = tiny_variant
    prompt = make_prompt(tiny_args, 6, "what a day", seed=1, max_frames=4)
    emb = hf_prompt_embeds(hf_tiny, prompt.tokens, prompt.mask)
    ref = hf_tiny.lm_head(hf_tiny.backbone_model(inputs_embeds=emb).last_hidden_state)

    ours_emb = tiny_model.embed_rows(prompt.tokens, prompt.mask)[None]
    assert rel_err(ours_emb, emb) <= 1e-6
    t = emb.shape[1]
    k, v = tiny_model.backbone.new_cache(1, tiny_args.max_seq_len + 1, "cpu", torch.float32)
    pos = torch.arange(t)[None]
    h = tiny_model.backbone(
        ours_emb, tiny_model.backbone.rope_at(pos, torch.float32), k, v, CacheView(slice(0, 1), pos, t, None)
    )
    assert rel_err(tiny_model.codebook0_head(h), ref) <= 1e-5


@torch.no_grad()
def test_depth_decoder_logits_match_transformers(hf_tiny, tiny_variant, tiny_args):
    tiny_model = tiny_variant
    g = torch.Generator().manual_seed(2)
    codes = torch.randint(0, 2048, (3, 32), generator=g)
    h = torch.randn(3, tiny_args.backbone.dim, generator=g)
    ids = torch.nn.functional.pad(codes[:, :31], (1, 0))
    ref = hf_tiny.depth_decoder(input_ids=ids, backbone_last_hidden_state=h).logits  # [3, 31, V]

    x = torch.cat(
        [h[:, None], torch.stack([tiny_model.embed_audio(i, codes[:, i]) for i in range(31)], 1)], 1
    )
    dk, dv = tiny_model.decoder.new_cache(3, 33, "cpu", torch.float32)
    pos = torch.arange(32).expand(3, 32)
    out = tiny_model.decoder(
        tiny_model.projection(x),
        tiny_model.decoder.rope_at(pos, torch.float32),
        dk,
        dv,
        CacheView(slice(0, 3), 0, 32, None),
    )
    ours = torch.stack([tiny_model.codebook_logits(i, out[:, i]) for i in range(1, 32)], 1)
    assert rel_err(ours, ref) <= 1e-5


def test_greedy_generation_matches_transformers(hf_tiny, tiny_model, tiny_args):
    prompt = make_prompt(tiny_args, 8, "nice to meet you", seed=3, max_frames=8)
    (ours,) = engine_codes(tiny_model, [prompt], 8)
    np.testing.assert_array_equal(ours, hf_greedy(hf_tiny, prompt, 8))


def test_staggered_joins_match_single_runs(hf_tiny, tiny_model, tiny_args):
    # Different prompt lengths (chunked prefill spans several steps), joining at different frames.
    prompts = [make_prompt(tiny_args, n, f"line number {n}", seed=n, max_frames=10) for n in (2, 30, 11, 55)]
    batched = engine_codes(tiny_model, prompts, 10, joins=[0, 2, 3, 7], chunk=24)
    for p, got in zip(prompts, batched, strict=True):
        (alone,) = engine_codes(tiny_model, [p], 10)
        np.testing.assert_array_equal(got, alone)
    np.testing.assert_array_equal(batched[1], hf_greedy(hf_tiny, prompts[1], 10))


@pytest.mark.parametrize("as_pt", [False, True], ids=["safetensors", "ckpt.pt"])
def test_sesame_checkpoint_gives_the_same_codes(tiny_model, tiny_args, tmp_path, as_pt):
    path = write_sesame(tiny_model, tmp_path / "sesame", "tiny-backbone", "tiny-decoder", as_pt=as_pt)
    loaded = load_model(path)
    assert loaded.format == "sesame"
    # The file holds q/k in the interleaved layout; loading permutes them back.
    ours_qkv = tiny_model.backbone.layers[0].attn.qkv_proj.weight
    q_rows = tiny_args.backbone.n_heads * tiny_args.backbone.head_dim
    assert not torch.equal(
        sesame_state_dict(tiny_model)["backbone.layers.0.attn.q_proj.weight"], ours_qkv[:q_rows]
    )
    assert torch.equal(loaded.model.backbone.layers[0].attn.qkv_proj.weight, ours_qkv)
    prompt = make_prompt(tiny_args, 5, "same weights", seed=4, max_frames=6)
    np.testing.assert_array_equal(
        engine_codes(loaded.model, [prompt], 6)[0], engine_codes(tiny_model, [prompt], 6)[0]
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("masked", [True, False])
def test_grouped_decode_attention_matches_sdpa(dtype, masked):
    # The CUDA decode path (one query per row, key heads read once per group) against SDPA's GQA.
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(s, generator=g).to(dtype) for s in ((3, 8, 1, 16), (3, 2, 40, 16), (3, 2, 40, 16)))
    mask = (
        (torch.arange(40)[None, :] <= torch.tensor([5, 20, 39])[:, None])[:, None, None, :]
        if masked
        else None
    )
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.float(), k.float(), v.float(), attn_mask=mask, enable_gqa=True
    )
    got = grouped_decode_attention(q, k, v, mask).float()
    assert rel_err(got, ref) <= (1e-6 if dtype == torch.float32 else 2e-2)
