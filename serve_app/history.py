"""Conversation history on disk: every finished turn appended to one JSON-lines file per conversation.

`HISTORY_DIR` is a local folder by default and EFS in production, so any ingress replica (and a restarted
one) can resume a conversation by id. Appends are single `write` calls of one line each, so a crash loses
at most the line being written, and a torn last line is skipped on load with a warning.

Ownership: the server makes every conversation id (`create`: 128 random bits) and writes its principal as
the file's first line; `open` gives the history back only to that principal, and says the same thing for
an id that does not exist and one that is someone else's (`ConversationNotFound`), so a refusal tells
nothing. A live conversation's connection holds a lease file (`<id>.live`, naming it): a newer connection
of the owner takes the lease over, and the older one, on whatever replica, sees that within `LEASE_S / 3`
and closes, so a conversation has one live connection.

Bounds: `open` keeps the last `max_turns` turns in memory; a file over `max_bytes` is compacted to its
last turns (rewritten whole, then renamed over the old one); a conversation untouched for `retention_s`
is deleted (by `sweep`, and when someone tries to open it).
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import logging
import os
import re
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

log = logging.getLogger(__name__)

CONVERSATION_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
LEASE_S = 15.0  # a connection checks that it still holds its conversation's lease every LEASE_S / 3


class ConversationNotFound(LookupError):
    """No conversation with that id is this principal's: it does not exist, expired, or is another's."""


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
    if not isinstance(conversation_id, str) or not CONVERSATION_ID.fullmatch(conversation_id):
        raise ValueError("conversation id must be 1-64 characters of A-Z, a-z, 0-9, '_' or '-'")
    return conversation_id


class HistoryStore:
    def __init__(
        self,
        directory: str | Path,
        max_turns: int = 200,
        max_bytes: int = 64 << 20,
        retention_s: float | None = 30 * 86400,
    ) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.max_turns = max_turns
        self.max_bytes = max_bytes
        self.retention_s = retention_s

    def _path(self, conversation_id: str, suffix: str = ".jsonl") -> Path:
        return self.directory / f"{check_conversation_id(conversation_id)}{suffix}"

    # ---- ownership --------------------------------------------------------------------------------
    async def create(self, principal: str) -> str:
        """A new conversation of `principal`'s, with an id nobody can guess."""
        return await asyncio.to_thread(self._create, principal)

    def _create(self, principal: str) -> str:
        while True:
            conversation_id = f"conv_{secrets.token_hex(16)}"
            record = {"kind": "owner", "principal": principal, "at": time.time()}
            try:  # O_EXCL: an id is never handed out twice, even by two replicas at once
                fd = os.open(self._path(conversation_id), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                continue
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(json.dumps(record, separators=(",", ":")) + "\n")
            return conversation_id

    async def open(self, conversation_id: str, principal: str) -> list[Turn]:
        """The last `max_turns` turns of `principal`'s conversation, or ConversationNotFound."""
        return await asyncio.to_thread(self._open, conversation_id, principal)

    def _open(self, conversation_id: str, principal: str) -> list[Turn]:
        try:
            path = self._path(conversation_id)
        except ValueError:
            raise ConversationNotFound(conversation_id) from None
        if not path.exists() or self._expired(path):
            if path.exists():
                self._delete(conversation_id)
            raise ConversationNotFound(conversation_id)
        owner, turns = self._read(path)
        if owner is None or not hmac.compare_digest(owner.encode(), principal.encode()):
            raise ConversationNotFound(conversation_id)
        return turns

    # ---- the live lease ---------------------------------------------------------------------------
    async def claim(self, conversation_id: str, holder: str) -> None:
        """Make `holder` the conversation's one live connection. A connection that held it notices at
        its next `holds` check (every LEASE_S / 3) and closes: the newest connection takes over."""
        await asyncio.to_thread(self._claim, conversation_id, holder)

    def _claim(self, conversation_id: str, holder: str) -> None:
        path = self._path(conversation_id, ".live")
        tmp = path.with_suffix(f".live.{holder}")
        tmp.write_text(holder, encoding="utf-8")
        os.replace(tmp, path)  # atomic: every replica reads one holder or the other

    async def holds(self, conversation_id: str, holder: str) -> bool:
        """Whether `holder` still holds the lease (renewing it if so)."""
        return await asyncio.to_thread(self._holds, conversation_id, holder)

    def _holds(self, conversation_id: str, holder: str) -> bool:
        path = self._path(conversation_id, ".live")
        try:
            if path.read_text(encoding="utf-8") != holder:
                return False
            os.utime(path)
            return True
        except FileNotFoundError:
            return False

    async def release(self, conversation_id: str, holder: str) -> None:
        await asyncio.to_thread(self._release, conversation_id, holder)

    def _release(self, conversation_id: str, holder: str) -> None:
        path = self._path(conversation_id, ".live")
        try:
            if path.read_text(encoding="utf-8") == holder:  # never another connection's lease
                path.unlink()
        except FileNotFoundError:
            pass

    # ---- turns ------------------------------------------------------------------------------------
    async def append(self, conversation_id: str, turn: Turn) -> None:
        await asyncio.to_thread(self._write, conversation_id, turn.to_json())

    async def truncate(self, conversation_id: str, item_id: str, frames: int) -> None:
        """Record that an assistant turn was heard only up to `frames` (a barge-in)."""
        record = {"kind": "truncate", "item_id": item_id, "frames": frames, "at": time.time()}
        await asyncio.to_thread(self._write, conversation_id, record)

    def _write(self, conversation_id: str, record: dict) -> None:
        line = json.dumps(record, separators=(",", ":")) + "\n"
        path = self._path(conversation_id)
        with open(path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            size = f.tell()
        if size > self.max_bytes:
            self._compact(path)

    def _compact(self, path: Path) -> None:
        """Rewrite the file as its owner and its last turns (truncations applied), under `max_bytes`."""
        owner, turns = self._read(path)
        lines = [json.dumps({"kind": "owner", "principal": owner, "at": time.time()}) + "\n"]
        body = [json.dumps(t.to_json(), separators=(",", ":")) + "\n" for t in turns]
        while body and sum(map(len, lines + body)) > self.max_bytes // 2:  # room to grow again
            body.pop(0)
        tmp = path.with_suffix(".compact")
        tmp.write_text("".join(lines + body), encoding="utf-8")
        os.replace(tmp, path)  # atomic: a reader sees the old file or the new one
        log.info("history %s compacted to %d turns", path.name, len(body))

    def _read(self, path: Path) -> tuple[str | None, list[Turn]]:
        owner: str | None = None
        turns: OrderedDict[str, Turn] = OrderedDict()
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                try:
                    record = json.loads(line)
                    if record["kind"] == "owner" and number == 1:
                        owner = str(record["principal"])
                    elif record["kind"] == "turn":
                        turn = Turn.from_json(record)
                        turns.pop(turn.item_id, None)  # ids are the server's: a repeat is a rewrite
                        turns[turn.item_id] = turn
                        if len(turns) > self.max_turns:
                            turns.popitem(last=False)
                    elif record["kind"] == "truncate" and record["item_id"] in turns:
                        turns[record["item_id"]].truncate(int(record["frames"]))
                except (ValueError, KeyError, TypeError) as e:
                    log.warning("history %s line %d unreadable, skipped: %s", path, number, e)
        return owner, list(turns.values())

    # ---- retention --------------------------------------------------------------------------------
    def _expired(self, path: Path) -> bool:
        return self.retention_s is not None and time.time() - _mtime(path) > self.retention_s

    def _delete(self, conversation_id: str) -> None:
        for suffix in (".jsonl", ".live"):
            self._path(conversation_id, suffix).unlink(missing_ok=True)

    async def sweep(self) -> int:
        """Delete every conversation untouched for `retention_s`; how many went."""
        return await asyncio.to_thread(self._sweep)

    def _sweep(self) -> int:
        gone = 0
        for path in self.directory.glob("*.jsonl"):
            if self._expired(path):
                self._delete(path.stem)
                gone += 1
        return gone


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return 0.0
