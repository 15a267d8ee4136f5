"""Batched decode products: Y = X W^T for B independent sequences' activation rows X (B, C), one token each.

Decode of one sequence is bound by reading the weights; B sequences advanced together read each weight row once
(from memory into L1) and dot it with all B activation rows while it is in cache, so a step of B tokens costs
little more memory traffic than a step of one.

Row b of a result equals the single-token GEMV of that row (``Matrix.__call__`` on a (C,) vector) because it is
computed by the same per-row dot products (the LLVM intrinsics of kernels/*_kernels.py) on the same inputs:
  int8 (group-scaled) and int4: X rounded to 15 bits per 64-column block by simd.quantize_activations, row
      by row, exactly as the GEMV rounds its one vector; the int4 zero-point term is the same sum written once
      per row for all B vectors (float reassociation only);
  int8 (one scale per row) and fp16: the same float32 row dot as the GEMV;
  fp32: the same float32 row dot as the GEMV (Numba, not BLAS: a decode step keeps one owner of the cores,
      kernels/threads.py).

Rows are split over Numba's threads in blocks of simd.ROW_BLOCK; inside a block each weight row meets every
activation row before the next weight row is read.
The kernels release the GIL (nogil): in the server the engine thread spends most of a step in them, and the
HTTP event loop must keep streaming meanwhile.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import carray, njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from . import lowrank
from .fp_kernels import dot_f16_row, dot_f32_row
from .int4_kernels import dot_i4_g32, dot_i4_g64, dot_i4_g128, int4_scale
from .int8_kernels import dot_i8_row, dot_i8g_g32, dot_i8g_g64, dot_i8g_g128
from .linear import PARALLEL_MIN_WEIGHTS, Matrix
from .lowrank import _down_layout, _down_sum, _up_layout, _up_rows_part, _up_sum
from .simd import (DOT_BLOCK, F16, F32, FASTMATH, I8, I16, I32, I64, INT4_BLOCK, PREFETCH_BYTES, ROW_BLOCK, f16_to_f32,
                   f32_pointer, fma, is_c_array, load_vec, pair_madd, prefetch_ptr, row_pointer, splat, splat_const,
                   stack_activations, tree_sum, vec)

# Products with fewer multiply-adds than this (weights x rows) run in the calling thread (see linear.py).
PARALLEL_MIN_WORK = PARALLEL_MIN_WEIGHTS


@njit(cache=True, nogil=True)
def gather_rows(addresses, n):
    """(B, n): the n float32 values at each address (each sequence's state row of a layer: arch/batch.py)."""
    out = np.empty((addresses.shape[0], n), np.float32)
    for b in range(addresses.shape[0]):
        out[b, :] = carray(f32_pointer(addresses[b]), (n,))
    return out


@njit(cache=True, nogil=True)
def scatter_rows(X, addresses):
    """Row b of X (B, n) written to the n float32 values at addresses[b]."""
    for b in range(addresses.shape[0]):
        carray(f32_pointer(addresses[b]), (X.shape[1],))[:] = X[b, :]


def matmul_rows(matrix: Matrix, X: np.ndarray) -> np.ndarray:
    """Y (B, R) = X W^T with row b equal to matrix(X[b]) (the decode GEMV), reading W once for all rows."""
    X = np.ascontiguousarray(X, dtype=np.float32)
    B, C = X.shape
    R = matrix.shape[0]
    if C != matrix.shape[1]:
        raise ValueError(f"{matrix.scheme} matrix {matrix.shape} cannot multiply rows of shape {X.shape}")
    if B == 1:
        return matrix(X[0])[None, :]
    parallel = R > 1 and R * C * B >= PARALLEL_MIN_WORK
    return matrix._matmul_rows(X, parallel)     # the scheme's batched kernel below (rwkv_lite/schemes/)


# ----------------------------------------------------------------------------------------------------------------
# float rows (fp32, fp16, int8 with one scale per row): the GEMV's row dot, once per activation row

@njit(cache=True, fastmath=FASTMATH, nogil=True)
def _f32_rows(w, X, Y, r0, r1):
    nblk = w.shape[1] // DOT_BLOCK
    for r in range(r0, r1):
        for b in range(X.shape[0]):
            x = X[b]
            acc = dot_f32_row(w, r, x, nblk)
            for c in range(nblk * DOT_BLOCK, w.shape[1]):
                acc += w[r, c] * x[c]
            Y[b, r] = acc


@njit(cache=True, parallel=True, nogil=True)
def gemm_f32(w, X):
    R = w.shape[0]
    Y = np.empty((X.shape[0], R), np.float32)
    for k in prange((R + ROW_BLOCK - 1) // ROW_BLOCK):
        _f32_rows(w, X, Y, k * ROW_BLOCK, min(R, (k + 1) * ROW_BLOCK))
    return Y


@njit(cache=True, nogil=True)
def gemm_f32_serial(w, X):
    Y = np.empty((X.shape[0], w.shape[0]), np.float32)
    _f32_rows(w, X, Y, 0, w.shape[0])
    return Y


@njit(cache=True, fastmath=FASTMATH, nogil=True)
def _f16_rows(w, X, Y, r0, r1):
    nblk = w.shape[1] // DOT_BLOCK
    for r in range(r0, r1):
        for b in range(X.shape[0]):
            x = X[b]
            acc = dot_f16_row(w, r, x, nblk)
            for c in range(nblk * DOT_BLOCK, w.shape[1]):
                acc += f16_to_f32(w[r, c]) * x[c]
            Y[b, r] = acc


@njit(cache=True, parallel=True, nogil=True)
def gemm_f16(w, X):
    R = w.shape[0]
    Y = np.empty((X.shape[0], R), np.float32)
    for k in prange((R + ROW_BLOCK - 1) // ROW_BLOCK):
        _f16_rows(w, X, Y, k * ROW_BLOCK, min(R, (k + 1) * ROW_BLOCK))
    return Y


@njit(cache=True, nogil=True)
def gemm_f16_serial(w, X):
    Y = np.empty((X.shape[0], w.shape[0]), np.float32)
    _f16_rows(w, X, Y, 0, w.shape[0])
    return Y


@njit(cache=True, fastmath=FASTMATH, nogil=True)
def _i8_rows(q, scale, X, Y, r0, r1):
    nblk = q.shape[1] // DOT_BLOCK
    for r in range(r0, r1):
        for b in range(X.shape[0]):
            x = X[b]
            acc = dot_i8_row(q, r, x, nblk)
            for c in range(nblk * DOT_BLOCK, q.shape[1]):
                acc += np.float32(q[r, c]) * x[c]
            Y[b, r] = acc * scale[r]


@njit(cache=True, parallel=True, nogil=True)
def gemm_i8(q, scale, X):
    R = q.shape[0]
    Y = np.empty((X.shape[0], R), np.float32)
    for k in prange((R + ROW_BLOCK - 1) // ROW_BLOCK):
        _i8_rows(q, scale, X, Y, k * ROW_BLOCK, min(R, (k + 1) * ROW_BLOCK))
    return Y


@njit(cache=True, nogil=True)
def gemm_i8_serial(q, scale, X):
    Y = np.empty((X.shape[0], q.shape[0]), np.float32)
    _i8_rows(q, scale, X, Y, 0, q.shape[0])
    return Y


# ----------------------------------------------------------------------------------------------------------------
# Group-scaled int8 and int4, several activation rows per pass over a weight row: each 64-column block of weights
# is loaded, widened (int4: unpacked) and its group scales gathered once, then meets ROWS_PER_PASS activation rows,
# each with exactly the operations of the single-row dot, so every result is bit-identical to it.

ROWS_PER_PASS = 4


def _make_int8_group_rows_dot(group, nrows):
    """Intrinsic: Y[b0 + i, r] = the single-row group-int8 dot of weight row r with X16[b0 + i] (steps STEP[b0 + i])
    for i < nrows."""
    nb = INT4_BLOCK
    lanes = 16 if group == 32 else 8

    def typer(typingctx, q, r, d, step, x16, b0, y):
        if not (is_c_array(q, types.int8, 2) and is_c_array(d, types.uint16, 2)
                and is_c_array(step, types.float32, 2) and is_c_array(x16, types.int16, 2)
                and is_c_array(y, types.float32, 2) and isinstance(r, types.Integer)
                and isinstance(b0, types.Integer)):
            return None

        def codegen(context, builder, sig, args):
            qty, rty, dty, sty, xty, bty, yty = sig.args
            row = context.cast(builder, args[1], rty, types.intp)
            first_row = context.cast(builder, args[5], bty, types.intp)
            qrow, ncols = row_pointer(context, builder, qty, args[0], row)
            dptr, _ = row_pointer(context, builder, dty, args[2], row)
            batch = [builder.add(first_row, ir.Constant(I64, i)) for i in range(nrows)]
            srows = [row_pointer(context, builder, sty, args[3], b)[0] for b in batch]
            xrows = [row_pointer(context, builder, xty, args[4], b)[0] for b in batch]
            accs = [cgutils.alloca_once_value(builder, splat_const(F32, lanes, 0.0)) for _ in range(nrows)]

            def scales_at(index, n):
                bits = load_vec(builder, dptr, index, vec(I16, n))
                return builder.fpext(builder.bitcast(bits, vec(F16, n)), vec(F32, n))

            def lanes_of(v, idx):
                return builder.shuffle_vector(v, v, ir.Constant(vec(I32, len(idx)), idx))

            with cgutils.for_range(builder, builder.udiv(ncols, ir.Constant(I64, nb))) as loop:
                k = loop.index
                c0 = builder.mul(k, ir.Constant(I64, nb))
                prefetch_ptr(builder, builder.gep(qrow, [builder.add(c0, ir.Constant(I64, PREFETCH_BYTES))]))
                w16 = builder.sext(load_vec(builder, qrow, c0, vec(I8, nb)), vec(I16, nb))
                if group == 32:
                    d_pair = scales_at(builder.mul(k, ir.Constant(I64, 2)), 2)
                else:
                    g = k if group == 64 else builder.lshr(k, ir.Constant(I64, 1))
                    d_g = builder.extract_element(scales_at(g, 1), ir.Constant(I32, 0))
                for i in range(nrows):
                    isum = pair_madd(builder, w16, load_vec(builder, xrows[i], c0, vec(I16, nb)))
                    first = builder.add(lanes_of(isum, list(range(0, 8))), lanes_of(isum, list(range(8, 16))))
                    second = builder.add(lanes_of(isum, list(range(16, 24))), lanes_of(isum, list(range(24, 32))))
                    step_k = builder.load(builder.gep(srows[i], [k]))
                    if group == 32:
                        ints = builder.shuffle_vector(first, second, ir.Constant(vec(I32, 16), list(range(16))))
                        pair = builder.fmul(d_pair, splat(builder, step_k, 2))
                        scales = lanes_of(pair, [0] * 8 + [1] * 8)
                    else:
                        ints = builder.add(first, second)
                        scales = splat(builder, builder.fmul(d_g, step_k), lanes)
                    part = builder.sitofp(ints, vec(F32, lanes))
                    builder.store(fma(builder, part, scales, builder.load(accs[i])), accs[i])
            for i in range(nrows):
                yrow, _ = row_pointer(context, builder, yty, args[6], batch[i])
                builder.store(tree_sum(builder, builder.load(accs[i])), builder.gep(yrow, [row]))
            return context.get_dummy_value()
        return types.void(q, r, d, step, x16, b0, y), codegen
    return intrinsic(typer)


_dot4_i8g_g32 = _make_int8_group_rows_dot(32, ROWS_PER_PASS)
_dot4_i8g_g64 = _make_int8_group_rows_dot(64, ROWS_PER_PASS)
_dot4_i8g_g128 = _make_int8_group_rows_dot(128, ROWS_PER_PASS)


def _make_int4_rows_dot(group, nrows):
    """Intrinsic: Y[b0 + i, r] = the single-row int4 dot (int4_kernels._make_int4_row_dot, int16 activations, zero
    points excluded) of weight row r, with the row's decoded group scales d, and X16[b0 + i] (steps
    STEP[b0 + i]), for i < nrows: the block's nibbles are unpacked and its scales gathered once."""
    half = INT4_BLOCK // 2
    lanes = half // 2

    def typer(typingctx, packed, r, d, step, x16, b0, y):
        if not (is_c_array(packed, types.uint8, 2) and isinstance(d, types.Array) and d.dtype == types.float32
                and is_c_array(step, types.float32, 2) and is_c_array(x16, types.int16, 2)
                and is_c_array(y, types.float32, 2) and isinstance(r, types.Integer)
                and isinstance(b0, types.Integer)):
            return None

        def codegen(context, builder, sig, args):
            pty, rty, dty, sty, xty, bty, yty = sig.args
            row = context.cast(builder, args[1], rty, types.intp)
            first_row = context.cast(builder, args[5], bty, types.intp)
            prow, nbytes = row_pointer(context, builder, pty, args[0], row)
            dptr = context.make_array(dty)(context, builder, args[2]).data
            batch = [builder.add(first_row, ir.Constant(I64, i)) for i in range(nrows)]
            srows = [row_pointer(context, builder, sty, args[3], b)[0] for b in batch]
            xrows = [row_pointer(context, builder, xty, args[4], b)[0] for b in batch]
            accs = [cgutils.alloca_once_value(builder, splat_const(F32, lanes, 0.0)) for _ in range(nrows)]
            with cgutils.for_range(builder, builder.udiv(nbytes, ir.Constant(I64, half))) as loop:
                k = loop.index
                c0 = builder.mul(k, ir.Constant(I64, half))
                prefetch_ptr(builder, builder.gep(prow, [builder.add(c0, ir.Constant(I64, PREFETCH_BYTES))]))
                w16 = builder.zext(load_vec(builder, prow, c0, vec(I8, half)), vec(I16, half))
                low = builder.and_(w16, splat_const(I16, half, 15))
                high = builder.lshr(w16, splat_const(I16, half, 4))
                x0 = builder.mul(k, ir.Constant(I64, INT4_BLOCK))
                x1 = builder.add(x0, ir.Constant(I64, half))
                if group == 32:
                    pair = load_vec(builder, dptr, builder.mul(k, ir.Constant(I64, 2)), vec(F32, 2))
                    mask = ir.Constant(vec(I32, lanes), [0] * (lanes // 2) + [1] * (lanes // 2))
                    scales = builder.shuffle_vector(pair, pair, mask)
                else:
                    g = k if group == 64 else builder.lshr(k, ir.Constant(I64, 1))
                    scales = splat(builder, builder.load(builder.gep(dptr, [g])), lanes)
                for i in range(nrows):
                    isum = builder.add(
                        pair_madd(builder, low, load_vec(builder, xrows[i], x0, vec(I16, half))),
                        pair_madd(builder, high, load_vec(builder, xrows[i], x1, vec(I16, half))))
                    part = builder.sitofp(isum, vec(F32, lanes))
                    step_k = splat(builder, builder.load(builder.gep(srows[i], [k])), lanes)
                    part = builder.fmul(part, step_k)
                    builder.store(fma(builder, part, scales, builder.load(accs[i])), accs[i])
            for i in range(nrows):
                yrow, _ = row_pointer(context, builder, yty, args[6], batch[i])
                builder.store(tree_sum(builder, builder.load(accs[i])), builder.gep(yrow, [row]))
            return context.get_dummy_value()
        return types.void(packed, r, d, step, x16, b0, y), codegen
    return intrinsic(typer)


_dot4_i4_g32 = _make_int4_rows_dot(32, ROWS_PER_PASS)
_dot4_i4_g64 = _make_int4_rows_dot(64, ROWS_PER_PASS)
_dot4_i4_g128 = _make_int4_rows_dot(128, ROWS_PER_PASS)


# ----------------------------------------------------------------------------------------------------------------
# group-scaled int8 and int4: integer dot products on the 15-bit activations of every row

@njit(cache=True, fastmath=FASTMATH, nogil=True)
def _i8g_rows(q, scale, group, X16, STEP, Y, r0, r1):
    B = X16.shape[0]
    full = B - B % ROWS_PER_PASS
    for r in range(r0, r1):
        for b in range(0, full, ROWS_PER_PASS):        # activation rows in fours: one pass over the weight row
            if group == 32:
                _dot4_i8g_g32(q, r, scale, STEP, X16, b, Y)
            elif group == 64:
                _dot4_i8g_g64(q, r, scale, STEP, X16, b, Y)
            else:
                _dot4_i8g_g128(q, r, scale, STEP, X16, b, Y)
        for b in range(full, B):
            if group == 32:
                Y[b, r] = dot_i8g_g32(q, r, scale, STEP[b], X16[b])
            elif group == 64:
                Y[b, r] = dot_i8g_g64(q, r, scale, STEP[b], X16[b])
            else:
                Y[b, r] = dot_i8g_g128(q, r, scale, STEP[b], X16[b])


@njit(cache=True, parallel=True, nogil=True)
def gemm_i8g(q, scale, X, src, group):
    R = q.shape[0]
    X16, STEP, _ = stack_activations(X, src, group)
    Y = np.empty((X.shape[0], R), np.float32)
    for k in prange((R + ROW_BLOCK - 1) // ROW_BLOCK):
        r0, r1 = k * ROW_BLOCK, min(R, (k + 1) * ROW_BLOCK)
        if group == 32:                    # literal group sizes: one specialisation each (see int4_kernels.gemv_i4)
            _i8g_rows(q, scale, 32, X16, STEP, Y, r0, r1)
        elif group == 64:
            _i8g_rows(q, scale, 64, X16, STEP, Y, r0, r1)
        else:
            _i8g_rows(q, scale, 128, X16, STEP, Y, r0, r1)
    return Y


@njit(cache=True, nogil=True)
def gemm_i8g_serial(q, scale, X, src, group):
    X16, STEP, _ = stack_activations(X, src, group)
    Y = np.empty((X.shape[0], q.shape[0]), np.float32)
    _i8g_rows(q, scale, group, X16, STEP, Y, 0, q.shape[0])
    return Y


@njit(cache=True, fastmath=FASTMATH, nogil=True)
def _i4_rows(packed, groups, group, X16, STEP, XSUM, Y, r0, r1):
    B = X16.shape[0]
    ngroups = groups.shape[1]
    d = np.empty(ngroups, np.float32)          # the row's group scales
    dz = np.empty(ngroups, np.float32)         # and scale x zero point (what meets each group's activation sum)
    for r in range(r0, r1):
        for g in range(ngroups):
            u = np.int32(groups[r, g])
            d[g] = int4_scale(groups[r, g])
            dz[g] = d[g] * np.float32(u >> 9) * np.float32(0.125)
        full = B - B % ROWS_PER_PASS
        for b in range(0, full, ROWS_PER_PASS):        # activation rows in fours: one pass over the weight row
            if group == 32:
                _dot4_i4_g32(packed, r, d, STEP, X16, b, Y)
            elif group == 64:
                _dot4_i4_g64(packed, r, d, STEP, X16, b, Y)
            else:
                _dot4_i4_g128(packed, r, d, STEP, X16, b, Y)
        for b in range(B):
            zero_term = np.float32(0.0)
            for g in range(ngroups):
                zero_term -= dz[g] * XSUM[b, g]
            if b < full:
                Y[b, r] = Y[b, r] + zero_term
            elif group == 32:
                Y[b, r] = dot_i4_g32(packed, r, d, STEP[b], X16[b]) + zero_term
            elif group == 64:
                Y[b, r] = dot_i4_g64(packed, r, d, STEP[b], X16[b]) + zero_term
            else:
                Y[b, r] = dot_i4_g128(packed, r, d, STEP[b], X16[b]) + zero_term


@njit(cache=True, parallel=True, nogil=True)
def gemm_i4(packed, groups, X, src, group):
    R = packed.shape[0]
    X16, STEP, XSUM = stack_activations(X, src, group)
    Y = np.empty((X.shape[0], R), np.float32)
    for k in prange((R + ROW_BLOCK - 1) // ROW_BLOCK):
        r0, r1 = k * ROW_BLOCK, min(R, (k + 1) * ROW_BLOCK)
        if group == 32:
            _i4_rows(packed, groups, 32, X16, STEP, XSUM, Y, r0, r1)
        elif group == 64:
            _i4_rows(packed, groups, 64, X16, STEP, XSUM, Y, r0, r1)
        else:
            _i4_rows(packed, groups, 128, X16, STEP, XSUM, Y, r0, r1)
    return Y


@njit(cache=True, nogil=True)
def gemm_i4_serial(packed, groups, X, src, group):
    X16, STEP, XSUM = stack_activations(X, src, group)
    Y = np.empty((X.shape[0], packed.shape[0]), np.float32)
    _i4_rows(packed, groups, group, X16, STEP, XSUM, Y, 0, packed.shape[0])
    return Y


# ----------------------------------------------------------------------------------------------------------------
# RWKV-6/7 low-rank factors for B rows: kernels/lowrank.py's per-task partial products, for every row in one launch.
# Each row's partial sums are the single-token ones, added in the same order, so row b equals down_many / up_many
# of that row exactly.

def lowrank_down_rows(Xs, As) -> list[np.ndarray]:
    """[X @ A for X, A in zip(Xs, As)] for B rows: X (B, C_m), A float32 (C_m, D_m) -> list of (B, D_m)."""
    As = lowrank._contiguous(As)
    B = Xs[0].shape[0]
    X = np.zeros((B, len(As), max(A.shape[0] for A in As)), np.float32)
    for m, (x, A) in enumerate(zip(Xs, As)):
        if x.shape != (B, A.shape[0]):
            raise ValueError(f"low-rank factor {A.shape} cannot multiply rows of shape {x.shape}")
        X[:, m, :A.shape[0]] = x
    widths = np.array([A.shape[1] for A in As], np.int64)
    parallel = B * sum(A.size for A in As) >= lowrank.PARALLEL_MIN_WEIGHTS
    H = (_down_rows if parallel else _down_rows_serial)(X, As, widths)
    return np.split(H, np.cumsum(widths)[:-1], axis=1)


def lowrank_up_rows(Hs, Bs) -> np.ndarray:
    """np.stack([H @ F for H, F in zip(Hs, Bs)]) for B rows: H (B, D_m), F float32 (D_m, C) -> (n, B, C)."""
    Bs = lowrank._contiguous(Bs)
    C = Bs[0].shape[1]
    rows = Hs[0].shape[0]
    for h, F in zip(Hs, Bs):
        if F.shape[1] != C or h.shape != (rows, F.shape[0]):
            raise ValueError(f"low-rank factor {F.shape} cannot multiply rows of shape {h.shape}")
    offsets = np.zeros(len(Bs) + 1, np.int64)
    offsets[1:] = np.cumsum([F.shape[0] for F in Bs])
    H = np.ascontiguousarray(np.concatenate([np.asarray(h, np.float32) for h in Hs], axis=1))
    parallel = rows * sum(F.size for F in Bs) >= lowrank.PARALLEL_MIN_WEIGHTS
    Y = (_up_rows if parallel else _up_rows_serial)(H, offsets, Bs)
    return Y.transpose(1, 0, 2)


@njit(cache=True, fastmath=FASTMATH, nogil=True)
def _down_part_rows(X, m, A, r0, r1, out):
    """out[b, :D] = X[b, m, r0:r1] . A[r0:r1] for every row b. Each output is the sum over r in ascending order of
    x[r] * A[r, j], as in kernels/lowrank.py's _down_part, so a row's result is its single token's; each row of A
    is read once for all B rows. The activations are copied to (r, b) order first: B rows of X lie a multiple of
    4 KiB apart, and reading them in step would evict each other from L1."""
    B, D = X.shape[0], A.shape[1]
    xt = np.empty((r1 - r0, B), np.float32)
    for b in range(B):
        for r in range(r0, r1):
            xt[r - r0, b] = X[b, m, r]
    acc = np.zeros((B, D), np.float32)
    for r in range(r0, r1):
        row = A[r]
        for b in range(B):
            xr = xt[r - r0, b]
            for j in range(D):
                acc[b, j] += xr * row[j]
    out[:, :D] = acc


@njit(cache=True, nogil=True)
def _down_rows_tasks(X, As, widths):
    table, offsets, scratch = _down_layout(As, widths)
    B, tasks = X.shape[0], table.shape[0]
    partial = np.empty((tasks, B, scratch.shape[1]), np.float32)
    return table, offsets, partial


@njit(cache=True, parallel=True, nogil=True)
def _down_rows(X, As, widths):
    table, offsets, partial = _down_rows_tasks(X, As, widths)
    for t in prange(table.shape[0]):
        m = table[t, 0]
        _down_part_rows(X, m, As[m], table[t, 1], table[t, 2], partial[t])
    H = np.empty((X.shape[0], offsets[-1]), np.float32)
    for b in range(X.shape[0]):
        H[b] = _down_sum(table, offsets, widths, partial[:, b])
    return H


@njit(cache=True, nogil=True)
def _down_rows_serial(X, As, widths):
    table, offsets, partial = _down_rows_tasks(X, As, widths)
    for t in range(table.shape[0]):
        m = table[t, 0]
        _down_part_rows(X, m, As[m], table[t, 1], table[t, 2], partial[t])
    H = np.empty((X.shape[0], offsets[-1]), np.float32)
    for b in range(X.shape[0]):
        H[b] = _down_sum(table, offsets, widths, partial[:, b])
    return H


@njit(cache=True, nogil=True)
def _up_part_rows(H, o, F, r0, r1, out):
    """out[b] = H[b, o+r0:o+r1] . F[r0:r1] for every row b: kernels/lowrank.py's _up_rows_part itself, row after
    row, so each row's result is its single token's; the task's rows of F stay in L2 for all B rows. (Accumulating
    all B rows per row of F, in column passes that keep the accumulators in L1, measured 1.7x slower.)"""
    for b in range(H.shape[0]):
        _up_rows_part(H[b], o, F, r0, r1, out[b])


@njit(cache=True, parallel=True, nogil=True)
def _up_rows(H, offsets, Bs):
    # the tasks and order of additions of kernels/lowrank.py's up product, per row (results bit-identical)
    table, scratch = _up_layout(Bs)
    n, C, rows, tasks = len(Bs), Bs[0].shape[1], H.shape[0], table.shape[0]
    partial = np.empty((tasks, rows, C), np.float32)
    for t in prange(tasks):
        m = table[t, 0]
        _up_part_rows(H, offsets[m], Bs[m], table[t, 1], table[t, 2], partial[t])
    Y = np.empty((rows, n, C), np.float32)
    for b in range(rows):
        Y[b] = _up_sum(table, partial[:, b], n)
    return Y


@njit(cache=True, nogil=True)
def _up_rows_serial(H, offsets, Bs):
    table, scratch = _up_layout(Bs)
    n, C, rows, tasks = len(Bs), Bs[0].shape[1], H.shape[0], table.shape[0]
    partial = np.empty((tasks, rows, C), np.float32)
    for t in range(tasks):
        m = table[t, 0]
        _up_part_rows(H, offsets[m], Bs[m], table[t, 1], table[t, 2], partial[t])
    Y = np.empty((rows, n, C), np.float32)
    for b in range(rows):
        Y[b] = _up_sum(table, partial[:, b], n)
    return Y
