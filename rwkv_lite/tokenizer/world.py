"""The RWKV "World" tokenizer: greedy longest match over UTF-8 bytes.

Vocabulary file: one token per line, ``<id> <python str or bytes literal> <byte length>``, ids 1..N in order;
id 0 is end-of-text and is not in the file. Encoding walks a byte trie from each position as deep as the input
allows and emits the deepest token seen, exactly like the reference ``rwkv.rwkv_tokenizer.TRIE_TOKENIZER``
(tests/test_tokenizer_reference.py compares the ids).

The trie is stored as a "double array" so that a small Numba kernel walks it with one table read per byte:
    slots[s] = (check, base, token, -)     int32, one 16-byte row per trie node; the root is slot 0
    the child of slot s along byte b is t = base[s] + b, provided check[t] == s (else s has no such child);
    token[t] is the id of the token that ends at t, or -1.
The layout is computed at load time (~116k slots, ~1.9 MB and ~0.05 s for the 65,529-token vocabulary).
"""
from __future__ import annotations

import ast
import os
from typing import NoReturn

import numpy as np
from numba import njit

from rwkv_lite.errors import FormatError
from rwkv_lite.tokenizer.common import check_ids, utf8_encode

END_OF_TEXT_ID = 0
CHECK, BASE, TOKEN = 0, 1, 2   # columns of the trie's slot table (column 3 pads a slot to 16 bytes)


class WorldTokenizer:
    """Tokenizer for RWKV World models. Build with ``WorldTokenizer(vocab_file_bytes, name)``.

    * ``encode(text)`` equals the reference's encode for every string. Text that cannot be UTF-8 encoded (a
      lone surrogate such as "\\ud800") raises ValueError, as the reference does (its str.encode raises).
    * ``decode(ids)`` replaces each invalid UTF-8 sequence with one U+FFFD (the reference instead returns a
      single "\\ufffd" for the whole call); id 0 (end-of-text) decodes to "".
    """

    kind = "world"

    def __init__(self, vocab_file: bytes, name: str = "<World vocabulary>"):
        self._vocab_file = bytes(vocab_file)
        # pieces[id] is the token's bytes; pieces[0] = b"" for end-of-text.
        self._pieces = [b""] + parse_world_vocab(self._vocab_file, name)
        self.vocab_size = len(self._pieces)
        self.eot_id = END_OF_TEXT_ID
        self._slots = _build_trie(self._pieces)

    @classmethod
    def from_file(cls, path) -> "WorldTokenizer":
        with open(path, "rb") as f:
            return cls(f.read(), name=os.fspath(path))

    def encode(self, text: str) -> list[int]:
        data = utf8_encode(text)
        if not data:
            return []
        ids = _greedy_encode(np.frombuffer(data, dtype=np.uint8), self._slots)
        return ids.tolist()

    def decode_bytes(self, ids) -> bytes:
        pieces = self._pieces
        ids = check_ids(ids, len(pieces), "World vocabulary")
        return b"".join([pieces[i] for i in ids])

    def decode(self, ids) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes of one token (b"" for end-of-text)."""
        return self.decode_bytes([token_id])

    def to_bytes(self) -> bytes:
        """The vocabulary file exactly as loaded (embed it in a model file; load it back with the constructor)."""
        return self._vocab_file


# ---------------------------------------------------------------------------------------------------------
# Vocabulary file parsing

def parse_world_vocab(data: bytes, name: str) -> list[bytes]:
    """Parse a World vocabulary file; return the tokens' bytes for ids 1..N in order.

    Every line is checked: the id is the line number, the literal is a str or bytes Python literal (parsed
    with ast.literal_eval, never eval), its UTF-8 length equals the length field, no token repeats, and all
    256 single bytes are present (greedy encoding needs them to always make progress). A bad line raises
    FormatError("<name>:<line>: <problem>").
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise FormatError(f"{name}:{line}: not valid UTF-8 (byte 0x{data[err.start]:02x})") from None
    # Split on "\n" only: str.splitlines would also split on characters such as U+2028 that may occur inside
    # a token literal. A trailing "\r" (Windows line ends; the pip package ships the file that way) is dropped.
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if not lines:
        raise FormatError(f"{name}: empty World vocabulary file")

    pieces: list[bytes] = []
    first_line: dict[bytes, int] = {}
    for lineno, line in enumerate(lines, 1):
        if line.endswith("\r"):
            line = line[:-1]
        first_space = line.find(" ")
        last_space = line.rfind(" ")
        if first_space <= 0 or last_space <= first_space + 1:
            _bad_line(name, lineno, "expected '<id> <literal> <byte length>'", line)
        id_text, literal, length_text = line[:first_space], line[first_space + 1:last_space], line[last_space + 1:]
        if not (id_text.isascii() and id_text.isdigit()) or int(id_text) != lineno:
            _bad_line(name, lineno, f"expected token id {lineno} (ids start at 1 and are contiguous)", line)
        if not (length_text.isascii() and length_text.isdigit()):
            _bad_line(name, lineno, "the byte length field is not a number", line)

        token = _parse_literal(literal)
        if token is None:
            _bad_line(name, lineno, "the token is not a Python str or bytes literal", line)
        if len(token) != int(length_text):
            _bad_line(name, lineno, f"the token has {len(token)} bytes but the length field says {length_text}",
                      line)
        if not token:
            _bad_line(name, lineno, "empty token", line)
        if token in first_line:
            _bad_line(name, lineno, f"the token repeats line {first_line[token]}", line)
        first_line[token] = lineno
        pieces.append(token)

    missing = [b for b in range(256) if bytes([b]) not in first_line]
    if missing:
        raise FormatError(f"{name}: no single-byte token for byte 0x{missing[0]:02x} ({len(missing)} bytes "
                          "missing); every byte needs one so that greedy encoding always progresses")
    return pieces


def _parse_literal(literal: str) -> bytes | None:
    """Bytes of a str literal (UTF-8 encoded) or bytes literal; None if it is neither."""
    quote = literal[:1]
    body = literal[1:-1]
    # Fast path for ~99% of lines: a plain quoted string with nothing that needs the Python parser.
    if (quote in ("'", '"') and len(literal) >= 2 and literal[-1] == quote
            and quote not in body and "\\" not in body and "\r" not in body and "\0" not in body):
        return body.encode("utf-8")
    try:
        value = ast.literal_eval(literal)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return None
    if isinstance(value, str):
        try:
            return value.encode("utf-8")
        except UnicodeEncodeError:   # e.g. '\ud800'
            return None
    return value if isinstance(value, bytes) else None


def _bad_line(name: str, lineno: int, problem: str, line: str) -> NoReturn:
    shown = line if len(line) <= 60 else line[:60] + "..."
    raise FormatError(f"{name}:{lineno}: {problem}: {shown!r}")


# ---------------------------------------------------------------------------------------------------------
# Trie construction and the greedy walk

def _build_trie(pieces: list[bytes]) -> np.ndarray:
    """The slot table (see the module docstring) of a trie over pieces[1:]."""
    token_ids = sorted(range(1, len(pieces)), key=pieces.__getitem__)   # lexicographic byte order
    lengths = np.fromiter((len(pieces[i]) for i in token_ids), dtype=np.int64, count=len(token_ids))
    offsets = np.zeros(len(token_ids) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    blob = np.frombuffer(b"".join([pieces[i] for i in token_ids]), dtype=np.uint8)
    parent, byte, token_at = _trie_nodes_from_sorted(blob, offsets, np.array(token_ids, dtype=np.int32))

    # Each node's children, sorted by byte: edge_child[edge_start[n]:edge_start[n+1]]. In sorted insertion order
    # a node's children are created in increasing byte order, so a stable sort by parent keeps them sorted.
    edge_child = (np.argsort(parent[1:], kind="stable") + 1).astype(np.int32)
    edge_start = np.searchsorted(parent[edge_child], np.arange(len(parent) + 1)).astype(np.int32)
    return _double_array(edge_start, byte[edge_child], edge_child, token_at)


@njit(cache=True)
def _trie_nodes_from_sorted(blob, offsets, token_ids):
    """Insert tokens (sorted, distinct) into a trie; return parent, byte and token id of every node (root = 0).

    Consecutive sorted tokens share a prefix; its nodes already exist, so only the rest is appended.
    path[d] is the node at depth d on the previous token's path.
    """
    max_nodes = blob.size + 1
    parent = np.empty(max_nodes, dtype=np.int32)
    byte = np.zeros(max_nodes, dtype=np.uint8)
    token_at = np.full(max_nodes, -1, dtype=np.int32)
    max_len = 0
    for k in range(token_ids.size):
        max_len = max(max_len, offsets[k + 1] - offsets[k])
    path = np.zeros(max_len + 1, dtype=np.int32)
    parent[0] = -1
    n_nodes = 1
    prev_start = 0
    prev_len = 0
    for k in range(token_ids.size):
        start = offsets[k]
        length = offsets[k + 1] - start
        shared = 0
        while shared < min(length, prev_len) and blob[start + shared] == blob[prev_start + shared]:
            shared += 1
        node = path[shared]
        for depth in range(shared, length):
            parent[n_nodes] = node
            byte[n_nodes] = blob[start + depth]
            node = n_nodes
            n_nodes += 1
            path[depth + 1] = node
        token_at[node] = token_ids[k]
        prev_start = start
        prev_len = length
    return parent[:n_nodes].copy(), byte[:n_nodes].copy(), token_at[:n_nodes].copy()


@njit(cache=True)
def _double_array(edge_start, edge_byte, edge_child, token_at):
    """Pack the trie into a slot table: nodes are placed breadth first; a node's children must land on free
    slots base + byte, and the smallest such base is taken (first fit, walking a list of free slots)."""
    n_nodes = token_at.size
    capacity = 2 * n_nodes + 4 * 256
    slots = np.full((capacity, 4), -1, dtype=np.int32)
    slots[:, BASE] = 0        # a leaf's base 0 sends every lookup to slots 0..255, none of which is its child
    used = np.zeros(capacity, dtype=np.bool_)
    # Free slots as a doubly linked list in increasing order, so the search skips occupied stretches.
    next_free = np.arange(1, capacity + 1, dtype=np.int32)
    prev_free = np.arange(-1, capacity - 1, dtype=np.int32)
    used[0] = True            # the root
    first_free = 1
    prev_free[1] = -1
    slot_of = np.empty(n_nodes, dtype=np.int32)
    slot_of[0] = 0
    slots[0, TOKEN] = token_at[0]
    queue = np.empty(n_nodes, dtype=np.int32)   # breadth-first order: a node is placed before its children
    queue[0] = 0
    n_queued = 1
    n_slots = 256
    for head in range(n_nodes):
        node = queue[head]
        e0 = edge_start[node]
        e1 = edge_start[node + 1]
        if e0 == e1:
            continue
        # Try bases that put the first child on a free slot until the other children fit too.
        free = first_free
        while True:
            if free + 256 >= capacity:
                raise ValueError("trie slot table overflow")
            base = free - edge_byte[e0]
            if base >= 1:
                fits = True
                for e in range(e0 + 1, e1):
                    if used[base + edge_byte[e]]:
                        fits = False
                        break
                if fits:
                    break
            free = next_free[free]
        slots[slot_of[node], BASE] = base
        for e in range(e0, e1):
            slot = base + edge_byte[e]
            used[slot] = True
            before = prev_free[slot]
            after = next_free[slot]
            if before >= 0:
                next_free[before] = after
            else:
                first_free = after
            if after < capacity:
                prev_free[after] = before
            child = edge_child[e]
            slot_of[child] = slot
            slots[slot, CHECK] = slot_of[node]
            slots[slot, TOKEN] = token_at[child]
            queue[n_queued] = child
            n_queued += 1
            n_slots = max(n_slots, base + 256)   # every lookup base + b (b < 256) stays inside the table
    return slots[:n_slots].copy()


@njit(cache=True)
def _greedy_encode(text, slots):
    """Token ids of the UTF-8 bytes `text` (uint8 array): at each position emit the longest matching token."""
    out = np.empty(text.size, dtype=np.int32)
    n_out = 0
    pos = 0
    while pos < text.size:
        slot = 0
        best_id = -1
        best_end = pos + 1
        i = pos
        while i < text.size:
            child = slots[slot, BASE] + text[i]
            if slots[child, CHECK] != slot:
                break
            slot = child
            i += 1
            token = slots[slot, TOKEN]
            if token >= 0:
                best_id = token
                best_end = i
        out[n_out] = best_id   # every single byte is a token (checked at load), so best_id >= 0
        n_out += 1
        pos = best_end
    return out[:n_out]
