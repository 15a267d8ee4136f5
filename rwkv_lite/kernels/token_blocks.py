"""A whole block for one token as one compiled call: RWKV-5 (arch/v5.py) and RWKV-7 (arch/v7.py) decode steps,
of one sequence (rwkv5/7_block_token) and of a batched step of B sequences (rwkv5/7_block_rows).

A decode step used to make ~10-13 calls from Python into Numba per block (the two norms, the token shifts, the
projections' launch, RWKV-7's LoRA chain, the WKV step, the remaining products, activations and gates) with the
Python around them: ~110 us a block, 2.6 ms a token over 24 blocks whatever the model's size, and gaps in which
the threads went back to waiting (docs/performance.md). Here the same kernels run in the same order from
compiled code, so a block costs one call from Python: the results are the same bits (tests/test_token_blocks.py),
and the products still split over Numba's threads inside (a parallel kernel called from compiled code launches
its own parallel region).

They cover the files most people run: every product a panel-layout int8 / int4 matrix (schemes/panel.py), for
RWKV-7 the LoRA factors int8 panels in one chain launch. Other files, DeepEmbed blocks and observed passes take
the step-by-step path of their version module.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from . import panel
from .batched import PARALLEL_MIN_WORK as ROWS_PARALLEL_MIN_WORK, gather_rows, scatter_rows
from .pointwise import (PARALLEL_MIN_NS, RELU_SQUARE, SIGMOID, SILU, TANH, _activation_parallel, _activation_serial,
                        _gate_parallel, _gate_serial, _group_norm_parallel, _group_norm_serial, _shift_mixes_parallel,
                        _shift_mixes_serial, _token_mixes_parallel, _token_mixes_serial)
from .wkv5 import PARALLEL_MIN_WORK, _heads_parallel, _heads_serial
from .wkv5 import _rows as _wkv5_rows
from .wkv7 import _token_one, _token_rows


# Row kernels with the serial or parallel driver that pointwise.py picks for the same size (the same bits either
# way; one token of one sequence takes the serial one below the largest widths).

@njit(cache=True, nogil=True, error_model="numpy")
def _group_norm_rows(x, n_head, weight, bias, eps):
    if x.size * 2.2 >= PARALLEL_MIN_NS:                       # pointwise.group_norm's choice
        return _group_norm_parallel(x, n_head, weight, bias, eps)
    return _group_norm_serial(x, n_head, weight, bias, eps)


@njit(cache=True, nogil=True, error_model="numpy")
def _layer_norm_rows(x, weight, bias, eps):
    return _group_norm_rows(x, 1, weight, bias, eps)


@njit(cache=True, nogil=True, error_model="numpy")
def _gate_rows(y, gate, fn):
    if y.size * 0.4 >= PARALLEL_MIN_NS:                       # pointwise.silu_gate's / sigmoid_gate's choice
        return _gate_parallel(y, gate, fn)
    return _gate_serial(y, gate, fn)


@njit(cache=True, nogil=True, error_model="numpy")
def _token_mix_rows(a, previous, mus):
    if a.size * 0.15 * mus.shape[0] >= PARALLEL_MIN_NS:      # pointwise.token_mixes_rows's choice
        return _token_mixes_parallel(a, previous, mus)
    return _token_mixes_serial(a, previous, mus)


@njit(cache=True, nogil=True, error_model="numpy")
def _activation_rows(x, fn, ns_per_element):
    if x.size * ns_per_element >= PARALLEL_MIN_NS:            # pointwise's choice (tanh, sigmoid 0.4; relu^2 0.1)
        return _activation_parallel(x, fn)
    return _activation_serial(x, fn)


@njit(cache=True, nogil=True, error_model="numpy")
def _shift_rows(a, previous, mus):
    if a.size * 0.12 * mus.shape[0] >= PARALLEL_MIN_NS:      # pointwise.shift_mixes_rows's choice
        return _shift_mixes_parallel(a, previous, mus, None)
    return _shift_mixes_serial(a, previous, mus, None)


@njit(cache=True, nogil=True)
def _product(int8, parallel, wp, wd, x, cols, rows, threads):
    """y (1, rows) = the panel matrix (wp, wd) times the row x (1, C): PanelMatrix._product's kernel choice."""
    if parallel:
        Y = panel.gemm_parallel(int8, wp, wd, x, cols, threads)
    else:
        Y = panel.gemm_serial(int8, wp, wd, x, cols)
    if Y.shape[1] == rows:
        return Y
    return np.ascontiguousarray(Y[:, :rows])


@njit(cache=True, nogil=True)
def _padded(xs, cols):
    """The rows xs[i] (1, C) stacked into (n, cols), zeros past C (gemv_many's and the chain's input)."""
    C = xs[0].shape[1]
    X = np.zeros((len(xs), cols), np.float32)
    for i in range(len(xs)):
        X[i, :C] = xs[i][0]
    return X


@njit(cache=True, nogil=True, error_model="numpy")
def rwkv7_block_token(x, v_first, threads, blocks, att_x, ffn_x, wkv, source, copy_source,
                      ln_eps, ln1_w, ln1_b, mixes, C,
                      rkv_int8, rkv_wp, rkv_wd, rkv_cols, rkv_npanels,
                      down_wp, down_wd, up_wp, up_wd, lora_cols, dims, middles, down_tasks, up_tasks, up_groups,
                      lora_out_cols,
                      w0, a0, v0, k_k, k_a, r_k, ln_x_w, ln_x_b, n_head, value_residual, decay_scale, norm_floor,
                      ln_x_eps,
                      o_int8, o_wp, o_wd, o_cols, o_parallel,
                      ln2_w, ln2_b, ffn_mixes,
                      k_int8, k_wp, k_wd, k_cols, k_rows, k_parallel,
                      v_int8, v_wp, v_wd, v_cols, v_parallel):
    """(x, v_first) after one block for the row x (1, C) before it. The first nine arguments change from call to
    call: the value residual v_first (1, C) (ignored by layer 0, which returns its own value in its place), the
    thread count and WKV head blocks, the block's state rows att_x, ffn_x (C,) and wkv (H, N, N), updated in place
    (the old WKV memory read from `source` when copy_source). The rest are the block's weights and their kernel
    arguments (arch/v7.py: Layer.block_token), as arch/v7.py's time_mix and channel_mix pass them."""
    # time mix: x += W_o . WKV7(r, k, v, LoRAs of the shifted LN1(x))
    a = _layer_norm_rows(x, ln1_w, ln1_b, ln_eps)
    previous = att_x.reshape(1, -1)
    shifted = _shift_rows(a, previous, mixes)          # rows r, w, k, v, a, g
    xr, xw, xk, xv, xa, xg = shifted[0], shifted[1], shifted[2], shifted[3], shifted[4], shifted[5]
    Y = panel.gemv_many(rkv_int8, rkv_wp, rkv_wd, _padded((xr, xk, xv), rkv_cols), rkv_cols, rkv_npanels,
                        threads)
    r = np.ascontiguousarray(Y[0:1, :C])
    k = np.ascontiguousarray(Y[1:2, :C])
    v = np.ascontiguousarray(Y[2:3, :C])
    if value_residual:
        U = panel.lora_chain(down_wp, down_wd, up_wp, up_wd, _padded((xw, xa, xv, xg), lora_cols), lora_cols,
                             dims, middles, down_tasks, up_tasks, up_groups, lora_out_cols, threads)
        u_w, u_a = np.ascontiguousarray(U[0:1, :C]), np.ascontiguousarray(U[1:2, :C])
        u_v, gate = np.ascontiguousarray(U[2:3, :C]), np.ascontiguousarray(U[3:4, :C])
        vr0 = v0
    else:
        U = panel.lora_chain(down_wp, down_wd, up_wp, up_wd, _padded((xw, xa, xg), lora_cols), lora_cols,
                             dims, middles, down_tasks, up_tasks, up_groups, lora_out_cols, threads)
        u_w, u_a, gate = np.ascontiguousarray(U[0:1, :C]), np.ascontiguousarray(U[1:2, :C]), \
            np.ascontiguousarray(U[2:3, :C])
        u_v, vr0, v_first = v, a0, v
    y = _token_one(r, k, v, v_first, u_w, u_a, u_v, gate, w0, a0, vr0, k_k, k_a, r_k, ln_x_w, ln_x_b, n_head,
                   value_residual, decay_scale, norm_floor, ln_x_eps, source, copy_source, wkv, blocks)
    att_x[:] = a[0]
    x = x + _product(o_int8, o_parallel, o_wp, o_wd, y, o_cols, C, threads)
    # channel mix: x += W_v . relu(W_k . shifted LN2(x))^2
    b = _layer_norm_rows(x, ln2_w, ln2_b, ln_eps)
    xk2 = np.ascontiguousarray(_shift_rows(b, ffn_x.reshape(1, -1), ffn_mixes)[0])
    hidden = _activation_rows(_product(k_int8, k_parallel, k_wp, k_wd, xk2, k_cols, k_rows, threads),
                             RELU_SQUARE, 0.1)
    ffn_x[:] = b[0]
    x = x + _product(v_int8, v_parallel, v_wp, v_wd, hidden, v_cols, C, threads)
    return x, v_first


@njit(cache=True, nogil=True, error_model="numpy")
def rwkv5_block_token(x, threads, att_x, ffn_x, wkv, source, copy_source,
                      ln_eps, ln1_w, ln1_b, mixes, C, has_gate,
                      att_int8, att_wp, att_wd, att_cols, att_npanels,
                      decay, bonus, n_head, ln_x_w, ln_x_b, ln_x_eps,
                      o_int8, o_wp, o_wd, o_cols, o_parallel,
                      ln2_w, ln2_b, ffn_mixes,
                      kr_int8, kr_wp, kr_wd, kr_cols, kr_npanels, F,
                      v_int8, v_wp, v_wd, v_cols, v_parallel):
    """x (1, C) after one RWKV-5 block for the row x before it. The first seven arguments change from call to call:
    the thread count, the block's state rows att_x, ffn_x (C,) and wkv (H, N, N), updated in place (the old WKV
    memory read from `source` when copy_source). The rest are the block's weights and their kernel arguments
    (arch/v5.py: Layer.block_token), as arch/v5.py's time_mix and channel_mix pass them."""
    # time mix: x += W_o . [silu(W_g xg) *] GroupNorm(WKV5(W_r xr, W_k xk, W_v xv))
    a = _layer_norm_rows(x, ln1_w, ln1_b, ln_eps)
    mixed = _token_mix_rows(a, att_x.reshape(1, -1), mixes)      # rows r, k, v[, g]
    if has_gate:
        X = _padded((mixed[0], mixed[1], mixed[2], mixed[3]), att_cols)
    else:
        X = _padded((mixed[0], mixed[1], mixed[2]), att_cols)
    Y = panel.gemv_many(att_int8, att_wp, att_wd, X, att_cols, att_npanels, threads)
    r = np.ascontiguousarray(Y[0:1, :C])
    k = np.ascontiguousarray(Y[1:2, :C])
    v = np.ascontiguousarray(Y[2:3, :C])
    o = np.empty_like(r)
    N = C // n_head
    if n_head > 1 and n_head * N * N >= PARALLEL_MIN_WORK:          # wkv5's choice: the same bits either way
        _heads_parallel(r, k, v, decay, False, bonus, source, copy_source, wkv, o, threads)
    else:
        _heads_serial(r, k, v, decay, False, bonus, source, copy_source, wkv, o)
    y = _group_norm_rows(o, n_head, ln_x_w, ln_x_b, ln_x_eps)
    if has_gate:
        y = _gate_rows(y, np.ascontiguousarray(Y[3:4, :C]), SILU)
    att_x[:] = a[0]
    x = x + _product(o_int8, o_parallel, o_wp, o_wd, y, o_cols, C, threads)
    # channel mix: x += sigmoid(F_r xr) * F_v relu(F_k xk)^2
    b = _layer_norm_rows(x, ln2_w, ln2_b, ln_eps)
    mixed = _token_mix_rows(b, ffn_x.reshape(1, -1), ffn_mixes)  # rows k, r
    Y = panel.gemv_many(kr_int8, kr_wp, kr_wd, _padded((mixed[0], mixed[1]), kr_cols), kr_cols, kr_npanels,
                        threads)
    hidden = _activation_rows(np.ascontiguousarray(Y[0:1, :F]), RELU_SQUARE, 0.1)
    ffn_x[:] = b[0]
    out = _product(v_int8, v_parallel, v_wp, v_wd, hidden, v_cols, C, threads)
    return x + _gate_rows(out, np.ascontiguousarray(Y[1:2, :C]), SIGMOID)


# ---------------------------------------------------------------------------------------------------------------
# B sequences at one token each (a batched decode step: arch/v7.py's time_mix_batch and channel_mix_batch). Row b
# of every array belongs to sequence b, whose state rows are reached through their addresses (arch/batch.py);
# each kernel is the one the step-by-step batched path picks for these sizes (a serial or a parallel driver, the
# same bits either way).

@njit(cache=True, nogil=True)
def _rows_product(int8, wp, wd, X, cols, rows, threads):
    """kernels/batched.matmul_rows of a panel matrix: Y (B, rows), row b the single-token product of X[b]."""
    parallel = rows > 1 and rows * X.shape[1] * X.shape[0] >= ROWS_PARALLEL_MIN_WORK
    return _product(int8, parallel, wp, wd, X, cols, rows, threads)


@njit(cache=True, nogil=True, error_model="numpy")
def rwkv7_block_rows(x, v_first, threads, att_x, ffn_x, wkv,
                     ln_eps, ln1_w, ln1_b, mixes, C,
                     rkv_int8, rkv_wp, rkv_wd, rkv_cols,
                     down_wp, down_wd, up_wp, up_wd, lora_cols, dims, middles, up_cols, lora_mixes,
                     w0, a0, v0, k_k, k_a, r_k, ln_x_w, ln_x_b, n_head, value_residual, decay_scale, norm_floor,
                     ln_x_eps,
                     o_int8, o_wp, o_wd, o_cols,
                     ln2_w, ln2_b, ffn_mixes,
                     k_int8, k_wp, k_wd, k_cols, k_rows,
                     v_int8, v_wp, v_wd, v_cols):
    """(x, v_first) after one RWKV-7 block for B sequences' rows x (B, C). att_x, ffn_x and wkv: int64 addresses of
    each sequence's state rows of this layer (C,) and WKV state (H, N, N), updated in place. The weights as
    rwkv7_block_token takes them, but each product on its own (the batched products) and the LoRA factors as
    pairs: lora_mixes[m] is the shifted row (r, w, k, v, a, g) that pair m reads, up_cols their inputs' widths."""
    B = x.shape[0]
    a = _layer_norm_rows(x, ln1_w, ln1_b, ln_eps)
    shifted = _shift_rows(a, gather_rows(att_x, C), mixes)             # (6, B, C): r, w, k, v, a, g
    r = _rows_product(rkv_int8, rkv_wp[0], rkv_wd[0], shifted[0], rkv_cols, C, threads)
    k = _rows_product(rkv_int8, rkv_wp[1], rkv_wd[1], shifted[2], rkv_cols, C, threads)
    v = _rows_product(rkv_int8, rkv_wp[2], rkv_wd[2], shifted[3], rkv_cols, C, threads)
    n = len(down_wp)
    U = np.empty((n, B, C), np.float32)
    for m in range(n):                       # x . A, the middle step (tanh, none, sigmoid), . B
        h = _rows_product(True, down_wp[m], down_wd[m], shifted[lora_mixes[m]], lora_cols, dims[m], threads)
        if middles[m] == panel.TANH:
            h = _activation_rows(h, TANH, 0.4)
        elif middles[m] == panel.SIGMOID:
            h = _activation_rows(h, SIGMOID, 0.4)
        U[m] = _rows_product(True, up_wp[m], up_wd[m], h, up_cols[m], C, threads)
    if value_residual:
        u_v, vr0 = U[2], v0
    else:
        u_v, vr0, v_first = v, a0, v
    blocks = max(1, min(n_head, threads // B))
    y = _token_rows(r, k, v, v_first, U[0], U[1], u_v, U[n - 1], w0, a0, vr0, k_k, k_a, r_k, ln_x_w, ln_x_b, n_head,
                    value_residual, decay_scale, norm_floor, ln_x_eps, wkv, blocks)
    scatter_rows(a, att_x)
    x = x + _rows_product(o_int8, o_wp, o_wd, y, o_cols, C, threads)
    b = _layer_norm_rows(x, ln2_w, ln2_b, ln_eps)
    xk = np.ascontiguousarray(_shift_rows(b, gather_rows(ffn_x, C), ffn_mixes)[0])
    hidden = _activation_rows(_rows_product(k_int8, k_wp, k_wd, xk, k_cols, k_rows, threads), RELU_SQUARE, 0.1)
    scatter_rows(b, ffn_x)
    x = x + _rows_product(v_int8, v_wp, v_wd, hidden, v_cols, C, threads)
    return x, v_first


@njit(cache=True, nogil=True, error_model="numpy")
def rwkv5_block_rows(x, threads, att_x, ffn_x, wkv,
                     ln_eps, ln1_w, ln1_b, mixes, C, has_gate,
                     att_int8, att_wp, att_wd, att_cols, g_wp, g_wd,
                     decay, bonus, n_head, ln_x_w, ln_x_b, ln_x_eps,
                     o_int8, o_wp, o_wd, o_cols,
                     ln2_w, ln2_b, ffn_mixes,
                     kr_int8, kr_wp, kr_wd, kr_cols, F,
                     v_int8, v_wp, v_wd, v_cols):
    """x (B, C) after one RWKV-5 block for B sequences' rows x: arch/v5.py's time_mix_batch and channel_mix_batch
    in one call. att_x, ffn_x, wkv: int64 addresses of each sequence's state rows of this layer, updated in place;
    the weights as rwkv5_block_token takes them, each product on its own (the batched products): att_wp / att_wd
    r, k, v, and the gate's g_wp / g_wd (any array without a gate)."""
    a = _layer_norm_rows(x, ln1_w, ln1_b, ln_eps)
    mixed = _token_mix_rows(a, gather_rows(att_x, C), mixes)          # (3 or 4, B, C): r, k, v[, g]
    r = _rows_product(att_int8, att_wp[0], att_wd[0], mixed[0], att_cols, C, threads)
    k = _rows_product(att_int8, att_wp[1], att_wd[1], mixed[1], att_cols, C, threads)
    v = _rows_product(att_int8, att_wp[2], att_wd[2], mixed[2], att_cols, C, threads)
    o = np.empty_like(r)
    _wkv5_rows(r, k, v, decay, False, bonus, wkv, o)
    y = _group_norm_rows(o, n_head, ln_x_w, ln_x_b, ln_x_eps)
    if has_gate:
        y = _gate_rows(y, _rows_product(att_int8, g_wp, g_wd, mixed[3], att_cols, C, threads), SILU)
    scatter_rows(a, att_x)
    x = x + _rows_product(o_int8, o_wp, o_wd, y, o_cols, C, threads)
    b = _layer_norm_rows(x, ln2_w, ln2_b, ln_eps)
    mixed = _token_mix_rows(b, gather_rows(ffn_x, C), ffn_mixes)       # k, r
    k = _rows_product(kr_int8, kr_wp[0], kr_wd[0], mixed[0], kr_cols, F, threads)
    r = _rows_product(kr_int8, kr_wp[1], kr_wd[1], mixed[1], kr_cols, C, threads)
    scatter_rows(b, ffn_x)
    out = _rows_product(v_int8, v_wp, v_wd, _activation_rows(k, RELU_SQUARE, 0.1), v_cols, C, threads)
    return x + _gate_rows(out, r, SIGMOID)
