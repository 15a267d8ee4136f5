"""Identity byte tokenizer for vocab-256 byte-level models (e.g. rwkv.cpp's tiny test models).

Token id b is byte b: '"' = 34, 'i' = 105, 'n' = 110. There is no end-of-text token: id 0 is the NUL byte.
"""
from __future__ import annotations

from rwkv_lite.tokenizer.common import check_ids, utf8_encode


class ByteTokenizer:
    kind = "bytes"
    vocab_size = 256
    eot_id = None   # id 0 is the byte 0x00, not end-of-text

    def encode(self, text: str) -> list[int]:
        """UTF-8 bytes of `text` as ids; a lone surrogate raises ValueError (as the World tokenizer does)."""
        return list(utf8_encode(text))

    def decode_bytes(self, ids) -> bytes:
        return bytes(check_ids(ids, 256, "byte vocabulary"))

    def decode(self, ids) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def to_bytes(self) -> bytes:
        """Nothing to store: the vocabulary is implied."""
        return b""
