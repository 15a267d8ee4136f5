"""The one place that sets how many threads the kernels use: Numba's pool and the BLAS behind numpy, together.

Decode alternates Numba kernels (quantized GEMV, WKV) with numpy/BLAS calls (fp32 GEMV, sequence-mode GEMM). If
each pool used every core on top of the other, the cores would be oversubscribed and both would stall, so both get
the same count.

Both pools also *spin* for a while after each parallel call before they sleep (libgomp, Numba's default threading
layer here; OpenBLAS's server threads). Alternating the two pools call after call therefore lets each one's
spinning threads steal the cores the other one needs. Measured on 2 cores, a 14336 x 4096 int8 matrix times 128
tokens in 128-row tiles: Numba-parallel dequantisation + BLAS GEMM per tile 870 ms, serial dequantisation + BLAS
GEMM 107 ms. Hence: decode GEMVs are Numba kernels only (no BLAS in the token loop), sequence-mode dequantisation
is serial (kernels/qmatmul.py), and code that alternates BLAS with Numba-parallel kernels should expect this cost.
OMP_WAIT_POLICY=PASSIVE removes the spinning but costs ~70 us of wake-up per parallel call (decode: 257 GEMVs per
Eagle-7B token), so it is not set here.

* Numba: ``numba.set_num_threads(n)``; n is capped at the pool size Numba started with (``NUMBA_NUM_THREADS``,
  default: all cores), which cannot grow after import.
* BLAS: numpy's wheels bundle OpenBLAS (``libscipy_openblas64_``); we call its ``*openblas_set_num_threads*``
  entry point through ctypes (the same thing threadpoolctl does, without the dependency). Other BLAS builds
  (MKL, Accelerate, a system OpenBLAS under another name) are left alone: set ``OMP_NUM_THREADS`` /
  ``OPENBLAS_NUM_THREADS`` before starting Python for those.
"""
from __future__ import annotations

import ctypes
import os

import numba

_OPENBLAS_SETTERS = ("scipy_openblas_set_num_threads64_", "scipy_openblas_set_num_threads",
                     "openblas_set_num_threads64_", "openblas_set_num_threads")


def available_cores() -> int:
    """Cores this process may run on (CPU affinity where the OS reports it)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _loaded_openblas_paths() -> list[str]:
    """Paths of OpenBLAS libraries already mapped into this process (Linux: /proc/self/maps)."""
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "openblas" in line.lower() and "/" in line}
    except OSError:
        paths = set()
    if not paths:                                 # other systems: numpy's bundled copy, if any
        import glob
        import numpy
        root = os.path.dirname(os.path.dirname(numpy.__file__))
        paths = set(glob.glob(os.path.join(root, "numpy*libs", "*openblas*")))
    return sorted(paths)


def _set_blas_threads(n: int) -> bool:
    import numpy  # noqa: F401  (make sure numpy's BLAS is loaded before looking for it)
    done = False
    for path in _loaded_openblas_paths():
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for name in _OPENBLAS_SETTERS:
            fn = getattr(lib, name, None)
            if fn is not None:
                fn.argtypes, fn.restype = [ctypes.c_int], None
                fn(int(n))
                done = True
                break
    return done


def set_threads(n: int | None = None) -> int:
    """Use `n` threads (None: every available core, capped by NUMBA_NUM_THREADS) for Numba and BLAS alike.

    Returns the count in effect."""
    cap = numba.config.NUMBA_NUM_THREADS
    if n is None:
        n = min(available_cores(), cap)
    n = int(n)
    if n < 1:
        raise ValueError(f"thread count must be at least 1, got {n}")
    n = min(n, cap)
    numba.set_num_threads(n)
    _set_blas_threads(n)
    return n


def get_threads() -> int:
    """Numba's current thread count (BLAS follows it when set through set_threads)."""
    return numba.get_num_threads()
