"""PROTOTYPE, not used by the package: group-int8 weights in a "p16" panel layout x 8-bit activations.

A research prototype for a future storage layout (see bench/act8/README.md). Nothing in rwkv_lite imports it; the
package's kernels are in rwkv_lite/kernels/. It is kept so that the real kernels can be built from it.

Weights "p16": rows in panels of 16; inside a panel, for each 4-column chunk, one 64-byte vector = 16 rows x 4
consecutive columns (row-major inside each 32-bit lane), stored as u8 = q + 128. The fp16 group scales (one per 32
columns) are transposed to (panel, group, 16 rows). Same 8.5 bits/weight as today's group-int8 (`repack`).

Activations: per row and 32 columns, xs = max|x| / 127 (fp32), xq = rint(x * 127 / max|x|) in -127..127, and one
int32 per (row, group) xc = -128 * sum(xq) (the correction for the u8 offset of the weights); stored group-major
across the batch, xq (groups, B, 32), xs / xc (groups, B) (`quantize_a8` + `group_major`).

Kernel: per panel and group, 8 weight vectors and 16 scales are loaded once; per activation row, 8 x vpdpbusd
with the broadcast activation bytes give the exact int32 group sums of 16 weight rows, then one int->float
conversion and one FMA with d[row, g] * xs[b, g]. The float operations are the same for every B, so B = 1 equals
each row of a batched call bit for bit, and every dot-product code path gives the same result.

Settings, read once at import (environment):
    ACT8_DPBUSD   how the 4-byte dot products are emitted: "vnni512" (llvm.x86.avx512.vpdpbusd.512),
                  "vnni256" (llvm.x86.avx512.vpdpbusd.256 on two halves: AVX-VNNI, VEX encoding), "quadadd"
                  (generic IR: zext * sext, add each 4 lanes; LLVM 22 does NOT turn it into vpdpbusd), or "auto"
                  (default: vnni512 when the compile target has avx512vnni, else vnni256 with avxvnni, else
                  quadadd). The target follows NUMBA_CPU_NAME / NUMBA_CPU_FEATURES like Numba does.
    ACT8_PREFETCH software prefetch distance in bytes ahead of the weight stream (default: the package's
                  simd.PREFETCH_BYTES, 8 KiB; 0 = none).
Non-default settings are compiled without Numba's on-disk cache (the cache key would not see them).

`gemm_i8a8` is the dpbusd kernel; `gemm_i8a8_pmaddwd` is the same layout in generic IR of the pmaddwd shape
(weights widened to i16, int16 activations, even/odd pair sums), which LLVM turns into vpdpwssd on VNNI hosts and
vpmaddwd on AVX2: the portable fallback.
"""
import os

import numpy as np
from llvmlite import binding as llvm_binding
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from rwkv_lite.kernels.simd import (F16, F32, I8, I16, I32, I64, fma, load_vec, prefetch_ptr, splat, splat_const,
                                    vec, is_c_array, FASTMATH)
from rwkv_lite.kernels.simd import PREFETCH_BYTES as PACKAGE_PREFETCH_BYTES
from rwkv_lite.kernels.simd import pair_madd

PANEL = 16          # weight rows per panel = int32 lanes of one 512-bit vector
G = 32              # columns per scale group (weights and activations)


def _target_features():
    """CPU features Numba compiles for: NUMBA_CPU_FEATURES when set, else the host's."""
    forced = os.environ.get("NUMBA_CPU_FEATURES")
    if forced:
        return {f[1:] for f in forced.split(",") if f.startswith("+")}
    if os.environ.get("NUMBA_CPU_NAME") and os.environ.get("NUMBA_CPU_NAME") != "host":
        return set()          # a named CPU without explicit features: do not assume VNNI
    return {k for k, v in llvm_binding.get_host_cpu_features().items() if v}


def _choose_dpbusd():
    mode = os.environ.get("ACT8_DPBUSD", "auto")
    if mode != "auto":
        if mode not in ("vnni512", "vnni256", "quadadd"):
            raise ValueError(f"ACT8_DPBUSD={mode!r}: expected auto, vnni512, vnni256 or quadadd")
        return mode
    feats = _target_features()
    if "avx512vnni" in feats and "avx512f" in feats:
        return "vnni512"
    if "avxvnni" in feats:
        return "vnni256"
    return "quadadd"


DPBUSD = _choose_dpbusd()
PREFETCH_BYTES = int(os.environ.get("ACT8_PREFETCH", PACKAGE_PREFETCH_BYTES))
# LLVM >= 21 declares the vpdpbusd intrinsics with <N x i8> byte operands; older LLVMs with <N/4 x i32>.
VPDPBUSD_BYTE_OPERANDS = llvm_binding.llvm_version_info >= (21,)
CACHE = os.environ.get("ACT8_DPBUSD", "auto") == "auto" and PREFETCH_BYTES == PACKAGE_PREFETCH_BYTES


def dpbusd(builder, acc, a_u8, b_s8):
    """acc <16 x i32> + (sum over each 4 bytes of zext(a_u8) * sext(b_s8)); exact in int32 for these ranges."""
    n = acc.type.count
    if DPBUSD == "vnni256":          # 256-bit vpdpbusd (VEX AVX-VNNI), the 16 lanes as two halves
        fnty = ir.FunctionType(vec(I32, 8), [vec(I32, 8), vec(I8, 32), vec(I8, 32)] if VPDPBUSD_BYTE_OPERANDS
                               else [vec(I32, 8)] * 3)
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.x86.avx512.vpdpbusd.256")

        def half(v, i, m):
            return builder.shuffle_vector(v, v, ir.Constant(vec(I32, m), list(range(i * m, (i + 1) * m))))

        def operand(v):
            return v if VPDPBUSD_BYTE_OPERANDS else builder.bitcast(v, vec(I32, 8))
        outs = [builder.call(fn, [half(acc, i, 8), operand(half(a_u8, i, 32)), operand(half(b_s8, i, 32))])
                for i in range(2)]
        return builder.shuffle_vector(outs[0], outs[1], ir.Constant(vec(I32, 16), list(range(16))))
    if DPBUSD == "vnni512":
        if VPDPBUSD_BYTE_OPERANDS:
            fnty = ir.FunctionType(vec(I32, n), [vec(I32, n), vec(I8, 4 * n), vec(I8, 4 * n)])
            fn = cgutils.get_or_insert_function(builder.module, fnty, f"llvm.x86.avx512.vpdpbusd.{32 * n}")
            return builder.call(fn, [acc, a_u8, b_s8])
        fnty = ir.FunctionType(vec(I32, n), [vec(I32, n)] * 3)
        fn = cgutils.get_or_insert_function(builder.module, fnty, f"llvm.x86.avx512.vpdpbusd.{32 * n}")
        return builder.call(fn, [acc, builder.bitcast(a_u8, vec(I32, n)), builder.bitcast(b_s8, vec(I32, n))])
    # "quadadd": the generic IR of the same operation (LLVM 22.1 emits vpmovzxbd + vpmaddwd + permutes, not vpdpbusd)
    wide = vec(I32, 4 * n)
    prod = builder.mul(builder.zext(a_u8, wide), builder.sext(b_s8, wide))
    q = [builder.shuffle_vector(prod, prod, ir.Constant(vec(I32, n), list(range(j, 4 * n, 4)))) for j in range(4)]
    return builder.add(acc, builder.add(builder.add(q[0], q[1]), builder.add(q[2], q[3])))


def _make_panel(generic, single=False):
    """Intrinsic (wp, dp, p, xq, xs, xc, acc, y): y[:, 16p:16p+16] for all B activation rows, one 16-row panel.

    wp / dp: the p16 weights and scales (`repack`); xq / xs / xc: group-major activations (`group_major`; xq int16
    for the generic pmaddwd variant); acc: a 64-byte aligned (B, 16) float32 scratch (`_aligned_acc`)."""
    def typer(typingctx, wp, dp, p, xq, xs, xc, acc, y):
        xdt = types.int16 if generic else types.int8
        if not (is_c_array(wp, types.uint8, 1) and is_c_array(dp, types.uint16, 1) and is_c_array(xq, xdt, 3)
                and is_c_array(xs, types.float32, 2) and is_c_array(xc, types.int32, 2)
                and is_c_array(acc, types.float32, 2) and is_c_array(y, types.float32, 2)):
            return None

        def codegen(context, builder, sig, args):
            wty, dty, pty, xqty, xsty, xcty, aty, yty = sig.args
            ya = context.make_array(yty)(context, builder, args[7])
            Yp, Rn = ya.data, cgutils.unpack_tuple(builder, ya.shape)[1]
            if single:
                fslot = cgutils.alloca_once_value(builder, splat_const(F32, PANEL, 0.0))
            W = context.make_array(wty)(context, builder, args[0]).data
            D = context.make_array(dty)(context, builder, args[1]).data
            p = context.cast(builder, args[2], pty, types.intp)
            xqa = context.make_array(xqty)(context, builder, args[3])
            ngroups, B, _ = cgutils.unpack_tuple(builder, xqa.shape)
            XQ = xqa.data
            XS = context.make_array(xsty)(context, builder, args[4]).data
            XC = context.make_array(xcty)(context, builder, args[5]).data
            A = context.make_array(aty)(context, builder, args[6]).data
            Cp = builder.mul(ngroups, ir.Constant(I64, G))
            wbase = builder.gep(W, [builder.mul(p, builder.mul(Cp, ir.Constant(I64, PANEL)))])
            dbase = builder.gep(D, [builder.mul(p, builder.mul(ngroups, ir.Constant(I64, PANEL)))])
            vty = vec(F32, PANEL).as_pointer()
            if single:
                B = ir.Constant(I64, 1)
            else:
                with cgutils.for_range(builder, B) as bl:
                    ap = builder.gep(A, [builder.mul(bl.index, ir.Constant(I64, PANEL))])
                    builder.store(splat_const(F32, PANEL, 0.0), builder.bitcast(ap, vty), align=64)
            with cgutils.for_range(builder, ngroups) as gl:
                g = gl.index
                wg = builder.gep(wbase, [builder.mul(g, ir.Constant(I64, PANEL * G))])
                for line in (range(0, PANEL * G, 64) if PREFETCH_BYTES else ()):
                    prefetch_ptr(builder, builder.gep(wg, [ir.Constant(I64, PREFETCH_BYTES + line)]))
                w = [load_vec(builder, wg, ir.Constant(I64, 64 * k), vec(I8, 64)) for k in range(8)]
                if generic:
                    w = [builder.zext(v, vec(I16, 64)) for v in w]
                dbits = load_vec(builder, dbase, builder.mul(g, ir.Constant(I64, PANEL)), vec(I16, PANEL))
                dv = builder.fpext(builder.bitcast(dbits, vec(F16, PANEL)), vec(F32, PANEL))
                gB = builder.mul(g, B)
                with cgutils.for_range(builder, B) as bl:
                    b = bl.index
                    bg = builder.add(gB, b)
                    xrow = builder.gep(XQ, [builder.mul(bg, ir.Constant(I64, G))])
                    if not generic:
                        xrow32 = builder.bitcast(xrow, I32.as_pointer())
                        acc0 = splat(builder, builder.load(builder.gep(XC, [bg])), PANEL)
                        acc1 = splat_const(I32, PANEL, 0)
                        for k in range(8):
                            xv = builder.load(builder.gep(xrow32, [ir.Constant(I64, k)]), align=4)
                            xb = builder.bitcast(splat(builder, xv, PANEL), vec(I8, 64))
                            if k % 2 == 0:
                                acc0 = dpbusd(builder, acc0, w[k], xb)
                            else:
                                acc1 = dpbusd(builder, acc1, w[k], xb)
                        ints = builder.add(acc0, acc1)
                    else:
                        xrow64 = builder.bitcast(xrow, I64.as_pointer())
                        parts = []
                        for k in range(8):
                            xv = builder.load(builder.gep(xrow64, [ir.Constant(I64, k)]), align=8)
                            xb = builder.bitcast(splat(builder, xv, 16), vec(I16, 64))
                            parts.append(pair_madd(builder, w[k], xb))      # <32 x i32>: 2 lanes per row
                        while len(parts) > 1:
                            parts = [builder.add(parts[i], parts[i + 1]) for i in range(0, len(parts), 2)]
                        acc = parts[0]
                        even = builder.shuffle_vector(acc, acc, ir.Constant(vec(I32, PANEL), list(range(0, 32, 2))))
                        odd = builder.shuffle_vector(acc, acc, ir.Constant(vec(I32, PANEL), list(range(1, 32, 2))))
                        ints = builder.add(builder.add(even, odd),
                                           splat(builder, builder.load(builder.gep(XC, [bg])), PANEL))
                    sc = builder.fmul(dv, splat(builder, builder.load(builder.gep(XS, [bg])), PANEL))
                    if single:
                        ap = fslot
                    else:
                        ap = builder.bitcast(builder.gep(A, [builder.mul(b, ir.Constant(I64, PANEL))]), vty)
                    builder.store(fma(builder, builder.sitofp(ints, vec(F32, PANEL)), sc, builder.load(ap, align=64)),
                                  ap, align=64)
            ycol = builder.mul(p, ir.Constant(I64, PANEL))
            with cgutils.for_range(builder, B) as bl:
                if single:
                    v = builder.load(fslot)
                else:
                    v = builder.load(builder.bitcast(builder.gep(A, [builder.mul(bl.index, ir.Constant(I64, PANEL))]), vty), align=64)
                yp = builder.gep(Yp, [builder.add(builder.mul(bl.index, Rn), ycol)])
                builder.store(v, builder.bitcast(yp, vty), align=4)
            return context.get_dummy_value()
        return types.void(wp, dp, p, xq, xs, xc, acc, y), codegen
    return intrinsic(typer)


panel_i8a8_batch = _make_panel(False)               # dpbusd, B rows of accumulators in memory
panel_i8a8_pmaddwd = _make_panel(True)              # generic IR, pmaddwd shape
panel_i8a8_single = _make_panel(False, True)        # dpbusd, B = 1: accumulator in registers, same operations


@njit(cache=CACHE, fastmath=FASTMATH)
def quantize_a8(X):
    """X float32 (B, Cp) -> xq int8 (B, Cp), xs float32 (B, Cp/32) = max|x|/127, xc int32 = -128 * sum(xq)."""
    B, Cp = X.shape
    ng = Cp // G
    xq = np.empty((B, Cp), np.int8)
    xs = np.empty((B, ng), np.float32)
    xc = np.empty((B, ng), np.int32)
    for b in range(B):
        for g in range(ng):
            amax = np.float32(0.0)
            for c in range(g * G, g * G + G):
                amax = max(amax, abs(X[b, c]))
            if amax < np.float32(1e-30):          # zeros and subnormal groups (127/amax would overflow)
                xs[b, g] = 0.0
                xc[b, g] = 0
                xq[b, g * G:g * G + G] = 0
                continue
            inv = np.float32(127.0) / amax
            xs[b, g] = amax / np.float32(127.0)
            s = 0
            for c in range(g * G, g * G + G):
                v = np.int32(np.rint(X[b, c] * inv))
                xq[b, c] = np.int8(v)
                s += v
            xc[b, g] = np.int32(-128 * s)
    return xq, xs, xc


def repack(q, scale_bits):
    """q int8 (R, Cp), scale fp16 bits uint16 (R, Cp/32) -> wp uint8 flat (panel, chunk4, 16, 4), dp uint16 flat
    (panel, group, 16)."""
    R, Cp = q.shape
    assert R % PANEL == 0 and Cp % G == 0
    u = (q.astype(np.int16) + 128).astype(np.uint8)
    wp = u.reshape(R // PANEL, PANEL, Cp // 4, 4).transpose(0, 2, 1, 3).copy().reshape(-1)
    dp = scale_bits.reshape(R // PANEL, PANEL, Cp // G).transpose(0, 2, 1).copy().reshape(-1)
    return wp, dp


def reference(q, scale_bits, X):
    """float64 evaluation of the same 8-bit activations against row-major q (R, Cp) int8 and fp16 scale bits."""
    xq, xs, xc = quantize_a8.py_func(X)
    d = scale_bits.view(np.float16).astype(np.float64)
    R, Cp = q.shape
    B = X.shape[0]
    ints = np.einsum("rgc,bgc->brg", q.reshape(R, -1, G).astype(np.int64), xq.reshape(B, -1, G).astype(np.int64))
    return (ints * d[None] * xs[:, None, :].astype(np.float64)).sum(-1)

@njit(cache=CACHE)
def _aligned_acc(B):
    """A (B, 16) float32 scratch whose rows start on 64-byte boundaries."""
    buf = np.empty(B * PANEL + 16, np.float32)
    skip = (-buf.ctypes.data) % 64 // 4
    return buf[skip: skip + B * PANEL].reshape(B, PANEL)


@njit(cache=CACHE)
def group_major(xq, xs, xc):
    """(B, Cp) / (B, ng) -> (ng, B, 32) / (ng, B): all rows of a group contiguous."""
    B, Cp = xq.shape
    ng = Cp // G
    gq = np.empty((ng, B, G), xq.dtype)
    gs = np.empty((ng, B), np.float32)
    gc = np.empty((ng, B), np.int32)
    for g in range(ng):
        for b in range(B):
            gq[g, b, :] = xq[b, g * G:(g + 1) * G]
            gs[g, b] = xs[b, g]
            gc[g, b] = xc[b, g]
    return gq, gs, gc


@njit(cache=CACHE)
def gemm_i8a8(wp, dp, X):
    """Y (B, R) = the p16 int8 matrix (wp, dp) times the 8-bit-rounded rows of X (B, Cp), one thread, dpbusd."""
    xq, xs, xc = quantize_a8(X)
    gq, gs, gc = group_major(xq, xs, xc)
    B = X.shape[0]
    R = dp.shape[0] // (X.shape[1] // G)
    Y = np.empty((B, R), np.float32)
    acc = _aligned_acc(B)
    if B == 1:
        for p in range(R // PANEL):
            panel_i8a8_single(wp, dp, p, gq, gs, gc, acc, Y)
    else:
        for p in range(R // PANEL):
            panel_i8a8_batch(wp, dp, p, gq, gs, gc, acc, Y)
    return Y


@njit(cache=CACHE)
def gemm_i8a8_pmaddwd(wp, dp, X):
    """The same as gemm_i8a8 (bit for bit) through generic IR of the pmaddwd shape."""
    xq, xs, xc = quantize_a8(X)
    gq, gs, gc = group_major(xq.astype(np.int16), xs, xc)
    B = X.shape[0]
    R = dp.shape[0] // (X.shape[1] // G)
    Y = np.empty((B, R), np.float32)
    acc = _aligned_acc(B)
    for p in range(R // PANEL):
        panel_i8a8_pmaddwd(wp, dp, p, gq, gs, gc, acc, Y)
    return Y
