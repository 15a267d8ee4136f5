"""Integer kernels for panel-layout matrices: one family for a single token, a batch of sequences and a prompt.

The panel layout ("p16", documented in rwkv_lite/schemes/panel.py and docs/format.md) stores a matrix in
panels of 16 rows; inside a panel, each 4-column chunk of the 16 rows is one 64-byte vector (16 lanes of 4
bytes, lane i = row i). Activations are rounded per row and group of 32 columns to small integers with one
float32 scale (``quantize_rows``), so a group's contribution to 16 outputs is an exact int32 dot product of
bytes: eight "4-byte dot, accumulate" instructions (x86 ``vpdpbusd``), then one conversion to float and one FMA
with the weights' group scales times the activation's. There is no horizontal reduction: the vector lanes are
the 16 weight rows.

Why this shape: a GEMV that reads each weight once is bound by memory; several activation rows (a batch of
sequences, or a prompt's tokens) reuse each loaded weight vector, and then only arithmetic counts. Here a
weight vector costs one instruction per activation row for 64 multiply-adds (int8 x int8), against ~4 for the
row-major kernels with 15-bit activations. The same per-group sequence of float operations runs for every
number of rows, so a single token's result equals its row in any batched or prompt call bit for bit, and the
thread split (whole panels) does not change results either.

Activations ("digits"):
  1 digit  (int4 weights): x8 = rint(x * 127 / max|x|) in -127..127; the group's scale is max|x| / 127. For
           4-bit weights this costs nothing measurable (mean KL +0.3-1.3% on the tiny real models).
  2 digits (int8 weights): x15 = rint(x * 16256 / max|x|) split as 128 * hi + lo, both digits in -127..127
           with the sign of x15 (hi rounded toward zero); the group sum is 128 * dot(w, hi) + dot(w, lo). This
           keeps the 15-bit accuracy of the row-major int8 kernels (8-bit activations doubled int8's error).
Groups whose max is 0 or below 1e-30 give zeros; a group holding NaN or Inf gives a NaN scale, so every output
that uses it is NaN rather than silently finite.

Instruction sets (chosen once from the CPU Numba compiles for; every path gives identical integers):
  "vnni512"  AVX-512 VNNI (Ice Lake and later Xeons, Zen 4/5): llvm.x86.avx512.vpdpbusd.512 on the unsigned
             weight bytes (int8 stored as q + 128, corrected by -128 * sum(x) per group).
  "vnni256"  AVX-VNNI without AVX-512 (Alder Lake and later client CPUs): the 256-bit vpdpbusd on two halves.
  "avx2"     AVX2 (Haswell .. Zen 3): int4 nibbles (0..15) meet x8 in vpmaddubsw, and eight 16-bit partial sums
             add before one vpmaddwd (exact: 8 * 2 * 15 * 127 < 32768); int8 widens the weight bytes to 16 bits
             and meets x15 kept as int16 ("wide" activations) in vpmaddwd, two activation rows per widened
             vector (the sign trick on both digits, |x| times q with x's sign in vpmaddubsw, ran batches 1.5x
             slower). The int8 activations are stored wide for this path only; the integers are the same.
  "generic"  any other CPU (ARM, ...): the same integers in portable vector IR (widening multiplies).
LLVM 22 does not produce vpdpbusd from generic IR, hence the named intrinsics (their byte operands are <N x i8>
from LLVM 21 on, <N/4 x i32> before). RWKV_LITE_PANEL_ISA=vnni512|vnni256|avx2|generic overrides the choice
(for tests and benchmarks; such builds skip Numba's on-disk cache, whose key does not see the variable).
"""
from __future__ import annotations

import os

import numpy as np
from llvmlite import binding as llvm_binding
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from .pointwise import sigmoid_f32, tanh_f32
from .simd import (F16, F32, I8, I16, I32, I64, PREFETCH_BYTES, bits_to_f32, fma, is_c_array,
                   claim_task, load_vec, prefetch_ptr, splat, splat_const, task_cursors, vec)

PANEL = 16            # weight rows per panel: the int32 lanes of one 512-bit vector
GROUP = 32            # columns per weight scale and per activation scale
ROW_TILE = 64         # activation rows per pass over a panel (the float accumulators stay in L1)
FLOAT32_MAX_BITS = np.int32(0x7F7FFFFF)  # the largest float32's bits: larger |x| (Inf) or NaN: the group's scale is NaN
ISAS = ("vnni512", "vnni256", "avx2", "generic")


# Features implied by the CPU names people give NUMBA_CPU_NAME (to build for another machine, or to test AVX2 code on
# an AVX-512 host). An unknown name gets the portable kernels: naming an instruction the target lacks would stop
# LLVM.
_AVX2 = {"avx2"}
_AVX512_VNNI = {"avx2", "avx512f", "avx512bw", "avx512vl", "avx512vnni"}
_CPU_NAME_FEATURES = {
    **{n: _AVX2 for n in ("haswell", "broadwell", "skylake", "znver1", "znver2", "znver3", "x86-64-v3")},
    **{n: _AVX2 | {"avx512f", "avx512bw", "avx512vl"} for n in ("skylake-avx512", "x86-64-v4")},
    **{n: _AVX512_VNNI for n in ("cascadelake", "cooperlake", "icelake-client", "icelake-server", "tigerlake",
                                  "sapphirerapids", "emeraldrapids", "graniterapids", "znver4", "znver5")},
    **{n: _AVX2 | {"avxvnni"} for n in ("alderlake", "raptorlake", "meteorlake", "arrowlake", "lunarlake",
                                         "gracemont", "sierraforest")},
}


def _target_features() -> set:
    """CPU features Numba compiles for: those of NUMBA_CPU_NAME (the host when unset), changed by the +/- entries
    of NUMBA_CPU_FEATURES (e.g. NUMBA_CPU_NAME=haswell NUMBA_CPU_FEATURES=-avx512f: AVX2 code)."""
    name = os.environ.get("NUMBA_CPU_NAME", "host")
    if name == "host":
        feats = {k for k, v in llvm_binding.get_host_cpu_features().items() if v}
    else:
        feats = set(_CPU_NAME_FEATURES.get(name, ()))
    for entry in os.environ.get("NUMBA_CPU_FEATURES", "").split(","):
        entry = entry.strip()
        if entry[:1] == "+":
            feats.add(entry[1:])
        elif entry[:1] == "-":
            feats.discard(entry[1:])
    return feats


def usable_isas() -> list[str]:
    """The instruction-set paths the compile target supports, fastest last ("generic" always; x86 only for the
    rest). Naming an instruction the target lacks would abort LLVM, so tests compile only these."""
    isas = ["generic"]
    if os.uname().machine not in ("x86_64", "AMD64", "i686", "i386"):
        return isas
    feats = _target_features()
    if "avx2" in feats:
        isas.append("avx2")
    if "avxvnni" in feats or {"avx512f", "avx512vnni", "avx512vl"} <= feats:
        isas.append("vnni256")
    if {"avx512vnni", "avx512f", "avx512bw"} <= feats:
        isas.append("vnni512")
    return isas


def choose_isa() -> str:
    forced = os.environ.get("RWKV_LITE_PANEL_ISA")
    if forced:
        if forced not in ISAS:
            raise ValueError(f"RWKV_LITE_PANEL_ISA={forced!r}: expected one of {', '.join(ISAS)}")
        return forced
    return usable_isas()[-1]


ISA = choose_isa()
WIDE = ISA == "avx2"          # int8 activations as int16 for the avx2 kernel (quantize_rows)
CACHE = not os.environ.get("RWKV_LITE_PANEL_ISA")
BYTE_OPERANDS = llvm_binding.llvm_version_info >= (21,)      # vpdpbusd's operand types (see the docstring)


# ----------------------------------------------------------------------------------------------------------------
# The integer core: one group (8 chunks of 4 columns) of 16 weight rows dotted with one activation digit row.

def _call(builder, name, ret, args):
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ret, [a.type for a in args]), name)
    return builder.call(fn, args)


def _half(builder, v, i, n):
    return builder.shuffle_vector(v, v, ir.Constant(vec(I32, n), list(range(i * n, (i + 1) * n))))


def _join(builder, a, b):
    n = a.type.count
    return builder.shuffle_vector(a, b, ir.Constant(vec(I32, 2 * n), list(range(2 * n))))


def _dpbusd(builder, acc, a_u8, b_s8):
    """acc + (sum over each 4 bytes of zext(a_u8) * sext(b_s8)) with vpdpbusd (acc <n x i32>, n = 8 or 16)."""
    n = acc.type.count
    if not BYTE_OPERANDS:
        a_u8, b_s8 = builder.bitcast(a_u8, vec(I32, n)), builder.bitcast(b_s8, vec(I32, n))
    return _call(builder, f"llvm.x86.avx512.vpdpbusd.{32 * n}", vec(I32, n), [acc, a_u8, b_s8])


def _prepare_weights(builder, chunks, kind, isa):
    """The 8 chunk vectors <64 x i8> of a group as the operands `_group_dot` takes (done once per group and shared
    by every activation row): two 32-byte halves (rows 0-7, 8-15) on 256-bit paths; int8 bytes turned back into
    signed q on the avx2 path."""
    if isa == "vnni512" or isa == "generic":
        return chunks
    halves = [(_half(builder, c, 0, 32), _half(builder, c, 1, 32)) for c in chunks]
    if isa == "avx2" and kind == "i8":
        flip = splat_const(I8, 32, -128)
        halves = [(builder.xor(a, flip), builder.xor(b, flip)) for a, b in halves]
    return halves


def _group_dot(builder, w, xrow32, kind, isa, seed=None):
    """<16 x i32>: seed (default 0) plus, for each of the 16 rows, the sum over the group's 32 columns of weight * x,
    exactly; x = the 32 bytes at xrow32 (an i32 pointer), weights as `_prepare_weights` gave them. int8 on every
    path but avx2 sums the stored bytes (q + 128); the caller corrects that with -128 * sum(x) (as the seed:
    starting a chain from it costs no instruction)."""
    zero16 = splat_const(I32, 16, 0)
    seed = zero16 if seed is None else seed
    xs = [builder.load(builder.gep(xrow32, [ir.Constant(I64, k)]), align=4) for k in range(8)]
    if isa == "vnni512":
        acc = [seed, zero16]                                                # two chains hide the latency
        for k in range(8):
            xb = builder.bitcast(splat(builder, xs[k], 16), vec(I8, 64))
            acc[k % 2] = _dpbusd(builder, acc[k % 2], w[k], xb)
        return builder.add(acc[0], acc[1])
    if isa == "vnni256":
        acc = [_half(builder, seed, 0, 8), splat_const(I32, 8, 0), _half(builder, seed, 1, 8), splat_const(I32, 8, 0)]
        for k in range(8):
            xb = builder.bitcast(splat(builder, xs[k], 8), vec(I8, 32))
            for h in range(2):
                acc[2 * h + k % 2] = _dpbusd(builder, acc[2 * h + k % 2], w[k][h], xb)
        return _join(builder, builder.add(acc[0], acc[1]), builder.add(acc[2], acc[3]))
    if isa == "avx2":
        ones = splat_const(I16, 16, 1)
        out = []
        for h in range(2):
            if kind == "i4":              # nibbles x x8: eight 16-bit sums stay exact, then one widening madd
                s16 = None
                for k in range(8):
                    xb = builder.bitcast(splat(builder, xs[k], 8), vec(I8, 32))
                    p = _call(builder, "llvm.x86.avx2.pmadd.ub.sw", vec(I16, 16), [w[k][h], xb])
                    s16 = p if s16 is None else builder.add(s16, p)
                out.append(_call(builder, "llvm.x86.avx2.pmadd.wd", vec(I32, 8), [s16, ones]))
            else:                         # sign trick: |x| (unsigned) times q * sign(x) (signed)
                s32 = None
                for k in range(8):
                    xb = builder.bitcast(splat(builder, xs[k], 8), vec(I8, 32))
                    ax = _call(builder, "llvm.abs.v32i8", vec(I8, 32), [xb, ir.Constant(ir.IntType(1), 0)])
                    ws = _call(builder, "llvm.x86.avx2.psign.b", vec(I8, 32), [w[k][h], xb])
                    p = _call(builder, "llvm.x86.avx2.pmadd.ub.sw", vec(I16, 16), [ax, ws])
                    p32 = _call(builder, "llvm.x86.avx2.pmadd.wd", vec(I32, 8), [p, ones])
                    s32 = p32 if s32 is None else builder.add(s32, p32)
                out.append(s32)
        return builder.add(_join(builder, out[0], out[1]), seed)
    # generic: widen, multiply, add each lane's 4 products
    acc = seed
    for k in range(8):
        xb = builder.bitcast(splat(builder, xs[k], 16), vec(I8, 64))
        prod = builder.mul(builder.zext(w[k], vec(I32, 64)), builder.sext(xb, vec(I32, 64)))
        q = [builder.shuffle_vector(prod, prod, ir.Constant(vec(I32, 16), list(range(j, 64, 4)))) for j in range(4)]
        acc = builder.add(acc, builder.add(builder.add(q[0], q[1]), builder.add(q[2], q[3])))
    return acc


def _wide_dots(builder, wg, xrows, seeds):
    """AVX2 int8 ("wide" activations: the 32 values x15 of a row's group as int16): the <16 x i32> group sums over
    the stored bytes (q + 128) of one or two activation rows at once, plus their seeds. vpmaddwd on the zero-extended
    bytes (exact: 32 * 255 * 16256 < 2**31): quarter j of chunk k (16 bytes) holds rows 4j..4j+3, and its 8 int32
    lanes hold each row's two pair sums, added at the end of the group. Two rows share each widened weight vector,
    and their 8 accumulators fit the 16 ymm registers."""
    n = len(xrows)
    acc = [[splat_const(I32, 8, 0) for _ in range(4)] for _ in range(n)]
    for k in range(8):
        xs = [builder.bitcast(splat(builder, builder.load(builder.gep(builder.bitcast(xr, I64.as_pointer()),
                                                                        [ir.Constant(I64, k)]), align=8), 4),
                              vec(I16, 16)) for xr in xrows]
        for j in range(4):
            wq = builder.zext(load_vec(builder, wg, ir.Constant(I64, 64 * k + 16 * j), vec(I8, 16)), vec(I16, 16))
            for r in range(n):
                acc[r][j] = builder.add(acc[r][j], _call(builder, "llvm.x86.avx2.pmadd.wd", vec(I32, 8), [wq, xs[r]]))
    out = []
    for r in range(n):
        a = _join(builder, _join(builder, acc[r][0], acc[r][1]), _join(builder, acc[r][2], acc[r][3]))
        even = builder.shuffle_vector(a, a, ir.Constant(vec(I32, 16), list(range(0, 32, 2))))
        odd = builder.shuffle_vector(a, a, ir.Constant(vec(I32, 16), list(range(1, 32, 2))))
        out.append(builder.add(builder.add(even, odd), seeds[r]))
    return out


def _group_scales(builder, words, kind):
    """The 16 rows' float32 group scales from their stored 16-bit words: fp16 for int8; for int4 the scale code
    (d / 8, see schemes/int4.py: the 1/8 of the zero point's eighths folded into the exponent) and the zero
    point in eighths (<16 x i32>)."""
    if kind == "i8":
        return builder.fpext(builder.bitcast(words, vec(F16, PANEL)), vec(F32, PANEL)), None
    v32 = vec(I32, PANEL)
    u = builder.zext(words, v32)
    e = builder.add(builder.and_(builder.lshr(u, splat_const(I32, PANEL, 4)), splat_const(I32, PANEL, 31)),
                    splat_const(I32, PANEL, 100))                     # 2**(e - 24) / 8 = 2**(e - 27)
    bits = builder.or_(builder.shl(e, splat_const(I32, PANEL, 23)),
                       builder.shl(builder.and_(u, splat_const(I32, PANEL, 15)), splat_const(I32, PANEL, 19)))
    return builder.bitcast(bits, vec(F32, PANEL)), builder.lshr(u, splat_const(I32, PANEL, 9))


def make_panel_kernel(kind: str, single: bool, isa: str = ISA, prefetch: int = PREFETCH_BYTES):
    """Intrinsic panel(wp, wd, p, xq, xs, xsum, b0, b1, acc, y): rows b0..b1 of y[:, 16p:16p+16] = panel p of the
    matrix times those activation rows.

    kind "i8": wp uint8 (panels, Cp * 16) = q + 128; wd uint16 (panels, Cp / 32 * 16) fp16 scale bits; two digits.
    kind "i4": wp uint8 (panels, Cp * 8) = nibbles (chunk k low, chunk k + 4 high); wd uint16 the int4 words.
    xq int8 (groups, B, 32 * digits), xs float32 (groups, B), xsum int32 (groups, B) from ``quantize_rows``;
    acc a 64-byte aligned float32 scratch of at least (b1 - b0, 16) (unused when `single`); y float32 (B, >= 16p+16).
    single: one row (b1 = b0 + 1), its accumulator in a register. prefetch: bytes ahead in the weight stream
    (0 = none)."""
    digits = 2 if kind == "i8" else 1
    wbytes = PANEL * GROUP if kind == "i8" else PANEL * GROUP // 2        # weight bytes per (panel, group)
    xbytes = GROUP * digits

    def typer(typingctx, wp, wd, p, xq, xs, xsum, b0, b1, acc, y):
        if not (is_c_array(wp, types.uint8, 2) and is_c_array(wd, types.uint16, 2) and is_c_array(xq, types.int8, 3)
                and is_c_array(xs, types.float32, 2) and is_c_array(xsum, types.int32, 2)
                and is_c_array(acc, types.float32, 2) and is_c_array(y, types.float32, 2)):
            return None

        def codegen(context, builder, sig, args):
            def arr(i):
                return context.make_array(sig.args[i])(context, builder, args[i])

            def index(i):
                return context.cast(builder, args[i], sig.args[i], types.intp)
            wpa, wda, xqa, ya = arr(0), arr(1), arr(3), arr(9)
            p, b0, b1 = index(2), index(6), index(7)
            ngroups, B, _ = cgutils.unpack_tuple(builder, xqa.shape)
            wrow = cgutils.unpack_tuple(builder, wpa.strides)[0]
            drow = cgutils.unpack_tuple(builder, wda.strides)[0]
            W = builder.gep(wpa.data, [builder.mul(p, wrow)])
            D = builder.bitcast(builder.gep(builder.bitcast(wda.data, I8.as_pointer()), [builder.mul(p, drow)]),
                                I16.as_pointer())
            XQ, XS, XSUM = xqa.data, arr(4).data, arr(5).data
            A = arr(8).data
            vty = vec(F32, PANEL).as_pointer()
            nrows = builder.sub(b1, b0)
            zero_f = splat_const(F32, PANEL, 0.0)
            if single:
                slot = cgutils.alloca_once_value(builder, zero_f)
            else:
                with cgutils.for_range(builder, nrows) as rl:
                    builder.store(zero_f, builder.bitcast(builder.gep(A, [builder.mul(rl.index, ir.Constant(I64, PANEL))]), vty), align=64)
            with cgutils.for_range(builder, ngroups) as gl:
                g = gl.index
                wg = builder.gep(W, [builder.mul(g, ir.Constant(I64, wbytes))])
                for line in (range(0, wbytes, 64) if prefetch else ()):
                    prefetch_ptr(builder, builder.gep(wg, [ir.Constant(I64, prefetch + line)]))
                if kind == "i8":
                    chunks = [load_vec(builder, wg, ir.Constant(I64, 64 * k), vec(I8, 64)) for k in range(8)]
                else:
                    packed = [load_vec(builder, wg, ir.Constant(I64, 64 * k), vec(I8, 64)) for k in range(4)]
                    m15 = splat_const(I8, 64, 15)
                    chunks = ([builder.and_(v, m15) for v in packed]
                              + [builder.lshr(v, splat_const(I8, 64, 4)) for v in packed])
                wide = kind == "i8" and isa == "avx2"
                w = None if wide else _prepare_weights(builder, chunks, kind, isa)
                d, zero = _group_scales(builder, load_vec(builder, D, builder.mul(g, ir.Constant(I64, PANEL)),
                                                          vec(I16, PANEL)), kind)
                gB = builder.mul(g, B)

                def rows_body(rls):
                    """The group's contribution to activation rows b0 + rl for rl in rls (one, or two when wide)."""
                    bgs = [builder.add(gB, builder.add(b0, rl)) for rl in rls]
                    xrows = [builder.gep(XQ, [builder.mul(bg, ir.Constant(I64, xbytes))]) for bg in bgs]
                    xsums = [builder.load(builder.gep(XSUM, [bg])) for bg in bgs]
                    if wide:
                        seeds = [splat(builder, builder.neg(builder.shl(x, ir.Constant(I32, 7))), PANEL) for x in xsums]
                        all_ints = _wide_dots(builder, wg, xrows, seeds)
                    else:
                        xrow = builder.bitcast(xrows[0], I32.as_pointer())
                        if kind == "i8":
                            seed = None
                            if isa != "avx2":      # the bytes were q + 128: subtract 128 * sum(x15)
                                seed = splat(builder, builder.neg(builder.shl(xsums[0], ir.Constant(I32, 7))), PANEL)
                            hi = _group_dot(builder, w, xrow, kind, isa)
                            lo = _group_dot(builder, w, builder.gep(xrow, [ir.Constant(I64, 8)]), kind, isa, seed)
                            ints = builder.add(builder.shl(hi, splat_const(I32, PANEL, 7)), lo)
                        else:                      # (q - z/8) * x summed, times 8: 8 * dot(q, x) - z8 * sum(x)
                            dot = _group_dot(builder, w, xrow, kind, isa)
                            ints = builder.sub(builder.shl(dot, splat_const(I32, PANEL, 3)),
                                               builder.mul(zero, splat(builder, xsums[0], PANEL)))
                        all_ints = [ints]
                    for rl, bg, ints in zip(rls, bgs, all_ints):
                        scale = builder.fmul(d, splat(builder, builder.load(builder.gep(XS, [bg])), PANEL))
                        ap = slot if single else builder.bitcast(builder.gep(A, [builder.mul(rl, ir.Constant(I64, PANEL))]), vty)
                        builder.store(fma(builder, builder.sitofp(ints, vec(F32, PANEL)), scale,
                                          builder.load(ap, align=64)), ap, align=64)

                if wide and not single:            # rows in pairs, then the odd one
                    pairs = builder.udiv(nrows, ir.Constant(I64, 2))
                    with cgutils.for_range(builder, pairs) as pl:
                        first = builder.mul(pl.index, ir.Constant(I64, 2))
                        rows_body([first, builder.add(first, ir.Constant(I64, 1))])
                    odd = builder.icmp_unsigned("!=", builder.mul(pairs, ir.Constant(I64, 2)), nrows)
                    with builder.if_then(odd):
                        rows_body([builder.sub(nrows, ir.Constant(I64, 1))])
                else:
                    with cgutils.for_range(builder, nrows) as rl:
                        rows_body([rl.index])
            Y, ystride = ya.data, cgutils.unpack_tuple(builder, ya.strides)[0]
            with cgutils.for_range(builder, nrows) as rl:
                src = slot if single else builder.bitcast(builder.gep(A, [builder.mul(rl.index, ir.Constant(I64, PANEL))]), vty)
                yrow = builder.gep(builder.bitcast(Y, I8.as_pointer()), [builder.mul(builder.add(b0, rl.index), ystride)])
                dst = builder.gep(builder.bitcast(yrow, F32.as_pointer()), [builder.mul(p, ir.Constant(I64, PANEL))])
                builder.store(builder.load(src, align=64), builder.bitcast(dst, vty), align=4)
            return context.get_dummy_value()
        return types.void(wp, wd, p, xq, xs, xsum, b0, b1, acc, y), codegen
    return intrinsic(typer)


# Software prefetch distance. A single token streams the weights once: 4 KiB ahead (whole-model decode on a
# 2-core Zen 4, interleaved runs: int4 20.6-21.3 ms/token at 4 KiB against 21.1-26.5 at 8 KiB and 23.4-24.3 for
# the row-major kernels; int8 36.9-44.8 at 2-4 KiB, 41.7-49.5 at 8 KiB). Batches spend 8-16x longer on each
# weight, so they need the larger distance (Eagle 1.5B int8, B = 8: 60-68 ms/step at 8-16 KiB, 72 at 2 KiB,
# 91-93 with none).
SINGLE_PREFETCH = 4096
panel_i8_single = make_panel_kernel("i8", True, prefetch=SINGLE_PREFETCH)
panel_i8_rows = make_panel_kernel("i8", False)
panel_i4_single = make_panel_kernel("i4", True, prefetch=SINGLE_PREFETCH)
panel_i4_rows = make_panel_kernel("i4", False)


# ----------------------------------------------------------------------------------------------------------------
# Activations

def _vector_reduce(builder, op, v):
    """llvm.vector.reduce.<op> of an integer vector (op: add, umax)."""
    n = v.type.count
    fnty = ir.FunctionType(v.type.element, [v.type])
    fn = cgutils.get_or_insert_function(builder.module, fnty, f"llvm.vector.reduce.{op}.v{n}i{v.type.element.width}")
    return builder.call(fn, [v])


def _group_source(context, builder, sig, args):
    """The 32 float32 values at element args[1] of the C-contiguous array args[0] (no alignment assumed)."""
    data = context.make_array(sig.args[0])(context, builder, args[0]).data
    offset = context.cast(builder, args[1], sig.args[1], types.intp)
    return load_vec(builder, data, offset, vec(F32, GROUP))


def _is_float32_c(ty):
    return isinstance(ty, types.Array) and ty.dtype == types.float32 and ty.layout == "C"


@intrinsic
def group_abs_max_bits(typingctx, src, offset):
    """max |x| over the 32 floats src.flat[offset:offset + 32], as the bits of a float32 (int32): the float bits
    with the sign cleared order like the magnitudes, Inf and NaN above every finite value (> FLOAT32_MAX_BITS)."""
    if not (_is_float32_c(src) and isinstance(offset, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        bits = builder.bitcast(_group_source(context, builder, sig, args), vec(I32, GROUP))
        return _vector_reduce(builder, "umax", builder.and_(bits, splat_const(I32, GROUP, 0x7FFFFFFF)))
    return types.int32(src, offset), codegen


def _make_round_group(kind):
    """Intrinsic round(src, offset, inv, dst, dst_offset) -> int32: q = rint(x * inv) for the 32 floats
    src.flat[offset:offset + 32] (one IEEE product each, as np.rint(x * inv) in float32), stored from element
    dst_offset of the C-contiguous dst as
      "i8":    32 int8 (one digit, |q| <= 127)
      "i16":   32 int16 (two digits kept together, the avx2 kernels' wide activations)
      "split": 32 int8 hi then 32 int8 lo, q = 128 * hi + lo, hi rounded toward zero (lo keeps the sign of q)
    and returns sum(q). One vector pass: the scalar loop it replaces was not vectorised by LLVM (~55 ns a group,
    3.6 us per 2048-wide row, serial time before every decode product)."""
    dtype = types.int16 if kind == "i16" else types.int8
    elem = I16 if kind == "i16" else I8

    def typer(typingctx, src, offset, inv, dst, dst_offset):
        if not (_is_float32_c(src) and isinstance(offset, types.Integer) and inv == types.float32
                and isinstance(dst, types.Array) and dst.dtype == dtype and dst.layout == "C"
                and isinstance(dst_offset, types.Integer)):
            return None

        def codegen(context, builder, sig, args):
            x = _group_source(context, builder, sig, args)
            y = builder.fmul(x, splat(builder, args[2], GROUP))
            fnty = ir.FunctionType(y.type, [y.type])
            rint = cgutils.get_or_insert_function(builder.module, fnty, f"llvm.rint.v{GROUP}f32")
            q = builder.fptosi(builder.call(rint, [y]), vec(I32, GROUP))
            out = context.make_array(sig.args[3])(context, builder, args[3]).data
            at = context.cast(builder, args[4], sig.args[4], types.intp)
            vty = vec(elem, GROUP)

            def store(values, index):
                ptr = builder.bitcast(builder.gep(out, [index]), vty.as_pointer())
                builder.store(builder.trunc(values, vty), ptr, align=1)
            if kind == "split":
                sign_fix = builder.and_(builder.ashr(q, splat_const(I32, GROUP, 31)), splat_const(I32, GROUP, 127))
                hi = builder.ashr(builder.add(q, sign_fix), splat_const(I32, GROUP, 7))
                store(hi, at)
                store(builder.sub(q, builder.shl(hi, splat_const(I32, GROUP, 7))),
                      builder.add(at, ir.Constant(at.type, GROUP)))
            else:
                store(q, at)
            return _vector_reduce(builder, "add", q)
        return types.int32(src, offset, inv, dst, dst_offset), codegen
    return intrinsic(typer)


round_group_i8 = _make_round_group("i8")
round_group_i16 = _make_round_group("i16")
round_group_split = _make_round_group("split")


@njit(cache=CACHE, nogil=True)
def _quantize_row(X, b, digits, wide, xq, x16, xs, xsum):
    """Row b of quantize_rows: per group, max |x| and the rounding in one vector pass each (the intrinsics
    above); a last, partial group goes through a zero-padded copy."""
    C = X.shape[1]
    ng = xs.shape[0]
    B = xs.shape[1]
    levels = np.float32(127.0) if digits == 1 else np.float32(16256.0)
    tail = np.zeros(GROUP, np.float32)
    flat = X.reshape(-1)                       # (a view: X is C-contiguous)
    for g in range(ng):
        c0 = g * GROUP
        n = min(GROUP, C - c0)
        src, at = flat, b * C + c0
        if n < GROUP:
            for i in range(GROUP):
                tail[i] = X[b, c0 + i] if i < n else np.float32(0.0)
            src, at = tail, 0
        top = group_abs_max_bits(src, at)
        if top > FLOAT32_MAX_BITS:               # Inf or NaN in the group
            xs[g, b] = np.nan
            continue
        amax = bits_to_f32(top)
        if amax < np.float32(1e-30):           # zeros, or so small that levels / amax would overflow
            continue
        inv = levels / amax
        xs[g, b] = amax / levels
        row = g * B + b
        if digits == 1:
            xsum[g, b] = round_group_i8(src, at, inv, xq, row * GROUP)
        elif wide:
            xsum[g, b] = round_group_i16(src, at, inv, x16, row * GROUP)
        else:
            xsum[g, b] = round_group_split(src, at, inv, xq, row * 2 * GROUP)


@njit(cache=CACHE, nogil=True)
def _activation_arrays(B, cols, digits, wide):
    ng = cols // GROUP
    x16 = np.zeros((ng, B, GROUP if wide else 0), np.int16)
    xq = x16.view(np.int8) if wide else np.zeros((ng, B, GROUP * digits), np.int8)
    return xq, x16, np.zeros((ng, B), np.float32), np.zeros((ng, B), np.int32)


@njit(cache=CACHE, nogil=True)
def quantize_rows(X, cols, digits, wide=False):
    """X float32 (B, C) -> xq int8 (groups, B, 32 * digits), xs float32 (groups, B), xsum int32 (groups, B) for a
    stored width of `cols` (a multiple of 32, >= C; the columns past C are zeros). Group-major, so that a weight
    group meets every row's activation bytes in one contiguous run. See the module docstring for the rounding.
    Two digits are stored as 32 bytes hi then 32 bytes lo; with `wide` (the avx2 int8 kernel) as the 32 values
    x15 = 128 * hi + lo in int16 instead (the same 64 bytes)."""
    X = np.ascontiguousarray(X)                # (no copy when it is already: the rounding reads rows as vectors)
    xq, x16, xs, xsum = _activation_arrays(X.shape[0], cols, digits, wide)
    for b in range(X.shape[0]):
        _quantize_row(X, b, digits, wide, xq, x16, xs, xsum)
    return xq, xs, xsum


@njit(cache=CACHE, nogil=True, parallel=True)
def quantize_rows_parallel(X, cols, digits, wide=False):
    """quantize_rows with the rows split over Numba's threads (identical results): otherwise the serial part of
    every prompt-sized product (0.28 ms per 128 x 2048 block on one Zen 4 core; ~60 ms of a 128-token prompt of
    the RWKV-7 1.5B shape, which 16 threads read in ~1 s)."""
    X = np.ascontiguousarray(X)
    xq, x16, xs, xsum = _activation_arrays(X.shape[0], cols, digits, wide)
    for b in prange(X.shape[0]):
        _quantize_row(X, b, digits, wide, xq, x16, xs, xsum)
    return xq, xs, xsum


@njit(cache=CACHE, nogil=True)
def _aligned_scratch(rows):
    """A float32 (rows, 16) scratch whose rows start on 64-byte boundaries."""
    buf = np.empty(rows * PANEL + PANEL, np.float32)
    skip = (-buf.ctypes.data) % 64 // 4
    return buf[skip: skip + rows * PANEL].reshape(rows, PANEL)


# ----------------------------------------------------------------------------------------------------------------
# Drivers: whole matrices, split over Numba's threads by whole panels

PANELS_PER_TASK = 4          # 64 rows per parallel task, like the row-major kernels' ROW_BLOCK
PARALLEL_QUANTIZE_ROWS = 16  # activation rows from which their rounding is split over the threads too
MIN_TASK_ROWS = 16           # the fewest activation rows a task gets when a product is split by rows


@njit(cache=CACHE, nogil=True)
def _run_panels(int8, wp, wd, xq, xs, xsum, p0, p1, b0, b1, Y):
    """Panels p0..p1 times activation rows b0..b1 into Y (one thread)."""
    if b1 - b0 == 1:
        for p in range(p0, p1):
            if int8:
                panel_i8_single(wp, wd, p, xq, xs, xsum, b0, b1, Y, Y)
            else:
                panel_i4_single(wp, wd, p, xq, xs, xsum, b0, b1, Y, Y)
        return
    acc = _aligned_scratch(min(b1 - b0, ROW_TILE))
    for p in range(p0, p1):
        for r0 in range(b0, b1, ROW_TILE):
            r1 = min(b1, r0 + ROW_TILE)
            if int8:
                panel_i8_rows(wp, wd, p, xq, xs, xsum, r0, r1, acc, Y)
            else:
                panel_i4_rows(wp, wd, p, xq, xs, xsum, r0, r1, acc, Y)


@njit(cache=CACHE, nogil=True)
def gemm_serial(int8, wp, wd, X, cols):
    """Y (B, panels * 16) = X (B, C) times the panel matrix (wp, wd), on the calling thread."""
    xq, xs, xsum = quantize_rows(X, cols, 2 if int8 else 1, WIDE and int8)
    Y = np.empty((X.shape[0], wp.shape[0] * PANEL), np.float32)
    _run_panels(int8, wp, wd, xq, xs, xsum, 0, wp.shape[0], 0, X.shape[0], Y)
    return Y


@njit(cache=CACHE, nogil=True, parallel=True)
def gemm_parallel(int8, wp, wd, X, cols, threads):
    """gemm_serial with the work split over Numba's threads (identical results: a row's result does not depend on
    which rows share its task). By panels; a matrix of few panels times many rows (RWKV-7's LoRA factors in a
    prompt: 96 x 2048 is 2 tasks of panels) is split by rows too, so that every `threads` thread gets work.
    (The caller passes the count: numba.get_num_threads() inside a kernel makes it uncacheable.)"""
    if X.shape[0] >= PARALLEL_QUANTIZE_ROWS:
        xq, xs, xsum = quantize_rows_parallel(X, cols, 2 if int8 else 1, WIDE and int8)
    else:
        xq, xs, xsum = quantize_rows(X, cols, 2 if int8 else 1, WIDE and int8)
    npanels, B = wp.shape[0], X.shape[0]
    Y = np.empty((B, npanels * PANEL), np.float32)
    ptasks = (npanels + PANELS_PER_TASK - 1) // PANELS_PER_TASK
    wanted = 2 * threads
    rblocks = 1
    if ptasks < wanted and B >= 2 * MIN_TASK_ROWS:
        rblocks = min(B // MIN_TASK_ROWS, (wanted + ptasks - 1) // ptasks)
    rows = (B + rblocks - 1) // rblocks
    ntasks = ptasks * rblocks
    workers = min(threads, ntasks)
    cursors = task_cursors(workers)
    for worker in prange(workers):                   # one worker per thread: its own run of tasks, then the others'
        t = claim_task(cursors, worker, ntasks, workers)
        while t >= 0:
            pt, rb = t // rblocks, t % rblocks
            b0, b1 = rb * rows, min(B, (rb + 1) * rows)
            if b0 < b1:
                _run_panels(int8, wp, wd, xq, xs, xsum, pt * PANELS_PER_TASK,
                            min(npanels, (pt + 1) * PANELS_PER_TASK), b0, b1, Y)
            t = claim_task(cursors, worker, ntasks, workers)
    return Y


@njit(cache=CACHE, nogil=True)
def task_table(npanels):
    """(tasks, 3) rows (matrix, first panel, end panel): every matrix's panels in runs of PANELS_PER_TASK."""
    return task_table_sized(npanels, np.full(npanels.shape[0], PANELS_PER_TASK, np.int64))


@njit(cache=CACHE, nogil=True)
def task_table_sized(npanels, per_task):
    """task_table with per_task[m] panels per task of matrix m: matrices whose panels differ in size get tasks of
    about the same bytes (see balanced_panels_per_task)."""
    total = 0
    for m in range(npanels.shape[0]):
        total += (npanels[m] + per_task[m] - 1) // per_task[m]
    tasks = np.empty((total, 3), np.int64)
    t = 0
    for m in range(npanels.shape[0]):
        for p0 in range(0, npanels[m], per_task[m]):
            tasks[t, 0], tasks[t, 1], tasks[t, 2] = m, p0, min(npanels[m], p0 + per_task[m])
            t += 1
    return tasks


def balanced_panels_per_task(panel_bytes):
    """Panels per task for matrices whose panels hold panel_bytes[m] bytes: PANELS_PER_TASK for the largest, more
    for smaller ones, so every task streams about as many bytes (when Numba handed each thread an equal run of tasks,
    PANELS_PER_TASK for all of RWKV-7's four LoRA up factors, panels of 96, 96, 64 and 256 columns, gave one of
    two threads 384 KB and the other 640 KB per layer; workers now take over the rest of another's run when their
    own is done, and tasks of even size still end a launch with the least waiting)."""
    largest = max(panel_bytes)
    return np.array([max(1, round(PANELS_PER_TASK * largest / b)) for b in panel_bytes], np.int64)


# Inside a parallel=True function, an array's .max() and np.zeros are parallel loops of their own: a fork and a
# join of the thread pool each, before the launch's real work. These helpers compile apart, serial.

@njit(cache=CACHE, nogil=True)
def _largest(a):
    return a.max()


@njit(cache=CACHE, nogil=True)
def _zeros(rows, cols):
    return np.zeros((rows, cols), np.float32)


@njit(cache=CACHE, nogil=True, parallel=True)
def gemv_many(int8, wps, wds, X, cols, npanels, threads):
    """Y (n, max panels * 16): row m = matrix m (wps[m], wds[m]) times X[m], for one token of n matrices of one
    width in one parallel launch (a layer's r/k/v/g projections); identical to one gemm per matrix. `threads`
    workers share out the tasks (runs of panels) as gemm_parallel's do."""
    n = X.shape[0]
    xq, xs, xsum = quantize_rows(X, cols, 2 if int8 else 1, WIDE and int8)
    tasks = task_table(npanels)
    Y = np.empty((n, _largest(npanels) * PANEL), np.float32)
    ntasks = tasks.shape[0]
    workers = min(threads, ntasks)
    cursors = task_cursors(workers)
    for worker in prange(workers):
        i = claim_task(cursors, worker, ntasks, workers)
        while i >= 0:
            m = tasks[i, 0]
            _run_panels(int8, wps[m], wds[m], xq, xs, xsum, tasks[i, 1], tasks[i, 2], m, m + 1, Y)
            i = claim_task(cursors, worker, ntasks, workers)
    return Y


# The middle step of a low-rank chain, per pair (lora_chain's `middles`)
LINEAR, TANH, SIGMOID = 0, 1, 2


@njit(cache=CACHE, nogil=True, parallel=True)
def lora_chain(down_wps, down_wds, up_wps, up_wds, X, cols, dims, middles, down_tasks, up_tasks, up_groups,
               out_cols, threads):
    """One token's low-rank products in one call: Y[m] = B_m f_m(A_m X[m]) for n pairs of int8 panel factors
    (A_m (D_m, C) = down_wps/wds[m], B_m (R, D_m) = up_wps/wds[m]), f_m = middles[m]: LINEAR, TANH or SIGMOID
    (pointwise.tanh_f32 / sigmoid_f32). The same integers and float operations as gemv_many over the A_m, the
    pointwise kernel, then each B_m's product (so the same bits), without returning to Python in between: RWKV-7's
    four LoRAs of a layer took four launches and three trips through Python (docs/performance.md).

    dims[m] = D_m; down_tasks / up_tasks: task_table of the factors' panel counts; up_groups[m]: B_m's 32-column
    groups (D_m padded); out_cols: R padded to whole panels. H rows are zero past D_m (after f_m too, as the
    padding of a separate product would be), and B_m reads only its own groups of the rounded H (a group's
    rounding does not depend on the others). `threads` workers share out each product's tasks as gemm_parallel's do."""
    n = X.shape[0]
    xq, xs, xsum = quantize_rows(X, cols, 2, WIDE)
    hcols = _largest(up_groups) * GROUP
    H = _zeros(n, hcols)
    ntasks = down_tasks.shape[0]
    workers = min(threads, ntasks)
    cursors = task_cursors(workers)
    for worker in prange(workers):
        i = claim_task(cursors, worker, ntasks, workers)
        while i >= 0:
            m = down_tasks[i, 0]
            _run_panels(True, down_wps[m], down_wds[m], xq, xs, xsum, down_tasks[i, 1], down_tasks[i, 2], m, m + 1,
                        H)
            i = claim_task(cursors, worker, ntasks, workers)
    for m in range(n):
        if middles[m] == TANH:
            for c in range(dims[m]):
                H[m, c] = tanh_f32(H[m, c])
        elif middles[m] == SIGMOID:
            for c in range(dims[m]):
                H[m, c] = sigmoid_f32(H[m, c])
    hq, hs, hsum = quantize_rows(H, hcols, 2, WIDE)
    Y = np.empty((n, out_cols), np.float32)
    ntasks = up_tasks.shape[0]
    workers = min(threads, ntasks)
    cursors = task_cursors(workers)
    for worker in prange(workers):
        i = claim_task(cursors, worker, ntasks, workers)
        while i >= 0:
            m = up_tasks[i, 0]
            g = up_groups[m]
            _run_panels(True, up_wps[m], up_wds[m], hq[:g], hs[:g], hsum[:g], up_tasks[i, 1], up_tasks[i, 2], m,
                        m + 1, Y)
            i = claim_task(cursors, worker, ntasks, workers)
    return Y
