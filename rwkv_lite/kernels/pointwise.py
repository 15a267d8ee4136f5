"""Row-wise and element-wise float32 kernels of the forward pass (norms, token-shift mixes, activations).

Why Numba for 4096-wide vectors: in decode each of these is one short pass over a row, and written as NumPy
expressions they cost a handful of temporaries and several microseconds of interpreter dispatch each. Eagle 7B
runs ~70 such NumPy operations per layer (32 layers per token): measured ~15 ms of a ~300 ms token, a third of
the distance to the memory-bandwidth floor. One compiled call per operation brings that to a few milliseconds.

All functions take (T, C) float32 rows and return new float32 arrays; they compute what the NumPy expression in
each docstring computes. Reductions accumulate in float64 (at least as accurate as NumPy's pairwise float32 sums).
Several rows (a prompt's tokens, a batched step's sequences) are split over Numba's threads when they are worth it
(PARALLEL_MIN_NS); a single decode row runs in the calling thread. Exponentials go through exp_f32, which LLVM
vectorises (the C library's expf runs one element at a time), and the kernels use NumPy's error model (a float
division by zero gives inf, as in NumPy): Numba's default checks every division for zero to raise
ZeroDivisionError, and that branch alone stops a loop from being vectorised (measured: sigmoid 17x slower).
"""
from __future__ import annotations

import math

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from .simd import bits_to_f32

# A kernel splits its rows (a prompt's tokens, a batched step's sequences) over Numba's threads when one core
# would spend at least this long on them: below it the pool's wake-up costs more than it saves. Each kernel
# states its cost per element (ns, serial, measured on a Zen 4 core; the split only needs the order of magnitude).
# A row is computed by the same code either way (a `_*_row` function that both drivers call), so its result
# does not depend on the row count or on the thread count. Each kernel spells out its own small pair of drivers:
# one generic driver taking the row function as an argument would be compiled anew in every process (Numba
# does not reuse its cache for functions passed as arguments; measured).
PARALLEL_MIN_NS = 12_000


@njit(inline="always", error_model="numpy")
def exp_f32(x):
    """exp of a float32, within 1 ulp of the C library's expf (which Numba calls one element at a time: ~2 ns
    each, and every activation here spends most of its time in it). Written so that LLVM vectorises it: x =
    n ln2 + r with |r| <= ln2 / 2 (ln2 in two parts, Cody-Waite), exp(r) by the degree-7 polynomial of Cephes'
    expf, times 2^n built from its bits. Below ln(smallest normal float) the result is 0 (expf would give a
    subnormal); above ln(largest float), inf; NaN stays NaN."""
    xc = min(max(x, EXP_MIN), EXP_MAX)
    n = np.floor(xc * np.float32(1.44269504088896341) + np.float32(0.5))
    r = xc - n * np.float32(0.693359375)
    r = r - n * np.float32(-2.12194440e-4)
    p = np.float32(1.9875691500e-4)
    p = p * r + np.float32(1.3981999507e-3)
    p = p * r + np.float32(8.3334519073e-3)
    p = p * r + np.float32(4.1665795894e-2)
    p = p * r + np.float32(1.6666665459e-1)
    p = p * r + np.float32(5.0000001201e-1)
    p = p * r * r + r + np.float32(1.0)
    k = np.int32(n)
    y = p * bits_to_f32(np.int32((min(k, np.int32(127)) + np.int32(127)) << np.int32(23)))
    if k > 127:                   # exp(x) for x in (ln 2^127.5, EXP_MAX]: 2^128 has no float32 exponent
        y = y * np.float32(2.0)
    if x < EXP_MIN:
        y = np.float32(0.0)
    if x > EXP_MAX:
        y = np.float32(np.inf)
    if x != x:                    # noqa: PLR0124 (NaN)
        y = x
    return y


EXP_MIN, EXP_MAX = np.float32(-87.33654), np.float32(88.72284)     # ln of the smallest normal, largest float32


def _by_rows(serial, parallel, ns_per_element, x, *args):
    """Run the serial or the parallel driver of a row kernel by the work in x (see PARALLEL_MIN_NS)."""
    return (parallel if x.size * ns_per_element >= PARALLEL_MIN_NS else serial)(x, *args)


# The norms' sums run in float64 as eight interleaved partial sums added pairwise: eight independent add chains
# instead of one serial chain, in an order this code fixes (not the compiler), so every caller gets the same bits.
# Lane j of one <8 x double> accumulator holds partial sum j (elements c0 + j, c0 + 8 + j, ...; the last n % 8
# elements go to partial 0, then ((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7))). Written as vector IR because
# LLVM kept the eight scalar chains of the plain loop scalar (a 2048-wide LayerNorm took ~8 us, ~0.4 ms a token
# of the 1.5B shape); the same operations in the same order, so the same bits.

def _row_sum_codegen(squares):
    """Code generator of _sum (x, t, c0, n) / _squares (x, t, c0, n, mean): sum of x[t, c0:c0 + n] (squares: of
    (x - mean) ** 2) in float64, x a C-contiguous float32 (T, C) array."""
    F64, I32 = ir.DoubleType(), ir.IntType(32)

    def codegen(context, builder, sig, args):
        arr = context.make_array(sig.args[0])(context, builder, args[0])
        t, c0, n = (context.cast(builder, args[i], sig.args[i], types.intp) for i in (1, 2, 3))
        ncols = cgutils.unpack_tuple(builder, arr.shape)[1]
        row = builder.gep(arr.data, [builder.add(builder.mul(t, ncols), c0)])
        vty = ir.VectorType(F64, 8)
        acc = cgutils.alloca_once_value(builder, ir.Constant(vty, [0.0] * 8))
        eight = ir.Constant(n.type, 8)
        blocks = builder.udiv(n, eight)
        if squares:
            one = builder.insert_element(ir.Constant(vty, ir.Undefined), args[4], ir.Constant(I32, 0))
            means = builder.shuffle_vector(one, ir.Constant(vty, ir.Undefined), ir.Constant(ir.VectorType(I32, 8),
                                                                                              [0] * 8))

        def term(wide, mean):                  # x, or (x - mean) ** 2, in float64
            if not squares:
                return wide
            d = builder.fsub(wide, mean)
            return builder.fmul(d, d)
        with cgutils.for_range(builder, blocks) as loop:
            ptr = builder.gep(row, [builder.mul(loop.index, eight)])
            v = builder.load(builder.bitcast(ptr, ir.VectorType(ir.FloatType(), 8).as_pointer()), align=4)
            builder.store(builder.fadd(builder.load(acc), term(builder.fpext(v, vty), means if squares else None)),
                          acc)
        lanes = builder.load(acc)
        part = [builder.extract_element(lanes, ir.Constant(I32, j)) for j in range(8)]
        first = cgutils.alloca_once_value(builder, part[0])
        done = builder.mul(blocks, eight)
        with cgutils.for_range(builder, builder.sub(n, done)) as loop:
            value = builder.fpext(builder.load(builder.gep(row, [builder.add(done, loop.index)])), F64)
            builder.store(builder.fadd(builder.load(first), term(value, args[4] if squares else None)), first)
        part[0] = builder.load(first)
        return builder.fadd(builder.fadd(builder.fadd(part[0], part[1]), builder.fadd(part[2], part[3])),
                            builder.fadd(builder.fadd(part[4], part[5]), builder.fadd(part[6], part[7])))
    return codegen


def _row_args_ok(x, t, c0, n):
    return (isinstance(x, types.Array) and x.dtype == types.float32 and x.ndim == 2 and x.layout == "C"
            and all(isinstance(a, types.Integer) for a in (t, c0, n)))


@intrinsic
def _sum(typingctx, x, t, c0, n):
    """sum of x[t, c0:c0 + n] in float64."""
    if not _row_args_ok(x, t, c0, n):
        return None
    return types.float64(x, t, c0, n), _row_sum_codegen(False)


@intrinsic
def _squares(typingctx, x, t, c0, n, mean):
    """sum of (x[t, c0:c0 + n] - mean) ** 2 in float64."""
    if not (_row_args_ok(x, t, c0, n) and mean == types.float64):
        return None
    return types.float64(x, t, c0, n, mean), _row_sum_codegen(True)


@njit(cache=True, error_model="numpy", inline="always")
def _group_norm_head(t, h, x, n_head, weight, bias, eps, out):
    """Group (head) h of row t: the unit of _group_norm_row, and of the fused RWKV-7 step (kernels/wkv7.py)."""
    N = x.shape[1] // n_head
    c0 = h * N
    mean = _sum(x, t, c0, N) / N
    inv = 1.0 / math.sqrt(_squares(x, t, c0, N, mean) / N + eps)
    for c in range(c0, c0 + N):
        out[t, c] = np.float32((x[t, c] - mean) * inv) * weight[c] + bias[c]


@njit(cache=True, error_model="numpy")
def _group_norm_row(t, x, n_head, weight, bias, eps, out):
    for h in range(n_head):
        _group_norm_head(t, h, x, n_head, weight, bias, eps, out)


@njit(cache=True, error_model="numpy")
def _group_norm_serial(x, n_head, weight, bias, eps):
    out = np.empty(x.shape, np.float32)
    for t in range(x.shape[0]):
        _group_norm_row(t, x, n_head, weight, bias, eps, out)
    return out


@njit(cache=True, parallel=True, error_model="numpy")
def _group_norm_parallel(x, n_head, weight, bias, eps):
    out = np.empty(x.shape, np.float32)
    for t in prange(x.shape[0]):
        _group_norm_row(t, x, n_head, weight, bias, eps, out)
    return out


def group_norm(x, n_head, weight, bias, eps):
    """layer_norm of each of the n_head consecutive groups of a row, then * weight + bias over the whole row
    (torch group_norm with one group per head). x in any memory order (the sums read rows as vectors: a strided
    view is copied first)."""
    return _by_rows(_group_norm_serial, _group_norm_parallel, 2.2, np.ascontiguousarray(x), n_head, weight, bias,
                    eps)


def layer_norm(x, weight, bias, eps):
    """(x - mean) / sqrt(var + eps) * weight + bias per row, biased variance (torch layer_norm): group_norm with
    the whole row as one group."""
    return group_norm(x, 1, weight, bias, eps)


@njit(cache=True, error_model="numpy")
def _token_mixes_row(t, a, previous, mus, out):
    for f in range(mus.shape[0]):        # mixes outermost: each inner loop is one contiguous vector loop
        for c in range(a.shape[1]):
            out[f, t, c] = a[t, c] * mus[f, c] + previous[t, c] * (np.float32(1.0) - mus[f, c])


@njit(cache=True, error_model="numpy")
def _token_mixes_serial(a, previous, mus):
    out = np.empty((mus.shape[0],) + a.shape, np.float32)
    for t in range(a.shape[0]):
        _token_mixes_row(t, a, previous, mus, out)
    return out


@njit(cache=True, parallel=True, error_model="numpy")
def _token_mixes_parallel(a, previous, mus):
    out = np.empty((mus.shape[0],) + a.shape, np.float32)
    for t in prange(a.shape[0]):
        _token_mixes_row(t, a, previous, mus, out)
    return out


def token_mixes(a, previous_row, mus):
    """out[f, t] = a[t] * mus[f] + p[t] * (1 - mus[f]) for every mix f, p = a shifted by one token (row 0: the
    state's previous row): RWKV-4/5's token shift, all mixes of a layer in one pass -> (n, T, C). (One call where
    a decode token of Eagle made five per attention block, ~3 us each.)"""
    return token_mixes_rows(a, shifted(a, previous_row), mus)


def token_mixes_rows(a, previous, mus):
    """The token shift of each row of `a` (T, C) against its own previous row previous[t] -> (n, T, C): a prompt's
    rows against the row before them (token_mixes), or B sequences at one token each against their states' rows,
    with the same arithmetic per element either way."""
    return _by_rows(_token_mixes_serial, _token_mixes_parallel, 0.15 * mus.shape[0], a, previous, mus)


# The element-wise activations share one row kernel; `fn` picks the function once per row.
SIGMOID, SILU, RELU_SQUARE, TANH = 0, 1, 2, 3


@njit(inline="always", error_model="numpy")
def sigmoid_f32(x):
    """1 / (1 + exp(-x)) of a float32 (every sigmoid of the forward pass, so that fused kernels give the same
    bits as the row kernels here)."""
    one = np.float32(1.0)
    return one / (one + exp_f32(-x))


@njit(inline="always", error_model="numpy")
def tanh_f32(x):
    """tanh of a float32 within 2 ulp, written to vectorise like exp_f32 (the C library's tanhf, one element at a
    time, took ~13 ns a value: 160 us for a prompt's 128 x 96 decay LoRA). Cephes' tanhf: an odd polynomial
    for |x| < 0.625, 1 - 2 / (exp(2|x|) + 1) with x's sign above (exp overflowing to inf gives 1; NaN stays NaN).
    Shared with fused kernels like sigmoid_f32."""
    a = abs(x)
    z = x * x
    p = ((((np.float32(-5.70498872745e-3) * z + np.float32(2.06390887954e-2)) * z
           - np.float32(5.37397155531e-2)) * z + np.float32(1.33314422036e-1)) * z
         - np.float32(3.33332819422e-1)) * z * x + x
    t = np.float32(1.0) - np.float32(2.0) / (exp_f32(a + a) + np.float32(1.0))
    if x < 0:
        t = -t
    return p if a < np.float32(0.625) else t


@njit(cache=True, error_model="numpy")
def _activation_row(t, x, fn, out):
    if fn == SIGMOID:
        for c in range(x.shape[1]):
            out[t, c] = sigmoid_f32(x[t, c])
    elif fn == SILU:
        for c in range(x.shape[1]):
            v = x[t, c]
            out[t, c] = v * sigmoid_f32(v)
    elif fn == TANH:
        for c in range(x.shape[1]):
            out[t, c] = tanh_f32(x[t, c])
    else:
        for c in range(x.shape[1]):
            v = max(x[t, c], np.float32(0.0))
            out[t, c] = v * v


@njit(cache=True, error_model="numpy")
def _activation_serial(x, fn):
    out = np.empty(x.shape, np.float32)
    for t in range(x.shape[0]):
        _activation_row(t, x, fn, out)
    return out


@njit(cache=True, parallel=True, error_model="numpy")
def _activation_parallel(x, fn):
    out = np.empty(x.shape, np.float32)
    for t in prange(x.shape[0]):
        _activation_row(t, x, fn, out)
    return out


@njit(cache=True, error_model="numpy")
def _gate_row(t, y, gate, fn, out):
    """out[t] = y[t] * silu(gate[t]) (SILU) or sigmoid(gate[t]) * y[t] (SIGMOID), each factor rounded to float32
    as the separate kernels and NumPy's product round them: the same bits as those two steps."""
    if fn == SILU:
        for c in range(y.shape[1]):
            v = gate[t, c]
            out[t, c] = y[t, c] * (v * sigmoid_f32(v))
    else:
        for c in range(y.shape[1]):
            out[t, c] = sigmoid_f32(gate[t, c]) * y[t, c]


@njit(cache=True, error_model="numpy")
def _gate_serial(y, gate, fn):
    out = np.empty(y.shape, np.float32)
    for t in range(y.shape[0]):
        _gate_row(t, y, gate, fn, out)
    return out


@njit(cache=True, parallel=True, error_model="numpy")
def _gate_parallel(y, gate, fn):
    out = np.empty(y.shape, np.float32)
    for t in prange(y.shape[0]):
        _gate_row(t, y, gate, fn, out)
    return out


def silu_gate(y, gate):
    """y * silu(gate) in one pass (RWKV-5's output gate)."""
    return _by_rows(_gate_serial, _gate_parallel, 0.4, y, gate, SILU)


def sigmoid_gate(gate, y):
    """sigmoid(gate) * y in one pass (RWKV-4/5's receptance gates)."""
    return _by_rows(_gate_serial, _gate_parallel, 0.4, y, gate, SIGMOID)


def sigmoid(x):
    """1 / (1 + exp(-x))."""
    return _by_rows(_activation_serial, _activation_parallel, 0.4, x, SIGMOID)


def tanh(x):
    """np.tanh(x) (float32, within 2 ulp: tanh_f32)."""
    return _by_rows(_activation_serial, _activation_parallel, 0.4, x, TANH)


def silu(x):
    """x * sigmoid(x)."""
    return _by_rows(_activation_serial, _activation_parallel, 0.4, x, SILU)


def relu_square(x):
    """max(x, 0) ** 2 (the channel mix's activation)."""
    return _by_rows(_activation_serial, _activation_parallel, 0.1, x, RELU_SQUARE)


@njit(cache=True, error_model="numpy")
def shifted(x, previous_row):
    """Row t of the result is row t-1 of x; row 0 is `previous_row` (the state's last row)."""
    T, C = x.shape
    out = np.empty((T, C), np.float32)
    out[0, :] = previous_row
    for t in range(1, T):
        out[t, :] = x[t - 1, :]
    return out


# ----------------------------------------------------------------------------------------------------------------
# RWKV-6 / RWKV-7 row kernels (same conventions: (T, C) float32 rows in, new arrays out)

def shift_mixes(a, previous_row, mus, extra=None):
    """out[f, t] = a[t] + d[t] * mus[f] for every mix f, d = p - a with p = a shifted by one token (row 0: the
    state's previous row): RWKV-6/7's token shift `a + d * mu`, all mixes of a layer in one pass -> (n, T, C).
    With `extra` (n, T, C), RWKV-6's data-dependent shift: out[f, t] = a[t] + d[t] * (mus[f] + extra[f, t])."""
    return shift_mixes_rows(a, shifted(a, previous_row), mus, extra)


@njit(cache=True, error_model="numpy")
def _shift_mixes_row(t, a, previous, mus, extra, out):
    for f in range(mus.shape[0]):        # mixes outermost: each inner loop is one contiguous vector loop
        if extra is None:                # decided when compiled (one specialisation each), not per element
            for c in range(a.shape[1]):
                out[f, t, c] = a[t, c] + (previous[t, c] - a[t, c]) * mus[f, c]
        else:
            for c in range(a.shape[1]):
                out[f, t, c] = a[t, c] + (previous[t, c] - a[t, c]) * (mus[f, c] + extra[f, t, c])


@njit(cache=True, error_model="numpy")
def _shift_mixes_serial(a, previous, mus, extra):
    out = np.empty((mus.shape[0],) + a.shape, np.float32)
    for t in range(a.shape[0]):
        _shift_mixes_row(t, a, previous, mus, extra, out)
    return out


@njit(cache=True, parallel=True, error_model="numpy")
def _shift_mixes_parallel(a, previous, mus, extra):
    out = np.empty((mus.shape[0],) + a.shape, np.float32)
    for t in prange(a.shape[0]):
        _shift_mixes_row(t, a, previous, mus, extra, out)
    return out


def shift_mixes_rows(a, previous, mus, extra=None):
    """The token shift of each row of `a` (T, C) against its own previous row previous[t] -> (n, T, C): a prompt's
    rows against the row before them (shift_mixes), or B sequences at one token each against their states' rows,
    with the same arithmetic per element either way."""
    return _by_rows(_shift_mixes_serial, _shift_mixes_parallel, 0.12 * mus.shape[0], a, previous, mus, extra)


@njit(cache=True, error_model="numpy")
def _rwkv6_decay_row(t, u, time_decay, out):
    for c in range(u.shape[1]):
        out[t, c] = exp_f32(-exp_f32(time_decay[c] + u[t, c]))


@njit(cache=True, error_model="numpy")
def _rwkv6_decay_serial(u, time_decay):
    out = np.empty(u.shape, np.float32)
    for t in range(u.shape[0]):
        _rwkv6_decay_row(t, u, time_decay, out)
    return out


@njit(cache=True, parallel=True, error_model="numpy")
def _rwkv6_decay_parallel(u, time_decay):
    out = np.empty(u.shape, np.float32)
    for t in prange(u.shape[0]):
        _rwkv6_decay_row(t, u, time_decay, out)
    return out


def rwkv6_decay(time_decay, u):
    """w = exp(-exp(time_decay + u)): RWKV-6's per-token decay from the decay LoRA's output u (T, C)."""
    return _by_rows(_rwkv6_decay_serial, _rwkv6_decay_parallel, 1.0, u, time_decay)


@njit(cache=True, error_model="numpy", inline="always")
def rwkv7_wkv_inputs_head(t, h, k, v, v_first, u_w, u_a, u_v, w0, a0, v0, k_k, k_a, n_head, value_residual,
                          decay_scale, norm_floor, w, kt, vt, neg, b):
    """Head h of row t of rwkv7_wkv_inputs (every quantity is per channel but kappa's norm, which is per head):
    the unit that the row kernels and the fused RWKV-7 step (kernels/wkv7.py) share, so both give the same bits.
    Indices LLVM cannot prove >= 0 get a wrap-around check (Python's negative indices) that stops the loops from
    vectorising: the guard below tells LLVM that t, h and N are >= 0 (one token's inputs, each head a call: 74
    against 26 us without and with it)."""
    N = k.shape[1] // n_head
    if t < 0 or h < 0 or N <= 0:
        return
    c0 = h * N
    one = np.float32(1.0)
    sq = 0.0
    for j in range(N):
        x = k[t, c0 + j] * k_k[c0 + j]
        sq += np.float64(x) * x
    norm = max(np.float32(np.sqrt(sq)), norm_floor)
    for j in range(N):
        c = c0 + j
        w[t, c] = exp_f32(decay_scale * sigmoid_f32(w0[c] + u_w[t, c]))
        alpha = sigmoid_f32(a0[c] + u_a[t, c])
        kappa = (k[t, c] * k_k[c]) / norm
        neg[t, c] = -kappa
        b[t, c] = kappa * alpha
        kt[t, c] = k[t, c] * (one + (alpha - one) * k_a[c])
        if value_residual:
            vt[t, c] = v[t, c] + (v_first[t, c] - v[t, c]) * sigmoid_f32(v0[c] + u_v[t, c])
        else:
            vt[t, c] = v[t, c]


@njit(cache=True, error_model="numpy")
def _rwkv7_wkv_inputs_row(t, k, v, v_first, u_w, u_a, u_v, w0, a0, v0, k_k, k_a, n_head, value_residual,
                          decay_scale, norm_floor, w, kt, vt, neg, b):
    for h in range(n_head):
        rwkv7_wkv_inputs_head(t, h, k, v, v_first, u_w, u_a, u_v, w0, a0, v0, k_k, k_a, n_head, value_residual,
                              decay_scale, norm_floor, w, kt, vt, neg, b)


@njit(cache=True, error_model="numpy")
def _rwkv7_wkv_inputs_serial(args, outs):
    for t in range(args[0].shape[0]):
        _rwkv7_wkv_inputs_row(t, *args, *outs)


@njit(cache=True, parallel=True, error_model="numpy")
def _rwkv7_wkv_inputs_parallel(args, outs):
    for t in prange(args[0].shape[0]):
        _rwkv7_wkv_inputs_row(t, *args, *outs)


def rwkv7_wkv_inputs(k, v, v_first, u_w, u_a, u_v, w0, a0, v0, k_k, k_a, n_head, value_residual, decay_scale,
                     norm_floor):
    """The RWKV-7 quantities around the WKV step, from the projections k, v (T, C) and the LoRA outputs u_*:
        w      = exp(decay_scale * sigmoid(w0 + u_w))
        alpha  = sigmoid(a0 + u_a)
        kappa  = per head: (k * k_k) / max(|k * k_k|, norm_floor)
        k~     = k * (1 + (alpha - 1) * k_a)
        v~     = v + (v_first - v) * sigmoid(v0 + u_v)      (value_residual; else v)
    Returns (w, k~, v~, -kappa, kappa * alpha), the arguments of kernels/wkv7.wkv7 after r. Rows are independent:
    several (a prompt's tokens, a batch's sequences) run in parallel, one token in the calling thread."""
    T, C = k.shape
    outs = tuple(np.empty((T, C), np.float32) for _ in range(5))
    args = (k, v, v_first, u_w, u_a, u_v, w0, a0, v0, k_k, k_a, n_head, value_residual, np.float32(decay_scale),
            np.float32(norm_floor))
    (_rwkv7_wkv_inputs_parallel if k.size * 3.1 >= PARALLEL_MIN_NS else _rwkv7_wkv_inputs_serial)(args, outs)
    return outs


@njit(cache=True, error_model="numpy", inline="always")
def rwkv7_output_head(t, h, o, r, k, v, r_k, gate, weight, bias, n_head, eps, out):
    """Head h of row t of rwkv7_output (shared with the fused RWKV-7 step like rwkv7_wkv_inputs_head; the guard as
    there)."""
    N = o.shape[1] // n_head
    if t < 0 or h < 0 or N <= 0:
        return
    _group_norm_head(t, h, o, n_head, weight, bias, eps, out)
    c0 = h * N
    s = np.float32(0.0)
    for j in range(c0, c0 + N):
        s += r[t, j] * k[t, j] * r_k[j]
    for j in range(c0, c0 + N):
        out[t, j] = (out[t, j] + s * v[t, j]) * gate[t, j]


@njit(cache=True, error_model="numpy")
def _rwkv7_output_row(t, o, r, k, v, r_k, gate, weight, bias, n_head, eps, out):
    for h in range(n_head):
        rwkv7_output_head(t, h, o, r, k, v, r_k, gate, weight, bias, n_head, eps, out)


@njit(cache=True, error_model="numpy")
def _rwkv7_output_serial(o, r, k, v, r_k, gate, weight, bias, n_head, eps):
    out = np.empty(o.shape, np.float32)
    for t in range(o.shape[0]):
        _rwkv7_output_row(t, o, r, k, v, r_k, gate, weight, bias, n_head, eps, out)
    return out


@njit(cache=True, parallel=True, error_model="numpy")
def _rwkv7_output_parallel(o, r, k, v, r_k, gate, weight, bias, n_head, eps):
    out = np.empty(o.shape, np.float32)
    for t in prange(o.shape[0]):
        _rwkv7_output_row(t, o, r, k, v, r_k, gate, weight, bias, n_head, eps, out)
    return out


def rwkv7_output(o, r, k, v, r_k, gate, weight, bias, n_head, eps):
    """(GroupNorm_H(o) * weight + bias + (sum over the head of r * k * r_k) * v) * gate, per row (RWKV-7)."""
    return _by_rows(_rwkv7_output_serial, _rwkv7_output_parallel, 3.4, np.ascontiguousarray(o), r, k, v, r_k, gate,
                    weight, bias, n_head, eps)
