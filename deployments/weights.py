"""Which weights a replica runs: a checkpoint named by the config or the environment, or random presets.

Both model deployments resolve paths the same way (`csm.checkpoint`), so `/readyz` and the logs can say
exactly what runs: `MODEL_PATH` (either checkpoint format), `TOKENIZER_PATH` (needed for the Sesame
format), `MIMI_PATH` (the codec; an HF-format CSM checkpoint carries its own). Nothing given: the random
`tiny` presets, and a loud warning, because the audio they make is noise.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from csm.checkpoint import RANDOM_WARNING, load_checkpoint, resolve_path
from csm.codec import MimiCodec, load_codec, random_codec
from csm.loading import dtype_for, parse_dtype
from csm.model import CSM
from csm.tokenizer import TextTokenizer

log = logging.getLogger(__name__)

# RANDOM_WARNING is also what `/readyz` says (serve_app.ingress imports it from here).
__all__ = [
    "RANDOM_WARNING",
    "LoadedWeights",
    "load_csm",
    "load_mimi",
    "pick_device",
    "pick_dtype",
    "set_torch_threads",
]


@dataclass(frozen=True)
class LoadedWeights:
    description: str  # the directory, or "random <preset>"
    random: bool


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """The named dtype; for "auto", `csm.loading.dtype_for` the device (bf16 from sm_80, fp16 below it,
    fp32 off CUDA)."""
    if name == "auto":
        return dtype_for(torch.cuda.get_device_capability(device) if device.type == "cuda" else None)
    return parse_dtype(name)


def set_torch_threads(threads: int | None) -> None:
    """Replicas share a machine's cores: an unpinned torch uses them all and every replica slows down."""
    n = threads or int(os.environ.get("CSM_TORCH_THREADS", "1"))
    torch.set_num_threads(max(n, 1))


def load_csm(
    model_path: str | None, tokenizer_path: str | None, preset: str, device: torch.device, dtype: torch.dtype
) -> tuple[CSM, TextTokenizer, LoadedWeights]:
    loaded, tokenizer = load_checkpoint(model_path, tokenizer_path, preset, dtype, device)
    return loaded.model, tokenizer, LoadedWeights(loaded.source, random=loaded.format == "random")


def load_mimi(
    mimi_path: str | None, model_path: str | None, preset: str, device: torch.device
) -> tuple[MimiCodec, LoadedWeights]:
    """The codec runs in fp32: its decode is the last step before the ear, and it is cheap."""
    path = resolve_path(mimi_path, "MIMI_PATH") or resolve_path(model_path, "MODEL_PATH")
    if path is not None and (Path(path) / "config.json").is_file():
        try:
            codec = load_codec(path, device=device)
            log.info("Mimi: loaded %s", path)
            return codec, LoadedWeights(path, random=False)
        except ValueError as e:
            if mimi_path or os.environ.get("MIMI_PATH"):
                raise
            # A Sesame-format MODEL_PATH holds no codec; only an explicit MIMI_PATH must load.
            log.warning("Mimi: %s has no codec (%s)", path, e)
    log.warning("Mimi: %s (preset %r)", RANDOM_WARNING.upper(), preset)
    return random_codec(preset, device=device), LoadedWeights(f"random {preset}", random=True)
