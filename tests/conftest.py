from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from transformers.utils import logging as hf_logging

from csm.loading import load_model
from csm.presets import preset
from tests.checkpoints import hf_csm

hf_logging.set_verbosity_error()
torch.set_num_threads(2)


@pytest.fixture(scope="module")
def one_torch_thread():
    """For a module of small ops: on 2 OpenMP threads they spend most of their time waking the second one
    (~10 ms per op when the machine is shared). Restored for the other test files."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_args():
    return preset("tiny")


@pytest.fixture(scope="session")
def hf_tiny(tiny_args):
    return hf_csm(tiny_args, seed=0)


@pytest.fixture(scope="session")
def hf_tiny_dir(hf_tiny, tmp_path_factory):
    path = tmp_path_factory.mktemp("csm-hf")
    hf_tiny.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model(hf_tiny_dir):
    """Our model, loaded from the transformers-format checkpoint that transformers wrote."""
    return load_model(hf_tiny_dir).model


# ---- a real Ray Serve app, shared by the tests that need one ---------------------------------------------
APP_TOKEN = "test-secret"
MAX_CONVERSATIONS = 10
# The Lambda bridge's own token, and the one @connections endpoint the app posts bridged replies to: a
# port picked now, served by whichever stand-in a test starts there (a LocalGateway: GATEWAY_BRIDGE).
BRIDGE_TOKEN = "test-bridge-secret"


def _free_port() -> int:
    """A free port below Linux's ephemeral range (32768+) and above Ray's worker ports (10002-19999): held
    for the whole session without a socket, so nothing that binds port 0 (Ray does, a lot) can take it."""
    import os
    import socket

    for port in range(20000 + os.getpid() % 10000, 32768):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port for the bridge's callback")


BRIDGE_CALLBACK_PORT = _free_port()
BRIDGE_CALLBACK_URL = f"http://127.0.0.1:{BRIDGE_CALLBACK_PORT}/local"
GATEWAY_BRIDGE = {"bridge_token": BRIDGE_TOKEN, "management_port": BRIDGE_CALLBACK_PORT}


def app_args(history_dir, voices_dir, frontend_dir) -> dict:
    """The test app: the `tiny` presets on CPU (as `make demo`), with a token and a voice configured."""
    return {
        "generator": {"max_slots": 12},
        "ingress": {
            "history_dir": str(history_dir),
            "voices_dir": str(voices_dir),
            "frontend_dir": str(frontend_dir),
            "token": APP_TOKEN,
            "bridge_token": BRIDGE_TOKEN,
            "bridge_callback_url": BRIDGE_CALLBACK_URL,
            "max_conversations": MAX_CONVERSATIONS,
            # The tests stream speech at 4x real time (`Client.stream`); the audio budget is tested apart.
            "limits": {"max_reply_seconds": 6.0, "audio_rate": 8.0, "audio_burst_s": 4.0},
        },
    }


@pytest.fixture(scope="session")
def serve_app(tmp_path_factory):
    """Start Ray and the app once; yields the base URL (`http://127.0.0.1:PORT`) and the app's args."""
    import socket

    import ray
    from ray import serve

    from devtools.realtime_client import speech
    from serve_app.app import build_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    voices = tmp_path_factory.mktemp("voices")
    pcm = speech("This is my voice.", voices, lead_s=0.1, tail_s=0.1)
    from csm.audio import write_wav

    write_wav(voices / "narrator.wav", torch.from_numpy(pcm.astype("float32") / 32768))
    (voices / "narrator.txt").write_text("This is my voice.")
    page = tmp_path_factory.mktemp("frontend")  # a stand-in build: the page itself has its own tests
    (page / "assets").mkdir()
    (page / "index.html").write_text('<!doctype html><script src="/assets/app.js"></script>')
    (page / "assets" / "app.js").write_text("console.log('page')")
    (page / "secret.txt").write_text("outside assets")
    args = app_args(tmp_path_factory.mktemp("history"), voices, page)
    # Dummy AWS credentials: the bridge's boto3 client signs its posts to the local @connections stand-in.
    aws = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    ray.init(
        num_cpus=4,
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
        runtime_env={"env_vars": aws},
    )
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(args), name="csm", route_prefix="/")
    try:
        yield {"url": f"http://127.0.0.1:{port}", "ws": f"ws://127.0.0.1:{port}/v1/realtime", "args": args}
    finally:
        serve.shutdown()
        ray.shutdown()


@contextmanager
def second_ingress(serve_app: dict, name: str, config: dict, num_replicas: int = 1) -> Iterator[str]:
    """Another `ConversationIngress` with `config` (validated first), on the running app's models, at
    `/<name>`, in `num_replicas` replicas; yields its base URL and deletes it after."""
    from ray import serve

    from serve_app.ingress import ConversationIngress, IngressConfig

    IngressConfig.model_validate(config)
    handles = [
        serve.get_deployment_handle(deployment, "csm")
        for deployment in ("CSMGenerator", "AudioDecoder", "AudioTokenizer", "SpeechRecognizer", "Responder")
    ]
    ingress = ConversationIngress.options(num_replicas=num_replicas)
    serve.run(ingress.bind(*handles, config), name=name, route_prefix=f"/{name}")
    try:
        yield f"{serve_app['url']}/{name}"
    finally:
        serve.delete(name)
