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
import numba
import numpy as np
from numba import carray, njit, prange

from .pointwise import rwkv7_output_head, rwkv7_wkv_inputs_head
from .simd import claim_task, f32_pointer, task_cursors

# Below this many state updates per call (T * H * N * N) one thread is faster than a parallel launch (the same
# rule as kernels/wkv5.py).
PARALLEL_MIN_WORK = 1 << 17


@njit(cache=True, fastmath={"reassoc", "contract"})
def _wkv7_step(t, h, r, w, k, v, a, b, source, copy_source, state, out):
    """Token t of head h: one compiled function that prompts (_wkv7_head) and single tokens (the fused step below)
    both call, so both give the same bits. It takes whole arrays and makes its views inside, where Numba drops
    their reference counting: views made by the caller and passed in are counted, and the threads of the fused
    step all counting on the same arrays cost more than the arithmetic.
    With copy_source, each row of the head's memory is first copied from `source` (a decode step from the previous
    state): row by row, just before its update, the copy costs less than copying the whole head first (a layer's
    middle at the 1.5B shape, 2 threads: 32 against 50 us with the state in cache, 78 against 125 us from memory)."""
    N = state.shape[1]
    lo, hi = h * N, (h + 1) * N
    s, s_in = state[h], source[h]
    rt, wt, kt, vt, at, bt = r[t, lo:hi], w[t, lo:hi], k[t, lo:hi], v[t, lo:hi], a[t, lo:hi], b[t, lo:hi]
    for i in range(N):
        row = s[i]
        if copy_source:
            old = s_in[i]
            for j in range(N):
                row[j] = old[j]
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
def _wkv7_head(h, r, w, k, v, a, b, state, out):
    """The recurrence of head h over all T tokens."""
    for t in range(r.shape[0]):
        _wkv7_step(t, h, r, w, k, v, a, b, state, False, state, out)


@njit(cache=True)
def _wkv7_serial(r, w, k, v, a, b, state, out):
    for h in range(state.shape[0]):
        _wkv7_head(h, r, w, k, v, a, b, state, out)


@njit(cache=True, parallel=True)
def _wkv7_parallel(r, w, k, v, a, b, state, out, threads):
    # `threads` workers share out the heads (simd.claim_task): a prompt's head is a long task
    H = state.shape[0]
    workers = min(threads, H)
    cursors = task_cursors(workers)
    for worker in prange(workers):
        h = claim_task(cursors, worker, H, workers)
        while h >= 0:
            _wkv7_head(h, r, w, k, v, a, b, state, out)
            h = claim_task(cursors, worker, H, workers)


def wkv7(r, w, k, v, a, b, state, out):
    """r, w, k, v, a, b, out: (T, H*N) float32; state: (H, N, N) float32 [head][value][key], updated in place."""
    H, N = state.shape[0], state.shape[1]
    if H > 1 and r.shape[0] * H * N * N >= PARALLEL_MIN_WORK:
        _wkv7_parallel(r, w, k, v, a, b, state, out, numba.get_num_threads())
    else:
        _wkv7_serial(r, w, k, v, a, b, state, out)


# ---------------------------------------------------------------------------------------------------------------
# One decode token (or one token of each of B sequences) from the projections to the block's output, in one launch
#
# Everything between the projections (r, k, v, the LoRA outputs) and W_o is per head: the WKV inputs (kappa's norm
# is per head), the state update, and the output's GroupNorm and bonus. One parallel launch runs them for blocks of
# heads (pointwise.rwkv7_wkv_inputs_head, _wkv7_step, pointwise.rwkv7_output_head), where a token took three
# launches, the two row kernels on the calling thread alone, and the Python between them. Prompts run the same
# functions kernel after kernel over all tokens, so every mode gives the same bits. Each task loops over its
# heads inside one function: called once per head, the inlined row code ran 2.5x slower (LLVM re-checked on every
# call whether its arrays overlap).

@njit(cache=True, error_model="numpy")
def _token_heads(row, h0, h1, r, k, v, v_first, u_w, u_a, u_v, gate, w0, a0, v0, k_k, k_a, r_k, ln_w, ln_b,
                 n_head, value_residual, decay_scale, norm_floor, eps, source, copy_source, state, w, kt, vt, neg, b,
                 o, y):
    for h in range(h0, h1):
        rwkv7_wkv_inputs_head(row, h, k, v, v_first, u_w, u_a, u_v, w0, a0, v0, k_k, k_a, n_head, value_residual,
                              decay_scale, norm_floor, w, kt, vt, neg, b)
    for h in range(h0, h1):
        _wkv7_step(row, h, r, w, kt, vt, neg, b, source, copy_source, state, o)
    for h in range(h0, h1):
        rwkv7_output_head(row, h, o, r, kt, vt, r_k, gate, ln_w, ln_b, n_head, eps, y)


@njit(cache=True)
def _scratch(shape):
    """The per-channel intermediates (w, k~, v~, -kappa, kappa * alpha, o) and the result y."""
    return (np.empty(shape, np.float32), np.empty(shape, np.float32), np.empty(shape, np.float32),
            np.empty(shape, np.float32), np.empty(shape, np.float32), np.empty(shape, np.float32),
            np.empty(shape, np.float32))


@njit(cache=True, parallel=True, error_model="numpy")
def _token_one(r, k, v, v_first, u_w, u_a, u_v, gate, w0, a0, v0, k_k, k_a, r_k, ln_w, ln_b, n_head,
               value_residual, decay_scale, norm_floor, eps, source, copy_source, state, blocks):
    w, kt, vt, neg, b, o, y = _scratch(r.shape)
    per = (n_head + blocks - 1) // blocks
    for i in prange(blocks):
        _token_heads(0, i * per, min(n_head, (i + 1) * per), r, k, v, v_first, u_w, u_a, u_v, gate, w0, a0, v0,
                     k_k, k_a, r_k, ln_w, ln_b, n_head, value_residual, decay_scale, norm_floor, eps, source,
                     copy_source, state, w, kt, vt, neg, b, o, y)
    return y


@njit(cache=True, parallel=True, error_model="numpy")
def _token_rows(r, k, v, v_first, u_w, u_a, u_v, gate, w0, a0, v0, k_k, k_a, r_k, ln_w, ln_b, n_head,
                value_residual, decay_scale, norm_floor, eps, states, blocks):
    B, N = r.shape[0], r.shape[1] // n_head
    w, kt, vt, neg, b, o, y = _scratch(r.shape)
    per = (n_head + blocks - 1) // blocks
    for i in prange(B * blocks):
        row, block = i // blocks, i % blocks
        state = carray(f32_pointer(states[row]), (n_head, N, N))
        _token_heads(row, block * per, min(n_head, (block + 1) * per), r, k, v, v_first, u_w, u_a, u_v, gate, w0,
                     a0, v0, k_k, k_a, r_k, ln_w, ln_b, n_head, value_residual, decay_scale, norm_floor, eps, state,
                     False, state, w, kt, vt, neg, b, o, y)
    return y


def rwkv7_token(r, k, v, v_first, u_w, u_a, u_v, gate, w0, a0, v0, k_k, k_a, r_k, ln_w, ln_b, n_head,
                value_residual, decay_scale, norm_floor, eps, state=None, states=None, source=None):
    """y (B, C): pointwise.rwkv7_wkv_inputs, wkv7 and pointwise.rwkv7_output of one token per row in one launch
    (arguments as theirs; u_v, v0 are ignored without value_residual). The WKV state: `state` (H, N, N) for one
    row, or `states` (B,) int64 addresses of each row's (H, N, N) state (arch/batch.py: row_addresses); updated
    in place. One row may start from another state, `source` (H, N, N), left unchanged: each row of it is copied
    into `state` just before that row's update, where copying the whole state first read and wrote it once more
    (12.6 MB a token at the 1.5B shape). Each row's heads are split into one block per thread (fewer when
    there are more rows)."""
    args = (r, k, v, v_first, u_w, u_a, u_v, gate, w0, a0, v0, k_k, k_a, r_k, ln_w, ln_b, n_head,
            value_residual, np.float32(decay_scale), np.float32(norm_floor), float(eps))
    blocks = max(1, min(n_head, numba.get_num_threads() // r.shape[0]))
    if states is None:
        return _token_one(*args, state if source is None else source, source is not None, state, blocks)
    return _token_rows(*args, states, blocks)
