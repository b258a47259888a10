"""serve_config.yaml builds the app it describes, and a bad config fails at build time, not in a replica."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError
from ray.serve import Application

from serve_app.app import AppArgs, build_app

CONFIG = Path(__file__).resolve().parents[1] / "serve_config.yaml"


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


@pytest.mark.parametrize(
    "args",
    [
        {"generator": {"max_slots": 0}},
        {"decoder": {"num_slots": "many"}},
        {"responder": {"backend": "telepathy"}},
        {"recognizer": {"backend": "guesswork"}},
        {"ingress": {"max_conversations": -1}},
        {"unknown_section": {}},
    ],
)
def test_bad_config_fails_at_build(args):
    with pytest.raises((ValidationError, ValueError)):
        build_app(args)
