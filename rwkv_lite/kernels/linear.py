"""Weight matrices ready to compute with: y = W x for one token, Y = X W^T for a sequence, and row lookups.

A ``Matrix`` wraps the stored arrays of one 2-D weight (views of the mapped model file; never copied) and picks
the kernel for its storage scheme (layouts: ``rwkv_lite.quantize.schemes``; kernels: kernels/simd.py and
the per-scheme kernel modules beside it):

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

from ..errors import FormatError
from . import fp_kernels, int4_kernels, int8_kernels, simd
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
    """A stored weight matrix W (R, C). Subclasses implement ``_gemv`` and ``_dequantize``; fp32 overrides more."""

    scheme = "?"

    def __init__(self, shape: tuple[int, int], params: dict):
        self.shape = (int(shape[0]), int(shape[1]))
        self.params = dict(params)
        self.parallel = self.shape[0] * self.shape[1] >= PARALLEL_MIN_WEIGHTS and self.shape[0] > 1

    # --- public -------------------------------------------------------------------------------------------------
    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        C = self.shape[1]
        if x.shape[-1] != C or x.ndim not in (1, 2):
            raise ValueError(f"{self.scheme} matrix {self.shape} cannot multiply an input of shape {x.shape}")
        if x.ndim == 1:
            return self._gemv(simd.aligned(x))
        if x.shape[0] == 1:
            return self._gemv(simd.aligned(x[0]))[None, :]
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

    def _gemv(self, x):            # pragma: no cover - abstract
        raise NotImplementedError

    def _dequantize(self, ids, out):   # pragma: no cover - abstract
        raise NotImplementedError

    def _arrays(self):             # pragma: no cover - abstract
        raise NotImplementedError


class Fp32Matrix(Matrix):
    scheme = "fp32"

    def __init__(self, w, params):
        super().__init__(w.shape, params)
        self.w = w

    def _gemv(self, x):
        # a Numba kernel, not BLAS: decode keeps one owner of the cores (kernels/threads.py)
        return (fp_kernels.gemv_f32 if self.parallel else fp_kernels.gemv_f32_serial)(self.w, x)

    def _tile(self, r0, r1):
        return self.w[r0:r1]

    def _dequantize(self, ids, out):
        np.take(self.w, ids, axis=0, out=out)

    def _arrays(self):
        return (self.w,)


class Fp16Matrix(Matrix):
    scheme = "fp16"

    def __init__(self, w, params):
        super().__init__(w.shape, params)
        self.bits = w.view(np.uint16)          # Numba has no float16 type; the kernels convert the bits

    def _gemv(self, x):
        return (fp_kernels.gemv_f16 if self.parallel else fp_kernels.gemv_f16_serial)(self.bits, x)

    def _dequantize(self, ids, out):
        fp_kernels.dequantize_rows_f16(self.bits, ids, out)

    def _arrays(self):
        return (self.bits,)


class Int8Matrix(Matrix):
    scheme = "int8"

    def __init__(self, q, scale, params):
        super().__init__(q.shape, params)
        self.q, self.scale = q, scale

    def _gemv(self, x):
        return (int8_kernels.gemv_i8 if self.parallel else int8_kernels.gemv_i8_serial)(self.q, self.scale, x)

    def _dequantize(self, ids, out):
        int8_kernels.dequantize_rows_i8(self.q, self.scale, ids, out)

    def _arrays(self):
        return (self.q, self.scale)


class Int8GroupMatrix(Matrix):
    """int8 with an fp16 scale per group of `group` columns (see schemes.Int8)."""
    scheme = "int8"

    def __init__(self, q, scale, group, shape, params):
        super().__init__(shape, params)
        self.q, self.scale, self.group = q, scale, int(group)
        self.padded_cols = q.shape[1]
        self.block_source = np.arange(self.padded_cols, dtype=np.int64)   # natural order (no block permutation)

    def _gemv(self, x):
        if self.padded_cols != x.shape[0]:
            xp = simd.aligned(np.zeros(self.padded_cols, np.float32))
            xp[: x.shape[0]] = x
            x = xp
        kernel = int8_kernels.gemv_i8g if self.parallel else int8_kernels.gemv_i8g_serial
        return kernel(self.q, self.scale, x, self.block_source, self.group)

    def _dequantize(self, ids, out):
        int8_kernels.dequantize_rows_i8g(self.q, self.scale, self.group, ids, out)

    def _arrays(self):
        return (self.q, self.scale)


class Int4Matrix(Matrix):
    scheme = "int4"

    def __init__(self, packed, groups, group, shape, params):
        super().__init__(shape, params)
        self.packed, self.groups, self.group = packed, groups, int(group)
        self.padded_cols = packed.shape[1] * 2
        self.block_source = int4_kernels.block_source(self.group, self.padded_cols)

    def _padded(self, x):
        if self.padded_cols == x.shape[0]:
            return x
        xp = simd.aligned(np.zeros(self.padded_cols, np.float32))   # the kernel reads x up to the padded width
        xp[: x.shape[0]] = x
        return xp

    def _gemv(self, x):
        kernel = int4_kernels.gemv_i4 if self.parallel else int4_kernels.gemv_i4_serial
        return kernel(self.packed, self.groups, self._padded(x), self.block_source, self.group)

    def gemv_exact(self, x):
        """W x with x kept in float32 (the default kernel rounds x to 15 bits per block:
        simd.quantize_activations)."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        return int4_kernels.gemv_i4_exact(self.packed, self.groups, self._padded(x), self.block_source, self.group)

    def _dequantize(self, ids, out):
        int4_kernels.dequantize_rows_i4(self.packed, self.groups, self.group, ids, out)

    def _arrays(self):
        return (self.packed, self.groups)


def gemv_many(matrices, xs) -> list[np.ndarray]:
    """[W x for W, x in zip(matrices, xs)] for one token (each x float32 (C,)).

    Matrices of one quantized scheme, group and width (a layer's r/k/v/g projections) share one parallel launch
    (int8_kernels.gemv_i8g_many, int4_kernels.gemv_i4_many); anything else runs one GEMV each. The results are
    identical either way."""
    first = matrices[0]
    kind = type(first)
    if (len(matrices) < 2 or kind not in (Int8GroupMatrix, Int4Matrix)
            or any(type(m) is not kind or not m.parallel or m.group != first.group
                   or m.padded_cols != first.padded_cols or m.shape[1] != first.shape[1] for m in matrices)):
        return [m(x) for m, x in zip(matrices, xs)]
    C = first.shape[1]
    X = np.zeros((len(matrices), first.padded_cols), np.float32)
    for i, x in enumerate(xs):
        if x.shape != (C,):
            raise ValueError(f"{first.scheme} matrix {first.shape} cannot multiply an input of shape {x.shape}")
        X[i, :C] = x
    rows = np.array([m.shape[0] for m in matrices], np.int64)
    if kind is Int8GroupMatrix:
        y = int8_kernels.gemv_i8g_many(tuple(m.q for m in matrices), tuple(m.scale for m in matrices), X,
                                  first.block_source, first.group, rows)
    else:
        y = int4_kernels.gemv_i4_many(tuple(m.packed for m in matrices), tuple(m.groups for m in matrices), X,
                                 first.block_source, first.group, rows)
    return np.split(y, np.cumsum(rows)[:-1])


def _need(parts: dict, suffix: str, dtype, ndim: int, scheme: str) -> np.ndarray:
    arr = parts.get(suffix)
    if arr is None:
        raise FormatError(f"{scheme} matrix: stored array {suffix or '(main)'!r} is missing")
    arr = np.asarray(arr)
    if arr.ndim != ndim:
        raise FormatError(f"{scheme} matrix: array {suffix or '(main)'!r} has {arr.ndim} dimensions, expected {ndim}")
    if arr.dtype != np.dtype(dtype):
        raise FormatError(f"{scheme} matrix: array {suffix or '(main)'!r} is {arr.dtype}, expected {np.dtype(dtype)}")
    if not arr.flags.c_contiguous:
        arr = np.ascontiguousarray(arr)          # only for arrays built in memory; file views are contiguous
    return arr


def make_matrix(scheme_name: str, params: dict, parts: dict, shape: tuple[int, int] | None = None) -> Matrix:
    """A Matrix from a scheme's stored parts (suffix -> array; see ``Scheme.parts``).

    `shape` (R, C) is the logical shape; it is needed only for int4 matrices whose column count is not a multiple
    of the group (their last group is padded), and checked against the parts when given."""
    params = dict(params or {})
    if scheme_name == "fp32":
        m = Fp32Matrix(_need(parts, "", np.float32, 2, "fp32"), params)
    elif scheme_name == "fp16":
        m = Fp16Matrix(_need(parts, "", np.float16, 2, "fp16"), params)
    elif scheme_name == "int8" and not params.get("group", 32):         # group 0: one scale per row
        q = _need(parts, "", np.int8, 2, "int8")
        scale = _need(parts, ".scale", np.float32, 1, "int8")
        if scale.shape[0] != q.shape[0]:
            raise FormatError(f"int8 matrix: {scale.shape[0]} scales for {q.shape[0]} rows")
        m = Int8Matrix(q, scale, params)
    elif scheme_name == "int8":
        group = int(params.get("group", 32))
        if group not in simd.INT4_GROUPS:
            raise FormatError(f"int8 matrix: group size {group} is not one of 0, {simd.INT4_GROUPS}")
        q = _need(parts, "", np.int8, 2, "int8")
        scale = _need(parts, ".scale", np.float16, 2, "int8").view(np.uint16)
        R, padded = q.shape
        if padded % max(group, simd.INT4_BLOCK) or scale.shape != (R, padded // group):
            raise FormatError(f"int8 matrix: q {q.shape} and scales {scale.shape} do not fit group {group}")
        C = padded if shape is None else int(shape[1])
        if not padded - max(group, simd.INT4_BLOCK) < C <= padded:
            raise FormatError(f"int8 matrix: {C} columns do not fit a stored width of {padded}")
        m = Int8GroupMatrix(q, scale, group, (R, C), params)
    elif scheme_name == "int4":
        group = int(params.get("group", 32))
        if group not in simd.INT4_GROUPS:
            raise FormatError(f"int4 matrix: group size {group} is not one of {simd.INT4_GROUPS}")
        packed = _need(parts, "", np.uint8, 2, "int4")
        groups = _need(parts, ".groups", np.uint16, 2, "int4")
        R, padded = packed.shape[0], packed.shape[1] * 2
        if padded % max(group, simd.INT4_BLOCK) or groups.shape != (R, padded // group):
            raise FormatError(f"int4 matrix: packed {packed.shape} and groups {groups.shape} do not fit group {group}")
        C = padded if shape is None else int(shape[1])
        if not padded - max(group, simd.INT4_BLOCK) < C <= padded:
            raise FormatError(f"int4 matrix: {C} columns do not fit a packed width of {padded}")
        m = Int4Matrix(packed, groups, group, (R, C), params)
    else:
        raise FormatError(f"unknown storage scheme {scheme_name!r}")
    if shape is not None and tuple(int(s) for s in shape) != m.shape:
        raise FormatError(f"{scheme_name} matrix: stored arrays give shape {m.shape}, expected {tuple(shape)}")
    return m
