"""PROTOTYPE, not used by the package: int4 weights in the "p16" panel layout x 8-bit activations.

A research prototype for a future storage layout (see bench/act8/README.md); nothing in rwkv_lite imports it.

Weights: rwkv-lite's int4 (u4 values 0..15 and one 16-bit scale/zero word per row and 32 columns, 4.5 bits/weight)
in the p16 chunk order of panel_int8: one 64-byte vector holds 4-column chunk k of 16 rows in its low nibbles and
chunk k + 4 in its high nibbles (a group = 256 bytes; two and/shift instructions unpack it, shared over B); the
words are transposed to (panel, group, 16 rows).

Per (activation row, 16 weight rows, group): 8 dpbusd on the unpacked u8 nibbles (no offset needed), then the exact
integer s = 8 * dot - zi * sum(xq) (zi = the word's 7-bit zero point in eighths), one conversion and one FMA with
d * xs / 8. The activations are panel_int8's (8-bit, one scale per 32 columns, group-major); the dpbusd code path
and the prefetch distance follow panel_int8's settings.
"""
import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic
from rwkv_lite.kernels.simd import F32, I8, I16, I32, I64, fma, load_vec, prefetch_ptr, splat, splat_const, vec, is_c_array

from panel_int8 import CACHE, G, PANEL, PREFETCH_BYTES, _aligned_acc, dpbusd, quantize_a8


@intrinsic
def panel_i4a8(typingctx, wp, words, p, xq, xs8, xsum, acc):
    """acc (B, 16) = one 16-row panel p of the p16 int4 matrix times all B group-major activation rows; xs8 = xs / 8,
    xsum = sum(xq) per (group, row) (`group_major_i4`)."""
    if not (is_c_array(wp, types.uint8, 1) and is_c_array(words, types.uint16, 1) and is_c_array(xq, types.int8, 3)
            and is_c_array(xs8, types.float32, 2) and is_c_array(xsum, types.int32, 2) and is_c_array(acc, types.float32, 2)):
        return None

    def codegen(context, builder, sig, args):
        wty, dty, pty, xqty, xsty, xcty, aty = sig.args
        W = context.make_array(wty)(context, builder, args[0]).data
        D = context.make_array(dty)(context, builder, args[1]).data
        p = context.cast(builder, args[2], pty, types.intp)
        xqa = context.make_array(xqty)(context, builder, args[3])
        ngroups, B, _ = cgutils.unpack_tuple(builder, xqa.shape)
        XQ = xqa.data
        XS = context.make_array(xsty)(context, builder, args[4]).data
        XC = context.make_array(xcty)(context, builder, args[5]).data
        A = context.make_array(aty)(context, builder, args[6]).data
        wbase = builder.gep(W, [builder.mul(p, builder.mul(ngroups, ir.Constant(I64, PANEL * G // 2)))])
        dbase = builder.gep(D, [builder.mul(p, builder.mul(ngroups, ir.Constant(I64, PANEL)))])
        vty = vec(F32, PANEL).as_pointer()
        v32 = vec(I32, PANEL)
        with cgutils.for_range(builder, B) as bl:
            ap = builder.gep(A, [builder.mul(bl.index, ir.Constant(I64, PANEL))])
            builder.store(splat_const(F32, PANEL, 0.0), builder.bitcast(ap, vty), align=64)
        with cgutils.for_range(builder, ngroups) as gl:
            g = gl.index
            wg = builder.gep(wbase, [builder.mul(g, ir.Constant(I64, PANEL * G // 2))])
            for line in (range(0, PANEL * G // 2, 64) if PREFETCH_BYTES else ()):
                prefetch_ptr(builder, builder.gep(wg, [ir.Constant(I64, PREFETCH_BYTES + line)]))
            packed = [load_vec(builder, wg, ir.Constant(I64, 64 * k), vec(I8, 64)) for k in range(4)]
            m15 = splat_const(I8, 64, 15)
            w = [builder.and_(v, m15) for v in packed] + \
                [builder.and_(builder.lshr(v, splat_const(I8, 64, 4)), m15) for v in packed]
            u = builder.zext(load_vec(builder, dbase, builder.mul(g, ir.Constant(I64, PANEL)), vec(I16, PANEL)), v32)
            e = builder.add(builder.and_(builder.lshr(u, splat_const(I32, PANEL, 4)), splat_const(I32, PANEL, 31)),
                            splat_const(I32, PANEL, 103))
            dbits = builder.or_(builder.shl(e, splat_const(I32, PANEL, 23)),
                                builder.shl(builder.and_(u, splat_const(I32, PANEL, 15)), splat_const(I32, PANEL, 19)))
            dv = builder.bitcast(dbits, vec(F32, PANEL))
            zi = builder.lshr(u, splat_const(I32, PANEL, 9))
            gB = builder.mul(g, B)
            with cgutils.for_range(builder, B) as bl:
                b = bl.index
                bg = builder.add(gB, b)
                xrow32 = builder.bitcast(builder.gep(XQ, [builder.mul(bg, ir.Constant(I64, G))]), I32.as_pointer())
                acc0 = splat_const(I32, PANEL, 0)
                acc1 = splat_const(I32, PANEL, 0)
                for k in range(8):
                    xv = builder.load(builder.gep(xrow32, [ir.Constant(I64, k)]), align=4)
                    xb = builder.bitcast(splat(builder, xv, PANEL), vec(I8, 64))
                    if k % 2 == 0:
                        acc0 = dpbusd(builder, acc0, w[k], xb)
                    else:
                        acc1 = dpbusd(builder, acc1, w[k], xb)
                dot = builder.add(acc0, acc1)
                corr = builder.mul(zi, splat(builder, builder.load(builder.gep(XC, [bg])), PANEL))
                ints = builder.sub(builder.shl(dot, splat_const(I32, PANEL, 3)), corr)
                sc = builder.fmul(dv, splat(builder, builder.load(builder.gep(XS, [bg])), PANEL))
                ap = builder.bitcast(builder.gep(A, [builder.mul(b, ir.Constant(I64, PANEL))]), vty)
                builder.store(fma(builder, builder.sitofp(ints, vec(F32, PANEL)), sc, builder.load(ap, align=64)),
                              ap, align=64)
        return context.get_dummy_value()
    return types.void(wp, words, p, xq, xs8, xsum, acc), codegen


@njit(cache=CACHE)
def group_major_i4(xq, xs, xc):
    """quantize_a8's (B, Cp) / (B, ng) -> (ng, B, 32) / (ng, B), with xs / 8 and sum(xq) for the int4 zero point."""
    B, Cp = xq.shape
    ng = Cp // G
    gq = np.empty((ng, B, G), np.int8)
    gs = np.empty((ng, B), np.float32)
    gc = np.empty((ng, B), np.int32)
    for g in range(ng):
        for b in range(B):
            gq[g, b, :] = xq[b, g * G:(g + 1) * G]
            gs[g, b] = xs[b, g] * np.float32(0.125)
            gc[g, b] = -(xc[b, g] // 128)          # quantize_a8 gives -128 * sum(xq)
    return gq, gs, gc


@njit(cache=CACHE)
def gemm_i4a8(wp, words, X):
    """Y (B, R) = the p16 int4 matrix (wp, words) times the 8-bit-rounded rows of X (B, Cp), one thread."""
    xq, xs, xc = quantize_a8(X)
    gq, gs, gc = group_major_i4(xq, xs, xc)
    B = X.shape[0]
    R = words.shape[0] // (X.shape[1] // G)
    Y = np.empty((B, R), np.float32)
    acc = _aligned_acc(B)
    for p in range(R // PANEL):
        panel_i4a8(wp, words, p, gq, gs, gc, acc)
        Y[:, p * PANEL:(p + 1) * PANEL] = acc
    return Y


def random_int4(R, C, rng):
    """Random int4 weights: q (R, C) 0..15, words (R, C/32), the package's packed bytes (R, C/2) and the p16
    layout (wp, wd) of the same matrix."""
    q = rng.integers(0, 16, (R, C), dtype=np.uint8)
    m = rng.integers(0, 16, (R, C // G)); e = rng.integers(12, 15, (R, C // G)); zi = rng.integers(0, 128, (R, C // G))
    words = (m | (e << 4) | (zi << 9)).astype(np.uint16)
    qg = q.reshape(R, C // G, G)
    packed = (qg[:, :, :16] | (qg[:, :, 16:] << 4)).reshape(R, C // 2).astype(np.uint8)
    U = q.reshape(R // PANEL, PANEL, C // 4, 4).transpose(0, 2, 1, 3).reshape(R // PANEL, C // G, 8, 64)
    wp = (U[:, :, :4] | (U[:, :, 4:] << 4)).astype(np.uint8).reshape(-1).copy()
    wd = words.reshape(R // PANEL, PANEL, C // G).transpose(0, 2, 1).copy().reshape(-1)
    return q, words, packed, wp, wd


def reference_i4a8(q, words, X):
    """float64 evaluation of the same 8-bit activations against q (R, C) 0..15 and the words."""
    xq, xs, xc = quantize_a8.py_func(X)
    u = words.astype(np.int64)
    d = (1 + (u & 15) / 16) * 2.0 ** (((u >> 4) & 31) - 24)
    z = (u >> 9) / 8
    R, C = q.shape
    B = X.shape[0]
    dots = np.einsum("rgc,bgc->brg", q.reshape(R, -1, G).astype(np.float64), xq.reshape(B, -1, G).astype(np.float64))
    xsum = xq.reshape(B, -1, G).astype(np.float64).sum(-1)
    return ((dots - z[None] * xsum[:, None, :]) * d[None] * xs[:, None, :]).sum(-1)
