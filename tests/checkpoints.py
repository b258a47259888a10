"""Checkpoints the tests write: a random tiny transformers CSM, and the same weights in Sesame's format."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import CsmConfig, CsmForConditionalGeneration, MimiConfig

from csm.loading import half_to_interleaved, hf_config_dict
from csm.model import CSM, split_projections
from csm.presets import ModelArgs

TINY_MIMI = dict(
    hidden_size=64,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=2,
    head_dim=32,
    num_filters=4,
    upsample_groups=64,
    codebook_dim=16,
    num_quantizers=32,
    codebook_size=2048,
)


def hf_csm(args: ModelArgs, seed: int = 0) -> CsmForConditionalGeneration:
    """transformers' CSM with the shapes of `args` and random weights (the parity oracle and the peer)."""
    cfg = CsmConfig(
        **hf_config_dict(args),
        codec_config=MimiConfig(**TINY_MIMI).to_dict(),
        bos_token_id=0,
        pad_token_id=1,
        audio_token_id=2,
        audio_eos_token_id=3,
    )
    torch.manual_seed(seed)
    return CsmForConditionalGeneration(cfg).eval()


def hf_prompt_embeds(
    hf: CsmForConditionalGeneration, tokens: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Prompt rows embedded by transformers' own modules: text rows by the text table, audio rows by the
    summed codebook embeddings (what its processor's audio placeholders turn into)."""
    text = hf.embed_text_tokens(tokens[:, -1])
    audio = hf.backbone_model.embed_tokens(tokens[None, :, :-1])[0]
    return torch.where(mask[:, :1], audio, text)[None]


_LAYER = {
    "attn.q_proj.weight": "attn.q_proj.weight",
    "attn.k_proj.weight": "attn.k_proj.weight",
    "attn.v_proj.weight": "attn.v_proj.weight",
    "attn.o_proj.weight": "attn.output_proj.weight",
    "mlp.gate_proj.weight": "mlp.w1.weight",
    "mlp.down_proj.weight": "mlp.w2.weight",
    "mlp.up_proj.weight": "mlp.w3.weight",
    "attn_norm.weight": "sa_norm.scale",
    "mlp_norm.weight": "mlp_norm.scale",
}


def sesame_state_dict(model: CSM) -> dict[str, torch.Tensor]:
    """Our weights under torchtune key names, q/k rows back in the interleaved RoPE layout."""
    out = {}
    a = model.args
    for key, t in split_projections(model.state_dict(), a).items():
        stack, _, rest = key.partition(".")
        if stack in ("backbone", "decoder") and rest.startswith("layers."):
            _, idx, tail = rest.split(".", 2)
            if tail.endswith(("q_proj.weight", "k_proj.weight")):
                t_args = a.backbone if stack == "backbone" else a.decoder
                heads = t_args.n_heads if "q_proj" in tail else t_args.n_kv_heads
                t = half_to_interleaved(t, heads)
            out[f"{stack}.layers.{idx}.{_LAYER[tail]}"] = t.contiguous()
        elif rest == "norm.weight":
            out[f"{stack}.norm.scale"] = t
        else:
            out[key] = t
    return out


def write_sesame(model: CSM, path: Path, backbone: str, decoder: str, as_pt: bool = False) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    state = sesame_state_dict(model)
    if as_pt:
        torch.save(state, path / "ckpt.pt")
    else:
        save_file(state, str(path / "model.safetensors"))
    a = model.args
    config = {
        "backbone_flavor": backbone,
        "decoder_flavor": decoder,
        "text_vocab_size": a.text_vocab_size,
        "audio_vocab_size": a.audio_vocab_size,
        "audio_num_codebooks": a.num_codebooks,
    }
    (path / "config.json").write_text(json.dumps(config))
    return path


def write_llama3_tokenizer(path: Path) -> Path:
    """A tiny word-level tokenizer.json with Llama-3's BOS/EOS tokens: <unk> 0, "[0]" 1, "hello" 2, BOS 3,
    EOS 4."""
    vocab = {"<unk>": 0, "[0]": 1, "hello": 2, "<|begin_of_text|>": 3, "<|end_of_text|>": 4}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<|begin_of_text|>", "<|end_of_text|>"])
    tok.save(str(path / "tokenizer.json"))
    return path
