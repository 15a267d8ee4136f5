"""Shared building blocks of the matrix kernels: LLVM vector IR, scalar intrinsics, aligned buffers, activations.

Decoding one token reads every weight once, so a GEMV is worth exactly as much as the bytes per second it pulls
from memory. Plain Numba loops do not get there for quantized weights (docs/performance.md): LLVM's auto-vectoriser
picks 64-bit lanes for Numba's int64-promoted integer arithmetic, keeps one accumulator chain, and reduces
horizontally once per quantization group. So the inner loops of the decode kernels are explicit LLVM vector code:
``@intrinsic`` functions whose code generators use the helpers below to emit generic LLVM IR (``<64 x float>``,
``<32 x i8>``, ``llvm.fma``, ``llvm.prefetch``). Generic vector IR is portable: LLVM splits each wide vector into
the registers the CPU has (zmm on AVX-512, ymm on AVX2, NEON on ARM); no target-specific instruction is named. The
Numba functions around them stay ordinary: ``prange`` over rows, scalar tails, per-row scales.

The per-scheme kernels live beside this module: fp_kernels.py (fp32, fp16), int8_kernels.py (one scale per row
and group-scaled), int4_kernels.py, all for row-major layouts; kernels/batched.py reuses their row dots for
several sequences at once. panel.py holds the integer kernels of the panel layout that int8/int4 files are
written in today (one family for tokens, batches and prompts; it names x86 instructions where generic IR does not
reach them, with a generic fallback). The
storage layouts they read are documented once, in the scheme modules (rwkv_lite/schemes/).

Kernels read weights where they lie (views of the mapped file) and never build a float copy of a matrix:
  decode   ``gemv_*``            y[r] = dot(W[r], x), dequantising in registers, rows split over threads;
  sequence ``dequantize_rows_*`` a tile of rows -> a small float32 buffer that the caller hands to BLAS (numpy @).

Each output row is computed by one thread with a fixed order of operations, so results do not depend on the
thread count. Vector sums are reassociated (tree reductions): that is the only difference from a sequential
float32 loop for fp32, fp16 and per-row int8. The int4 and group-scaled int8 decode kernels also round x to 15
bits per block of 64 columns (``quantize_activations``): a relative error of about 2e-5 in y, invisible next to
4- or 8-bit weights (measured on the tiny 5v2 model: mean KL unchanged in 4 digits), for 2x the arithmetic
throughput (exact integer multiply-adds, vpmaddwd on x86). ``int4_kernels.gemv_i4_exact`` keeps x in float32.

Kernels raise nothing format-related: a bad array reaching them is a programming error (Numba's typing refuses
it); validating a file's arrays is the scheme layer's job.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

# The only fast-math freedoms we allow (never 'nnan'/'ninf': the engine must see NaNs).
FASTMATH = {"reassoc", "contract"}

INT4_GROUPS = (32, 64, 128)     # supported int4 group sizes
INT4_BLOCK = 64                  # columns per step of the int4 kernels (32 packed bytes)
ROW_BLOCK = 64                   # rows per prange task (amortises the int4/int8 scratch allocation)
PREFETCH_BYTES = 8192            # software prefetch distance ahead of the weight stream, into L2 (see prefetch_ptr)
INT16_MAX = 32767

I8, I16, I32, I64 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64)
F16, F32 = ir.HalfType(), ir.FloatType()


# ----------------------------------------------------------------------------------------------------------------
# LLVM building blocks (used inside intrinsic code generators)

def vec(elem, n):
    return ir.VectorType(elem, n)


def splat_const(elem, n, value):
    return ir.Constant(vec(elem, n), [value] * n)


def load_vec(builder, base, index, vty):
    """Load vector type `vty` from element `index` of scalar pointer `base` (no alignment assumed)."""
    ptr = builder.gep(base, [index])
    return builder.load(builder.bitcast(ptr, vty.as_pointer()), align=1)


def splat(builder, scalar, n):
    vty = vec(scalar.type, n)
    one = builder.insert_element(ir.Constant(vty, ir.Undefined), scalar, ir.Constant(I32, 0))
    return builder.shuffle_vector(one, ir.Constant(vty, ir.Undefined), ir.Constant(vec(I32, n), [0] * n))


def fma(builder, a, b, c):
    """a * b + c, rounded once."""
    fnty = ir.FunctionType(a.type, [a.type] * 3)
    fn = cgutils.get_or_insert_function(builder.module, fnty, f"llvm.fma.v{a.type.count}f32")
    return builder.call(fn, [a, b, c])


def tree_sum(builder, v):
    """Sum of a float vector's lanes by halving (log2(n) shuffles + adds)."""
    n = v.type.count
    while n > 1:
        h = n // 2
        lo = builder.shuffle_vector(v, v, ir.Constant(vec(I32, h), list(range(h))))
        hi = builder.shuffle_vector(v, v, ir.Constant(vec(I32, h), list(range(h, n))))
        v = builder.fadd(lo, hi)
        n = h
    return builder.extract_element(v, ir.Constant(I32, 0))


def pair_madd(builder, a, b):
    """<n x i16> a, b -> <n/2 x i32>: a[2k]*b[2k] + a[2k+1]*b[2k+1], exactly.

    Written as generic IR (widen, multiply, add even and odd lanes); LLVM's x86 back end turns the pattern into
    one vpmaddwd per register (16 multiply-adds per ymm, 32 per zmm), other targets into their widening
    multiply-adds."""
    n = a.type.count
    wide = vec(I32, n)
    prod = builder.mul(builder.sext(a, wide), builder.sext(b, wide))
    even = builder.shuffle_vector(prod, prod, ir.Constant(vec(I32, n // 2), list(range(0, n, 2))))
    odd = builder.shuffle_vector(prod, prod, ir.Constant(vec(I32, n // 2), list(range(1, n, 2))))
    return builder.add(even, odd)


def prefetch_ptr(builder, ptr):
    i8p = I8.as_pointer()
    fnty = ir.FunctionType(ir.VoidType(), [i8p, I32, I32, I32])
    fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0")
    # read (0), locality 1 = into L2 only (x86 prefetcht2), data cache (1); prefetches never fault, even past the
    # array's end. Measured (2 cores, 120 distinct 2048 x 2048 int8 matrices, and whole-model decode A/B): pulling
    # the stream into L1 (locality 3, prefetcht0) at 2 KiB ahead held the two threads to 14-15 GB/s, into L2 at
    # 4-16 KiB ahead 20-24 GB/s; decode of the 1.5B / 7B shapes 93-99 / 395-412 ms -> 76-78 / 332-352 ms.
    # (An L1 prefetch occupies one of the core's few line-fill buffers until the line arrives.)
    builder.call(fn, [builder.bitcast(ptr, i8p), ir.Constant(I32, 0), ir.Constant(I32, 1), ir.Constant(I32, 1)])


def row_pointer(context, builder, aryty, ary, row):
    """Pointer to the first element of row `row` of a C-contiguous 2-D array, and the row length."""
    arr = context.make_array(aryty)(context, builder, ary)
    ncols = cgutils.unpack_tuple(builder, arr.shape)[1]
    return builder.gep(arr.data, [builder.mul(row, ncols)]), ncols


def is_c_array(ty, dtype, ndim):
    return isinstance(ty, types.Array) and ty.dtype == dtype and ty.ndim == ndim and ty.layout == "C"


# ----------------------------------------------------------------------------------------------------------------
# Scalar helpers (usable in any njit function)

@intrinsic
def f16_to_f32(typingctx, bits):
    """float32 value of IEEE half bits (uint16). Vectorises to vcvtph2ps inside loops."""
    if bits != types.uint16:
        return None

    def codegen(context, builder, sig, args):
        return builder.fpext(builder.bitcast(args[0], F16), F32)
    return types.float32(bits), codegen


@intrinsic
def f32_to_f16(typingctx, value):
    """IEEE half bits (uint16) of a float32, rounded to nearest even (overflow -> inf)."""
    if value != types.float32:
        return None

    def codegen(context, builder, sig, args):
        return builder.bitcast(builder.fptrunc(args[0], F16), ir.IntType(16))
    return types.uint16(value), codegen


@intrinsic
def bits_to_f32(typingctx, bits):
    """The float32 whose bit pattern is the int32 `bits`."""
    if bits != types.int32:
        return None

    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], F32)
    return types.float32(bits), codegen


@intrinsic
def f32_pointer(typingctx, address):
    """The int64 `address` as a float32 pointer, for numba.carray: lets one kernel launch update arrays that live
    in separate objects (each batched sequence's own state; see row_addresses in arch/batch.py). The caller keeps
    the arrays alive and guarantees their shape."""
    if address != types.int64:
        return None

    def codegen(context, builder, sig, args):
        return builder.inttoptr(args[0], context.get_value_type(sig.return_type))
    return types.CPointer(types.float32)(address), codegen


@intrinsic
def fetch_add(typingctx, counters, index, value):
    """Atomically add `value` to counters[index] (an int64 array) and return what it held before. 'monotonic'
    ordering: see claim_task."""
    if not (isinstance(counters, types.Array) and counters.dtype == types.int64 and counters.ndim == 1
            and isinstance(index, types.Integer) and value == types.int64):
        return None

    def codegen(context, builder, sig, args):
        ary = context.make_array(sig.args[0])(context, builder, args[0])
        ptr = cgutils.get_item_pointer(context, builder, sig.args[0], ary, [args[1]])
        return builder.atomic_rmw("add", ptr, args[2], "monotonic")
    return types.int64(counters, index, value), codegen


CURSOR_STRIDE = 8       # int64s between two runs' cursors: one cache line each, so workers do not contend


@njit(cache=True, nogil=True)
def task_cursors(workers):
    """The cursors of a parallel launch's `workers` runs of tasks, for claim_task. Allocated outside the parallel
    function on purpose: there Numba's parfor passes would treat np.zeros as a loop of their own, and they do not
    see the atomic updates."""
    return np.zeros(workers * CURSOR_STRIDE, np.int64)


@njit(cache=True, nogil=True)
def claim_task(cursors, worker, tasks, workers):
    """The next task (0..tasks-1) for `worker`, or -1 when none is left. The tasks are cut into `workers` runs of
    consecutive tasks, as Numba's own schedule cuts a loop; each worker takes its own run's tasks in order, then
    what is left of the other runs, one task at a time.

    Why not Numba's schedule: it gives each thread its run and nothing else, so every launch waits for its
    slowest thread. A core that runs slower (an efficiency core of a laptop's hybrid CPU, a virtual CPU whose
    physical core is busy with other work) then holds up all the others; here the others take over the rest of
    its run. Why runs rather than one shared counter: a worker that walks consecutive tasks streams its weights
    in one pass, and its prefetches ahead land in its own next task (handing out tasks in turn made int4 decode
    steps 15% slower on 2 cores). Each task writes its own outputs, so results do not depend on which worker ran
    it. 'monotonic' ordering is enough: the tasks' inputs were written before the parallel region began, and its
    end joins the threads."""
    per = (tasks + workers - 1) // workers
    for j in range(workers):
        run = (worker + j) % workers
        t = fetch_add(cursors, run * CURSOR_STRIDE, np.int64(1))
        if t < per and run * per + t < tasks:
            return run * per + t
    return -1


ALIGN = 64        # bytes: one cache line, one zmm register


@njit(cache=True)
def aligned_int16(n):
    """An uninitialised int16 array of n elements starting on a cache line. Activation vectors are read with
    64-byte loads in every block; from a misaligned start each of them would straddle two lines (malloc only
    promises 16 bytes)."""
    buf = np.empty(n + ALIGN // 2, np.int16)
    skip = (-buf.ctypes.data) % ALIGN // 2
    return buf[skip: skip + n]


@njit(cache=True)
def aligned_float32(n):
    buf = np.empty(n + ALIGN // 4, np.float32)
    skip = (-buf.ctypes.data) % ALIGN // 4
    return buf[skip: skip + n]


def aligned(x: np.ndarray) -> np.ndarray:
    """x itself if it starts on a cache line, else an aligned float32 copy (see aligned_int16)."""
    if x.ctypes.data % ALIGN == 0:
        return x
    out = aligned_float32(x.shape[0])
    out[:] = x
    return out


# ----------------------------------------------------------------------------------------------------------------
# Row dot products: intrinsics that emit one vectorised loop over a row

DOT_BLOCK = 64     # columns per step of the fp16/int8 row loops: 4 zmm (8 ymm) accumulators hide the FMA latency


def make_dense_row_dot(weight_dtype):
    """Intrinsic dot(W[r, :n*64], x[:n*64]) for float32, fp16-bits or int8 W and float32 x; the caller adds the
    column tail."""
    nb = DOT_BLOCK
    elt_bytes = {types.float32: 4, types.uint16: 2, types.int8: 1}[weight_dtype]

    def typer(typingctx, w, r, x, nblocks):
        if not (is_c_array(w, weight_dtype, 2) and isinstance(x, types.Array) and x.dtype == types.float32
                and isinstance(r, types.Integer) and isinstance(nblocks, types.Integer)):
            return None

        def codegen(context, builder, sig, args):
            wty, rty, xty, nty = sig.args
            row = context.cast(builder, args[1], rty, types.intp)
            wrow, _ = row_pointer(context, builder, wty, args[0], row)
            xptr = context.make_array(xty)(context, builder, args[2]).data
            nblk = context.cast(builder, args[3], nty, types.intp)
            acc_slot = cgutils.alloca_once_value(builder, splat_const(F32, nb, 0.0))
            with cgutils.for_range(builder, nblk) as loop:
                j = builder.mul(loop.index, ir.Constant(I64, nb))
                for line in range(0, nb * elt_bytes, 64):           # one prefetch per cache line of the step
                    ahead = ir.Constant(I64, (PREFETCH_BYTES + line) // elt_bytes)
                    prefetch_ptr(builder, builder.gep(wrow, [builder.add(j, ahead)]))
                if weight_dtype == types.float32:
                    wf = load_vec(builder, wrow, j, vec(F32, nb))
                elif weight_dtype == types.uint16:
                    raw = load_vec(builder, wrow, j, vec(ir.IntType(16), nb))
                    wf = builder.fpext(builder.bitcast(raw, vec(F16, nb)), vec(F32, nb))
                else:
                    wf = builder.sitofp(load_vec(builder, wrow, j, vec(I8, nb)), vec(F32, nb))
                xv = load_vec(builder, xptr, j, vec(F32, nb))
                builder.store(fma(builder, wf, xv, builder.load(acc_slot)), acc_slot)
            return tree_sum(builder, builder.load(acc_slot))
        return types.float32(w, r, x, nblocks), codegen
    return intrinsic(typer)




# ----------------------------------------------------------------------------------------------------------------
# Activations for the integer-input kernels (int4, group-scaled int8)

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
    x16 = aligned_int16(cols)
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
            amax = bits_to_f32(np.int32(top))
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


# ----------------------------------------------------------------------------------------------------------------
# Several GEMVs in one parallel launch: y_m = W_m x_m for matrices of one scheme, group and width (RWKV's receptance,
# key, value and gate projections of a token, or the channel mix's key and receptance). One launch instead of four
# saves the pool's wake-up and join and the slowest thread's tail per matrix: measured ~20-30 us per 2048 x 2048
# GEMV on 2 cores, where the GEMV itself takes ~200 us.

@njit(cache=True)
def stack_activations(X, src, group):
    """quantize_activations for every row of X (n, Cp): (X16 (n, Cp), STEP (n, Cp/64), XSUM (n, Cp/group))."""
    n, cols = X.shape
    X16 = aligned_int16(n * cols).reshape(n, cols)
    STEP = np.empty((n, cols // INT4_BLOCK), np.float32)
    XSUM = np.empty((n, cols // group), np.float32)
    for m in range(n):
        x16, step, xsum = quantize_activations(X[m], src, group)
        X16[m, :] = x16
        STEP[m, :] = step
        XSUM[m, :] = xsum
    return X16, STEP, XSUM


@njit(cache=True)
def block_table(rows):
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
