"""kernels/pointwise.py: the row kernels give the same bits on one thread and split over the threads, and compute
what their NumPy expressions say; exp_f32 stays within 1 ulp of the C library's expf."""
import numpy as np
import pytest
from numba import njit

from rwkv_lite.kernels import pointwise as P

RNG = np.random.default_rng(7)


@njit(cache=True, error_model="numpy")
def _exp_loop(x, out):
    for i in range(x.shape[0]):
        out[i] = P.exp_f32(x[i])


@njit(cache=True)
def _libm_exp_loop(x, out):
    for i in range(x.shape[0]):
        out[i] = np.exp(x[i])


def rows(T, C=192, scale=3.0):
    return (RNG.standard_normal((T, C)) * scale).astype(np.float32)


def test_exp_f32_within_one_ulp_of_expf():
    x = np.linspace(-87.0, 88.5, 400_001, dtype=np.float32)
    got = np.empty_like(x)
    want = np.empty_like(x)
    _exp_loop(x, got)
    _libm_exp_loop(x, want)
    ulps = np.abs(got.view(np.int32).astype(np.int64) - want.view(np.int32).astype(np.int64))
    assert ulps.max() <= 1
    exact = np.exp(x.astype(np.float64))
    assert np.max(np.abs(got - exact) / exact) < 1.2e-7


def test_exp_f32_edges():
    x = np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, 88.72, 88.73, -87.3, -87.4, -200.0, 200.0], np.float32)
    got = np.empty_like(x)
    _exp_loop(x, got)
    assert np.isnan(got[0])
    assert got[1] == np.inf and got[2] == 0.0
    assert got[3] == 1.0 and got[4] == 1.0
    assert np.isfinite(got[5]) and got[5] > 3e38 and got[6] == np.inf
    assert got[7] > 0 and got[8] == 0.0 and got[9] == 0.0 and got[10] == np.inf


def _sigmoid64(x):
    return 1.0 / (1.0 + np.exp(-x.astype(np.float64)))


def _drivers():
    """(name, serial driver, parallel driver, arguments for T rows, NumPy float64 reference or None)."""
    C = 192
    w, b, mu = rows(1, C)[0], rows(1, C)[0], RNG.random(C).astype(np.float32)
    mus = RNG.random((3, C)).astype(np.float32)

    def group_norm_ref(x, n_head):
        g = x.astype(np.float64).reshape(x.shape[0], n_head, -1)
        g = (g - g.mean(-1, keepdims=True)) / np.sqrt(g.var(-1, keepdims=True) + 1e-5)
        return g.reshape(x.shape) * w + b

    return [
        ("group_norm", P._group_norm_serial, P._group_norm_parallel,
         lambda x, p: (x, 4, w, b, 1e-5), lambda x, p: group_norm_ref(x, 4)),
        ("layer_norm", P._group_norm_serial, P._group_norm_parallel,
         lambda x, p: (x, 1, w, b, 1e-5), lambda x, p: group_norm_ref(x, 1)),
        ("token_mixes", P._token_mixes_serial, P._token_mixes_parallel,
         lambda x, p: (x, p, mus), lambda x, p: x * mus[:, None, :] + p * (1.0 - mus[:, None, :].astype(np.float64))),
        ("silu_gate", P._gate_serial, P._gate_parallel,
         lambda x, p: (x, p, P.SILU), lambda x, p: x * (p * _sigmoid64(p))),
        ("sigmoid_gate", P._gate_serial, P._gate_parallel,
         lambda x, p: (x, p, P.SIGMOID), lambda x, p: _sigmoid64(p) * x),
        ("sigmoid", P._activation_serial, P._activation_parallel,
         lambda x, p: (x, P.SIGMOID), lambda x, p: _sigmoid64(x)),
        ("silu", P._activation_serial, P._activation_parallel,
         lambda x, p: (x, P.SILU), lambda x, p: x * _sigmoid64(x)),
        ("tanh", P._activation_serial, P._activation_parallel,
         lambda x, p: (x * 3, P.TANH), lambda x, p: np.tanh(x.astype(np.float64) * 3)),
        ("relu_square", P._activation_serial, P._activation_parallel,
         lambda x, p: (x, P.RELU_SQUARE), lambda x, p: np.maximum(x.astype(np.float64), 0) ** 2),
        ("shift_mixes", P._shift_mixes_serial, P._shift_mixes_parallel,
         lambda x, p: (x, p, mus, None), lambda x, p: x + (p - x.astype(np.float64)) * mus[:, None, :]),
        ("rwkv6_decay", P._rwkv6_decay_serial, P._rwkv6_decay_parallel,
         lambda x, p: (x / 4, mu - 1), lambda x, p: np.exp(-np.exp((mu - 1.0) + x.astype(np.float64) / 4))),
        ("rwkv7_output", P._rwkv7_output_serial, P._rwkv7_output_parallel,
         lambda x, p: (x, p, p, x, mu, p, w, b, 4, 1e-5), None),
    ]


@pytest.mark.parametrize("case", _drivers(), ids=lambda c: c[0])
@pytest.mark.parametrize("T", [1, 5, 37])
def test_serial_and_parallel_drivers_agree_bit_for_bit(case, T):
    _, serial, parallel, args, reference = case
    x, p = rows(T), rows(T)
    a, b = serial(*args(x, p)), parallel(*args(x, p))
    assert a.dtype == np.float32 and a.shape == b.shape
    assert np.array_equal(a, b)
    if reference is not None:
        want = reference(x, p)
        np.testing.assert_allclose(a, want, rtol=2e-6, atol=2e-6)


def test_public_kernels_agree_with_the_serial_driver_at_any_row_count():
    for T in (1, 3, 200):
        x = rows(T, 2048)
        assert np.array_equal(P.sigmoid(x), P._activation_serial(x, P.SIGMOID))
        w = np.ones(2048, np.float32)
        assert np.array_equal(P.layer_norm(x, w, w, 1e-5), P._group_norm_serial(x, 1, w, w, 1e-5))


@pytest.mark.parametrize("T", [1, 3, 200])
def test_one_pass_kernels_equal_their_steps_bit_for_bit(T):
    # RWKV-4/5's token shift of all mixes in one call, and the gates: the bits of the separate steps they replace
    # (the blend in NumPy float32, the order a * mu + p * (1 - mu); the activation kernel, then NumPy's product)
    a, previous_row, y, g = rows(T, 2048), rows(1, 2048)[0], rows(T, 2048), rows(T, 2048) * 4
    mus = RNG.random((4, 2048)).astype(np.float32)
    p = np.concatenate([previous_row[None, :], a[:-1]])
    mixed = P.token_mixes(a, previous_row, mus)
    assert mixed.shape == (4, T, 2048)
    for f in range(4):
        assert np.array_equal(mixed[f], a * mus[f] + p * (np.float32(1.0) - mus[f]))
    assert np.array_equal(P.token_mixes_rows(a, p, mus), mixed)
    assert np.array_equal(P.silu_gate(y, g), y * P.silu(g))
    assert np.array_equal(P.sigmoid_gate(g, y), P.sigmoid(g) * y)


def _eight_partial_sums(values):
    """The norms' summation order in plain Python float64: partial j takes elements j, j + 8, ...; the last
    len % 8 elements go to partial 0; then ((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7))."""
    s = [0.0] * 8
    whole = len(values) - len(values) % 8
    for i in range(whole):
        s[i % 8] += float(values[i])
    for v in values[whole:]:
        s[0] += float(v)
    return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]))


@pytest.mark.parametrize("n", [1, 7, 8, 64, 203, 2048])
def test_norm_sums_keep_their_fixed_order(n):
    # the vector-IR sums must give the bits of the documented order, whatever the width and offset
    from numba import njit

    @njit
    def sums(x, t, c0, n, mean):
        return P._sum(x, t, c0, n), P._squares(x, t, c0, n, mean)
    scales = 10.0 ** RNG.uniform(-12, 12, (3, n + 5))               # so that float64 sums round, order-dependently
    x = (rows(3, n + 5) * scales).astype(np.float32)
    mean = float(np.mean(x[1, 3:3 + n], dtype=np.float64))
    total, squares = sums(x, 1, 3, n, mean)
    assert total == _eight_partial_sums(x[1, 3:3 + n].astype(np.float64))
    assert squares == _eight_partial_sums((x[1, 3:3 + n].astype(np.float64) - mean) ** 2)


def test_norms_take_strided_rows():
    x = rows(4, 256)
    w, b = rows(1, 128)[0], rows(1, 128)[0]
    view = x[:, ::2]
    assert np.array_equal(P.layer_norm(view, w, b, 1e-5), P.layer_norm(np.ascontiguousarray(view), w, b, 1e-5))
    assert np.array_equal(P.group_norm(view, 4, w, b, 1e-5), P.group_norm(np.ascontiguousarray(view), 4, w, b, 1e-5))


def test_nan_propagates():
    x = rows(2)
    x[1, 5] = np.nan
    for fn in (P.sigmoid, P.silu):
        out = fn(x)
        others = np.ones(out.shape, bool)
        others[1, 5] = False
        assert np.isnan(out[1, 5]) and np.isfinite(out[others]).all()


@pytest.mark.parametrize("T", [1, 3])
@pytest.mark.parametrize("per_token_decay", [False, True])
def test_wkv5_from_a_source_equals_copying_it_first(T, per_token_decay):
    # One token reads the old memory from `source` and writes `state` (wkv5._head_from); several tokens copy the
    # source first. Either way: the bits of an update in place on a copy, and the source untouched.
    from rwkv_lite.kernels.wkv5 import wkv5, wkv6
    H, N = 4, 64
    r, k, v = rows(T, H * N), rows(T, H * N), rows(T, H * N)
    u = rows(H, N)
    w = RNG.random((T, H * N)).astype(np.float32) if per_token_decay else RNG.random((H, N)).astype(np.float32)
    kernel = wkv6 if per_token_decay else wkv5
    source = RNG.standard_normal((H, N, N)).astype(np.float32)
    kept = source.copy()
    want_state, want = source.copy(), np.empty((T, H * N), np.float32)
    kernel(r, k, v, w, u, want_state, want)
    state, got = np.full((H, N, N), 7.0, np.float32), np.empty((T, H * N), np.float32)
    kernel(r, k, v, w, u, state, got, source=source)
    assert np.array_equal(got, want) and np.array_equal(state, want_state)
    assert np.array_equal(source, kept)
