"""Decode and prompt speed of one model at several thread counts, each with the memory-bandwidth probe of the
same thread count (numpy fp32 GEMV over matrices much larger than the caches).

    python bench/thread_scaling.py model.st --threads 1,2,4,8,16 --tokens 16 --prompt 128

Per thread count: bandwidth GB/s, decode median ms/token (min, max, spread = max / median), decode as a
multiple of the bandwidth floor (bytes read per token / bandwidth), the fraction of the bandwidth decode
reaches, and prompt tokens/s (the faster of two runs after a warm-up run of the same length) with its speed-up
over one thread and efficiency (speed-up / threads).
Numba's pool can only shrink after start-up, so the largest count must not exceed NUMBA_NUM_THREADS (default:
every core). Prints a Markdown table; --json writes the rows too.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import numpy as np

import rwkv_lite
from rwkv_lite.benchmark import DecodeSteps, bytes_read_per_token, memory_bandwidth
from rwkv_lite.kernels.threads import set_threads

try:
    from compare_decode import cpu_model
except ImportError:                                 # run from elsewhere
    from bench.compare_decode import cpu_model     # type: ignore


def measure(model, threads: int, tokens: int, prompt: int, probe_mb: int) -> dict:
    bandwidth = memory_bandwidth(threads, probe_mb)
    n = set_threads(threads)
    V = model.config["vocab_size"]
    rng = np.random.default_rng(threads)
    steps = DecodeSteps(model, int(rng.integers(1, V)))     # decode steps as generate() takes them
    for _ in range(2):
        steps.step(int(steps.logits.argmax()))
    times = []
    for _ in range(tokens):
        token = int(steps.logits.argmax())
        t = time.perf_counter()
        steps.step(token)
        times.append(time.perf_counter() - t)
    ids = rng.integers(1, V, size=prompt)
    model.forward(ids)      # warm-up at this length: row kernels switch to their parallel drivers (compiled on
    prompt_times = []       # first use) by row count, so a shorter warm-up left compilation in the timed run
    for _ in range(2):
        t = time.perf_counter()
        model.forward(ids)
        prompt_times.append(time.perf_counter() - t)
    prompt_s = min(prompt_times)
    med = statistics.median(times)
    floor = bytes_read_per_token(model) / bandwidth
    return {"threads": n, "bandwidth_gb_s": bandwidth / 1e9, "decode_ms": 1e3 * med, "decode_min_ms": 1e3 * min(times),
            "decode_max_ms": 1e3 * max(times), "spread": max(times) / med, "floor_ms": 1e3 * floor,
            "vs_floor": med / floor, "prompt_tok_s": prompt / prompt_s}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--threads", default="1,2,4,8,16")
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--probe-mb", type=int, default=1024)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    counts = [int(t) for t in args.threads.split(",")]
    model = rwkv_lite.load(args.model)
    print(f"CPU: {cpu_model()} ({os.cpu_count()} logical CPUs), model {os.path.basename(args.model)} "
          f"({bytes_read_per_token(model) / 1e9:.2f} GB read per token), "
          f"NUMBA_CPU_NAME={os.environ.get('NUMBA_CPU_NAME', '(host)')}, load {os.getloadavg()[0]:.2f}", flush=True)
    rows = []
    for n in counts:
        rows.append(measure(model, n, args.tokens, args.prompt, args.probe_mb))
        r = rows[-1]
        print(f"  {n} threads: {r['bandwidth_gb_s']:.1f} GB/s, decode {r['decode_ms']:.1f} ms, prompt "
              f"{r['prompt_tok_s']:.1f} tok/s", flush=True)
    one_thread = rows[0]["prompt_tok_s"] / rows[0]["threads"]     # the first row's speed per thread
    print("| threads | probe GB/s | decode ms/token (min-max) | spread | decode / floor | share of bandwidth "
          "| prompt tok/s | prompt speed-up | efficiency |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        speedup = r["prompt_tok_s"] / one_thread
        r["prompt_speedup_vs_1"] = speedup
        print(f"| {r['threads']} | {r['bandwidth_gb_s']:.1f} | {r['decode_ms']:.1f} ({r['decode_min_ms']:.1f}-"
              f"{r['decode_max_ms']:.1f}) | {r['spread']:.2f} | {r['vs_floor']:.2f}x | {1 / r['vs_floor']:.0%} | "
              f"{r['prompt_tok_s']:.1f} | {speedup:.2f}x | {speedup / r['threads']:.0%} |")
    print(f"load after: {os.getloadavg()[0]:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cpu": cpu_model(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
