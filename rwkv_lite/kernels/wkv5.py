"""WKV recurrence of RWKV-5 (5.0, 5.1, 5.2) and RWKV-6: per head h, a (N x N) state S[h, i=key, j=value].

For each token t (reference doc section 4.3), using the OLD state:
    o[t, h, j]  = sum_i r[t,h,i] * (u[h,i] * k[t,h,i] * v[t,h,j] + S[h,i,j])
    S[h, i, j] <- k[t,h,i] * v[t,h,j] + w[h,i] * S[h,i,j]
RWKV-6 passes a per-token decay w[t] (data dependent); RWKV-5 one decay for all tokens.
Heads are independent, so they run in parallel; tokens run in order inside each head.
"""
import numpy as np
from numba import njit, prange


@njit(cache=True, parallel=True)
def wkv5(r, k, v, w, u, state, out):
    """r, k, v, out: (T, H*N) float32; w, u: (H, N); state: (H, N, N) updated in place."""
    T = r.shape[0]
    H, N = w.shape
    for h in prange(H):
        base = h * N
        s = state[h]
        acc = np.empty(N, dtype=np.float32)
        for t in range(T):
            acc[:] = 0.0
            for i in range(N):
                ki = k[t, base + i]
                ri = r[t, base + i]
                ui = u[h, i]
                wi = w[h, i]
                for j in range(N):
                    kv = ki * v[t, base + j]
                    acc[j] += ri * (ui * kv + s[i, j])
                    s[i, j] = kv + wi * s[i, j]
            for j in range(N):
                out[t, base + j] = acc[j]


@njit(cache=True, parallel=True)
def wkv6(r, k, v, w, u, state, out):
    """As wkv5 but with a decay per token: w (T, H*N) float32."""
    T = r.shape[0]
    H, N = u.shape
    for h in prange(H):
        base = h * N
        s = state[h]
        acc = np.empty(N, dtype=np.float32)
        for t in range(T):
            acc[:] = 0.0
            for i in range(N):
                ki = k[t, base + i]
                ri = r[t, base + i]
                ui = u[h, i]
                wi = w[t, base + i]
                for j in range(N):
                    kv = ki * v[t, base + j]
                    acc[j] += ri * (ui * kv + s[i, j])
                    s[i, j] = kv + wi * s[i, j]
            for j in range(N):
                out[t, base + j] = acc[j]
