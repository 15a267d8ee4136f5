"""PROTOTYPE, not used by the package: 15-bit activations as two 8-bit digits ("a8x2") x p16 group-int8 weights.

A research prototype for a future storage layout (see bench/act8/README.md); nothing in rwkv_lite imports it.

Per row and 32 columns: x15 = rint(x * 16256 / max|x|) = 128 * hi + lo, hi in -127..127, lo in -64..64. Two dpbusd
per 4-column chunk into two exact int32 accumulators, s = 128 * s_hi + s_lo; the same p16 weights as panel_int8
and the same float tail (one conversion, one FMA with d * xs per group), so B = 1 equals a batched row bit for bit.
Keeps today's int8 accuracy (15-bit activations) at 1.0-1.6x the cost of the 8-bit kernel.
"""
import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic
from rwkv_lite.kernels.simd import F16, F32, I8, I16, I32, I64, fma, load_vec, prefetch_ptr, splat, splat_const, vec, FASTMATH

from panel_int8 import CACHE, G, PANEL, PREFETCH_BYTES, _aligned_acc, dpbusd


@intrinsic
def panel_i8a15split(typingctx, wp, dp, p, xh, xl, xs, xc, acc, y):
    """y[:, 16p:16p+16] for all B rows: one 16-row panel of the p16 int8 matrix times the two-digit activations
    (`quantize_split`)."""
    def codegen(context, builder, sig, args):
        wty, dty, pty, xhty, xlty, xsty, xcty, aty, yty = sig.args
        W = context.make_array(wty)(context, builder, args[0]).data
        D = context.make_array(dty)(context, builder, args[1]).data
        p = context.cast(builder, args[2], pty, types.intp)
        xha = context.make_array(xhty)(context, builder, args[3])
        ngroups, B, _ = cgutils.unpack_tuple(builder, xha.shape)
        XH = xha.data
        XL = context.make_array(xlty)(context, builder, args[4]).data
        XS = context.make_array(xsty)(context, builder, args[5]).data
        XC = context.make_array(xcty)(context, builder, args[6]).data
        A = context.make_array(aty)(context, builder, args[7]).data
        ya = context.make_array(yty)(context, builder, args[8])
        Yp, Rn = ya.data, cgutils.unpack_tuple(builder, ya.shape)[1]
        Cp = builder.mul(ngroups, ir.Constant(I64, G))
        wbase = builder.gep(W, [builder.mul(p, builder.mul(Cp, ir.Constant(I64, PANEL)))])
        dbase = builder.gep(D, [builder.mul(p, builder.mul(ngroups, ir.Constant(I64, PANEL)))])
        vty = vec(F32, PANEL).as_pointer()
        with cgutils.for_range(builder, B) as bl:
            ap = builder.gep(A, [builder.mul(bl.index, ir.Constant(I64, PANEL))])
            builder.store(splat_const(F32, PANEL, 0.0), builder.bitcast(ap, vty), align=64)
        with cgutils.for_range(builder, ngroups) as gl:
            g = gl.index
            wg = builder.gep(wbase, [builder.mul(g, ir.Constant(I64, PANEL * G))])
            for line in (range(0, PANEL * G, 64) if PREFETCH_BYTES else ()):
                prefetch_ptr(builder, builder.gep(wg, [ir.Constant(I64, PREFETCH_BYTES + line)]))
            w = [load_vec(builder, wg, ir.Constant(I64, 64 * k), vec(I8, 64)) for k in range(8)]
            dbits = load_vec(builder, dbase, builder.mul(g, ir.Constant(I64, PANEL)), vec(I16, PANEL))
            dv = builder.fpext(builder.bitcast(dbits, vec(F16, PANEL)), vec(F32, PANEL))
            gB = builder.mul(g, B)
            with cgutils.for_range(builder, B) as bl:
                b = bl.index
                bg = builder.add(gB, b)
                off = builder.mul(bg, ir.Constant(I64, G))
                xh32 = builder.bitcast(builder.gep(XH, [off]), I32.as_pointer())
                xl32 = builder.bitcast(builder.gep(XL, [off]), I32.as_pointer())
                ah = splat(builder, builder.load(builder.gep(XC, [builder.mul(bg, ir.Constant(I64, 2))])), PANEL)
                al = splat(builder, builder.load(builder.gep(XC, [builder.add(builder.mul(bg, ir.Constant(I64, 2)), ir.Constant(I64, 1))])), PANEL)
                for k in range(8):
                    h = builder.bitcast(splat(builder, builder.load(builder.gep(xh32, [ir.Constant(I64, k)]), align=4), PANEL), vec(I8, 64))
                    l = builder.bitcast(splat(builder, builder.load(builder.gep(xl32, [ir.Constant(I64, k)]), align=4), PANEL), vec(I8, 64))
                    ah = dpbusd(builder, ah, w[k], h)
                    al = dpbusd(builder, al, w[k], l)
                ints = builder.add(builder.shl(ah, splat_const(I32, PANEL, 7)), al)
                sc = builder.fmul(dv, splat(builder, builder.load(builder.gep(XS, [bg])), PANEL))
                ap = builder.bitcast(builder.gep(A, [builder.mul(b, ir.Constant(I64, PANEL))]), vty)
                builder.store(fma(builder, builder.sitofp(ints, vec(F32, PANEL)), sc, builder.load(ap, align=64)), ap, align=64)
        ycol = builder.mul(p, ir.Constant(I64, PANEL))
        with cgutils.for_range(builder, B) as bl:
            v = builder.load(builder.bitcast(builder.gep(A, [builder.mul(bl.index, ir.Constant(I64, PANEL))]), vty), align=64)
            builder.store(v, builder.bitcast(builder.gep(Yp, [builder.add(builder.mul(bl.index, Rn), ycol)]), vty), align=4)
        return context.get_dummy_value()
    return types.void(wp, dp, p, xh, xl, xs, xc, acc, y), codegen


@njit(cache=CACHE, fastmath=FASTMATH)
def quantize_split(X):
    """x15 = rint(x * 16256 / amax) = 128*hi + lo, hi in -127..127, lo in -64..64; group-major (ng, B, 32);
    xc (ng, B, 2) = -128 * (sum hi, sum lo)."""
    B, Cp = X.shape
    ng = Cp // G
    xh = np.zeros((ng, B, G), np.int8)
    xl = np.zeros((ng, B, G), np.int8)
    xs = np.zeros((ng, B), np.float32)
    xc = np.zeros((ng, B, 2), np.int32)
    for b in range(B):
        for g in range(ng):
            amax = np.float32(0.0)
            for c in range(G):
                amax = max(amax, abs(X[b, g * G + c]))
            if amax < np.float32(1e-30):
                continue
            inv = np.float32(16256.0) / amax
            xs[g, b] = amax / np.float32(16256.0)
            sh = 0
            sl = 0
            for c in range(G):
                v = np.int32(np.rint(X[b, g * G + c] * inv))
                h = np.int32(np.rint(np.float32(v) / np.float32(128.0)))
                l = v - 128 * h
                xh[g, b, c] = h
                xl[g, b, c] = l
                sh += h
                sl += l
            xc[g, b, 0] = -128 * sh
            xc[g, b, 1] = -128 * sl
    return xh, xl, xs, xc


@njit(cache=CACHE)
def gemm_i8a15split(wp, dp, X):
    """Y (B, R) = the p16 int8 matrix (wp, dp) times the 15-bit-rounded rows of X (B, Cp), one thread."""
    xh, xl, xs, xc = quantize_split(X)
    B = X.shape[0]
    R = dp.shape[0] // (X.shape[1] // G)
    Y = np.empty((B, R), np.float32)
    acc = _aligned_acc(B)
    for p in range(R // PANEL):
        panel_i8a15split(wp, dp, p, xh, xl, xs, xc, acc, Y)
    return Y


def reference_split(q, sb, X):
    """float64 evaluation of the same 15-bit activations against row-major q (R, Cp) int8 and fp16 scale bits."""
    xh, xl, xs, xc = quantize_split.py_func(X)
    x15 = (128 * xh.astype(np.int64) + xl).transpose(1, 0, 2)        # (B, ng, 32)
    d = sb.view(np.float16).astype(np.float64)
    R, Cp = q.shape
    ints = np.einsum("rgc,bgc->brg", q.reshape(R, -1, G).astype(np.int64), x15)
    return (ints * d[None] * xs.T[:, None, :].astype(np.float64)).sum(-1)
