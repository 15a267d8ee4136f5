"""A one-token block in one compiled call (kernels/token_blocks.py: RWKV-5 and RWKV-7) gives the bits of the
step-by-step path (the version module's time_mix and channel_mix), for int8 and int4 files of shapes with and
without whole panels and groups, with one thread and with all, stepping in place and from a source state; the
same for a batched step of several sequences (rwkv5/7_block_rows); files it does not cover take the step-by-step
path."""
import numba
import numpy as np
import pytest

import checkpoint_writers as cw
import reference_models as rm
import rwkv_lite
from rwkv_lite.arch import v5, v7

_MODELS = {}


@pytest.fixture(scope="module")
def model_of(tmp_path_factory):
    def get(name, quant):
        if (name, quant) not in _MODELS:
            spec = rm.SPECS_BY_NAME[name]
            folder = tmp_path_factory.mktemp(name)
            src = cw.save_pth(rm.make_state_dict(spec), folder / "model.pth")
            dst = folder / f"{quant}.safetensors"
            rwkv_lite.convert(src, dst, quant=quant)
            _MODELS[name, quant] = rwkv_lite.load(dst)
        return _MODELS[name, quant]
    yield get
    for m in _MODELS.values():
        m.close()
    _MODELS.clear()


def _count_calls(monkeypatch, module, function) -> list:
    """Wrap module.function so that every call appends to the returned list."""
    calls, real = [], getattr(module, function)

    def counted(*args):
        calls.append(1)
        return real(*args)
    monkeypatch.setattr(module, function, counted)
    return calls


def _decode(model, fused, tokens, source_steps):
    """Logits of a 5-token prompt then one token at a time (every other step from a source state, as generate()'s
    double buffering does), and the final state."""
    model.weights.block_token = fused
    try:
        state = model.new_state()
        logits = [model.forward_in_place(tokens[:5], state)]
        spare = model.new_state()
        for i, t in enumerate(tokens[5:]):
            if source_steps and i % 2:
                logits.append(model.forward_in_place([t], spare, source=state))
                state, spare = spare, state
            else:
                logits.append(model.forward_in_place([t], state))
        return np.stack(logits), state
    finally:
        model.weights.block_token = True


# version module and its block call for each spec: RWKV-7 with and without layer 0's unused value LoRA, RWKV-5.0
# (no gate, per-head decay) and 5.2 (gate, per-channel decay, the Eagle FFN width)
BLOCK_CALL = {"v7_a": (v7, "rwkv7_block_token"), "v7_b": (v7, "rwkv7_block_token"),
              "v50_a": (v5, "rwkv5_block_token"), "v52_b": (v5, "rwkv5_block_token")}


@pytest.mark.parametrize("name", list(BLOCK_CALL))
@pytest.mark.parametrize("quant", ["int8", "int4"])
@pytest.mark.parametrize("source_steps", [False, True])
def test_block_call_equals_the_step_by_step_path(name, quant, source_steps, model_of, monkeypatch):
    model = model_of(name, quant)
    assert model.weights.block_token                 # every block covered: panel matrices, a LoRA chain
    module, function = BLOCK_CALL[name]
    calls = _count_calls(monkeypatch, module, function)
    tokens = [int(t) for t in rm.token_sequence(rm.SPECS_BY_NAME[name])[:13]]
    for threads in sorted({1, numba.config.NUMBA_NUM_THREADS}):
        with_threads = numba.get_num_threads()
        numba.set_num_threads(threads)
        try:
            calls.clear()
            want, want_state = _decode(model, False, tokens, source_steps)
            assert not calls
            got, got_state = _decode(model, True, tokens, source_steps)
            assert len(calls) == 8 * model.config["n_layer"]      # every decode step, every block
        finally:
            numba.set_num_threads(with_threads)
        np.testing.assert_array_equal(got, want)
        for key in want_state.arrays:
            np.testing.assert_array_equal(got_state.arrays[key], want_state.arrays[key], err_msg=key)


@pytest.mark.parametrize("name", ["v7_a", "v52_b"])
def test_files_it_does_not_cover_take_the_step_path(name, model_of, monkeypatch):
    """fp32 matrices (no panel kernels), and a pass with an observer (it must see every product)."""
    assert not model_of(name, "fp32").weights.block_token
    model = model_of(name, "int8")
    module, function = BLOCK_CALL[name]
    monkeypatch.setattr(module, function, lambda *a: pytest.fail("observed pass took the block call"))
    seen = []
    model.forward([3], observer=lambda name, x: seen.append(name))
    assert "blocks.1.att.receptance.weight" in seen and "blocks.1.ffn.value.weight" in seen


@pytest.mark.parametrize("name, quant", [("v7_a", "int8"), ("v7_b", "int4"), ("v50_a", "int4"), ("v52_b", "int8")])
def test_batched_block_call_equals_the_batched_step_path(name, quant, model_of, monkeypatch):
    """A batched step of 3 sequences runs each block as one call (rwkv5/7_block_rows) with the bits of the
    version's time_mix_batch and channel_mix_batch: logits and every sequence's state."""
    from rwkv_lite.arch import common
    model = model_of(name, quant)
    module, function = BLOCK_CALL[name]
    calls = _count_calls(monkeypatch, module, function.replace("_token", "_rows"))
    tokens = [int(t) for t in rm.token_sequence(rm.SPECS_BY_NAME[name])[:12]]
    got_states = [model.forward(tokens[3 * b: 3 * b + 2 + b])[1] for b in range(3)]
    want_states = [s.copy() for s in got_states]
    W = model.weights
    for step in range(3):
        ids = np.array(tokens[step: step + 3], np.int64)
        got = model.forward_batch(ids, got_states)
        want = common.forward_batch(module.time_mix_batch, module.channel_mix_batch, W, ids,
                                    [s.arrays for s in want_states])
        np.testing.assert_array_equal(got, want, err_msg=f"step {step}")
    assert len(calls) == 3 * model.config["n_layer"]
    for g, w in zip(got_states, want_states):
        for key in w.arrays:
            np.testing.assert_array_equal(g.arrays[key], w.arrays[key], err_msg=key)
