"""Time the WKV recurrence kernels of every RWKV version at real model sizes (one layer).

    python bench/bench_wkv_versions.py [--repeats 30]

Sizes: v4 C = 4096 (Pile 7B/14B width); v5/v6/v7 H = 40 heads of N = 64 (C = 2560, the 2.9B/3B width).
T = 1 is a decode step, T = 128 a prompt chunk. Prints median and 10th/90th percentiles in milliseconds.
On a loaded machine the T = 1 numbers measure thread wake-up more than the kernels.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rwkv_lite.kernels.wkv4 import wkv4            # noqa: E402
from rwkv_lite.kernels.wkv5 import wkv5, wkv6      # noqa: E402
from rwkv_lite.kernels.wkv7 import wkv7            # noqa: E402


def timed(fn, repeats):
    fn()                                             # compile / warm up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    ms = np.array(times) * 1e3
    return np.median(ms), np.percentile(ms, 10), np.percentile(ms, 90)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=30)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    f32 = lambda *shape: (rng.standard_normal(shape) * 0.1).astype(np.float32)   # noqa: E731
    for T in (1, 128):
        C = 4096
        k, v, out = f32(T, C), f32(T, C), np.empty((T, C), np.float32)
        w, u = -np.exp(f32(C)), f32(C)
        aa, bb, pp = np.zeros(C, np.float32), np.zeros(C, np.float32), np.full(C, -1e30, np.float32)
        cases = {"wkv4 (v4, C=4096)": lambda: wkv4(k, v, w, u, aa, bb, pp, out)}
        H, N = 40, 64
        C = H * N
        r, k, v, a, b = (f32(T, C) for _ in range(5))
        decay = np.full((T, C), 0.9, np.float32)
        S, out2 = np.zeros((H, N, N), np.float32), np.empty((T, C), np.float32)
        w5, u5 = np.full((H, N), 0.9, np.float32), f32(H, N)
        cases["wkv5 (v5, H=40 N=64)"] = lambda: wkv5(r, k, v, w5, u5, S, out2)
        cases["wkv6 (v6, H=40 N=64)"] = lambda: wkv6(r, k, v, decay, u5, S, out2)
        cases["wkv7 (v7, H=40 N=64)"] = lambda: wkv7(r, decay, k, v, -a, b, S, out2)
        for name, fn in cases.items():
            med, p10, p90 = timed(fn, args.repeats)
            print(f"{name:22s} T={T:<4d} median {med:8.3f} ms   p10 {p10:8.3f}   p90 {p90:8.3f}")


if __name__ == "__main__":
    main()
