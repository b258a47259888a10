"""serve_config.yaml builds the app it describes, each deployment gets its typed config with the app-wide
values where it sets none, and a bad config fails at build time, naming the field, not in a replica."""

from __future__ import annotations

import importlib
import pickle
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel, ValidationError
from ray.serve import Application

from deployments.decoder import DecoderConfig
from deployments.generator import GeneratorConfig
from deployments.recognizer import RecognizerConfig
from deployments.tokenizer import TokenizerConfig
from serve_app.app import AppArgs, build_app
from serve_app.ingress_config import IngressConfig
from speech.reply_config import ResponderConfig

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "serve_config.yaml"


@pytest.fixture(autouse=True)
def no_device_env(monkeypatch):
    for name in ("CSM_DEVICE", "CSM_GPU_FRACTIONS"):
        monkeypatch.delenv(name, raising=False)


def yaml_args() -> dict:
    (app,) = yaml.safe_load(CONFIG.read_text())["applications"]
    return app["args"]


def bound(app: Application) -> dict[str, tuple[BaseModel, dict]]:
    """Deployment name → (the config it is bound to, its Ray actor options)."""
    ingress = app._bound_deployment
    *models, ingress_config = ingress.init_args
    out = {ingress.name: (ingress_config, ingress.ray_actor_options)}
    for handle in models:
        deployment = handle._bound_deployment
        (config,) = deployment.init_args
        out[deployment.name] = (config, deployment.ray_actor_options)
    return out


def test_serve_config_builds_the_app():
    config = yaml.safe_load(CONFIG.read_text())
    (app,) = config["applications"]
    assert app["import_path"] == "serve_app.app:build_app" and app["route_prefix"] == "/"
    AppArgs.model_validate(app["args"])
    assert isinstance(build_app(app["args"]), Application)
    listed = {d["name"] for d in app["deployments"]}
    assert listed == {
        "CSMGenerator",
        "AudioDecoder",
        "AudioTokenizer",
        "SpeechRecognizer",
        "Responder",
        "ConversationIngress",
    }


def test_stream_deployments_write_no_access_log_per_call():
    """They are called every 160-320 ms per conversation; the others once per reply or per connection."""
    ingress = build_app(yaml_args())._bound_deployment
    logs = {}
    for handle in ingress.init_args[:-1]:
        deployment = handle._bound_deployment
        config = deployment._deployment_config.logging_config or {}
        logs[deployment.name] = config.get("enable_access_log", True)
    assert logs == {
        "CSMGenerator": True,
        "AudioDecoder": False,
        "AudioTokenizer": False,
        "SpeechRecognizer": False,
        "Responder": True,
    }


def test_production_config_builds_the_app_on_the_gpu(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "docker"))  # docker/ is a folder of scripts, not a package
    entrypoint = importlib.import_module("entrypoint")
    (app,) = entrypoint.production_config({}, entrypoint.Ports())["applications"]
    generator, options = bound(build_app(app["args"]))["CSMGenerator"]
    assert (generator.device, generator.max_slots, generator.host_cache_mb) == ("cuda", "auto", 2048)
    assert options["num_gpus"] == 0.6


def test_each_deployment_is_bound_to_its_validated_config():
    configs = {name: config for name, (config, _) in bound(build_app(yaml_args())).items()}
    types = {
        "CSMGenerator": GeneratorConfig,
        "AudioDecoder": DecoderConfig,
        "AudioTokenizer": TokenizerConfig,
        "SpeechRecognizer": RecognizerConfig,
        "Responder": ResponderConfig,
        "ConversationIngress": IngressConfig,
    }
    assert {name: type(config) for name, config in configs.items()} == types
    generator = configs["CSMGenerator"]
    fields = {"device", "preset", "max_slots", "prefill_threads"}
    assert generator.model_dump(include=fields) == {
        "device": "cpu",
        "preset": "tiny",
        "max_slots": 16,
        "prefill_threads": 2,
    }
    assert (configs["AudioDecoder"].device, configs["AudioDecoder"].num_slots) == ("cpu", 32)
    assert configs["ConversationIngress"].max_conversations == 16
    for config in configs.values():  # Serve pickles them to the replicas
        assert pickle.loads(pickle.dumps(config)) == config


def test_app_wide_values_fill_only_what_a_section_leaves_unset(monkeypatch):
    args = {
        "device": "cuda",
        "codec_preset": "mimi",
        "decoder": {"device": "cpu"},
        "generator": {"preset": "x"},
    }
    got = bound(build_app(args))
    generator, decoder, tokenizer = (got[n][0] for n in ("CSMGenerator", "AudioDecoder", "AudioTokenizer"))
    assert (generator.device, generator.preset) == ("cuda", "x")
    assert (decoder.device, decoder.preset) == ("cpu", "mimi")
    assert (tokenizer.device, tokenizer.preset) == ("cuda", "mimi")
    assert got["CSMGenerator"][1]["num_gpus"] == 0.6  # on a GPU: each model deployment's share

    # No app-wide preset: the deployments' own default; CSM_DEVICE overrides the app-wide device only.
    monkeypatch.setenv("CSM_DEVICE", "cpu")
    got = bound(build_app({"device": "cuda", "tokenizer": {"device": "cuda"}}))
    assert got["CSMGenerator"][0].preset == GeneratorConfig().preset
    assert (got["CSMGenerator"][0].device, got["AudioTokenizer"][0].device) == ("cpu", "cuda")
    assert got["CSMGenerator"][1]["num_gpus"] == 0.0


@pytest.mark.parametrize(
    ("args", "field"),
    [
        ({"generator": {"max_slots": 0}}, "generator.max_slots"),
        ({"generator": {"max_slot": 4}}, "generator.max_slot"),
        ({"generator": {"frames_per_chunk": 3, "max_frames_per_chunk": 2}}, "max_frames_per_chunk"),
        # items the decoder would refuse, every reply failing: refused at build
        ({"generator": {"max_frames_per_chunk": 8}}, "decoder.max_frames_per_call"),
        (
            {"generator": {"first_frames": 6}, "decoder": {"max_frames_per_call": 5}},
            "decoder.max_frames_per_call",
        ),
        ({"decoder": {"num_slots": "many"}}, "decoder.num_slots"),
        ({"tokenizer": {"num_slots": 0}}, "tokenizer.num_slots"),
        ({"responder": {"backend": "telepathy"}}, "responder.backend"),
        ({"recognizer": {"backend": "guesswork"}}, "recognizer.backend"),
        ({"recognizer": {"backend": "whisper"}}, "whisper_path"),
        ({"ingress": {"max_conversations": -1}}, "ingress.max_conversations"),
        ({"ingress": {"limits": {"max_reply_seconds": "long"}}}, "ingress.limits"),
        ({"options": {"generatr": {"num_replicas": 2}}}, "generatr"),
        ({"unknown_section": {}}, "unknown_section"),
    ],
)
def test_bad_config_fails_at_build_naming_the_field(args, field):
    with pytest.raises(ValidationError, match=field.replace(".", r"\.")):
        build_app(args)


def test_larger_generator_items_build_with_a_decoder_that_takes_them():
    args = {"generator": {"max_frames_per_chunk": 8}, "decoder": {"max_frames_per_call": 8}}
    got = bound(build_app(args))
    assert got["CSMGenerator"][0].largest_item == got["AudioDecoder"][0].max_frames_per_call == 8
