"""The continuous-batching engine (rwkv_lite/engine.py), generate_batch and the prefix state cache, on the
built-in demo model (byte-level RWKV-5.2, int8): every request's output equals the same request run alone through
rwkv_lite.generate, whatever else is running, and the scheduler's promises hold (slots, queue bound,
cancellation, chunked prompt reading, cache hits that skip the cached tokens)."""
from __future__ import annotations

import math

import numpy as np
import pytest

import rwkv_lite
from rwkv_lite.demo import demo_model_path
from rwkv_lite.engine import Engine, QueueFullError, generate_batch
from rwkv_lite.generate import GenerationError, generate_text
from rwkv_lite.prefix_cache import PrefixCache
from rwkv_lite.sampling import SamplingParams

PROMPTS = ["And God said", "In the beginning", "The LORD is my shepherd", "Blessed are the",
           "And it came to pass, when", "Jesus wept.", "Then", "Verily, verily, I say unto you"]


@pytest.fixture(scope="module")
def model():
    m = rwkv_lite.load(demo_model_path())
    yield m
    m.close()


def test_generate_batch_equals_generate_greedy_and_seeded(model):
    greedy = SamplingParams.greedy()
    got = generate_batch(model, PROMPTS, max_tokens=24, params=greedy, max_batch=5)
    for p, r in zip(PROMPTS, got):
        assert r.text == generate_text(model, p, max_tokens=24, params=greedy)
        assert r.finish_reason == "length" and r.usage.completion_tokens == 24 == len(r.tokens)
        assert r.usage.prompt_tokens == len(model.tokenizer.encode(p))
    seeded = [SamplingParams(seed=10 + i, top_p=0.95) for i in range(len(PROMPTS))]
    got = generate_batch(model, PROMPTS, max_tokens=24, params=seeded, stop=["\n", "LORD"], max_batch=3)
    reasons = set()
    for p, sp, r in zip(PROMPTS, seeded, got):
        assert r.text == generate_text(model, p, max_tokens=24, params=sp, stop=["\n", "LORD"]), p
        reasons.add(r.finish_reason)
    assert reasons <= {"stop", "length"}


def test_finished_requests_states_are_reset_and_reused(model, monkeypatch):
    """A request that starts after others finished reads its prompt into one of their states, reset to the
    initial values (no fresh pages to fault in): its text is still its solo text, with a state-tuned initial
    state too."""
    made = []
    new_state = model.new_state
    monkeypatch.setattr(model, "new_state", lambda: made.append(1) or new_state())
    engine = Engine(model, max_batch=2)
    greedy = SamplingParams.greedy()
    requests = [engine.submit(p, max_tokens=10, params=greedy) for p in PROMPTS]
    while engine.has_work():
        engine.step()
    assert len(made) == 2 < len(PROMPTS)
    for p, r in zip(PROMPTS, requests):
        assert r.text == generate_text(model, p, max_tokens=10, params=greedy)

    _, tuned = model.forward(model.tokenizer.encode("In the beginning"))
    model.initial_state = tuned
    try:
        r = engine.submit(PROMPTS[1], max_tokens=10, params=greedy)
        while engine.has_work():
            engine.step()
        assert r.text == generate_text(model, PROMPTS[1], max_tokens=10, params=greedy)
        state = engine._spare_states[-1]
        model.reset_state(state)
        assert all(np.array_equal(a, tuned.arrays[k]) for k, a in state.arrays.items())
    finally:
        model.initial_state = None


def test_requests_joining_at_every_step_give_their_solo_text(model):
    engine = Engine(model, max_batch=3, prefill_chunk=4)
    params = [SamplingParams.greedy(), SamplingParams(seed=3), SamplingParams(seed=4, temperature=0.7)]
    requests, occupancy = [], []
    for i, p in enumerate(PROMPTS):                      # one new request per step, more than the slots
        requests.append(engine.submit(p, max_tokens=12 + i, params=params[i % 3]))
        engine.step()
        occupancy.append(engine.running)
    while engine.has_work():
        engine.step()
        occupancy.append(engine.running)
    assert max(occupancy) == 3
    for i, (p, r) in enumerate(zip(PROMPTS, requests)):
        assert r.done.is_set() and r.finish_reason == "length"
        assert r.text == generate_text(model, p, max_tokens=12 + i, params=params[i % 3])


def test_prompt_reading_is_chunked_and_interleaved_with_decoding(model):
    engine = Engine(model, max_batch=4, prefill_chunk=16)
    running = engine.submit("And God said", max_tokens=200, params=SamplingParams.greedy())
    while running.usage.completion_tokens < 2:
        engine.step()
    long_prompt = "In the beginning God created the heaven and the earth. " * 6          # 330 bytes
    newcomer = engine.submit(long_prompt, max_tokens=3, params=SamplingParams.greedy())
    steps = 0
    while newcomer.usage.completion_tokens == 0:
        before = running.usage.completion_tokens
        engine.step()
        steps += 1
        assert running.usage.completion_tokens == before + 1      # the running stream never skips a step
    assert steps >= math.ceil(len(long_prompt) / 16)
    running.cancel()
    while engine.has_work():
        engine.step()
    assert newcomer.text == generate_text(model, long_prompt, max_tokens=3, params=SamplingParams.greedy())


def test_queue_bound_and_cancellation(model):
    engine = Engine(model, max_batch=1, max_queue=2)
    first = engine.submit("And", max_tokens=1000, params=SamplingParams.greedy())
    engine.step()                                        # `first` takes the only slot
    engine.submit("God", max_tokens=2)
    waiting = engine.submit("said", max_tokens=2)
    with pytest.raises(QueueFullError):
        engine.submit("Let there be light", max_tokens=2)
    assert engine.metrics.rejected == 1
    waiting.cancel()
    first.cancel()
    engine.step()
    assert first.finish_reason == "cancelled" and waiting.finish_reason == "cancelled"
    assert engine.running == 1                           # the freed slot went to the next request at once
    engine.submit("Let there be light", max_tokens=2)    # and the queue has room again
    while engine.has_work():
        engine.step()
    assert first.usage.completion_tokens < 1000


def test_bad_requests_are_refused_with_a_clear_error(model):
    engine = Engine(model)
    with pytest.raises(GenerationError, match="max_tokens"):
        engine.submit("x", max_tokens=-1)
    with pytest.raises(GenerationError, match="stop strings"):
        engine.submit("x", stop=[""])
    with pytest.raises(GenerationError, match="logprobs"):
        engine.submit("x", logprobs=6)
    with pytest.raises(GenerationError, match="outside the vocabulary"):
        engine.submit([1, 10 ** 6])
    assert not engine.has_work()


def test_logprobs_are_the_models_log_softmax(model):
    engine = Engine(model)
    steps = []
    r = engine.submit("And God", max_tokens=3, params=SamplingParams.greedy(), logprobs=5, on_step=steps.append)
    while engine.has_work():
        engine.step()
    logits, state = model.forward(model.tokenizer.encode("And God"))
    for step in steps[:-1]:
        x = logits.astype(np.float64)
        lsm = x - (x.max() + np.log(np.exp(x - x.max()).sum()))
        assert step.token == int(np.argmax(x))
        assert step.logprob == pytest.approx(lsm[step.token], abs=1e-6)
        assert [t for t, _ in step.top_logprobs] == list(np.argsort(-lsm, kind="stable")[:5])
        assert [lp for _, lp in step.top_logprobs] == pytest.approx(np.sort(lsm)[::-1][:5], abs=1e-6)
        logits, state = model.forward([step.token], state)
    assert steps[-1].finish_reason == "length" and r.usage.completion_tokens == 3


def test_prefix_cache_second_turn_reads_only_new_tokens(model):
    """A conversation's second turn extends the first turn's prompt and reply: with the cache it reads only
    the new tokens, and its output equals the uncached run."""
    tok = model.tokenizer
    turn1 = tok.encode("User: Who made the heaven?\n\nAssistant:")
    cache = PrefixCache(64 << 20)
    engine = Engine(model, cache=cache, prefill_chunk=8)
    first = engine.submit(turn1, max_tokens=80, params=SamplingParams.greedy(), stop=[","])
    while engine.has_work():
        engine.step()
    assert first.finish_reason == "stop"
    reply = first.tokens                                 # what the next turn's prompt repeats
    turn2 = turn1 + reply + tok.encode("User: And the earth?\n\nAssistant:")
    read_before = engine.metrics.prompt_tokens_read
    second = engine.submit(turn2, max_tokens=20, params=SamplingParams.greedy())
    while engine.has_work():
        engine.step()
    assert second.usage.cached_tokens == len(turn1)      # the first prompt's state (no cache_final given)
    assert engine.metrics.prompt_tokens_read - read_before == len(turn2) - len(turn1)
    assert engine.metrics.cache_hits == 1
    uncached = Engine(model, prefill_chunk=8)
    alone = uncached.submit(turn2, max_tokens=20, params=SamplingParams.greedy())
    while uncached.has_work():
        uncached.step()
    assert second.text == alone.text

    # reply_suffix: the state after the reply up to the suffix is kept aside and cached when the request stops,
    # so the next turn, which repeats the reply, reads only its own new tokens (chat: suffix "\n\n", stop
    # "\n\nUser:"; here "," and ", they")
    engine = Engine(model, cache=PrefixCache(64 << 20), prefill_chunk=8)
    first = engine.submit(turn1, max_tokens=80, params=SamplingParams.greedy(), stop=[", they"], reply_suffix=",")
    assert first.wait(0) is False
    while engine.has_work():
        engine.step()
    assert first.finish_reason == "stop" and first.text + "," == tok.decode(reply)
    read_before = engine.metrics.prompt_tokens_read
    again = engine.submit(turn1, max_tokens=1)           # a hit on the whole prompt: no prompt reading at all
    while engine.has_work():
        engine.step()
    assert again.usage.cached_tokens == len(turn1) and engine.metrics.prompt_tokens_read == read_before
    assert again.tokens == first.tokens[:1]
    read_before = engine.metrics.prompt_tokens_read
    second = engine.submit(turn2, max_tokens=20, params=SamplingParams.greedy())
    while engine.has_work():
        engine.step()
    assert second.usage.cached_tokens == len(turn1) + len(reply)
    assert engine.metrics.prompt_tokens_read - read_before == len(turn2) - len(turn1) - len(reply)
    assert second.text == alone.text


def test_prefix_cache_is_bounded_and_least_recently_used(model):
    state = model.new_state()
    logits = np.zeros(model.config["vocab_size"], np.float32)
    one = state.nbytes() + logits.nbytes
    cache = PrefixCache(int(one * 3.5))
    for i in range(6):
        cache.store([1, 2, i], state, logits)
        assert cache.nbytes <= cache.max_bytes
    assert len(cache) == 3 and cache.evictions == 3
    assert cache.lookup([1, 2, 0, 9]) is None                    # evicted
    assert cache.lookup([1, 2, 5, 9])[0] == 3
    n, got, _ = cache.lookup([1, 2, 4])
    got.arrays["wkv"][:] = 7                                     # a hit is a copy: the cached state is intact
    assert not cache.lookup([1, 2, 4])[1].arrays["wkv"].any()


def test_queue_of_zero_admits_only_into_free_slots(model):
    engine = Engine(model, max_batch=2, max_queue=0)
    a = engine.submit("And", max_tokens=50)
    engine.submit("God", max_tokens=50)                  # two free slots: both accepted
    with pytest.raises(QueueFullError):
        engine.submit("said", max_tokens=1)
    engine.step()
    assert engine.running == 2
    with pytest.raises(QueueFullError):
        engine.submit("said", max_tokens=1)
    a.cancel()
    engine.step()
    engine.submit("said", max_tokens=1)                  # a slot is free again
    engine.shutdown()
    assert not engine.has_work()


def test_engine_thread_survives_a_failing_step(model, monkeypatch):
    """An unexpected error inside a step fails the requests it was running (finish_reason "error", message
    given) and the engine thread keeps serving the next ones."""
    engine = Engine(model, max_batch=2)
    calls = {"n": 0}
    real = engine._sample

    def flaky(r):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("boom")
        return real(r)
    monkeypatch.setattr(engine, "_sample", flaky)
    engine.start()
    try:
        first = engine.submit("And", max_tokens=10, params=SamplingParams.greedy())
        assert first.wait(60) and first.finish_reason == "error" and "boom" in first.error
        second = engine.submit("God", max_tokens=3, params=SamplingParams.greedy())
        assert second.wait(60) and second.finish_reason == "length"
    finally:
        engine.shutdown()
