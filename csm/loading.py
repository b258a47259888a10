"""Weights: build a CSM from a checkpoint directory in either format, or from a preset with random weights.

Formats, told apart by the content of config.json (never by path names):
- Hugging Face transformers (`CsmForConditionalGeneration`): config.json with "model_type": "csm",
  *.safetensors with `backbone_model.*`, `depth_decoder.*`, `embed_text_tokens`, `lm_head`, and the Mimi
  codec under `codec_model.*` (left for `csm.codec`), plus tokenizer.json.
- Original Sesame (torchtune key names, interleaved RoPE): config.json with "backbone_flavor" and
  "decoder_flavor", and model.safetensors or ckpt.pt. q/k projections are permuted to the rotate-half layout.

The model is built on the `meta` device and the tensors are assigned into it, so it exists once in memory.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor

from csm.model import CSM, fuse_projections, split_projections
from csm.presets import ModelArgs, RopeScaling, TransformerArgs, flavor, preset

_DTYPES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; use one of {sorted(_DTYPES)}") from None


def dtype_for(capability: tuple[int, int] | None) -> torch.dtype:
    """The compute dtype for a device, given its CUDA compute capability (None: not a CUDA device).

    bf16 from sm_80 (Ampere) up, where tensor cores run it; fp16 below: a T4 (sm_75) has fp16 tensor
    cores only, and bf16 there runs without them. Off CUDA, fp32 (the CPU kernels' fastest and exact)."""
    if capability is None:
        return torch.float32
    return torch.bfloat16 if tuple(capability) >= (8, 0) else torch.float16


@dataclass(frozen=True)
class LoadedModel:
    model: CSM
    format: str  # "hf" | "sesame" | "random"
    source: str  # the directory, or "random <preset>"


# ---- formats ---------------------------------------------------------------------------------------
def _read_config(path: Path) -> dict:
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        return {}
    try:
        return json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_path}: not valid JSON ({e})") from e


def detect_format(path: str | Path) -> str:
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"model path {path} is not a directory")
    cfg = _read_config(path)
    if cfg.get("model_type") == "csm":
        return "hf"
    if "backbone_flavor" in cfg or (not cfg and (path / "ckpt.pt").is_file()):
        return "sesame"
    raise ValueError(
        f"{path}: not a CSM checkpoint (expected config.json with model_type 'csm', "
        "or a Sesame config.json with backbone_flavor, or ckpt.pt)"
    )


def _rope_from_hf(cfg: dict) -> tuple[float, RopeScaling | None]:
    rp = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    theta = float(rp.get("rope_theta", cfg.get("rope_theta", 500_000.0)))
    kind = rp.get("rope_type", rp.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind != "llama3":
        raise ValueError(f"unsupported rope type {kind!r} (CSM uses 'llama3' or 'default')")
    return theta, RopeScaling(
        factor=float(rp["factor"]),
        low_freq_factor=float(rp["low_freq_factor"]),
        high_freq_factor=float(rp["high_freq_factor"]),
        original_max_position_embeddings=int(rp["original_max_position_embeddings"]),
    )


def _transformer_from_hf(cfg: dict, max_seq_len: int) -> TransformerArgs:
    theta, scaling = _rope_from_hf(cfg)
    return TransformerArgs(
        n_layers=cfg["num_hidden_layers"],
        dim=cfg["hidden_size"],
        n_heads=cfg["num_attention_heads"],
        n_kv_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
        intermediate_size=cfg["intermediate_size"],
        max_seq_len=max_seq_len,
        norm_eps=cfg.get("rms_norm_eps", 1e-5),
        rope_theta=theta,
        rope_scaling=scaling,
        head_dim=cfg.get("head_dim") or 0,
    )


def args_from_hf_config(cfg: dict) -> ModelArgs:
    n_cb = cfg.get("num_codebooks", 32)
    dec = cfg.get("depth_decoder_config") or {}
    try:
        return ModelArgs(
            backbone=_transformer_from_hf(cfg, cfg.get("max_position_embeddings", 2048)),
            decoder=_transformer_from_hf(dec, n_cb + 1),
            text_vocab_size=cfg["text_vocab_size"],
            audio_vocab_size=cfg["vocab_size"],
            num_codebooks=n_cb,
        )
    except KeyError as e:
        raise ValueError(f"CSM config.json is missing {e}") from None


def hf_config_dict(args: ModelArgs) -> dict:
    """The transformers `CsmConfig` fields for `args` (without the codec), so a peer can be built."""

    def block(t: TransformerArgs) -> dict:
        rope: dict = {"rope_theta": t.rope_theta, "rope_type": "default"}
        if t.rope_scaling is not None:
            rope = {"rope_theta": t.rope_theta, "rope_type": "llama3", **vars(t.rope_scaling)}
        return {
            "num_hidden_layers": t.n_layers,
            "hidden_size": t.dim,
            "num_attention_heads": t.n_heads,
            "num_key_value_heads": t.n_kv_heads,
            "intermediate_size": t.intermediate_size,
            "head_dim": t.head_dim,
            "rms_norm_eps": t.norm_eps,
            "rope_parameters": rope,
        }

    return {
        **block(args.backbone),
        "max_position_embeddings": args.backbone.max_seq_len,
        "text_vocab_size": args.text_vocab_size,
        "vocab_size": args.audio_vocab_size,
        "num_codebooks": args.num_codebooks,
        "depth_decoder_config": {
            **block(args.decoder),
            "max_position_embeddings": args.num_codebooks + 1,
            "num_codebooks": args.num_codebooks,
            "backbone_hidden_size": args.backbone.dim,
            "vocab_size": args.audio_vocab_size,
        },
    }


def args_from_sesame_config(cfg: dict) -> ModelArgs:
    import dataclasses

    n_cb = cfg.get("audio_num_codebooks", 32)
    return ModelArgs(
        backbone=flavor(cfg.get("backbone_flavor", "llama-1B")),
        decoder=dataclasses.replace(flavor(cfg.get("decoder_flavor", "llama-100M")), max_seq_len=n_cb + 1),
        text_vocab_size=cfg.get("text_vocab_size", 128_256),
        audio_vocab_size=cfg.get("audio_vocab_size", 2051),
        num_codebooks=n_cb,
    )


# ---- key mapping -----------------------------------------------------------------------------------
_LAYER_HF = {
    r"self_attn\.([qkvo])_proj\.weight": r"attn.\1_proj.weight",
    r"mlp\.(gate|up|down)_proj\.weight": r"mlp.\1_proj.weight",
    r"input_layernorm\.weight": "attn_norm.weight",
    r"post_attention_layernorm\.weight": "mlp_norm.weight",
}
_LAYER_SESAME = {
    r"attn\.([qkv])_proj\.weight": r"attn.\1_proj.weight",
    r"attn\.output_proj\.weight": "attn.o_proj.weight",
    r"mlp\.w1\.weight": "mlp.gate_proj.weight",
    r"mlp\.w2\.weight": "mlp.down_proj.weight",
    r"mlp\.w3\.weight": "mlp.up_proj.weight",
    r"sa_norm\.scale": "attn_norm.weight",
    r"mlp_norm\.scale": "mlp_norm.weight",
}


def _rules(stacks: dict[str, str], layer: dict[str, str], tops: dict[str, str]) -> list:
    rules = [
        # The layer index is group 1, so a layer rule's own group becomes group 2.
        (re.compile(rf"{re.escape(src)}\.layers\.(\d+)\.{p}"), rf"{dst}.layers.\1." + r.replace("\\1", "\\2"))
        for src, dst in stacks.items()
        for p, r in layer.items()
    ]
    return rules + [(re.compile(re.escape(k)), v) for k, v in tops.items()]


_HF_RULES = _rules(
    {"backbone_model": "backbone", "depth_decoder.model": "decoder"},
    _LAYER_HF,
    {
        "embed_text_tokens.weight": "text_embeddings.weight",
        "backbone_model.embed_tokens.embed_audio_tokens.weight": "audio_embeddings.weight",
        # Tied to the backbone's audio embeddings; transformers saves whichever of the two it keeps.
        "depth_decoder.model.embed_tokens.weight": "audio_embeddings.weight",
        "lm_head.weight": "codebook0_head.weight",
        "backbone_model.norm.weight": "backbone.norm.weight",
        "depth_decoder.model.norm.weight": "decoder.norm.weight",
        "depth_decoder.model.inputs_embeds_projector.weight": "projection.weight",
        "depth_decoder.codebooks_head.weight": "audio_head",
    },
)
_SESAME_RULES = _rules(
    {"backbone": "backbone", "decoder": "decoder"},
    _LAYER_SESAME,
    {
        "text_embeddings.weight": "text_embeddings.weight",
        "audio_embeddings.weight": "audio_embeddings.weight",
        "projection.weight": "projection.weight",
        "codebook0_head.weight": "codebook0_head.weight",
        "audio_head": "audio_head",
        "backbone.norm.scale": "backbone.norm.weight",
        "decoder.norm.scale": "decoder.norm.weight",
    },
)

_UNMAPPED = object()


def _map_key(key: str, rules: list) -> str | object | None:
    for pattern, repl in rules:
        if pattern.fullmatch(key):
            return None if repl is None else pattern.sub(repl, key)
    return _UNMAPPED


def interleaved_to_half(w: Tensor, n_heads: int) -> Tensor:
    """Sesame/torchtune q,k rows (pairs interleaved per head) -> rotate-half layout."""
    out, dim = w.shape
    return w.view(n_heads, out // n_heads // 2, 2, dim).transpose(1, 2).reshape(out, dim)


def half_to_interleaved(w: Tensor, n_heads: int) -> Tensor:
    """The inverse of `interleaved_to_half` (used to write Sesame-format checkpoints)."""
    out, dim = w.shape
    return w.view(n_heads, 2, out // n_heads // 2, dim).transpose(1, 2).reshape(out, dim)


# ---- reading tensors -------------------------------------------------------------------------------
def _iter_tensors(path: Path) -> Iterator[tuple[str, Callable[[], Tensor], tuple[int, ...]]]:
    """(key, loader, shape) for every tensor; loading is deferred so skipped tensors cost nothing."""
    files = sorted(path.glob("*.safetensors"))
    if files:
        for f in files:
            with safe_open(str(f), framework="pt") as sf:
                for key in sf.keys():
                    shape = tuple(sf.get_slice(key).get_shape())
                    yield key, (lambda sf=sf, key=key: sf.get_tensor(key)), shape
        return
    ckpt = path / "ckpt.pt"
    if ckpt.is_file():
        state = torch.load(ckpt, map_location="cpu", mmap=True, weights_only=True)
        for key, t in state.items():
            yield key, (lambda t=t: t), tuple(t.shape)
        return
    raise FileNotFoundError(f"{path}: no *.safetensors or ckpt.pt")


def load_model(
    path: str | Path,
    dtype: str | torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> LoadedModel:
    path = Path(path)
    fmt = detect_format(path)
    cfg = _read_config(path)
    if fmt == "hf":
        args, rules = args_from_hf_config(cfg), _HF_RULES
    else:
        args, rules = args_from_sesame_config(cfg), _SESAME_RULES
    dtype = parse_dtype(dtype)
    with torch.device("meta"):
        model = CSM(args)
    # Checked against the checkpoint layout (q/k/v and gate/up apart); fused once everything is read.
    expected = {k: tuple(v.shape) for k, v in split_projections(model.state_dict(), args).items()}
    heads = {
        "q_proj": (args.backbone.n_heads, args.decoder.n_heads),
        "k_proj": (args.backbone.n_kv_heads, args.decoder.n_kv_heads),
    }

    state: dict[str, Tensor] = {}
    unknown, bad_shape = [], []
    # Files keep their tensors open only while iterated, so each tensor is read, converted and dropped.
    for key, load, shape in _iter_tensors(path):
        if key.startswith("codec_model."):
            continue  # the Mimi codec; csm.codec loads it
        ours = _map_key(key, rules)
        if ours is _UNMAPPED:
            unknown.append(key)
            continue
        if ours in state:
            continue  # the other half of a tied pair
        if ours not in expected:
            unknown.append(key)
            continue
        if shape != expected[ours]:
            bad_shape.append(f"{key}: {list(shape)} (expected {list(expected[ours])})")
            continue
        t = load()
        rope_proj = re.search(r"\.attn\.([qk]_proj)\.weight$", ours)
        if fmt == "sesame" and rope_proj:
            t = interleaved_to_half(t, heads[rope_proj.group(1)][0 if ours.startswith("backbone.") else 1])
        state[ours] = t.to(device=device, dtype=dtype)
    missing = sorted(set(expected) - set(state))
    problems = []
    if unknown:
        problems.append(f"unknown tensors: {', '.join(sorted(unknown))}")
    if bad_shape:
        problems.append(f"mis-shaped tensors: {'; '.join(bad_shape)}")
    if missing:
        problems.append(f"missing tensors: {', '.join(missing)}")
    if problems:
        raise ValueError(f"{path} ({fmt} format): " + " | ".join(problems))
    model.load_state_dict(fuse_projections(state, args), strict=True, assign=True)
    model.init_buffers(device)
    model.project_audio()  # here, not at engine setup: memory measured after loading counts it
    return LoadedModel(model.eval(), fmt, str(path))


def random_model(
    preset_name: str = "tiny",
    dtype: str | torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> LoadedModel:
    """A preset with random weights: runs anywhere, speaks noise. Built on `meta`, filled on `device`."""
    with torch.device("meta"):
        model = CSM(preset(preset_name))
    model = model.to_empty(device=device).to(parse_dtype(dtype))
    model.init_random(seed)
    model.init_buffers(device)
    model.project_audio()
    return LoadedModel(model.eval(), "random", f"random {preset_name}")
