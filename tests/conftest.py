from __future__ import annotations

import pytest
import torch
from transformers.utils import logging as hf_logging

from csm.loading import load_model
from csm.presets import preset
from tests.checkpoints import hf_csm

hf_logging.set_verbosity_error()
torch.set_num_threads(2)


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
