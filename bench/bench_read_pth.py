"""Streaming throughput and peak memory of the torch-zip reader on a large bf16 checkpoint.

    python bench/bench_read_pth.py              # writes ~1.5 GB to /tmp, measures, deletes it
    python bench/bench_read_pth.py --gb 3 --repeats 5

Writes a torch.save-compatible .pth of bf16 4096 x 14336 matrices (Eagle-7B FFN shape) with the test writer,
then, each in a fresh subprocess (so peak RSS is the reader's alone), streams every tensor through
TensorRef.load_rows in 64 MB float32 blocks (what the converter does) and reports MB/s of file bytes and peak RSS.
"cold" runs first evict the file from the page cache (posix_fadvise DONTNEED, this file only); "warm" runs read
it from the cache. The baseline reads the same bytes with plain readinto (no decoding) for comparison.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
ROWS, COLS = 4096, 14336
BLOCK_BYTES = 64 << 20


def write(path: Path, gb: float) -> None:
    sys.path.insert(0, str(REPO / "tests"))
    from checkpoint_writers import LazyArray, save_pth
    n = max(1, round(gb * 1e9 / (ROWS * COLS * 2)))
    rng = np.random.default_rng(0)
    sd = {f"blocks.{i}.ffn.key.weight": LazyArray((ROWS, COLS), lambda: rng.random((ROWS, COLS), np.float32) - 0.5)
          for i in range(n)}
    save_pth(sd, path, dtype="bf16")


def evict(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def read_with_reader(path: str) -> dict:
    sys.path.insert(0, str(REPO))
    from rwkv_lite.quantize.readers import open_checkpoint
    t0 = time.perf_counter()
    total = 0.0
    with open_checkpoint(path) as ckpt:
        for ref in ckpt.tensors.values():
            rows = max(1, BLOCK_BYTES // (4 * int(np.prod(ref.shape[1:]))))
            for a in range(0, ref.shape[0], rows):
                block = ref.load_rows(a, a + rows)
                total += float(block[0, 0])
    return {"seconds": time.perf_counter() - t0, "check": total}


def read_raw(path: str) -> dict:
    t0 = time.perf_counter()
    buf = np.empty(16 << 20, np.uint8)
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass
    return {"seconds": time.perf_counter() - t0}


def peak_rss_mb() -> float:
    """VmHWM of this process (ru_maxrss would include the parent's peak: Linux keeps it across fork+exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(mode: str, path: str) -> None:
    out = read_with_reader(path) if mode == "reader" else read_raw(path)
    out["peak_rss_mb"] = peak_rss_mb()
    print(json.dumps(out))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gb", type=float, default=1.5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--path", default="/tmp/rwkv-lite-bench-read.pth")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(*args.child)
    path = Path(args.path)
    t0 = time.perf_counter()
    write(path, args.gb)
    size = path.stat().st_size
    print(f"wrote {path} ({size / 1e9:.2f} GB) in {time.perf_counter() - t0:.1f} s")
    try:
        for mode in ("raw", "reader"):
            for cache in ("cold", "warm"):
                runs = []
                for _ in range(args.repeats):
                    if cache == "cold":
                        evict(path)
                    res = subprocess.run([sys.executable, __file__, "--child", mode, str(path)],
                                         capture_output=True, text=True, check=True)
                    runs.append(json.loads(res.stdout))
                mbps = [size / 1e6 / r["seconds"] for r in runs]
                rss = [r["peak_rss_mb"] for r in runs]
                print(f"{mode:6s} {cache}: median {statistics.median(mbps):7.0f} MB/s "
                      f"(min {min(mbps):.0f}, max {max(mbps):.0f}), peak RSS median {statistics.median(rss):.0f} MB "
                      f"(max {max(rss):.0f})")
    finally:
        if not args.keep:
            path.unlink()


if __name__ == "__main__":
    main()
