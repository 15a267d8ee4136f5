"""Cold start: read a model file from disk ahead of the first forward pass.

A model is used through a read-only memory map, so a file that is not in the page cache comes in by page faults
as the first forward pass touches it: 4 KiB faults plus the kernel's small read-ahead, one layer's matrices after
another, at a fraction of the disk's sequential speed (measured: an 8.2 GB file faulted in at ~180 MB/s).
`ReadAhead` reads the file front to back in large blocks on a background thread (the page cache is shared with
the mapping, so every block read is a block the forward pass will not fault), skipping blocks already cached
(mincore); the first logits then cost about one sequential read of the file.

Only started when a sample of the file's pages says a good part of it is not cached (a warm start costs nothing),
and only on Linux (mincore, posix_fadvise); elsewhere the forward pass faults the pages in as before.
"""
from __future__ import annotations

import ctypes
import mmap
import os
import sys
import threading
import time

import numpy as np

BLOCK = 16 << 20               # bytes per read: large sequential requests, as `cat` or `dd bs=16M` would issue
SAMPLE_PAGES = 256             # pages probed to decide whether the file is cached
START_IF_UNCACHED = 0.1        # start when more than this share of the sampled pages is not in memory

_PAGE = mmap.PAGESIZE
_libc = None


def _mincore():
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL(None, use_errno=True)
            _libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        except (OSError, AttributeError):
            _libc = False
    return _libc.mincore if _libc else None


def resident(address: int, length: int) -> np.ndarray | None:
    """One bool per page of [address, address + length) (page-aligned address): in memory or not; None when the
    OS cannot say."""
    fn = _mincore()
    if fn is None:
        return None
    pages = (length + _PAGE - 1) // _PAGE
    vec = np.zeros(pages, np.uint8)
    if fn(address, length, vec.ctypes.data) != 0:
        return None
    return (vec & 1).astype(bool)


def uncached_share(mm: mmap.mmap) -> float:
    """Share of a sample of the mapping's pages that are not in memory (0.0 when unknown)."""
    size = len(mm)
    base = np.frombuffer(mm, np.uint8).ctypes.data
    n_pages = size // _PAGE
    if n_pages == 0 or _mincore() is None:
        return 0.0
    missing = 0
    picks = np.linspace(0, n_pages - 1, min(SAMPLE_PAGES, n_pages)).astype(np.int64)
    for p in picks:
        r = resident(base + int(p) * _PAGE, _PAGE)
        if r is None:
            return 0.0
        missing += int(not r[0])
    return missing / len(picks)


class ReadAhead:
    """Reads `path` front to back on a daemon thread; `progress(done_bytes, total_bytes)` is called after every
    block once `quiet_s` seconds have passed (so a warm or quick start prints nothing), and once at the end."""

    def __init__(self, path, mm: mmap.mmap, progress=None, quiet_s: float = 2.0):
        self.path, self.mm = os.fspath(path), mm
        self.total = len(mm)
        self.done_bytes = 0
        self.progress, self.quiet_s = progress, quiet_s
        self.finished = threading.Event()
        self.seconds = None
        self.error = None
        self._thread = threading.Thread(target=self._run, name="rwkv-lite-readahead", daemon=True)

    def start(self) -> "ReadAhead":
        self._thread.start()
        return self

    def wait(self, timeout: float | None = None) -> bool:
        return self.finished.wait(timeout)

    def _run(self):
        t0 = time.perf_counter()
        reported = False
        try:
            base = np.frombuffer(self.mm, np.uint8).ctypes.data
            buf = bytearray(BLOCK)
            with open(self.path, "rb", buffering=0) as f:
                if hasattr(os, "posix_fadvise"):
                    os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)   # larger kernel read-ahead
                for off in range(0, self.total, BLOCK):
                    n = min(BLOCK, self.total - off)
                    pages = resident(base + off, n)
                    if pages is None or not pages.all():
                        f.seek(off)
                        f.readinto(memoryview(buf)[:n])          # releases the GIL while the disk works
                    self.done_bytes = off + n
                    if self.progress is not None and time.perf_counter() - t0 >= self.quiet_s:
                        self.progress(self.done_bytes, self.total)
                        reported = True
        except (OSError, ValueError) as e:                       # a read-ahead failure only costs speed
            self.error = e
        finally:
            self.seconds = time.perf_counter() - t0
            if reported and self.progress is not None:
                self.progress(self.total, self.total)
            self.finished.set()


def start_if_uncached(path, mm: mmap.mmap, progress=None) -> ReadAhead | None:
    """A started ReadAhead when a good part of the mapped file is not in memory (Linux), else None."""
    if not sys.platform.startswith("linux") or uncached_share(mm) <= START_IF_UNCACHED:
        return None
    return ReadAhead(path, mm, progress).start()
