"""int4 storage: 4-bit weights in groups of G columns, each group with a 16-bit scale / zero-point word.

  {'': uint8 (R, Cp/2), '.groups': uint16 (R, Cp/G)},  params {'group': G}, G in 32, 64, 128 (default 32),
  Cp = C rounded up to a multiple of 64 and of G (the padding columns hold q = 0).          4 + 16/G bits/weight
  Columns are cut into groups of G; group g of row r covers columns g*G .. g*G+G-1 and has G/2 bytes:
  byte i holds column g*G+i in its low nibble and column g*G+G/2+i in its high nibble (so one vector load gives
  two contiguous runs of columns). Its 16-bit word u gives a scale and a zero point:
      d = (1 + (u & 15) / 16) * 2**(((u >> 4) & 31) - 24)      (5-bit exponent, 4-bit mantissa: 2**-24 .. 248)
      z = (u >> 9) / 8                                          (0 .. 15.875, steps of 1/8)
      W[r, c] = d * (q[r, c] - z),  q = 0..15
  so a group holds 16 evenly spaced levels anywhere from d*(-15.875) .. d*(-0.875) up to 0 .. 15*d.

Quantizing searches, per group, the scale codes around range/15 and, for each, alternates nearest-level
assignment with the least-squares zero point (rounded to its grid); it keeps the pair with the smallest squared
error (optionally weighted per input column: Int4.quantize(rows, importance), e.g. the mean square of each
column's inputs from calibration; GPTQ in the converter goes further on the same layout, with ``fit_group`` and
``scale_code_at_most`` below). At G = 32 that is 4.5 bits/weight, like ggml's Q4_0 (blocks of 32 with an fp16
scale), with about 30% less squared error than Q4_0 on real and Gaussian weights (bench/bench_kernels.py
--quality) and 30% lower mean KL on the tiny 5v2 model.

params {'group': 32, 'layout': 'p16'}: the same values in the panel layout of schemes/panel.py (the converter's
default): every product runs the integer kernels of kernels/panel.py, with activations rounded to 8 bits per 32
columns (free for 4-bit weights: mean KL +0.3-1.3% on the tiny real models).

Kernels (row-major layout): kernels/int4_kernels.py (``int4_scale``/``int4_zero`` decode a group word).
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from ..kernels import batched, int4_kernels
from ..kernels.int4_kernels import int4_scale
from ..kernels.linear import Matrix, padded_columns, row_major_many_runner
from ..kernels.simd import INT4_BLOCK, INT4_GROUPS, aligned
from . import panel
from .base import Scheme, SchemeError, group_param, matrix_shape

GROUPS = INT4_GROUPS


class Int4Matrix(Matrix):
    scheme = "int4"

    def __init__(self, packed, groups, group, shape, params):
        super().__init__(shape, params)
        self.packed, self.groups, self.group = packed, groups, int(group)
        self.padded_cols = packed.shape[1] * 2
        self.block_source = int4_kernels.block_source(self.group, self.padded_cols)
        self.many_key = (Int4Matrix, self.group, self.padded_cols, self.shape[1])

    def _padded(self, x):
        if self.padded_cols == x.shape[0]:
            return x
        xp = aligned(np.zeros(self.padded_cols, np.float32))   # the kernel reads x up to the padded width
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

    @staticmethod
    def _many_runner(matrices):
        return row_major_many_runner(int4_kernels.gemv_i4_many, matrices, "packed", "groups")

    def _matmul_rows(self, X, parallel):
        kernel = batched.gemm_i4 if parallel else batched.gemm_i4_serial
        return kernel(self.packed, self.groups, padded_columns(X, self.padded_cols), self.block_source, self.group)

    def _dequantize(self, ids, out):
        int4_kernels.dequantize_rows_i4(self.packed, self.groups, self.group, ids, out)

    def _arrays(self):
        return (self.packed, self.groups)


# ----------------------------------------------------------------------------------------------------------------
# Quantization (the converter's side of the layout)

SCALE_CODES = 512          # 9-bit scale code: 5-bit exponent, 4-bit mantissa
# Scale codes tried around the code of range/15: the best lies 1 below to 3 above it for 90% of groups, and
# within -2..+5 for 99% (tiny-model and Gaussian weights); wider searches change the RMSE in the 4th digit.
SEARCH_BELOW, SEARCH_ABOVE = 2, 5
FIT_ROUNDS = 2             # assignment / zero-point rounds per scale code


@njit(cache=True)
def scale_code_at_most(v):
    """Largest 9-bit scale code whose scale is <= v (0 if none)."""
    if not v > 0:
        return 0
    e = math.floor(math.log2(v))
    if e + 24 < 0:
        return 0
    if e + 24 > 31:
        return SCALE_CODES - 1
    m = int((v / 2.0 ** e - 1.0) * 16)
    return ((e + 24) << 4) | min(m, 15)


@njit(cache=True, fastmath={"reassoc", "contract"})
def fit_group(v, h, n, code):
    """For scale code `code` and group values v[:n] with importances h[:n] (> 0): the zero-point code (0..127) and
    the importance-weighted squared error sum h (v - w)^2 after alternating nearest-level assignment with the
    weighted least-squares zero point."""
    d = int4_scale(np.uint16(code))
    inv = 1 / d
    lo = v[0]
    h_total = np.float32(0.0)
    for i in range(n):
        lo = min(lo, v[i])
        h_total += h[i]
    z = min(127.0, max(0.0, np.rint(-lo * inv * 8)))          # start: lowest level at the group's minimum
    for _ in range(FIT_ROUNDS):
        zf = np.float32(z) * np.float32(0.125)
        resid = np.float32(0.0)                                # sum h (v - d*q) = -d*z*sum(h) at the optimum
        for i in range(n):
            q = min(15.0, max(0.0, np.rint(v[i] * inv + zf)))
            resid += h[i] * (v[i] - d * np.float32(q))
        z = min(127.0, max(0.0, np.rint(-resid * inv * 8 / h_total)))
    zf = np.float32(z) * np.float32(0.125)
    err = np.float32(0.0)
    for i in range(n):
        q = min(15.0, max(0.0, np.rint(v[i] * inv + zf)))
        e = v[i] - d * (np.float32(q) - zf)
        err += h[i] * e * e
    return int(z), err


@njit(cache=True)
def _search_group(v, h, n):
    """The int4 group word (scale code | zero code << 9) for values v[:n] with importances h[:n]: the scale codes
    around range/15, each with its fitted zero point, keeping the least importance-weighted squared error."""
    lo = np.float32(0.0)                              # the levels always reach 0 from below (module docstring)
    hi = v[0]
    for i in range(n):
        lo = min(lo, v[i])
        hi = max(hi, v[i])
    base = scale_code_at_most((hi - lo) / 15)
    best_err = np.inf
    word = 0
    for code in range(max(0, base - SEARCH_BELOW), min(SCALE_CODES, base + SEARCH_ABOVE + 1)):
        z, err = fit_group(v, h, n, code)
        if err < best_err:
            best_err, word = err, code | (z << 9)
    return word


@njit(cache=True, parallel=True)
def _quantize_int4(rows, importance, group, packed, words):
    R, C = rows.shape
    half = group // 2
    ngroups = words.shape[1]
    for r in prange(R):
        v = np.zeros(group, np.float32)
        h = np.ones(group, np.float32)
        for g in range(ngroups):
            c0 = g * group
            n = min(group, C - c0)                            # real columns in this group (0 in pure padding)
            word = 0
            if n > 0:
                for i in range(n):
                    v[i] = rows[r, c0 + i]
                    h[i] = importance[c0 + i]
                word = _search_group(v, h, n)
            d = int4_scale(np.uint16(word))
            inv = 1 / d
            zf = np.float32(word >> 9) * np.float32(0.125)
            words[r, g] = word
            for i in range(half):
                lo_q = 0
                hi_q = 0
                if i < n:
                    lo_q = int(min(15.0, max(0.0, np.rint(v[i] * inv + zf))))
                if half + i < n:
                    hi_q = int(min(15.0, max(0.0, np.rint(v[half + i] * inv + zf))))
                packed[r, g * half + i] = np.uint8(lo_q | (hi_q << 4))


@njit(cache=True, parallel=True)
def _dequantize_int4(packed, words, group, out):
    R, C = out.shape
    half = group // 2
    for r in prange(R):
        for g in range(words.shape[1]):
            d = int4_scale(words[r, g])
            zf = np.float32(words[r, g] >> 9) * np.float32(0.125)
            for i in range(half):
                byte = packed[r, g * half + i]
                c = g * group + i
                if c < C:
                    out[r, c] = d * (np.float32(byte & 15) - zf)
                if c + half < C:
                    out[r, c + half] = d * (np.float32(byte >> 4) - zf)


def _importance(importance, C: int) -> np.ndarray:
    """(C,) float32 column weights, all 1 when not given; non-positive or non-finite weights are refused."""
    if importance is None:
        return np.ones(C, np.float32)
    h = np.asarray(importance, np.float32).reshape(-1)
    if h.shape != (C,):
        raise SchemeError(f"importance has {h.size} values for {C} columns")
    if not (np.isfinite(h).all() and (h > 0).all()):
        raise SchemeError("importance values must be finite and positive")
    return np.ascontiguousarray(h)


class Int4(Scheme):
    name = "int4"

    def __init__(self, group=32, layout="rows"):
        super().__init__()
        self.group = group_param("int4", group, GROUPS)
        self.layout = panel.layout_param("int4", layout, self.group)
        self.params = {"group": self.group, **({"layout": layout} if layout != "rows" else {})}
        self.row_step = panel.ROW_STEP if self.layout == "p16" else 1

    def padded_cols(self, cols: int) -> int:
        if self.layout == "p16":
            return panel.padded_cols(cols)
        step = max(self.group, INT4_BLOCK)
        return -(-cols // step) * step

    def parts(self, shape):
        R, C = matrix_shape(shape)
        Cp = self.padded_cols(C)
        if self.layout == "p16":
            P = panel.panels(R)
            return {"": (np.dtype(np.uint8), (P, Cp * 8)), ".groups": (np.dtype(np.uint16), (P, Cp // 2))}
        return {"": (np.dtype(np.uint8), (R, Cp // 2)), ".groups": (np.dtype(np.uint16), (R, Cp // self.group))}

    def quantize(self, rows, importance=None):
        """importance: optional (C,) positive weights per input column (e.g. the mean square of the activations
        each column meets, from calibration): the scale/zero search then minimises sum importance * error^2."""
        rows = self._rows(rows)
        R, C = rows.shape
        Cp = self.padded_cols(C)
        packed = np.empty((R, Cp // 2), np.uint8)
        words = np.empty((R, Cp // self.group), np.uint16)
        _quantize_int4(rows, _importance(importance, C), self.group, packed, words)
        if self.layout == "p16":
            return panel.pack_int4(_levels(packed, self.group), words)
        return {"": packed, ".groups": words}

    def dequantize(self, parts, cols=None, rows=None):
        """float32 (R, cols); cols defaults to the padded width (pass the logical C to drop the padding), and for
        the p16 layout R to the padded row count (pass the logical R)."""
        if self.layout == "p16":
            levels, words = panel.unpack_int4(parts, rows or parts[""].shape[0] * panel.ROW_STEP)
            parts = Int4(self.group).pack(levels, words)
        packed, words = parts[""], parts[".groups"]
        out = np.empty((packed.shape[0], cols or packed.shape[1] * 2), np.float32)
        _dequantize_int4(packed, words, self.group, out)
        return out

    def levels(self, parts: dict) -> tuple[np.ndarray, np.ndarray]:
        """Row-major parts -> level indices (R, Cp) uint8 0..15 in column order and the group words: pack's
        inverse (used to re-lay a file out)."""
        return _levels(np.asarray(parts[""]), self.group), np.asarray(parts[".groups"])

    def pack(self, levels: np.ndarray, words: np.ndarray) -> dict:
        """Parts from level indices `levels` (R, Cp) uint8 0..15 in column order (padding columns 0) and group words
        `words` (R, Cp/G) uint16: for quantizers that choose the levels themselves (GPTQ)."""
        R, Cp = levels.shape
        G, half = self.group, self.group // 2
        grouped = levels.reshape(R, Cp // G, G)
        if self.layout == "p16":
            return panel.pack_int4(np.ascontiguousarray(levels, np.uint8), np.ascontiguousarray(words, np.uint16))
        packed = (grouped[:, :, :half] | (grouped[:, :, half:] << 4)).reshape(R, Cp // 2)
        return {"": np.ascontiguousarray(packed, np.uint8), ".groups": np.ascontiguousarray(words, np.uint16)}

    def _matrix(self, parts, shape):
        if self.layout == "p16":
            wp = self._part(parts, "", np.uint8, 2)
            words = self._part(parts, ".groups", np.uint16, 2)
            R, padded = panel.check_shape(self.name, wp, words, shape, 8)
            return panel.PanelMatrix("int4", wp, words, (R, self._logical_cols(padded, panel.GROUP, shape)),
                                     self.params, lambda ids: _p16_rows(wp, words, ids))
        packed = self._part(parts, "", np.uint8, 2)
        groups = self._part(parts, ".groups", np.uint16, 2)
        R, padded = packed.shape[0], packed.shape[1] * 2
        step = max(self.group, INT4_BLOCK)
        if padded % step or groups.shape != (R, padded // self.group):
            raise SchemeError(f"int4 matrix: packed {packed.shape} and groups {groups.shape} do not fit group "
                              f"{self.group}")
        return Int4Matrix(packed, groups, self.group, (R, self._logical_cols(padded, step, shape)), self.params)


def _levels(packed: np.ndarray, group: int) -> np.ndarray:
    """Row-major packed nibbles (R, Cp / 2) -> levels (R, Cp) uint8 in column order."""
    R, half_cols = packed.shape
    g = packed.reshape(R, -1, group // 2)
    return np.concatenate([g & 15, g >> 4], axis=2).reshape(R, half_cols * 2)


def _p16_rows(wp, words, ids) -> np.ndarray:
    """Rows `ids` of a p16 int4 matrix, dequantised (float32, padded width)."""
    levels, w = panel.gather_rows(wp, words, ids)
    d, z = scale_and_zero(w)
    return (levels.astype(np.float32) - np.repeat(z, panel.GROUP, axis=1)) * np.repeat(d, panel.GROUP, axis=1)


def scale_and_zero(words: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float32 scale d and zero point z (in units of d) of int4 group words, elementwise (NumPy)."""
    u = words.astype(np.int64)
    d = ((1 + (u & 15) / 16) * np.exp2(((u >> 4) & 31) - 24)).astype(np.float32)
    z = ((u >> 9) / 8).astype(np.float32)
    return d, z
