"""Weight matrices ready to compute with: y = W x for one token, Y = X W^T for a sequence, and row lookups.

A ``Matrix`` wraps the stored arrays of one 2-D weight (views of the mapped model file; never copied). This module
holds what every storage scheme's matrix shares; each scheme's subclass (rwkv_lite/schemes/: fp.py, int8.py,
int4.py, which also document the layouts) supplies its kernels:

  x float32 (C,)   -> (R,)    decode: a Numba GEMV that dequantises in registers (never BLAS)
  X float32 (T, C) -> (T, R)  sequence: rows are dequantised a tile at a time into a reused float32 buffer and
                              multiplied by BLAS (numpy matmul), so prompts run at GEMM speed; the tiles are
                              shared out to worker threads, each dequantising and multiplying its own (BLAS
                              itself single-threaded: see kernels/threads.py)
  rows(ids)        -> (len(ids), C) float32: dequantised rows (embedding lookup)

Shapes follow PyTorch's Linear: W is (out=R, in=C).
"""
from __future__ import annotations

import threading

import numpy as np

from . import simd
from .threads import parallel_map, tile_workers

# Sequence-mode tile: about TILE_FLOATS dequantised weights (8 MB) per BLAS call. Fewer, larger calls spend less
# time handing work to BLAS's threads (14336 x 4096 int8, T = 128, 2 cores: 128-row tiles 107 ms, 512-row
# tiles 84 ms, 2048-row tiles 87 ms; numpy fp32 GEMM alone 67 ms).
TILE_FLOATS = 1 << 21

# Matrices with fewer weights than this run their decode GEMV in the calling thread: waking Numba's pool costs
# microseconds on an idle machine and up to milliseconds when another process holds a core (measured: the tiny
# models' 64 x 64 matrices, 3 us serial). 512 x 512 int8 takes ~15 us on one core.
PARALLEL_MIN_WEIGHTS = 1 << 18

_scratch = threading.local()


def _tiles(R: int, C: int, workers: int) -> list[tuple[int, int]]:
    """Row ranges of about TILE_FLOATS weights (multiples of 16 rows), at least two per worker when R allows."""
    rows = max(16, min(R, TILE_FLOATS // C // 16 * 16))
    if workers > 1:
        rows = max(16, min(rows, -(-R // (2 * workers)) // 16 * 16 or 16))
    return [(r0, min(R, r0 + rows)) for r0 in range(0, R, rows)]


def _tile_buffer(rows: int, cols: int) -> np.ndarray:
    """A reused float32 (rows, cols) buffer for this thread (avoids page-faulting fresh memory on every call)."""
    buf = getattr(_scratch, "buf", None)
    if buf is None or buf.size < rows * cols:
        buf = np.empty(rows * cols, np.float32)
        _scratch.buf = buf
    return buf[: rows * cols].reshape(rows, cols)


class Matrix:
    """A stored weight matrix W (R, C). Subclasses (one per storage scheme, in rwkv_lite/schemes/) implement
    ``_gemv``, ``_dequantize`` and ``_arrays``, and may override ``_matmul_rows`` (several sequences' decode rows at
    once, kernels/batched.py) and ``_tile``; those with a fused multi-matrix GEMV set ``many_key`` and implement
    ``_many_runner`` (see gemv_many)."""

    scheme = "?"
    # Matrices whose many_key is equal (not None) can share one gemv_many launch: the subclass, its group and
    # widths. None: this matrix always runs its own GEMV.
    many_key = None
    # Whether _gemv wants its input on a cache line (the row-major kernels' aligned loads); checking costs a few
    # microseconds per call (ndarray.ctypes), ~120 calls per token.
    aligned_input = True

    def __init__(self, shape: tuple[int, int], params: dict):
        self.shape = (int(shape[0]), int(shape[1]))
        self.params = dict(params)
        self.parallel = self.shape[0] * self.shape[1] >= PARALLEL_MIN_WEIGHTS and self.shape[0] > 1
        self.padded_cols = self.shape[1]     # the stored width (larger for layouts padded to whole blocks)

    # --- public -------------------------------------------------------------------------------------------------
    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        C = self.shape[1]
        if x.shape[-1] != C or x.ndim not in (1, 2):
            raise ValueError(f"{self.scheme} matrix {self.shape} cannot multiply an input of shape {x.shape}")
        if x.ndim == 1:
            return self._gemv(simd.aligned(x) if self.aligned_input else x)
        if x.shape[0] == 1:
            return self._gemv(simd.aligned(x[0]) if self.aligned_input else x[0])[None, :]
        return self._gemm(x)

    def rows(self, ids) -> np.ndarray:
        """float32 (len(ids), C): rows `ids` of W, dequantised."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        R = self.shape[0]
        if ids.size and (ids.min() < 0 or ids.max() >= R):
            raise IndexError(f"row ids must lie in [0, {R}), got {ids.min()}..{ids.max()}")
        out = np.empty((ids.size, self.shape[1]), np.float32)
        self._dequantize(ids, out)
        return out

    @property
    def nbytes(self) -> int:
        """Bytes stored for this matrix (what one decode GEMV reads)."""
        return sum(a.nbytes for a in self._arrays())

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.scheme} {self.shape[0]}x{self.shape[1]} {self.params}>"

    # --- implementation -----------------------------------------------------------------------------------------
    def _gemm(self, X: np.ndarray) -> np.ndarray:
        T, C = X.shape
        R = self.shape[0]
        Y = np.empty((T, R), np.float32)
        tiles = _tiles(R, C, tile_workers())

        def run(tile):
            r0, r1 = tile
            w = self._tile(r0, r1)
            np.matmul(X, w.T, out=Y[:, r0:r1])
        parallel_map(run, tiles)
        return Y

    def _tile(self, r0: int, r1: int) -> np.ndarray:
        """Rows r0..r1 of W as float32 (dequantised into this thread's reused buffer)."""
        w = _tile_buffer(r1 - r0, self.shape[1])
        self._dequantize(np.arange(r0, r1, dtype=np.int64), w)
        return w

    def _matmul_rows(self, X: np.ndarray, parallel: bool) -> np.ndarray:
        """(B, R): row b exactly self._gemv(X[b]) (B >= 2); schemes with a batched kernel override this."""
        return np.stack([self(x) for x in X])

    def _gemv(self, x):            # pragma: no cover - abstract
        raise NotImplementedError

    def _dequantize(self, ids, out):   # pragma: no cover - abstract
        raise NotImplementedError

    def _arrays(self):             # pragma: no cover - abstract
        raise NotImplementedError


def gemv_many(matrices, xs) -> list[np.ndarray]:
    """[W x for W, x in zip(matrices, xs)] for one token (each x float32 (C,)).

    Matrices of one quantized scheme, group and width (a layer's r/k/v/g projections, RWKV-7's LoRA factors: equal
    ``many_key``) share one parallel launch (their class's ``_many_runner``: int8_kernels.gemv_i8g_many,
    int4_kernels.gemv_i4_many, kernels/panel.gemv_many) when together they are worth a parallel launch; the others
    run one GEMV each. The results are identical either way.

    A decode step makes this call ~3 times per layer with the same matrices, so the grouping and each group's
    kernel arguments are worked out once and kept on the first matrix (_ManyPlan): building them on every call
    cost 6-10% of a 1.5B decode token (docs/performance.md)."""
    plan = _many_plan(matrices)
    out = [None] * len(matrices)
    for i in plan.singles:
        out[i] = matrices[i](xs[i])
    for idx, run, C, width in plan.launches:
        X = np.zeros((len(idx), width), np.float32)
        for row, i in enumerate(idx):
            if xs[i].shape != (C,):
                m = matrices[i]
                raise ValueError(f"{m.scheme} matrix {m.shape} cannot multiply an input of shape {xs[i].shape}")
            X[row, :C] = xs[i]
        for i, y in zip(idx, run(X)):
            out[i] = y
    return out


class _ManyPlan:
    """How gemv_many runs one tuple of matrices: `singles` (indices run one GEMV each) and `launches`
    (indices, runner(X) -> one result per matrix, input width, padded width). It holds the matrices, so the
    ids it is looked up by stay theirs while it exists."""

    def __init__(self, matrices):
        self.matrices = tuple(matrices)
        groups: dict = {}
        self.singles = []
        for i, m in enumerate(matrices):
            if m.many_key is None:
                self.singles.append(i)
            else:
                groups.setdefault(m.many_key, []).append(i)
        self.launches = []
        for idx in groups.values():
            group = [matrices[i] for i in idx]
            if len(idx) < 2 or sum(m.shape[0] * m.shape[1] for m in group) < PARALLEL_MIN_WEIGHTS:
                self.singles.extend(idx)
                continue
            first = group[0]
            self.launches.append((idx, first._many_runner(group), first.shape[1], first.padded_cols))


def _many_plan(matrices) -> _ManyPlan:
    first = matrices[0]
    plans = first.__dict__.setdefault("_many_plans", {})
    key = tuple(map(id, matrices))
    plan = plans.get(key)
    if plan is None:
        plan = plans[key] = _ManyPlan(matrices)
    return plan


def chain_runner(downs, ups, middles):
    """run(xs) -> [B_m f_m(A_m x_m) for each m], one token (x_m float32 (C,)) through n pairs of low-rank factors
    A_m = downs[m] (D_m, C), B_m = ups[m] (R, D_m) with middle steps f_m = middles[m] ("linear", "tanh",
    "sigmoid"), in one launch where the factors' scheme has one (``_chain_runner``: int8 panel matrices,
    kernels/panel.lora_chain); None otherwise (then: gemv_many, the activation, gemv_many; the same bits)."""
    make = getattr(type(downs[0]), "_chain_runner", None)
    return None if make is None else make(tuple(downs), tuple(ups), tuple(middles))


def row_major_many_runner(kernel, matrices, weights, scales):
    """The `_many_runner` of the row-major int8/int4 schemes: one launch of `kernel` (int8_kernels.gemv_i8g_many,
    int4_kernels.gemv_i4_many) over the arrays `weights` and `scales` of every matrix; its concatenated output
    is handed back as one view per matrix."""
    first = matrices[0]
    ws, ss = tuple(getattr(m, weights) for m in matrices), tuple(getattr(m, scales) for m in matrices)
    rows = np.array([m.shape[0] for m in matrices], np.int64)
    ends = np.cumsum(rows).tolist()
    starts = [0] + ends[:-1]
    source, group = first.block_source, first.group

    def run(X):
        y = kernel(ws, ss, X, source, group, rows)
        return [y[a:b] for a, b in zip(starts, ends)]
    return run


def padded_columns(X: np.ndarray, cols: int) -> np.ndarray:
    """X (B, C) widened with zero columns to `cols` (X itself when already that wide): padded layouts' kernels
    read activations up to the stored width, where zero activations meet zero weights."""
    if X.shape[1] == cols:
        return X
    Xp = np.zeros((X.shape[0], cols), np.float32)
    Xp[:, :X.shape[1]] = X
    return Xp
