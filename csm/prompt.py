"""Prompts: segments (speaker, text, audio codes) to 33-wide rows, exactly as the reference builds them,
and the context policy that keeps the newest whole segments that fit.

A segment is its text rows (`[{speaker}]{text}` wrapped in BOS/EOS, one token per row in the text column)
then its audio rows (32 codes each) then one all-zero EOS audio row. The prompt is the context segments
followed by the text rows of the utterance to speak.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from csm.presets import ModelArgs
from csm.tokenizer import TextTokenizer


@dataclass(frozen=True)
class Segment:
    speaker: int
    text: str
    # [frames, num_codebooks] audio codes (a tensor, or an integer array), or None for a text-only segment
    codes: Tensor | np.ndarray | None = None


# Rows of segments a builder keeps by default: eight full contexts. A row costs 297 bytes (33 int64 tokens
# and 33 mask bytes), so 4.9 MB; a spoken turn's segment is ~110 rows (32 KB). A cap counted in segments
# (2,048) let a generator replica grow by 57 KB a turn for ~1,000 turns under the soak before the cap
# held (bench/RESULTS.md, "Soak"). The generator sizes its own: every slot's whole context.
CACHE_ROWS = 8 * 2048


def _content_key(segment: Segment) -> bytes | None:
    """A digest of what the segment's rows depend on; None for input too odd to key (it is then checked
    and converted as always, never cached)."""
    codes = segment.codes
    if isinstance(codes, Tensor):
        if codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
            return None  # (bfloat16 has no numpy type): `audio_rows` names the problem
        codes = codes.detach().cpu().numpy()
    if not isinstance(segment.text, str) or type(segment.speaker) is not int:
        return None
    if codes is not None and not (isinstance(codes, np.ndarray) and np.issubdtype(codes.dtype, np.integer)):
        return None
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{segment.speaker}\x00{segment.text}\x00".encode())
    if codes is not None:
        h.update(str(codes.shape).encode())
        h.update(np.ascontiguousarray(codes, dtype=np.int64).tobytes())
    return h.digest()


@dataclass(frozen=True)
class Prompt:
    tokens: Tensor  # [T, num_codebooks + 1] long
    mask: Tensor  # [T, num_codebooks + 1] bool
    n_context: int  # how many context segments made it in
    pinned_rows: int = 0  # leading rows of the pinned segments (a voice's reference), kept in every cut

    def __len__(self) -> int:
        return self.tokens.shape[0]


class PromptBuilder:
    def __init__(
        self, tokenizer: TextTokenizer, args: ModelArgs, num_speakers: int = 16, cache_rows: int = CACHE_ROWS
    ) -> None:
        """`cache_rows`: rows of recently used segments kept (`segment_rows`); 0 keeps none."""
        if tokenizer.vocab_size > args.text_vocab_size:
            raise ValueError(
                f"tokenizer vocabulary ({tokenizer.vocab_size}) exceeds the model's ({args.text_vocab_size})"
            )
        self.tokenizer = tokenizer
        self.args = args
        self.num_speakers = num_speakers
        self._width = args.num_codebooks + 1
        self._rows: OrderedDict[bytes, tuple[Tensor, Tensor]] = OrderedDict()
        self.cache_rows = cache_rows
        self.cached_rows = 0  # rows held in `_rows`

    def _check_speaker(self, speaker: object) -> int:
        if isinstance(speaker, bool) or not isinstance(speaker, int) or not 0 <= speaker < self.num_speakers:
            raise ValueError(f"unknown speaker {speaker!r}: speakers are integers 0..{self.num_speakers - 1}")
        return speaker

    def text_rows(self, speaker: int, text: str) -> tuple[Tensor, Tensor]:
        self._check_speaker(speaker)
        if not isinstance(text, str) or not text.strip():
            raise ValueError("text is empty")
        ids = self.tokenizer.encode(f"[{speaker}]{text}")
        tokens = torch.zeros(len(ids), self._width, dtype=torch.long)
        mask = torch.zeros(len(ids), self._width, dtype=torch.bool)
        tokens[:, -1] = torch.tensor(ids, dtype=torch.long)
        mask[:, -1] = True
        return tokens, mask

    def audio_rows(self, codes: Tensor) -> tuple[Tensor, Tensor]:
        n = self.args.num_codebooks
        if isinstance(codes, np.ndarray):  # how segments travel between replicas: 25x cheaper to send
            if not np.issubdtype(codes.dtype, np.integer):
                raise ValueError(f"audio codes must be integers, got {codes.dtype}")
            codes = torch.from_numpy(np.array(codes, dtype=np.int64))
        if not isinstance(codes, Tensor):
            raise ValueError(f"audio codes must be a tensor or an array, got {type(codes).__name__}")
        if codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
            raise ValueError(f"audio codes must be integers, got {codes.dtype}")
        if codes.ndim != 2 or codes.shape[1] != n:
            raise ValueError(f"audio codes must be [frames, {n}], got {list(codes.shape)}")
        # The model's audio vocabulary, not just Mimi's codes: a reply's frames go back into the context
        # exactly as the engine fed them, ids past Mimi's codes included, so the rows stay a cached prefix.
        vocab = self.args.audio_vocab_size
        if codes.numel() and (codes.min() < 0 or codes.max() >= vocab):
            bad = codes[(codes < 0) | (codes >= vocab)][0].item()
            raise ValueError(f"audio code {bad} out of range [0, {vocab})")
        frames = codes.shape[0]
        tokens = torch.zeros(frames + 1, self._width, dtype=torch.long)  # + the all-zero EOS frame
        mask = torch.zeros(frames + 1, self._width, dtype=torch.bool)
        tokens[:frames, :n] = codes.to(torch.long).cpu()
        mask[:, :n] = True
        return tokens, mask

    def segment_rows(self, segment: Segment) -> tuple[Tensor, Tensor]:
        """The segment's rows, made once: a conversation sends the same segments with every sentence,
        so rows are kept by the segment's content (speaker, text, codes), least recently used dropped once
        more than `cache_rows` rows are kept."""
        key = _content_key(segment)
        rows = self._rows.get(key) if key is not None else None
        if rows is not None:
            self._rows.move_to_end(key)
            return rows
        tokens, mask = self.text_rows(segment.speaker, segment.text)
        if segment.codes is not None:
            at, am = self.audio_rows(segment.codes)
            tokens, mask = torch.cat([tokens, at]), torch.cat([mask, am])
        if key is not None and tokens.shape[0] <= self.cache_rows:
            self._rows[key] = (tokens, mask)
            self.cached_rows += tokens.shape[0]
            while self.cached_rows > self.cache_rows:
                _, (old, _) = self._rows.popitem(last=False)
                self.cached_rows -= old.shape[0]
        return tokens, mask

    def build(
        self,
        context: Sequence[Segment],
        speaker: int,
        text: str,
        max_frames: int,
        keep_first: int = 0,
    ) -> Prompt:
        """The prompt for speaking `text` as `speaker` after `context`, leaving room for `max_frames`.

        Keeps the first `keep_first` segments (a voice's reference) when they fit, then the newest whole
        segments that fit; older ones are dropped. A long conversation never raises; bad input does.

        Old segments go in large steps (see `first_kept`), so the prompts of a growing conversation keep
        their leading rows, which the engine holds, for many turns between cuts.
        """
        if max_frames < 1:
            raise ValueError(f"max_frames must be >= 1, got {max_frames}")
        tail_tokens, tail_mask = self.text_rows(speaker, text)
        room = self.args.max_seq_len - max_frames - tail_tokens.shape[0]
        if room < 0:
            raise ValueError(
                f"text is too long: {tail_tokens.shape[0]} rows + {max_frames} reply frames exceed the "
                f"model's {self.args.max_seq_len} positions"
            )
        rows = [self.segment_rows(s) for s in context]  # validates every segment, kept or not
        pinned = min(keep_first, len(rows))
        pinned_len = sum(r[0].shape[0] for r in rows[:pinned])
        if pinned_len > room:
            pinned, pinned_len = 0, 0
        lengths = [r[0].shape[0] for r in rows[pinned:]]
        start = first_kept(lengths, self.args.max_seq_len - REPLY_RESERVE - pinned_len)
        budget = room - pinned_len
        while sum(lengths[start:]) > budget:  # this request needs more room than the reserve: cut more
            start += 1
        kept = rows[:pinned] + rows[pinned + start :]
        tokens = torch.cat([r[0] for r in kept] + [tail_tokens])
        mask = torch.cat([r[1] for r in kept] + [tail_mask])
        return Prompt(tokens=tokens, mask=mask, n_context=len(kept), pinned_rows=pinned_len)


# Rows the context leaves for a reply's text and frames when it is cut (30 s of audio is 375 frames).
REPLY_RESERVE = 512


def first_kept(lengths: Sequence[int], budget: int) -> int:
    """Index of the oldest segment kept of segments with these row counts (oldest first) under `budget`.

    It replays the conversation's growth one segment at a time: the context is cut only when it overflows,
    and then down to half the budget. So a cut happens once per half a budget of new rows, not on every
    turn, and since it is a function of the segments alone, every replica cuts at the same place.
    """
    start, total = 0, 0
    for i, n in enumerate(lengths):
        total += n
        if total > budget:
            while start <= i and total > budget // 2:
                total -= lengths[start]
                start += 1
    return start
