"""Storage schemes for a 2-D weight matrix W (R rows = outputs, C columns = inputs; PyTorch's (out, in) order).

A scheme turns float32 rows into the arrays ("parts") stored in the model file and back. Every part's first axis
is the row, and quantizing rows a..b gives exactly rows a..b of the whole matrix's parts (each row is quantized on
its own), so the converter can stream a 65536 x 4096 matrix in row blocks. The file stores part `suffix` of
tensor `name` as the array `name + suffix`.

  fp32   {'': float32 (R, C)}                                                          32 bits/weight
  fp16   {'': float16 (R, C)}  (round to nearest even; overflow becomes +-inf: refused)     16
  int8   params {'group': G}, G in 0, 32, 64, 128 (default 32); symmetric, q in -127..127.
         G = 0: {'': int8 (R, C), '.scale': float32 (R,)}                                 8 + 32/C
                W[r, c] = scale[r] * q[r, c], scale = max|row| / 127 (one scale per output row; a clipped,
                error-minimising row scale was measured and dropped: 1% lower RMSE on Gaussian rows of 4096,
                no change on the tiny models).
         G > 0: {'': int8 (R, Cp), '.scale': float16 (R, Cp/G)}, Cp = C rounded up to a multiple of 64 and of G
                (padding q = 0):                                                           8 + 16/G
                W[r, c] = scale[r, c // G] * q[r, c], the fp16 scale of each group chosen among
                max|group| * (1.0, 0.98, ..., 0.8) / 127 by least squared error. Rows with outliers keep their
                precision elsewhere: on Student-t(4) rows of 4096 the error is 4x lower than one scale per row.
                The default: on the tiny 5v2 model mean KL 2.46e-4 (G = 32) against 3.3e-4 (one scale per row),
                and its kernel (int16 activations) decodes faster from memory despite the extra 0.5 bit.
  int4   {'': uint8 (R, Cp/2), '.groups': uint16 (R, Cp/G)},  params {'group': G}, G in 32, 64, 128 (default 32),
         Cp = C rounded up to a multiple of 64 and of G (the padding columns hold q = 0).    4 + 16/G
         Columns are cut into groups of G; group g of row r covers columns g*G .. g*G+G-1 and has G/2 bytes:
         byte i holds column g*G+i in its low nibble and column g*G+G/2+i in its high nibble.
         Its 16-bit word u gives a scale and a zero point:
             d = (1 + (u & 15) / 16) * 2**(((u >> 4) & 31) - 24)      (5-bit exponent, 4-bit mantissa)
             z = (u >> 9) / 8                                          (0 .. 15.875, steps of 1/8)
             W[r, c] = d * (q[r, c] - z),  q = 0..15
         so a group holds 16 evenly spaced levels anywhere from d*(-15.875) .. d*(-0.875) up to 0 .. 15*d.
         Quantizing searches, per group, the scale codes around range/15 and, for each, alternates nearest-level
         assignment with the least-squares zero point (rounded to its grid); it keeps the pair with the smallest
         squared error (optionally weighted per input column: Int4.quantize(rows, importance), e.g. the mean
         square of each column's inputs from calibration; GPTQ in quantize/gptq.py goes further on the same
         layout). At G = 32 that is 4.5 bits/weight, like ggml's Q4_0 (blocks of 32 with an fp16 scale),
         with about 30% less squared error than Q4_0 on real and Gaussian weights (bench/bench_kernels.py
         --quality) and 30% lower mean KL on the tiny 5v2 model.

The kernels that read these layouts are in rwkv_lite/kernels/ (simd.py and the per-scheme *_kernels.py).
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from ..errors import FormatError
from ..kernels.int4_kernels import int4_scale
from ..kernels.simd import INT4_BLOCK, INT4_GROUPS, f16_to_f32, f32_to_f16


class SchemeError(FormatError, ValueError):
    """An unknown scheme name, bad scheme parameters, or weights a scheme cannot store."""


class Scheme:
    """One storage scheme with its parameters. See the module docstring for the layouts."""

    name = "?"

    def __init__(self):
        self.params = {}                 # JSON-serialisable; stored per tensor in the file's metadata

    def parts(self, shape) -> dict:
        """suffix -> (numpy dtype, shape) of each stored array, for a matrix of `shape` (R, C)."""
        raise NotImplementedError

    def quantize(self, rows: np.ndarray) -> dict:
        """float32 rows (r, C) -> parts for those rows."""
        raise NotImplementedError

    def dequantize(self, parts: dict) -> np.ndarray:
        """float32 (R, C) from parts (for tests and reference computations; the engine uses the kernels)."""
        raise NotImplementedError

    def bits_per_weight(self, shape) -> float:
        """Stored bits / (R * C), scales included."""
        R, C = _shape2(shape)
        total = sum(np.dtype(dt).itemsize * math.prod(sh) for dt, sh in self.parts(shape).values())
        return 8.0 * total / (R * C)

    def __repr__(self) -> str:
        return f"<Scheme {self.name} {self.params}>"

    # helpers
    def _rows(self, rows) -> np.ndarray:
        rows = np.ascontiguousarray(rows, dtype=np.float32)
        if rows.ndim != 2:
            raise SchemeError(f"{self.name}: expected a 2-D block of rows, got shape {rows.shape}")
        if not np.isfinite(rows).all():
            bad = int(np.argwhere(~np.isfinite(rows))[0, 0])
            raise SchemeError(f"{self.name}: weights contain NaN or Inf (row {bad} of this block)")
        return rows


def _shape2(shape) -> tuple[int, int]:
    if len(shape) != 2 or min(shape) < 1:
        raise SchemeError(f"storage schemes take 2-D matrices, got shape {tuple(shape)}")
    return int(shape[0]), int(shape[1])


class Fp32(Scheme):
    name = "fp32"

    def parts(self, shape):
        return {"": (np.dtype(np.float32), _shape2(shape))}

    def quantize(self, rows):
        return {"": np.array(rows, dtype=np.float32, order="C")}

    def dequantize(self, parts):
        return np.asarray(parts[""], dtype=np.float32)


class Fp16(Scheme):
    name = "fp16"

    def parts(self, shape):
        return {"": (np.dtype(np.float16), _shape2(shape))}

    def quantize(self, rows):
        rows = self._rows(rows)
        if rows.size and np.abs(rows).max() > 65504:
            raise SchemeError("fp16: weights exceed the float16 range (|w| > 65504)")
        return {"": rows.astype(np.float16)}

    def dequantize(self, parts):
        return parts[""].astype(np.float32)


# ----------------------------------------------------------------------------------------------------------------
# int8

INT8_GROUPS = (0, 32, 64, 128)            # 0: one scale per row
INT8_CLIP_RATIOS = np.linspace(1.0, 0.8, 11).astype(np.float32)   # fractions of a group's max |w| tried


@njit(cache=True, parallel=True)
def _quantize_int8_rows(rows, q, scale):
    R, C = rows.shape
    for r in prange(R):
        amax = np.float32(0.0)
        for c in range(C):
            amax = max(amax, abs(rows[r, c]))
        s = amax / np.float32(127.0)
        scale[r] = s
        inv = np.float32(1.0) / s if s > 0 else np.float32(0.0)
        for c in range(C):
            q[r, c] = np.int8(min(127.0, max(-127.0, np.rint(rows[r, c] * inv))))


@njit(cache=True, parallel=True)
def _quantize_int8_groups(rows, group, ratios, q, scale):
    R, C = rows.shape
    for r in prange(R):
        q[r, C:] = 0
        for g in range(scale.shape[1]):
            c0, c1 = g * group, min(C, (g + 1) * group)
            amax = np.float32(0.0)
            for c in range(c0, c1):
                amax = max(amax, abs(rows[r, c]))
            best_err, best = np.inf, np.float32(0.0)
            for ratio in ratios:                     # clipped scales, stored as fp16: keep the least squared error
                d = f16_to_f32(f32_to_f16(amax * ratio / np.float32(127.0)))
                if d == 0:
                    continue
                inv = np.float32(1.0) / d
                err = np.float32(0.0)
                for c in range(c0, c1):
                    e = rows[r, c] - np.float32(min(127.0, max(-127.0, np.rint(rows[r, c] * inv)))) * d
                    err += e * e
                if err < best_err:
                    best_err, best = err, d
            scale[r, g] = f32_to_f16(best)
            inv = np.float32(1.0) / best if best > 0 else np.float32(0.0)
            for c in range(c0, c1):
                q[r, c] = np.int8(min(127.0, max(-127.0, np.rint(rows[r, c] * inv))))
            for c in range(c1, (g + 1) * group):
                q[r, c] = 0


class Int8(Scheme):
    name = "int8"

    def __init__(self, group=32):
        if isinstance(group, bool) or not isinstance(group, (int, np.integer)) or int(group) not in INT8_GROUPS:
            raise SchemeError(f"int8: group must be one of {INT8_GROUPS} (0: one scale per row), got {group!r}")
        super().__init__()
        self.group = int(group)
        self.params = {"group": self.group}

    def padded_cols(self, cols: int) -> int:
        if not self.group:
            return cols
        step = max(self.group, INT4_BLOCK)
        return -(-cols // step) * step

    def parts(self, shape):
        R, C = _shape2(shape)
        if not self.group:
            return {"": (np.dtype(np.int8), (R, C)), ".scale": (np.dtype(np.float32), (R,))}
        Cp = self.padded_cols(C)
        return {"": (np.dtype(np.int8), (R, Cp)), ".scale": (np.dtype(np.float16), (R, Cp // self.group))}

    def quantize(self, rows):
        rows = self._rows(rows)
        R, C = rows.shape
        if not self.group:
            q = np.empty(rows.shape, np.int8)
            scale = np.empty(R, np.float32)
            _quantize_int8_rows(rows, q, scale)
            return {"": q, ".scale": scale}
        Cp = self.padded_cols(C)
        q = np.empty((R, Cp), np.int8)
        scale = np.empty((R, Cp // self.group), np.uint16)
        _quantize_int8_groups(rows, self.group, INT8_CLIP_RATIOS, q, scale)
        return {"": q, ".scale": scale.view(np.float16)}

    def dequantize(self, parts, cols: int | None = None):
        q, scale = parts[""], parts[".scale"]
        if not self.group:
            return q.astype(np.float32) * scale[:, None]
        w = q.astype(np.float32) * np.repeat(scale.astype(np.float32), self.group, axis=1)
        return w[:, : cols or q.shape[1]]


# ----------------------------------------------------------------------------------------------------------------
# int4

INT4_SCALE_CODES = 512          # 9-bit scale code: 5-bit exponent, 4-bit mantissa
# Scale codes tried around the code of range/15: the best lies 1 below to 3 above it for 90% of groups, and
# within -2..+5 for 99% (tiny-model and Gaussian weights); wider searches change the RMSE in the 4th digit.
INT4_SEARCH_BELOW, INT4_SEARCH_ABOVE = 2, 5
INT4_FIT_ROUNDS = 2             # assignment / zero-point rounds per scale code


@njit(cache=True)
def _scale_code_at_most(v):
    """Largest 9-bit scale code whose scale is <= v (0 if none)."""
    if not v > 0:
        return 0
    e = math.floor(math.log2(v))
    if e + 24 < 0:
        return 0
    if e + 24 > 31:
        return INT4_SCALE_CODES - 1
    m = int((v / 2.0 ** e - 1.0) * 16)
    return ((e + 24) << 4) | min(m, 15)


@njit(cache=True, fastmath={"reassoc", "contract"})
def _fit_group(v, h, n, code):
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
    for _ in range(INT4_FIT_ROUNDS):
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
    lo = np.float32(0.0)                              # the levels always reach 0 from below: see docstring
    hi = v[0]
    for i in range(n):
        lo = min(lo, v[i])
        hi = max(hi, v[i])
    base = _scale_code_at_most((hi - lo) / 15)
    best_err = np.inf
    word = 0
    for code in range(max(0, base - INT4_SEARCH_BELOW), min(INT4_SCALE_CODES, base + INT4_SEARCH_ABOVE + 1)):
        z, err = _fit_group(v, h, n, code)
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

    def __init__(self, group=32):
        if isinstance(group, bool) or not isinstance(group, (int, np.integer)) or int(group) not in INT4_GROUPS:
            raise SchemeError(f"int4: group must be one of {INT4_GROUPS}, got {group!r}")
        super().__init__()
        self.group = int(group)
        self.params = {"group": self.group}

    def padded_cols(self, cols: int) -> int:
        step = max(self.group, INT4_BLOCK)
        return -(-cols // step) * step

    def parts(self, shape):
        R, C = _shape2(shape)
        Cp = self.padded_cols(C)
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
        return {"": packed, ".groups": words}

    def dequantize(self, parts, cols: int | None = None):
        """float32 (R, cols); cols defaults to the padded width (pass the logical C to drop the padding)."""
        packed, words = parts[""], parts[".groups"]
        out = np.empty((packed.shape[0], cols or packed.shape[1] * 2), np.float32)
        _dequantize_int4(packed, words, self.group, out)
        return out


SCHEMES = {"fp32": Fp32, "fp16": Fp16, "int8": Int8, "int4": Int4}


def get_scheme(name: str, **params) -> Scheme:
    """The scheme `name` with `params` (as stored per tensor in the file's metadata). Raises SchemeError (a
    FormatError and a ValueError) for unknown names or parameters."""
    cls = SCHEMES.get(name)
    if cls is None:
        raise SchemeError(f"unknown storage scheme {name!r} (known: {', '.join(SCHEMES)})")
    try:
        return cls(**params)
    except TypeError:
        raise SchemeError(f"{name}: unknown parameters {sorted(params)}") from None
