"""Kernels for int4 matrices: packed nibbles with a 16-bit scale/zero word per group (layout:
rwkv_lite/schemes/int4.py). Shared helpers and the kernels' common contract: kernels/simd.py.

Each 64-column block of a row is 32 bytes; their low nibbles meet one contiguous run of x and their high nibbles
another, so x is first permuted into "block order" (``block_source``) and then read with plain vector loads.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from .simd import (F32, FASTMATH, I8, I16, I32, I64, INT4_BLOCK, PREFETCH_BYTES, ROW_BLOCK, aligned_float32,
                   bits_to_f32, block_table, fma, is_c_array, load_vec, pair_madd, prefetch_ptr, quantize_activations,
                   row_pointer, splat, splat_const, stack_activations, tree_sum, vec)

def _make_int4_row_dot(group, int16_x):
    """Intrinsic: one int4 row (group size `group`) dotted with x, zero points excluded:
        sum over 64-column blocks k of  step[k] * sum over the block's columns c of  d[g(c)] * q[r, c] * xb[c]
    d: the row's group scales (float32, decoded by _int4_row_scales); step: per-block activation steps (ones for
    float32 x); xb: x in block order (x[block_source]): 64 values per block, first the 32 that meet the low
    nibbles of the block's 32 bytes, then the 32 that meet the high nibbles, so both runs are contiguous loads.

    Per block: load 32 bytes; low = and 15, high = shift 4; meet the two runs of xb; multiply by the block's
    scales (G = 32: the block's two groups, one per half of the lanes; otherwise one group) and add into a vector
    accumulator. No horizontal sum until the end of the row.

    int16_x=True:  xb is int16 (``quantize_activations``); nibbles widen to int16 and meet xb in exact integer
                   multiply-adds (vpmaddwd on x86): about 9 vector instructions per 64 weights, which is what lets
                   decode run at memory speed.
    int16_x=False: xb is float32 and nibbles widen to float (about 20 per 64 weights)."""
    half = INT4_BLOCK // 2                     # bytes per block
    x_dtype = types.int16 if int16_x else types.float32
    lanes = half // 2 if int16_x else half     # lanes of one block's partial sums

    def typer(typingctx, packed, r, d, step, xb):
        if not (is_c_array(packed, types.uint8, 2) and isinstance(r, types.Integer)
                and isinstance(d, types.Array) and d.dtype == types.float32
                and isinstance(step, types.Array) and step.dtype == types.float32
                and isinstance(xb, types.Array) and xb.dtype == x_dtype):
            return None

        def codegen(context, builder, sig, args):
            pty, rty, dty, sty, xty = sig.args
            row = context.cast(builder, args[1], rty, types.intp)
            prow, nbytes = row_pointer(context, builder, pty, args[0], row)
            dptr = context.make_array(dty)(context, builder, args[2]).data
            sptr = context.make_array(sty)(context, builder, args[3]).data
            xptr = context.make_array(xty)(context, builder, args[4]).data
            nblocks = builder.udiv(nbytes, ir.Constant(I64, half))
            acc_slot = cgutils.alloca_once_value(builder, splat_const(F32, lanes, 0.0))
            with cgutils.for_range(builder, nblocks) as loop:
                k = loop.index
                b0 = builder.mul(k, ir.Constant(I64, half))
                prefetch_ptr(builder, builder.gep(prow, [builder.add(b0, ir.Constant(I64, PREFETCH_BYTES))]))
                byts = load_vec(builder, prow, b0, vec(I8, half))
                x0 = builder.mul(k, ir.Constant(I64, INT4_BLOCK))
                x1 = builder.add(x0, ir.Constant(I64, half))
                if int16_x:
                    w16 = builder.zext(byts, vec(I16, half))
                    low = builder.and_(w16, splat_const(I16, half, 15))
                    high = builder.lshr(w16, splat_const(I16, half, 4))
                    isum = builder.add(pair_madd(builder, low, load_vec(builder, xptr, x0, vec(I16, half))),
                                       pair_madd(builder, high, load_vec(builder, xptr, x1, vec(I16, half))))
                    part = builder.sitofp(isum, vec(F32, lanes))
                else:
                    vf = vec(F32, half)
                    low = builder.uitofp(builder.and_(byts, splat_const(I8, half, 15)), vf)
                    high = builder.uitofp(builder.lshr(byts, splat_const(I8, half, 4)), vf)
                    part = fma(builder, high, load_vec(builder, xptr, x1, vf),
                                builder.fmul(low, load_vec(builder, xptr, x0, vf)))
                if group == 32:            # groups 2k (first 16 bytes) and 2k+1 (last 16)
                    pair = load_vec(builder, dptr, builder.mul(k, ir.Constant(I64, 2)), vec(F32, 2))
                    mask = ir.Constant(vec(I32, lanes), [0] * (lanes // 2) + [1] * (lanes // 2))
                    scales = builder.shuffle_vector(pair, pair, mask)
                else:                      # one group per block (64), or per two blocks (128)
                    g = k if group == 64 else builder.lshr(k, ir.Constant(I64, 1))
                    scales = splat(builder, builder.load(builder.gep(dptr, [g])), lanes)
                step_k = splat(builder, builder.load(builder.gep(sptr, [k])), lanes)
                part = builder.fmul(part, step_k)
                builder.store(fma(builder, part, scales, builder.load(acc_slot)), acc_slot)
            return tree_sum(builder, builder.load(acc_slot))
        return types.float32(packed, r, d, step, xb), codegen
    return intrinsic(typer)


dot_i4_g32 = _make_int4_row_dot(32, int16_x=True)
dot_i4_g64 = _make_int4_row_dot(64, int16_x=True)
dot_i4_g128 = _make_int4_row_dot(128, int16_x=True)
_dot_i4_exact_g32 = _make_int4_row_dot(32, int16_x=False)
_dot_i4_exact_g64 = _make_int4_row_dot(64, int16_x=False)
_dot_i4_exact_g128 = _make_int4_row_dot(128, int16_x=False)


# ----------------------------------------------------------------------------------------------------------------
# int4: group words, block order of x, activations

@njit(cache=True)
def int4_scale(word):
    """Scale d of an int4 group word (layout: rwkv_lite/schemes/int4.py): (1 + m/16) * 2**(e - 24), exactly."""
    u = np.int32(word)
    return bits_to_f32(np.int32((((u >> 4) & 31) + 103) << 23 | (u & 15) << 19))


@njit(cache=True)
def int4_zero(word):
    """Zero point z/8 of an int4 group word, in units of the scale (0 .. 15.875)."""
    return np.float32(np.int32(word) >> 9) * np.float32(0.125)


@njit(cache=True)
def _block_source(group, cols):
    """src (cols,) int64: block-order position j holds column src[j] (see _make_int4_row_dot)."""
    half_group = group // 2
    src = np.empty(cols, np.int64)
    for k in range(cols // INT4_BLOCK):
        for j in range(INT4_BLOCK // 2):
            b = k * (INT4_BLOCK // 2) + j                   # byte index within the row
            g, i = b // half_group, b % half_group
            src[k * INT4_BLOCK + j] = g * group + i                          # its low nibble's column
            src[k * INT4_BLOCK + INT4_BLOCK // 2 + j] = g * group + half_group + i  # its high nibble's column
    return src


_BLOCK_SOURCES = {}


def block_source(group: int, cols: int) -> np.ndarray:
    """Cached _block_source (the permutation depends only on the group size and the padded width)."""
    key = (group, cols)
    src = _BLOCK_SOURCES.get(key)
    if src is None:
        src = _BLOCK_SOURCES[key] = _block_source(group, cols)
    return src



@njit(cache=True, fastmath=FASTMATH)
def _int4_row_scales(groups, r, xsum, d):
    """Decode row r's group words into their scales d (float32, one per group) and return the row's zero-point
    term  -sum_g d_g z_g xsum_g  (the part of W x that the zero points contribute)."""
    zero_term = np.float32(0.0)
    for g in range(groups.shape[1]):
        u = np.int32(groups[r, g])
        # the float32 bit pattern of (1 + m/16) * 2**(e - 24): exponent field e + 103, mantissa m << 19
        dg = bits_to_f32(np.int32((((u >> 4) & 31) + 103) << 23 | (u & 15) << 19))
        d[g] = dg
        zero_term -= dg * np.float32(u >> 9) * np.float32(0.125) * xsum[g]
    return zero_term


@njit(cache=True, fastmath=FASTMATH)
def _gemv_i4_rows(packed, groups, group, x16, step, xsum, y, r0, r1):
    d = np.empty(groups.shape[1], np.float32)          # the current row's group scales
    if group == 32:
        for r in range(r0, r1):
            zero_term = _int4_row_scales(groups, r, xsum, d)
            y[r] = dot_i4_g32(packed, r, d, step, x16) + zero_term
    elif group == 64:
        for r in range(r0, r1):
            zero_term = _int4_row_scales(groups, r, xsum, d)
            y[r] = dot_i4_g64(packed, r, d, step, x16) + zero_term
    else:
        for r in range(r0, r1):
            zero_term = _int4_row_scales(groups, r, xsum, d)
            y[r] = dot_i4_g128(packed, r, d, step, x16) + zero_term


@njit(cache=True, parallel=True)
def gemv_i4(packed, groups, x, src, group):
    """packed uint8 (R, Cp/2), groups uint16 (R, Cp/group), x float32 (Cp,) zero-padded, src = block_source ->
    y float32 (R,) = W x, with x rounded to 15 bits per 64-column block (see quantize_activations)."""
    R = packed.shape[0]
    x16, step, xsum = quantize_activations(x, src, group)
    y = np.empty(R, np.float32)
    for b in prange((R + ROW_BLOCK - 1) // ROW_BLOCK):
        r0, r1 = b * ROW_BLOCK, min(R, (b + 1) * ROW_BLOCK)
        # literal group sizes: Numba compiles one specialisation of the row loop per size, which LLVM optimises
        # as a whole (measured: 21 GB/s from memory, against 14.5 for one body taking the size as a variable)
        if group == 32:
            _gemv_i4_rows(packed, groups, 32, x16, step, xsum, y, r0, r1)
        elif group == 64:
            _gemv_i4_rows(packed, groups, 64, x16, step, xsum, y, r0, r1)
        else:
            _gemv_i4_rows(packed, groups, 128, x16, step, xsum, y, r0, r1)
    return y


@njit(cache=True)
def gemv_i4_serial(packed, groups, x, src, group):
    x16, step, xsum = quantize_activations(x, src, group)
    R = packed.shape[0]
    y = np.empty(R, np.float32)
    if group == 32:
        _gemv_i4_rows(packed, groups, 32, x16, step, xsum, y, 0, R)
    elif group == 64:
        _gemv_i4_rows(packed, groups, 64, x16, step, xsum, y, 0, R)
    else:
        _gemv_i4_rows(packed, groups, 128, x16, step, xsum, y, 0, R)
    return y


@njit(cache=True, fastmath=FASTMATH)
def gemv_i4_exact(packed, groups, x, src, group):
    """As gemv_i4 with x kept in float32 (no activation rounding); one thread, for tests and checks."""
    R = packed.shape[0]
    cols = x.shape[0]
    xb = aligned_float32(cols)
    for j in range(cols):
        xb[j] = x[src[j]]
    ones = np.ones(cols // INT4_BLOCK, np.float32)                     # no activation step
    xsum = np.zeros(cols // group, np.float32)
    for g in range(cols // group):
        for c in range(g * group, (g + 1) * group):
            xsum[g] += x[c]
    y = np.empty(R, np.float32)
    d = np.empty(groups.shape[1], np.float32)
    for r in range(R):
        zero_term = _int4_row_scales(groups, r, xsum, d)
        if group == 32:
            y[r] = _dot_i4_exact_g32(packed, r, d, ones, xb) + zero_term
        elif group == 64:
            y[r] = _dot_i4_exact_g64(packed, r, d, ones, xb) + zero_term
        else:
            y[r] = _dot_i4_exact_g128(packed, r, d, ones, xb) + zero_term
    return y



@njit(cache=True, parallel=True)
def gemv_i4_many(packeds, groupss, X, src, group, rows):
    """int4 GEMVs of n matrices in one launch (as gemv_i4 each); output laid out as in int8_kernels.gemv_i8g_many."""
    X16, STEP, XSUM = stack_activations(X, src, group)
    table, offsets = block_table(rows)
    y = np.empty(offsets[-1], np.float32)
    for b in prange(table.shape[0]):
        m, r0, r1 = table[b, 0], table[b, 1], table[b, 2]
        out = y[offsets[m]:offsets[m + 1]]
        if group == 32:
            _gemv_i4_rows(packeds[m], groupss[m], 32, X16[m], STEP[m], XSUM[m], out, r0, r1)
        elif group == 64:
            _gemv_i4_rows(packeds[m], groupss[m], 64, X16[m], STEP[m], XSUM[m], out, r0, r1)
        else:
            _gemv_i4_rows(packeds[m], groupss[m], 128, X16[m], STEP[m], XSUM[m], out, r0, r1)
    return y



def _make_int4_row_dequant(group):
    """Intrinsic: write row r of an int4 matrix, dequantised, into row i of out (float32, Cp columns).

    Per 64-column block: the 32 bytes' low and high nibbles widen to float and become d * q - d * z with their
    groups' d and d * z (arrays filled by _int4_row_decode); the two runs are put back in column order with one
    shuffle (G = 32, 64) or stored as two runs of 32 (G = 128)."""
    half = INT4_BLOCK // 2

    def typer(typingctx, packed, r, d, dz, out, i):
        if not (is_c_array(packed, types.uint8, 2) and is_c_array(out, types.float32, 2)
                and isinstance(r, types.Integer) and isinstance(i, types.Integer)):
            return None

        def codegen(context, builder, sig, args):
            pty, rty, dty, zty, oty, ity = sig.args
            prow, nbytes = row_pointer(context, builder, pty, args[0],
                                        context.cast(builder, args[1], rty, types.intp))
            dptr = context.make_array(dty)(context, builder, args[2]).data
            zptr = context.make_array(zty)(context, builder, args[3]).data
            orow, _ = row_pointer(context, builder, oty, args[4], context.cast(builder, args[5], ity, types.intp))
            vf = vec(F32, half)

            def group_vector(ptr, k):
                if group == 32:            # lanes 0-15: group 2k, lanes 16-31: group 2k+1
                    pair = load_vec(builder, ptr, builder.mul(k, ir.Constant(I64, 2)), vec(F32, 2))
                    return builder.shuffle_vector(pair, pair, ir.Constant(vec(I32, half), [0] * 16 + [1] * 16))
                g = k if group == 64 else builder.lshr(k, ir.Constant(I64, 1))
                return splat(builder, builder.load(builder.gep(ptr, [g])), half)

            def store(vec, col):
                ptr = builder.bitcast(builder.gep(orow, [col]), vec.type.as_pointer())
                builder.store(vec, ptr, align=4)

            with cgutils.for_range(builder, builder.udiv(nbytes, ir.Constant(I64, half))) as loop:
                k = loop.index
                byts = load_vec(builder, prow, builder.mul(k, ir.Constant(I64, half)), vec(I8, half))
                d_vec, dz_vec = group_vector(dptr, k), group_vector(zptr, k)
                low = fma(builder, builder.uitofp(builder.and_(byts, splat_const(I8, half, 15)), vf), d_vec,
                           builder.fneg(dz_vec))
                high = fma(builder, builder.uitofp(builder.lshr(byts, splat_const(I8, half, 4)), vf), d_vec,
                            builder.fneg(dz_vec))
                col = builder.mul(k, ir.Constant(I64, INT4_BLOCK))
                if group == 128:           # block k holds columns 32(k&1) + [0, 32) and 64 + 32(k&1) + [0, 32)
                    col = builder.add(builder.mul(builder.lshr(k, ir.Constant(I64, 1)), ir.Constant(I64, 128)),
                                      builder.mul(builder.and_(k, ir.Constant(I64, 1)), ir.Constant(I64, 32)))
                    store(low, col)
                    store(high, builder.add(col, ir.Constant(I64, 64)))
                else:
                    order = (list(range(0, 16)) + list(range(32, 48)) + list(range(16, 32)) + list(range(48, 64))
                             if group == 32 else list(range(64)))
                    store(builder.shuffle_vector(low, high, ir.Constant(vec(I32, 64), order)), col)
            return context.get_dummy_value()
        return types.void(packed, r, d, dz, out, i), codegen
    return intrinsic(typer)


_dequant_i4_g32 = _make_int4_row_dequant(32)
_dequant_i4_g64 = _make_int4_row_dequant(64)
_dequant_i4_g128 = _make_int4_row_dequant(128)


@njit(cache=True, nogil=True)
def dequantize_rows_i4(packed, groups, group, ids, out):
    """out float32 (len(ids), C), C <= Cp: W[r, c] = d * (q - z/8); the padding columns are dropped."""
    C = out.shape[1]
    cols = packed.shape[1] * 2
    ngroups = groups.shape[1]
    d = np.empty(ngroups, np.float32)
    dz = np.empty(ngroups, np.float32)
    row = out if C == cols else np.empty((1, cols), np.float32)     # padded matrices go through a row buffer
    for i in range(ids.shape[0]):
        r = ids[i]
        for g in range(ngroups):
            d[g] = int4_scale(groups[r, g])
            dz[g] = d[g] * int4_zero(groups[r, g])
        j = i if C == cols else 0
        if group == 32:
            _dequant_i4_g32(packed, r, d, dz, row, j)
        elif group == 64:
            _dequant_i4_g64(packed, r, d, dz, row, j)
        else:
            _dequant_i4_g128(packed, r, d, dz, row, j)
        if C != cols:
            out[i, :] = row[0, :C]
