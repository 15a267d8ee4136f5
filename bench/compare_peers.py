"""rwkv-lite side by side with llama.cpp and rwkv.cpp on the same model shapes, interleaved, with the machine's
memory-bandwidth and fp32 GEMM probes measured in the same window. Builds nothing: give it the peers' binaries.

    python bench/compare_peers.py --llama-bench ~/peers/llama.cpp/build/bin/llama-bench \\
        --rwkv-cpp-lib ~/peers/rwkv.cpp/build/librwkv.so --threads 2 --rounds 3 \\
        --case "RWKV-7 1.5B int8 vs Q8_0" g1-int8.safetensors llama:g1-q8_0.gguf \\
        --case "RWKV-7 1.5B int4 vs Q4_0" g1-int4.safetensors llama:g1-q4_0.gguf \\
        --case "Eagle 1.5B int8 vs Q8_0" eagle-int8.safetensors rwkvcpp:eagle-q8_0.bin

Each --case is a label, one rwkv-lite file and one or more peer files (`llama:` a GGUF for llama-bench,
`rwkvcpp:` an rwkv.cpp .bin loaded through its shared library with ctypes). Every engine runs in its own
process that stays up for the whole run (the model stays loaded, the page cache warm: every file is first
dropped from the cache and read back front to back, so all are cached alike); a round runs every engine
of every case in turn (the order reversed every other round), so all engines see the same machine load.

Per engine and round:
* decode: ms/token averaged over the round's timed tokens (rwkv-lite and rwkv.cpp: --tokens single-token steps
  continuing one state after 2 warm-up steps at start-up and one untimed step at the start of every round;
  rwkv-lite's as generate() takes them, the state copied into a reused buffer and advanced there, rwkv.cpp's in
  place; llama.cpp: llama-bench's tg figure, `-n --tokens*2`, one repetition after its own warm-up run). The
  round's untimed step matches llama-bench's warm-up: the first step after the other engines' turn finds cold
  caches and sleeping threads in every engine. rwkv-lite and rwkv.cpp also report the median and max of their single
  steps, and the case the median over rounds of the ratio of median steps (a few slow steps move a round's mean).
* prompt: tokens/s over --prompt random tokens from a fresh state (rwkv-lite: one `forward`; rwkv.cpp:
  `rwkv_eval_sequence_in_chunks` with --rwkv-cpp-chunk; llama.cpp: llama-bench's pp figure).
Reported: the median over rounds per engine, and per case the median over rounds of the per-round ratio
rwkv-lite / peer (decode: < 1 means rwkv-lite is faster; prompt: > 1 means rwkv-lite is faster).
Before every round: the 1-minute load average, the CPUs' busy share, numpy's fp32 GEMV bandwidth (the decode
floor's denominator) and fp32 GEMM GFLOP/s, both in a child process on --threads threads. At the end, per case:
rwkv-lite's weight bytes read per decode step (`rwkv_lite.benchmark.bytes_read_per_token`), its floor (those
bytes / the round's GEMV bandwidth) and the median over rounds of decode time / floor.

On a shared machine the figures are only as good as the window: every round prints the CPUs' busy share seen
just before it (other processes' load), and --quiet-wait S waits up to S seconds for a quieter moment.

Threads: --threads for every engine (Numba + BLAS for rwkv-lite, n_threads for rwkv.cpp, -t for llama-bench).
Code generation follows the environment: for AVX2 code on an AVX-512 machine run it with
NUMBA_CPU_NAME=haswell NUMBA_CPU_FEATURES=-avx512f OPENBLAS_CORETYPE=Haswell and give it peers built for haswell.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import time

import numpy as np

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)
try:
    import rwkv_lite                                              # noqa: F401
except ImportError:                                               # run from a checkout without installing
    sys.path.insert(0, os.path.dirname(_HERE))
from compare_decode import cpu_busy_share, cpu_model, refresh_page_cache, wait_for_quiet   # noqa: E402

from rwkv_lite.benchmark import DecodeSteps, bytes_read_per_token, memory_bandwidth   # noqa: E402


# ---------------------------------------------------------------- probes (each in a child process)

def _gemm_probe(queue, threads, n):
    from rwkv_lite.kernels.threads import set_blas_threads, set_threads
    set_blas_threads(set_threads(threads))
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    a @ b
    times = []
    for _ in range(5):
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    queue.put(2 * n ** 3 / statistics.median(times) / 1e9)


def gemm_gflops(threads: int, n: int = 2048) -> float:
    """numpy fp32 GEMM (n x n times n x n) GFLOP/s on `threads` BLAS threads, median of 5."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_gemm_probe, args=(q, threads, n))
    p.start()
    value = q.get(timeout=600)
    p.join()
    return value


# ---------------------------------------------------------------- engines that stay loaded in a worker process

class LiteEngine:
    name = "rwkv-lite"

    def __init__(self, path, threads, tokens, prompt):
        import rwkv_lite
        from rwkv_lite.kernels.threads import set_threads
        self.threads = set_threads(threads)
        self.model = rwkv_lite.load(path)
        self.vocab = self.model.config["vocab_size"]
        self.bytes_per_token = bytes_read_per_token(self.model)
        self.tokens, self.prompt = tokens, prompt
        self.rng = np.random.default_rng(0)
        self.steps = DecodeSteps(self.model, 1)          # single-token steps as generate() takes them
        for _ in range(2):
            self.steps.step(int(np.argmax(self.steps.logits)))
        self.model.forward(self.rng.integers(1, self.vocab, size=prompt).tolist())     # warm the sequence path

    def round(self):
        self.steps.step(int(np.argmax(self.steps.logits)))          # untimed, as llama-bench's warm-up run
        times = []
        for _ in range(self.tokens):
            token = int(np.argmax(self.steps.logits))
            t = time.perf_counter()
            self.steps.step(token)
            times.append(time.perf_counter() - t)
        ids = self.rng.integers(1, self.vocab, size=self.prompt).tolist()
        t = time.perf_counter()
        self.model.forward(ids)
        prompt_s = time.perf_counter() - t
        return {"decode_ms": 1e3 * statistics.fmean(times), "decode_median_ms": 1e3 * statistics.median(times),
                "decode_min_ms": 1e3 * min(times), "decode_max_ms": 1e3 * max(times),
                "prompt_tok_s": self.prompt / prompt_s, "bytes_per_token": self.bytes_per_token}


class RwkvCppEngine:
    name = "rwkv.cpp"

    def __init__(self, path, threads, tokens, prompt, lib, chunk):
        L = self.lib = ctypes.CDLL(lib)
        L.rwkv_init_from_file.argtypes = [ctypes.c_char_p, ctypes.c_uint32, ctypes.c_uint32]
        L.rwkv_init_from_file.restype = ctypes.c_void_p
        fp = ctypes.POINTER(ctypes.c_float)
        L.rwkv_eval.argtypes = [ctypes.c_void_p, ctypes.c_uint32, fp, fp, fp]
        L.rwkv_eval.restype = ctypes.c_bool
        L.rwkv_eval_sequence_in_chunks.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint32), ctypes.c_size_t,
                                                   ctypes.c_size_t, fp, fp, fp]
        L.rwkv_eval_sequence_in_chunks.restype = ctypes.c_bool
        for f in ("rwkv_get_state_len", "rwkv_get_logits_len"):
            getattr(L, f).argtypes = [ctypes.c_void_p]
            getattr(L, f).restype = ctypes.c_size_t
        self.ctx = L.rwkv_init_from_file(os.fsencode(path), threads, 0)
        if not self.ctx:
            raise RuntimeError(f"rwkv.cpp could not load {path}")
        self.threads, self.tokens, self.prompt, self.chunk = threads, tokens, prompt, chunk
        self.state = np.zeros(L.rwkv_get_state_len(self.ctx), np.float32)
        self.logits = np.zeros(L.rwkv_get_logits_len(self.ctx), np.float32)
        self.vocab = self.logits.size
        self.rng = np.random.default_rng(0)
        self._eval(1, first=True)
        for _ in range(2):
            self._eval(int(np.argmax(self.logits)))
        self._sequence(self.rng.integers(1, self.vocab, size=prompt))      # builds the sequence graph once

    @staticmethod
    def _p(a):
        return a.ctypes.data_as(ctypes.POINTER(ctypes.c_float))

    def _eval(self, token, first=False):
        ok = self.lib.rwkv_eval(self.ctx, token, None if first else self._p(self.state), self._p(self.state),
                                self._p(self.logits))
        if not ok:
            raise RuntimeError("rwkv_eval failed")

    def _sequence(self, ids):
        ids = np.ascontiguousarray(ids, dtype=np.uint32)
        out = np.zeros_like(self.state)
        ok = self.lib.rwkv_eval_sequence_in_chunks(self.ctx, ids.ctypes.data_as(ctypes.POINTER(ctypes.c_uint32)),
                                                   ids.size, self.chunk, None, self._p(out), self._p(self.logits))
        if not ok:
            raise RuntimeError("rwkv_eval_sequence_in_chunks failed")

    def round(self):
        self._eval(int(np.argmax(self.logits)))                     # untimed, as llama-bench's warm-up run
        times = []
        for _ in range(self.tokens):
            token = int(np.argmax(self.logits))
            t = time.perf_counter()
            self._eval(token)
            times.append(time.perf_counter() - t)
        saved = self.state.copy()
        ids = self.rng.integers(1, self.vocab, size=self.prompt)
        t = time.perf_counter()
        self._sequence(ids)
        prompt_s = time.perf_counter() - t
        self.state = saved
        return {"decode_ms": 1e3 * statistics.fmean(times), "decode_median_ms": 1e3 * statistics.median(times),
                "decode_min_ms": 1e3 * min(times), "decode_max_ms": 1e3 * max(times),
                "prompt_tok_s": self.prompt / prompt_s}


def _worker(conn, kind, args):
    try:
        engine = LiteEngine(*args) if kind == "lite" else RwkvCppEngine(*args)
        conn.send(("ready", None))
        while conn.recv() == "round":
            conn.send(("ok", engine.round()))
    except Exception as e:                                      # report, do not hang the parent
        conn.send(("error", f"{type(e).__name__}: {e}"))


class Worker:
    def __init__(self, kind, args):
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker, args=(child, kind, args), daemon=True)
        self.proc.start()

    def wait_ready(self):
        status, msg = self.conn.recv()
        if status != "ready":
            raise RuntimeError(msg)

    def round(self):
        self.conn.send("round")
        status, value = self.conn.recv()
        if status != "ok":
            raise RuntimeError(value)
        return value

    def close(self):
        try:
            self.conn.send("stop")
        except OSError:
            pass
        self.proc.join(10)


class LlamaBench:
    """llama-bench run once per round (it loads the GGUF each time; decode and pp figures are its own)."""
    name = "llama.cpp"

    def __init__(self, binary, path, threads, tokens, prompt):
        self.cmd = [binary, "-m", path, "-t", str(threads), "-p", str(prompt), "-n", str(2 * tokens),
                    "-r", "1", "-o", "json"]

    def wait_ready(self):
        pass

    def round(self):
        out = subprocess.run(self.cmd, check=True, capture_output=True, text=True).stdout
        rows = json.loads(out)
        r = {}
        for row in rows:
            if row.get("n_gen", 0) > 0 and row.get("n_prompt", 0) == 0:
                r["decode_ms"] = 1e3 / row["avg_ts"]
            elif row.get("n_prompt", 0) > 0 and row.get("n_gen", 0) == 0:
                r["prompt_tok_s"] = row["avg_ts"]
        r.setdefault("build", rows[0].get("build_commit", "?") if rows else "?")
        return r

    def close(self):
        pass


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--case", nargs="+", action="append", required=True, metavar="X",
                    help="LABEL LITE_FILE [llama:GGUF] [rwkvcpp:BIN] ...")
    ap.add_argument("--llama-bench", default=None, help="path to llama.cpp's llama-bench")
    ap.add_argument("--rwkv-cpp-lib", default=None, help="path to rwkv.cpp's shared library (librwkv.so)")
    ap.add_argument("--rwkv-cpp-chunk", type=int, default=16, help="rwkv.cpp sequence chunk (its default: 16)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=16, help="timed decode tokens per engine per round")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--probe-mb", type=int, default=1024, help="bandwidth probe working set")
    ap.add_argument("--no-probes", action="store_true")
    ap.add_argument("--quiet-wait", type=float, default=0.0, metavar="S",
                    help="before each round wait up to S seconds for other processes to leave the CPUs mostly idle")
    ap.add_argument("--json", default=None, help="also write every figure here")
    args = ap.parse_args()

    env = {k: os.environ[k] for k in ("NUMBA_CPU_NAME", "NUMBA_CPU_FEATURES", "OPENBLAS_CORETYPE") if k in os.environ}
    print(f"CPU: {cpu_model()}, {os.cpu_count()} logical CPUs, {args.threads} threads for every engine, "
          f"env {env or '(host code generation)'}, load average {os.getloadavg()[0]:.2f}", flush=True)

    cases = []
    for spec in args.case:
        if len(spec) < 3:
            ap.error("--case needs LABEL LITE_FILE and at least one peer")
        label, lite, peers = spec[0], spec[1], spec[2:]
        for path in [lite] + [p.partition(":")[2] for p in peers]:
            refresh_page_cache(path)
        engines = []
        for p in peers:
            kind, _, path = p.partition(":")
            if kind == "llama":
                if not args.llama_bench:
                    ap.error("a llama: file needs --llama-bench")
                engines.append(LlamaBench(args.llama_bench, path, args.threads, args.tokens, args.prompt))
            elif kind == "rwkvcpp":
                if not args.rwkv_cpp_lib:
                    ap.error("an rwkvcpp: file needs --rwkv-cpp-lib")
                engines.append(Worker("rwkvcpp", (path, args.threads, args.tokens, args.prompt,
                                                  os.path.abspath(args.rwkv_cpp_lib), args.rwkv_cpp_chunk)))
                engines[-1].name = "rwkv.cpp"
            else:
                ap.error(f"peer {p!r}: expected llama:FILE or rwkvcpp:FILE")
            engines[-1].file = os.path.basename(path)
        w = Worker("lite", (lite, args.threads, args.tokens, args.prompt))
        w.name, w.file = "rwkv-lite", os.path.basename(lite)
        cases.append({"label": label, "engines": [w] + engines, "results": {}})
    for c in cases:                                   # load one at a time: no start-up overlaps another's
        for e in c["engines"]:
            e.wait_ready()

    probes = []
    try:
        for i in range(args.rounds):
            busy = wait_for_quiet(args.quiet_wait) if args.quiet_wait else cpu_busy_share()
            p = {"load": os.getloadavg()[0], "busy": busy}
            if not args.no_probes:
                p["bandwidth_gb_s"] = memory_bandwidth(args.threads, args.probe_mb) / 1e9
                p["gemm_gflops"] = gemm_gflops(args.threads)
            probes.append(p)
            line = [f"round {i + 1}/{args.rounds}: load {p['load']:.2f}, CPUs {p['busy']:.0%} busy"]
            if "bandwidth_gb_s" in p:
                line.append(f"bandwidth {p['bandwidth_gb_s']:.1f} GB/s, GEMM {p['gemm_gflops']:.0f} GFLOP/s")
            for c in cases:
                order = c["engines"] if i % 2 == 0 else c["engines"][::-1]
                for e in order:
                    r = e.round()
                    c["results"].setdefault(e.name + " " + e.file, []).append(r)
                    time.sleep(0.2)
                line.append(c["label"] + ": " + ", ".join(
                    f"{e.name} {c['results'][e.name + ' ' + e.file][-1]['decode_ms']:.1f} ms "
                    f"{c['results'][e.name + ' ' + e.file][-1]['prompt_tok_s']:.1f} tok/s" for e in c["engines"]))
            print("\n  ".join(line), flush=True)
    finally:
        for c in cases:
            for e in c["engines"]:
                e.close()

    med = statistics.median
    print(f"\nload average after: {os.getloadavg()[0]:.2f}")
    if probes and "bandwidth_gb_s" in probes[0]:
        bw = [p["bandwidth_gb_s"] for p in probes]
        gf = [p["gemm_gflops"] for p in probes]
        print(f"probes ({args.threads} threads): fp32 GEMV bandwidth median {med(bw):.1f} GB/s "
              f"(min {min(bw):.1f}, max {max(bw):.1f}); fp32 GEMM 2048^3 median {med(gf):.0f} GFLOP/s "
              f"(min {min(gf):.0f}, max {max(gf):.0f}); load average per round "
              + ", ".join(f"{p['load']:.2f}" for p in probes))
    print(f"\n| case | engine, file | decode ms/token (median of {args.rounds} rounds; min-max) | "
          f"prompt {args.prompt} tok/s | decode ratio lite/peer | prompt ratio lite/peer |")
    print("| --- | --- | --- | --- | --- | --- |")
    summary = []
    for c in cases:
        lite_key = "rwkv-lite " + c["engines"][0].file
        lite = c["results"][lite_key]
        for e in c["engines"]:
            key = e.name + " " + e.file
            rs = c["results"][key]
            dec = [r["decode_ms"] for r in rs]
            pp = [r["prompt_tok_s"] for r in rs]
            row = {"case": c["label"], "engine": e.name, "file": e.file, "decode_ms": med(dec),
                   "decode_min_ms": min(dec), "decode_max_ms": max(dec), "prompt_tok_s": med(pp), "rounds": rs}
            extra = ""
            if "decode_median_ms" in rs[0]:      # engines timed step by step (not llama-bench's one figure)
                steps_med = med(r["decode_median_ms"] for r in rs)
                spread = max(r["decode_max_ms"] for r in rs) / steps_med
                extra = f" (single steps: median {steps_med:.1f}, max/median {spread:.2f})"
            if key == lite_key:
                dr = pr = "-"
            else:
                row["decode_ratio"] = med(a["decode_ms"] / b["decode_ms"] for a, b in zip(lite, rs))
                row["prompt_ratio"] = med(a["prompt_tok_s"] / b["prompt_tok_s"] for a, b in zip(lite, rs))
                dr, pr = f"{row['decode_ratio']:.2f}x", f"{row['prompt_ratio']:.2f}x"
                if "decode_median_ms" in rs[0]:
                    # a few multi-second steps (page cache pushed out, a descheduled thread) move a round's mean;
                    # the ratio of median steps is the steady-state comparison
                    row["decode_step_ratio"] = med(a["decode_median_ms"] / b["decode_median_ms"]
                                                   for a, b in zip(lite, rs))
                    dr += f" (median steps {row['decode_step_ratio']:.2f}x)"
            summary.append(row)
            print(f"| {c['label']} | {e.name}, {e.file} | {row['decode_ms']:.1f} ({min(dec):.1f}-{max(dec):.1f})"
                  f"{extra} | {row['prompt_tok_s']:.1f} | {dr} | {pr} |")
    if probes and "bandwidth_gb_s" in probes[0]:
        print("\nrwkv-lite decode against its bandwidth floor (weight bytes one decode step reads / the GEMV probe's "
              "bandwidth of the same round; ratio: median over rounds of decode ms / floor ms):")
        for c in cases:
            lite = c["results"]["rwkv-lite " + c["engines"][0].file]
            nbytes = lite[0]["bytes_per_token"]
            floors = [1e3 * nbytes / (p["bandwidth_gb_s"] * 1e9) for p in probes]
            ratio = med(r["decode_ms"] / f for r, f in zip(lite, floors))
            print(f"  {c['label']}: {nbytes / 1e9:.3f} GB/token, floor {med(floors):.1f} ms "
                  f"({min(floors):.1f}-{max(floors):.1f}), decode / floor {ratio:.2f}x")
            for row in summary:
                if row["case"] == c["label"] and row["engine"] == "rwkv-lite":
                    row.update(bytes_per_token=nbytes, floor_ms=med(floors), decode_over_floor=ratio)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cpu": cpu_model(), "threads": args.threads, "env": env, "probes": probes,
                       "rows": summary}, f, indent=1)


if __name__ == "__main__":
    main()
