"""Voices: a voice is a short reference utterance (text + audio) put first in the reply's context as the
assistant's speaker, so the same voice comes back every turn.

`VOICES_DIR` holds `<name>.wav` (any rate, mono or stereo, 16-bit) and `<name>.txt` (its transcript).
Each voice is encoded once per ingress replica, on first use, through the `AudioTokenizer` deployment.
The voice `none` (no reference) is always there: CSM then picks a voice of its own each reply.
"""

from __future__ import annotations

import asyncio
import logging
import re
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from csm.audio import SAMPLE_RATE, float_to_pcm16, read_wav, to_mimi_rate

if TYPE_CHECKING:  # a handle's calls need no import: a conversation without Ray imports this too
    from ray.serve.handle import DeploymentHandle

log = logging.getLogger(__name__)

NO_VOICE = "none"
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
MAX_VOICE_SECONDS = 30.0


@dataclass
class Voice:
    name: str
    text: str
    codes: np.ndarray  # [frames, 32] int16


class VoiceLibrary:
    def __init__(self, directory: str | None, tokenizer: DeploymentHandle | None) -> None:
        """`tokenizer`: the `AudioTokenizer` deployment that encodes each voice; None for no voices but
        `none` (a conversation in one process, `serve_app.local_services`)."""
        self.directory = Path(directory) if directory else None
        self._tokenizer = tokenizer
        self._cache: dict[str, Voice] = {}
        self._lock = asyncio.Lock()

    def names(self) -> list[str]:
        found = []
        if self.directory is not None and self.directory.is_dir():
            for wav in sorted(self.directory.glob("*.wav")):
                if _NAME.match(wav.stem) and wav.with_suffix(".txt").is_file():
                    found.append(wav.stem)
        return [NO_VOICE, *found]

    def exists(self, name: str) -> bool:
        return name in self.names()

    async def get(self, name: str) -> Voice | None:
        """The voice's reference segment; None for `none`. ValueError for an unknown or unreadable voice."""
        if name == NO_VOICE:
            return None
        if name not in self.names():
            raise ValueError(f"unknown voice {name!r}; known: {self.names()}")
        async with self._lock:
            if name not in self._cache:
                self._cache[name] = await self._encode(name)
        return self._cache[name]

    async def _encode(self, name: str) -> Voice:
        assert self.directory is not None and self._tokenizer is not None
        wav = self.directory / f"{name}.wav"
        text = (self.directory / f"{name}.txt").read_text(encoding="utf-8").strip()
        if not text:
            raise ValueError(f"voice {name!r}: {name}.txt is empty")
        audio, rate = await asyncio.to_thread(read_wav, wav)
        audio = to_mimi_rate(audio, rate)
        if audio.shape[-1] > MAX_VOICE_SECONDS * SAMPLE_RATE:
            raise ValueError(f"voice {name!r}: reference audio longer than {MAX_VOICE_SECONDS:.0f} s")
        pcm = np.frombuffer(float_to_pcm16(audio.reshape(-1).to(torch.float32)), dtype=np.int16)
        handle = self._tokenizer.options(multiplexed_model_id=f"voice_{uuid.uuid4().hex}")
        codes = await handle.encode.remote(0, pcm, True)
        log.info("voice %s: %d frames of reference audio", name, codes.shape[0])
        return Voice(name, text, codes)
