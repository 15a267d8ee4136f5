"""The row kernels around the matrix products (kernels/pointwise.py, kernels/wkv5.py), timed alone.

    python bench/bench_pointwise.py [--rows 4 16 64] [--repeats 200]

Per kernel and row count (2048 channels, 32 heads): the serial and the parallel driver (median microseconds of
--repeats calls, interleaved), and which one the public function picks (PARALLEL_MIN_NS). Then two designs this
module replaced, rebuilt here for the comparison: sigmoid with Numba's default error model and the C library's
expf (one element at a time), and the WKV5 head loop with a scratch accumulator and 2-D indexing, over a
64-token chunk. Used for docs/performance.md.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
from numba import njit, prange

from rwkv_lite.kernels import pointwise as P
from rwkv_lite.kernels import wkv5

C, H = 2048, 32


def median_us(fn, repeats):
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e6 * float(np.median(times))


@njit
def _sigmoid_python_error_model(x):          # the earlier form: a zero-division check per element, libm expf
    out = np.empty(x.shape, np.float32)
    for t in range(x.shape[0]):
        for c in range(x.shape[1]):
            out[t, c] = np.float32(1.0) / (np.float32(1.0) + np.exp(-x[t, c]))
    return out


@njit(parallel=True)
def _wkv5_scratch_form(r, k, v, w, u, state, out):   # the earlier head loop
    for h in prange(state.shape[0]):
        s = state[h]
        N = s.shape[0]
        base = h * N
        acc = np.empty(N, dtype=np.float32)
        for t in range(r.shape[0]):
            acc[:] = 0.0
            for i in range(N):
                ki, ri, ui, wi = k[t, base + i], r[t, base + i], u[h, i], w[h, i]
                for j in range(N):
                    kv = ki * v[t, base + j]
                    acc[j] += ri * (ui * kv + s[i, j])
                    s[i, j] = kv + wi * s[i, j]
            for j in range(N):
                out[t, base + j] = acc[j]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[4, 16, 64])
    ap.add_argument("--repeats", type=int, default=200)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    vec = rng.random(C).astype(np.float32)
    print(f"{'kernel':<14} {'rows':>4} {'serial us':>10} {'parallel us':>12}  public picks")
    for T in args.rows:
        a, p = (rng.standard_normal((T, C)).astype(np.float32) for _ in range(2))
        cases = [
            ("layer_norm", P._group_norm_serial, P._group_norm_parallel, (a, 1, vec, vec, 1e-5), 2.2),
            ("group_norm", P._group_norm_serial, P._group_norm_parallel, (a, H, vec, vec, 1e-5), 2.2),
            ("token_mix x4", P._token_mixes_serial, P._token_mixes_parallel, (a, p, rng.random((4, C)).astype(np.float32)),
             0.6),
            ("sigmoid", P._activation_serial, P._activation_parallel, (a, P.SIGMOID), 0.4),
            ("shift x6", P._shift_mixes_serial, P._shift_mixes_parallel,
             (a, p, rng.random((6, C)).astype(np.float32), None), 0.72),
            ("rwkv7_output", P._rwkv7_output_serial, P._rwkv7_output_parallel,
             (a, p, p, a, vec, p, vec, vec, H, 1e-5), 3.4),
        ]
        for name, serial, parallel, call_args, ns in cases:
            s = median_us(lambda: serial(*call_args), args.repeats)
            q = median_us(lambda: parallel(*call_args), args.repeats)
            pick = "parallel" if a.size * ns >= P.PARALLEL_MIN_NS else "serial"
            print(f"{name:<14} {T:>4} {s:>10.1f} {q:>12.1f}  {pick}")
        old = median_us(lambda: _sigmoid_python_error_model(a), args.repeats)
        print(f"{'sigmoid before':<14} {T:>4} {old:>10.1f}  (Numba's default error model, libm expf)")
    T = 64
    r, k, v = (rng.standard_normal((T, C)).astype(np.float32) for _ in range(3))
    w, u = rng.random((H, C // H)).astype(np.float32), rng.standard_normal((H, C // H)).astype(np.float32)
    state = rng.standard_normal((H, C // H, C // H)).astype(np.float32)
    out = np.empty_like(r)
    now = median_us(lambda: wkv5.wkv5(r, k, v, w, u, state, out), args.repeats // 10)
    before = median_us(lambda: _wkv5_scratch_form(r, k, v, w, u, state, out), args.repeats // 10)
    print(f"wkv5, one layer, {T}-token chunk: {now:.0f} us (before: scratch accumulator, 2-D indexing {before:.0f} us)")


if __name__ == "__main__":
    main()
