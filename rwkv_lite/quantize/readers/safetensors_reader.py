"""safetensors files, parsed here (no safetensors package needed) and checked before anything is allocated.

Layout: u64 little-endian N, then N bytes of JSON {name: {"dtype", "shape", "data_offsets": [begin, end]},
"__metadata__": {str: str}}, then the data section; offsets are relative to the data section. We check what the
safetensors library checks: N within the file (and at most 100 MB), every span inside the data section,
span length == numel x itemsize, no two spans overlapping, known dtypes, non-negative integer shapes.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

from ...errors import FormatError
from .base import RAW_DTYPES, Checkpoint, RandomAccessFile, TensorRef, contiguous_rows, prod

MAX_HEADER_BYTES = 100_000_000           # the safetensors library's own limit
_DTYPES = {"F32": "f32", "F16": "f16", "BF16": "bf16", "F64": "f64", "I64": "i64", "I32": "i32", "I16": "i16",
           "I8": "i8", "U8": "u8", "U16": "u16", "U32": "u32", "U64": "u64", "BOOL": "bool"}


def read_safetensors_header(path: Path, file: RandomAccessFile) -> tuple[dict, dict, int]:
    """(tensor entries in data order, __metadata__, data section offset), all validated."""
    if file.size < 8:
        raise FormatError(f"{path}: too short for a safetensors file ({file.size} bytes)")
    (n,) = struct.unpack("<Q", file.read_bytes(0, 8))
    if n > MAX_HEADER_BYTES or n > file.size - 8:
        raise FormatError(f"{path}: safetensors header length {n} does not fit the file ({file.size} bytes)")
    raw = file.read_bytes(8, n)

    def no_duplicates(pairs):
        seen = {}
        for k, v in pairs:
            if k in seen:
                raise ValueError(f"duplicate key {k!r}")
            seen[k] = v
        return seen
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=no_duplicates)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise FormatError(f"{path}: safetensors header is not valid JSON ({str(e)[:100]})") from None
    if not isinstance(header, dict):
        raise FormatError(f"{path}: safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise FormatError(f"{path}: safetensors __metadata__ must map strings to strings")
    data_start = 8 + n
    data_len = file.size - data_start
    entries = []
    for name, e in header.items():
        where = f"{path}: tensor {name!r}"
        if not isinstance(e, dict) or set(e) - {"dtype", "shape", "data_offsets"} or len(e) != 3:
            raise FormatError(f"{where}: entry must have exactly dtype, shape, data_offsets")
        dtype = _DTYPES.get(e["dtype"]) if isinstance(e["dtype"], str) else None
        if dtype is None:
            raise FormatError(f"{where}: unsupported dtype {str(e['dtype'])[:20]!r}")
        shape, offsets = e["shape"], e["data_offsets"]
        if not isinstance(shape, list) or len(shape) > 8 or not all(_uint(d) for d in shape):
            raise FormatError(f"{where}: shape must be a list of at most 8 non-negative integers")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(_uint(o) for o in offsets):
            raise FormatError(f"{where}: data_offsets must be two non-negative integers")
        begin, end = offsets
        if not begin <= end <= data_len:
            raise FormatError(f"{where}: data span {begin}..{end} outside the data section ({data_len} bytes)")
        if end - begin != prod(shape) * RAW_DTYPES[dtype].itemsize:
            raise FormatError(f"{where}: data span of {end - begin} bytes does not match shape {shape} x {dtype}")
        entries.append((begin, end, name, dtype, tuple(shape)))
    entries.sort(key=lambda t: (t[0], t[1]))
    for (a0, a1, an, *_), (b0, b1, bn, *_) in zip(entries, entries[1:]):
        if b0 < a1:
            raise FormatError(f"{path}: tensors {an!r} and {bn!r} overlap in the data section")
    return {name: (begin, dtype, shape) for begin, end, name, dtype, shape in entries}, metadata, data_start


def _uint(x) -> bool:
    return type(x) is int and x >= 0


def open_safetensors(path: Path) -> Checkpoint:
    """Open a .safetensors file; tensors (in data order) are read lazily."""
    path = Path(path)
    file = RandomAccessFile(path)
    try:
        entries, metadata, data_start = read_safetensors_header(path, file)
    except BaseException:
        file.close()
        raise
    tensors = {name: TensorRef(name, shape, dtype, contiguous_rows(file, data_start + begin, dtype, shape))
               for name, (begin, dtype, shape) in entries.items()}
    return Checkpoint(path, "safetensors", tensors, [path.name], info={"metadata": metadata},
                      closers=[file.close])
