"""Shared by the robustness tests: run the CLI as users do, and find array byte spans inside a model file."""
from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def cli(*args, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m rwkv_lite ARGS` in a fresh process, one thread (the tiny model gains nothing from more)."""
    environment = {**os.environ, "PYTHONPATH": str(REPO), "NUMBA_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
                   **(env or {})}
    return subprocess.run([sys.executable, "-m", "rwkv_lite", *map(str, args)], capture_output=True, text=True,
                          env=environment, timeout=timeout, cwd=REPO)


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit code 1, no traceback, and the error as the one last line of stderr (`error: ...`, after at most a
    progress label) containing every needle. Returns the line."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], proc.stderr[-2000:]
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    return errors[0]


def array_span(path: Path, name: str) -> tuple[int, int]:
    """Absolute byte span [start, end) of array `name` in a safetensors/rwkv-lite file."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    a, b = header[name]["data_offsets"]
    return 8 + n + a, 8 + n + b


def patch_bytes(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)
