"""WKV recurrence of RWKV-7 ("Goose"): the generalised delta rule, per head h an (N x N) state S[h, i=value, j=key].

For each token t, with per-channel decay w, and vectors a, b of the head:

    S <- S diag(w) + (S a) b^T + v k^T          i.e. S[i,j] <- S[i,j] w_j + (sum_m S[i,m] a_m) b_j + v_i k_j
    o  = S r                                    (the NEW state: o_i = sum_j S[i,j] r_j)

RWKV-7 calls this with a = -kappa (the normalised key), b = kappa * alpha (alpha: the in-context learning rate),
so that (S a) b^T removes the part of the memory stored under the current key before writing v k^T.
Row i of S only needs row i (S a is a row-by-row dot product), so each row is read and rewritten once.
The two dot products per row are reductions: fastmath 'reassoc' lets them vectorise (5x faster at H=40, N=64;
the summation order changes the result by ~3e-7 relative).
Heads are independent and run in parallel; tokens run in order inside each head.
"""
import numpy as np
from numba import carray, njit, prange

from .simd import f32_pointer

# Below this many state updates per call (T * H * N * N) one thread is faster than a parallel launch (the same
# rule as kernels/wkv5.py).
PARALLEL_MIN_WORK = 1 << 17


@njit(cache=True, fastmath={"reassoc", "contract"})
def _wkv7_head(h, r, w, k, v, a, b, state, out):
    """The recurrence of head h over all T tokens."""
    N = state.shape[1]
    lo, hi = h * N, (h + 1) * N
    s = state[h]
    for t in range(r.shape[0]):
        rt, wt, kt, vt, at, bt = r[t, lo:hi], w[t, lo:hi], k[t, lo:hi], v[t, lo:hi], a[t, lo:hi], b[t, lo:hi]
        for i in range(N):
            row = s[i]
            sa = np.float32(0.0)
            for j in range(N):
                sa += row[j] * at[j]
            vi = vt[i]
            o = np.float32(0.0)
            for j in range(N):
                x = row[j] * wt[j] + sa * bt[j] + vi * kt[j]
                row[j] = x
                o += x * rt[j]
            out[t, lo + i] = o


@njit(cache=True)
def _wkv7_serial(r, w, k, v, a, b, state, out):
    for h in range(state.shape[0]):
        _wkv7_head(h, r, w, k, v, a, b, state, out)


@njit(cache=True, parallel=True)
def _wkv7_parallel(r, w, k, v, a, b, state, out):
    for h in prange(state.shape[0]):
        _wkv7_head(h, r, w, k, v, a, b, state, out)


def wkv7(r, w, k, v, a, b, state, out):
    """r, w, k, v, a, b, out: (T, H*N) float32; state: (H, N, N) float32 [head][value][key], updated in place."""
    H, N = state.shape[0], state.shape[1]
    if H > 1 and r.shape[0] * H * N * N >= PARALLEL_MIN_WORK:
        _wkv7_parallel(r, w, k, v, a, b, state, out)
    else:
        _wkv7_serial(r, w, k, v, a, b, state, out)


@njit(cache=True, parallel=True)
def _rows(r, w, k, v, a, b, states, H, out):
    B, N = r.shape[0], r.shape[1] // H
    for i in prange(B * H):
        row, h = i // H, i % H
        s = carray(f32_pointer(states[row]), (H, N, N))
        one = slice(row, row + 1)
        _wkv7_head(h, r[one], w[one], k[one], v[one], a[one], b[one], s, out[one])


def wkv7_rows(r, w, k, v, a, b, states, heads, out):
    """B sequences at one token each, one launch: row b of r, w, k, v, a, b, out (B, H*N) with the (H, N, N)
    float32 state at address states[b] (arch/batch.py: row_addresses). Each (row, head) is the single-token
    computation."""
    _rows(r, w, k, v, a, b, states, heads, out)
