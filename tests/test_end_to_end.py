"""Convert -> load -> generate / chat on the real tiny rwkv.cpp model, checking that carried states are exact.

RWKV's promise is that the state after a conversation is the state after reading its transcript: these tests
compare the state (and next logits) kept by generate() and ChatSession against one forward call over the whole
transcript from the initial state."""
from __future__ import annotations

import numpy as np
import pytest

import rwkv_lite
from rwkv_lite.generate import ChatSession, generate
from rwkv_lite.sampling import SamplingParams

# Sequence mode (one call over many tokens) and token-by-token accumulate float32 rounding differently.
RTOL, ATOL = 1e-4, 1e-4


@pytest.fixture(scope="module")
def model(tiny_fp32):
    # One thread: the tiny model's 64-wide matrices gain nothing from threads, and on a busy machine a thread
    # pool costs them 10-30x. The previous count is restored for the next module.
    import numba
    from rwkv_lite.kernels.threads import set_threads
    before = numba.get_num_threads()
    set_threads(1)
    dst = tiny_fp32
    model = rwkv_lite.load(dst)
    yield model
    model.close()
    set_threads(before)


class RecordingModel:
    """The real model, recording every forward call's ids and returned logits."""

    def __init__(self, model):
        self._model = model
        self.tokenizer = model.tokenizer
        self.calls: list[tuple[list[int], np.ndarray]] = []

    def forward(self, tokens, state=None, all_logits=False):
        logits, new_state = self._model.forward(tokens, state, all_logits)
        self.calls.append(([int(t) for t in tokens], logits))
        return logits, new_state

    def fed(self) -> list[int]:
        return [t for ids, _ in self.calls for t in ids]


def test_generation_state_plus_one_token_equals_the_whole_transcript(model):
    prompt = "The "
    gen = generate(model, prompt, max_tokens=24, params=SamplingParams(seed=5, temperature=0.8))
    text = "".join(gen)
    assert len(gen.tokens) == 24 and text == model.tokenizer.decode(gen.tokens)
    next_token = model.tokenizer.encode("e")[0]
    logits, state = model.forward([next_token], gen.state)

    transcript = model.tokenizer.encode(prompt) + gen.tokens + [next_token]
    assert model.tokenizer.decode(transcript) == prompt + text + "e"
    whole_logits, whole_state = model.forward(transcript)
    np.testing.assert_allclose(logits, whole_logits, rtol=RTOL, atol=ATOL)
    for name, array in whole_state.arrays.items():
        np.testing.assert_allclose(state.arrays[name], array, rtol=RTOL, atol=ATOL, err_msg=name)
    # and the next token's choice agrees
    assert int(np.argmax(logits)) == int(np.argmax(whole_logits))


def test_generation_never_reprocesses_and_leaves_the_input_state_alone(model):
    recorder = RecordingModel(model)
    _, start_state = model.forward(model.tokenizer.encode("In the beginning "))
    before = {k: v.copy() for k, v in start_state.arrays.items()}
    gen = generate(recorder, "was ", max_tokens=10, params=SamplingParams.greedy(), state=start_state)
    list(gen)
    gen.state
    # the prompt once, then each generated token once
    assert recorder.fed() == model.tokenizer.encode("was ") + gen.tokens
    for name, array in before.items():
        np.testing.assert_array_equal(start_state.arrays[name], array)


def test_chat_turns_carry_the_state_exactly(model):
    """Each turn's first logits (computed while reading the new message) equal those of the whole transcript
    so far read at once from the initial state; and history is never read twice."""
    recorder = RecordingModel(model)
    session = ChatSession(recorder, params=SamplingParams.chat(seed=11), max_reply_tokens=20)
    messages = ["Hello, who are you?", "What is a license?", "Thanks"]
    replies = []
    for turn, message in enumerate(messages):
        first_call = len(recorder.calls)
        gen = session.reply(message)
        pieces = list(gen)
        replies.append("".join(pieces))
        ids_read, logits_after_message = recorder.calls[first_call]
        fed_so_far = recorder.fed()[:sum(len(ids) for ids, _ in recorder.calls[:first_call + 1])]
        assert model.tokenizer.decode(fed_so_far).endswith(f"User: {message}\n\nAssistant:")
        if turn > 0:
            # the call reading the new message holds only the end of the previous turn (its last reply token
            # and the closing "\n\n") and the message: history is not read again
            turn_ids = model.tokenizer.encode(f"User: {message}\n\nAssistant:")
            assert ids_read[-len(turn_ids):] == turn_ids and len(ids_read) - len(turn_ids) <= 3
            whole_logits, _ = model.forward(fed_so_far)
            np.testing.assert_allclose(logits_after_message, whole_logits, rtol=RTOL, atol=ATOL)
    # Everything fed equals the transcript (minus what is still pending): nothing was read twice.
    transcript_ids = model.tokenizer.encode(session.transcript)
    fed = recorder.fed()
    assert transcript_ids[:len(fed)] == fed
    assert len(transcript_ids) - len(fed) <= 3      # the last reply token and the closing "\n\n"
    assert len(replies) == 3
