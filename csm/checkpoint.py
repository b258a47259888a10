"""Which CSM checkpoint to run, resolved the same way for every caller (`csm-demo`, the generator
deployment, the local services): a path given, else its environment variable (`MODEL_PATH`,
`TOKENIZER_PATH`), checked to exist; the tokenizer that goes with the weights; or, with nothing given, a
random preset and a loud warning, because the audio it makes is noise.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from csm.loading import LoadedModel, load_model, random_model
from csm.tokenizer import ByteTokenizer, TextTokenizer, load_tokenizer

log = logging.getLogger(__name__)

__all__ = ["RANDOM_WARNING", "load_checkpoint", "resolve_path"]

RANDOM_WARNING = "random weights: no MODEL_PATH given, the audio is noise"


def resolve_path(given: str | None, env: str) -> str | None:
    """`given`, else `$env`, else None; FileNotFoundError naming the variable for a path that is not there."""
    value = given or os.environ.get(env) or None
    if value is not None and not Path(value).exists():
        raise FileNotFoundError(f"{env}={value}: no such file or directory")
    return value


def load_checkpoint(
    model_path: str | None,
    tokenizer_path: str | None,
    preset: str,
    dtype: torch.dtype,
    device: str | torch.device,
) -> tuple[LoadedModel, TextTokenizer]:
    """The model and its text tokenizer. ValueError for a Sesame-format checkpoint without a tokenizer
    (the transformers format ships tokenizer.json beside the weights; the Sesame format does not)."""
    path = resolve_path(model_path, "MODEL_PATH")
    if path is None:
        log.warning("CSM: %s (preset %r)", RANDOM_WARNING.upper(), preset)
        return random_model(preset, dtype=dtype, device=device), ByteTokenizer()
    loaded = load_model(path, dtype=dtype, device=device)
    tokenizer = resolve_path(tokenizer_path, "TOKENIZER_PATH") or (path if loaded.format == "hf" else None)
    if tokenizer is None:
        raise ValueError(
            f"{path} is a Sesame-format checkpoint: it needs TOKENIZER_PATH "
            "(a Llama-3 tokenizer.json or its folder)"
        )
    log.info("CSM: loaded %s (%s format, %s)", path, loaded.format, dtype)
    return loaded, load_tokenizer(tokenizer)
