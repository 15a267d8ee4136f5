"""Row-wise and element-wise float32 kernels of the forward pass (norms, token-shift mixes, activations).

Why Numba for 4096-wide vectors: in decode each of these is one short pass over a row, and written as NumPy
expressions they cost a handful of temporaries and several microseconds of interpreter dispatch each. Eagle 7B
runs ~70 such NumPy operations per layer (32 layers per token): measured ~15 ms of a ~300 ms token, a third of
the distance to the memory-bandwidth floor. One compiled call per operation brings that to a few milliseconds.

All functions take (T, C) float32 rows and return new float32 arrays; they compute what the NumPy expression in
each docstring computes. Reductions accumulate in float64 (at least as accurate as NumPy's pairwise float32 sums).
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit, prange


@njit(cache=True)
def group_norm(x, n_head, weight, bias, eps):
    """layer_norm of each of the n_head consecutive groups of a row, then * weight + bias over the whole row
    (torch group_norm with one group per head)."""
    T, C = x.shape
    N = C // n_head
    out = np.empty((T, C), np.float32)
    for t in range(T):
        for h in range(n_head):
            c0 = h * N
            total = 0.0
            for c in range(c0, c0 + N):
                total += x[t, c]
            mean = total / N
            sq = 0.0
            for c in range(c0, c0 + N):
                d = x[t, c] - mean
                sq += d * d
            inv = 1.0 / math.sqrt(sq / N + eps)
            for c in range(c0, c0 + N):
                out[t, c] = np.float32((x[t, c] - mean) * inv) * weight[c] + bias[c]
    return out


@njit(cache=True)
def layer_norm(x, weight, bias, eps):
    """(x - mean) / sqrt(var + eps) * weight + bias per row, biased variance (torch layer_norm): group_norm with
    the whole row as one group."""
    return group_norm(x, 1, weight, bias, eps)


@njit(cache=True)
def token_mix(a, p, mu):
    """a * mu + p * (1 - mu): this token's row blended with the previous token's, per channel."""
    T, C = a.shape
    out = np.empty((T, C), np.float32)
    for t in range(T):
        for c in range(C):
            out[t, c] = a[t, c] * mu[c] + p[t, c] * (np.float32(1.0) - mu[c])
    return out


@njit(cache=True)
def sigmoid(x):
    """1 / (1 + exp(-x))."""
    T, C = x.shape
    out = np.empty((T, C), np.float32)
    for t in range(T):
        for c in range(C):
            out[t, c] = np.float32(1.0) / (np.float32(1.0) + np.exp(-x[t, c]))
    return out


@njit(cache=True)
def silu(x):
    """x * sigmoid(x)."""
    T, C = x.shape
    out = np.empty((T, C), np.float32)
    for t in range(T):
        for c in range(C):
            v = x[t, c]
            out[t, c] = v * (np.float32(1.0) / (np.float32(1.0) + np.exp(-v)))
    return out


@njit(cache=True)
def relu_square(x):
    """max(x, 0) ** 2 (the channel mix's activation)."""
    T, C = x.shape
    out = np.empty((T, C), np.float32)
    for t in range(T):
        for c in range(C):
            v = max(x[t, c], np.float32(0.0))
            out[t, c] = v * v
    return out


@njit(cache=True)
def shifted(x, previous_row):
    """Row t of the result is row t-1 of x; row 0 is `previous_row` (the state's last row)."""
    T, C = x.shape
    out = np.empty((T, C), np.float32)
    out[0, :] = previous_row
    for t in range(1, T):
        out[t, :] = x[t - 1, :]
    return out


# ----------------------------------------------------------------------------------------------------------------
# RWKV-6 / RWKV-7 row kernels (same conventions: (T, C) float32 rows in, new arrays out)

@njit(cache=True)
def shift_mixes(a, previous_row, mus, extra=None):
    """out[f, t] = a[t] + d[t] * mus[f] for every mix f, d = p - a with p = a shifted by one token (row 0: the
    state's previous row): RWKV-6/7's token shift `a + d * mu`, all mixes of a layer in one pass -> (n, T, C).
    With `extra` (n, T, C), RWKV-6's data-dependent shift: out[f, t] = a[t] + d[t] * (mus[f] + extra[f, t])."""
    return shift_mixes_rows(a, shifted(a, previous_row), mus, extra)


@njit(cache=True)
def shift_mixes_rows(a, previous, mus, extra=None):
    """The token shift of each row of `a` (T, C) against its own previous row previous[t] -> (n, T, C): a prompt's
    rows against the row before them (shift_mixes), or B sequences at one token each against their states' rows,
    with the same arithmetic per element either way."""
    T, C = a.shape
    n = mus.shape[0]
    out = np.empty((n, T, C), np.float32)
    for t in range(T):
        for c in range(C):
            d = previous[t, c] - a[t, c]
            if extra is None:            # decided when compiled (one specialisation each), not per element
                for f in range(n):
                    out[f, t, c] = a[t, c] + d * mus[f, c]
            else:
                for f in range(n):
                    out[f, t, c] = a[t, c] + d * (mus[f, c] + extra[f, t, c])
    return out


@njit(cache=True)
def rwkv6_decay(time_decay, u):
    """w = exp(-exp(time_decay + u)): RWKV-6's per-token decay from the decay LoRA's output u (T, C)."""
    T, C = u.shape
    out = np.empty((T, C), np.float32)
    for t in range(T):
        for c in range(C):
            out[t, c] = np.exp(-np.exp(time_decay[c] + u[t, c]))
    return out


# Rows (tokens or sequences) from which the row-wise RWKV-7 kernels below run in parallel (one row: the pool's
# wake-up costs more than the work).
PARALLEL_MIN_ROWS = 4


@njit(cache=True)
def _rwkv7_wkv_inputs_row(t, k, v, v_first, u_w, u_a, u_v, w0, a0, v0, k_k, k_a, n_head, value_residual,
                          decay_scale, norm_floor, w, kt, vt, neg, b):
    C = k.shape[1]
    N = C // n_head
    one = np.float32(1.0)
    kk = np.empty(N, np.float32)
    for h in range(n_head):
        c0 = h * N
        sq = 0.0
        for j in range(N):
            x = k[t, c0 + j] * k_k[c0 + j]
            kk[j] = x
            sq += np.float64(x) * x
        norm = max(np.float32(np.sqrt(sq)), norm_floor)
        for j in range(N):
            c = c0 + j
            w[t, c] = np.exp(decay_scale * (one / (one + np.exp(-(w0[c] + u_w[t, c])))))
            alpha = one / (one + np.exp(-(a0[c] + u_a[t, c])))
            kappa = kk[j] / norm
            neg[t, c] = -kappa
            b[t, c] = kappa * alpha
            kt[t, c] = k[t, c] * (one + (alpha - one) * k_a[c])
            if value_residual:
                vt[t, c] = v[t, c] + (v_first[t, c] - v[t, c]) * (one / (one + np.exp(-(v0[c] + u_v[t, c]))))
            else:
                vt[t, c] = v[t, c]


@njit(cache=True)
def _rwkv7_wkv_inputs_serial(args, outs):
    for t in range(args[0].shape[0]):
        _rwkv7_wkv_inputs_row(t, *args, *outs)


@njit(cache=True, parallel=True)
def _rwkv7_wkv_inputs_parallel(args, outs):
    for t in prange(args[0].shape[0]):
        _rwkv7_wkv_inputs_row(t, *args, *outs)


def rwkv7_wkv_inputs(k, v, v_first, u_w, u_a, u_v, w0, a0, v0, k_k, k_a, n_head, value_residual, decay_scale,
                     norm_floor):
    """The RWKV-7 quantities around the WKV step, from the projections k, v (T, C) and the LoRA outputs u_*:
        w      = exp(decay_scale * sigmoid(w0 + u_w))
        alpha  = sigmoid(a0 + u_a)
        kappa  = per head: (k * k_k) / max(|k * k_k|, norm_floor)
        k~     = k * (1 + (alpha - 1) * k_a)
        v~     = v + (v_first - v) * sigmoid(v0 + u_v)      (value_residual; else v)
    Returns (w, k~, v~, -kappa, kappa * alpha), the arguments of kernels/wkv7.wkv7 after r. Rows are independent:
    several (a prompt's tokens, a batch's sequences) run in parallel, one token in the calling thread."""
    T, C = k.shape
    outs = tuple(np.empty((T, C), np.float32) for _ in range(5))
    args = (k, v, v_first, u_w, u_a, u_v, w0, a0, v0, k_k, k_a, n_head, value_residual, np.float32(decay_scale),
            np.float32(norm_floor))
    (_rwkv7_wkv_inputs_parallel if T >= PARALLEL_MIN_ROWS else _rwkv7_wkv_inputs_serial)(args, outs)
    return outs


@njit(cache=True)
def rwkv7_output(o, r, k, v, r_k, gate, weight, bias, n_head, eps):
    """(GroupNorm_H(o) * weight + bias + (sum over the head of r * k * r_k) * v) * gate, per row (RWKV-7)."""
    T, C = o.shape
    N = C // n_head
    out = group_norm(o, n_head, weight, bias, eps)
    for t in range(T):
        for h in range(n_head):
            c0 = h * N
            s = np.float32(0.0)
            for j in range(c0, c0 + N):
                s += r[t, j] * k[t, j] * r_k[j]
            for j in range(c0, c0 + N):
                out[t, j] = (out[t, j] + s * v[t, j]) * gate[t, j]
    return out
