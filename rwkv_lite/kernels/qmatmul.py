"""Kernels for stored weight matrices: decode GEMV (one token) and row dequantisation (sequence mode, embeddings).

Decoding one token reads every weight once, so a GEMV here is worth exactly as much as the bytes per second it
pulls from memory. Plain Numba loops do not get there for quantized weights (docs/performance.md): LLVM's
auto-vectoriser picks 64-bit lanes for Numba's int64-promoted integer arithmetic, keeps one accumulator chain, and
reduces horizontally once per quantization group. So the inner loops of the decode kernels are explicit LLVM
vector code: ``@intrinsic`` functions below that emit generic LLVM IR (``<64 x float>``, ``<32 x i8>``,
``llvm.fma``, ``llvm.prefetch``). Generic vector IR is portable: LLVM splits each wide vector into the registers
the CPU has (zmm on AVX-512, ymm on AVX2, NEON on ARM); no target-specific instruction is named. The Numba
functions around them stay ordinary: ``prange`` over rows, scalar tails, per-row scales.

Kernels read weights where they lie (views of the mapped file) and never build a float copy of a matrix:
  decode   ``gemv_*``            y[r] = dot(W[r], x), dequantising in registers, rows split over threads;
  sequence ``dequantize_rows_*`` a tile of rows -> a small float32 buffer that the caller hands to BLAS (numpy @).

Each output row is computed by one thread with a fixed order of operations, so results do not depend on the
thread count. Vector sums are reassociated (tree reductions): that is the only difference from a sequential
float32 loop for fp32, fp16 and per-row int8. The int4 and group-scaled int8 decode kernels also round x to 15
bits per block of 64 columns (``quantize_activations``): a relative error of about 2e-5 in y, invisible next to
4- or 8-bit weights (measured on the tiny 5v2 model: mean KL unchanged in 4 digits), for 2x the arithmetic
throughput (exact integer multiply-adds, vpmaddwd on x86). ``gemv_i4_exact`` keeps x in float32.

Storage layouts (the contract with ``rwkv_lite.quantize.schemes``; every array's first axis is the output row):
  fp16  w       float16 (R, C), used as its uint16 bits (Numba has no float16 arithmetic).
  int8  q       int8 (R, C); scale float32 (R,):                      W[r, c] = scale[r] * q[r, c]
  int8  q       int8 (R, Cp); scale float16 (R, Cp/G) (group-scaled): W[r, c] = scale[r, c // G] * q[r, c]
  int4  packed  uint8 (R, Cp/2); groups uint16 (R, Cp/G), Cp = C rounded up to a multiple of 64 and of G.
        Group g of row r covers columns g*G .. g*G+G-1; its G/2 bytes hold column g*G+i in the low nibble of byte
        i and column g*G+G/2+i in the high nibble (i < G/2): one vector load gives two contiguous runs of columns.
        Group word u: scale d = (1 + (u & 15) / 16) * 2**(((u >> 4) & 31) - 24)  (5-bit exponent, 4-bit
        mantissa: 2**-24 .. 248), zero point z = u >> 9 (0..127):     W[r, c] = d * (q - z / 8),  q = 0..15.
        Padding columns C..Cp-1 hold q = 0 and meet zeros of x.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

# The only fast-math freedoms we allow (never 'nnan'/'ninf': the engine must see NaNs).
FASTMATH = {"reassoc", "contract"}

INT4_GROUPS = (32, 64, 128)     # supported int4 group sizes
INT4_BLOCK = 64                  # columns per step of the int4 kernels (32 packed bytes)
ROW_BLOCK = 64                   # rows per prange task (amortises the int4/int8 scratch allocation)
PREFETCH_BYTES = 8192            # software prefetch distance ahead of the weight stream, into L2 (see _prefetch_ptr)
INT16_MAX = 32767

_I8, _I16, _I32, _I64 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64)
_F16, _F32 = ir.HalfType(), ir.FloatType()


# ----------------------------------------------------------------------------------------------------------------
# LLVM building blocks (used inside intrinsic code generators)

def _vec(elem, n):
    return ir.VectorType(elem, n)


def _splat_const(elem, n, value):
    return ir.Constant(_vec(elem, n), [value] * n)


def _load_vec(builder, base, index, vty):
    """Load vector type `vty` from element `index` of scalar pointer `base` (no alignment assumed)."""
    ptr = builder.gep(base, [index])
    return builder.load(builder.bitcast(ptr, vty.as_pointer()), align=1)


def _splat(builder, scalar, n):
    vty = _vec(scalar.type, n)
    one = builder.insert_element(ir.Constant(vty, ir.Undefined), scalar, ir.Constant(_I32, 0))
    return builder.shuffle_vector(one, ir.Constant(vty, ir.Undefined), ir.Constant(_vec(_I32, n), [0] * n))


def _fma(builder, a, b, c):
    """a * b + c, rounded once."""
    fnty = ir.FunctionType(a.type, [a.type] * 3)
    fn = cgutils.get_or_insert_function(builder.module, fnty, f"llvm.fma.v{a.type.count}f32")
    return builder.call(fn, [a, b, c])


def _tree_sum(builder, v):
    """Sum of a float vector's lanes by halving (log2(n) shuffles + adds)."""
    n = v.type.count
    while n > 1:
        h = n // 2
        lo = builder.shuffle_vector(v, v, ir.Constant(_vec(_I32, h), list(range(h))))
        hi = builder.shuffle_vector(v, v, ir.Constant(_vec(_I32, h), list(range(h, n))))
        v = builder.fadd(lo, hi)
        n = h
    return builder.extract_element(v, ir.Constant(_I32, 0))


def _pair_madd(builder, a, b):
    """<n x i16> a, b -> <n/2 x i32>: a[2k]*b[2k] + a[2k+1]*b[2k+1], exactly.

    Written as generic IR (widen, multiply, add even and odd lanes); LLVM's x86 back end turns the pattern into
    one vpmaddwd per register (16 multiply-adds per ymm, 32 per zmm), other targets into their widening
    multiply-adds."""
    n = a.type.count
    wide = _vec(_I32, n)
    prod = builder.mul(builder.sext(a, wide), builder.sext(b, wide))
    even = builder.shuffle_vector(prod, prod, ir.Constant(_vec(_I32, n // 2), list(range(0, n, 2))))
    odd = builder.shuffle_vector(prod, prod, ir.Constant(_vec(_I32, n // 2), list(range(1, n, 2))))
    return builder.add(even, odd)


def _prefetch_ptr(builder, ptr):
    i8p = _I8.as_pointer()
    fnty = ir.FunctionType(ir.VoidType(), [i8p, _I32, _I32, _I32])
    fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0")
    # read (0), locality 1 = into L2 only (x86 prefetcht2), data cache (1); prefetches never fault, even past the
    # array's end. Measured (2 cores, 120 distinct 2048 x 2048 int8 matrices, and whole-model decode A/B): pulling
    # the stream into L1 (locality 3, prefetcht0) at 2 KiB ahead held the two threads to 14-15 GB/s, into L2 at
    # 4-16 KiB ahead 20-24 GB/s; decode of the 1.5B / 7B shapes 93-99 / 395-412 ms -> 76-78 / 332-352 ms.
    # (An L1 prefetch occupies one of the core's few line-fill buffers until the line arrives.)
    builder.call(fn, [builder.bitcast(ptr, i8p), ir.Constant(_I32, 0), ir.Constant(_I32, 1), ir.Constant(_I32, 1)])


def _row_pointer(context, builder, aryty, ary, row):
    """Pointer to the first element of row `row` of a C-contiguous 2-D array, and the row length."""
    arr = context.make_array(aryty)(context, builder, ary)
    ncols = cgutils.unpack_tuple(builder, arr.shape)[1]
    return builder.gep(arr.data, [builder.mul(row, ncols)]), ncols


def _is_c_array(ty, dtype, ndim):
    return isinstance(ty, types.Array) and ty.dtype == dtype and ty.ndim == ndim and ty.layout == "C"


# ----------------------------------------------------------------------------------------------------------------
# Scalar helpers (usable in any njit function)

@intrinsic
def f16_to_f32(typingctx, bits):
    """float32 value of IEEE half bits (uint16). Vectorises to vcvtph2ps inside loops."""
    if bits != types.uint16:
        return None

    def codegen(context, builder, sig, args):
        return builder.fpext(builder.bitcast(args[0], _F16), _F32)
    return types.float32(bits), codegen


@intrinsic
def f32_to_f16(typingctx, value):
    """IEEE half bits (uint16) of a float32, rounded to nearest even (overflow -> inf)."""
    if value != types.float32:
        return None

    def codegen(context, builder, sig, args):
        return builder.bitcast(builder.fptrunc(args[0], _F16), ir.IntType(16))
    return types.uint16(value), codegen


@intrinsic
def _bits_to_f32(typingctx, bits):
    """The float32 whose bit pattern is the int32 `bits`."""
    if bits != types.int32:
        return None

    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], _F32)
    return types.float32(bits), codegen


ALIGN = 64        # bytes: one cache line, one zmm register


@njit(cache=True)
def _aligned_int16(n):
    """An uninitialised int16 array of n elements starting on a cache line. Activation vectors are read with
    64-byte loads in every block; from a misaligned start each of them would straddle two lines (malloc only
    promises 16 bytes)."""
    buf = np.empty(n + ALIGN // 2, np.int16)
    skip = (-buf.ctypes.data) % ALIGN // 2
    return buf[skip: skip + n]


@njit(cache=True)
def _aligned_float32(n):
    buf = np.empty(n + ALIGN // 4, np.float32)
    skip = (-buf.ctypes.data) % ALIGN // 4
    return buf[skip: skip + n]


def aligned(x: np.ndarray) -> np.ndarray:
    """x itself if it starts on a cache line, else an aligned float32 copy (see _aligned_int16)."""
    if x.ctypes.data % ALIGN == 0:
        return x
    out = _aligned_float32(x.shape[0])
    out[:] = x
    return out


# ----------------------------------------------------------------------------------------------------------------
# Row dot products: intrinsics that emit one vectorised loop over a row

DOT_BLOCK = 64     # columns per step of the fp16/int8 row loops: 4 zmm (8 ymm) accumulators hide the FMA latency


def _make_dense_row_dot(weight_dtype):
    """Intrinsic dot(W[r, :n*64], x[:n*64]) for float32, fp16-bits or int8 W and float32 x; the caller adds the
    column tail."""
    nb = DOT_BLOCK
    elt_bytes = {types.float32: 4, types.uint16: 2, types.int8: 1}[weight_dtype]

    def typer(typingctx, w, r, x, nblocks):
        if not (_is_c_array(w, weight_dtype, 2) and isinstance(x, types.Array) and x.dtype == types.float32
                and isinstance(r, types.Integer) and isinstance(nblocks, types.Integer)):
            return None

        def codegen(context, builder, sig, args):
            wty, rty, xty, nty = sig.args
            row = context.cast(builder, args[1], rty, types.intp)
            wrow, _ = _row_pointer(context, builder, wty, args[0], row)
            xptr = context.make_array(xty)(context, builder, args[2]).data
            nblk = context.cast(builder, args[3], nty, types.intp)
            acc_slot = cgutils.alloca_once_value(builder, _splat_const(_F32, nb, 0.0))
            with cgutils.for_range(builder, nblk) as loop:
                j = builder.mul(loop.index, ir.Constant(_I64, nb))
                for line in range(0, nb * elt_bytes, 64):           # one prefetch per cache line of the step
                    ahead = ir.Constant(_I64, (PREFETCH_BYTES + line) // elt_bytes)
                    _prefetch_ptr(builder, builder.gep(wrow, [builder.add(j, ahead)]))
                if weight_dtype == types.float32:
                    wf = _load_vec(builder, wrow, j, _vec(_F32, nb))
                elif weight_dtype == types.uint16:
                    raw = _load_vec(builder, wrow, j, _vec(ir.IntType(16), nb))
                    wf = builder.fpext(builder.bitcast(raw, _vec(_F16, nb)), _vec(_F32, nb))
                else:
                    wf = builder.sitofp(_load_vec(builder, wrow, j, _vec(_I8, nb)), _vec(_F32, nb))
                xv = _load_vec(builder, xptr, j, _vec(_F32, nb))
                builder.store(_fma(builder, wf, xv, builder.load(acc_slot)), acc_slot)
            return _tree_sum(builder, builder.load(acc_slot))
        return types.float32(w, r, x, nblocks), codegen
    return intrinsic(typer)


_dot_f32_row = _make_dense_row_dot(types.float32)
_dot_f16_row = _make_dense_row_dot(types.uint16)
_dot_i8_row = _make_dense_row_dot(types.int8)


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
        if not (_is_c_array(packed, types.uint8, 2) and isinstance(r, types.Integer)
                and isinstance(d, types.Array) and d.dtype == types.float32
                and isinstance(step, types.Array) and step.dtype == types.float32
                and isinstance(xb, types.Array) and xb.dtype == x_dtype):
            return None

        def codegen(context, builder, sig, args):
            pty, rty, dty, sty, xty = sig.args
            row = context.cast(builder, args[1], rty, types.intp)
            prow, nbytes = _row_pointer(context, builder, pty, args[0], row)
            dptr = context.make_array(dty)(context, builder, args[2]).data
            sptr = context.make_array(sty)(context, builder, args[3]).data
            xptr = context.make_array(xty)(context, builder, args[4]).data
            nblocks = builder.udiv(nbytes, ir.Constant(_I64, half))
            acc_slot = cgutils.alloca_once_value(builder, _splat_const(_F32, lanes, 0.0))
            with cgutils.for_range(builder, nblocks) as loop:
                k = loop.index
                b0 = builder.mul(k, ir.Constant(_I64, half))
                _prefetch_ptr(builder, builder.gep(prow, [builder.add(b0, ir.Constant(_I64, PREFETCH_BYTES))]))
                byts = _load_vec(builder, prow, b0, _vec(_I8, half))
                x0 = builder.mul(k, ir.Constant(_I64, INT4_BLOCK))
                x1 = builder.add(x0, ir.Constant(_I64, half))
                if int16_x:
                    w16 = builder.zext(byts, _vec(_I16, half))
                    low = builder.and_(w16, _splat_const(_I16, half, 15))
                    high = builder.lshr(w16, _splat_const(_I16, half, 4))
                    isum = builder.add(_pair_madd(builder, low, _load_vec(builder, xptr, x0, _vec(_I16, half))),
                                       _pair_madd(builder, high, _load_vec(builder, xptr, x1, _vec(_I16, half))))
                    part = builder.sitofp(isum, _vec(_F32, lanes))
                else:
                    vf = _vec(_F32, half)
                    low = builder.uitofp(builder.and_(byts, _splat_const(_I8, half, 15)), vf)
                    high = builder.uitofp(builder.lshr(byts, _splat_const(_I8, half, 4)), vf)
                    part = _fma(builder, high, _load_vec(builder, xptr, x1, vf),
                                builder.fmul(low, _load_vec(builder, xptr, x0, vf)))
                if group == 32:            # groups 2k (first 16 bytes) and 2k+1 (last 16)
                    pair = _load_vec(builder, dptr, builder.mul(k, ir.Constant(_I64, 2)), _vec(_F32, 2))
                    mask = ir.Constant(_vec(_I32, lanes), [0] * (lanes // 2) + [1] * (lanes // 2))
                    scales = builder.shuffle_vector(pair, pair, mask)
                else:                      # one group per block (64), or per two blocks (128)
                    g = k if group == 64 else builder.lshr(k, ir.Constant(_I64, 1))
                    scales = _splat(builder, builder.load(builder.gep(dptr, [g])), lanes)
                step_k = _splat(builder, builder.load(builder.gep(sptr, [k])), lanes)
                part = builder.fmul(part, step_k)
                builder.store(_fma(builder, part, scales, builder.load(acc_slot)), acc_slot)
            return _tree_sum(builder, builder.load(acc_slot))
        return types.float32(packed, r, d, step, xb), codegen
    return intrinsic(typer)


_dot_i4_g32 = _make_int4_row_dot(32, int16_x=True)
_dot_i4_g64 = _make_int4_row_dot(64, int16_x=True)
_dot_i4_g128 = _make_int4_row_dot(128, int16_x=True)
_dot_i4_exact_g32 = _make_int4_row_dot(32, int16_x=False)
_dot_i4_exact_g64 = _make_int4_row_dot(64, int16_x=False)
_dot_i4_exact_g128 = _make_int4_row_dot(128, int16_x=False)


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
        if not (_is_c_array(q, types.int8, 2) and _is_c_array(d, types.uint16, 2) and isinstance(r, types.Integer)
                and isinstance(x16, types.Array) and x16.dtype == types.int16):
            return None

        def codegen(context, builder, sig, args):
            qty, rty, dty, sty, xty = sig.args
            qrow, ncols = _row_pointer(context, builder, qty, args[0], context.cast(builder, args[1], rty, types.intp))
            row = context.cast(builder, args[1], rty, types.intp)
            dptr, _ = _row_pointer(context, builder, dty, args[2], row)

            def scales_at(index, n):          # n fp16 scales from element `index` of the row, as float32
                bits = _load_vec(builder, dptr, index, _vec(_I16, n))
                return builder.fpext(builder.bitcast(bits, _vec(_F16, n)), _vec(_F32, n))
            sptr = context.make_array(sty)(context, builder, args[3]).data
            xptr = context.make_array(xty)(context, builder, args[4]).data
            acc_slot = cgutils.alloca_once_value(builder, _splat_const(_F32, lanes, 0.0))

            def lanes_of(v, idx):
                return builder.shuffle_vector(v, v, ir.Constant(_vec(_I32, len(idx)), idx))

            with cgutils.for_range(builder, builder.udiv(ncols, ir.Constant(_I64, nb))) as loop:
                k = loop.index
                c0 = builder.mul(k, ir.Constant(_I64, nb))
                _prefetch_ptr(builder, builder.gep(qrow, [builder.add(c0, ir.Constant(_I64, PREFETCH_BYTES))]))
                w16 = builder.sext(_load_vec(builder, qrow, c0, _vec(_I8, nb)), _vec(_I16, nb))
                isum = _pair_madd(builder, w16, _load_vec(builder, xptr, c0, _vec(_I16, nb)))   # 32 x i32
                # lanes 0-15 hold columns 0-31 of the block, lanes 16-31 columns 32-63
                first = builder.add(lanes_of(isum, list(range(0, 8))), lanes_of(isum, list(range(8, 16))))
                second = builder.add(lanes_of(isum, list(range(16, 24))), lanes_of(isum, list(range(24, 32))))
                step_k = builder.load(builder.gep(sptr, [k]))
                if group == 32:                 # two groups: 8 lanes each
                    ints = builder.shuffle_vector(first, second, ir.Constant(_vec(_I32, 16), list(range(16))))
                    pair = builder.fmul(scales_at(builder.mul(k, ir.Constant(_I64, 2)), 2), _splat(builder, step_k, 2))
                    scales = lanes_of(pair, [0] * 8 + [1] * 8)
                else:                           # one group spans the block
                    ints = builder.add(first, second)
                    g = k if group == 64 else builder.lshr(k, ir.Constant(_I64, 1))
                    d_g = builder.extract_element(scales_at(g, 1), ir.Constant(_I32, 0))
                    scales = _splat(builder, builder.fmul(d_g, step_k), lanes)
                part = builder.sitofp(ints, _vec(_F32, lanes))
                builder.store(_fma(builder, part, scales, builder.load(acc_slot)), acc_slot)
            return _tree_sum(builder, builder.load(acc_slot))
        return types.float32(q, r, d, step, x16), codegen
    return intrinsic(typer)


_dot_i8g_g32 = _make_int8_group_row_dot(32)
_dot_i8g_g64 = _make_int8_group_row_dot(64)
_dot_i8g_g128 = _make_int8_group_row_dot(128)


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
        acc = _dot_f32_row(w, r, x, nblk)
        for c in range(nblk * DOT_BLOCK, w.shape[1]):
            acc += w[r, c] * x[c]
        y[r] = acc


@njit(cache=True, fastmath=FASTMATH)
def _gemv_f16_rows(w, x, y, r0, r1):
    nblk = w.shape[1] // DOT_BLOCK
    for r in range(r0, r1):
        acc = _dot_f16_row(w, r, x, nblk)
        for c in range(nblk * DOT_BLOCK, w.shape[1]):
            acc += f16_to_f32(w[r, c]) * x[c]
        y[r] = acc


@njit(cache=True, fastmath=FASTMATH)
def _gemv_i8_rows(q, scale, x, y, r0, r1):
    nblk = q.shape[1] // DOT_BLOCK
    for r in range(r0, r1):
        acc = _dot_i8_row(q, r, x, nblk)
        for c in range(nblk * DOT_BLOCK, q.shape[1]):
            acc += np.float32(q[r, c]) * x[c]
        y[r] = acc * scale[r]


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


# ----------------------------------------------------------------------------------------------------------------
# int4: group words, block order of x, activations

@njit(cache=True)
def int4_scale(word):
    """Scale d of an int4 group word (see the module docstring): (1 + m/16) * 2**(e - 24), exactly."""
    u = np.int32(word)
    return _bits_to_f32(np.int32((((u >> 4) & 31) + 103) << 23 | (u & 15) << 19))


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
def quantize_activations(x, src, group):
    """x float32 (Cp,) -> (x16 int16 (Cp,) in block order, step float32 (Cp/64,), xsum float32 (Cp/group,)).

    Block k of x16 holds round(xb / step[k]) with xb = x[src] and step[k] = max|xb in block k| / 32767, so
    |xb - step * x16| <= step / 2: 15 bits relative to the block's largest value. xsum[g] is the exact sum of x
    over group g (it meets the zero points). A block holding NaN or Inf gets step NaN, so every output that uses
    it is NaN rather than silently finite."""
    cols = x.shape[0]
    nblocks = cols // INT4_BLOCK
    xb = np.empty(cols, np.float32)
    for j in range(cols):
        xb[j] = x[src[j]]
    x16 = _aligned_int16(cols)
    step = np.empty(nblocks, np.float32)
    bits = xb.view(np.int32)
    for k in range(nblocks):
        c0, c1 = k * INT4_BLOCK, (k + 1) * INT4_BLOCK
        # max |x| through the bit patterns: for |x| they order like the values, NaN above Inf; an integer max
        # vectorises, a float max that must respect NaN does not
        top = 0
        for c in range(c0, c1):
            top = max(top, bits[c] & 0x7FFFFFFF)
        if top >= 0x7F800000 or top == 0:                  # NaN/Inf in the block, or all zeros
            step[k] = np.nan if top else np.float32(0.0)
            x16[c0:c1] = 0
        else:
            amax = _bits_to_f32(np.int32(top))
            step[k] = amax / np.float32(INT16_MAX)
            inv = np.float32(INT16_MAX) / amax
            for c in range(c0, c1):
                x16[c] = np.int16(np.rint(xb[c] * inv))
    ngroups = cols // group
    xsum = np.zeros(ngroups, np.float32)
    for g in range(ngroups):
        total = np.float32(0.0)
        for c in range(g * group, (g + 1) * group):
            total += x[c]
        xsum[g] = total
    return x16, step, xsum


@njit(cache=True, fastmath=FASTMATH)
def _int4_row_scales(groups, r, xsum, d):
    """Decode row r's group words into their scales d (float32, one per group) and return the row's zero-point
    term  -sum_g d_g z_g xsum_g  (the part of W x that the zero points contribute)."""
    zero_term = np.float32(0.0)
    for g in range(groups.shape[1]):
        u = np.int32(groups[r, g])
        # the float32 bit pattern of (1 + m/16) * 2**(e - 24): exponent field e + 103, mantissa m << 19
        dg = _bits_to_f32(np.int32((((u >> 4) & 31) + 103) << 23 | (u & 15) << 19))
        d[g] = dg
        zero_term -= dg * np.float32(u >> 9) * np.float32(0.125) * xsum[g]
    return zero_term


@njit(cache=True, fastmath=FASTMATH)
def _gemv_i4_rows(packed, groups, group, x16, step, xsum, y, r0, r1):
    d = np.empty(groups.shape[1], np.float32)          # the current row's group scales
    if group == 32:
        for r in range(r0, r1):
            zero_term = _int4_row_scales(groups, r, xsum, d)
            y[r] = _dot_i4_g32(packed, r, d, step, x16) + zero_term
    elif group == 64:
        for r in range(r0, r1):
            zero_term = _int4_row_scales(groups, r, xsum, d)
            y[r] = _dot_i4_g64(packed, r, d, step, x16) + zero_term
    else:
        for r in range(r0, r1):
            zero_term = _int4_row_scales(groups, r, xsum, d)
            y[r] = _dot_i4_g128(packed, r, d, step, x16) + zero_term


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
    xb = _aligned_float32(cols)
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


@njit(cache=True, fastmath=FASTMATH)
def _gemv_i8g_rows(q, scale, group, x16, step, y, r0, r1):
    for r in range(r0, r1):
        if group == 32:
            y[r] = _dot_i8g_g32(q, r, scale, step, x16)
        elif group == 64:
            y[r] = _dot_i8g_g64(q, r, scale, step, x16)
        else:
            y[r] = _dot_i8g_g128(q, r, scale, step, x16)


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


# ----------------------------------------------------------------------------------------------------------------
# Several GEMVs in one parallel launch: y_m = W_m x_m for matrices of one scheme, group and width (RWKV's receptance,
# key, value and gate projections of a token, or the channel mix's key and receptance). One launch instead of four
# saves the pool's wake-up and join and the slowest thread's tail per matrix: measured ~20-30 us per 2048 x 2048
# GEMV on 2 cores, where the GEMV itself takes ~200 us.

@njit(cache=True)
def _stack_activations(X, src, group):
    """quantize_activations for every row of X (n, Cp): (X16 (n, Cp), STEP (n, Cp/64), XSUM (n, Cp/group))."""
    n, cols = X.shape
    X16 = _aligned_int16(n * cols).reshape(n, cols)
    STEP = np.empty((n, cols // INT4_BLOCK), np.float32)
    XSUM = np.empty((n, cols // group), np.float32)
    for m in range(n):
        x16, step, xsum = quantize_activations(X[m], src, group)
        X16[m, :] = x16
        STEP[m, :] = step
        XSUM[m, :] = xsum
    return X16, STEP, XSUM


@njit(cache=True)
def _block_table(rows):
    """Row blocks of every matrix, flattened: (matrix index, first row, end row, offset of its output)."""
    n = len(rows)
    total = 0
    for m in range(n):
        total += (rows[m] + ROW_BLOCK - 1) // ROW_BLOCK
    table = np.empty((total, 3), np.int64)
    offsets = np.empty(n + 1, np.int64)
    offsets[0] = 0
    b = 0
    for m in range(n):
        offsets[m + 1] = offsets[m] + rows[m]
        for r0 in range(0, rows[m], ROW_BLOCK):
            table[b, 0], table[b, 1], table[b, 2] = m, r0, min(rows[m], r0 + ROW_BLOCK)
            b += 1
    return table, offsets


@njit(cache=True, parallel=True)
def gemv_i8g_many(qs, scales, X, src, group, rows):
    """Group-scaled int8 GEMVs: qs, scales tuples of n matrices (as gemv_i8g), X float32 (n, Cp) -> y float32
    (sum of rows), y[offsets[m]:offsets[m+1]] = W_m X[m]."""
    X16, STEP, _ = _stack_activations(X, src, group)
    table, offsets = _block_table(rows)
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


@njit(cache=True, parallel=True)
def gemv_i4_many(packeds, groupss, X, src, group, rows):
    """int4 GEMVs of n matrices in one launch (as gemv_i4 each); output laid out as in gemv_i8g_many."""
    X16, STEP, XSUM = _stack_activations(X, src, group)
    table, offsets = _block_table(rows)
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


def _make_int4_row_dequant(group):
    """Intrinsic: write row r of an int4 matrix, dequantised, into row i of out (float32, Cp columns).

    Per 64-column block: the 32 bytes' low and high nibbles widen to float and become d * q - d * z with their
    groups' d and d * z (arrays filled by _int4_row_decode); the two runs are put back in column order with one
    shuffle (G = 32, 64) or stored as two runs of 32 (G = 128)."""
    half = INT4_BLOCK // 2

    def typer(typingctx, packed, r, d, dz, out, i):
        if not (_is_c_array(packed, types.uint8, 2) and _is_c_array(out, types.float32, 2)
                and isinstance(r, types.Integer) and isinstance(i, types.Integer)):
            return None

        def codegen(context, builder, sig, args):
            pty, rty, dty, zty, oty, ity = sig.args
            prow, nbytes = _row_pointer(context, builder, pty, args[0],
                                        context.cast(builder, args[1], rty, types.intp))
            dptr = context.make_array(dty)(context, builder, args[2]).data
            zptr = context.make_array(zty)(context, builder, args[3]).data
            orow, _ = _row_pointer(context, builder, oty, args[4], context.cast(builder, args[5], ity, types.intp))
            vf = _vec(_F32, half)

            def group_vector(ptr, k):
                if group == 32:            # lanes 0-15: group 2k, lanes 16-31: group 2k+1
                    pair = _load_vec(builder, ptr, builder.mul(k, ir.Constant(_I64, 2)), _vec(_F32, 2))
                    return builder.shuffle_vector(pair, pair, ir.Constant(_vec(_I32, half), [0] * 16 + [1] * 16))
                g = k if group == 64 else builder.lshr(k, ir.Constant(_I64, 1))
                return _splat(builder, builder.load(builder.gep(ptr, [g])), half)

            def store(vec, col):
                ptr = builder.bitcast(builder.gep(orow, [col]), vec.type.as_pointer())
                builder.store(vec, ptr, align=4)

            with cgutils.for_range(builder, builder.udiv(nbytes, ir.Constant(_I64, half))) as loop:
                k = loop.index
                byts = _load_vec(builder, prow, builder.mul(k, ir.Constant(_I64, half)), _vec(_I8, half))
                d_vec, dz_vec = group_vector(dptr, k), group_vector(zptr, k)
                low = _fma(builder, builder.uitofp(builder.and_(byts, _splat_const(_I8, half, 15)), vf), d_vec,
                           builder.fneg(dz_vec))
                high = _fma(builder, builder.uitofp(builder.lshr(byts, _splat_const(_I8, half, 4)), vf), d_vec,
                            builder.fneg(dz_vec))
                col = builder.mul(k, ir.Constant(_I64, INT4_BLOCK))
                if group == 128:           # block k holds columns 32(k&1) + [0, 32) and 64 + 32(k&1) + [0, 32)
                    col = builder.add(builder.mul(builder.lshr(k, ir.Constant(_I64, 1)), ir.Constant(_I64, 128)),
                                      builder.mul(builder.and_(k, ir.Constant(_I64, 1)), ir.Constant(_I64, 32)))
                    store(low, col)
                    store(high, builder.add(col, ir.Constant(_I64, 64)))
                else:
                    order = (list(range(0, 16)) + list(range(32, 48)) + list(range(16, 32)) + list(range(48, 64))
                             if group == 32 else list(range(64)))
                    store(builder.shuffle_vector(low, high, ir.Constant(_vec(_I32, 64), order)), col)
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
