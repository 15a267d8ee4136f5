"""Which vector registers the compiled decode kernels use: counts of zmm (512-bit), ymm (256-bit) and xmm
(128-bit) register operands in each kernel's assembly, for the CPU Numba compiles for: the panel-layout kernels
of today's int8/int4 files, and the row-major kernels that files written before the panel layout still use.

    python bench/asm_vectors.py                                   # this machine
    NUMBA_CPU_NAME=haswell NUMBA_CPU_FEATURES=-avx512f python bench/asm_vectors.py   # AVX2 code generation

With --mnemonics it also counts the instructions that decide a decode kernel's cost per weight byte (widening
loads, integer multiply-adds, VNNI dot products, int->float conversions, FMAs, prefetches) in each kernel, to
set beside `objdump -d` of a peer's dot-product routine.

Kernels loaded from a cache carry no assembly, so this compiles everything afresh in a temporary cache folder.
An AVX2 build must show no zmm. NUMBA_CPU_NAME=haswell alone is not enough on an AVX-512 host: Numba then keeps
the host's CPU features (AVX-512 included) and zmm code is still emitted; NUMBA_CPU_FEATURES must be set too.
"""
from __future__ import annotations

import argparse
import os
import re
import tempfile
from collections import Counter

os.environ["RWKV_LITE_CACHE_DIR"] = tempfile.mkdtemp(prefix="rwkv-lite-asm-")   # before any kernel is loaded

import numpy as np  # noqa: E402

from rwkv_lite.kernels import fp_kernels, int4_kernels, int8_kernels, linear, lowrank, panel, wkv7  # noqa: E402
from rwkv_lite.schemes import get_scheme, make_matrix  # noqa: E402


MNEMONICS = ("vpmovsxbw", "vpmovzxbw", "vpmovsxbd", "vpmaddwd", "vpmaddubsw", "vpdpbusd", "vpdpwssd",
             "vcvtdq2ps", "vcvtph2ps", "vfmadd", "vpaddd", "vpand", "vpsrlw", "prefetch")


def registers(dispatcher) -> dict:
    text = "\n".join(dispatcher.inspect_asm().values())
    return {kind: len(re.findall(rf"%{kind}\d+", text)) for kind in ("zmm", "ymm", "xmm")}


def mnemonics(dispatcher) -> Counter:
    text = "\n".join(dispatcher.inspect_asm().values())
    found = Counter()
    for line in text.splitlines():
        op = line.strip().split(None, 1)[0] if line.strip() else ""
        for m in MNEMONICS:
            if op.startswith(m):
                found[m] += 1
    return found


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mnemonics", action="store_true", help="also count the decode-relevant instructions")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    w = rng.standard_normal((256, 512)).astype(np.float32)
    x = rng.standard_normal(512).astype(np.float32)
    for name in ("int8", "int4"):                   # compile the decode kernels for real arguments
        scheme = get_scheme(name)
        m = make_matrix(name, scheme.params, scheme.quantize(w), shape=w.shape)
        m.parallel = False
        m(x)
        m.parallel = True
        linear.gemv_many([m, m], [x, x])
    for name in ("int8", "int4"):                   # the panel layout: every file converted today
        scheme = get_scheme(name, group=32, layout="p16")
        m = scheme.matrix(scheme.quantize(w), w.shape)
        m(x)                                        # single token (gemm_serial on one row)
        m(np.stack([x] * 4))                        # rows (batches, prompts)
        linear.gemv_many([m, m], [x, x])
    fp_kernels.gemv_f32_serial(w, x)
    lowrank._down_serial(x.reshape(1, -1), (w.T.copy(),), np.array([256]))
    lowrank._up_serial(x[:256].copy(), np.array([0, 256]), (w,))
    r = rng.standard_normal((1, 128)).astype(np.float32)
    wkv7._wkv7_serial(r, r, r, r, r, r, np.zeros((2, 64, 64), np.float32), np.empty_like(r))
    print(f"NUMBA_CPU_NAME={os.environ.get('NUMBA_CPU_NAME', '(host)')}")
    print(f"{'kernel':<28} {'zmm':>6} {'ymm':>6} {'xmm':>6}")
    print(f"panel kernels: the {panel.ISA!r} path")
    for label, disp in [("panel gemm (int8 and int4)", panel.gemm_serial),
                        ("panel gemv_many", panel.gemv_many),
                        ("gemv_i8g (int8 decode)", int8_kernels.gemv_i8g_serial),
                        ("gemv_i8g_many", int8_kernels.gemv_i8g_many),
                        ("gemv_i4 (int4 decode)", int4_kernels.gemv_i4_serial),
                        ("gemv_i4_many", int4_kernels.gemv_i4_many),
                        ("gemv_f32", fp_kernels.gemv_f32_serial),
                        ("lowrank down", lowrank._down_serial),
                        ("lowrank up", lowrank._up_serial),
                        ("wkv7", wkv7._wkv7_serial)]:
        counts = registers(disp)
        print(f"{label:<28} {counts['zmm']:6d} {counts['ymm']:6d} {counts['xmm']:6d}")
        if args.mnemonics:
            found = mnemonics(disp)
            print(" " * 4 + ", ".join(f"{m} {found[m]}" for m in MNEMONICS if found[m]))


if __name__ == "__main__":
    main()
