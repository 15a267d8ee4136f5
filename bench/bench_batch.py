"""Batched decode throughput: aggregate tokens/s of B sequences advanced together (Model.forward_batch) over
single-stream decode (Model.forward one token at a time), measured in one run, interleaved.

    python bench/bench_batch.py MODEL [MODEL ...] [--batches 4 8 16] [--rounds 5] [--steps 4] [--profile] [--kernel]

Each round times, for every model: `--steps` single-stream tokens, then `--steps` batched steps for every B; the
rounds interleave so that load from other processes hits all variants alike. Prints the median per variant, the
spread (min-max over rounds), the ratio aggregate/single from the medians, the median (and range) of the per-round
ratios (single stream and batch measured back to back: the figure that survives a drifting load), and the load
average. `--profile`
also splits one batched step's time into matrix products and everything else. A file's int8/int4 matrices run the
kernels of their layout: row-major (files from before the panel layout) or p16 (kernels/panel.py); `--kernel`
times both layouts' products alone.
For AVX2 code generation run it with NUMBA_CPU_NAME=haswell NUMBA_CPU_FEATURES=-avx512f OPENBLAS_CORETYPE=Haswell
(NUMBA_CPU_NAME alone still emits AVX-512 code on an AVX-512 host: bench/asm_vectors.py) and a separate
NUMBA_CACHE_DIR, so the AVX-512 cache is not reused.
"""
from __future__ import annotations

import argparse
import os
import platform
import time
from collections import defaultdict

import numpy as np

import rwkv_lite
from rwkv_lite.arch import v4, v5, v6, v7


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def single_token_seconds(model, state, token, steps):
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        _, state = model.forward([token], state)
        times.append(time.perf_counter() - t)
    return float(np.median(times)), state


def batch_step_seconds(model, states, tokens, steps):
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        model.forward_batch(tokens, states)
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def profile_step(model, B, token):
    """(matrix-product seconds, total seconds) of one batched step of B rows."""
    spent = [0.0]
    modules = (v4, v5, v6, v7)
    originals = {m: m.linear_rows for m in modules}

    def timed(matrix, X, observer=None):
        t = time.perf_counter()
        y = originals[v5](matrix, X, observer)
        spent[0] += time.perf_counter() - t
        return y
    states = [model.new_state() for _ in range(B)]
    model.forward_batch([token] * B, states)
    try:
        for m in modules:
            m.linear_rows = timed
        t = time.perf_counter()
        model.forward_batch([token] * B, states)
        total = time.perf_counter() - t
    finally:
        for m, f in originals.items():
            m.linear_rows = f
    return spent[0], total


def kernel_cap(batches, rounds):
    """Per-row cost of the batched products of both layouts (row-major: kernels/batched.py; p16: kernels/panel.py)
    on 2048 x 2048 matrices: if a row costs nearly as much at B = 16 (weights in cache) as at B = 1 (weights from
    memory), the kernel is bound by instructions, not bytes."""
    from rwkv_lite.kernels.batched import matmul_rows
    from rwkv_lite.schemes import get_scheme, make_matrix
    rng = np.random.default_rng(0)
    print("\nkernel: 2048 x 2048 products, 48 distinct matrices (weights from memory each call)")
    print("  scheme         B    us per call (median)   us per row   weights/s per row (G)")
    for name, layout in (("int8", "rows"), ("int8", "p16"), ("int4", "rows"), ("int4", "p16")):
        scheme = get_scheme(name, group=32, layout=layout)
        w = rng.standard_normal((2048, 2048), dtype=np.float32) / 45
        parts = scheme.quantize(w)
        label = f"{name} {layout}"
        mats = [make_matrix(name, scheme.params, {k: v.copy() for k, v in parts.items()}, (2048, 2048))
                for _ in range(48)]
        for B in [1] + list(batches):
            X = rng.standard_normal((B, 2048), dtype=np.float32)
            matmul_rows(mats[0], X)
            times = []
            for _ in range(rounds):
                t = time.perf_counter()
                for m in mats:
                    matmul_rows(m, X)
                times.append((time.perf_counter() - t) / len(mats))
            per_call = float(np.median(times))
            print(f"  {label:<14} {B:<4} {1e6 * per_call:12.0f}          {1e6 * per_call / B:10.0f}"
                  f"   {2048 * 2048 / (per_call / B) / 1e9:10.2f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="*")
    ap.add_argument("--kernel", action="store_true", help="also time the products alone (kernel_cap)")
    ap.add_argument("--batches", type=int, nargs="+", default=[4, 8, 16])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=4, help="timed calls per variant per round (median)")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--wait-quiet", type=float, default=0, metavar="SECONDS",
                    help="before measuring, wait up to this long for the 1-minute load average to fall below 1")
    args = ap.parse_args()
    if args.kernel:
        kernel_cap(args.batches, args.rounds)
    print(f"CPU: {cpu_name()}, {os.cpu_count()} logical cores; NUMBA_CPU_NAME={os.environ.get('NUMBA_CPU_NAME', '')}")
    models = [(path, rwkv_lite.load(path)) for path in args.models]
    token = 123
    results = defaultdict(list)          # (path, B) -> per-round seconds per step (B = 0: single stream)
    states = {}
    for path, model in models:     # warm-up: compile, page in the weights
        _, s = model.forward([token])
        single_token_seconds(model, s, token, 2)
        for B in args.batches:
            states[path, B] = [s.copy() for _ in range(B)]
            batch_step_seconds(model, states[path, B], [token] * B, 1)
        states[path, 0] = s
    deadline = time.monotonic() + args.wait_quiet
    while os.getloadavg()[0] >= 1.0 and time.monotonic() < deadline:
        time.sleep(5)
    load_before = os.getloadavg()
    for _ in range(args.rounds):
        for path, model in models:
            sec, states[path, 0] = single_token_seconds(model, states[path, 0], token, args.steps)
            results[path, 0].append(sec)
            for B in args.batches:
                results[path, B].append(batch_step_seconds(model, states[path, B], [token] * B,
                                                                 args.steps))
    load_after = os.getloadavg()
    print(f"load average (1 min) before / after: {load_before[0]:.2f} / {load_after[0]:.2f}")
    for path, model in models:
        single = np.median(results[path, 0])
        spread = f"{1e3 * min(results[path, 0]):.0f}-{1e3 * max(results[path, 0]):.0f}"
        print(f"\n{path}: single stream {1e3 * single:.1f} ms/token ({spread}), {1 / single:.2f} tokens/s")
        print("  B   ms/step (min-max)        aggregate tokens/s   ratio vs single   per-round ratio (min-max)")
        for B in args.batches:
            step = np.median(results[path, B])
            spread = f"{1e3 * min(results[path, B]):.0f}-{1e3 * max(results[path, B]):.0f}"
            per_round = [B * one / many for one, many in zip(results[path, 0], results[path, B])]
            print(f"  {B:<3} {1e3 * step:8.1f} ({spread:>13})   {B / step:12.2f}        {B / step * single:6.2f}x"
                  f"            {np.median(per_round):5.2f}x ({min(per_round):.2f}-{max(per_round):.2f})")
        if args.profile:
            for B in args.batches:
                products, total = profile_step(model, B, token)
                print(f"  profile B={B}: matrix products {1e3 * products:.0f} ms of {1e3 * total:.0f} ms "
                      f"({100 * products / total:.0f}%)")

if __name__ == "__main__":
    main()
