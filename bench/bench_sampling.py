"""Sampler speed at the World vocabulary size (65536): ours vs the reference PIPELINE.sample_logits (CPU path).

    python bench/bench_sampling.py [--repeats 200]

Per-token cost of sample() for several settings on synthetic logits (normal noise times a scale: scale 6 gives a
peaked distribution with a small nucleus, scale 1 a flat one whose nucleus holds most of the vocabulary), and of
Penalties.apply + update with 500 distinct tokens in the table. Median over the repeats (microseconds), with the
10th..90th percentile spread. The reference is timed only when torch and rwkv are installed.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from rwkv_lite.sampling import Penalties, SamplingParams, sample, sampling_distribution  # noqa: E402

VOCAB = 65536


def timed(fn, repeats: int) -> str:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e6)
    p10, p50, p90 = np.percentile(times, [10, 50, 90])
    return f"{p50:8.0f} us ({p10:.0f}..{p90:.0f})"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    try:
        import torch
        from rwkv.utils import PIPELINE
        reference = PIPELINE.__new__(PIPELINE)
    except ImportError:
        reference = None

    settings = {
        "T 1.0 top_p 0.85 (default)": SamplingParams(),
        "T 1.0 top_p 0.3 (chat)": SamplingParams.chat(),
        "T 0.7 top_p 0.95": SamplingParams(temperature=0.7, top_p=0.95),
        "T 1.0 top_k 40 top_p 0.9": SamplingParams(top_k=40, top_p=0.9),
        "T 1.0 min_p 0.05, no top_p": SamplingParams(top_p=1.0, min_p=0.05),
        "T 1.0 no truncation": SamplingParams(top_p=1.0),
        "greedy": SamplingParams.greedy(),
    }
    for scale in (6.0, 1.0):
        logits = (rng.normal(size=VOCAB) * scale).astype(np.float32)
        print(f"\nlogits = normal * {scale:g} (vocab {VOCAB})")
        for name, params in settings.items():
            kept = sampling_distribution(logits, params)[0].size
            line = f"  {name:30s} kept {kept:6d}  ours {timed(lambda: sample(logits, params, rng), args.repeats)}"
            if reference is not None and params.min_p == 0:
                t = torch.tensor(logits)
                line += "  reference " + timed(lambda: reference.sample_logits(
                    t, params.temperature, params.top_p, params.top_k), args.repeats)
            print(line)

    pen = Penalties(0.2, 0.2, 0.996)
    for token in rng.integers(0, VOCAB, 500):
        pen.update(int(token))
    logits = (rng.normal(size=VOCAB) * 6).astype(np.float32)
    print(f"\nPenalties with {pen.ids.size} tokens: apply {timed(lambda: pen.apply(logits.copy()), args.repeats)}"
          f"   update {timed(lambda: pen.update(int(rng.integers(0, VOCAB))), args.repeats)}")


if __name__ == "__main__":
    main()
