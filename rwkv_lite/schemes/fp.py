"""Float storage: fp32 and fp16.

  fp32   {'': float32 (R, C)}                                                          32 bits/weight
  fp16   {'': float16 (R, C)}  (round to nearest even; overflow becomes +-inf: refused)     16

Kernels: kernels/fp_kernels.py (fp16 weights are read as their uint16 bits; Numba has no float16 arithmetic).
"""
from __future__ import annotations

import numpy as np

from ..kernels import batched, fp_kernels
from ..kernels.linear import Matrix
from .base import Scheme, SchemeError, matrix_shape


class Fp32Matrix(Matrix):
    scheme = "fp32"

    def __init__(self, w, params):
        super().__init__(w.shape, params)
        self.w = w

    def _gemv(self, x):
        # a Numba kernel, not BLAS: decode keeps one owner of the cores (kernels/threads.py)
        return (fp_kernels.gemv_f32 if self.parallel else fp_kernels.gemv_f32_serial)(self.w, x)

    def _matmul_rows(self, X, parallel):
        return (batched.gemm_f32 if parallel else batched.gemm_f32_serial)(self.w, X)

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

    def _matmul_rows(self, X, parallel):
        return (batched.gemm_f16 if parallel else batched.gemm_f16_serial)(self.bits, X)

    def _dequantize(self, ids, out):
        fp_kernels.dequantize_rows_f16(self.bits, ids, out)

    def _arrays(self):
        return (self.bits,)


class Fp32(Scheme):
    name = "fp32"

    def parts(self, shape):
        return {"": (np.dtype(np.float32), matrix_shape(shape))}

    def quantize(self, rows):
        return {"": np.array(rows, dtype=np.float32, order="C")}

    def dequantize(self, parts, cols=None):
        return np.asarray(parts[""], dtype=np.float32)

    def _matrix(self, parts, shape):
        return Fp32Matrix(self._part(parts, "", np.float32, 2), self.params)


class Fp16(Scheme):
    name = "fp16"

    def parts(self, shape):
        return {"": (np.dtype(np.float16), matrix_shape(shape))}

    def quantize(self, rows):
        rows = self._rows(rows)
        if rows.size and np.abs(rows).max() > 65504:
            raise SchemeError("fp16: weights exceed the float16 range (|w| > 65504)")
        return {"": rows.astype(np.float16)}

    def dequantize(self, parts, cols=None):
        return parts[""].astype(np.float32)

    def _matrix(self, parts, shape):
        return Fp16Matrix(self._part(parts, "", np.float16, 2), self.params)
