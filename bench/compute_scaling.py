"""Does compute-bound work scale with threads on this machine? fp32 GEMM (numpy's BLAS) and rwkv-lite's int8 panel
product of a prompt's size, at several thread counts, each in a fresh process.

    python bench/compute_scaling.py --threads 1,2,4,8,16 --rounds 2

A prompt's products are bound by arithmetic, not memory, so their speed-up over one thread is what the prompt's
thread scaling can reach at most. Measured against the machine's own BLAS in the same run, it tells a limit of the
machine (shared cores, a lower clock with more cores busy) from one of rwkv-lite's kernels. Per thread count:
the best of 7 fp32 2048^3 GEMMs (numpy, OPENBLAS_NUM_THREADS set), and the median of 15 int8 panel products of
128 rows x 2048 x 2048 (kernels/panel.gemm_parallel, random weights; NUMBA_NUM_THREADS set), with each one's
speed-up over the first thread count of its round. Prints a Markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from compare_decode import cpu_model  # noqa: E402

_WORKER = r"""
import json, sys, time
import numpy as np
threads = int(sys.argv[1])
A = np.random.default_rng(0).standard_normal((2048, 2048)).astype(np.float32)
B = np.random.default_rng(1).standard_normal((2048, 2048)).astype(np.float32)
A @ B
times = []
for _ in range(7):
    t = time.perf_counter(); A @ B; times.append(time.perf_counter() - t)
gemm = 2 * 2048 ** 3 / min(times) / 1e9
from rwkv_lite.kernels import panel
from rwkv_lite.kernels.threads import set_threads
set_threads(threads)
P, C = 2048 // panel.PANEL, 2048
wp = np.random.default_rng(2).integers(0, 256, size=(P, C * panel.PANEL), dtype=np.uint8)
wd = np.full((P, C // panel.GROUP * panel.PANEL), np.float16(0.01).view(np.uint16), np.uint16)
X = np.random.default_rng(3).standard_normal((128, C)).astype(np.float32)
panel.gemm_parallel(True, wp, wd, X, C, threads)
times = []
for _ in range(15):
    t = time.perf_counter(); panel.gemm_parallel(True, wp, wd, X, C, threads); times.append(time.perf_counter() - t)
print(json.dumps({"threads": threads, "gemm_gflops": gemm, "panel_ms": 1e3 * float(np.median(times)),
                  "isa": panel.ISA}))
"""


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", default="1,2,4,8,16")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    counts = [int(t) for t in args.threads.split(",")]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    print(f"CPU: {cpu_model()}, {os.cpu_count()} logical CPUs")
    print("| round | threads | fp32 GEMM GFLOP/s (speed-up) | int8 panel 128x2048x2048 ms (speed-up) |")
    print("| --- | --- | --- | --- |")
    for r in range(1, args.rounds + 1):
        first = None
        for n in counts:
            env = dict(os.environ, OPENBLAS_NUM_THREADS=str(n), NUMBA_NUM_THREADS=str(n),
                       PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
            out = subprocess.run([sys.executable, "-c", _WORKER, str(n)], env=env, capture_output=True, text=True)
            if out.returncode:
                sys.exit(f"worker at {n} threads failed: {out.stderr.strip().splitlines()[-1:]}")
            row = json.loads(out.stdout.strip().splitlines()[-1])
            first = first or row
            print(f"| {r} | {n} | {row['gemm_gflops']:.0f} ({row['gemm_gflops'] / first['gemm_gflops']:.2f}x) | "
                  f"{row['panel_ms']:.2f} ({first['panel_ms'] / row['panel_ms']:.2f}x) |", flush=True)
    print(f"panel kernels: {row['isa']}; speed-ups against {counts[0]} thread(s) of the same round")


if __name__ == "__main__":
    main()
