"""Hugging Face ``tokenizer.json`` (via the `tokenizers` library), e.g. GPT-NeoX 20B for the RWKV-4 Pile models.

Encoding is the library's ``encode(text).ids``, as the reference PIPELINE calls it (so "<|endoftext|>" written in
the text becomes the special token, unlike the World tokenizer). Decoding is done here from a per-id byte table so
that raw bytes are available for streaming. Only byte-level tokenizers (``"decoder": {"type": "ByteLevel"}``)
are supported: for them each token maps to definite bytes. The table reproduces the library's ByteLevel decoder:
a token whose characters are all in the GPT-2 byte alphabet becomes those bytes, any other token its own UTF-8;
special tokens (e.g. <|endoftext|> = 0, <|padding|>) decode to nothing, as with the library's default
``decode(ids, skip_special_tokens=True)``.
"""
from __future__ import annotations

import os

import tokenizers

from rwkv_lite.errors import FormatError
from rwkv_lite.tokenizer.common import check_ids, utf8_encode


class HFTokenizer:
    kind = "hf"

    def __init__(self, tokenizer_json: bytes, name: str = "<tokenizer.json>"):
        self._json = bytes(tokenizer_json)
        try:
            self._tok = tokenizers.Tokenizer.from_str(self._json.decode("utf-8"))
        except Exception as err:   # the library raises plain Exception subclasses with multi-line messages
            first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise FormatError(f"{name}: not a valid Hugging Face tokenizer.json ({first_line})") from None
        if not isinstance(self._tok.decoder, tokenizers.decoders.ByteLevel):
            found = type(self._tok.decoder).__name__ if self._tok.decoder is not None else "none"
            raise FormatError(f"{name}: tokenizer decoder is {found}; only byte-level (ByteLevel) tokenizers "
                              "such as GPT-NeoX 20B are supported")
        self._pieces = _token_bytes_table(self._tok)
        self.vocab_size = len(self._pieces)
        self.eot_id = self._tok.token_to_id("<|endoftext|>")

    @classmethod
    def from_file(cls, path) -> "HFTokenizer":
        with open(path, "rb") as f:
            return cls(f.read(), name=os.fspath(path))

    def encode(self, text: str) -> list[int]:
        utf8_encode(text)   # same ValueError as the other tokenizers for unencodable text (lone surrogates)
        return self._tok.encode(text).ids

    def decode_bytes(self, ids) -> bytes:
        pieces = self._pieces
        ids = check_ids(ids, len(pieces), "tokenizer's vocabulary")
        try:
            return b"".join([pieces[i] for i in ids])
        except TypeError:   # None: an id inside the range that the tokenizer does not define
            bad = next(i for i in ids if pieces[i] is None)
            raise ValueError(f"token id {bad} is not in the tokenizer's vocabulary") from None

    def decode(self, ids) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def to_bytes(self) -> bytes:
        """The tokenizer.json exactly as loaded."""
        return self._json


def _gpt2_byte_alphabet() -> dict[str, int]:
    """The byte-level BPE alphabet: the printable Latin-1 bytes stand for themselves, and every other byte b
    (control characters, space, 0x7F-0xA0, 0xAD) is shown as chr(256 + n), n counting those bytes in order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    alphabet = {chr(b): b for b in printable}
    shifted = 0
    for b in range(256):
        if b not in printable:
            alphabet[chr(256 + shifted)] = b
            shifted += 1
    return alphabet


def _token_bytes_table(tok: tokenizers.Tokenizer) -> list[bytes | None]:
    """bytes of every id (None where the id is unused), as the library's ByteLevel decoder produces them."""
    # str.translate maps alphabet characters to the Latin-1 character of their byte; every other character ends
    # up outside Latin-1, so .encode("latin-1") fails exactly when the library falls back to the token's UTF-8.
    to_latin1 = {ord(ch): b for ch, b in _gpt2_byte_alphabet().items()}
    for b in range(256):
        to_latin1.setdefault(b, 0xFFFF)   # a Latin-1 character outside the alphabet (e.g. " ") is not a byte

    vocab = tok.get_vocab(with_added_tokens=True)
    special = {i for i, added in tok.get_added_tokens_decoder().items() if added.special}
    pieces: list[bytes | None] = [None] * (max(vocab.values()) + 1 if vocab else 0)
    for token, i in vocab.items():
        if i in special:
            pieces[i] = b""
            continue
        try:
            pieces[i] = token.translate(to_latin1).encode("latin-1")
        except UnicodeEncodeError:
            pieces[i] = token.encode("utf-8")
    return pieces
