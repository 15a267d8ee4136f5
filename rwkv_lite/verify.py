"""Checking a model file's integrity: every array's checksum (`rwkv-lite verify`, rwkv_lite.verify)."""
from __future__ import annotations

import os
from pathlib import Path

from .format import PAD_PREFIX, read_model_file, verify_checksums
from .progress import Progress


def verify_checksums_of(path: str | os.PathLike, progress: Progress | None = None) -> tuple[list[str], int]:
    """(names of arrays whose checksum does not match, bytes checked). progress(done_bytes, total_bytes, None)."""
    model_file = read_model_file(Path(path))
    try:
        total = sum(b - a for name, (a, b) in model_file.spans.items() if not name.startswith(PAD_PREFIX))
        done = 0

        def checked(n_bytes: int) -> None:
            nonlocal done
            done += n_bytes
            if progress is not None:
                progress(done, total, None)
        return verify_checksums(model_file, checked), total
    finally:
        model_file.close()
