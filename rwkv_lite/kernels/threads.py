"""The one place that sets how many threads the kernels use: Numba's pool, the tile workers, and BLAS (one).

Numba's pool (quantized GEMVs, WKV) and OpenBLAS's pool (numpy matmul) are two pools: if both used every core at
the same time, the cores would be oversubscribed and both would stall.

Both pools also *spin* for a while after each parallel call before they sleep (libgomp, Numba's default threading
layer here; OpenBLAS's server threads). Alternating the two pools call after call therefore lets each one's
spinning threads steal the cores the other one needs. Measured on 2 cores, a 14336 x 4096 int8 matrix times 128
tokens in 128-row tiles: Numba-parallel dequantisation + BLAS GEMM per tile 870 ms, serial dequantisation + BLAS
GEMM 107 ms. Hence: decode GEMVs are Numba kernels only (no BLAS in the token loop), sequence-mode dequantisation
is serial (the dequantize_rows_* kernels), and code that alternates BLAS with Numba-parallel kernels should expect
this cost.
OMP_WAIT_POLICY=PASSIVE removes the spinning but costs ~70 us of wake-up per parallel call (decode: 257 GEMVs per
Eagle-7B token), so it is not set here.

So BLAS runs single-threaded, always (set here on the first use of the tile workers, and by set_threads): decode
never calls it (tests/test_decode_no_blas.py), and sequence mode shares the tiles of each weight matrix out to
`tile_workers()` Python threads (``parallel_map``), each dequantising its tile (a nogil Numba kernel) and
multiplying it with its own single-threaded BLAS call. Every core then does both halves of the work, where a
serial dequantisation in front of a multi-threaded GEMM left all but one core idle for the first half (measured
on a 16-core host: prompt 2.3x faster at 8 threads than at 1 with the serial dequantisation).

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
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

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


_blas_setters = None


def _find_blas_setters() -> list:
    import numpy  # noqa: F401  (make sure numpy's BLAS is loaded before looking for it)
    found = []
    for path in _loaded_openblas_paths():
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for name in _OPENBLAS_SETTERS:
            fn = getattr(lib, name, None)
            if fn is not None:
                fn.argtypes, fn.restype = [ctypes.c_int], None
                found.append(fn)
                break
    return found


def set_blas_threads(n: int) -> bool:
    """Threads of the OpenBLAS behind numpy (False where it cannot be set from here)."""
    global _blas_setters
    if _blas_setters is None:
        _blas_setters = _find_blas_setters()
    for fn in _blas_setters:
        fn(int(n))
    return bool(_blas_setters)


_set_blas_threads = set_blas_threads       # the earlier private name


@contextmanager
def blas_threads(n: int | None = None):
    """BLAS on `n` threads (None: the kernels' count) inside the block, one thread again after it: for a large
    numpy product that runs alone (no Numba kernel or tile worker beside it), such as calibration's X^T X."""
    set_blas_threads(n or numba.get_num_threads())
    try:
        yield
    finally:
        set_blas_threads(1)


_pool = None
_pool_size = 0
_pool_lock = threading.Lock()


def tile_workers() -> int:
    """How many worker threads sequence-mode matrix products use (the kernels' thread count)."""
    return numba.get_num_threads()


def parallel_map(fn, items) -> None:
    """fn(item) for every item, on tile_workers() threads (in the caller alone when that is 1 or there is one
    item). fn must release the GIL for its heavy parts (nogil Numba kernels, numpy BLAS calls)."""
    global _pool, _pool_size
    workers = min(tile_workers(), len(items))
    if workers <= 1:
        for item in items:
            fn(item)
        return
    with _pool_lock:
        if _pool is None or _pool_size != tile_workers():
            set_blas_threads(1)                    # one BLAS thread per worker, never a second pool
            if _pool is not None:
                _pool.shutdown(wait=False)
            _pool_size = tile_workers()
            _pool = ThreadPoolExecutor(_pool_size, thread_name_prefix="rwkv-lite-tile")
        pool = _pool
    for future in [pool.submit(fn, item) for item in items]:
        future.result()


_chosen: int | None = None      # the count of the last set_threads() call, for every thread of the process


def set_threads(n: int | None = None) -> int:
    """Use `n` threads (None: every available core, capped by NUMBA_NUM_THREADS) for Numba's pool and the
    sequence-mode tile workers; BLAS gets one thread per caller. For the whole process: Numba keeps its count
    per calling thread, and a thread it has not been set in uses every core, so the model's entry points apply
    this count in whichever thread runs them (use_threads). Returns the count in effect."""
    global _chosen
    cap = numba.config.NUMBA_NUM_THREADS
    if n is None:
        n = min(available_cores(), cap)
    n = int(n)
    if n < 1:
        raise ValueError(f"thread count must be at least 1, got {n}")
    n = min(n, cap)
    numba.set_num_threads(n)
    set_blas_threads(1)                            # sequence mode parallelises over tiles instead (see above)
    _chosen = n
    return n


def use_threads() -> None:
    """Apply set_threads' count in the calling thread (nothing when it was never called). Model.forward and
    forward_batch call it, because the work often runs in a thread other than the one that chose the count:
    the server's engine thread, the thread Ray Data runs a batch function in. Without it each of those used
    every core: two Ray actors of one CPU each on a 2-core machine ran two threads each and took 2.4x the CPU
    time per token."""
    if _chosen is not None and numba.get_num_threads() != _chosen:
        numba.set_num_threads(_chosen)


def get_threads() -> int:
    """Numba's current thread count (also the number of sequence-mode tile workers)."""
    return numba.get_num_threads()
