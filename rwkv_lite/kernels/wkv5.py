"""WKV recurrence of RWKV-5 (5.0, 5.1, 5.2) and RWKV-6: per head h, a (N x N) state S[h, i=key, j=value].

For each token t, using the OLD state:
    o[t, h, j]  = sum_i r[t,h,i] * (u[h,i] * k[t,h,i] * v[t,h,j] + S[h,i,j])
    S[h, i, j] <- k[t,h,i] * v[t,h,j] + w[h,i] * S[h,i,j]
RWKV-6 passes a per-token decay w[t] (data dependent); RWKV-5 one decay for all tokens.
Heads are independent, so they run in parallel; tokens run in order inside each head.
"""
import numba
from numba import carray, njit, prange

from .simd import claim_task, f32_pointer, task_cursors

# Below this many state updates per call (T * H * N * N) a parallel launch costs more than it saves (and on a busy
# machine much more): such calls run on one thread.
PARALLEL_MIN_WORK = 1 << 17


@njit(cache=True, error_model="numpy")
def _head(r, k, v, w, w_per_token, u, s, out, h):
    """All T tokens of head h. w is (H, N), or (T, H*N) when w_per_token (RWKV-6). The output row accumulates
    in place and the loops run over 1-D row views: with a scratch array and 2-D indexing in the inner loop (the
    earlier form) LLVM vectorised it far less well (3x slower over a 64-token prompt, the same bits)."""
    T = r.shape[0]
    N = s.shape[0]
    base = h * N
    for t in range(T):
        vt = v[t, base:base + N]
        ot = out[t, base:base + N]
        for j in range(N):
            ot[j] = 0.0
        for i in range(N):
            ki = k[t, base + i]
            ri = r[t, base + i]
            ui = u[h, i]
            wi = w[t, base + i] if w_per_token else w[h, i]
            si = s[i]
            for j in range(N):
                kv = ki * vt[j]
                ot[j] += ri * (ui * kv + si[j])
                si[j] = kv + wi * si[j]


@njit(cache=True, error_model="numpy")
def _head_from(r, k, v, w, w_per_token, u, source, s, out, h):
    """_head for one token that reads head h's old state from `source` and writes the new one into `s`, which it
    never reads: a decode step from the previous state without copying the memory across first. The same
    operations in the same order as _head, so the same bits; a separate function because _head, handed the same
    array twice for an update in place, would take the vectoriser's scalar fallback."""
    N = s.shape[0]
    base = h * N
    vt = v[0, base:base + N]
    ot = out[0, base:base + N]
    for j in range(N):
        ot[j] = 0.0
    for i in range(N):
        ki = k[0, base + i]
        ri = r[0, base + i]
        ui = u[h, i]
        wi = w[0, base + i] if w_per_token else w[h, i]
        old, new = source[i], s[i]
        for j in range(N):
            kv = ki * vt[j]
            ot[j] += ri * (ui * kv + old[j])
            new[j] = kv + wi * old[j]


@njit(cache=True, parallel=True, error_model="numpy")
def _heads_parallel(r, k, v, w, w_per_token, u, source, copy_source, state, out, threads):
    # `threads` workers share out the heads (simd.claim_task): a prompt's head is a long task
    H = state.shape[0]
    workers = min(threads, H)
    cursors = task_cursors(workers)
    for worker in prange(workers):
        h = claim_task(cursors, worker, H, workers)
        while h >= 0:
            if copy_source:
                _head_from(r, k, v, w, w_per_token, u, source[h], state[h], out, h)
            else:
                _head(r, k, v, w, w_per_token, u, state[h], out, h)
            h = claim_task(cursors, worker, H, workers)


@njit(cache=True, error_model="numpy")
def _heads_serial(r, k, v, w, w_per_token, u, source, copy_source, state, out):
    for h in range(state.shape[0]):
        if copy_source:
            _head_from(r, k, v, w, w_per_token, u, source[h], state[h], out, h)
        else:
            _head(r, k, v, w, w_per_token, u, state[h], out, h)


def _run(r, k, v, w, w_per_token, u, state, out, source):
    H, N = u.shape
    if source is not None and r.shape[0] > 1:           # the kernels read a source for one token only
        state[...] = source
        source = None
    args = (r, k, v, w, w_per_token, u, state if source is None else source, source is not None, state, out)
    if H > 1 and r.shape[0] * H * N * N >= PARALLEL_MIN_WORK:
        _heads_parallel(*args, numba.get_num_threads())
    else:
        _heads_serial(*args)


def wkv5(r, k, v, w, u, state, out, source=None):
    """r, k, v, out: (T, H*N) float32; w, u: (H, N); state: (H, N, N) updated in place. `source` (H, N, N): start
    from it instead (left unchanged; one token's update reads each head from it and writes `state`, where copying
    the whole state first would read and write it once more)."""
    _run(r, k, v, w, False, u, state, out, source)


def wkv6(r, k, v, w, u, state, out, source=None):
    """As wkv5 but with a decay per token: w (T, H*N) float32."""
    _run(r, k, v, w, True, u, state, out, source)


@njit(cache=True, parallel=True, error_model="numpy")
def _rows(r, k, v, w, w_per_token, u, states, out):
    B, (H, N) = r.shape[0], u.shape
    for i in prange(B * H):
        b, h = i // H, i % H
        s = carray(f32_pointer(states[b]), (H, N, N))
        wb = w[b:b + 1] if w_per_token else w
        _head(r[b:b + 1], k[b:b + 1], v[b:b + 1], wb, w_per_token, u, s[h], out[b:b + 1], h)


def wkv5_rows(r, k, v, w, u, states, out):
    """B sequences at one token each, one launch: row b of r, k, v, out (B, H*N) with the (H, N, N) float32 state at
    address states[b] (arch/batch.py: row_addresses). Each (row, head) is the single-token computation."""
    _rows(r, k, v, w, False, u, states, out)


def wkv6_rows(r, k, v, w, u, states, out):
    """As wkv5_rows with a decay per row: w (B, H*N)."""
    _rows(r, k, v, w, True, u, states, out)
