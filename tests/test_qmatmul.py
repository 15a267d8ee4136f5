"""Matrix kernels (rwkv_lite/kernels/: simd.py, the per-scheme *_kernels.py, linear.py, threads.py) against NumPy
dequantise-then-matmul references."""
from __future__ import annotations

import numpy as np
import pytest

from rwkv_lite.errors import FormatError
from rwkv_lite.kernels import int4_kernels, simd, linear
from rwkv_lite.kernels.threads import get_threads, set_threads
from rwkv_lite.schemes import get_scheme, make_matrix

# column counts that are not multiples of the group, the 64-column block or the SIMD width, and a real width
SHAPES = [(37, 96), (1, 64), (65, 200), (130, 4096)]
SCHEMES = [("fp32", {}), ("fp16", {}), ("int8", {"group": 0}), ("int8", {"group": 32}), ("int8", {"group": 64}),
           ("int8", {"group": 128}), ("int4", {"group": 32}), ("int4", {"group": 64}), ("int4", {"group": 128})]
EPS32 = np.finfo(np.float32).eps


def build(name, params, shape, seed=0):
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal(shape) * 0.1).astype(np.float32)
    scheme = get_scheme(name, **params)
    parts = scheme.quantize(w)
    exact = scheme.dequantize(parts, cols=shape[1]) if name in ("int8", "int4") else scheme.dequantize(parts)
    return make_matrix(name, params, parts, shape=shape), exact.astype(np.float64)


def activations(shape, seed=1):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(np.float32)
    x[..., 3] = 20.0                                    # one large channel, as LLM activations have
    return x


def fp32_bound(w, x):
    """A float32 rounding bound for W x computed in any summation order: C * eps * sum_c |w_c x_c|."""
    return w.shape[1] * EPS32 * (np.abs(w) @ np.abs(x.astype(np.float64)).T).T + 1e-30


def gemv_bound(m, w, x):
    """Error bound of the decode kernel: float32 rounding, plus for int4 the rounding of x to 15 bits per
    64-column block (|dx| <= step / 2 = max|x in block| / 65534, see simd.quantize_activations)."""
    bound = fp32_bound(w, x)
    if hasattr(m, "block_source"):                  # int4 and group-scaled int8 use int16 activations
        src = m.block_source
        xp = np.zeros(m.padded_cols, np.float32)
        xp[: x.shape[0]] = x
        step = np.abs(xp[src]).reshape(-1, 64).max(1) / 32767
        dx = np.zeros(m.padded_cols)
        dx[src] = np.repeat(step / 2, 64)
        bound = bound + np.abs(w) @ dx[: x.shape[0]] * 1.001
    return bound


@pytest.mark.parametrize("name,params", SCHEMES)
@pytest.mark.parametrize("shape", SHAPES)
def test_gemv_matches_dequantized_reference(name, params, shape):
    m, w = build(name, params, shape)
    x = activations(shape[1])
    y = m(x)
    assert y.dtype == np.float32 and y.shape == (shape[0],)
    ref = w @ x.astype(np.float64)
    assert (np.abs(y - ref) <= gemv_bound(m, w, x)).all(), np.abs(y - ref).max()
    if name == "int4":                      # with x kept in float32 it is exact to float32 rounding
        assert (np.abs(m.gemv_exact(x) - ref) <= fp32_bound(w, x)).all()


@pytest.mark.parametrize("name,params", SCHEMES)
@pytest.mark.parametrize("shape", SHAPES[:3])
@pytest.mark.parametrize("T", [1, 3, 17])
def test_sequence_mode_matches_dequantized_reference(name, params, shape, T):
    m, w = build(name, params, shape)
    X = activations((T, shape[1]))
    Y = m(X)
    assert Y.dtype == np.float32 and Y.shape == (T, shape[0])
    bound = gemv_bound(m, w, X[0])[None] if T == 1 else fp32_bound(w, X)     # one row goes through the GEMV
    assert (np.abs(Y - X.astype(np.float64) @ w.T) <= bound).all()


def test_sequence_mode_tiles_a_tall_matrix(monkeypatch):
    monkeypatch.setattr(linear, "TILE_FLOATS", 128 * 128)       # three tiles of 128 rows, the last one short
    m, w = build("int4", {"group": 32}, (300, 128))
    X = activations((5, 128))
    assert (np.abs(m(X) - X.astype(np.float64) @ w.T) <= fp32_bound(w, X)).all()


@pytest.mark.parametrize("name,params", SCHEMES)
def test_rows_are_dequantized_rows(name, params):
    m, w = build(name, params, (65, 200))
    ids = np.array([0, 64, 3, 3, 17])
    np.testing.assert_array_equal(m.rows(ids), w[ids].astype(np.float32))
    assert m.rows([]).shape == (0, 200)
    with pytest.raises(IndexError):
        m.rows([65])


@pytest.mark.parametrize("name,params", SCHEMES)
def test_results_do_not_depend_on_thread_count(name, params):
    m, _ = build(name, params, (300, 256))
    x = activations(256)
    X = activations((4, 256))
    serial = m(x)
    m.parallel = True                               # the small-matrix switch aside, use the thread pool
    before = get_threads()
    try:
        set_threads(1)
        one = m(x), m(X)
        set_threads(2)
        two = m(x), m(X)
    finally:
        set_threads(before)
    np.testing.assert_array_equal(one[0], two[0])
    np.testing.assert_array_equal(one[0], serial)
    np.testing.assert_allclose(one[1], two[1], rtol=1e-6, atol=1e-6)   # BLAS may split sums differently


def test_small_matrices_skip_the_thread_pool():
    assert not build("int8", {"group": 0}, (64, 64))[0].parallel
    assert build("int4", {"group": 32}, (130, 4096))[0].parallel


@pytest.mark.parametrize("name,params", [s for s in SCHEMES if s[0] != "fp32"])
def test_nan_in_input_reaches_the_output(name, params):
    m, _ = build(name, params, (8, 128))
    x = activations(128)
    x[70] = np.nan
    assert np.isnan(m(x)).all()
    x[70] = np.inf
    assert not np.isfinite(m(x)).all()


def test_float64_and_strided_inputs_are_accepted():
    for params in ({"group": 0}, {}):
        m, w = build("int8", params, (16, 96))
        x = activations(192)[::2].astype(np.float64)
        assert np.allclose(m(x), w @ x, rtol=1e-4, atol=1e-4)


def test_wrong_input_width_is_an_error():
    m, _ = build("int4", {"group": 32}, (8, 200))
    with pytest.raises(ValueError, match="cannot multiply"):
        m(np.zeros(256, np.float32))                # the padded width is not the matrix's width
    with pytest.raises(ValueError):
        m(np.zeros((2, 3, 200), np.float32))


def test_group_scaled_int8_layout():
    m, _ = build("int8", {"group": 32}, (4, 200))
    assert m.q.shape == (4, 256) and m.scale.shape == (4, 8) and m.shape == (4, 200)
    assert m.nbytes == 4 * 256 + 4 * 8 * 2


def test_nbytes_counts_every_stored_array():
    m, _ = build("int4", {"group": 32}, (64, 4096))
    assert m.nbytes == 64 * 2048 + 64 * 128 * 2
    m, _ = build("int8", {"group": 0}, (64, 4096))
    assert m.nbytes == 64 * 4096 + 64 * 4


def test_make_matrix_checks_its_parts():
    parts = get_scheme("int4", group=32).quantize(np.ones((4, 64), np.float32))
    with pytest.raises(FormatError, match="missing"):
        make_matrix("int4", {"group": 32}, {"": parts[""]})
    with pytest.raises(FormatError, match="do not fit"):
        make_matrix("int4", {"group": 64}, parts)
    with pytest.raises(FormatError, match="columns"):
        make_matrix("int4", {"group": 32}, parts, shape=(4, 200))
    with pytest.raises(FormatError, match="unknown storage scheme"):
        make_matrix("int3", {}, parts)
    with pytest.raises(FormatError, match="expected int8"):
        make_matrix("int8", {"group": 0}, {"": np.zeros((4, 64), np.uint8), ".scale": np.ones(4, np.float32)})
    with pytest.raises(FormatError, match="expected"):
        make_matrix("fp32", {}, {"": np.zeros((4, 64), np.float32)}, shape=(4, 65))


def test_block_source_is_a_permutation_pairing_low_and_high_nibbles():
    for group in simd.INT4_GROUPS:
        src = int4_kernels.block_source(group, 256)
        assert sorted(src) == list(range(256))
        # byte i of a group holds columns i and i + group/2: the two halves of every block are group/2 apart
        assert (src.reshape(-1, 2, 32)[:, 1] - src.reshape(-1, 2, 32)[:, 0] == group // 2).all()


def test_set_threads():
    before = get_threads()
    try:
        assert set_threads(1) == 1 and get_threads() == 1
        assert set_threads(10_000) == get_threads() >= 1        # capped by Numba's pool
        with pytest.raises(ValueError):
            set_threads(0)
    finally:
        set_threads(before)
