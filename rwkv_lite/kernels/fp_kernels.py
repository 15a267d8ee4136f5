"""Kernels for float matrices: fp32 and fp16 (layouts: rwkv_lite/schemes/fp.py).

fp16 weights are passed as their uint16 bits (Numba has no float16 arithmetic); the row dot widens them in
registers (vcvtph2ps on x86). Shared helpers and the kernels' common contract: kernels/simd.py.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange, types

from .simd import DOT_BLOCK, FASTMATH, ROW_BLOCK, f16_to_f32, make_dense_row_dot

dot_f32_row = make_dense_row_dot(types.float32)
dot_f16_row = make_dense_row_dot(types.uint16)


# ----------------------------------------------------------------------------------------------------------------
# Decode GEMV kernels: y = W x

# Every GEMV has a row-range body and two entry points: `gemv_*` splits the rows over Numba's threads in blocks of
# ROW_BLOCK, `gemv_*_serial` runs them in the calling thread. Waking the pool costs a few microseconds on an idle
# machine and up to milliseconds when another process holds a core, so small matrices (the tiny models, LoRA
# factors) take the serial entry (linear.PARALLEL_MIN_WEIGHTS).

@njit(cache=True, fastmath=FASTMATH)
def _gemv_f32_rows(w, x, y, r0, r1):
    nblk = w.shape[1] // DOT_BLOCK
    for r in range(r0, r1):
        acc = dot_f32_row(w, r, x, nblk)
        for c in range(nblk * DOT_BLOCK, w.shape[1]):
            acc += w[r, c] * x[c]
        y[r] = acc


@njit(cache=True, fastmath=FASTMATH)
def _gemv_f16_rows(w, x, y, r0, r1):
    nblk = w.shape[1] // DOT_BLOCK
    for r in range(r0, r1):
        acc = dot_f16_row(w, r, x, nblk)
        for c in range(nblk * DOT_BLOCK, w.shape[1]):
            acc += f16_to_f32(w[r, c]) * x[c]
        y[r] = acc



@njit(cache=True, parallel=True)
def gemv_f32(w, x):
    """w: float32 (R, C) C-contiguous; x: float32 (C,) -> float32 (R,). As fast as numpy's BLAS sgemv from
    memory, and it keeps decode inside Numba's thread pool (see kernels/threads.py)."""
    R = w.shape[0]
    y = np.empty(R, np.float32)
    for b in prange((R + ROW_BLOCK - 1) // ROW_BLOCK):
        _gemv_f32_rows(w, x, y, b * ROW_BLOCK, min(R, (b + 1) * ROW_BLOCK))
    return y


@njit(cache=True)
def gemv_f32_serial(w, x):
    y = np.empty(w.shape[0], np.float32)
    _gemv_f32_rows(w, x, y, 0, w.shape[0])
    return y


@njit(cache=True, parallel=True)
def gemv_f16(w, x):
    """w: uint16 (R, C) fp16 bits, C-contiguous; x: float32 (C,) contiguous -> float32 (R,)."""
    R = w.shape[0]
    y = np.empty(R, np.float32)
    for b in prange((R + ROW_BLOCK - 1) // ROW_BLOCK):
        _gemv_f16_rows(w, x, y, b * ROW_BLOCK, min(R, (b + 1) * ROW_BLOCK))
    return y


@njit(cache=True)
def gemv_f16_serial(w, x):
    y = np.empty(w.shape[0], np.float32)
    _gemv_f16_rows(w, x, y, 0, w.shape[0])
    return y


# ----------------------------------------------------------------------------------------------------------------
# Row dequantisation (sequence-mode tiles, embedding lookups, tests): out[i] = W[ids[i]] as float32
#
# Serial on purpose: alternating a Numba parallel region with OpenBLAS's thread pool made both pools spin against
# each other (measured: 870 ms instead of 85 ms for a 14336 x 4096 int8 matrix times 128 tokens, 2 cores). They
# release the GIL (nogil), so linear.Matrix._gemm runs one tile per worker thread: each worker dequantises its
# tile and multiplies it with a single-threaded BLAS call, and every core does both.

@njit(cache=True, nogil=True)
def dequantize_rows_f16(w, ids, out):
    for i in range(ids.shape[0]):
        r = ids[i]
        for c in range(w.shape[1]):
            out[i, c] = f16_to_f32(w[r, c])
