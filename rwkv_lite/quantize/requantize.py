"""rwkv-lite's own fp32/fp16 files as conversion sources (`convert model-fp16.safetensors out --quant int4`).

Such a file already holds the tensors after the version's load-time transforms (arch/*.plan), under their final
names and with their roles recorded, so re-quantizing is only the storage step: every tensor is offered to the
writer as a PlannedTensor that reads rows of the stored array.

An int8/int4 file is a source only for its own quantization (`convert old-int4.safetensors new.safetensors --quant
int4`): its quantized tensors are carried over as stored, re-laid-out where the converter now writes another
layout (schemes/panel.py), so a file made by an earlier rwkv-lite gets today's layout without its original
checkpoint and without a second rounding. Quantizing dequantized weights into another scheme is refused: the
second rounding error would add to the first.
"""
from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np

from ..arch.common import PlannedTensor
from ..errors import FormatError
from ..format import FORMAT_NAME, TOKENIZER_ARRAY, ModelFile, read_header, read_model_file
from ..schemes import get_scheme

FLOAT_SCHEMES = ("fp32", "fp16")
QUANTIZED_SCHEMES = ("int8", "int4")
ROLES = ("matrix", "embedding", "lora", "vector")


def is_rwkv_lite_file(path: Path) -> bool:
    """Does `path` carry rwkv-lite's format marker? (A damaged or foreign file: False, the readers report it.)"""
    if not path.is_file():
        return False
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 9 or f.read(9)[8:9] != b"{":
                return False

            def read(offset, n):
                f.seek(offset)
                return f.read(n)
            header, _ = read_header(path, size, read)
    except (OSError, FormatError, struct.error):
        return False
    meta = header.get("__metadata__")
    return isinstance(meta, dict) and meta.get("format") == FORMAT_NAME


class RwkvLiteSource:
    """An fp32/fp16 rwkv-lite file opened for re-quantization. Use as a context manager."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.file: ModelFile = read_model_file(self.path)
        try:
            self.config = dict(self.file.config)
            self.planned = self._plan()
            self.tokenizer_kind, self.tokenizer_bytes = self._tokenizer()
            prov = self.file.metadata.get("provenance")
            self.provenance = dict(prov) if isinstance(prov, dict) else {}
            self.quant = str(self.provenance.get("quant", "?"))
        except BaseException:
            self.file.close()
            raise

    def _plan(self) -> list[PlannedTensor]:
        arrays = self.file.arrays
        planned, used = [], {TOKENIZER_ARRAY}
        for name, record in self.file.tensors.items():
            scheme, role = record.get("scheme"), record.get("role")
            if role not in ROLES:
                raise FormatError(f"{self.path}: tensor {name!r} has an unknown role {role!r}")
            shape = tuple(record["shape"])
            if scheme in QUANTIZED_SCHEMES:
                try:
                    stored = get_scheme(scheme, **dict(record.get("params") or {}))
                    parts = {s: arrays[name + s] for s in stored.parts(shape) if name + s in arrays}
                    stored.open(name, arrays, shape)                  # checks every part's dtype and shape
                except FormatError as e:
                    raise FormatError(f"{self.path}: tensor {name!r}: {e}") from None
                used.update(name + s for s in parts)
                planned.append(PlannedTensor(name, shape, role, _already_quantized(self.path, name, scheme),
                                             stored=(stored, parts)))
                continue
            if scheme not in FLOAT_SCHEMES:
                raise FormatError(f"{self.path}: tensor {name!r} is stored as {scheme!r}, which this rwkv-lite "
                                  f"cannot convert")
            array = arrays.get(name)
            if array is None or tuple(array.shape) != shape:
                raise FormatError(f"{self.path}: tensor {name!r}: its array is missing or not of shape {list(shape)}")
            get_scheme(scheme)                          # (fp32/fp16 take no parameters)
            used.add(name)
            planned.append(PlannedTensor(name, shape, role, _rows_of(array)))
        unknown = [n for n in arrays if n not in used]
        if unknown:
            raise FormatError(f"{self.path}: array {unknown[0]!r} belongs to no tensor of the file; "
                              f"this rwkv-lite cannot re-quantize it")
        return planned

    def _tokenizer(self) -> tuple[str, bytes]:
        meta = self.file.metadata.get("tokenizer") or {}
        kind = meta.get("kind", "none") if isinstance(meta, dict) else "none"
        data = self.file.arrays.get(TOKENIZER_ARRAY)
        return str(kind), (bytes(data) if data is not None else b"")

    def close(self) -> None:
        self.planned = []
        self.file.close()

    def __enter__(self) -> "RwkvLiteSource":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _rows_of(array: np.ndarray):
    def rows(a: int, b: int) -> np.ndarray:
        if array.ndim == 0:
            return array.reshape(1).astype(np.float32)
        return np.ascontiguousarray(array[a:b], dtype=np.float32)
    return rows


def _already_quantized(path: Path, name: str, scheme: str):
    def rows(a: int, b: int) -> np.ndarray:
        raise FormatError(f"{path}: tensor {name!r} is stored as {scheme}; an already quantized file cannot be "
                          f"quantized again (the second rounding adds to the first): convert the original "
                          f"checkpoint, or an fp32/fp16 rwkv-lite file")
    return rows
