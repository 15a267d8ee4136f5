"""WKV recurrence of RWKV-4: a per-channel weighted average of past values, kept numerically stable.

The un-stabilised form is wkv_t = (sum_{s<t} e^{(t-1-s)w + k_s} v_s + e^{u + k_t} v_t) / (same without v), with w =
-exp(time_decay) < 0 and u = time_first. Its running numerator and denominator overflow float32, so the state
keeps them scaled by e^{-p}: a = num e^{-p}, b = den e^{-p}, p = the running maximum exponent.
For each token t and channel c (old state on the right-hand side):

    output:  q  = max(p, u + k)      e1 = exp(p - q)       e2 = exp(u + k - q)
             wkv = (e1 a + e2 v) / (e1 b + e2)
    update:  q' = max(p + w, k)      e1' = exp(p + w - q')  e2' = exp(k - q')
             a <- e1' a + e2' v      b <- e1' b + e2'       p <- q'

The state starts at a = b = 0, p = -1e30 (so that e^{p} vanishes). Channels are independent: blocks of channels
run in parallel; inside a block, tokens run in order and each token sweeps the block's channels (contiguous rows
of k and v: measured 1.8x faster for T = 128, C = 4096 than one channel at a time down the columns).
"""
import numpy as np
from numba import njit, prange

CHANNEL_BLOCK = 64            # channels per parallel task
# Below this many channel-steps (T * C) one thread is faster than a parallel launch (a decode step of a C = 4096
# model takes ~30 us on one core; on a busy machine waking a second thread can cost milliseconds).
PARALLEL_MIN_STEPS = 1 << 13


@njit(cache=True, error_model="numpy")
def _wkv4_channels(c0, c1, k, v, w, u, aa, bb, pp, out):
    """The recurrence for channels c0..c1-1 over all T tokens."""
    for t in range(k.shape[0]):
        for c in range(c0, c1):
            a, b, p = aa[c], bb[c], pp[c]
            kt, vt = k[t, c], v[t, c]
            # output: the bonus u applies to the current token only
            ww = u[c] + kt
            q = max(p, ww)
            e1 = np.exp(p - q)
            e2 = np.exp(ww - q)
            out[t, c] = (e1 * a + e2 * vt) / (e1 * b + e2)
            # update: decay the past by e^w, add the current token
            ww = p + w[c]
            q = max(ww, kt)
            e1 = np.exp(ww - q)
            e2 = np.exp(kt - q)
            aa[c] = e1 * a + e2 * vt
            bb[c] = e1 * b + e2
            pp[c] = q


@njit(cache=True, parallel=True, error_model="numpy")
def _wkv4_parallel(k, v, w, u, aa, bb, pp, out):
    C = k.shape[1]
    for blk in prange((C + CHANNEL_BLOCK - 1) // CHANNEL_BLOCK):
        c0 = blk * CHANNEL_BLOCK
        _wkv4_channels(c0, min(C, c0 + CHANNEL_BLOCK), k, v, w, u, aa, bb, pp, out)


def wkv4(k, v, w, u, aa, bb, pp, out):
    """k, v, out: (T, C) float32; w, u: (C,); aa, bb, pp: (C,) float32 state, updated in place."""
    T, C = k.shape
    if T * C >= PARALLEL_MIN_STEPS:
        _wkv4_parallel(k, v, w, u, aa, bb, pp, out)
    else:
        _wkv4_channels(0, C, k, v, w, u, aa, bb, pp, out)
