"""Low-rank (LoRA-style) products of RWKV-6/7 for one token: h = x . A (down) and y = h . B (up), float32.

RWKV-6 and RWKV-7 compute their data-dependent decay, token shift, in-context learning rate, value residual and
gate through small float32 factors stored (in, out): A (C, D), B (D, C) with D = 32..480. Written as numpy `@`
they go to BLAS, whose thread pool then fights Numba's for the cores on every token (measured on 2 cores, RWKV-7
1.5B: 600 ms/token with the fight, ~110 ms without; see kernels/threads.py for why the pools collide). So the
decode step computes them here, inside Numba's pool, several factors per parallel launch:

  down  x_m (C,) . A_m (C, D_m) for m = 0..n-1 -> the D_m-vectors, concatenated
        work split by row ranges of A (contiguous memory); each task writes a partial sum, added up at the end
  up    h_m (D_m,) . B_m (D_m, C) for m = 0..n-1 -> (n, C)
        work split by row ranges of B too, each task adding whole rows into its own partial (C,) row

Sums are float32 with reassociation (as numpy/BLAS), so results equal x @ A to float32 rounding.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

FASTMATH = {"reassoc", "contract"}
DOWN_ROWS = 256          # rows of A per task of the down product (256 x 96 x 4 B = 96 KiB: stays in L2)
UP_ROWS = 64             # rows of B per task of the up product (whole rows: contiguous memory; measured 1.3-1.8x
                         # faster than tasks of 512-column strips, 2048-wide factors, 2 threads)
PARALLEL_MIN_WEIGHTS = 1 << 16   # fewer weights in all: one thread (a pool wake-up costs more than the work)


@njit(cache=True)
def _row_tasks(rows, per_task):
    """(matrix, first row, end row) of every task over the stacked factors, per_task rows each."""
    total = 0
    for m in range(len(rows)):
        total += (rows[m] + per_task - 1) // per_task
    table = np.empty((total, 3), np.int64)
    b = 0
    for m in range(len(rows)):
        for r0 in range(0, rows[m], per_task):
            table[b, 0], table[b, 1], table[b, 2] = m, r0, min(rows[m], r0 + per_task)
            b += 1
    return table


@njit(cache=True, fastmath=FASTMATH)
def _down_part(x, A, r0, r1, out):
    """out (D,) = x[r0:r1] . A[r0:r1] (axpy over rows: the inner loop runs along a contiguous row of A)."""
    D = A.shape[1]
    acc = np.zeros(D, np.float32)
    for r in range(r0, r1):
        xr = x[r]
        row = A[r]
        for j in range(D):
            acc[j] += xr * row[j]
    out[:D] = acc


@njit(cache=True)
def _down_layout(As, widths):
    n = len(As)
    rows = np.empty(n, np.int64)
    offsets = np.zeros(n + 1, np.int64)
    width = 0
    for m in range(n):
        rows[m] = As[m].shape[0]
        offsets[m + 1] = offsets[m] + widths[m]
        width = max(width, widths[m])
    table = _row_tasks(rows, DOWN_ROWS)
    return table, offsets, np.empty((table.shape[0], width), np.float32)


@njit(cache=True)
def _down_sum(table, offsets, widths, partial):
    """Add the tasks' partial sums (the tasks of one matrix are consecutive and added in order)."""
    h = np.zeros(offsets[-1], np.float32)
    for b in range(table.shape[0]):
        m = table[b, 0]
        o = offsets[m]
        for j in range(widths[m]):
            h[o + j] += partial[b, j]
    return h


@njit(cache=True, parallel=True)
def _down_parallel(X, As, widths):
    table, offsets, partial = _down_layout(As, widths)
    for b in prange(table.shape[0]):
        m = table[b, 0]
        _down_part(X[m], As[m], table[b, 1], table[b, 2], partial[b])
    return _down_sum(table, offsets, widths, partial)


@njit(cache=True)
def _down_serial(X, As, widths):
    table, offsets, partial = _down_layout(As, widths)
    for b in range(table.shape[0]):
        m = table[b, 0]
        _down_part(X[m], As[m], table[b, 1], table[b, 2], partial[b])
    return _down_sum(table, offsets, widths, partial)


@njit(cache=True, fastmath=FASTMATH)
def _up_rows_part(H, o, B, r0, r1, out):
    """out (C,) = H[o+r0:o+r1] . B[r0:r1] (axpy over whole contiguous rows of B, accumulated in a local buffer)."""
    C = B.shape[1]
    acc = np.zeros(C, np.float32)
    for i in range(r0, r1):
        hi = H[o + i]
        row = B[i]
        for c in range(C):
            acc[c] += hi * row[c]
    out[:] = acc


@njit(cache=True)
def _up_layout(Bs):
    n = len(Bs)
    rows = np.empty(n, np.int64)
    for m in range(n):
        rows[m] = Bs[m].shape[0]
    table = _row_tasks(rows, UP_ROWS)
    return table, np.empty((table.shape[0], Bs[0].shape[1]), np.float32)


@njit(cache=True)
def _up_sum(table, partial, n):
    """Add the tasks' partial rows (the tasks of one matrix are consecutive and added in order)."""
    Y = np.zeros((n, partial.shape[1]), np.float32)
    for b in range(table.shape[0]):
        m = table[b, 0]
        for c in range(partial.shape[1]):
            Y[m, c] += partial[b, c]
    return Y


@njit(cache=True, parallel=True)
def _up_parallel(H, offsets, Bs):
    table, partial = _up_layout(Bs)
    for b in prange(table.shape[0]):
        m = table[b, 0]
        _up_rows_part(H, offsets[m], Bs[m], table[b, 1], table[b, 2], partial[b])
    return _up_sum(table, partial, len(Bs))


@njit(cache=True)
def _up_serial(H, offsets, Bs):
    table, partial = _up_layout(Bs)
    for b in range(table.shape[0]):
        m = table[b, 0]
        _up_rows_part(H, offsets[m], Bs[m], table[b, 1], table[b, 2], partial[b])
    return _up_sum(table, partial, len(Bs))


def _contiguous(mats):
    return tuple(np.ascontiguousarray(m, dtype=np.float32) for m in mats)


def down_many(xs, As) -> list[np.ndarray]:
    """[x @ A for x, A in zip(xs, As)] for one token: x float32 (C_m,), A float32 (C_m, D_m) -> list of (D_m,)."""
    As = _contiguous(As)
    C = max(A.shape[0] for A in As)
    X = np.zeros((len(As), C), np.float32)
    for m, (x, A) in enumerate(zip(xs, As)):
        x = np.asarray(x, np.float32).reshape(-1)
        if x.shape[0] != A.shape[0]:
            raise ValueError(f"low-rank factor {A.shape} cannot multiply an input of shape {x.shape}")
        X[m, :x.shape[0]] = x
    sizes = [A.shape[1] for A in As]
    work = sum(A.size for A in As)
    h = (_down_parallel if work >= PARALLEL_MIN_WEIGHTS else _down_serial)(X, As, np.array(sizes, np.int64))
    out, start = [], 0                   # slices, not np.split: this runs a few times per layer and token
    for size in sizes:
        out.append(h[start:start + size])
        start += size
    return out


def up_many(hs, Bs) -> np.ndarray:
    """np.stack([h @ B for h, B in zip(hs, Bs)]) for one token: h (D_m,), B float32 (D_m, C) -> (n, C)."""
    Bs = _contiguous(Bs)
    C = Bs[0].shape[1]
    ends = [0]
    for h, B in zip(hs, Bs):
        if B.shape[1] != C or np.shape(h) != (B.shape[0],):
            raise ValueError(f"low-rank factor {B.shape} cannot multiply an input of shape {np.shape(h)}")
        ends.append(ends[-1] + B.shape[0])
    offsets = np.array(ends, np.int64)
    H = np.concatenate([np.asarray(h, np.float32) for h in hs]) if len(hs) > 1 else np.asarray(hs[0], np.float32)
    work = sum(B.size for B in Bs)
    return (_up_parallel if work >= PARALLEL_MIN_WEIGHTS else _up_serial)(H, offsets, Bs)


def matmul_many(Xs, Ms) -> list[np.ndarray]:
    """[X @ M for X, M in zip(Xs, Ms)] for sequences (X (T, K), M (K, N) float32), the row blocks of every product
    shared out to the tile workers (kernels/threads.py: BLAS runs one thread per worker), so a prompt's LoRA
    products use every core like its weight matrices do."""
    from .threads import parallel_map, tile_workers
    Ys = [np.empty((X.shape[0], M.shape[1]), np.float32) for X, M in zip(Xs, Ms)]
    T = max(X.shape[0] for X in Xs)
    rows = max(16, -(-T // tile_workers()))
    tasks = [(m, t0, min(X.shape[0], t0 + rows)) for m, X in enumerate(Xs) for t0 in range(0, X.shape[0], rows)]

    def run(task):
        m, t0, t1 = task
        np.matmul(Xs[m][t0:t1], Ms[m], out=Ys[m][t0:t1])
    parallel_map(run, tasks)
    return Ys
