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
from typing import TypeVar

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from ray.serve import Application

from deployments.decoder import AudioDecoder, DecoderConfig
from deployments.generator import CSMGenerator, GeneratorConfig
from deployments.recognizer import RecognizerConfig, SpeechRecognizer
from deployments.responder import Responder
from deployments.routing import router_config, stream_router_config
from deployments.tokenizer import AudioTokenizer, TokenizerConfig
from serve_app.ingress import ConversationIngress
from serve_app.ingress_config import IngressConfig
from speech.reply_config import ResponderConfig

# Shares of one GPU when the models run on it (one g4dn.xlarge T4 holds a replica of each).
GPU_FRACTIONS = {"generator": 0.6, "decoder": 0.15, "tokenizer": 0.15, "recognizer": 0.1}
DEPLOYMENTS = ("generator", "decoder", "tokenizer", "recognizer", "responder", "ingress")

Config = TypeVar("Config", bound=BaseModel)


class AppArgs(BaseModel):
    """The YAML's `args`: each deployment's own config, validated here, so a bad field fails `serve run`
    at once (naming it, e.g. `generator.max_slots`) instead of in a replica's constructor."""

    model_config = ConfigDict(extra="forbid")

    # App-wide values for the model deployments, used where their own section leaves the field unset.
    device: str = "cpu"  # "cpu", "cuda" or "auto"; env CSM_DEVICE overrides
    preset: str | None = None  # the generator's preset without weights (None: GeneratorConfig's)
    codec_preset: str | None = None  # the decoder's and tokenizer's (None: CodecConfig's)
    generator: GeneratorConfig = Field(default_factory=GeneratorConfig)
    decoder: DecoderConfig = Field(default_factory=DecoderConfig)
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    recognizer: RecognizerConfig = Field(default_factory=RecognizerConfig)
    responder: ResponderConfig = Field(default_factory=ResponderConfig)
    ingress: IngressConfig = Field(default_factory=IngressConfig)
    # Serve options per deployment (num_replicas, health_check_period_s, ...), by the names below, for
    # programmatic runs; `serve run` takes the same from the YAML's `deployments:` section.
    options: dict[str, dict] = Field(default_factory=dict)

    @field_validator("options")
    @classmethod
    def _known_deployments(cls, options: dict[str, dict]) -> dict[str, dict]:
        unknown = set(options) - set(DEPLOYMENTS)
        if unknown:
            raise ValueError(f"unknown deployments {sorted(unknown)}; known: {list(DEPLOYMENTS)}")
        return options

    @model_validator(mode="after")
    def _decoder_takes_every_item(self) -> AppArgs:
        # Each streamed item of frames becomes one decoder call: a larger one would fail every reply.
        largest, takes = self.generator.largest_item, self.decoder.max_frames_per_call
        if largest > takes:
            raise ValueError(
                f"the generator streams items of up to {largest} frames (first_frames, max_frames_per_chunk)"
                f" but decoder.max_frames_per_call is {takes}"
            )
        return self


def _inherit(config: Config, **app_wide: str | None) -> Config:
    """`config` with the app-wide values of the fields it does not set itself (None: no app-wide value)."""
    unset = {k: v for k, v in app_wide.items() if v is not None and k not in config.model_fields_set}
    return config.model_copy(update=unset)


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

    def on(name: str, **defaults) -> dict:
        options: dict = {}
        if name in share:
            options["ray_actor_options"] = {"num_cpus": 0, "num_gpus": share[name]}
        if name in ("decoder", "tokenizer", "recognizer"):
            # Called every 160-640 ms per conversation: a log line per call costs CPU and disk for nothing.
            options["logging_config"] = {"enable_access_log": False}
        return {**options, **defaults, **a.options.get(name, {})}

    gen_cfg = _inherit(a.generator, device=device, preset=a.preset)
    dec_cfg = _inherit(a.decoder, device=device, preset=a.codec_preset)
    tok_cfg = _inherit(a.tokenizer, device=device, preset=a.codec_preset)
    # A conversation's replies go to the replica holding its KV cache, while it has a free engine slot.
    routing = router_config(busy_at=gen_cfg.max_slots if isinstance(gen_cfg.max_slots, int) else None)
    generator = CSMGenerator.options(**on("generator", request_router_config=routing)).bind(gen_cfg)
    # Every turn and reply is a stream of its own on these (a multiplexed id each).
    streams = stream_router_config()
    decoder = AudioDecoder.options(**on("decoder", request_router_config=streams)).bind(dec_cfg)
    tokenizer = AudioTokenizer.options(**on("tokenizer", request_router_config=streams)).bind(tok_cfg)
    recognizer = SpeechRecognizer.options(**on("recognizer", request_router_config=streams)).bind(
        a.recognizer
    )
    responder = Responder.options(**on("responder")).bind(a.responder)
    ingress = ConversationIngress.options(**on("ingress"))
    return ingress.bind(generator, decoder, tokenizer, recognizer, responder, a.ingress)


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


app = build_app()

__all__ = ["AppArgs", "app", "build_app"]
