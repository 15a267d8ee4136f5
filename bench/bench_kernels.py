"""Decode-GEMV and sequence-GEMM speed of each storage scheme, against numpy's fp32 GEMV in the same run.

    python bench/bench_kernels.py                      # 8 matrices of 14336 x 4096, 2 threads, 7 rounds
    python bench/bench_kernels.py --threads 1 --schemes int8,int4 --seq 0
    python bench/bench_kernels.py --quality            # round-trip error of each scheme vs ggml Q4_0/Q8_0
    python bench/bench_kernels.py --layout-ab --rows 2048 --cols 2048 --mats 24 --rounds 9 --batches 1 4 8 16 64

Decode: every round calls each scheme's GEMV once on each of the --mats matrices (cycled, so no matrix stays in
cache: 8 int4 matrices are 235 MB) and records the mean time per matrix; schemes are interleaved within a round
so that load from other processes hits them alike. Reported: the median over rounds (and the range), GB/s of
stored weight bytes (scales included), and the Eagle-7B ms/token that rate implies for the matrices alone
(32 layers x (5 x 4096^2 + 4096^2 + 2 x 4096 x 14336) + head 65536 x 4096 = 7.25 G weights per token).

Sequence: X (T, C) @ W^T through the tile-dequantise + BLAS path, reported as GFLOP/s and as the Eagle-7B prompt
tokens/s that rate implies for the matrices alone.

Weights are random (speed does not depend on values); the Matrix objects are the real ones from
rwkv_lite.kernels.linear, so Python call overhead is included.

--layout-ab: the two layouts of int8 and int4 matrices, interleaved in one process on --threads threads: row-major
(files from before the panel layout: int8_kernels / int4_kernels for one token, batched.py for B > 1, tile
dequantisation + BLAS for B >= 32, a prompt) against p16 (kernels/panel.py for everything). Each round calls every
variant on each of the --mats matrices (a copy each, so the weights come from memory), alternating the order; reported
per B: the median us per call and per activation row, and the median and quartiles of the per-round ratio
row-major / p16 (above 1: p16 faster). Random weights, quantized once and copied.
"""
from __future__ import annotations

import argparse
import os
import statistics
import struct
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from rwkv_lite.kernels import fp_kernels  # noqa: E402
from rwkv_lite.kernels.threads import set_threads  # noqa: E402
from rwkv_lite.schemes import get_scheme, make_matrix  # noqa: E402

EAGLE_WEIGHTS = 32 * (5 * 4096 * 4096 + 4096 * 4096 + 2 * 4096 * 14336) + 65536 * 4096


class NumbaFp32:
    """fp32 weights through fp_kernels.gemv_f32 (scheme name 'fp32-numba'), to compare with numpy's BLAS sgemv."""

    def __init__(self, w):
        self.w, self.nbytes = w, w.nbytes

    def __call__(self, x):
        return fp_kernels.gemv_f32(self.w, x) if x.ndim == 1 else x @ self.w.T


def make(spec: str, R: int, C: int, group: int, rng):
    """A Matrix for a scheme spec: 'fp32', 'fp32-numba', 'fp16', 'int8' (default group), 'int8:0' (one scale per
    row), 'int8:64', 'int4' (group --group), 'int4:64'."""
    if spec == "fp32-numba":
        return NumbaFp32(random_parts("fp32", R, C, group, rng)[""])
    scheme, _, g = spec.partition(":")
    params = {"group": int(g)} if g else ({"group": group} if scheme == "int4" else {})
    params = get_scheme(scheme, **params).params                 # with the scheme's defaults filled in
    parts = random_parts(scheme, R, C, params.get("group", 0), rng)
    return make_matrix(scheme, params, parts, shape=(R, C))


def random_parts(scheme: str, R: int, C: int, group: int, rng) -> dict:
    if scheme == "fp32":
        return {"": rng.standard_normal((R, C), dtype=np.float32)}
    if scheme == "fp16":
        return {"": rng.standard_normal((R, C), dtype=np.float32).astype(np.float16)}
    if scheme == "int8" and not group:
        return {"": rng.integers(-127, 128, (R, C), dtype=np.int8),
                ".scale": rng.random(R, dtype=np.float32) / 64}
    if scheme == "int8":
        cols = -(-C // max(group, 64)) * max(group, 64)
        return {"": rng.integers(-127, 128, (R, cols), dtype=np.int8),
                ".scale": (rng.random((R, cols // group), dtype=np.float32) / 64).astype(np.float16)}
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


# ----------------------------------------------------------------------------------------------------------------
# --quality: round-trip error of the schemes against ggml-style baselines

def read_rwkv_cpp_matrices(path: Path) -> dict:
    """The 2-D 'blocks.*' float32 matrices of an rwkv.cpp FP32 model file (read by rwkv_lite/quantize/readers/rwkv_cpp.py)."""
    data = path.read_bytes()
    if struct.unpack_from("<i", data, 0)[0] != 0x67676D66:
        raise SystemExit(f"{path}: not an rwkv.cpp model file")
    off, out = 24, {}
    while off < len(data):
        ndim, klen, dtype = struct.unpack_from("<3i", data, off)
        dims = struct.unpack_from(f"<{ndim}i", data, off + 12)[::-1]          # stored innermost first
        off += 12 + 4 * ndim
        key = data[off:off + klen].decode()
        off += klen
        n = int(np.prod(dims))
        if dtype != 0:
            raise SystemExit(f"{path}: tensor {key} is not FP32")
        if ndim == 2 and key.startswith("blocks."):
            out[key] = np.frombuffer(data, np.float32, n, off).reshape(dims)
        off += 4 * n
    return out


def q4_0_like(w):
    """ggml Q4_0 round trip: blocks of 32, fp16 d = (value of largest |w|) / -8, q = min(15, int(w/d + 8.5)) - 8."""
    R, C = w.shape
    b = w.reshape(R, C // 32, 32)
    big = np.take_along_axis(b, np.abs(b).argmax(-1)[..., None], -1)
    d = (big / -8).astype(np.float16).astype(np.float32)
    inv = np.divide(1, d, out=np.zeros_like(d), where=d != 0)
    q = np.minimum(15, (b * inv + 8.5).astype(np.int8))
    return ((q - 8) * d).reshape(R, C)


def q8_0_like(w):
    """ggml Q8_0 round trip: blocks of 32, fp16 d = max|w| / 127, q = round(w / d): 8.5 bits/weight."""
    R, C = w.shape
    b = w.reshape(R, C // 32, 32)
    d = (np.abs(b).max(-1, keepdims=True) / 127).astype(np.float16).astype(np.float32)
    inv = np.divide(1, d, out=np.zeros_like(d), where=d != 0)
    return (np.round(b * inv) * d).reshape(R, C)


def quality(tiny_path: Path) -> None:
    rng = np.random.default_rng(0)
    sets = {"Gaussian 256x4096": [rng.standard_normal((256, 4096), dtype=np.float32)],
            "Student-t(4) 256x4096": [rng.standard_t(4, (256, 4096)).astype(np.float32)]}
    if tiny_path.exists():
        sets[f"{tiny_path.name} (96 matrices)"] = list(read_rwkv_cpp_matrices(tiny_path).values())
    else:
        print(f"note: {tiny_path} not found; real-weight rows skipped")

    def scheme_fn(name, **params):
        sc = get_scheme(name, **params)
        return lambda w: sc.dequantize(sc.quantize(w))[:, : w.shape[1]], sc.bits_per_weight((4096, 4096))

    methods = {"Q4_0-like (ggml, blocks of 32)": (q4_0_like, 4.5),
               "int4 group 32": scheme_fn("int4", group=32),
               "int4 group 64": scheme_fn("int4", group=64),
               "int4 group 128": scheme_fn("int4", group=128),
               "Q8_0-like (ggml, blocks of 32)": (q8_0_like, 8.5),
               "int8 (per row)": scheme_fn("int8"),
               "fp16": scheme_fn("fp16")}
    names = list(sets)
    print("relative RMSE of the round trip, sqrt(sum (w - w~)^2 / sum w^2), per weight set")
    print(f"  {'scheme':32s} {'b/w @4096':>9s}  " + "  ".join(f"{n:>28s}" for n in names))
    for label, (fn, bits) in methods.items():
        cells = []
        for n in names:
            ws = sets[n]
            err = sum(float(((w - fn(w)) ** 2).sum()) for w in ws)
            ref = sum(float((w.astype(np.float64) ** 2).sum()) for w in ws)
            cells.append(f"{np.sqrt(err / ref):28.5f}")
        print(f"  {label:32s} {bits:9.3f}  " + "  ".join(cells))


def layout_ab(args) -> None:
    """--layout-ab (module docstring)."""
    R, C = args.rows, args.cols
    rng = np.random.default_rng(0)
    threads = set_threads(args.threads)
    W = rng.standard_normal((R, C), dtype=np.float32) / np.sqrt(C)
    for name in ("int8", "int4"):
        variants = {}
        for layout in ("rows", "p16"):
            scheme = get_scheme(name, group=32, layout=layout)
            parts = scheme.quantize(W)
            variants[layout] = [scheme.matrix({k: v.copy() for k, v in parts.items()}, (R, C))
                                for _ in range(args.mats)]
        mib = sum(a.nbytes for m in variants["p16"] for a in m._arrays()) / 2**20
        print(f"{name} {R} x {C}, {args.mats} matrices per layout ({mib:.0f} MiB), {threads} threads, "
              f"{args.rounds} rounds interleaved")
        for B in args.batches:
            X = rng.standard_normal((B, C), dtype=np.float32)

            def call(m):
                return m(X[0]) if B == 1 else (m(X) if B >= 32 else m._matmul_rows(X, True))
            for ms in variants.values():
                call(ms[0])
            times = {n: [] for n in variants}
            for rnd in range(args.rounds):
                for n in (list(variants) if rnd % 2 == 0 else list(variants)[::-1]):
                    t0 = time.perf_counter()
                    for m in variants[n]:
                        call(m)
                    times[n].append((time.perf_counter() - t0) / args.mats)
            ratios = sorted(a / b for a, b in zip(times["rows"], times["p16"]))
            q1, q3 = ratios[len(ratios) // 4], ratios[(3 * len(ratios)) // 4]
            cells = "  ".join(f"{n} {1e6 * statistics.median(t):8.0f} us/call {1e6 * statistics.median(t) / B:7.1f} "
                              f"us/row" for n, t in times.items())
            what = "prompt" if B >= 32 else "B"
            print(f"  {what} = {B:3d}  {cells}  rows/p16 {statistics.median(ratios):.2f} [{q1:.2f}..{q3:.2f}]  "
                  f"load {os.getloadavg()[0]:.1f}", flush=True)


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
    ap.add_argument("--schemes", default="fp32,fp16,int8,int4",
                    help="comma-separated: fp32, fp32-numba, fp16, int8, int8:G (G=0: per row), int4, int4:G")
    ap.add_argument("--seq", type=int, default=128, help="tokens for the sequence-mode test (0: skip)")
    ap.add_argument("--seq-rounds", type=int, default=3)
    ap.add_argument("--min-round", type=float, default=0.3, help="seconds per round (cycles the matrices)")
    ap.add_argument("--quality", action="store_true", help="print round-trip errors of the schemes and exit")
    ap.add_argument("--tiny", type=Path, default=Path(os.environ.get("RWKV_LITE_SHARED", REPO.parent / "shared"))
                    / "fixtures" / "rwkv-cpp-tiny" / "tiny-rwkv-5v2-730K-FP32.bin")
    ap.add_argument("--max-foreign", type=float, default=0.05,
                    help="drop rounds during which other processes used more than this share of the CPUs")
    ap.add_argument("--layout-ab", action="store_true",
                    help="A/B the row-major and p16 layouts of int8 and int4 (module docstring) and exit")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8, 16, 64],
                    help="activation rows for --layout-ab (32 and more: a prompt)")
    args = ap.parse_args(argv)
    if args.quality:
        return quality(args.tiny)
    if args.layout_ab:
        return layout_ab(args)

    threads = set_threads(args.threads)
    R, C = args.rows, args.cols
    rng = np.random.default_rng(0)
    schemes = args.schemes.split(",")
    mats = {s: [make(s, R, C, args.group, rng) for _ in range(args.mats)] for s in schemes}
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
