"""World tokenizer parity with the reference (rwkv.rwkv_tokenizer.TRIE_TOKENIZER, rwkv 0.8.32):
the committed multilingual/adversarial corpus ids (made by fixtures/tokenizer/make_corpus.py with the reference),
and live comparisons when the `rwkv` package is importable."""
from __future__ import annotations

import base64
import hashlib
import json
import lzma

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import LOCAL_FIXTURES, shared_file
from rwkv_lite.tokenizer import WorldTokenizer, tokenizer_from_file

CORPUS = LOCAL_FIXTURES / "tokenizer" / "world_corpus.json.xz"


@pytest.fixture(scope="module")
def vocab_path():
    return shared_file("tokenizers", "rwkv_vocab_v20230424.txt")


@pytest.fixture(scope="module")
def world(vocab_path) -> WorldTokenizer:
    return tokenizer_from_file(vocab_path)


@pytest.fixture(scope="module")
def corpus(vocab_path) -> dict:
    data = json.loads(lzma.decompress(CORPUS.read_bytes()))
    assert data["vocab_sha256"] == hashlib.sha256(vocab_path.read_bytes()).hexdigest()
    for doc in data["documents"]:
        doc["ids"] = np.frombuffer(base64.b64decode(doc["ids_uint16_b64"]), dtype="<u2").tolist()
    return data


@pytest.fixture(scope="module")
def reference(vocab_path):
    rwkv_tokenizer = pytest.importorskip("rwkv.rwkv_tokenizer")
    return rwkv_tokenizer.TRIE_TOKENIZER(str(vocab_path))


def test_corpus_is_what_the_brief_asks_for(corpus):
    gettext_docs = [d for d in corpus["documents"] if d["name"].startswith("gettext/")]
    assert sum(len(d["text"].encode("utf-8")) for d in gettext_docs) >= 100_000
    assert len({d["source"].split(";")[0].split(" (")[0] for d in gettext_docs}) >= 20   # distinct scripts
    assert any(len(d["text"]) >= 100_000 for d in corpus["documents"])


def test_committed_corpus_ids(world, corpus):
    for doc in corpus["documents"]:
        ids = world.encode(doc["text"])
        assert ids == doc["ids"], doc["name"]
        assert world.decode(ids) == doc["text"], doc["name"]


@pytest.mark.oracle
def test_live_reference_corpus(world, corpus, reference):
    for doc in corpus["documents"]:
        assert world.encode(doc["text"]) == reference.encode(doc["text"]), doc["name"]


@pytest.mark.oracle
def test_live_reference_parses_the_same_vocabulary(world, reference):
    assert world.vocab_size == len(reference.idx2token) + 1
    assert all(world.token_bytes(i) == reference.idx2token[i] for i in range(1, world.vocab_size))


@pytest.mark.oracle
def test_reference_refuses_lone_surrogates_too(reference):
    with pytest.raises(UnicodeEncodeError):   # a ValueError subclass; ours raises ValueError (test_tokenizer.py)
        reference.encode("a\ud800b")


@pytest.fixture(scope="module")
def vocab_text_tokens(world) -> list[str]:
    """Every token that is valid UTF-8 on its own, as text."""
    out = []
    for i in range(1, world.vocab_size):
        try:
            out.append(world.token_bytes(i).decode("utf-8"))
        except UnicodeDecodeError:
            pass
    return out


any_char = st.characters(exclude_categories=("Cs",))


@pytest.mark.oracle
@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_live_reference_random_text(world, reference, vocab_text_tokens, data):
    """Arbitrary text, and text glued from vocabulary tokens with random characters between (deep trie walks
    that must back off)."""
    piece = st.one_of(st.sampled_from(vocab_text_tokens), st.text(any_char, max_size=3))
    text = data.draw(st.one_of(st.text(any_char, max_size=300), st.lists(piece, max_size=60).map("".join)))
    assert world.encode(text) == reference.encode(text)
