"""Load test of `rwkv-lite serve`: K concurrent streaming clients, time to first token and tokens/s.

    python bench/load_test.py --model MODEL [--clients 1 4 8 16] [--max-tokens 64] [--prompt-tokens 64]
    python bench/load_test.py --url http://127.0.0.1:8000 [--pid PID] ...

With --model it starts `rwkv-lite serve MODEL --max-batch <largest K>` on a free port (and stops it at the end);
with --url it uses a running server (--pid: its process id, for the RSS figures). For every K, K clients each
send one streaming completion at the same moment (a distinct prompt of about --prompt-tokens tokens, greedy,
exactly --max-tokens tokens: no stop) and the script prints p50/p95 time to first token, the median per-stream
decode rate (tokens after the first / time after the first), aggregate tokens/s (all tokens / wall time of the
round) and the server's RSS after the round. Needs httpx (the test extra).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import threading
import time

import httpx
import numpy as np

WORDS = ("the of and to in is was that for it with as his on be at by had are but from or have an they which one "
         "you were all we her she there would their will when who him been has more if no out so said what up its "
         "about into than them can only other new some could time these two may then do first any my now such").split()


def rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def prompt_text(i: int, n_words: int) -> str:
    rng = np.random.default_rng(i)
    return " ".join(WORDS[j] for j in rng.integers(0, len(WORDS), n_words))


def one_stream(url, prompt, max_tokens, out, index, start_barrier):
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    start_barrier.wait()
    t0 = time.perf_counter()
    first, n = None, 0
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=3600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            doc = json.loads(line[6:])
            if "error" in doc:
                raise RuntimeError(doc["error"]["message"])
            if doc["choices"] and doc["choices"][0].get("finish_reason") is None:
                n += 1
                if first is None:
                    first = time.perf_counter()
    end = time.perf_counter()
    out[index] = (first - t0, n, end - first, end - t0)


def run_round(url, k, max_tokens, prompt_words, round_index):
    out = [None] * k
    barrier = threading.Barrier(k)
    threads = [threading.Thread(target=one_stream, args=(url, prompt_text(1000 * round_index + i, prompt_words),
                                                         max_tokens, out, i, barrier)) for i in range(k)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return out, wall


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model")
    ap.add_argument("--url")
    ap.add_argument("--pid", type=int)
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8, 16])
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--prompt-words", type=int, default=48, help="about 64 World tokens")
    args = ap.parse_args()
    server = None
    if args.model:
        port = free_port()
        args.url = f"http://127.0.0.1:{port}"
        server = subprocess.Popen([sys.executable, "-m", "rwkv_lite", "serve", args.model, "--port", str(port),
                                   "--max-batch", str(max(args.clients)), "--max-queue", "256"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        args.pid = server.pid
        while True:
            try:
                if httpx.get(args.url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
            if server.poll() is not None:
                sys.exit("the server did not start")
    try:
        run_round(args.url, 1, 4, args.prompt_words, 99)            # warm-up (compilation, page cache)
        if args.pid:
            print(f"server RSS after warm-up: {rss_bytes(args.pid) / 2**20:.0f} MiB")
        print(f"load average (1 min) at start: {os.getloadavg()[0]:.2f}")
        print("K    TTFT p50 / p95 (s)   per-stream tok/s (median)   aggregate tok/s   wall (s)   server RSS (MiB)")
        for r, k in enumerate(args.clients):
            out, wall = run_round(args.url, k, args.max_tokens, args.prompt_words, r)
            ttft = np.array([o[0] for o in out])
            per_stream = np.median([(o[1] - 1) / o[2] for o in out if o[2] > 0])
            total = sum(o[1] for o in out)
            rss = rss_bytes(args.pid) / 2**20 if args.pid else float("nan")
            print(f"{k:<4} {np.percentile(ttft, 50):7.2f} / {np.percentile(ttft, 95):6.2f}      {per_stream:10.2f}"
                  f"                {total / wall:10.2f}      {wall:7.1f}    {rss:8.0f}")
        print(f"load average (1 min) at end: {os.getloadavg()[0]:.2f}")
    finally:
        if server is not None:
            server.terminate()
            server.wait(60)


if __name__ == "__main__":
    main()
