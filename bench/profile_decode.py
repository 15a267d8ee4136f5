"""Where one decode token's time goes: the GEMVs per matrix shape against everything else.

    python bench/profile_decode.py MODEL [--tokens 32] [--prompt 128]

Times `model.forward([t], state)` (median over --tokens calls after 2 warm-up calls), then again with every
Matrix call timed, and prints milliseconds per token per matrix shape and the rest (norms, mixes, WKV, state
copy, Python). The timed pass runs each block step by step (the same kernels), where RWKV-5/7 panel files
decode each block as one compiled call: its total minus the first median is what the block calls save. With
--prompt N it then does the same for sequence mode: `model.forward(ids)` over N random tokens from a fresh state
(median of 3 after one warm-up), the matrix products (dequantised tiles times the activations, or the scheme's
own kernel) against the rest, per prompt. Weight bytes read per decode step are
printed too (rwkv_lite.benchmark.bytes_read_per_token). Used for the profiles in docs/performance.md.
"""
from __future__ import annotations

import argparse
import time
from collections import defaultdict

import numpy as np

import rwkv_lite
from rwkv_lite.kernels import linear


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=0, help="also profile sequence mode over this many tokens")
    args = ap.parse_args()
    model = rwkv_lite.load(args.model)
    from rwkv_lite.benchmark import bytes_read_per_token
    print(f"weights read per decode step: {bytes_read_per_token(model) / 1e9:.3f} GB")
    state, token = model.new_state(), [123 % model.config["vocab_size"]]
    for _ in range(2):
        _, state = model.forward(token, state)
    times = []
    for _ in range(args.tokens):
        t = time.perf_counter()
        _, state = model.forward(token, state)
        times.append(time.perf_counter() - t)
    print(f"decode: median {1e3 * np.median(times):.1f} ms/token (min {1e3 * min(times):.1f}, "
          f"max {1e3 * max(times):.1f}) over {args.tokens} tokens")

    spent, calls = defaultdict(float), defaultdict(int)
    original_call, original_many = linear.Matrix.__call__, linear.gemv_many

    def timed_call(self, x):
        t = time.perf_counter()
        y = original_call(self, x)
        spent[f"{self.scheme} {self.shape[0]}x{self.shape[1]}"] += time.perf_counter() - t
        calls[f"{self.scheme} {self.shape[0]}x{self.shape[1]}"] += 1
        return y

    def timed_many(matrices, xs):
        t = time.perf_counter()
        ys = original_many(matrices, xs)
        key = "one launch: " + " + ".join(f"{m.shape[0]}x{m.shape[1]}" for m in matrices)
        spent[key] += time.perf_counter() - t
        calls[key] += 1
        return ys

    def timed_chain(run, n):                  # RWKV-7's LoRAs in one launch (Layer.lora_chain)
        key = f"one launch: LoRA chain of {n} factor pairs"

        def timed(xs):
            t = time.perf_counter()
            ys = run(xs)
            spent[key] += time.perf_counter() - t
            calls[key] += 1
            return ys
        return timed

    chains = [L for L in getattr(model.weights, "layers", []) if getattr(L, "lora_chain", None) is not None]
    original_chains = [L.lora_chain for L in chains]
    linear.Matrix.__call__ = timed_call
    import rwkv_lite.arch.common as common
    common.gemv_many = timed_many
    for L in chains:
        L.lora_chain = timed_chain(L.lora_chain, len(L.lora_down))
    # The products are timed from Python, so the instrumented pass takes the step-by-step path (the same kernels)
    # where the decode above ran each block as one compiled call (kernels/token_blocks.py).
    block_calls = getattr(model.weights, "block_token", False)
    model.weights.block_token = False
    try:
        t0 = time.perf_counter()
        for _ in range(args.tokens):
            _, state = model.forward(token, state)
        total = (time.perf_counter() - t0) / args.tokens
    finally:
        linear.Matrix.__call__, common.gemv_many = original_call, original_many
        for L, run in zip(chains, original_chains):
            L.lora_chain = run
        if block_calls:
            model.weights.block_token = True
    print(f"instrumented: {1e3 * total:.1f} ms/token"
          + (" (step by step: the decode above ran each block as one compiled call)" if block_calls else ""))
    gemv = 0.0
    for key, seconds in sorted(spent.items(), key=lambda kv: -kv[1]):
        per_token = seconds / args.tokens
        gemv += per_token
        print(f"  {key:<48} {calls[key] // args.tokens:4d} calls/token {1e3 * per_token:8.2f} ms/token")
    print(f"  {'GEMVs (all of the above)':<48} {'':15} {1e3 * gemv:8.2f} ms/token")
    print(f"  {'everything else':<48} {'':15} {1e3 * (total - gemv):8.2f} ms/token")

    if args.prompt:
        rng = np.random.default_rng(0)
        ids = [rng.integers(1, model.config["vocab_size"], size=args.prompt).tolist() for _ in range(4)]
        model.forward(ids[0])
        times = []
        for seq in ids[1:]:
            t = time.perf_counter()
            model.forward(seq)
            times.append(time.perf_counter() - t)
        print(f"\nprompt of {args.prompt} tokens: median {np.median(times):.3f} s "
              f"({args.prompt / np.median(times):.1f} tokens/s)")
        spent.clear()
        calls.clear()
        linear.Matrix.__call__ = timed_call
        common.gemv_many = timed_many
        try:
            t0 = time.perf_counter()
            model.forward(ids[1])
            total = time.perf_counter() - t0
        finally:
            linear.Matrix.__call__, common.gemv_many = original_call, original_many
        print(f"instrumented: {total:.3f} s")
        gemm = 0.0
        for key, seconds in sorted(spent.items(), key=lambda kv: -kv[1]):
            gemm += seconds
            print(f"  {key:<48} {calls[key]:4d} calls {1e3 * seconds:9.1f} ms")
        print(f"  {'matrix products (all of the above)':<48} {'':10} {1e3 * gemm:9.1f} ms")
        print(f"  {'everything else':<48} {'':10} {1e3 * (total - gemm):9.1f} ms")


if __name__ == "__main__":
    main()
