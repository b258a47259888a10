"""Text tokenizers. Every encode is wrapped in BOS ... EOS, as the reference's Llama-3 post-processor does."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from tokenizers import Tokenizer


class TextTokenizer(Protocol):
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...


class ByteTokenizer:
    """UTF-8 bytes as ids 0-255, BOS 256, EOS 257. Needs no files; used by the `tiny` and `small` presets."""

    bos_id, eos_id = 256, 257
    vocab_size = 258

    def encode(self, text: str) -> list[int]:
        return [self.bos_id, *text.encode("utf-8"), self.eos_id]


class Llama3Tokenizer:
    """The Llama-3 tokenizer from a `tokenizer.json` (the `tokenizers` library)."""

    BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"

    def __init__(self, path: str | Path) -> None:
        self._tok = Tokenizer.from_file(str(path))
        bos, eos = self._tok.token_to_id(self.BOS), self._tok.token_to_id(self.EOS)
        if bos is None or eos is None:
            raise ValueError(
                f"{path}: tokenizer has no {self.BOS} / {self.EOS} tokens; not a Llama-3 tokenizer"
            )
        self.bos_id, self.eos_id = bos, eos
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return [self.bos_id, *self._tok.encode(text, add_special_tokens=False).ids, self.eos_id]


def load_tokenizer(path: str | Path | None) -> TextTokenizer:
    """`path`: a tokenizer.json file, a directory holding one, or None for the byte tokenizer."""
    if path is None:
        return ByteTokenizer()
    p = Path(path)
    if p.is_dir():
        p = p / "tokenizer.json"
    if not p.is_file():
        raise FileNotFoundError(f"no tokenizer.json at {path}")
    return Llama3Tokenizer(p)
