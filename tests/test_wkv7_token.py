"""kernels/wkv7.rwkv7_token: one decode token's WKV inputs, state update and output in one launch gives the bits of
the three kernels a prompt runs (pointwise.rwkv7_wkv_inputs, wkv7, pointwise.rwkv7_output), for one row with its
state array and for several rows with their states' addresses, however the heads are split over the threads."""
import numba
import numpy as np
import pytest

from rwkv_lite.kernels import pointwise
from rwkv_lite.kernels.wkv7 import rwkv7_token, wkv7

RNG = np.random.default_rng(11)
DECAY_SCALE, NORM_FLOOR, EPS = -0.606531, 1e-12, 64e-5


def _inputs(B, H, N, value_residual):
    C = H * N
    rows = lambda s=1.0: (RNG.standard_normal((B, C)) * s).astype(np.float32)      # noqa: E731
    vec = lambda s=1.0: (RNG.standard_normal(C) * s).astype(np.float32)            # noqa: E731
    r, k, v, v_first, u_w, u_a, u_v, gate = (rows() for _ in range(8))
    w0, a0, v0, k_k, k_a, r_k = vec(), vec(), vec(), vec(0.5), vec(0.5), vec(0.3)
    ln_w, ln_b = vec(0.2) + 1, vec(0.1)
    if not value_residual:                # layer 0: v~ = v (the caller passes its own v as v_first)
        v_first = v
    states = [(RNG.standard_normal((H, N, N)) * 0.3).astype(np.float32) for _ in range(B)]
    return (r, k, v, v_first, u_w, u_a, u_v, gate, w0, a0, v0, k_k, k_a, r_k, ln_w, ln_b, H, value_residual,
            DECAY_SCALE, NORM_FLOOR, EPS), states


def _three_kernels(args, states):
    """What a prompt runs, row by row (each row its own state)."""
    (r, k, v, v_first, u_w, u_a, u_v, gate, w0, a0, v0, k_k, k_a, r_k, ln_w, ln_b, H, vr, ds, nf, eps) = args
    out = []
    for b, state in enumerate(states):
        one = slice(b, b + 1)
        w, kt, vt, neg, kb = pointwise.rwkv7_wkv_inputs(k[one], v[one], v_first[one], u_w[one], u_a[one], u_v[one],
                                                       w0, a0, v0, k_k, k_a, H, vr, ds, nf)
        o = np.empty_like(w)
        wkv7(r[one], w, kt, vt, neg, kb, state, o)
        out.append(pointwise.rwkv7_output(o, r[one], kt, vt, r_k, gate[one], ln_w, ln_b, H, eps)[0])
    return np.stack(out)


@pytest.mark.parametrize("H,N", [(1, 8), (3, 16), (32, 64)])
@pytest.mark.parametrize("value_residual", [True, False])
def test_one_row_equals_the_three_kernels(H, N, value_residual):
    args, (state,) = _inputs(1, H, N, value_residual)
    want_state = state.copy()
    want = _three_kernels(args, [want_state])
    for threads in sorted({1, numba.config.NUMBA_NUM_THREADS}):
        with_threads = numba.get_num_threads()
        numba.set_num_threads(threads)              # one block of heads, or one per thread
        try:
            got_state = state.copy()
            got = rwkv7_token(*args, state=got_state)
        finally:
            numba.set_num_threads(with_threads)
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(got_state, want_state)


@pytest.mark.parametrize("B", [1, 2, 5])
def test_rows_with_state_addresses_equal_each_row_alone(B):
    args, states = _inputs(B, 4, 16, True)
    want_states = [s.copy() for s in states]
    want = _three_kernels(args, want_states)
    got_states = [s.copy() for s in states]
    addresses = np.array([s.ctypes.data for s in got_states], np.int64)
    got = rwkv7_token(*args, states=addresses)
    np.testing.assert_array_equal(got, want)
    for g, w in zip(got_states, want_states):
        np.testing.assert_array_equal(g, w)


def test_the_inputs_are_what_their_formulas_say():
    """The per-head inputs kernel against its docstring's formulas in float64 (the split into one loop per output
    must not change what is computed)."""
    H, N = 4, 16
    (r, k, v, v_first, u_w, u_a, u_v, *_), _ = _inputs(1, H, N, True)
    w0, a0, v0, k_k, k_a = (RNG.standard_normal(H * N).astype(np.float32) for _ in range(5))
    w, kt, vt, neg, b = pointwise.rwkv7_wkv_inputs(k, v, v_first, u_w, u_a, u_v, w0, a0, v0, k_k, k_a, H, True,
                                                   DECAY_SCALE, NORM_FLOOR)
    f = lambda a: a.astype(np.float64)                                             # noqa: E731
    sig = lambda x: 1 / (1 + np.exp(-x))                                           # noqa: E731
    kk = (f(k) * f(k_k)).reshape(H, N)
    kappa = (kk / np.maximum(np.linalg.norm(kk, axis=1, keepdims=True), NORM_FLOOR)).reshape(1, -1)
    alpha = sig(f(a0) + f(u_a))
    np.testing.assert_allclose(w, np.exp(DECAY_SCALE * sig(f(w0) + f(u_w))), rtol=2e-6)
    np.testing.assert_allclose(neg, -kappa, rtol=2e-6, atol=1e-7)
    np.testing.assert_allclose(b, kappa * alpha, rtol=3e-6, atol=1e-7)
    np.testing.assert_allclose(kt, f(k) * (1 + (alpha - 1) * f(k_a)), rtol=3e-6, atol=1e-6)
    np.testing.assert_allclose(vt, f(v) + (f(v_first) - f(v)) * sig(f(v0) + f(u_v)), rtol=3e-6, atol=1e-6)
