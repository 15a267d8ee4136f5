"""Batched decode (Model.forward_batch, kernels/batched.py): B independent sequences advanced by one token each
give, row by row, what each sequence gives alone, for every version and storage scheme.

The products reuse the single-token GEMVs' per-row dot products and activation rounding, and RWKV-6/7's token
shift and LoRAs run row by row through the single-token calls, so rows agree exactly on these models (measured:
max difference 0 for every version and scheme); the bound asserted is sequence mode's (test_versions.py), the
one the issue allows, because int4's zero-point sum may be reassociated."""
from __future__ import annotations

import warnings

import numpy as np
import pytest

import checkpoint_writers as cw
import reference_models as rm
import rwkv_lite
from rwkv_lite.kernels import batched
from rwkv_lite.kernels.batched import matmul_rows
from rwkv_lite.schemes import get_scheme, make_matrix
from test_versions import ONE_SPEC_PER_VERSION

SCHEMES = ["fp32", "fp16", "int8", "int4"]


def _matrix(name, params, R, C, seed):
    w = np.random.default_rng(seed).standard_normal((R, C), dtype=np.float32) / np.sqrt(C)
    scheme = get_scheme(name, **params)
    return make_matrix(name, scheme.params, scheme.quantize(w), (R, C))


@pytest.mark.parametrize("name, params", [("fp32", {}), ("fp16", {}), ("int8", {"group": 0}),
                                          ("int8", {"group": 32}), ("int8", {"group": 64}),
                                          ("int8", {"group": 128}), ("int4", {"group": 32}),
                                          ("int4", {"group": 64}), ("int4", {"group": 128})])
@pytest.mark.parametrize("C", [520, 1024])
@pytest.mark.parametrize("threads", ["serial", "parallel"])
def test_batched_product_rows_equal_single_token_gemv(name, params, C, threads, monkeypatch):
    monkeypatch.setattr(batched, "PARALLEL_MIN_WORK", 1 if threads == "parallel" else 1 << 62)
    R = 130                                     # not a multiple of the row block
    matrix = _matrix(name, params, R, C, seed=C)
    rng = np.random.default_rng(1)
    for B in (1, 3, 33):
        X = rng.standard_normal((B, C), dtype=np.float32)
        X[0, :64] = 0.0                         # an all-zero activation block (step 0)
        Y = matmul_rows(matrix, X)
        assert Y.shape == (B, R) and Y.dtype == np.float32
        single = np.stack([matrix(x) for x in X])
        if name == "int4":                      # the zero-point sum is written once per row: reassociated
            np.testing.assert_allclose(Y, single, rtol=0, atol=2e-6 * np.abs(single).max())
        else:                                   # the very same row dots on the same rounded activations
            np.testing.assert_array_equal(Y, single)


def test_batched_product_refuses_wrong_width():
    matrix = _matrix("int8", {"group": 32}, 64, 128, 0)
    with pytest.raises(ValueError, match="cannot multiply"):
        matmul_rows(matrix, np.zeros((2, 127), np.float32))


_MODELS: dict = {}


@pytest.fixture(scope="module")
def model_of(tmp_path_factory):
    def get(name, quant):
        if (name, quant) not in _MODELS:
            folder = tmp_path_factory.mktemp(f"{name}-{quant}")
            src = cw.save_pth(rm.make_state_dict(rm.SPECS_BY_NAME[name]), folder / "model.pth")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")            # these models run on token ids: no tokenizer
                rwkv_lite.convert(src, folder / "m.safetensors", quant=quant)
            _MODELS[name, quant] = rwkv_lite.load(folder / "m.safetensors")
        return _MODELS[name, quant]
    yield get
    for m in _MODELS.values():
        m.close()
    _MODELS.clear()


@pytest.mark.parametrize("name", ONE_SPEC_PER_VERSION)
@pytest.mark.parametrize("quant", SCHEMES)
def test_batched_step_equals_each_sequence_alone(name, quant, model_of):
    """B = 6 sequences with different prompts (lengths 1..11) decode greedily together: every step's logits row
    equals that sequence's single-token forward bit for bit (every product, WKV update, token shift and LoRA of
    a batched step is the single-token computation of each row), so are the greedy tokens and the final states."""
    model = model_of(name, quant)
    tokens = [int(t) for t in rm.token_sequence(rm.SPECS_BY_NAME[name])[:40]]
    prompts = [tokens[3 * b: 3 * b + 1 + 2 * b] for b in range(6)]
    alone_states, batch_states, last = [], [], []
    for p in prompts:
        logits, state = model.forward(p)
        alone_states.append(state)
        batch_states.append(state.copy())
        last.append(int(np.argmax(logits)))
    alone_next, batch_next = list(last), list(last)
    for step in range(8):
        rows = model.forward_batch(batch_next, batch_states)
        assert rows.shape == (6, model.config["vocab_size"])
        for b in range(6):
            want, alone_states[b] = model.forward([alone_next[b]], alone_states[b])
            np.testing.assert_array_equal(rows[b], want, err_msg=f"{name} {quant} step {step} row {b}")
            alone_next[b] = int(np.argmax(want))
        batch_next = [int(t) for t in rows.argmax(axis=1)]
        assert batch_next == alone_next, f"{name} {quant}: greedy tokens differ at step {step}"
    for s_batch, s_alone in zip(batch_states, alone_states):
        for k, arr in s_alone.arrays.items():
            np.testing.assert_array_equal(s_batch.arrays[k], arr, err_msg=f"{name} {quant} {k}")


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_batch_of_33_identical_prompts_gives_identical_rows(quant, model_of):
    """33 copies of one sequence: every row is the same as the single-token forward (B beyond 32)."""
    model = model_of("v52_a", quant)
    _, state = model.forward([1, 2, 3])
    want, _ = model.forward([4], state)
    states = [state.copy() for _ in range(33)]
    rows = model.forward_batch([4] * 33, states)
    np.testing.assert_array_equal(rows, np.broadcast_to(want, rows.shape))


@pytest.mark.parametrize("name, quant", [("v7_b", "int8"), ("v52_a", "int4"), ("v4_a", "fp32")])
def test_one_sequence_takes_the_single_token_path(name, quant, model_of, monkeypatch):
    """B = 1 (a server with one client) runs forward()'s single-token step, not the batched kernels: the same
    logits and state bit for bit, and a row that is not finite still comes back instead of raising."""
    model = model_of(name, quant)
    _, state = model.forward([1, 2, 3])
    want, want_state = model.forward([4], state)
    monkeypatch.setattr(model.arch, "forward_batch", lambda *a, **k: pytest.fail("B = 1 took the batched path"))
    rows = model.forward_batch([4], [state])
    np.testing.assert_array_equal(rows, want[None, :])
    for k, arr in want_state.arrays.items():
        np.testing.assert_array_equal(state.arrays[k], arr, err_msg=k)
    state.arrays["att_x"][0, 0] = np.nan                      # (every version has att_x)
    assert not np.isfinite(model.forward_batch([5], [state])).all()


def test_forward_batch_refuses_bad_input(model_of):
    model = model_of("v4_a", "fp32")
    s = model.new_state()
    with pytest.raises(ValueError, match="one token per state"):
        model.forward_batch([1, 2], [s])
    with pytest.raises(ValueError, match="same state"):
        model.forward_batch([1, 2], [s, s])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model.forward_batch([10 ** 6], [s])


@pytest.mark.parametrize("name", ["v4_a", "v52_a", "v6_a", "v7_b"])
@pytest.mark.parametrize("quant", ["fp32", "int8", "int4"])
def test_batched_step_never_calls_blas(name, quant, tmp_path):
    """A batched step keeps one owner of the cores too: every model array is trapped (tests/test_decode_no_blas.py)
    and the step gives exactly the untrapped result."""
    from test_decode_no_blas import _model, _trap
    model = _model(tmp_path, name, quant)
    _, state = model.forward([1, 2, 3])
    states = [state.copy() for _ in range(3)]
    plain = model.forward_batch([4, 5, 6], [s.copy() for s in states])
    for L in model.weights.layers:
        _trap(L)
    _trap(model.weights)
    np.testing.assert_array_equal(model.forward_batch([4, 5, 6], states), plain)


@pytest.mark.parametrize("B", [1, 3, 17])
@pytest.mark.parametrize("C", [64, 2048])
def test_batched_lowrank_rows_equal_single_token_products(B, C):
    """RWKV-6/7 LoRA factors for B rows in one launch (serial for the small shape, parallel for the large one)
    give each row exactly kernels/lowrank.py's single-token result."""
    from rwkv_lite.kernels.batched import lowrank_down_rows, lowrank_up_rows
    from rwkv_lite.kernels.lowrank import down_many, up_many
    rng = np.random.default_rng(C + B)
    widths = (96, 32, 64, 256) if C > 64 else (8, 4)
    As = [rng.standard_normal((C, d), dtype=np.float32) for d in widths]
    Xs = [rng.standard_normal((B, C), dtype=np.float32) for _ in As]
    H = lowrank_down_rows(Xs, As)
    Bs = [rng.standard_normal((d, C), dtype=np.float32) for d in widths]
    Y = lowrank_up_rows(H, Bs)
    assert Y.shape == (len(widths), B, C)
    for b in range(B):
        want_h = down_many([x[b] for x in Xs], As)
        for m in range(len(widths)):
            np.testing.assert_array_equal(H[m][b], want_h[m])
        np.testing.assert_array_equal(Y[:, b], up_many([h[b] for h in H], Bs))
