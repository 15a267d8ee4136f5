"""Kernels for int8 matrices, one scale per row or an fp16 scale per group of columns (layouts:
rwkv_lite/schemes/int8.py). Shared helpers and the kernels' common contract: kernels/simd.py.

One scale per row: the float row dot of fp_kernels.py on int8 weights, times the row's scale.
Group-scaled: weights meet int16 activations (simd.quantize_activations) in exact integer multiply-adds.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from .simd import (DOT_BLOCK, F16, F32, FASTMATH, I8, I16, I32, I64, INT4_BLOCK, PREFETCH_BYTES, ROW_BLOCK,
                   block_table, f16_to_f32, fma, is_c_array, load_vec, make_dense_row_dot, pair_madd, prefetch_ptr,
                   quantize_activations, row_pointer, splat, splat_const, stack_activations, tree_sum, vec)

dot_i8_row = make_dense_row_dot(types.int8)


def _make_int8_group_row_dot(group):
    """Intrinsic: one row of a group-scaled int8 matrix dotted with int16 activations (natural column order):
        sum over 64-column blocks k of  step[k] * sum over the block's columns c of  d[r, g(c)] * q[r, c] * x16[c]
    with d the fp16 group scales (bits, uint16 (R, Cp/G)), read and widened inside the loop.
    Per block: 64 bytes widen to int16 and meet x16 in exact integer multiply-adds (32 pair sums, 4 vpmaddwd);
    the pair sums of each group are added as integers (G = 32: 2 x 8 lanes, G >= 64: 8 lanes; at most
    4 * 2 * 127 * 32767 < 2**31) and only then converted to float and multiplied by the group's d * step, so a
    block costs 2 (G = 32) or 1 float conversion + FMA instead of 4 of each (fewer instructions; an interleaved A/B
    showed no speed change, as one core streams 12-16 GB/s either way against 17 GB/s for a bare read loop)."""
    nb = INT4_BLOCK
    lanes = 16 if group == 32 else 8          # accumulator lanes: 8 per group of the block

    def typer(typingctx, q, r, d, step, x16):
        if not (is_c_array(q, types.int8, 2) and is_c_array(d, types.uint16, 2) and isinstance(r, types.Integer)
                and isinstance(x16, types.Array) and x16.dtype == types.int16):
            return None

        def codegen(context, builder, sig, args):
            qty, rty, dty, sty, xty = sig.args
            qrow, ncols = row_pointer(context, builder, qty, args[0], context.cast(builder, args[1], rty, types.intp))
            row = context.cast(builder, args[1], rty, types.intp)
            dptr, _ = row_pointer(context, builder, dty, args[2], row)

            def scales_at(index, n):          # n fp16 scales from element `index` of the row, as float32
                bits = load_vec(builder, dptr, index, vec(I16, n))
                return builder.fpext(builder.bitcast(bits, vec(F16, n)), vec(F32, n))
            sptr = context.make_array(sty)(context, builder, args[3]).data
            xptr = context.make_array(xty)(context, builder, args[4]).data
            acc_slot = cgutils.alloca_once_value(builder, splat_const(F32, lanes, 0.0))

            def lanes_of(v, idx):
                return builder.shuffle_vector(v, v, ir.Constant(vec(I32, len(idx)), idx))

            with cgutils.for_range(builder, builder.udiv(ncols, ir.Constant(I64, nb))) as loop:
                k = loop.index
                c0 = builder.mul(k, ir.Constant(I64, nb))
                prefetch_ptr(builder, builder.gep(qrow, [builder.add(c0, ir.Constant(I64, PREFETCH_BYTES))]))
                w16 = builder.sext(load_vec(builder, qrow, c0, vec(I8, nb)), vec(I16, nb))
                isum = pair_madd(builder, w16, load_vec(builder, xptr, c0, vec(I16, nb)))   # 32 x i32
                # lanes 0-15 hold columns 0-31 of the block, lanes 16-31 columns 32-63
                first = builder.add(lanes_of(isum, list(range(0, 8))), lanes_of(isum, list(range(8, 16))))
                second = builder.add(lanes_of(isum, list(range(16, 24))), lanes_of(isum, list(range(24, 32))))
                step_k = builder.load(builder.gep(sptr, [k]))
                if group == 32:                 # two groups: 8 lanes each
                    ints = builder.shuffle_vector(first, second, ir.Constant(vec(I32, 16), list(range(16))))
                    pair = builder.fmul(scales_at(builder.mul(k, ir.Constant(I64, 2)), 2), splat(builder, step_k, 2))
                    scales = lanes_of(pair, [0] * 8 + [1] * 8)
                else:                           # one group spans the block
                    ints = builder.add(first, second)
                    g = k if group == 64 else builder.lshr(k, ir.Constant(I64, 1))
                    d_g = builder.extract_element(scales_at(g, 1), ir.Constant(I32, 0))
                    scales = splat(builder, builder.fmul(d_g, step_k), lanes)
                part = builder.sitofp(ints, vec(F32, lanes))
                builder.store(fma(builder, part, scales, builder.load(acc_slot)), acc_slot)
            return tree_sum(builder, builder.load(acc_slot))
        return types.float32(q, r, d, step, x16), codegen
    return intrinsic(typer)


dot_i8g_g32 = _make_int8_group_row_dot(32)
dot_i8g_g64 = _make_int8_group_row_dot(64)
dot_i8g_g128 = _make_int8_group_row_dot(128)

@njit(cache=True, fastmath=FASTMATH)
def _gemv_i8_rows(q, scale, x, y, r0, r1):
    nblk = q.shape[1] // DOT_BLOCK
    for r in range(r0, r1):
        acc = dot_i8_row(q, r, x, nblk)
        for c in range(nblk * DOT_BLOCK, q.shape[1]):
            acc += np.float32(q[r, c]) * x[c]
        y[r] = acc * scale[r]



@njit(cache=True, parallel=True)
def gemv_i8(q, scale, x):
    """q: int8 (R, C) C-contiguous; scale: float32 (R,); x: float32 (C,) -> float32 (R,)."""
    R = q.shape[0]
    y = np.empty(R, np.float32)
    for b in prange((R + ROW_BLOCK - 1) // ROW_BLOCK):
        _gemv_i8_rows(q, scale, x, y, b * ROW_BLOCK, min(R, (b + 1) * ROW_BLOCK))
    return y


@njit(cache=True)
def gemv_i8_serial(q, scale, x):
    y = np.empty(q.shape[0], np.float32)
    _gemv_i8_rows(q, scale, x, y, 0, q.shape[0])
    return y


@njit(cache=True, fastmath=FASTMATH)
def _gemv_i8g_rows(q, scale, group, x16, step, y, r0, r1):
    for r in range(r0, r1):
        if group == 32:
            y[r] = dot_i8g_g32(q, r, scale, step, x16)
        elif group == 64:
            y[r] = dot_i8g_g64(q, r, scale, step, x16)
        else:
            y[r] = dot_i8g_g128(q, r, scale, step, x16)


@njit(cache=True, parallel=True)
def gemv_i8g(q, scale, x, src, group):
    """Group-scaled int8: q int8 (R, Cp), scale uint16 fp16 bits (R, Cp/group), x float32 (Cp,) zero-padded,
    src = arange(Cp) -> y float32 (R,) = W x, x rounded to 15 bits per 64-column block like gemv_i4."""
    R = q.shape[0]
    x16, step, _ = quantize_activations(x, src, group)
    y = np.empty(R, np.float32)
    for b in prange((R + ROW_BLOCK - 1) // ROW_BLOCK):
        r0, r1 = b * ROW_BLOCK, min(R, (b + 1) * ROW_BLOCK)
        if group == 32:                                  # literal sizes: see gemv_i4
            _gemv_i8g_rows(q, scale, 32, x16, step, y, r0, r1)
        elif group == 64:
            _gemv_i8g_rows(q, scale, 64, x16, step, y, r0, r1)
        else:
            _gemv_i8g_rows(q, scale, 128, x16, step, y, r0, r1)
    return y


@njit(cache=True)
def gemv_i8g_serial(q, scale, x, src, group):
    x16, step, _ = quantize_activations(x, src, group)
    R = q.shape[0]
    y = np.empty(R, np.float32)
    if group == 32:
        _gemv_i8g_rows(q, scale, 32, x16, step, y, 0, R)
    elif group == 64:
        _gemv_i8g_rows(q, scale, 64, x16, step, y, 0, R)
    else:
        _gemv_i8g_rows(q, scale, 128, x16, step, y, 0, R)
    return y


@njit(cache=True, parallel=True)
def gemv_i8g_many(qs, scales, X, src, group, rows):
    """Group-scaled int8 GEMVs: qs, scales tuples of n matrices (as gemv_i8g), X float32 (n, Cp) -> y float32
    (sum of rows), y[offsets[m]:offsets[m+1]] = W_m X[m]."""
    X16, STEP, _ = stack_activations(X, src, group)
    table, offsets = block_table(rows)
    y = np.empty(offsets[-1], np.float32)
    for b in prange(table.shape[0]):
        m, r0, r1 = table[b, 0], table[b, 1], table[b, 2]
        out = y[offsets[m]:offsets[m + 1]]
        if group == 32:
            _gemv_i8g_rows(qs[m], scales[m], 32, X16[m], STEP[m], out, r0, r1)
        elif group == 64:
            _gemv_i8g_rows(qs[m], scales[m], 64, X16[m], STEP[m], out, r0, r1)
        else:
            _gemv_i8g_rows(qs[m], scales[m], 128, X16[m], STEP[m], out, r0, r1)
    return y



@njit(cache=True, nogil=True)
def dequantize_rows_i8(q, scale, ids, out):
    for i in range(ids.shape[0]):
        r = ids[i]
        s = scale[r]
        for c in range(q.shape[1]):
            out[i, c] = np.float32(q[r, c]) * s


@njit(cache=True)
def _dequantize_row_i8g(q, scale, group, r, out, i):
    qrow, orow = q[r], out[i]
    for g in range(scale.shape[1]):
        d = f16_to_f32(scale[r, g])
        c0 = g * group
        for c in range(group):
            orow[c0 + c] = np.float32(qrow[c0 + c]) * d


@njit(cache=True, nogil=True)
def dequantize_rows_i8g(q, scale, group, ids, out):
    """Group-scaled int8 (fp16 scale bits per group); out may be narrower than q (padding dropped)."""
    C = out.shape[1]
    cols = q.shape[1]
    row = out if C == cols else np.empty((1, cols), np.float32)      # padded matrices go through a row buffer
    for i in range(ids.shape[0]):
        j = i if C == cols else 0
        if group == 32:                    # literal sizes: constant inner trip counts vectorise without tails
            _dequantize_row_i8g(q, scale, 32, ids[i], row, j)
        elif group == 64:
            _dequantize_row_i8g(q, scale, 64, ids[i], row, j)
        else:
            _dequantize_row_i8g(q, scale, 128, ids[i], row, j)
        if C != cols:
            out[i, :] = row[0, :C]
