"""Cold start of a model file: first logits with the file not in the page cache, against a plain read of it.

    python bench/cold_start.py model.st --rounds 2

Each round evicts the file from the page cache (posix_fadvise DONTNEED: this file only, no root needed; Linux),
then times (a) a plain sequential read in 16 MB blocks, (b) a fresh process's load + first logits with the
read-ahead (rwkv_lite/readahead.py), (c) the same with the read-ahead switched off, and (d) the same with the file
cached (the process start, imports and kernel-cache loading every run pays).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

CHILD = """
import sys, time
t = time.perf_counter()
import rwkv_lite, rwkv_lite.readahead as ra
if sys.argv[2] == 'off':
    ra.start_if_uncached = lambda *a, **k: None
m = rwkv_lite.load(sys.argv[1])
m.forward([1])
print(time.perf_counter() - t)
"""


def evict(path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def plain_read(path) -> float:
    buf = bytearray(16 << 20)
    t = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass
    return time.perf_counter() - t


def first_logits(path, mode: str) -> float:
    out = subprocess.run([sys.executable, "-c", CHILD, str(path), mode], capture_output=True, text=True, check=True)
    return float(out.stdout.split()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    size = os.path.getsize(args.model) / 1e9
    for r in range(args.rounds):
        evict(args.model)
        read = plain_read(args.model)
        evict(args.model)
        on = first_logits(args.model, "on")
        evict(args.model)
        off = first_logits(args.model, "off")
        warm = first_logits(args.model, "off")
        print(f"round {r + 1}: {size:.2f} GB: plain read {read:.2f} s ({size / read:.2f} GB/s); first logits: "
              f"read-ahead {on:.2f} s ({on / read:.2f}x the read), without {off:.2f} s ({off / read:.2f}x), "
              f"cached {warm:.2f} s; load average {os.getloadavg()[0]:.1f}", flush=True)


if __name__ == "__main__":
    main()
