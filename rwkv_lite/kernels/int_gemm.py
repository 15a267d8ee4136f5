"""Integer panel and lanes kernels for group-scaled int8 weights: Y = X W^T for B activation rows (B >= 1).

One kernel family serves both decode paths: the single-token GEMV is the B = 1 case and a batched step of B
sequences the B > 1 case, so row b of a batched product equals the single-token product of that row bit for bit
whatever B is (every output value goes through the same operations; only how many activation rows share a pass
changes). Group-scaled int8 matrices decode through this module only when RWKV_LITE_BATCH_KERNELS=1
(BATCH_KERNELS below, read by schemes/int8.py); by default they use kernels/int8_kernels.py (single token) and
kernels/batched.py (batches), which are bit-identical to each other but not to these kernels (a different order
of the float additions), so one process uses one family for all its group-int8 matrices.

Why opt-in, not the default (one thread, interleaved A/B against the default kernels, EPYC Zen 4, weights streamed
from memory, two runs; docs/performance.md): per activation row, batches of 16 cost 0.45-0.66x the default's
(AVX-512 VNNI; AVX2 code 0.66-0.75x), but a single token costs 1.2-1.5x at 2048 x 2048 and 4096 x 4096 and ~1.15x at
4096 x 14336 (AVX2 code 1.06-1.4x), and B = 4 1.03-1.26x with AVX-512 (AVX2 code 0.82-1.23x). With one 2048 x 2048
matrix in cache the single token costs 1.07x, and 0.96x in a timing-only build without the scale transposition;
from memory the gap widens: reading 8 rows at once (8 row streams, the next panel prefetched as this one is
computed) streams more slowly than the default's one sequential row stream, and prefetching 2 or 4 panels ahead,
per-row prefetches and L1 / L2 / non-temporal hints did not close it. Removing both costs would take a panel-major
layout (the weights and scales of 8 rows interleaved), which the file format does not have.

The int4 scheme keeps kernels/int4_kernels.py and batched.py: int4 variants of these kernels were written,
measured (single token 0.99-1.4x the int4 GEMV's time, B = 16 only 1.2x faster) and deleted.

The arithmetic (15-bit activations per 64-column block, simd.quantize_activations; exact integer multiply-adds):
for weight row r the columns are cut into units (the group for G = 32, the 64-column activation block for
G = 64 and 128), and

    y[r] = fma(float(s_U), d[r, g(U)] * step[k(U)], ... fma(float(s_1), d[r, g(1)] * step[k(1)],
                                                         float(s_0) * (d[r, g(0)] * step[k(0)])))

with s_u the exact integer dot product of unit u's weights and int16 activations, d the fp16 group scale and step
the activation block's step.

Why this shape: a weight row's dot product is cheap integer work (vpmaddwd: 16 multiply-adds per 256-bit
instruction), but the per-group float work (convert, scale, accumulate) costs as much again when it is done
per column lane. Here the lanes of the float vectors are 8 different weight rows (a panel): the integer partial
sums of 8 rows are folded into one 8-lane vector (a short shuffle-and-add tree), then one conversion, one scale
product and one FMA serve 8 rows x 32 (or 64) columns. The 8 rows' weights are loaded and widened once per unit
and meet up to BATCH_TILE activation rows while they are in registers; the group scales of a panel are
transposed to row-lanes once per panel (and the next panel's prefetched meanwhile). From LANES_MIN_ROWS
activation rows on, the lanes kernel below puts 16 activation rows in the lanes instead.

Generic LLVM vector IR only (no target intrinsic is named): x86 with AVX-512 VNNI / AVX-VNNI gets vpdpwssd
from the multiply-add + add pattern, AVX2 vpmaddwd + vpaddd, other targets their own widening multiply-adds.
"""
from __future__ import annotations

import os

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from .simd import (F16, F32, I8, I16, I32, I64, ROW_BLOCK, block_table, f16_to_f32, fma, is_c_array, load_vec,
                   pair_madd, prefetch_ptr, splat, splat_const, stack_activations, vec)

# Whether group-scaled int8 matrices decode through these kernels (single tokens and batches alike), or through
# kernels/int8_kernels.py and kernels/batched.py (the default). The two give slightly different float rounding, so
# the choice holds for the whole process: set RWKV_LITE_BATCH_KERNELS=1 before loading a model.
BATCH_KERNELS = os.environ.get("RWKV_LITE_BATCH_KERNELS", "") == "1"

PANEL = 8            # weight rows per panel: the lanes of one 256-bit float vector
BATCH_TILE = 4       # activation rows that meet a panel's widened weights per pass


def _shuffle(builder, a, b, idx):
    return builder.shuffle_vector(a, b, ir.Constant(vec(I32, len(idx)), idx))


def _pair_sums(builder, a, b):
    """<8 x i32> a, b -> [a0+a1, a2+a3, b0+b1, b2+b3 | a4+a5, a6+a7, b4+b5, b6+b7] (vphaddd's lane order)."""
    even = _shuffle(builder, a, b, [0, 2, 8, 10, 4, 6, 12, 14])
    odd = _shuffle(builder, a, b, [1, 3, 9, 11, 5, 7, 13, 15])
    return builder.add(even, odd)


def _row_sums(builder, parts):
    """8 vectors <8 x i32> -> <8 x i32> whose lane r is the sum of parts[r]'s lanes (exact integers)."""
    h = [_pair_sums(builder, parts[i], parts[i + 1]) for i in range(0, 8, 2)]
    lo = _pair_sums(builder, h[0], h[1])          # rows 0-3: lanes 0-3 hold columns 0-3, lanes 4-7 columns 4-7
    hi = _pair_sums(builder, h[2], h[3])          # rows 4-7
    return builder.add(_shuffle(builder, lo, hi, [0, 1, 2, 3, 8, 9, 10, 11]),
                       _shuffle(builder, lo, hi, [4, 5, 6, 7, 12, 13, 14, 15]))


def _madd_chain(builder, pairs):
    """Sum of pair_madd(w, x) over (w, x) pairs of <16 x i16>: <8 x i32> (add after multiply-add: vpdpwssd)."""
    acc = None
    for w, x in pairs:
        m = pair_madd(builder, w, x)
        acc = m if acc is None else builder.add(acc, m)
    return acc


def _panel_rows(context, builder, aryty, ary, r0):
    """Pointers to rows r0 .. r0 + PANEL - 1 of a C-contiguous 2-D array (rows past the end read the last row:
    their lanes are computed and dropped), the row length, and the array's data pointer."""
    arr = context.make_array(aryty)(context, builder, ary)
    nrows, ncols = cgutils.unpack_tuple(builder, arr.shape)
    last = builder.sub(nrows, ir.Constant(I64, 1))
    ptrs = []
    for i in range(PANEL):
        r = builder.add(r0, ir.Constant(I64, i))
        r = builder.select(builder.icmp_signed("<", r, nrows), r, last)
        ptrs.append(builder.gep(arr.data, [builder.mul(r, ncols)]))
    return ptrs, ncols, arr.data


def _make_panel(group, nb):
    """Intrinsic (w, dT, step, x16, out, r0, b0): out[i, r] = row r0 + r of W times activation row b0 + i, for
    r < PANEL and i < nb (module docstring).
    w: int8 (R, Cp); dT float32 (ngroups, PANEL): the panel's group scales, row in the lane (_panel_scales);
    step (B, Cp/64) and x16 (B, Cp) from simd.stack_activations; out float32 (>= nb, PANEL)."""
    unit = 32 if group == 32 else 64              # columns (= weight bytes) per integer dot product

    def typer(typingctx, w, dT, step, x16, out, r0, b0):
        if not (is_c_array(w, types.int8, 2) and is_c_array(dT, types.float32, 2)
                and is_c_array(step, types.float32, 2) and is_c_array(x16, types.int16, 2)
                and is_c_array(out, types.float32, 2)
                and isinstance(r0, types.Integer) and isinstance(b0, types.Integer)):
            return None

        def codegen(context, builder, sig, args):
            wty, dty, sty, xty, oty, r0ty, b0ty = sig.args
            first_row = context.cast(builder, args[5], r0ty, types.intp)
            first_b = context.cast(builder, args[6], b0ty, types.intp)
            wrows, row_bytes, wdata = _panel_rows(context, builder, wty, args[0], first_row)
            dptr = context.make_array(dty)(context, builder, args[1]).data

            def rows_of(aryty, ary):
                arr = context.make_array(aryty)(context, builder, ary)
                n = cgutils.unpack_tuple(builder, arr.shape)[1]
                return [builder.gep(arr.data, [builder.mul(builder.add(first_b, ir.Constant(I64, i)), n)])
                        for i in range(nb)]
            srows = rows_of(sty, args[2])
            xrows = rows_of(xty, args[3])
            optr = context.make_array(oty)(context, builder, args[4]).data
            accs = [cgutils.alloca_once_value(builder, splat_const(F32, PANEL, 0.0)) for _ in range(nb)]
            # the next panel's bytes, PANEL rows further on, a unit's share per step: prefetched into L2 while this
            # panel is computed (never faults past the end)
            next_panel = builder.mul(builder.add(first_row, ir.Constant(I64, PANEL)), row_bytes)
            nunits = builder.udiv(row_bytes, ir.Constant(I64, unit))
            with cgutils.for_range(builder, nunits) as loop:
                j = loop.index
                ahead = builder.add(next_panel, builder.mul(j, ir.Constant(I64, PANEL * unit)))
                for line in range(0, PANEL * unit, 64):
                    prefetch_ptr(builder, builder.gep(wdata, [builder.add(ahead, ir.Constant(I64, line))]))
                # the unit's pieces of 16 columns, and the panel's weights for them widened to int16
                c0 = builder.mul(j, ir.Constant(I64, unit))
                offsets = [builder.add(c0, ir.Constant(I64, 16 * p)) for p in range(unit // 16)]
                weights = [[builder.sext(load_vec(builder, wrows[r], off, vec(I8, 16)), vec(I16, 16))
                            for off in offsets] for r in range(PANEL)]
                g = builder.lshr(j, ir.Constant(I64, 1)) if group == 128 else j
                k = builder.lshr(j, ir.Constant(I64, 1)) if group == 32 else j
                d = load_vec(builder, dptr, builder.mul(g, ir.Constant(I64, PANEL)), vec(F32, PANEL))
                for i in range(nb):
                    xs = [load_vec(builder, xrows[i], off, vec(I16, 16)) for off in offsets]
                    parts = [_madd_chain(builder, list(zip(weights[r], xs))) for r in range(PANEL)]
                    sums = builder.sitofp(_row_sums(builder, parts), vec(F32, PANEL))
                    scale = builder.fmul(d, splat(builder, builder.load(builder.gep(srows[i], [k])), PANEL))
                    builder.store(fma(builder, sums, scale, builder.load(accs[i])), accs[i])
            for i in range(nb):
                ptr = builder.gep(optr, [ir.Constant(I64, i * PANEL)])
                builder.store(builder.load(accs[i]), builder.bitcast(ptr, vec(F32, PANEL).as_pointer()), align=4)
            return context.get_dummy_value()
        return types.void(w, dT, step, x16, out, r0, b0), codegen
    return intrinsic(typer)


_p32_1, _p32_2, _p32_3, _p32_4 = (_make_panel(32, n) for n in range(1, BATCH_TILE + 1))
_p64_1, _p64_2, _p64_3, _p64_4 = (_make_panel(64, n) for n in range(1, BATCH_TILE + 1))
_p128_1, _p128_2, _p128_3, _p128_4 = (_make_panel(128, n) for n in range(1, BATCH_TILE + 1))


def _make_scale_transpose():
    """Intrinsic (words uint16 (R, ngroups), r0, dT): for the groups in whole chunks of 8, dT[g, r] = the fp16
    scale of row r0 + r, group g, as float32. The caller does the last ngroups % 8 groups.
    It also prefetches the next panel's scales (rows r0 + PANEL .. r0 + 2 PANEL - 1, contiguous) into L2, as the
    panel kernel does the next panel's weights: without it the first loads of every panel's scales waited for
    memory. Interleaved A/B, one thread, weights from memory, loaded EPYC Zen 4, single token relative to the
    default kernel: 2048 x 2048 1.43-1.59x without, 1.26-1.51x with; 4096 x 4096 1.53x / 1.30x; 4096 x 14336 no
    clear change (1.16x / 1.15x); results bit-identical."""

    def typer(typingctx, words, r0, dT):
        if not (is_c_array(words, types.uint16, 2) and isinstance(r0, types.Integer)
                and is_c_array(dT, types.float32, 2)):
            return None

        def codegen(context, builder, sig, args):
            wty, rty, dty = sig.args
            rows, ngroups, _ = _panel_rows(context, builder, wty, args[0], context.cast(builder, args[1], rty,
                                                                                        types.intp))
            dptr = context.make_array(dty)(context, builder, args[2]).data
            # the next panel's scales: PANEL rows of ngroups words, one prefetch per 64-byte line (32 words)
            warr = context.make_array(wty)(context, builder, args[0])
            first = builder.mul(builder.add(context.cast(builder, args[1], rty, types.intp), ir.Constant(I64, PANEL)),
                                ngroups)
            nlines = builder.udiv(builder.add(builder.mul(ngroups, ir.Constant(I64, PANEL)), ir.Constant(I64, 31)),
                                  ir.Constant(I64, 32))
            with cgutils.for_range(builder, nlines) as line:
                at = builder.add(first, builder.mul(line.index, ir.Constant(I64, 32)))
                prefetch_ptr(builder, builder.gep(warr.data, [at]))
            with cgutils.for_range(builder, builder.udiv(ngroups, ir.Constant(I64, 8))) as loop:
                g0 = builder.mul(loop.index, ir.Constant(I64, 8))
                # 8 rows x 8 groups of 16-bit words, transposed in three rounds of interleaving (the
                # punpckl/h{wd,dq,qdq} pattern: 24 two-input shuffles of 128-bit vectors)
                v = [load_vec(builder, rows[r], g0, vec(I16, 8)) for r in range(PANEL)]
                w16 = []
                for a in range(0, 8, 2):                  # words: [a0 b0 a1 b1 ..], [a4 b4 ..]
                    w16 += [_shuffle(builder, v[a], v[a + 1], [0, 8, 1, 9, 2, 10, 3, 11]),
                            _shuffle(builder, v[a], v[a + 1], [4, 12, 5, 13, 6, 14, 7, 15])]
                w32 = []
                for a in (0, 4):                          # pairs of words: rows a..a+3 per group
                    for h in (0, 1):
                        x, y = w16[a + h], w16[a + 2 + h]
                        w32 += [_shuffle(builder, x, y, [0, 1, 8, 9, 2, 3, 10, 11]),
                                _shuffle(builder, x, y, [4, 5, 12, 13, 6, 7, 14, 15])]
                # w32[0..3]: rows 0-3, groups (0,1), (2,3), (4,5), (6,7); w32[4..7] the same for rows 4-7
                columns = []
                for i in range(4):
                    columns += [_shuffle(builder, w32[i], w32[4 + i], [0, 1, 2, 3, 8, 9, 10, 11]),
                                _shuffle(builder, w32[i], w32[4 + i], [4, 5, 6, 7, 12, 13, 14, 15])]
                for gg, words in enumerate(columns):      # group g0 + gg, the 8 rows in order
                    out_at = builder.mul(builder.add(g0, ir.Constant(I64, gg)), ir.Constant(I64, PANEL))
                    d = builder.fpext(builder.bitcast(words, vec(F16, PANEL)), vec(F32, PANEL))
                    builder.store(d, builder.bitcast(builder.gep(dptr, [out_at]), vec(F32, PANEL).as_pointer()),
                                  align=4)
            return context.get_dummy_value()
        return types.void(words, r0, dT), codegen
    return intrinsic(typer)


_transpose_scales = _make_scale_transpose()


@njit(cache=True, nogil=True)
def _panel_scales(words, p, dT):
    """dT for the panel starting at row p: the fp16 group scales, row in the lane."""
    R, ngroups = words.shape
    _transpose_scales(words, p, dT)
    for g in range(ngroups - ngroups % 8, ngroups):          # the last groups, one at a time
        for r in range(PANEL):
            dT[g, r] = f16_to_f32(words[min(p + r, R - 1), g])


@njit(cache=True, nogil=True)
def _run_panel(group, nb, w, dT, STEP, X16, out, p, b):
    """The panel intrinsic specialised for the group size and nb activation rows."""
    if group == 32:
        if nb == 4:
            _p32_4(w, dT, STEP, X16, out, p, b)
        elif nb == 3:
            _p32_3(w, dT, STEP, X16, out, p, b)
        elif nb == 2:
            _p32_2(w, dT, STEP, X16, out, p, b)
        else:
            _p32_1(w, dT, STEP, X16, out, p, b)
    elif group == 64:
        if nb == 4:
            _p64_4(w, dT, STEP, X16, out, p, b)
        elif nb == 3:
            _p64_3(w, dT, STEP, X16, out, p, b)
        elif nb == 2:
            _p64_2(w, dT, STEP, X16, out, p, b)
        else:
            _p64_1(w, dT, STEP, X16, out, p, b)
    else:
        if nb == 4:
            _p128_4(w, dT, STEP, X16, out, p, b)
        elif nb == 3:
            _p128_3(w, dT, STEP, X16, out, p, b)
        elif nb == 2:
            _p128_2(w, dT, STEP, X16, out, p, b)
        else:
            _p128_1(w, dT, STEP, X16, out, p, b)


@njit(cache=True, nogil=True)
def _rows(group, w, words, X16, STEP, Y, col0, r0, r1):
    """Y[b, col0 + r] = row r of W times activation row b, for r0 <= r < r1 and every b."""
    B, R = X16.shape[0], w.shape[0]
    dT = np.empty((words.shape[1], PANEL), np.float32)
    out = np.empty((BATCH_TILE, PANEL), np.float32)
    for p in range(r0, r1, PANEL):
        _panel_scales(words, p, dT)
        n = min(PANEL, R - p, r1 - p)
        for b in range(0, B, BATCH_TILE):
            nb = min(BATCH_TILE, B - b)
            _run_panel(group, nb, w, dT, STEP, X16, out, p, b)
            for i in range(nb):
                for r in range(n):
                    Y[b + i, col0 + p + r] = out[i, r]


@njit(cache=True, parallel=True, nogil=True)
def gemm_i8g(q, scale, X, src, group):
    """Y (B, R) = X W^T for group-scaled int8: q int8 (R, Cp), scale fp16 bits (R, Cp/G), X float32 (B, Cp)
    zero-padded, src = arange(Cp). Row blocks split over Numba's threads."""
    R = q.shape[0]
    X16, STEP, _ = stack_activations(X, src, group)
    Y = np.empty((X.shape[0], R), np.float32)
    for t in prange((R + ROW_BLOCK - 1) // ROW_BLOCK):
        _rows(group, q, scale, X16, STEP, Y, 0, t * ROW_BLOCK, min(R, (t + 1) * ROW_BLOCK))
    return Y


@njit(cache=True, nogil=True)
def gemm_i8g_serial(q, scale, X, src, group):
    X16, STEP, _ = stack_activations(X, src, group)
    Y = np.empty((X.shape[0], q.shape[0]), np.float32)
    _rows(group, q, scale, X16, STEP, Y, 0, 0, q.shape[0])
    return Y


# ----------------------------------------------------------------------------------------------------------------
# Several activation rows: lanes = activation rows. A panel's weights are widened to int16 once (a scratch row
# per weight row), then each weight column pair is broadcast (a plain load on x86) against a vector holding that
# column pair of LANES activation rows, so the integer dot products need no horizontal sums and no shuffles per
# activation row. Per (weight row, activation row) the float operations are those of the panel kernel above, in
# the same order, so results are bit-identical to it.

LANES = 16           # activation rows per vector (int32 lanes of a 512-bit register, two 256-bit ones)


def _make_widen():
    """Intrinsic (w, r0, wide): wide[r, :] = row r0 + r of W as int16, for r < PANEL (rows past the end: the last
    row)."""

    def typer(typingctx, w, r0, wide):
        if not (is_c_array(w, types.int8, 2) and isinstance(r0, types.Integer) and is_c_array(wide, types.int16, 2)):
            return None

        def codegen(context, builder, sig, args):
            wty, rty, oty = sig.args
            rows, row_bytes, _ = _panel_rows(context, builder, wty, args[0], context.cast(builder, args[1], rty,
                                                                                           types.intp))
            oarr = context.make_array(oty)(context, builder, args[2])
            width = cgutils.unpack_tuple(builder, oarr.shape)[1]
            with cgutils.for_range(builder, builder.udiv(row_bytes, ir.Constant(I64, 32))) as loop:
                b0 = builder.mul(loop.index, ir.Constant(I64, 32))
                for r in range(PANEL):
                    raw = load_vec(builder, rows[r], b0, vec(I8, 32))
                    orow = builder.gep(oarr.data, [builder.mul(ir.Constant(I64, r), width)])
                    builder.store(builder.sext(raw, vec(I16, 32)),
                                  builder.bitcast(builder.gep(orow, [b0]), vec(I16, 32).as_pointer()), align=2)
            return context.get_dummy_value()
        return types.void(w, r0, wide), codegen
    return intrinsic(typer)


_widen = _make_widen()


def _make_lanes_panel(group):
    """Intrinsic (wide, dT, XT, ST, out, c): out[r, l] = row r of the panel times activation row c * LANES + l,
    for r < PANEL, l < LANES. wide: the panel's widened weights (_make_widen); dT: its group scales, row in the
    lane (_panel_scales); XT int32 (chunks, Cp/2, LANES): activation column pairs, rows in the lanes; ST (chunks,
    Cp/64, LANES) steps."""
    unit = 32 if group == 32 else 64
    L = LANES

    def typer(typingctx, wide, dT, XT, ST, out, c):
        if not (is_c_array(wide, types.int16, 2) and is_c_array(dT, types.float32, 2)
                and is_c_array(XT, types.int32, 3) and is_c_array(ST, types.float32, 3)
                and is_c_array(out, types.float32, 2) and isinstance(c, types.Integer)):
            return None

        def codegen(context, builder, sig, args):
            aty, dty, xty, sty, oty, cty = sig.args
            wide_arg, d_arg, x_arg, s_arg, out_arg, chunk_arg = args
            chunk = context.cast(builder, chunk_arg, cty, types.intp)
            dptr = context.make_array(dty)(context, builder, d_arg).data
            warr = context.make_array(aty)(context, builder, wide_arg)
            cols = cgutils.unpack_tuple(builder, warr.shape)[1]
            wrows = [builder.bitcast(builder.gep(warr.data, [builder.mul(ir.Constant(I64, r), cols)]),
                                     I32.as_pointer()) for r in range(PANEL)]          # pairs of int16

            def chunk_base(aryty, ary):
                arr = context.make_array(aryty)(context, builder, ary)
                _, n, _ = cgutils.unpack_tuple(builder, arr.shape)
                return builder.gep(arr.data, [builder.mul(chunk, builder.mul(n, ir.Constant(I64, L)))])
            xbase, sbase = chunk_base(xty, x_arg), chunk_base(sty, s_arg)
            optr = context.make_array(oty)(context, builder, out_arg).data

            def lanes_at(base, index, ty):          # LANES values of row `index` of a chunk's table
                return load_vec(builder, base, builder.mul(index, ir.Constant(I64, L)), vec(ty, L))

            def panel_value(ptr, g, r):            # dT entry of group g, panel row r, in every lane
                index = builder.add(builder.mul(g, ir.Constant(I64, PANEL)), ir.Constant(I64, r))
                return splat(builder, builder.load(builder.gep(ptr, [index])), L)

            accs = [cgutils.alloca_once_value(builder, splat_const(F32, L, 0.0)) for _ in range(PANEL)]
            sum_slots = [cgutils.alloca_once_value(builder, splat_const(I32, L, 0)) for _ in range(PANEL)]
            nunits = builder.udiv(cols, ir.Constant(I64, unit))
            with cgutils.for_range(builder, nunits) as loop:
                j = loop.index
                for slot in sum_slots:
                    builder.store(splat_const(I32, L, 0), slot)
                c0 = builder.mul(j, ir.Constant(I64, unit))
                for p in range(unit // 16):
                    pair0 = builder.lshr(builder.add(c0, ir.Constant(I64, 16 * p)), ir.Constant(I64, 1))
                    # a loop over the run's 8 column pairs, two per step: each row's sum is one chain of
                    # multiply-adds and the 8 rows' chains interleave (unrolled, LLVM ordered the work row by row:
                    # one dependent chain at a time, and spilled the activation vectors)
                    with cgutils.for_range(builder, ir.Constant(I64, 4)) as inner:
                        for e in range(2):
                            pair = builder.add(pair0, builder.add(builder.mul(inner.index, ir.Constant(I64, 2)),
                                                                  ir.Constant(I64, e)))
                            xv = builder.bitcast(lanes_at(xbase, pair, I32), vec(I16, 2 * L))
                            for r in range(PANEL):
                                wpair = builder.load(builder.gep(wrows[r], [pair]))
                                wv = builder.bitcast(splat(builder, wpair, L), vec(I16, 2 * L))
                                builder.store(builder.add(builder.load(sum_slots[r]), pair_madd(builder, wv, xv)),
                                              sum_slots[r])
                sums = [builder.load(slot) for slot in sum_slots]
                g = builder.lshr(j, ir.Constant(I64, 1)) if group == 128 else j
                k = builder.lshr(j, ir.Constant(I64, 1)) if group == 32 else j
                steps = lanes_at(sbase, k, F32)
                for r in range(PANEL):
                    scale = builder.fmul(panel_value(dptr, g, r), steps)
                    part = builder.sitofp(sums[r], vec(F32, L))
                    builder.store(fma(builder, part, scale, builder.load(accs[r])), accs[r])
            for r in range(PANEL):
                ptr = builder.gep(optr, [ir.Constant(I64, r * L)])
                builder.store(builder.load(accs[r]), builder.bitcast(ptr, vec(F32, L).as_pointer()), align=4)
            return context.get_dummy_value()
        return types.void(wide, dT, XT, ST, out, c), codegen
    return intrinsic(typer)


_lanes32, _lanes64, _lanes128 = (_make_lanes_panel(g) for g in (32, 64, 128))


@njit(cache=True, nogil=True)
def _lanes_tables(X16, STEP):
    """The activations with rows in the lanes: XT int32 (chunks, Cp/2, LANES) column pairs and ST likewise for the
    steps; rows past B are zero."""
    B, cols = X16.shape
    chunks = (B + LANES - 1) // LANES
    pairs = X16.view(np.int32)                  # cols is a multiple of 64
    XT = np.zeros((chunks, cols // 2, LANES), np.int32)
    ST = np.zeros((chunks, STEP.shape[1], LANES), np.float32)
    for b in range(B):
        c, l = b // LANES, b % LANES
        for p in range(cols // 2):
            XT[c, p, l] = pairs[b, p]
        for k in range(STEP.shape[1]):
            ST[c, k, l] = STEP[b, k]
    return XT, ST


@njit(cache=True, nogil=True)
def _lane_rows(group, q, scale, XT, ST, B, Y, r0, r1):
    wide = np.empty((PANEL, q.shape[1]), np.int16)
    dT = np.empty((scale.shape[1], PANEL), np.float32)
    out = np.empty((PANEL, LANES), np.float32)
    R = q.shape[0]
    for p in range(r0, r1, PANEL):
        _widen(q, p, wide)
        _panel_scales(scale, p, dT)
        n = min(PANEL, R - p, r1 - p)
        for c in range(XT.shape[0]):
            if group == 32:
                _lanes32(wide, dT, XT, ST, out, c)
            elif group == 64:
                _lanes64(wide, dT, XT, ST, out, c)
            else:
                _lanes128(wide, dT, XT, ST, out, c)
            for r in range(n):
                for l in range(min(LANES, B - c * LANES)):
                    Y[c * LANES + l, p + r] = out[r, l]


@njit(cache=True, parallel=True, nogil=True)
def lanes_i8g(q, scale, X, src, group):
    R = q.shape[0]
    X16, STEP, _ = stack_activations(X, src, group)
    XT, ST = _lanes_tables(X16, STEP)
    Y = np.empty((X.shape[0], R), np.float32)
    for t in prange((R + ROW_BLOCK - 1) // ROW_BLOCK):
        _lane_rows(group, q, scale, XT, ST, X.shape[0], Y, t * ROW_BLOCK, min(R, (t + 1) * ROW_BLOCK))
    return Y


@njit(cache=True, nogil=True)
def lanes_i8g_serial(q, scale, X, src, group):
    X16, STEP, _ = stack_activations(X, src, group)
    XT, ST = _lanes_tables(X16, STEP)
    Y = np.empty((X.shape[0], q.shape[0]), np.float32)
    _lane_rows(group, q, scale, XT, ST, X.shape[0], Y, 0, q.shape[0])
    return Y


# ----------------------------------------------------------------------------------------------------------------
# Single-token products of several matrices in one parallel launch (a layer's projections): y_m = W_m x_m, each
# row computed as by gemm_i8g with B = 1.

@njit(cache=True, parallel=True, nogil=True)
def gemv_many_i8g(qs, scales, X, src, group, rows):
    """qs, scales: tuples of n group-scaled int8 matrices of one width; X float32 (n, Cp) -> y float32 (sum of
    rows): y[offsets[m]:offsets[m+1]] = W_m X[m]."""
    X16, STEP, _ = stack_activations(X, src, group)
    table, offsets = block_table(rows)
    Y = np.empty((1, offsets[-1]), np.float32)
    for t in prange(table.shape[0]):
        m, r0, r1 = table[t, 0], table[t, 1], table[t, 2]
        _rows(group, qs[m], scales[m], X16[m:m + 1], STEP[m:m + 1], Y, offsets[m], r0, r1)
    return Y[0]


# ----------------------------------------------------------------------------------------------------------------
# Entry points for the storage scheme (rwkv_lite/schemes/int8.py)

# Activation rows go to the lanes kernel in whole chunks of LANES, and a last chunk of at least LANES_MIN_ROWS rows
# too; the rest take the panel kernel. Measured (2048 x 2048, group 32, one thread, 2-core EPYC): per row the
# lanes kernel at 16 rows costs ~0.65x the panel kernel's, and a chunk costs the same whatever its rows, so below
# ~12 of 16 lanes the panel kernel is cheaper.
LANES_MIN_ROWS = 12


def _lanes_rows(B):
    """How many of B activation rows (a leading run) the lanes kernel takes."""
    rest = B % LANES
    return B if rest >= LANES_MIN_ROWS else B - rest


def gemv_i8g(q, scale, x, src, group, parallel=True):
    """y (R,) = W x for one activation vector x float32 (Cp,), zero-padded."""
    return (gemm_i8g if parallel else gemm_i8g_serial)(q, scale, x[None, :], src, group)[0]


def rows_i8g(q, scale, X, src, group, parallel=True):
    """Y (B, R) = X W^T; row b equal to gemv_i8g(X[b]) bit for bit."""
    n = _lanes_rows(X.shape[0])
    panel = gemm_i8g if parallel else gemm_i8g_serial
    if n == 0:
        return panel(q, scale, X, src, group)
    Y = (lanes_i8g if parallel else lanes_i8g_serial)(q, scale, X[:n], src, group)
    if n == X.shape[0]:
        return Y
    return np.concatenate([Y, panel(q, scale, X[n:], src, group)])
