"""Conversation history on disk: every finished turn appended to one JSON-lines file per conversation.

`HISTORY_DIR` is a local folder by default and EFS in production, so any ingress replica (and a restarted
one) can resume a conversation by id. Appends are single `write` calls of one line each, so a crash loses
at most the line being written, and a torn last line is skipped on load with a warning.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

log = logging.getLogger(__name__)

CONVERSATION_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


@dataclass
class Turn:
    """One finished turn. `codes` ([frames, 32] int16) is what CSM hears as this turn's audio: the person's
    encoded speech, or the assistant's generated frames (trimmed to what the person heard after a
    barge-in). A typed turn has no codes. An assistant turn also keeps where each spoken sentence's
    frames end (`sentences`: text and frame count), since each sentence is its own segment of CSM's
    context: that is how it was generated, so the context stays a prefix of what the engine holds."""

    item_id: str
    role: Literal["user", "assistant"]
    text: str
    codes: np.ndarray | None = None
    started_at: float = field(default_factory=time.time)
    ended_at: float = field(default_factory=time.time)
    sentences: list[tuple[str, int]] | None = None

    @property
    def frames(self) -> int:
        return 0 if self.codes is None else int(self.codes.shape[0])

    def truncate(self, frames: int) -> None:
        """Keep the first `frames` frames (what was heard), and the sentences they belong to."""
        if self.codes is None:
            return
        self.codes = self.codes[: max(frames, 0)]
        if self.sentences is not None:
            kept, start = [], 0
            for text, n in self.sentences:
                if start >= self.frames and kept:
                    break
                kept.append((text, min(n, self.frames - start)))
                start += n
            self.sentences = kept

    def parts(self) -> list[tuple[str, np.ndarray | None]]:
        """The turn as context segments: (text, codes or None), one per sentence for a reply."""
        if self.sentences is None:
            return [(self.text, self.codes if self.frames else None)]
        return sentence_parts(self.sentences, self.codes)

    def to_json(self) -> dict:
        codes = None if self.codes is None else base64.b64encode(self.codes.astype("<i2").tobytes()).decode()
        record = {
            "kind": "turn",
            "item_id": self.item_id,
            "role": self.role,
            "text": self.text,
            "frames": self.frames,
            "codes": codes,
            "started_at": self.started_at,
            "ended_at": self.ended_at,
        }
        if self.sentences is not None:
            record["sentences"] = [[text, n] for text, n in self.sentences]
        return record

    @classmethod
    def from_json(cls, d: dict) -> Turn:
        codes = None
        if d.get("codes") is not None:
            codes = np.frombuffer(base64.b64decode(d["codes"]), dtype="<i2").reshape(int(d["frames"]), 32)
        sentences = d.get("sentences")
        if sentences is not None:
            sentences = [(str(text), int(n)) for text, n in sentences]
        return cls(d["item_id"], d["role"], d["text"], codes, d["started_at"], d["ended_at"], sentences)


def sentence_parts(
    sentences: list[tuple[str, int]], codes: np.ndarray | None
) -> list[tuple[str, np.ndarray | None]]:
    """A reply's sentences (text, frame count) with their slices of its frames ([frames, 32], or None)."""
    out, start = [], 0
    for text, n in sentences:
        out.append((text, None if codes is None or n == 0 else codes[start : start + n]))
        start += n
    return out


def check_conversation_id(conversation_id: str) -> str:
    if not isinstance(conversation_id, str) or not CONVERSATION_ID.match(conversation_id):
        raise ValueError("conversation id must be 1-64 characters of A-Z, a-z, 0-9, '_' or '-'")
    return conversation_id


class HistoryStore:
    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)

    def _path(self, conversation_id: str) -> Path:
        return self.directory / f"{check_conversation_id(conversation_id)}.jsonl"

    async def append(self, conversation_id: str, turn: Turn) -> None:
        await asyncio.to_thread(self._write, conversation_id, turn.to_json())

    async def truncate(self, conversation_id: str, item_id: str, frames: int) -> None:
        """Record that an assistant turn was heard only up to `frames` (a barge-in)."""
        record = {"kind": "truncate", "item_id": item_id, "frames": frames, "at": time.time()}
        await asyncio.to_thread(self._write, conversation_id, record)

    def _write(self, conversation_id: str, record: dict) -> None:
        line = json.dumps(record, separators=(",", ":")) + "\n"
        with open(self._path(conversation_id), "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()

    async def load(self, conversation_id: str) -> list[Turn]:
        return await asyncio.to_thread(self._read, conversation_id)

    def _read(self, conversation_id: str) -> list[Turn]:
        path = self._path(conversation_id)
        if not path.exists():
            return []
        turns: dict[str, Turn] = {}
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                try:
                    record = json.loads(line)
                    if record["kind"] == "turn":
                        turn = Turn.from_json(record)
                        turns[turn.item_id] = turn
                    elif record["kind"] == "truncate" and record["item_id"] in turns:
                        turns[record["item_id"]].truncate(int(record["frames"]))
                except (ValueError, KeyError, TypeError) as e:
                    log.warning("history %s line %d unreadable, skipped: %s", path, number, e)
        return list(turns.values())
