"""Does compute-bound work scale with threads on this machine? fp32 GEMM (numpy's BLAS) and rwkv-lite's int8 panel
product of a prompt's size, at several thread counts, each in a fresh process.

    python bench/compute_scaling.py --threads 1,2,4,8,16 --rounds 2

A prompt's products are bound by arithmetic, not memory, so their speed-up over one thread is what the prompt's
thread scaling can reach at most. Measured against the machine's own BLAS in the same run, it tells a limit of the
machine (shared cores, a lower clock with more cores busy) from one of rwkv-lite's kernels. Per thread count:
the best of 7 fp32 2048^3 GEMMs (numpy, OPENBLAS_NUM_THREADS set), and the median of 15 int8 panel products of
128 rows x 2048 x 2048 (kernels/panel.gemm_parallel, random weights; NUMBA_NUM_THREADS set), with each one's
speed-up over the first thread count of its round. Prints a Markdown table.

    python bench/compute_scaling.py --copies 1,2,4,8,16 --rounds 2

tells the two apart. It starts that many independent single-thread processes at once, each pinned to a CPU of
its own, and runs four phases in step (2 s each): a dependent chain of scalar operations (5 cycles an
iteration, so its rate is the clock each CPU runs at), eight independent such chains (bound by the core's
multiplier, not by latency: a CPU that shares its core with another busy one runs it at about half speed), the
int8 panel product with one thread, and a one-thread fp32 GEMM (1024^3). After each product and GEMM a short
scalar chain reads the clock again: wide vector code can run at a lower clock, more so with more cores busy.
Nothing is shared between the copies, so if the work per copy falls as copies are added, the machine gives n
busy CPUs less than n times one CPU's throughput, and no threading of the kernels can scale better than the
copies' total.
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

_COPY = r"""
import json, os, sys, time
import numpy as np
import numba
cpu = int(sys.argv[1])
if hasattr(os, "sched_setaffinity"):        # Linux; elsewhere the copies are not pinned
    os.sched_setaffinity(0, {cpu})

@numba.njit(cache=False)
def chain(n, x):
    # one dependent chain: shift (1 cycle) + xor (1) + 64-bit multiply (3) = 5 cycles an iteration on x86-64
    for _ in range(n):
        x = (x ^ (x >> np.uint64(31))) * np.uint64(6364136223846793005)
    return x

@numba.njit(cache=False)
def chains8(n, a, b, c, d, e, f, g, h):
    # eight independent chains: bound by the core's multiplier throughput, not by latency
    m, s = np.uint64(6364136223846793005), np.uint64(31)
    for _ in range(n):
        a = (a ^ (a >> s)) * m; b = (b ^ (b >> s)) * m; c = (c ^ (c >> s)) * m; d = (d ^ (d >> s)) * m
        e = (e ^ (e >> s)) * m; f = (f ^ (f >> s)) * m; g = (g ^ (g >> s)) * m; h = (h ^ (h >> s)) * m
    return a ^ b ^ c ^ d ^ e ^ f ^ g ^ h

from rwkv_lite.kernels import panel
from rwkv_lite.kernels.threads import set_threads
set_threads(1)
P, C = 2048 // panel.PANEL, 2048
wp = np.random.default_rng(2).integers(0, 256, size=(P, C * panel.PANEL), dtype=np.uint8)
wd = np.full((P, C // panel.GROUP * panel.PANEL), np.float16(0.01).view(np.uint16), np.uint16)
X = np.random.default_rng(3).standard_normal((128, C)).astype(np.float32)
A = np.random.default_rng(0).standard_normal((1024, 1024)).astype(np.float32)
u = [np.uint64(i + 3) for i in range(8)]
chain(10, u[0]); chains8(10, *u); panel.gemm_parallel(True, wp, wd, X, C, 1); A @ A
print("ready", flush=True)
start, phase = float(sys.stdin.readline()), float(sys.argv[2])

def run(k, op, unit):
    # op's rate over the phase; after each op a short scalar chain is timed too, to read the clock the core runs
    # at right after that work (a core stays at a vector licence's lower clock for a while after wide vectors)
    while time.time() < start + k * phase:
        time.sleep(0.001)
    end, n, busy, ticks, clock_s = start + k * phase + phase - 0.25, 0, 0.0, 0, 0.0
    while time.time() < end:
        t = time.perf_counter(); op(); busy += time.perf_counter() - t; n += 1
        t = time.perf_counter(); chain(M, u[1]); clock_s += time.perf_counter() - t; ticks += 5 * M
    return n * unit / busy, ticks / clock_s / 1e9

N, M = 2_000_000, 200_000
out = {"cpu": cpu}
out["ghz"], _ = run(0, lambda: chain(N, u[0]), 5 * N / 1e9)
out["chains8"], _ = run(1, lambda: chains8(N, *u), 8 * N / 1e9)
out["panel_per_s"], out["ghz_panel"] = run(2, lambda: panel.gemm_parallel(True, wp, wd, X, C, 1), 1)
out["gemm_gflops"], out["ghz_gemm"] = run(3, lambda: A @ A, 2 * 1024 ** 3 / 1e9)
print(json.dumps(out), flush=True)
"""


def copies_round(n: int, cpus: list[int], env: dict, phase: float) -> list[dict]:
    """Start n pinned single-thread copies, release them together, return each one's rates."""
    import time
    procs = [subprocess.Popen([sys.executable, "-c", _COPY, str(cpu), str(phase)], env=env, text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for cpu in cpus[:n]]
    for p in procs:
        if p.stdout.readline().strip() != "ready":
            sys.exit(f"copy failed to start: {p.communicate()[1].strip().splitlines()[-1:]}")
    start = time.time() + 0.5
    for p in procs:
        p.stdin.write(f"{start}\n")
        p.stdin.flush()
    rows = []
    for p in procs:
        out, err = p.communicate()
        if p.returncode:
            sys.exit(f"copy failed: {err.strip().splitlines()[-1:]}")
        rows.append(json.loads(out.strip().splitlines()[-1]))
    return rows


def copies(counts: list[int], rounds: int, root: str) -> None:
    import statistics
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count()))
    counts = [n for n in counts if n <= len(cpus)]
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", NUMBA_NUM_THREADS="1", OMP_NUM_THREADS="1",
               PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    print(f"Per copy: median over the copies (min-max); total: the copies' summed rate over the {counts[0]} "
          "copies' of the round's first row")
    print("| round | copies | clock GHz | 8 chains G iter/s (total) | int8 panel products/s (total) | clock after "
          "them | fp32 GEMM GFLOP/s (total) | clock after them |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in range(1, rounds + 1):
        first = None
        for n in counts:
            rows = copies_round(n, cpus, env, 2.0)
            cell = {}
            for key in ("ghz", "chains8", "panel_per_s", "ghz_panel", "gemm_gflops", "ghz_gemm"):
                v = [row[key] for row in rows]
                cell[key] = (statistics.median(v), min(v), max(v), sum(v))
            first = first or cell
            def fmt(key, total=True):
                med, lo, hi, tot = cell[key]
                s = f"{med:.2f} ({lo:.2f}-{hi:.2f})" if key.startswith("ghz") else f"{med:.1f} ({lo:.1f}-{hi:.1f})"
                return s + (f", {tot / first[key][3]:.2f}x" if total else "")
            print(f"| {r} | {n} | {fmt('ghz', False)} | {fmt('chains8')} | {fmt('panel_per_s')} | "
                  f"{fmt('ghz_panel', False)} | {fmt('gemm_gflops')} | {fmt('ghz_gemm', False)} |", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", default="1,2,4,8,16")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--copies", help="instead: run this many pinned single-thread copies at once, e.g. 1,2,4,8,16")
    args = ap.parse_args()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    print(f"CPU: {cpu_model()}, {os.cpu_count()} logical CPUs")
    if args.copies:
        copies([int(t) for t in args.copies.split(",")], args.rounds, root)
        return
    counts = [int(t) for t in args.threads.split(",")]
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
