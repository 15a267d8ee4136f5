"""Decode speed of several model files measured side by side, interleaved in one process.

    python bench/compare_decode.py v5-1b5-int8.st v7-1b5-int8.st v5-1b5-int4.st v7-1b5-int4.st --rounds 6 --tokens 8
    python bench/compare_decode.py old-int4.st new-int4.st --prompt 128         # also a 128-token prompt per round

Each round runs --tokens decode steps of every model in turn (after 2 warm-up steps each), so all models see the
same machine load; reported per model: median ms/token over all rounds, min, max, spread (max / median), and the
median of the per-round medians' ratio to the first model (the A/B ratio that survives a drifting load). Also
prints the 1-minute load average before and after, and the CPU model. `--threads` sets Numba's and BLAS's
threads (default: every core). On a shared machine, `--quiet-wait S` waits (up to S seconds) before each round
until the other processes use less than a quarter of the CPUs, and reports the busy share seen before each round.
`--prompt N` also times, per round and model, an N-token prompt read from a fresh state (sequence mode) and
reports its median tokens/s and the median per-round ratio of speeds to the first model. Every file is first
dropped from the page cache and read back front to back (see refresh_page_cache; `--as-cached` leaves them).
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import numpy as np

import rwkv_lite
from rwkv_lite.format import evict_from_page_cache
from rwkv_lite.kernels.threads import set_threads


def refresh_page_cache(path):
    """Drop the file from the page cache, then read it front to back, so that every file compared is cached the
    same way, in large pieces. How a file came into the cache matters: written or faulted in small pieces it stays
    cached in small folios (Linux 6.x), and a decode step reading it took ~1.08x the time (docs/performance.md)."""
    evict_from_page_cache(path)
    with open(path, "rb") as f:
        while f.read(1 << 24):
            pass


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def cpu_busy_share(seconds: float = 0.3) -> float:
    """Fraction of all CPUs busy over `seconds` (from /proc/stat; 0 where unavailable)."""
    def sample():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        idle = v[3] + v[4]
        return sum(v) - idle, sum(v)
    try:
        b0, t0 = sample()
        time.sleep(seconds)
        b1, t1 = sample()
    except OSError:
        return 0.0
    return (b1 - b0) / max(1, t1 - t0)


def wait_for_quiet(limit_s: float, threshold: float = 0.25) -> float:
    """Wait until other processes leave the CPUs mostly idle (or limit_s passes); returns the last busy share."""
    deadline = time.time() + limit_s
    busy = cpu_busy_share()
    while busy > threshold and time.time() < deadline:
        time.sleep(1.0)
        busy = cpu_busy_share()
    return busy


class Runner:
    """One model and its decode state; step() times one token."""

    def __init__(self, path, label=None):
        self.label = label or os.path.basename(str(path))
        self.model = rwkv_lite.load(path)
        self.logits, self.state = self.model.forward([1])
        self.times: list[float] = []
        self.round_medians: list[float] = []
        self.prompt_times: list[float] = []

    def step(self) -> float:
        token = int(np.argmax(self.logits))
        t = time.perf_counter()
        self.logits, self.state = self.model.forward([token], self.state)
        return time.perf_counter() - t

    def run_round(self, tokens: int, prompt: int = 0) -> None:
        times = [self.step() for _ in range(tokens)]
        self.times += times
        self.round_medians.append(statistics.median(times))
        if prompt:
            ids = (np.arange(prompt) * 7919 + 11) % self.model.config["vocab_size"]
            t = time.perf_counter()
            self.model.forward(ids)
            self.prompt_times.append(time.perf_counter() - t)


def compare(runners, rounds: int, tokens: int, say=print, quiet_wait: float = 0.0, prompt: int = 0) -> list[dict]:
    for r in runners:
        r.step(), r.step()                                      # warm-up: compilation, page faults
        if prompt:
            r.model.forward(np.arange(prompt) % r.model.config["vocab_size"])
    for i in range(rounds):
        busy = wait_for_quiet(quiet_wait) if quiet_wait else cpu_busy_share()
        for r in runners:
            r.run_round(tokens, prompt)
        say(f"round {i + 1}/{rounds} (CPUs {busy:.0%} busy before): "
            + ", ".join(f"{r.label} {1e3 * r.round_medians[-1]:.1f}" for r in runners)
            + ("; prompt tok/s " + ", ".join(f"{prompt / r.prompt_times[-1]:.1f}" for r in runners) if prompt else ""))
    base = runners[0].round_medians
    rows = []
    for r in runners:
        med = statistics.median(r.times)
        rows.append({"model": r.label, "median_ms": 1e3 * med, "min_ms": 1e3 * min(r.times),
                     "max_ms": 1e3 * max(r.times), "spread": max(r.times) / med,
                     "ratio_to_first": statistics.median(a / b for a, b in zip(r.round_medians, base)),
                     "tokens": len(r.times)})
        if prompt:
            rows[-1]["prompt_tok_s"] = prompt / statistics.median(r.prompt_times)
            rows[-1]["prompt_speed_vs_first"] = statistics.median(
                b / a for a, b in zip(r.prompt_times, runners[0].prompt_times))
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--tokens", type=int, default=8, help="decode steps per model per round")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--prompt", type=int, default=0, metavar="N", help="also time an N-token prompt per round")
    ap.add_argument("--quiet-wait", type=float, default=0.0, metavar="S",
                    help="before each round wait up to S seconds for the other processes to go quiet")
    ap.add_argument("--as-cached", action="store_true",
                    help="leave the files in the page cache as they are (default: drop each and read it back)")
    args = ap.parse_args()
    if not args.as_cached:
        for path in args.models:
            refresh_page_cache(path)
    threads = set_threads(args.threads)
    print(f"CPU: {cpu_model()}, {threads} threads, NUMBA_CPU_NAME={os.environ.get('NUMBA_CPU_NAME', '(host)')}, "
          f"load average {os.getloadavg()[0]:.2f}")
    rows = compare([Runner(p) for p in args.models], args.rounds, args.tokens, quiet_wait=args.quiet_wait,
                   prompt=args.prompt)
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    print(f"{'model':<32} {'median ms':>10} {'min':>8} {'max':>8} {'max/med':>8} {'vs first':>9}")
    for row in rows:
        print(f"{row['model']:<32} {row['median_ms']:10.1f} {row['min_ms']:8.1f} {row['max_ms']:8.1f} "
              f"{row['spread']:8.2f} {row['ratio_to_first']:9.3f}")
    if args.prompt:
        print(f"\n{'model':<32} {'prompt tok/s':>12} {'speed vs first':>15}   ({args.prompt} tokens from a fresh state)")
        for row in rows:
            print(f"{row['model']:<32} {row['prompt_tok_s']:12.1f} {row['prompt_speed_vs_first']:15.2f}")


if __name__ == "__main__":
    main()
