"""The application graph, bound in one place: `serve run serve_config.yaml` (or `serve_app.app:app`).

Every model deployment gets its settings from `AppArgs` (the YAML's `args`), so one file runs the CPU demo
and a GPU node. Environment overrides, read here and in the replicas:

- `MODEL_PATH`, `TOKENIZER_PATH`, `MIMI_PATH`: weights (none: random `tiny` presets, noise);
- `CSM_DEVICE=cuda` (or `auto`): where the models run; `CSM_GPU_FRACTIONS=generator:0.6,decoder:0.15,...`
  overrides the GPU share of each deployment when a GPU is used (defaults below fit one T4);
- `HISTORY_DIR`, `VOICES_DIR`, `CSM_TOKEN`: the ingress's history store, voices, and shared-secret token;
- `CSM_TORCH_THREADS`: torch threads per replica (default 1: replicas share the machine's cores).
"""

from __future__ import annotations

import os

from pydantic import BaseModel, ConfigDict, Field
from ray.serve import Application

from deployments.decoder import AudioDecoder, DecoderConfig
from deployments.generator import CSMGenerator, GeneratorConfig
from deployments.recognizer import SpeechRecognizer
from deployments.responder import Responder
from deployments.routing import router_config
from deployments.tokenizer import AudioTokenizer, TokenizerConfig
from serve_app.ingress import ConversationIngress, IngressConfig
from speech.reply_text import ResponderConfig

# Shares of one GPU when the models run on it (one g4dn.xlarge T4 holds a replica of each).
GPU_FRACTIONS = {"generator": 0.6, "decoder": 0.15, "tokenizer": 0.15, "recognizer": 0.1}
DEPLOYMENTS = ("generator", "decoder", "tokenizer", "recognizer", "responder", "ingress")


class AppArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    device: str = "cpu"  # "cpu", "cuda" or "auto"; env CSM_DEVICE overrides
    preset: str = "tiny"  # CSM preset when no weights are given
    codec_preset: str = "tiny"
    generator: dict = Field(default_factory=dict)  # deployments.generator.GeneratorConfig
    decoder: dict = Field(default_factory=dict)  # deployments.decoder.DecoderConfig
    tokenizer: dict = Field(default_factory=dict)  # deployments.tokenizer.TokenizerConfig
    recognizer: dict = Field(default_factory=dict)  # SpeechRecognizer arguments (backend, whisper_path)
    responder: dict = Field(default_factory=dict)  # speech.reply_text.ResponderConfig
    ingress: dict = Field(default_factory=dict)  # serve_app.ingress.IngressConfig
    # Serve options per deployment (num_replicas, health_check_period_s, ...), by the names below, for
    # programmatic runs; `serve run` takes the same from the YAML's `deployments:` section.
    options: dict[str, dict] = Field(default_factory=dict)


def _gpu_fractions() -> dict[str, float]:
    fractions = dict(GPU_FRACTIONS)
    for part in filter(None, os.environ.get("CSM_GPU_FRACTIONS", "").split(",")):
        name, _, value = part.partition(":")
        if name not in fractions:
            raise ValueError(f"CSM_GPU_FRACTIONS: unknown deployment {name!r}; known: {sorted(fractions)}")
        fractions[name] = float(value)
    return fractions


def build_app(args: AppArgs | dict | None = None) -> Application:
    a = AppArgs.model_validate(args or {})
    device = os.environ.get("CSM_DEVICE", a.device)
    gpu = device != "cpu" and (device == "cuda" or _cuda_available())
    share = _gpu_fractions() if gpu else dict.fromkeys(GPU_FRACTIONS, 0.0)

    unknown = set(a.options) - set(DEPLOYMENTS)
    if unknown:
        raise ValueError(f"options: unknown deployments {sorted(unknown)}; known: {list(DEPLOYMENTS)}")

    def on(name: str, **defaults) -> dict:
        options: dict = {}
        if name in share:
            options["ray_actor_options"] = {"num_cpus": 0, "num_gpus": share[name]}
        if name in ("decoder", "tokenizer"):
            # Called every 80-160 ms per conversation: a log line per call costs CPU and disk for nothing.
            options["logging_config"] = {"enable_access_log": False}
        return {**options, **defaults, **a.options.get(name, {})}

    codec = {"device": device, "preset": a.codec_preset}
    # Validated here, so a bad config fails `serve run` at once instead of in a replica's constructor.
    gen_cfg = GeneratorConfig.model_validate({"device": device, "preset": a.preset, **a.generator})
    dec_cfg = DecoderConfig.model_validate({**codec, **a.decoder})
    tok_cfg = TokenizerConfig.model_validate({**codec, **a.tokenizer})
    ResponderConfig.model_validate(a.responder)
    IngressConfig.model_validate(a.ingress)
    backend = a.recognizer.get("backend", "pocketsphinx")
    if backend not in ("pocketsphinx", "whisper"):
        raise ValueError(f"recognizer.backend must be 'pocketsphinx' or 'whisper', not {backend!r}")
    # A conversation's replies go to the replica holding its KV cache, while it has a free engine slot.
    routing = router_config(busy_at=gen_cfg.max_slots if isinstance(gen_cfg.max_slots, int) else None)
    generator = CSMGenerator.options(**on("generator", request_router_config=routing)).bind(
        gen_cfg.model_dump()
    )
    decoder = AudioDecoder.options(**on("decoder")).bind(dec_cfg.model_dump())
    tokenizer = AudioTokenizer.options(**on("tokenizer")).bind(tok_cfg.model_dump())
    recognizer = SpeechRecognizer.options(**on("recognizer")).bind(**a.recognizer)
    responder = Responder.options(**on("responder")).bind(a.responder)
    ingress = ConversationIngress.options(**on("ingress"))
    return ingress.bind(generator, decoder, tokenizer, recognizer, responder, a.ingress)


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


app = build_app()

__all__ = ["AppArgs", "app", "build_app"]
