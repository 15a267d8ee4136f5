"""Time GPTQ (rwkv_lite/quantize/gptq.py) and its parts on random matrices of real model shapes.

    python bench/bench_gptq.py                       # 1.5B and Eagle-7B shapes
    python bench/bench_gptq.py 4096x14336 --tokens 2048

For each R x C: H = X^T X from T random inputs (what the converter does with a calibration file's X), the
blocked Cholesky factorisation, the block products, the compiled rounding loop, and gptq_int4 as a whole (H given).
Random weights and inputs: the timings, not the quality, carry over to real models. Everything is compiled first.
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from rwkv_lite.quantize import gptq
from rwkv_lite.schemes import Int4

SHAPES = ["2048x2048", "2048x7168", "7168x2048", "4096x4096", "14336x4096", "4096x14336"]


def time_shape(R: int, C: int, tokens: int, rng) -> dict:
    X = rng.standard_normal((tokens, C), dtype=np.float32)
    W = rng.standard_normal((R, C), dtype=np.float32)
    scheme = Int4(32)
    t = time.perf_counter()
    H = X.T @ X
    out = {"h_from_x": time.perf_counter() - t}
    energy = np.diag(H).copy()
    t = time.perf_counter()
    V = gptq._reversed_cholesky(H, energy <= 0, gptq.DAMP * float(energy.mean()))
    out["factorisation"] = time.perf_counter() - t
    q = np.zeros((R, scheme.padded_cols(C)), np.uint8)
    words = np.zeros((R, scheme.padded_cols(C) // 32), np.uint16)
    D = np.empty((R, C), np.float32)
    products = loop = 0.0
    for b0 in range(0, C, gptq.BLOCK):
        b1 = min(C, b0 + gptq.BLOCK)
        t = time.perf_counter()
        earlier = np.ascontiguousarray(D[:, :b0] @ V[:b0, b0:b1] if b0 else np.zeros((R, b1 - b0), np.float32))
        products += time.perf_counter() - t
        t = time.perf_counter()
        gptq._gptq_block(W, D, earlier, V, energy, b0, b1, 32, q, words)
        loop += time.perf_counter() - t
    out.update(block_products=products, rounding_loop=loop)
    t = time.perf_counter()
    gptq.gptq_int4(W, H, scheme)
    out["gptq_total"] = time.perf_counter() - t
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("shapes", nargs="*", default=SHAPES, help="RxC (default: %(default)s)")
    ap.add_argument("--tokens", type=int, default=2048, help="calibration tokens T (default 2048)")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    small = rng.standard_normal((300, 256), dtype=np.float32)
    gptq.gptq_int4(small[:64], small.T @ small, Int4(32))          # compile
    print("| matrix (R x C) | H from X | factorisation | block products | rounding loop | GPTQ total (H given) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for shape in args.shapes:
        R, C = (int(v) for v in shape.lower().split("x"))
        r = time_shape(R, C, args.tokens, rng)
        print(f"| {R} x {C} | {r['h_from_x']:.2f} s | {r['factorisation']:.2f} s | {r['block_products']:.2f} s | "
              f"{r['rounding_loop']:.2f} s | {r['gptq_total']:.2f} s |", flush=True)


if __name__ == "__main__":
    main()
