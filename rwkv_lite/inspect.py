"""What a model file holds: architecture, parameter count, storage per tensor, bits per weight, provenance.

Used by `rwkv-lite info`; reads only the header (no weights are touched)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .errors import FormatError
from .format import read_model_file
from .schemes import get_scheme


def describe(path: str | os.PathLike) -> dict:
    """A JSON-ready description of a model file (see docs/cli.md, `info --json`)."""
    path = Path(path)
    mf = read_model_file(path)
    try:
        meta = mf.metadata
        tensors = []
        n_params = 0
        stored_bits = 0.0
        by_scheme: dict[str, int] = {}
        matrix_params = 0
        matrix_bits = 0.0
        for name, info in meta["tensors"].items():
            shape = tuple(info["shape"])
            count = int(np.prod(shape, dtype=np.int64))
            try:
                scheme = get_scheme(info["scheme"], **info.get("params", {}))
                bits = 32.0 if info.get("role") == "vector" else scheme.bits_per_weight(shape)
            except FormatError as e:
                raise FormatError(f"{path}: tensor {name}: {e}") from None
            n_params += count
            stored_bits += bits * count
            by_scheme[info["scheme"]] = by_scheme.get(info["scheme"], 0) + count
            if info.get("role") in ("matrix", "embedding", "lora"):
                matrix_params += count
                matrix_bits += bits * count
            tensors.append({"name": name, "shape": list(shape), "scheme": info["scheme"],
                            "params": info.get("params", {}), "role": info.get("role"),
                            "bits_per_weight": round(bits, 4)})
        tok = meta.get("tokenizer") or {}
        return {
            "path": str(path),
            "file_bytes": path.stat().st_size,
            "format_version": int(meta.get("format_version", 0)),
            "architecture": meta["config"].get("arch"),
            "config": meta["config"],
            "parameters": n_params,
            "parameters_by_scheme": by_scheme,
            "bits_per_weight": round(stored_bits / max(1, n_params), 4),
            "matrix_bits_per_weight": round(matrix_bits / max(1, matrix_params), 4),
            "tokenizer": tok.get("kind", "none"),
            "tokenizer_file": _tokenizer_file(meta.get("provenance")),
            "provenance": meta.get("provenance", {}),
            "tensors": tensors,
        }
    finally:
        mf.close()


def _tokenizer_file(provenance) -> str | None:
    """Which tokenizer file the converter embedded, as recorded in the provenance (files are untrusted)."""
    value = provenance.get("tokenizer") if isinstance(provenance, dict) else None
    return value if isinstance(value, str) else None
