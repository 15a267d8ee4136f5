"""Checking a model file's integrity (`rwkv-lite verify`, rwkv_lite.verify): every array's checksum, and that
the safetensors library itself can read the file's header and tensor index (the format promises safetensors
compatibility, docs/format.md)."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from .format import ModelFile, read_model_file, verify_checksums
from .progress import Progress


@dataclass
class VerifyResult:
    """What verify_file found. `ok`: every checksum matches and safetensors reads the file."""
    path: str
    corrupted_arrays: list[str] = field(default_factory=list)
    safetensors_error: str | None = None     # why the safetensors library refused the file (None: it reads it)
    bytes_checked: int = 0

    @property
    def ok(self) -> bool:
        return not self.corrupted_arrays and self.safetensors_error is None

    def problems(self) -> list[str]:
        """One line per problem, each naming the file."""
        lines = []
        if self.corrupted_arrays:
            bad = self.corrupted_arrays
            lines.append(f"{self.path}: checksum mismatch in {len(bad)} array(s): {', '.join(bad[:5])}")
        if self.safetensors_error is not None:
            lines.append(f"{self.path}: the safetensors library cannot read it: {self.safetensors_error}")
        return lines


def verify_file(path: str | os.PathLike, progress: Progress | None = None) -> VerifyResult:
    """Check `path`: its header and sizes (FormatError if they are wrong), every array's CRC32, and that the
    safetensors library opens it and lists every tensor with its dtype and shape.
    progress(done_bytes, total_bytes, None) as the checksums are computed."""
    corrupted, total = verify_checksums_of(path, progress)
    return VerifyResult(str(path), corrupted, safetensors_problem(path), total)


def verify_checksums_of(path: str | os.PathLike, progress: Progress | None = None) -> tuple[list[str], int]:
    """(names of arrays whose checksum does not match, bytes checked). progress(done_bytes, total_bytes, None)."""
    model_file = read_model_file(Path(path))
    try:
        return verify_checksums_in(model_file, progress), checksummed_bytes(model_file)
    finally:
        model_file.close()


def verify_checksums_in(model_file: ModelFile, progress: Progress | None = None) -> list[str]:
    """The names of `model_file`'s arrays whose checksum does not match (empty: intact)."""
    if progress is None:
        return verify_checksums(model_file)
    total = checksummed_bytes(model_file)
    done = 0

    def checked(n_bytes: int) -> None:
        nonlocal done
        done += n_bytes
        progress(done, total, None)
    return verify_checksums(model_file, checked)


def checksummed_bytes(model_file: ModelFile) -> int:
    """The bytes verify_checksums reads: every array that has a checksum."""
    sums = model_file.metadata.get("checksums")
    names = sums.get("arrays") if isinstance(sums, dict) else None
    if not isinstance(names, dict):
        return 0
    return sum(b - a for name, (a, b) in model_file.spans.items() if name in names)


def safetensors_problem(path: str | os.PathLike) -> str | None:
    """Why the safetensors library cannot read `path`'s header and tensor index, or None if it can. Reads only
    the header (the library maps the file; no tensor data is copied)."""
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="numpy") as f:
            for name in f.keys():
                tensor = f.get_slice(name)
                tensor.get_shape()
                tensor.get_dtype()
    except Exception as e:          # noqa: BLE001 - the library raises its own error types (SafetensorError, ...)
        return f"{type(e).__name__}: {e}".splitlines()[0]
    return None
