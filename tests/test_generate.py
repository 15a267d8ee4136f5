"""The generation loop and ChatSession, driven by small deterministic fake models."""
from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np
import pytest

from conftest import TOKENIZERS
from rwkv_lite.errors import RwkvLiteError
from rwkv_lite.generate import (DEFAULT_PREAMBLE, ChatSession, GenerationError, generate, generate_text,
                                normalize_message)
from rwkv_lite.sampling import SamplingParams


# ------------------------------------------------------------------------------------------------ fakes

class TinyVocab:
    """A byte-level test tokenizer: id 0 = end-of-text, id 1 + b = byte b, then a few multi-byte tokens
    (including "\\n\\n" and a prefix of an emoji's UTF-8 bytes). Greedy longest-match encoding."""

    kind = "test"
    eot_id = 0
    EXTRA = [b"\n\n", b"User", b"Assistant", b" Paris", b"Hello", b" world", "😀".encode()[:2], "é".encode(),
             b"\n\nUs", b"END", b" Hi", b" A", b" B"]

    def __init__(self):
        self.pieces = [b""] + [bytes([b]) for b in range(256)] + self.EXTRA
        self.vocab_size = len(self.pieces)
        self._ids = {p: i for i, p in enumerate(self.pieces) if p}

    def id(self, piece: str | bytes) -> int:
        return self._ids[piece.encode() if isinstance(piece, str) else piece]

    def encode(self, text: str) -> list[int]:
        data, ids, i = text.encode(), [], 0
        while i < len(data):
            n = max(n for n in range(1, 12) if data[i:i + n] in self._ids)
            ids.append(self._ids[data[i:i + n]])
            i += n
        return ids

    def decode_bytes(self, ids) -> bytes:
        return b"".join(self.pieces[i] for i in ids)

    def decode(self, ids) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")


class HistoryState:
    """The fake state is the whole token history (immutable, so forward() cannot modify its input)."""

    def __init__(self, tokens=()):
        self.tokens = tuple(tokens)

    def copy(self):
        return HistoryState(self.tokens)

    def save(self, path):
        Path(path).write_text(json.dumps(list(self.tokens)))


class FakeModel:
    """Deterministic logits that depend on the entire history (a hash of every token seen), so a wrong or
    missing state changes them. Records every forward call as (ids fed, logits returned)."""

    def __init__(self, tokenizer, scale: float = 3.0, fail_at_call: int | None = None):
        self.tokenizer = tokenizer
        self.config = {"vocab_size": tokenizer.vocab_size}
        self.scale = scale
        self.calls: list[tuple[list[int], np.ndarray]] = []
        self.fail_at_call = fail_at_call

    def logits_for(self, history) -> np.ndarray:
        seed = zlib.crc32(np.asarray(history, dtype=np.int64).tobytes())
        return (np.random.default_rng(seed).normal(size=self.tokenizer.vocab_size) * self.scale).astype(np.float32)

    def forward(self, tokens, state=None):
        tokens = [int(t) for t in tokens]
        assert tokens, "forward() needs at least one token"
        if self.fail_at_call is not None and len(self.calls) == self.fail_at_call:
            self.fail_at_call = None
            raise KeyboardInterrupt  # as if Ctrl-C arrived inside the model
        history = (state.tokens if state is not None else ()) + tuple(tokens)
        logits = self.logits_for(history)
        self.calls.append((tokens, logits.copy()))
        return logits, HistoryState(history)


class ScriptedModel(FakeModel):
    """Each forward call makes the next scripted id overwhelmingly likely (end-of-text once the script is used
    up); with greedy sampling the generated ids are exactly the script."""

    def __init__(self, tokenizer, script: list[int], **kwargs):
        super().__init__(tokenizer, **kwargs)
        self.script = list(script)

    def forward(self, tokens, state=None):
        n = len(self.calls)
        _, state = super().forward(tokens, state)
        logits = np.zeros(self.tokenizer.vocab_size, dtype=np.float32)
        logits[self.script[n] if n < len(self.script) else 0] = 100.0
        self.calls[-1] = (self.calls[-1][0], logits.copy())
        return logits, state


GREEDY = SamplingParams.greedy()


@pytest.fixture(scope="module")
def vocab():
    return TinyVocab()


def script_of(vocab, *pieces) -> list[int]:
    return [vocab.id(p) if isinstance(p, (str, bytes)) else p for p in pieces]


# ------------------------------------------------------------------------------------------------ generate()

def test_prompt_is_fed_in_one_call_and_state_covers_prompt_and_tokens(vocab):
    model = FakeModel(vocab)
    gen = generate(model, "Hello world, how are", max_tokens=12, params=SamplingParams(seed=5, top_p=1.0))
    pieces = list(gen)
    prompt = vocab.encode("Hello world, how are")
    assert model.calls[0][0] == prompt                          # sequence mode: one call for the prompt
    assert all(len(ids) == 1 for ids, _ in model.calls[1:])     # then one token per call
    assert len(gen.tokens) == 12 and gen.stats.stop_reason == "max_tokens"
    assert "".join(pieces) == gen.text == vocab.decode(gen.tokens)
    assert len(model.calls) == 12                               # the last token is not fed ...
    assert gen.state.tokens == tuple(prompt + gen.tokens)       # ... until .state is read
    assert len(model.calls) == 13
    assert gen.state.tokens == tuple(prompt + gen.tokens) and len(model.calls) == 13  # and only once
    stats = gen.stats
    assert (stats.prompt_tokens, stats.generated_tokens) == (len(prompt), 12)
    assert stats.prompt_seconds > 0 and stats.generation_seconds > 0 and stats.generation_tokens_per_second > 0


def test_each_step_samples_from_the_models_logits_for_the_full_history(vocab):
    model = FakeModel(vocab)
    gen = generate(model, [5, 6, 7], max_tokens=8, params=GREEDY)
    list(gen)
    history = [5, 6, 7]
    for token in gen.tokens:
        assert token == int(np.argmax(model.logits_for(history)))
        history.append(token)


def test_same_seed_same_text_different_seed_different_text(vocab):
    def run(seed):
        gen = generate(FakeModel(vocab, scale=1.0), "Hello", max_tokens=20, params=SamplingParams(seed=seed))
        list(gen)
        return gen.tokens

    assert run(7) == run(7)
    assert run(7) != run(8)


def test_stop_string_spanning_tokens_is_not_printed_and_stops(vocab):
    script = script_of(vocab, " Paris", ".", "\n", "\n", "U", "s", "e", "r", ":", " ", "x")
    model = ScriptedModel(vocab, script)
    pieces = list(gen := generate(model, "Q", max_tokens=50, params=GREEDY, stop=["\n\nUser:"]))
    assert "".join(pieces) == " Paris."
    assert gen.stats.stop_reason == "stop"
    assert vocab.decode(gen.tokens) == " Paris.\n\nUser:"        # the stop string's tokens were generated
    assert all("\n" not in p for p in pieces)                     # the held-back "\n" never leaked


def test_stop_string_inside_one_token_and_text_before_it(vocab):
    model = ScriptedModel(vocab, script_of(vocab, "Hello", "\n\nUs", "e", "r"))
    assert generate_text(model, "Q", max_tokens=50, params=GREEDY, stop=("\n\nUser", "\n\nUs")) == "Hello"


def test_held_back_text_that_is_not_a_stop_is_released(vocab):
    # "\n\n" could start the stop string "\n\nUser" but turns into "\n\nfoo": it must be printed after all,
    # and a partial stop at the very end (budget reached) is printed too.
    script = script_of(vocab, "A", "\n\n", "f", "o", "o", "\n\n", "U", "s")
    pieces = list(generate(ScriptedModel(vocab, script), "Q", max_tokens=len(script), params=GREEDY,
                           stop=["\n\nUser"]))
    assert "".join(pieces) == "A\n\nfoo\n\nUs"
    assert pieces[-1] == "\n\nUs"  # released only at the end, once the budget ran out


def test_multibyte_characters_stream_without_replacement_characters(vocab):
    emoji = "😀".encode()
    ids = [vocab.id(emoji[:2]), 1 + emoji[2], 1 + emoji[3],            # 😀 split 2+1+1 bytes
           vocab.id("é"), 1 + "ü".encode()[0], 1 + "ü".encode()[1],   # é in one token, ü split 1+1
           *[1 + b for b in "日本".encode()], vocab.id("END")]
    model = ScriptedModel(vocab, ids)
    gen = generate(model, "Q", max_tokens=len(ids), params=GREEDY)
    pieces = list(gen)
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == vocab.decode(ids) == "😀éü日本END"
    assert pieces[0] == "😀"   # the emoji came out whole, once its last byte arrived


def test_incomplete_character_at_the_end_matches_decode(vocab):
    ids = [vocab.id("Hello"), vocab.id("😀".encode()[:2])]
    gen = generate(ScriptedModel(vocab, ids), "Q", max_tokens=2, params=GREEDY)
    assert "".join(gen) == vocab.decode(ids) == "Hello\ufffd"


def test_end_of_text_stops_and_is_not_fed(vocab):
    model = ScriptedModel(vocab, script_of(vocab, "Hello", " world"))  # then end-of-text (id 0)
    gen = generate(model, "Q", max_tokens=50, params=GREEDY)
    assert "".join(gen) == "Hello world"
    assert gen.stats.stop_reason == "end_of_text" and gen.tokens == script_of(vocab, "Hello", " world")
    assert 0 not in gen.state.tokens


def test_on_token_sees_every_token_and_max_tokens_zero_only_reads_the_prompt(vocab):
    seen = []
    model = FakeModel(vocab)
    gen = generate(model, "Hi", max_tokens=5, params=SamplingParams(seed=1), on_token=seen.append)
    list(gen)
    assert seen == gen.tokens and len(seen) == 5
    model = FakeModel(vocab)
    gen = generate(model, "Hi", max_tokens=0, params=GREEDY)
    assert list(gen) == [] and gen.stats.stop_reason == "max_tokens"
    assert gen.state.tokens == tuple(vocab.encode("Hi")) and len(model.calls) == 1


def test_empty_prompt_starts_from_end_of_text_and_bad_requests_raise(vocab):
    model = FakeModel(vocab)
    list(generate(model, "", max_tokens=2, params=GREEDY))
    assert model.calls[0][0] == [0]
    for kwargs in (dict(max_tokens=-1), dict(max_tokens=2, stop=("",)), dict(max_tokens=2, state=HistoryState([1]),
                                                                                prompt="")):
        kwargs = {"prompt": "x", **kwargs}
        with pytest.raises(GenerationError) as info:
            generate(model, **kwargs)
        assert isinstance(info.value, RwkvLiteError) and "\n" not in str(info.value)


def test_reading_state_before_iterating_feeds_the_prompt_once(vocab):
    model = FakeModel(vocab)
    gen = generate(model, "Hello", max_tokens=3, params=GREEDY, stop=None)
    assert gen.state.tokens == tuple(vocab.encode("Hello")) and len(model.calls) == 1
    assert len("".join(gen)) > 0 and len(gen.tokens) == 3
    assert model.calls[0][0] == vocab.encode("Hello") and all(len(ids) == 1 for ids, _ in model.calls[1:])


def test_breaking_out_early_keeps_tokens_and_state_consistent(vocab):
    model = FakeModel(vocab)
    gen = generate(model, "Hello", max_tokens=100, params=SamplingParams(seed=3, top_p=1.0))
    for i, _ in enumerate(gen):
        if i == 3:
            break
    gen.close()
    assert gen.finished and gen.stats.stop_reason == "interrupted"
    assert gen.state.tokens == tuple(vocab.encode("Hello") + gen.tokens)


def test_interrupt_inside_the_model_leaves_the_previous_state_valid(vocab):
    model = FakeModel(vocab, fail_at_call=4)   # Ctrl-C during the forward call of the 4th generated token
    gen = generate(model, "Hello", max_tokens=100, params=SamplingParams(seed=3, top_p=1.0))
    with pytest.raises(KeyboardInterrupt):
        for _ in gen:
            pass
    assert gen.finished and gen.stats.stop_reason == "interrupted"
    assert len(gen.tokens) == 4 and gen.unfed_tokens == gen.tokens[-1:]
    assert gen.state.tokens == tuple(vocab.encode("Hello") + gen.tokens)  # the pending token is fed on demand


def test_world_tokenizer_stream_when_available():
    vocab_file = TOKENIZERS / "rwkv_vocab_v20230424.txt"
    if not vocab_file.exists():
        pytest.skip("World vocabulary not present")
    from rwkv_lite.tokenizer import WorldTokenizer
    tok = WorldTokenizer.from_file(vocab_file)
    ids = [34295, 33, 3319, 153, 129, 34, 10464, 11685, 261, 24281, 59]   # "emoji 😀!你好\n\nUser:"
    model = ScriptedModel(tok, ids)
    gen = generate(model, "x", max_tokens=50, params=GREEDY, stop=["\n\nUser:"])
    pieces = list(gen)
    assert "".join(pieces) == "emoji 😀!你好" and all("\ufffd" not in p for p in pieces)


# ------------------------------------------------------------------------------------------------ chat

def test_normalize_message():
    assert normalize_message("  hello\r\n\r\n\nworld \n") == "hello\nworld"
    assert normalize_message("a\r\rb") == "a\nb"
    assert normalize_message(" \n ") == ""


def test_chat_transcript_format_and_reply_text(vocab):
    # replies: " Paris.\n\n" then " Hello world\n\n" (the model writes the leading space and the separator)
    script = script_of(vocab, " Paris", ".", "\n\n", " ", "Hello", " world", "\n", "\n")
    model = ScriptedModel(vocab, script)
    chat = ChatSession(model, params=GREEDY, preamble="")
    assert chat.ask("  What is\r\n\r\nthe capital? ") == "Paris."
    pieces = list(chat.reply("Say hi"))
    assert "".join(pieces) == " Hello world"
    assert chat.transcript == ("User: What is\nthe capital?\n\nAssistant: Paris.\n\n"
                               "User: Say hi\n\nAssistant: Hello world\n\n")
    assert model.calls[0][0] == vocab.encode("User: What is\nthe capital?\n\nAssistant:")
    # the reply's last token is fed with the next message, in the same call
    assert model.calls[3][0] == [vocab.id("\n\n")] + vocab.encode("User: Say hi\n\nAssistant:")


def test_chat_three_turns_carry_the_state(vocab):
    model = FakeModel(vocab)
    chat = ChatSession(model, params=SamplingParams.chat(seed=11), max_reply_tokens=6)
    turn_calls = []
    for message in ("Hello there", "What is 2+2?", "Thanks"):
        turn_calls.append(len(model.calls))
        list(chat.reply(message))
    fed = [t for ids, _ in model.calls for t in ids]
    history = chat.history
    assert history[:len(fed)] == fed and len(history) - len(fed) <= 3   # each token fed exactly once, in order
    text = chat.transcript
    assert text.startswith(DEFAULT_PREAMBLE + "User: Hello there\n\nAssistant:")
    assert "\n\nUser: What is 2+2?\n\nAssistant:" in text and "\n\nUser: Thanks\n\nAssistant:" in text

    # The second turn's first logits (from the call that read the new message) equal those of the whole
    # transcript up to there, processed at once from the initial state.
    second = turn_calls[1]
    transcript_so_far = fed[:sum(len(ids) for ids, _ in model.calls[:second + 1])]
    assert vocab.decode(transcript_so_far).endswith("\n\nUser: What is 2+2?\n\nAssistant:")
    logits, _ = FakeModel(vocab).forward(transcript_so_far)
    np.testing.assert_array_equal(model.calls[second][1], logits)


def test_chat_never_samples_end_of_text(vocab):
    model = ScriptedModel(vocab, script_of(vocab, " Hi", 0, 0, "\n\n"))  # the model "wants" to end the text
    chat = ChatSession(model, params=GREEDY, preamble="")
    gen = chat.reply("hey")
    text = "".join(gen)
    # end-of-text was banned, so the reply went on (with the next-best id, 1) until the "\n\n"
    assert gen.stats.stop_reason == "stop" and gen.tokens == script_of(vocab, " Hi", 1, 1, "\n\n")
    assert text == " Hi\x00\x00"


def test_chat_interrupted_reply_is_closed_and_the_next_turn_is_consistent(vocab):
    model = FakeModel(vocab)
    chat = ChatSession(model, params=SamplingParams.chat(seed=2, top_p=1.0), preamble="", max_reply_tokens=50)
    gen = chat.reply("Tell me a story")
    next(gen)
    next(gen)            # the caller stops after two pieces (e.g. Ctrl-C while printing) and moves on
    chat.ask("Shorter please")
    history = chat.history
    text = vocab.decode(history)
    assert text.startswith("User: Tell me a story\n\nAssistant:")
    partial = vocab.decode(history[len(vocab.encode("User: Tell me a story\n\nAssistant:")):])
    assert "\n\nUser: Shorter please\n\nAssistant:" in partial      # the partial reply was closed with "\n\n"
    fed = [t for ids, _ in model.calls for t in ids]
    assert history[:len(fed)] == fed


def test_chat_interrupt_inside_the_model(vocab):
    # Ctrl-C while the model reads the message: the turn is dropped, the session is unchanged.
    model = FakeModel(vocab, fail_at_call=0)
    chat = ChatSession(model, params=SamplingParams.chat(seed=2), preamble="", max_reply_tokens=5)
    with pytest.raises(KeyboardInterrupt):
        chat.ask("first")
    assert chat.history == [] and model.calls == []
    chat.ask("second")
    assert vocab.decode(chat.history).startswith("User: second\n\nAssistant:")

    # Ctrl-C during a reply token's forward call: the reply so far is kept and closed.
    model = FakeModel(vocab, fail_at_call=3)
    chat = ChatSession(model, params=SamplingParams.chat(seed=2, top_p=1.0), preamble="", max_reply_tokens=50)
    gen = chat.reply("first")
    with pytest.raises(KeyboardInterrupt):
        for _ in gen:
            pass
    assert len(gen.tokens) == 3
    chat.ask("second")
    fed = [t for ids, _ in model.calls for t in ids]
    assert chat.history[:len(fed)] == fed
    assert "\n\nUser: second\n\nAssistant:" in vocab.decode(chat.history)
    first_turn = vocab.encode("User: first\n\nAssistant:") + gen.tokens
    assert chat.history[:len(first_turn)] == first_turn


def test_chat_reset_and_state_files(vocab, tmp_path, monkeypatch):
    # call 0 reads the first message, call 2 is save_state feeding the pending "\n\n" ("x" is never used)
    model = ScriptedModel(vocab, script_of(vocab, " A", "\n\n", "x", " B", "\n\n"))
    chat = ChatSession(model, params=GREEDY, preamble="User: hi\n\nAssistant: yo\n\n")
    chat.ask("one")
    chat.save_state(tmp_path / "chat.state")     # feeds the pending tokens first
    saved = json.loads((tmp_path / "chat.state").read_text())
    assert saved == chat.history
    import rwkv_lite
    monkeypatch.setattr(rwkv_lite, "State",
                        type("S", (), {"load": staticmethod(lambda p, model=None: HistoryState(json.loads(Path(p).read_text())))}),
                        raising=False)
    chat2 = ChatSession(model, params=GREEDY, preamble=None)
    chat2.load_state(tmp_path / "chat.state")
    assert chat2.ask("two") == "B"
    assert model.calls[3][0] == vocab.encode("User: two\n\nAssistant:")   # nothing re-processed
    chat.reset()
    assert chat.history == vocab.encode("User: hi\n\nAssistant: yo\n\n")
    with pytest.raises(GenerationError, match="empty"):
        chat.reply(" \n ")
    with pytest.raises(GenerationError, match="nothing to save"):
        ChatSession(model, preamble=None).save_state(tmp_path / "x")


# ------------------------------------------------------------------------------------------------ state buffers

class CopyingOnly:
    """A real model seen through forward() alone (no forward_in_place): every step gets a fresh state, the way
    generate() ran before it reused buffers. `interrupt_at`: raise KeyboardInterrupt in that forward_in_place call
    after the model has half-written its state."""

    def __init__(self, model, in_place=False, interrupt_at=None):
        self.model, self.tokenizer, self.config = model, model.tokenizer, model.config
        self.calls = 0
        if in_place:
            self.forward_in_place = self._forward_in_place
        self.interrupt_at = interrupt_at

    def forward(self, tokens, state=None):
        return self.model.forward(tokens, state)

    def _forward_in_place(self, tokens, state, source=None):
        self.calls += 1
        if self.calls == self.interrupt_at:
            for array in state.arrays.values():
                array[...] = 12345.0            # a step that was cut off part-way
            raise KeyboardInterrupt
        return self.model.forward_in_place(tokens, state, source=source)


@pytest.fixture(scope="module")
def demo_model():
    import rwkv_lite
    from rwkv_lite.demo import demo_model_path
    return rwkv_lite.load(demo_model_path())


def _same_state(a, b):
    return a.arrays.keys() == b.arrays.keys() and all(np.array_equal(a[k], b[k]) for k in a.arrays)


def test_generation_reuses_state_buffers_with_the_same_results(demo_model):
    params = SamplingParams(seed=7, temperature=1.0, top_p=0.9)
    start = demo_model.forward(demo_model.tokenizer.encode("And God said"))[1]
    start_copy = start.copy()
    plain = generate(CopyingOnly(demo_model), " Let", max_tokens=12, params=params, state=start)
    plain_text = "".join(plain)
    gen = generate(demo_model, " Let", max_tokens=12, params=params, state=start)
    states, handed_out, handed_copy = [], None, None
    for i, _ in enumerate(gen):
        states.append(gen._state)                   # (held, so that a freed state's id cannot come back)
        if i == 4:                                  # a caller keeps the state of the middle of the generation
            handed_out = gen.state
            handed_copy = handed_out.copy()
    assert gen.text == plain_text and gen.tokens == plain.tokens
    assert _same_state(gen.state, plain.state)
    assert _same_state(start, start_copy)               # the caller's state was never written
    assert _same_state(handed_out, handed_copy)         # nor the one handed out
    assert len(states) >= 10 and len({id(st) for st in states}) <= 4   # two buffers (+ the handed-out one and
                                                                           # its successor), not one per step


def test_interrupted_in_place_step_leaves_the_previous_state(demo_model):
    params = SamplingParams(seed=3, temperature=1.0)
    wrapped = CopyingOnly(demo_model, in_place=True, interrupt_at=3)
    gen = generate(wrapped, "In the beginning", max_tokens=20, params=params)
    with pytest.raises(KeyboardInterrupt):
        for _ in gen:
            pass
    assert wrapped.calls == 3                   # the in-place path ran (and was cut off)
    plain = generate(CopyingOnly(demo_model), "In the beginning", max_tokens=len(gen.tokens), params=params)
    "".join(plain)
    assert plain.tokens == gen.tokens
    assert _same_state(gen.state, plain.state)
