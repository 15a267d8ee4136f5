"""The token-level generation core (stream_generate and its Steps), Model.generate, the model as a context
manager and the public names of the package. Fake models for the exact step rules, the tiny real model for
the rest."""
from __future__ import annotations

import numpy as np
import pytest

import rwkv_lite
from rwkv_lite.evaluate import log_softmax
from rwkv_lite.generate import GenerationError, generate, stream_generate
from rwkv_lite.sampling import SamplingParams
from test_generate import GREEDY, FakeModel, ScriptedModel, TinyVocab, script_of


@pytest.fixture(scope="module")
def vocab():
    return TinyVocab()


def token_steps(steps):
    return [s for s in steps if s.token is not None]


@pytest.mark.parametrize("params", [SamplingParams(seed=3, top_p=1.0), SamplingParams(seed=9, temperature=0.7),
                                    GREEDY])
def test_step_ids_and_text_equal_generate(vocab, params):
    steps = list(stream_generate(FakeModel(vocab), "Hello world", params, max_tokens=20))
    gen = generate(FakeModel(vocab), "Hello world", max_tokens=20, params=params)
    text = "".join(gen)
    assert [s.token for s in token_steps(steps)] == gen.tokens
    assert "".join(s.text for s in steps) == text
    assert all(s.finish_reason is None for s in steps[:-1])
    assert steps[-1].token is None and steps[-1].finish_reason in ("stop", "length")


def test_logprob_is_log_softmax_of_the_logits_at_that_step(vocab):
    model = FakeModel(vocab)
    steps = token_steps(stream_generate(model, "Hello", SamplingParams(seed=1, top_p=1.0), max_tokens=6,
                                        logprobs=3))
    assert len(steps) == 6
    # calls[0] read the prompt; the logits each token was sampled from are those of the call before it
    for i, step in enumerate(steps):
        logits = model.calls[i][1]
        expected = log_softmax(logits[None, :])[0]
        assert step.logprob == pytest.approx(float(expected[step.token]), abs=1e-9)
        top_ids = np.argsort(-expected, kind="stable")[:3]
        assert [t for t, _ in step.top_logprobs] == [int(t) for t in top_ids]
        assert [lp for _, lp in step.top_logprobs] == pytest.approx([float(expected[t]) for t in top_ids])


def test_finish_reasons(vocab):
    # the budget: "length", and the final step carries no token
    steps = list(stream_generate(FakeModel(vocab), "Hi", GREEDY, max_tokens=4))
    assert len(token_steps(steps)) == 4 and steps[-1].finish_reason == "length"
    # params.max_tokens applies when max_tokens is not given
    steps = list(stream_generate(FakeModel(vocab), "Hi", SamplingParams.greedy(max_tokens=2)))
    assert len(token_steps(steps)) == 2
    # end-of-text: "stop", and end-of-text is not a step
    model = ScriptedModel(vocab, script_of(vocab, "H", "i"))
    steps = list(stream_generate(model, "x", GREEDY, max_tokens=10))
    assert [s.token for s in token_steps(steps)] == script_of(vocab, "H", "i")
    assert steps[-1].finish_reason == "stop" and steps[-1].token is None
    # a budget of 0: only the final step
    steps = list(stream_generate(FakeModel(vocab), "Hi", GREEDY, max_tokens=0))
    assert len(steps) == 1 and steps[0].finish_reason == "length"


def test_stop_string_across_tokens(vocab):
    # "EN" + "D" is generated as three tokens "E", "N", "D"; the stop string "END" spans them
    model = ScriptedModel(vocab, script_of(vocab, "a", "b", "E", "N", "D", "c", "d"))
    gen = stream_generate(model, "x", SamplingParams.greedy(stop=("END",)), max_tokens=10)
    steps = list(gen)
    assert "".join(s.text for s in steps) == "ab" == gen.text
    assert [s.text for s in token_steps(steps)] == ["a", "b", "", "", ""]     # "E", "N" held back, then dropped
    assert steps[-1].finish_reason == "stop" and gen.stats.stop_reason == "stop"
    # a stop given to the call replaces params.stop
    model = ScriptedModel(vocab, script_of(vocab, "a", "b", "E", "N", "D", "c"))
    text = "".join(s.text for s in stream_generate(model, "x", SamplingParams.greedy(stop=("END",)),
                                                   max_tokens=6, stop=["b"]))
    assert text == "a"


def test_a_held_back_prefix_is_released_when_it_does_not_become_a_stop_string(vocab):
    model = ScriptedModel(vocab, script_of(vocab, "E", "N"))
    gen = stream_generate(model, "x", GREEDY, max_tokens=2, stop=["END"])
    steps = list(gen)
    assert [s.text for s in steps] == ["", "", "EN"] and steps[-1].finish_reason == "length"


def test_bad_arguments_are_one_clear_error(vocab):
    with pytest.raises(GenerationError, match="max_tokens"):
        stream_generate(FakeModel(vocab), "Hi", GREEDY, max_tokens=-1)
    with pytest.raises(rwkv_lite.RwkvLiteError, match="stop strings"):
        SamplingParams(stop=("",))


# ------------------------------------------------------------------------------------------------ the real model
def test_model_generate_context_manager_and_public_names(tiny_fp32):
    for name in ("load", "convert", "Model", "State", "generate", "stream_generate", "ChatSession",
                 "SamplingParams", "verify"):
        assert hasattr(rwkv_lite, name) and name in rwkv_lite.__all__
    with rwkv_lite.load(tiny_fp32) as model:
        text = model.generate("The ", max_tokens=12, params=GREEDY)
        gen = rwkv_lite.generate(model, "The ", max_tokens=12, params=GREEDY)
        assert text == "".join(gen) and len(gen.tokens) == 12
        steps = list(rwkv_lite.stream_generate(model, "The ", GREEDY, max_tokens=12))
        assert [s.token for s in token_steps(steps)] == gen.tokens
        # logprob of a real step: the log-softmax of the model's logits after the prompt
        logits, _ = model.forward(model.tokenizer.encode("The "))
        assert steps[0].logprob == pytest.approx(float(log_softmax(logits[None, :])[0][steps[0].token]),
                                                 abs=1e-6)
    assert model.weights is None                       # the with block closed the model
    with pytest.raises(Exception):
        model.forward([1])


def test_verify_reports_a_file_safetensors_cannot_read(tiny_fp32, tmp_path):
    assert rwkv_lite.verify(tiny_fp32).ok
    # bytes after the last array: the header's data offsets no longer cover the file, which safetensors
    # refuses; rwkv-lite's own reader and the checksums do not notice
    bad = tmp_path / "trailing.safetensors"
    bad.write_bytes(tiny_fp32.read_bytes() + b"\0" * 64)
    result = rwkv_lite.verify(bad)
    assert result.corrupted_arrays == [] and not result.ok
    assert result.safetensors_error and "covered" in result.safetensors_error
    from click.testing import CliRunner
    from rwkv_lite.cli import main
    run = CliRunner().invoke(main, ["verify", str(bad)])
    assert run.exit_code == 1
    errors = [line for line in run.stderr.splitlines() if line.startswith("error")]
    assert errors == [f"error: {bad}: the safetensors library cannot read it: {result.safetensors_error}"]


def test_the_engine_gives_the_steps_stream_generate_gives(tiny_fp32):
    """The batched engine runs the same per-sequence sampler: its Steps for each request (tokens, text pieces,
    logprobs, finish reason) equal stream_generate's for that prompt alone, and it honours params' max_tokens
    and stop strings."""
    from rwkv_lite.engine import Engine
    prompts = ["The ", "In the beginning ", "A"]
    params = [SamplingParams(seed=s, top_p=0.95, max_tokens=14, stop=("and",)) for s in (1, 2, 3)]
    with rwkv_lite.load(tiny_fp32) as model:
        alone = [list(stream_generate(model, p, sp)) for p, sp in zip(prompts, params)]
        engine = Engine(model, max_batch=3)
        got = [[] for _ in prompts]
        for i, (p, sp) in enumerate(zip(prompts, params)):
            engine.submit(p, params=sp, logprobs=0, on_step=got[i].append)
        while engine.has_work():
            engine.step()
    for ours, theirs in zip(got, alone):
        assert [s.token for s in ours] == [s.token for s in theirs]
        assert [s.text for s in ours] == [s.text for s in theirs]
        assert [s.finish_reason for s in ours] == [s.finish_reason for s in theirs]
        assert [s.logprob for s in ours] == pytest.approx([s.logprob for s in theirs], abs=1e-5, nan_ok=True)
        assert len(token_steps(theirs)) <= 14
