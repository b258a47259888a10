"""The engine on a (fake) CUDA device: `add` touches only host tensors, and a step's host-to-device copies
are all asynchronous (pinned, non-blocking), its one device-to-host copy the frame's codes.

PyTorch's fake tensors carry a device and shapes but no data, so the engine's step runs on a "cuda" device
on any CPU; a dispatch mode records every copy the step makes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

import csm.engine as engine_module
from csm.engine import Engine, EngineConfig, SamplingParams
from csm.loading import random_model
from csm.model import CSM
from csm.prompt import PromptBuilder, Segment
from csm.tokenizer import ByteTokenizer

CUDA = torch.device("cuda", 0)


class Copies(TorchDispatchMode):
    """Every copy between devices: (source device, destination device, non_blocking)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[str, str, bool]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        aten = torch.ops.aten
        if func.overloadpacket in (aten.to, aten._to_copy, aten.copy_):
            src = args[1] if func.overloadpacket is aten.copy_ else args[0]
            if src.device != out.device:
                self.seen.append((src.device.type, out.device.type, bool(kwargs.get("non_blocking", False))))
        return out


def _unpinned(t: torch.Tensor) -> torch.Tensor:
    """Fake tensors cannot be pinned; and a small one made from data is a constant that fake mode would copy
    for real (to a device this machine lacks): forget the data, keep the shape."""
    t.constant = None
    return t


@pytest.fixture
def fake_cuda_engine(monkeypatch):
    real = random_model("tiny", seed=0).model
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with torch.device("meta"):
        model = CSM(real.args)
    with mode:
        model.load_state_dict(
            {k: mode.from_tensor(v).to(CUDA) for k, v in real.state_dict().items()}, assign=True
        )
        model.init_buffers(CUDA)
    host = []
    monkeypatch.setattr(engine_module, "pinned", _unpinned)
    monkeypatch.setattr(
        engine_module, "to_host", lambda t: host.append(t.device) or np.ones(t.shape, np.int64)
    )
    return Engine(model, EngineConfig(max_slots=2, cuda_graphs=False)), mode, host


def test_add_and_a_step_make_no_synchronous_host_copy(fake_cuda_engine):
    engine, mode, host = fake_cuda_engine
    builder = PromptBuilder(ByteTokenizer(), engine.args)
    p = builder.build([Segment(1, "hello", torch.randint(0, 2048, (40, 32)))], 0, "hi there", 8)
    added = Copies()
    with added:  # on the caller's thread: host tensors only
        engine.add(p.tokens, p.mask, 4, SamplingParams(seed=1), cache_key="c")
    assert added.seen == []
    stepped = Copies()
    with mode, torch.inference_mode():
        engine.setup()
        with stepped:
            for _ in range(3):  # a prefill chunk, the activation, frame steps
                engine.step()
    uploads = [c for c in stepped.seen if c[:2] == ("cpu", "cuda")]
    assert uploads and all(non_blocking for _, _, non_blocking in uploads)
    assert not [c for c in stepped.seen if c[:2] == ("cuda", "cpu")]  # only through `to_host`, once a frame
    assert host == [CUDA] * engine.stats.frame_steps and engine.stats.frame_steps >= 1
