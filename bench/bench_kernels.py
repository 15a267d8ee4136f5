"""Decode-GEMV and sequence-GEMM speed of each storage scheme, against numpy's fp32 GEMV in the same run.

    python bench/bench_kernels.py                      # 8 matrices of 14336 x 4096, 2 threads, 7 rounds
    python bench/bench_kernels.py --threads 1 --schemes int8,int4 --seq 0

Decode: every round calls each scheme's GEMV once on each of the --mats matrices (cycled, so no matrix stays in
cache: 8 int4 matrices are 235 MB) and records the mean time per matrix; schemes are interleaved within a round
so that load from other processes hits them alike. Reported: the median over rounds (and the range), GB/s of
stored weight bytes (scales included), and the Eagle-7B ms/token that rate implies for the matrices alone
(32 layers x (5 x 4096^2 + 4096^2 + 2 x 4096 x 14336) + head 65536 x 4096 = 7.25 G weights per token).

Sequence: X (T, C) @ W^T through the tile-dequantise + BLAS path, reported as GFLOP/s and as the Eagle-7B prompt
tokens/s that rate implies for the matrices alone.

Weights are random (speed does not depend on values); the Matrix objects are the real ones from
rwkv_lite.kernels.linear, so Python call overhead is included.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rwkv_lite.kernels.linear import make_matrix  # noqa: E402
from rwkv_lite.kernels.threads import set_threads  # noqa: E402

EAGLE_WEIGHTS = 32 * (5 * 4096 * 4096 + 4096 * 4096 + 2 * 4096 * 14336) + 65536 * 4096


def random_parts(scheme: str, R: int, C: int, group: int, rng) -> dict:
    if scheme == "fp32":
        return {"": rng.standard_normal((R, C), dtype=np.float32)}
    if scheme == "fp16":
        return {"": rng.standard_normal((R, C), dtype=np.float32).astype(np.float16)}
    if scheme == "int8":
        return {"": rng.integers(-127, 128, (R, C), dtype=np.int8),
                ".scale": rng.random(R, dtype=np.float32) / 64}
    if scheme == "int4":
        cols = -(-C // max(group, 64)) * max(group, 64)
        codes = rng.integers(100, 200, (R, cols // group))                     # scales around 2**-13 .. 2**-6
        zeros = rng.integers(40, 90, (R, cols // group))
        return {"": rng.integers(0, 256, (R, cols // 2), dtype=np.uint8),
                ".groups": (codes | (zeros << 9)).astype(np.uint16)}
    raise SystemExit(f"unknown scheme {scheme}")


def foreign_cpu_seconds() -> float:
    """CPU seconds used so far by every process except this one (Linux /proc; 0.0 elsewhere).

    The benchmark machine is shared: each round records how much CPU others took meanwhile, so that rounds
    disturbed by them can be set aside (see --max-foreign)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
        busy = sum(fields) - fields[3] - fields[4]            # everything but idle and iowait
        with open("/proc/self/stat") as f:
            own = f.read().rsplit(")", 1)[1].split()
        mine = int(own[11]) + int(own[12])                   # utime + stime
        return (busy - mine) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0


def fmt_range(values, scale):
    lo, hi = min(values), max(values)
    return f"{scale / hi:6.1f}-{scale / lo:5.1f}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", type=int, default=14336)
    ap.add_argument("--cols", type=int, default=4096)
    ap.add_argument("--mats", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--group", type=int, default=32, help="int4 group size")
    ap.add_argument("--schemes", default="fp32,fp16,int8,int4")
    ap.add_argument("--seq", type=int, default=128, help="tokens for the sequence-mode test (0: skip)")
    ap.add_argument("--seq-rounds", type=int, default=3)
    ap.add_argument("--min-round", type=float, default=0.3, help="seconds per round (cycles the matrices)")
    ap.add_argument("--max-foreign", type=float, default=0.05,
                    help="drop rounds during which other processes used more than this share of the CPUs")
    args = ap.parse_args(argv)

    threads = set_threads(args.threads)
    R, C = args.rows, args.cols
    rng = np.random.default_rng(0)
    schemes = args.schemes.split(",")
    params = {"int4": {"group": args.group}}
    mats = {s: [make_matrix(s, params.get(s, {}), random_parts(s, R, C, args.group, rng), shape=(R, C))
                for _ in range(args.mats)] for s in schemes}
    x = rng.standard_normal(C, dtype=np.float32)

    print(f"decode GEMV: {args.mats} matrices of {R} x {C} cycled, {threads} threads, {args.rounds} rounds; "
          f"GB/s of stored weight bytes (median, range)")
    for s in schemes:                                # compile / warm up
        mats[s][0](x)
    times = {s: [] for s in schemes}
    foreign = {s: [] for s in schemes}
    ncpu = os.cpu_count() or 1
    for _ in range(args.rounds):
        for s in schemes:
            time.sleep(0.25)                         # let the other pool's spinning threads go idle (see notes)
            f0, t0, calls = foreign_cpu_seconds(), time.perf_counter(), 0
            while True:
                for m in mats[s]:
                    m(x)
                calls += len(mats[s])
                elapsed = time.perf_counter() - t0
                if elapsed >= args.min_round:
                    break
            times[s].append(elapsed / calls)
            foreign[s].append((foreign_cpu_seconds() - f0) / (elapsed * ncpu))
    kept = {}
    for s in schemes:
        quiet = [t for t, f in zip(times[s], foreign[s]) if f <= args.max_foreign]
        kept[s] = quiet if len(quiet) >= 3 else times[s]
        if len(quiet) < 3:
            print(f"  note: {s}: only {len(quiet)} of {len(times[s])} rounds had other processes below "
                  f"{args.max_foreign:.0%} of the CPUs; using all rounds (max foreign load {max(foreign[s]):.0%})")
    times = kept
    base = None
    for s in schemes:
        nbytes = mats[s][0].nbytes
        med = statistics.median(times[s])
        gbs = nbytes / med / 1e9
        eagle_ms = EAGLE_WEIGHTS * nbytes / (R * C) / (gbs * 1e9) * 1e3
        if s == "fp32":
            base = gbs
        rel = f"  {gbs / base:4.2f}x numpy fp32" if base else ""
        label = "numpy fp32 sgemv" if s == "fp32" else f"{s} kernel"
        print(f"  {label:18s} {nbytes * 8 / (R * C):5.2f} b/w  {med * 1e3:7.3f} ms  {gbs:5.1f} GB/s "
              f"({fmt_range(times[s], nbytes / 1e9)}, {len(times[s])} rounds)  Eagle-7B: {eagle_ms:5.0f} ms/token{rel}")
    if base:
        for s in schemes:
            if s != "fp32":
                bound = EAGLE_WEIGHTS * mats[s][0].nbytes / (R * C) / (base * 1e9) * 1e3
                print(f"  bandwidth bound for {s} at the numpy fp32 rate: {bound:.0f} ms/token")

    if args.seq:
        T = args.seq
        X = rng.standard_normal((T, C), dtype=np.float32)
        print(f"sequence mode: X ({T}, {C}) @ W^T, one matrix per call, {args.seq_rounds} rounds")
        for s in schemes:
            m = mats[s][0]
            m(X)
            ts = []
            for _ in range(args.seq_rounds):
                t0 = time.perf_counter()
                m(X)
                ts.append(time.perf_counter() - t0)
            med = statistics.median(ts)
            gflops = 2 * T * R * C / med / 1e9
            tok_s = T / (med * EAGLE_WEIGHTS / (R * C))
            print(f"  {s:6s} {med * 1e3:8.1f} ms  {gflops:6.1f} GFLOP/s  Eagle-7B matrices: {tok_s:5.1f} tokens/s")


if __name__ == "__main__":
    main()
