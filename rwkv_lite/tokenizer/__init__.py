"""Tokenizers: text <-> token ids, with one interface for the three kinds RWKV models use.

    kind      class            vocabulary                                        end-of-text
    'world'   WorldTokenizer   rwkv_vocab_v20230424.txt (World models)           id 0 (decodes to "")
    'hf'      HFTokenizer      byte-level tokenizer.json (GPT-NeoX 20B: Pile)    special tokens decode to ""
    'bytes'   ByteTokenizer    none: id = byte value (vocab-256 models)          none (id 0 is the NUL byte)

A model file stores ``(t.kind, t.to_bytes())``; ``tokenizer_from_embedded`` rebuilds the tokenizer from it.

Text that has no UTF-8 encoding (a lone surrogate such as "\\ud800") is refused by every ``encode`` with a
ValueError, matching the reference World tokenizer, whose ``str.encode("utf-8")`` raises. ``decode`` replaces each
invalid UTF-8 sequence with one U+FFFD (``errors="replace"``); for streaming, feed ids to a StreamDecoder, which
holds back an incomplete character until the next token completes it.
"""
from __future__ import annotations

import builtins
import codecs
import os
from typing import Protocol, runtime_checkable

from rwkv_lite.errors import FormatError
from rwkv_lite.tokenizer.bytes import ByteTokenizer
from rwkv_lite.tokenizer.hf import HFTokenizer
from rwkv_lite.tokenizer.world import WorldTokenizer

# Note: importing the submodule `bytes` binds the name `bytes` in this package's namespace to that module, so
# this file spells the built-in type as builtins.bytes.

__all__ = ["Tokenizer", "WorldTokenizer", "HFTokenizer", "ByteTokenizer", "StreamDecoder",
           "tokenizer_from_file", "tokenizer_from_embedded"]

KINDS = ("world", "hf", "bytes")


@runtime_checkable
class Tokenizer(Protocol):
    kind: str          # 'world' | 'hf' | 'bytes'
    vocab_size: int    # ids are 0 .. vocab_size-1 (World: 65530, id 0 being end-of-text)
    eot_id: int | None  # end-of-text id, or None (bytes)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`. ValueError if `text` holds a lone surrogate."""

    def decode(self, ids) -> str:
        """Text of the ids; each invalid UTF-8 sequence becomes one U+FFFD; end-of-text decodes to ""."""

    def decode_bytes(self, ids) -> builtins.bytes:
        """Raw bytes of the ids (for streaming). ValueError for an id outside the vocabulary."""

    def to_bytes(self) -> builtins.bytes:
        """Serialized vocabulary to embed in a model file (World vocab text, tokenizer.json, or b"")."""


def tokenizer_from_file(path) -> Tokenizer:
    """Load a World vocabulary (``*.txt``) or a Hugging Face ``tokenizer.json`` (``*.json``)."""
    path = os.fspath(path)
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in (".txt", ".json"):
        raise FormatError(f"{path}: unknown tokenizer file type (expected a World vocabulary .txt or a "
                          "Hugging Face tokenizer .json)")
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as err:
        raise FormatError(f"{path}: cannot read tokenizer file ({err.strerror})") from None
    if suffix == ".txt":
        return WorldTokenizer(data, name=path)
    return HFTokenizer(data, name=path)


def tokenizer_from_embedded(kind: str, data: builtins.bytes) -> Tokenizer:
    """Inverse of ``(t.kind, t.to_bytes())``: rebuild a tokenizer stored inside a model file."""
    if kind == "world":
        return WorldTokenizer(data, name="<embedded World vocabulary>")
    if kind == "hf":
        return HFTokenizer(data, name="<embedded tokenizer.json>")
    if kind == "bytes":
        if data:
            raise FormatError(f"<embedded byte tokenizer>: expected no data, found {len(data)} bytes")
        return ByteTokenizer()
    raise FormatError(f"<embedded tokenizer>: unknown tokenizer kind {kind!r} (expected one of {', '.join(KINDS)})")


class StreamDecoder:
    """UTF-8-safe incremental decoding for generation: push ids one at a time, print what comes back.

    A character split across tokens (e.g. an emoji as [3319, 153, 129]) is held back until complete, so
    push() never returns a U+FFFD that a later token could still turn into a character. Invariant:
    ``"".join(push(i) for i in ids) + flush() == tokenizer.decode(ids)``.
    """

    def __init__(self, tokenizer: Tokenizer):
        self._tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        """Text completed by this token (may be "")."""
        return self._utf8.decode(self._tokenizer.decode_bytes([token_id]))

    def flush(self) -> str:
        """End of stream: whatever is held back (an incomplete sequence becomes U+FFFD); then start afresh."""
        text = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return text
