"""Storage schemes: how a 2-D weight matrix is stored in a model file and computed with at run time.

One module per scheme, each the single place that knows its layout: the parts (stored arrays) and their shapes,
the checks on a file's parts, quantize (float32 rows -> parts, used by the converter), dequantize, and the runtime
Matrix class whose GEMV/GEMM entry points are the scheme's kernels (kernels/*_kernels.py, kernels/batched.py):

  fp32, fp16   schemes/fp.py
  int8         schemes/int8.py    (one scale per row, or an fp16 scale per group of columns)
  int4         schemes/int4.py    (4-bit levels with a scale / zero-point word per group)

The model file records, per tensor, the scheme's name and parameters; ``get_scheme`` turns that record back into
the scheme object. Base class and shared checks: schemes/base.py. This package is part of the runtime: it never
imports the converter (rwkv_lite.quantize), which uses it.
"""
from __future__ import annotations

from .base import Scheme, SchemeError
from .fp import Fp16, Fp32
from .int4 import Int4
from .int8 import Int8

SCHEMES = {"fp32": Fp32, "fp16": Fp16, "int8": Int8, "int4": Int4}

__all__ = ["SCHEMES", "Fp16", "Fp32", "Int4", "Int8", "Scheme", "SchemeError", "get_scheme", "make_matrix"]


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


def make_matrix(scheme_name: str, params: dict, parts: dict, shape: tuple[int, int] | None = None):
    """The runtime Matrix of scheme `scheme_name` with `params` over `parts` (suffix -> array); see
    ``Scheme.matrix``."""
    return get_scheme(scheme_name, **dict(params or {})).matrix(parts, shape)
