"""Speed and memory of a model on this machine (`rwkv-lite bench`, bench/bench_formats.py).

Figures: load time, load-to-first-logits, prompt tokens/s (sequence mode), decode ms/token (median of repeats),
peak RSS, and a memory-bandwidth probe run in a child process, so that decode time can be stated as a multiple
of `bytes read per token / bandwidth` (the floor for a memory-bound RNN)."""
from __future__ import annotations

import multiprocessing as mp
import resource
import statistics
import time
from pathlib import Path

import numpy as np

from .progress import Progress


class DecodeSteps:
    """Single-token decode steps the way rwkv_lite.generate takes them: each step writes its new state into a
    second, reused buffer, starting from the previous state (Model.forward_in_place with `source`: a step never
    faults in fresh pages, and an interrupted step would leave the previous state intact). step(token) ->
    logits."""

    def __init__(self, model, first_token: int):
        self.model = model
        self.logits, self.state = model.forward([first_token])
        self._spare = self.state.copy()

    def step(self, token: int) -> np.ndarray:
        self.logits = self.model.forward_in_place([token], self._spare, source=self.state)
        self.state, self._spare = self._spare, self.state
        return self.logits


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def bytes_read_per_token(model) -> int:
    """Bytes of weights one decode step reads: every stored array except the embedding (one row of it)."""
    tensors = model.metadata["tensors"]
    total = 0
    for name, arr in model.file.arrays.items():
        base = name
        while base not in tensors and "." in base:
            base = base.rsplit(".", 1)[0]
        info = tensors.get(base)
        if info is None:
            continue                       # tokenizer data
        if info.get("role") == "embedding":
            total += arr.nbytes // max(1, arr.shape[0])
        else:
            total += arr.nbytes
    return total


def _probe(queue, threads, megabytes):
    from .kernels.threads import set_blas_threads, set_threads
    set_blas_threads(set_threads(threads))         # numpy's sgemv on as many threads as the kernels use
    n = int(np.sqrt(megabytes * (1 << 20) / 4 / 8))
    mats = [np.random.default_rng(i).standard_normal((n, n), dtype=np.float32) for i in range(8)]
    x = np.ones(n, np.float32)
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        for m in mats:
            m @ x
        times.append(time.perf_counter() - t0)
    queue.put(8 * mats[0].nbytes / statistics.median(times))


def memory_bandwidth(threads: int | None = None, megabytes: int = 512) -> float:
    """Bytes/s that numpy's fp32 GEMV streams from RAM (8 matrices cycled so none stays in cache)."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_probe, args=(q, threads, megabytes))
    p.start()
    value = q.get(timeout=600)
    p.join()
    return value


def run(path, *, threads: int | None = None, decode_tokens: int = 16, prompt_lengths=(128, 1024),
        probe: bool = True, progress: Progress | None = None) -> dict:
    """Measure one model file: load time, decode ms/token, prompt tokens/s, peak RSS, and (probe=True) the
    machine's memory bandwidth. `progress(done, total, stage)` is called as each measured stage starts."""
    import rwkv_lite
    from .kernels.threads import set_threads
    n_threads = set_threads(threads)
    stages = ["decode"] + [f"prompt {n}" for n in prompt_lengths]

    def say(stage: str) -> None:            # progress(stages done, stages, the stage starting now)
        if progress is not None:
            progress(stages.index(stage), len(stages), stage)
    path = Path(path)
    bandwidth = memory_bandwidth(threads) if probe else None

    t0 = time.perf_counter()
    model = rwkv_lite.load(path)
    load_s = time.perf_counter() - t0
    V = model.config["vocab_size"]
    rng = np.random.default_rng(0)
    t1 = time.perf_counter()
    steps = DecodeSteps(model, int(rng.integers(1, V)))
    first_logits_s = load_s + time.perf_counter() - t1

    say("decode")
    for _ in range(2):                                      # warm-up (compilation, page faults)
        steps.step(int(steps.logits.argmax()))
    times = []
    for _ in range(decode_tokens):
        token = int(steps.logits.argmax())
        t = time.perf_counter()
        steps.step(token)
        times.append(time.perf_counter() - t)
    decode_ms = 1e3 * statistics.median(times)

    prompt = {}
    for n in prompt_lengths:
        say(f"prompt {n}")
        ids = rng.integers(1, V, size=n)
        t = time.perf_counter()
        model.forward(ids)
        prompt[str(n)] = n / (time.perf_counter() - t)

    per_token = bytes_read_per_token(model)
    doc = {
        "model": str(path),
        "file_bytes": path.stat().st_size,
        "architecture": model.config["arch"],
        "threads": n_threads,
        "load_s": load_s,
        "load_to_first_logits_s": first_logits_s,
        "decode_ms_per_token": decode_ms,
        "decode_ms_min": 1e3 * min(times),
        "decode_ms_max": 1e3 * max(times),
        "decode_spread": max(times) / statistics.median(times),   # 1.0 = every token equally fast
        "decode_tokens": decode_tokens,
        "prompt_tokens_per_s": prompt,
        "bytes_read_per_token": per_token,
        "peak_rss_bytes": peak_rss_bytes(),
    }
    if bandwidth:
        floor_ms = 1e3 * per_token / bandwidth
        doc.update({"bandwidth_gb_s": bandwidth / 1e9, "bandwidth_floor_ms": floor_ms,
                    "decode_vs_bandwidth_floor": decode_ms / floor_ms})
    model.close()
    return doc
