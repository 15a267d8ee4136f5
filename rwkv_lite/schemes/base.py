"""What every storage scheme provides, and the checks they share.

A scheme stores a 2-D weight matrix W (R rows = outputs, C columns = inputs; PyTorch's (out, in) order) as one or
more arrays, its "parts", and turns them back into a runtime ``Matrix`` (kernels/linear.py) whose GEMV/GEMM entry
points are that scheme's kernels. Every part's first axis is the row, and quantizing rows a..b gives exactly rows
a..b of the whole matrix's parts (each row is quantized on its own), so the converter can stream a 65536 x 4096
matrix in row blocks. The file stores part `suffix` of tensor `name` as the array `name + suffix`.
"""
from __future__ import annotations

import math

import numpy as np

from ..errors import FormatError


class SchemeError(FormatError, ValueError):
    """An unknown scheme name, bad scheme parameters, weights a scheme cannot store, or stored arrays that do not
    fit the scheme."""


class Scheme:
    """One storage scheme with its parameters. Each subclass's module docstring describes its layout."""

    name = "?"
    # Rows per first-axis entry of the parts: quantizing rows a..b gives entries a/row_step.. of the parts when a is
    # a multiple of row_step (16 for the panel layout of schemes/panel.py), so the converter's row blocks are.
    row_step = 1

    def __init__(self):
        self.params = {}                 # JSON-serialisable; stored per tensor in the file's metadata

    # --- layout ---------------------------------------------------------------------------------------------------
    def parts(self, shape) -> dict:
        """suffix -> (numpy dtype, shape) of each stored array, for a matrix of `shape` (R, C)."""
        raise NotImplementedError

    def bits_per_weight(self, shape) -> float:
        """Stored bits / (R * C), scales included."""
        R, C = matrix_shape(shape)
        total = sum(np.dtype(dt).itemsize * math.prod(sh) for dt, sh in self.parts(shape).values())
        return 8.0 * total / (R * C)

    # --- converter side: float32 rows <-> parts --------------------------------------------------------------------
    def quantize(self, rows: np.ndarray) -> dict:
        """float32 rows (r, C) -> parts for those rows."""
        raise NotImplementedError

    def dequantize(self, parts: dict, cols: int | None = None) -> np.ndarray:
        """float32 (R, C) from parts (for tests and reference computations; the engine uses the kernels). Padded
        layouts return the padded width unless `cols` (the logical C) is given."""
        raise NotImplementedError

    # --- runtime side: parts -> Matrix ---------------------------------------------------------------------------
    def matrix(self, parts: dict, shape: tuple[int, int] | None = None):
        """The runtime Matrix over `parts` (suffix -> array; views of a mapped file are used in place). Checks the
        parts' dtypes, dimensions and fit (SchemeError). `shape` (R, C) is the logical shape: needed only for
        padded layouts whose column count is not a multiple of the block, and checked against the parts."""
        m = self._matrix(parts, shape)
        if shape is not None and tuple(int(s) for s in shape) != m.shape:
            raise SchemeError(f"{self.name} matrix: stored arrays give shape {m.shape}, expected {tuple(shape)}")
        return m

    def open(self, name: str, arrays, shape: tuple[int, int]):
        """The Matrix of tensor `name` of logical `shape` from a file's arrays (a mapping of array name -> array):
        each part must be present with exactly the dtype and shape that ``parts(shape)`` gives."""
        parts = {}
        for suffix, (dtype, part_shape) in self.parts(shape).items():
            arr = arrays.get(name + suffix)
            if arr is None:
                raise SchemeError(f"its {self.name} array {name + suffix!r} is missing")
            if arr.dtype != np.dtype(dtype) or tuple(arr.shape) != tuple(part_shape):
                raise SchemeError(f"its {self.name} array {name + suffix!r} is {arr.dtype}{list(arr.shape)}, "
                                  f"expected {np.dtype(dtype)}{list(part_shape)}")
            parts[suffix] = arr
        return self.matrix(parts, shape)

    def _matrix(self, parts: dict, shape):
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<Scheme {self.name} {self.params}>"

    # --- helpers for subclasses ---------------------------------------------------------------------------------
    def _rows(self, rows) -> np.ndarray:
        """Rows to quantize as a C-contiguous float32 2-D array; NaN or Inf refused."""
        rows = np.ascontiguousarray(rows, dtype=np.float32)
        if rows.ndim != 2:
            raise SchemeError(f"{self.name}: expected a 2-D block of rows, got shape {rows.shape}")
        if not np.isfinite(rows).all():
            bad = int(np.argwhere(~np.isfinite(rows))[0, 0])
            raise SchemeError(f"{self.name}: weights contain NaN or Inf (row {bad} of this block)")
        return rows

    def _part(self, parts: dict, suffix: str, dtype, ndim: int) -> np.ndarray:
        """Part `suffix` as a C-contiguous array of `dtype` and `ndim` dimensions (SchemeError otherwise)."""
        arr = parts.get(suffix)
        what = f"{self.name} matrix: array {suffix or '(main)'!r}"
        if arr is None:
            raise SchemeError(f"{self.name} matrix: stored array {suffix or '(main)'!r} is missing")
        arr = np.asarray(arr)
        if arr.ndim != ndim:
            raise SchemeError(f"{what} has {arr.ndim} dimensions, expected {ndim}")
        if arr.dtype != np.dtype(dtype):
            raise SchemeError(f"{what} is {arr.dtype}, expected {np.dtype(dtype)}")
        if not arr.flags.c_contiguous:
            arr = np.ascontiguousarray(arr)          # only for arrays built in memory; file views are contiguous
        return arr

    def _logical_cols(self, padded: int, step: int, shape) -> int:
        """The logical column count of a layout padded to a multiple of `step`: shape[1] if given (checked to fit
        `padded`), else `padded`."""
        C = padded if shape is None else int(shape[1])
        if not padded - step < C <= padded:
            raise SchemeError(f"{self.name} matrix: {C} columns do not fit a stored width of {padded}")
        return C


def matrix_shape(shape) -> tuple[int, int]:
    """(R, C) of a 2-D shape with both sides >= 1 (SchemeError otherwise)."""
    if len(shape) != 2 or min(shape) < 1:
        raise SchemeError(f"storage schemes take 2-D matrices, got shape {tuple(shape)}")
    return int(shape[0]), int(shape[1])


def group_param(scheme: str, group, allowed: tuple) -> int:
    """A validated integer `group` parameter."""
    if isinstance(group, bool) or not isinstance(group, (int, np.integer)) or int(group) not in allowed:
        extra = " (0: one scale per row)" if 0 in allowed else ""
        raise SchemeError(f"{scheme}: group must be one of {allowed}{extra}, got {group!r}")
    return int(group)
