"""Per-row cost of the 8-bit-activation panel prototypes against today's kernels, ONE thread (research benchmark).

    python bench/act8/bench_act8.py                                   # everything below, 3 repetitions (long)
    python bench/act8/bench_act8.py --sizes 2048 --batches 1,16 --rounds 1
    python bench/act8/bench_act8.py --kernels today,panel8 --modes streamed --sizes 4096
    python bench/act8/bench_act8.py --ab-b1 9 --sizes 2048,4096       # + interleaved B = 1 A/B from memory
    ACT8_PREFETCH=0 python bench/act8/bench_act8.py ...               # prototype without software prefetch
    python bench/act8/bench_act8.py --asm --sizes 2048 --batches 1 --kernels panel8   # + the generated code

Square random matrices (speed does not depend on the values), group 32. For each size, "streamed" cycles through
enough distinct matrices to fill --streamed-mib of int8 weights (192 MiB: 48 at 2048, 12 at 4096), so the weights
come from memory; "cached" uses --cached-mib (8 MiB: 2 at 2048, 1 at 4096), which stays in L3 on most CPUs.
Timed with the thread's CPU time (time.thread_time, so other processes' CPU use does not count; their memory
traffic still does); each repetition calls the kernel once per matrix; reported per activation row in us: the
best and the median of --rounds repetitions. Every kernel includes its own activation rounding.

Kernels (--kernels):
    today      the package default for group-int8: int8_kernels.gemv_i8g_serial (B = 1), batched.gemm_i8g_serial
    int_gemm   the opt-in RWKV_LITE_BATCH_KERNELS kernels (int_gemm.gemv_i8g / rows_i8g, serial)
    panel8     prototype, p16 int8 x 8-bit activations, dpbusd (panel_int8.gemm_i8a8)
    panelgen   the same in generic IR of the pmaddwd shape (panel_int8.gemm_i8a8_pmaddwd)
    split15    prototype, p16 int8 x 15-bit activations as two 8-bit digits (panel_int8_split15)
    today4     the package's int4 g32 Matrix (_gemv for B = 1, _matmul_rows serial)
    panel4     prototype, p16 int4 x 8-bit activations (panel_int4.gemm_i4a8)

Before timing, a check per size: the prototypes' relative error against a float64 evaluation of the same
rounded activations, B = 1 equal to a batched row bit for bit, panel8 equal to panelgen bit for bit.

Outputs go to --out (default: a new temporary folder): results.jsonl (one JSON object per measurement) and
tables.md (the markdown tables, also printed). The dpbusd code path and prefetch distance are panel_int8's
ACT8_DPBUSD / ACT8_PREFETCH settings (see its docstring); the Numba kernels are cached in rwkv-lite's kernel
cache folder (default settings only), never in the repository.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.dont_write_bytecode = True                     # no __pycache__ beside these files
os.environ.setdefault("NUMBA_NUM_THREADS", "1")
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))                      # the prototype modules beside this file
sys.path.insert(1, str(HERE.parent.parent))        # the repository, when rwkv_lite is not installed

import numpy as np  # noqa: E402

ALL_KERNELS = ["today", "int_gemm", "panel8", "panelgen", "split15", "today4", "panel4"]
INT4_KERNELS = {"today4", "panel4"}
MIB = 1 << 20


def csv_ints(text):
    return [int(v) for v in text.split(",") if v]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=csv_ints, default=[2048, 4096], help="square matrix sizes (multiples of 32)")
    ap.add_argument("--batches", type=csv_ints, default=[1, 4, 8, 16], help="activation rows B")
    ap.add_argument("--modes", default="streamed,cached", help="streamed, cached or both")
    ap.add_argument("--kernels", default=",".join(ALL_KERNELS), help=f"subset of {','.join(ALL_KERNELS)}")
    ap.add_argument("--rounds", type=int, default=3, help="timed repetitions per (size, mode, B, kernel)")
    ap.add_argument("--streamed-mib", type=float, default=192, help="int8 weight MiB cycled in streamed mode")
    ap.add_argument("--cached-mib", type=float, default=8, help="int8 weight MiB in cached mode (at least 1 matrix)")
    ap.add_argument("--ab-b1", type=int, default=0, metavar="ROUNDS",
                    help="also run an interleaved B = 1 A/B from memory, in streamed mode (today vs panel8, today4 vs panel4) with "
                         "this many rounds (alternating order; median of per-round ratios)")
    ap.add_argument("--asm", action="store_true", help="write the generated code of the panel kernels to --out and "
                                                       "count its vector instructions")
    ap.add_argument("--out", type=Path, default=None, help="output folder (default: a new temporary folder)")
    args = ap.parse_args(argv)
    args.modes = [m for m in args.modes.split(",") if m]
    args.kernels = [k for k in args.kernels.split(",") if k]
    bad = [k for k in args.kernels if k not in ALL_KERNELS] + [m for m in args.modes if m not in ("streamed", "cached")]
    if bad:
        ap.error(f"unknown kernel or mode: {bad}")
    if any(s % 32 for s in args.sizes):
        ap.error("sizes must be multiples of 32")
    return args


def cpu_model():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


class Bench:
    def __init__(self, args, out):
        from rwkv_lite.kernels import batched, int8_kernels, int_gemm
        from rwkv_lite.schemes import make_matrix
        import panel_int4
        import panel_int8
        import panel_int8_split15
        self.args, self.out = args, out
        self.batched, self.int8_kernels, self.int_gemm, self.make_matrix = batched, int8_kernels, int_gemm, make_matrix
        self.p8, self.p4, self.p15 = panel_int8, panel_int4, panel_int8_split15
        self.results = []
        self.log = open(out / "results.jsonl", "a")

    def emit(self, record):
        self.results.append(record)
        line = json.dumps(record)
        print(line, flush=True)
        self.log.write(line + "\n")
        self.log.flush()

    # ---------------------------------------------------------------------------------------------- matrices
    def make_mats(self, size, nmat, want8, want4, seed):
        rng = np.random.default_rng(seed)
        mats8, mats4 = [], []
        for _ in range(nmat):
            if want8:
                q = rng.integers(-127, 128, (size, size), dtype=np.int8)
                scale_bits = rng.uniform(0.5e-3, 2e-3, (size, size // 32)).astype(np.float16).view(np.uint16)
                wp, dp = self.p8.repack(q, scale_bits)
                mats8.append({"q": q, "scale_bits": scale_bits, "wp": wp, "dp": dp})
            if want4:
                q4, words, packed, wp4, wd4 = self.p4.random_int4(size, size, rng)
                m = self.make_matrix("int4", {"group": 32}, {"": packed, ".groups": words}, (size, size))
                m.parallel = False
                mats4.append({"q": q4, "words": words, "matrix": m, "wp": wp4, "wd": wd4})
        return mats8, mats4

    def call(self, kernel, m, X, src):
        if kernel == "today":
            if X.shape[0] == 1:
                return self.int8_kernels.gemv_i8g_serial(m["q"], m["scale_bits"], X[0], src, 32)
            return self.batched.gemm_i8g_serial(m["q"], m["scale_bits"], X, src, 32)
        if kernel == "int_gemm":
            if X.shape[0] == 1:
                return self.int_gemm.gemv_i8g(m["q"], m["scale_bits"], X[0], src, 32, False)
            return self.int_gemm.rows_i8g(m["q"], m["scale_bits"], X, src, 32, False)
        if kernel == "panel8":
            return self.p8.gemm_i8a8(m["wp"], m["dp"], X)
        if kernel == "panelgen":
            return self.p8.gemm_i8a8_pmaddwd(m["wp"], m["dp"], X)
        if kernel == "split15":
            return self.p15.gemm_i8a15split(m["wp"], m["dp"], X)
        if kernel == "today4":
            return m["matrix"]._gemv(X[0]) if X.shape[0] == 1 else m["matrix"]._matmul_rows(X, False)
        if kernel == "panel4":
            return self.p4.gemm_i4a8(m["wp"], m["wd"], X)
        raise ValueError(kernel)

    # ---------------------------------------------------------------------------------------------- checks
    def check(self, size, mats8, mats4, kernels):
        rng = np.random.default_rng(7)
        X = rng.standard_normal((4, size)).astype(np.float32)
        rec = {"check": True, "size": size}

        def rel(a, b):
            return float(np.abs(a - b).max() / np.abs(b).max())
        if mats8:
            m = mats8[0]
            if {"panel8", "panelgen"} & set(kernels):
                ref = self.p8.reference(m["q"], m["scale_bits"], X)
                for k in ("panel8", "panelgen"):
                    if k in kernels:
                        got = self.call(k, m, X, None)
                        rec[f"{k}_rel_err_vs_float64"] = rel(got, ref)
                        rec[f"{k}_B1_equals_batched_row"] = bool(np.array_equal(self.call(k, m, X[2:3], None)[0], got[2]))
                if {"panel8", "panelgen"} <= set(kernels):
                    rec["panel8_equals_panelgen"] = bool(np.array_equal(self.call("panel8", m, X, None),
                                                                        self.call("panelgen", m, X, None)))
            if "split15" in kernels:
                ref = self.p15.reference_split(m["q"], m["scale_bits"], X)
                got = self.call("split15", m, X, None)
                exact = (m["q"].astype(np.float64) * np.repeat(m["scale_bits"].view(np.float16).astype(np.float64),
                                                               32, 1)) @ X.T.astype(np.float64)
                rec["split15_rel_err_vs_float64"] = rel(got, ref)
                rec["split15_rel_err_vs_fp32_acts"] = rel(got, exact.T)
                rec["split15_B1_equals_batched_row"] = bool(np.array_equal(self.call("split15", m, X[1:2], None)[0],
                                                                           got[1]))
                if "panel8" in kernels:
                    rec["panel8_rel_err_vs_fp32_acts"] = rel(self.call("panel8", m, X, None), exact.T)
        if mats4 and "panel4" in kernels:
            m = mats4[0]
            ref = self.p4.reference_i4a8(m["q"], m["words"], X)
            got = self.call("panel4", m, X, None)
            rec["panel4_rel_err_vs_float64"] = rel(got, ref)
            rec["panel4_B1_equals_batched_row"] = bool(np.array_equal(self.call("panel4", m, X[1:2], None)[0], got[1]))
            if "today4" in kernels:
                rec["today4_rel_err_vs_float64_a8"] = rel(m["matrix"]._matmul_rows(X, False), ref)
        self.emit(rec)
        failed = [k for k, v in rec.items() if k.endswith(("equals_batched_row", "equals_panelgen")) and v is False]
        failed += [k for k, v in rec.items() if k.endswith("vs_float64") and v > 1e-5]
        if failed:
            print(f"CHECK FAILED: {failed}", file=sys.stderr, flush=True)
        return not failed

    # ---------------------------------------------------------------------------------------------- timing
    def time_kernel(self, kernel, mats, X, src):
        for m in mats[:2]:
            self.call(kernel, m, X, src)                   # compile / warm
        per_row = []
        for _ in range(self.args.rounds):
            t0 = time.thread_time()
            for m in mats:
                self.call(kernel, m, X, src)
            per_row.append((time.thread_time() - t0) / len(mats) / X.shape[0] * 1e6)
        return min(per_row), float(np.median(per_row))

    def run_size(self, size):
        args = self.args
        kernels = args.kernels
        want4 = bool(INT4_KERNELS & set(kernels))
        want8 = bool(set(kernels) - INT4_KERNELS) or args.ab_b1 > 0
        src = np.arange(size, dtype=np.int64)
        Xall = np.random.default_rng(0).standard_normal((max(args.batches), size)).astype(np.float32)
        mib8 = size * size / MIB
        checked = False
        for mode in args.modes:
            nmat = max(1, int(round((args.streamed_mib if mode == "streamed" else args.cached_mib) / mib8)))
            mats8, mats4 = self.make_mats(size, nmat, want8, want4, seed=size)
            if not checked:
                self.ok = self.check(size, mats8, mats4, kernels) and getattr(self, "ok", True)
                checked = True
            for B in args.batches:
                X = np.ascontiguousarray(Xall[:B])
                for kernel in kernels:
                    mats = mats4 if kernel in INT4_KERNELS else mats8
                    best, median = self.time_kernel(kernel, mats, X, src)
                    self.emit({"size": size, "mode": mode, "nmat": nmat, "B": B, "kernel": kernel,
                               "us_per_row": round(best, 1), "median": round(median, 1)})
            if args.ab_b1 and mode == "streamed":
                self.ab_b1(size, mats8, mats4, src)
            del mats8, mats4

    def ab_b1(self, size, mats8, mats4, src):
        """B = 1 from memory, kernels interleaved in alternating order per round; median of per-round ratios."""
        x = np.random.default_rng(1).standard_normal((1, size)).astype(np.float32)
        pairs = [("today", "panel8", mats8)] + ([("today4", "panel4", mats4)] if mats4 else [])
        order = [(k, ms) for a, b, ms in pairs for k in (a, b)]
        times = {k: [] for k, _ in order}
        for k, ms in order:
            self.call(k, ms[0], x, src)
        for r in range(self.args.ab_b1):
            for k, ms in (order if r % 2 == 0 else order[::-1]):
                t0 = time.thread_time()
                for m in ms:
                    self.call(k, m, x, src)
                times[k].append((time.thread_time() - t0) / len(ms) * 1e6)
        rec = {"ab_b1": True, "size": size, "nmat": len(mats8), "rounds": self.args.ab_b1,
               "prefetch_bytes": self.p8.PREFETCH_BYTES}
        for k, v in times.items():
            rec[f"{k}_median_us"] = round(float(np.median(v)), 1)
        for a, b, _ in pairs:
            rec[f"ratio_{b}_over_{a}"] = round(float(np.median(np.array(times[b]) / np.array(times[a]))), 3)
        self.emit(rec)

    # ---------------------------------------------------------------------------------------------- asm
    def dump_asm(self):
        from collections import Counter
        wp = np.zeros(64 * 64, np.uint8)
        dp = np.zeros(64 * 2, np.uint16)
        X = np.zeros((2, 64), np.float32)
        for name, fn in (("gemm_i8a8", self.p8.gemm_i8a8), ("gemm_i8a8_pmaddwd", self.p8.gemm_i8a8_pmaddwd)):
            fn(wp, dp, X)
            asm = "\n".join(fn.inspect_asm().values())
            path = self.out / f"asm_{name}_{self.p8.DPBUSD}.s"
            path.write_text(asm)
            words = [line.replace("{vex}", "").split() for line in asm.splitlines() if line.startswith("\t")]
            ops = Counter(w[0] for w in words if w and w[0].startswith("v"))
            watch = ("vpdpbusd", "vpdpwssd", "vpmaddwd", "vpmovzxbd", "vpermt2d", "vpermd", "vpblendd", "vfmadd213ps")
            self.emit({"asm": name, "dpbusd_path": self.p8.DPBUSD, "file": str(path),
                       "counts": {op: n for op, n in ops.items() if op.startswith(watch)}})

    # ---------------------------------------------------------------------------------------------- tables
    def tables(self):
        rows = [r for r in self.results if "kernel" in r]
        lines = []
        for size in self.args.sizes:
            cols = [(mode, k) for mode in self.args.modes for k in self.args.kernels]
            nm = {r["mode"]: r["nmat"] for r in rows if r["size"] == size}
            lines.append(f"**{size} x {size}**, us per activation row, best of {self.args.rounds} "
                         f"(" + ", ".join(f"{m} = {n} matrices" for m, n in nm.items()) + ")\n")
            lines.append("| B | " + " | ".join(f"{k} {mode}" for mode, k in cols) + " |")
            lines.append("| --- |" + " ---: |" * len(cols))
            for B in self.args.batches:
                cells = []
                for mode, k in cols:
                    r = [x for x in rows if x["size"] == size and x["mode"] == mode and x["kernel"] == k and x["B"] == B]
                    cells.append(f"{r[0]['us_per_row']}" if r else "")
                lines.append(f"| {B} | " + " | ".join(cells) + " |")
            lines.append("")
        return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    out = args.out or Path(tempfile.mkdtemp(prefix="rwkv-lite-act8-bench-"))
    out.mkdir(parents=True, exist_ok=True)
    bench = Bench(args, out)
    import llvmlite.binding as llvm_binding
    import numba
    meta = {"meta": True, "cpu": cpu_model(), "load_average": list(os.getloadavg()),
            "llvm": ".".join(map(str, llvm_binding.llvm_version_info)), "numba": numba.__version__,
            "llvm_host_cpu": llvm_binding.get_host_cpu_name(), "numba_cpu_name": os.environ.get("NUMBA_CPU_NAME", "host"),
            "dpbusd_path": bench.p8.DPBUSD, "prefetch_bytes": bench.p8.PREFETCH_BYTES, "argv": sys.argv[1:]}
    bench.emit(meta)
    if args.asm:
        bench.dump_asm()
    for size in args.sizes:
        bench.run_size(size)
    bench.emit({"meta_end": True, "load_average": list(os.getloadavg())})
    text = (f"CPU: {meta['cpu']} (LLVM: {meta['llvm_host_cpu']}); one thread; LLVM {meta['llvm']}; dpbusd path {meta['dpbusd_path']}; prefetch "
            f"{meta['prefetch_bytes']} B; load average at start {meta['load_average'][0]:.1f}\n\n" + bench.tables())
    (out / "tables.md").write_text(text)
    print("\n" + text)
    print(f"outputs: {out}")
    return 0 if getattr(bench, "ok", True) else 1


if __name__ == "__main__":
    sys.exit(main())
