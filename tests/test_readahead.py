"""rwkv_lite/readahead.py: a cold model file is read ahead in full; a cached one is left alone."""
from __future__ import annotations

import mmap
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

import rwkv_lite
from rwkv_lite import readahead

DEMO = Path(rwkv_lite.__file__).parent / "data" / "demo-kjv-int8.safetensors"
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mincore/posix_fadvise: Linux only")


def _evict(path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _cold_file(tmp_path, megabytes=96):
    """A file big enough that the kernel's own read-ahead on the first fault does not pull it in whole."""
    path = tmp_path / "weights.bin"
    block = np.random.default_rng(0).integers(0, 255, 1 << 20, dtype=np.uint8).tobytes()
    with open(path, "wb") as f:
        for _ in range(megabytes):
            f.write(block)
    _evict(path)
    return path


def test_cold_file_is_read_ahead_in_full(tmp_path):
    path = _cold_file(tmp_path)
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        if readahead.uncached_share(mm) < 0.5:
            pytest.skip("this file system keeps the file cached (tmpfs?)")
        seen = []
        ra = readahead.ReadAhead(path, mm, progress=lambda done, total: seen.append((done, total)), quiet_s=0.0)
        assert ra.start().wait(60)
        assert ra.error is None and ra.done_bytes == ra.total == os.path.getsize(path)
        assert seen and seen[-1] == (ra.total, ra.total)
        assert all(a[0] <= b[0] for a, b in zip(seen, seen[1:]))           # progress only grows
        base = np.frombuffer(mm, np.uint8).ctypes.data
        assert readahead.resident(base, len(mm)).all()                    # every page is now in memory
        assert readahead.uncached_share(mm) == 0.0
    finally:
        mm.close()


def test_started_only_for_a_cold_file(tmp_path):
    path = _cold_file(tmp_path)
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        ra = readahead.start_if_uncached(path, mm)
        if ra is None:
            pytest.skip("this file system keeps the file cached (tmpfs?)")
        assert ra.wait(60) and ra.done_bytes == ra.total
        assert readahead.start_if_uncached(path, mm) is None          # now cached: nothing to read
    finally:
        mm.close()


def test_a_model_loads_and_runs_with_it(tmp_path):
    path = tmp_path / "model.safetensors"
    shutil.copyfile(DEMO, path)
    _evict(path)
    model = rwkv_lite.load(path)
    try:
        logits, _ = model.forward([1, 2, 3])
        assert np.isfinite(logits).all()
        ra = model.file.readahead
        assert ra is None or (ra.wait(60) and ra.error is None)
    finally:
        model.close()
