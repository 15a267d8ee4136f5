"""Tokenizers: World (exact ids from the reference package's tokenizer), HF tokenizer.json wrapper, byte tokenizer,
StreamDecoder, the factories, and World vocabulary file validation. Parity with the live reference and the
committed multilingual corpus is in test_tokenizer_reference.py."""
from __future__ import annotations

import random

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from conftest import TOKENIZERS, shared_file
from rwkv_lite.errors import FormatError
from rwkv_lite.tokenizer import (ByteTokenizer, HFTokenizer, StreamDecoder, Tokenizer, WorldTokenizer,
                                 tokenizer_from_embedded, tokenizer_from_file)

WORLD_VOCAB = "rwkv_vocab_v20230424.txt"
HF_JSON = "20B_tokenizer.json"

# Text without surrogates (which have no UTF-8 encoding; see test_lone_surrogates_are_refused).
unicode_text = st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=200)


@pytest.fixture(scope="module")
def world() -> WorldTokenizer:
    return tokenizer_from_file(shared_file("tokenizers", WORLD_VOCAB))


@pytest.fixture(scope="module")
def hf() -> HFTokenizer:
    return tokenizer_from_file(shared_file("tokenizers", HF_JSON))


# ---------------------------------------------------------------------------------------------------------
# World tokenizer: examples whose ids were computed with the reference package's tokenizer

DOC_EXAMPLES = [
    ("Hello world", [33155, 40213]),
    ("Hello, World! How are you?", [33155, 45, 37576, 34, 20063, 21286, 22799, 64]),
    ("User: hi\n\nAssistant:", [24281, 59, 4571, 261, 5585, 41693, 59]),
    ("The Eiffel tower is in the city of", [6699, 304, 25740, 109, 39990, 4600, 4596, 22590, 30449, 4706]),
    ("  leading spaces and\ttab\n", [267, 49366, 47345, 21265, 10, 8773, 11]),
    ("1234567890 3.14159", [632, 654, 676, 698, 710, 286, 47, 634, 635, 58]),
    ("你好，世界", [10464, 11685, 19137, 10267, 14610]),
    ("こんにちは", [10115, 10165, 10136, 10127, 10139]),
    ("emoji 😀!", [34295, 33, 3319, 153, 129, 34]),
    ("def f(x):\n    return x**2\n", [7334, 337, 41, 121, 501, 28352, 42178, 355, 520, 51, 11]),
    ("\n\n", [261]),
    ("é", [2503]),
    ("<|endoftext|>", [61, 125, 25258, 7588, 2318, 125, 63]),
    ("I'll 'd test блабла 以下は、]) -> <|endoftext|><|padding|> int",
     [74, 5229, 274, 101, 32223, 5092, 27980, 2795, 27980, 33, 10399, 10258, 10139, 10079, 1682, 3463, 295, 125,
      25258, 7588, 2318, 125, 790, 125, 49520, 125, 63, 21888]),
    ("", []),
]


@pytest.mark.parametrize("text, ids", DOC_EXAMPLES)
def test_world_doc_examples(world, text, ids):
    assert world.encode(text) == ids
    assert world.decode(ids) == text


def test_world_basics(world):
    assert isinstance(world, Tokenizer)
    assert (world.kind, world.vocab_size, world.eot_id) == ("world", 65530, 0)
    assert world.decode([0]) == "" and world.decode_bytes([0]) == b""
    assert world.decode_bytes([11, 33, 261]) == b"\n \n\n"      # byte b is id b + 1; "\n\n" is 261
    assert world.decode_bytes(np.array([34295, 33], dtype=np.int64)) == b"emoji "
    assert world.decode_bytes(x for x in [34295]) == b"emoji"
    # Split UTF-8: prefixes of the emoji's three tokens are incomplete (one U+FFFD per bad sequence).
    assert world.decode([3319]) == "\ufffd"
    assert world.decode([3319, 153]) == "\ufffd"
    assert world.decode([3319, 153, 129]) == "😀"
    assert world.decode([129, 34, 129]) == "\ufffd!\ufffd"


@pytest.mark.parametrize("bad", [[65530], [-1], [5, 70000], np.array([1, 65536])])
def test_world_rejects_unknown_ids(world, bad):
    with pytest.raises(ValueError, match="not in the World vocabulary"):
        world.decode_bytes(bad)


def test_lone_surrogates_are_refused(world, hf):
    for tok in (world, hf, ByteTokenizer()):
        with pytest.raises(ValueError, match=r"surrogate U\+D800 at index 1"):
            tok.encode("a\ud800b")
    # Properly paired characters beyond the BMP are fine.
    assert world.decode(world.encode("\U0001F600")) == "\U0001F600"


@settings(max_examples=200, deadline=None)
@given(unicode_text)
def test_world_roundtrip(world, text):
    ids = world.encode(text)
    assert all(0 < i < world.vocab_size for i in ids)
    assert world.decode(ids) == text


def test_world_long_runs(world):
    # 100k of one character: a long greedy walk, many equal tokens; spaces merge into long runs.
    for text in ("a" * 100_000, " " * 100_000, "\x00" * 10_000, "é" * 10_000):
        ids = world.encode(text)
        assert world.decode(ids) == text
    assert world.encode("a" * 100_000) == world.encode("a" * 8) * 12_500


# ---------------------------------------------------------------------------------------------------------
# StreamDecoder

def stream(tokenizer, ids) -> list[str]:
    decoder = StreamDecoder(tokenizer)
    return [decoder.push(i) for i in ids] + [decoder.flush()]


def test_stream_holds_back_split_characters(world):
    pieces = stream(world, [34295, 33, 3319, 153, 129, 34])
    assert pieces == ["emoji", " ", "", "", "😀", "!", ""]
    # An incomplete character at the end becomes one U+FFFD at flush, and the decoder starts afresh.
    decoder = StreamDecoder(world)
    assert [decoder.push(i) for i in [34295, 3319, 153]] == ["emoji", "", ""]
    assert decoder.flush() == "\ufffd"
    assert decoder.push(34) == "!"


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 65529), max_size=40))
def test_stream_random_ids(world, ids):
    pieces = stream(world, ids)
    full = world.decode(ids)
    assert "".join(pieces) == full
    # Nothing once emitted is ever revised: each prefix of the output is a prefix of the final text.
    emitted = ""
    for piece in pieces:
        emitted += piece
        assert full.startswith(emitted)


@settings(max_examples=200, deadline=None)
@given(unicode_text.filter(lambda s: "\ufffd" not in s))
def test_stream_text_never_emits_replacement(world, text):
    pieces = stream(world, world.encode(text))
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)


def test_stream_random_ids_hf_and_bytes(hf):
    rng = random.Random(0)
    for tok in (hf, ByteTokenizer()):
        for _ in range(300):
            ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randint(0, 30))]
            assert "".join(stream(tok, ids)) == tok.decode(ids)


# ---------------------------------------------------------------------------------------------------------
# Hugging Face tokenizer.json

def test_hf_matches_library_decode_for_every_id(hf):
    library = hf._tok   # the wrapped tokenizers.Tokenizer: its own decode is the oracle for our byte table
    assert (hf.kind, hf.vocab_size, hf.eot_id) == ("hf", 50277, 0)
    mismatched = [i for i in range(hf.vocab_size) if hf.decode([i]) != library.decode([i])]
    assert mismatched == []
    rng = random.Random(1)
    for _ in range(500):   # sequences: byte fragments of multi-byte characters meet across tokens
        ids = [rng.randrange(hf.vocab_size) for _ in range(rng.randint(1, 12))]
        assert hf.decode(ids) == library.decode(ids)


def test_hf_roundtrip_and_specials(hf):
    text = "Hello  world   x\n\n é 😀 你好 שָׁלוֹם\tdef f(x):\n        return 1"
    ids = hf.encode(text)
    assert ids == hf._tok.encode(text).ids
    assert hf.decode(ids) == text
    assert hf.encode("<|endoftext|>x") == [0, 89]      # special tokens in text are recognised, as the reference does
    assert hf.decode([0, 89, 1]) == "x"                 # special tokens decode to ""
    with pytest.raises(ValueError, match="not in the tokenizer's vocabulary"):
        hf.decode([50277])


@settings(max_examples=100, deadline=None)
@given(unicode_text)
def test_hf_roundtrip_nfc_text(hf, text):
    import unicodedata
    text = unicodedata.normalize("NFC", text)   # the 20B tokenizer NFC-normalises its input
    # Text spelling a special token ("<|endoftext|>", "<|padding|>") encodes to that token, which decoding skips,
    # as in the reference pipeline (tokenizers' encode/decode defaults): not a round trip by design.
    assume(not any(special in text for special in ("<|endoftext|>", "<|padding|>")))
    assert hf.decode(hf.encode(text)) == text


def test_hf_bad_files(tmp_path):
    bad_json = tmp_path / "broken.json"
    bad_json.write_text('{"model": ')
    with pytest.raises(FormatError, match="broken.json: not a valid Hugging Face tokenizer.json"):
        tokenizer_from_file(bad_json)
    tokenizers = pytest.importorskip("tokenizers")
    word_level = tokenizers.Tokenizer(tokenizers.models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    path = tmp_path / "wordlevel.json"
    word_level.save(str(path))
    with pytest.raises(FormatError, match="only byte-level"):
        tokenizer_from_file(path)


# ---------------------------------------------------------------------------------------------------------
# Byte tokenizer

def test_bytes_tokenizer():
    tok = ByteTokenizer()
    assert isinstance(tok, Tokenizer)
    assert (tok.kind, tok.vocab_size, tok.eot_id, tok.to_bytes()) == ("bytes", 256, None, b"")
    assert tok.encode('"in') == [34, 105, 110]            # rwkv.cpp's tiny-model test input
    assert tok.encode("é😀") == [0xC3, 0xA9, 0xF0, 0x9F, 0x98, 0x80]
    assert tok.decode([0]) == "\x00"                      # no end-of-text: id 0 is the NUL byte
    assert tok.decode([0xC3, 0x41, 0xFF]) == "\ufffdA\ufffd"
    with pytest.raises(ValueError, match="not in the byte vocabulary"):
        tok.decode([256])


@settings(max_examples=200, deadline=None)
@given(unicode_text)
def test_bytes_roundtrip(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert tok.decode(ids) == text


# ---------------------------------------------------------------------------------------------------------
# Factories and embedding

def test_embedded_roundtrip(world, hf):
    sample = "Hello, World! 你好 😀 <|endoftext|>"
    for tok in (world, hf, ByteTokenizer()):
        again = tokenizer_from_embedded(tok.kind, tok.to_bytes())
        assert type(again) is type(tok)
        assert again.encode(sample) == tok.encode(sample)
        assert again.vocab_size == tok.vocab_size
    assert world.to_bytes() == (TOKENIZERS / WORLD_VOCAB).read_bytes()
    assert hf.to_bytes() == (TOKENIZERS / HF_JSON).read_bytes()


def test_factory_errors(tmp_path):
    with pytest.raises(FormatError, match="unknown tokenizer kind 'sentencepiece'"):
        tokenizer_from_embedded("sentencepiece", b"")
    with pytest.raises(FormatError, match="expected no data"):
        tokenizer_from_embedded("bytes", b"x")
    with pytest.raises(FormatError, match="vocab.bin: unknown tokenizer file type"):
        tokenizer_from_file(tmp_path / "vocab.bin")
    with pytest.raises(FormatError, match="missing.txt: cannot read tokenizer file"):
        tokenizer_from_file(tmp_path / "missing.txt")


# ---------------------------------------------------------------------------------------------------------
# World vocabulary file validation

def small_vocab_lines(extra: list[str]) -> list[str]:
    """A valid World vocabulary: the 256 single bytes (as the real file writes them), then `extra` literals."""
    literals = [repr(chr(b)) if b < 128 else repr(bytes([b])) for b in range(256)] + extra
    lines = []
    for i, literal in enumerate(literals, 1):
        value = eval(literal)   # test helper only: literals we wrote ourselves
        n = len(value.encode("utf-8") if isinstance(value, str) else value)
        lines.append(f"{i} {literal} {n}")
    return lines


def write_vocab(tmp_path, lines: list[str], name="vocab.txt", newline="\n"):
    path = tmp_path / name
    path.write_bytes(newline.join(lines).encode("utf-8") + newline.encode())
    return path


def test_small_vocab_parses_and_encodes(tmp_path):
    extra = ["'ab'", "'abc'", "'abcd'", "'b c'", '"it\'s"', "'\\x80'", "b'\\xe4\\xbd'", "'你好'", "'a\\nb'"]
    tok = tokenizer_from_file(write_vocab(tmp_path, small_vocab_lines(extra)))
    assert tok.vocab_size == 256 + len(extra) + 1
    assert tok.decode_bytes([257, 261, 262, 263]) == b"abit's\xc2\x80\xe4\xbd"   # '\x80' in a str is U+0080
    # Greedy longest match: "abcd" wins over "abc"/"ab"; "abce" falls back to "abc" then "e".
    assert tok.encode("abcdabceb c") == [259, 258, ord("e") + 1, 260]
    assert tok.encode("你好你") == [264, 263, 0xA0 + 1]   # "你" alone: the 2-byte fragment then its last byte


def test_crlf_vocab_gives_same_tokens(world, tmp_path):
    lines = (TOKENIZERS / WORLD_VOCAB).read_bytes().decode("utf-8").split("\n")[:-1]
    crlf = tokenizer_from_file(write_vocab(tmp_path, lines, newline="\r\n"))
    assert crlf._pieces == world._pieces   # the pip package ships the vocabulary with CRLF line ends


BAD_LINES = [   # (line number to replace, replacement, expected message fragment)
    (300, "300 'abc 3", "not a Python str or bytes literal"),
    (300, "300 'it's' 4", "not a Python str or bytes literal"),
    (300, "300 'a\rb' 3", "not a Python str or bytes literal"),
    (300, "300 'abc' 4", "has 3 bytes but the length field says 4"),
    (300, "301 'abc' 3", "expected token id 300"),
    (300, "300'abc'3", "expected '<id> <literal> <byte length>'"),
    (300, "300 'abc' three", "not a number"),
    (300, "300 '' 0", "empty token"),
    (300, "300 'ab' 2", "repeats line 257"),
    (300, "300 __import__('os').system('touch PWNED') 3", "not a Python str or bytes literal"),
    (300, "300 ['a'] 1", "not a Python str or bytes literal"),
    (300, "300 '\\ud800' 3", "not a Python str or bytes literal"),
    (300, "", "expected '<id> <literal> <byte length>'"),
]


@pytest.mark.parametrize("lineno, replacement, message", BAD_LINES)
def test_bad_vocab_line_names_file_and_line(tmp_path, monkeypatch, lineno, replacement, message):
    monkeypatch.chdir(tmp_path)   # the eval-injection line must not create a file here
    lines = small_vocab_lines(["'ab'"] + [repr(f"t{i}") for i in range(60)])
    lines[lineno - 1] = replacement
    path = write_vocab(tmp_path, lines)
    with pytest.raises(FormatError) as info:
        tokenizer_from_file(path)
    text = str(info.value)
    assert text.startswith(f"{path}:{lineno}: ") and message in text and "\n" not in text
    assert not (tmp_path / "PWNED").exists()


def test_bad_vocab_files(tmp_path):
    path = write_vocab(tmp_path, small_vocab_lines([])[:-1])   # byte 0xff has no token
    with pytest.raises(FormatError, match=r"vocab.txt: no single-byte token for byte 0xff"):
        tokenizer_from_file(path)
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    with pytest.raises(FormatError, match="empty.txt: empty World vocabulary file"):
        tokenizer_from_file(empty)
    not_utf8 = tmp_path / "latin1.txt"
    not_utf8.write_bytes("\n".join(small_vocab_lines(["'é'"])).encode("latin-1"))
    with pytest.raises(FormatError, match=r"latin1.txt:257: not valid UTF-8"):
        tokenizer_from_file(not_utf8)
    with pytest.raises(FormatError, match=r"<embedded World vocabulary>:1: "):
        tokenizer_from_embedded("world", b"garbage\n")
