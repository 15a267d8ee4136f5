"""rwkv.cpp model files (`.bin`, magic 'ggmf'): FP32, FP16 and ggml block-quantized tensors, dequantized exactly.

Layout (little-endian; rwkv.cpp file versions 100 and 101):
    header:  int32 magic 0x67676d66, version (100|101), n_vocab, n_embed, n_layer, data_type
    tensors until EOF: int32 dim_count (1..3), key_length, data_type, int32[dim_count] dims (innermost first),
                       key (UTF-8), data (row-major in PyTorch order)
Names are kept as stored; rwkv.cpp's converter already transformed some values (decays, transposed LoRAs):
that is the converter's business, not the reader's.

ggml blocks of 32 values (the layouts since ggml 00b49ec, i.e. rwkv.cpp file version 101; quantized files of
version 100 used older layouts and are refused like rwkv.cpp refuses them). All scales are IEEE fp16:
    Q4_0  d, qs[16]            x[j] = (qs[j] & 15) - 8,       x[j+16] = (qs[j] >> 4) - 8;          value = x d
    Q4_1  d, m, qs[16]         x[j] = qs[j] & 15,             x[j+16] = qs[j] >> 4;                 value = x d + m
    Q5_0  d, qh(u32), qs[16]   x[j] = (qs[j] & 15 | bit j of qh << 4) - 16, x[j+16] uses qs[j] >> 4, bit j+16
    Q5_1  d, m, qh, qs[16]     as Q5_0 without the -16;                                         value = x d + m
    Q8_0  d, qs[32] (int8)     value = qs[j] d
"""
from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

from ...errors import FormatError
from .base import Checkpoint, RandomAccessFile, TensorRef, find_tokenizer_file, prod

MAGIC = 0x67676D66
VERSIONS = (100, 101)
QK = 32                                  # values per quantized block
MAX_KEY_BYTES = 1024
MAX_DIM = 1 << 31

# rwkv.cpp data type codes -> (our dtype name, bytes per element or per block)
TYPES = {0: ("f32", 4), 1: ("f16", 2), 2: ("q4_0", 18), 3: ("q4_1", 20), 7: ("q5_0", 22), 8: ("q5_1", 24),
         9: ("q8_0", 34)}
_REMOVED = {4: "Q4_1_O", 5: "Q4_2", 6: "Q4_3"}
_UNSUPPORTED = {10: "Q8_1", 11: "Q2_K", 12: "Q3_K", 13: "Q4_K", 14: "Q5_K", 15: "Q6_K", 16: "Q8_K"}
QUANTIZED = ("q4_0", "q4_1", "q5_0", "q5_1", "q8_0")

BLOCK_DTYPES = {
    "q4_0": np.dtype([("d", "<f2"), ("qs", "u1", 16)]),
    "q4_1": np.dtype([("d", "<f2"), ("m", "<f2"), ("qs", "u1", 16)]),
    "q5_0": np.dtype([("d", "<f2"), ("qh", "<u4"), ("qs", "u1", 16)]),
    "q5_1": np.dtype([("d", "<f2"), ("m", "<f2"), ("qh", "<u4"), ("qs", "u1", 16)]),
    "q8_0": np.dtype([("d", "<f2"), ("qs", "i1", 32)]),
}
_BITS = np.arange(32, dtype=np.uint32)


def dequantize_blocks(blocks: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values (n_blocks * 32) of ggml blocks given as a structured array of BLOCK_DTYPES[dtype]."""
    d = blocks["d"].astype(np.float32)[:, None]
    if dtype == "q8_0":
        return (blocks["qs"].astype(np.float32) * d).reshape(-1)
    qs = blocks["qs"]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.int32)     # (n, 32): low nibbles, then high
    if dtype in ("q5_0", "q5_1"):
        high_bits = (blocks["qh"][:, None] >> _BITS) & 1                     # bit j of qh is value j's 5th bit
        q |= (high_bits << 4).astype(np.int32)
    if dtype in ("q4_0", "q5_0"):
        q -= 8 if dtype == "q4_0" else 16
        return (q.astype(np.float32) * d).reshape(-1)
    m = blocks["m"].astype(np.float32)[:, None]
    return (q.astype(np.float32) * d + m).reshape(-1)


def read_rwkv_cpp_header(path: Path, file: RandomAccessFile) -> dict:
    if file.size < 24:
        raise FormatError(f"{path}: too short for an rwkv.cpp file ({file.size} bytes)")
    magic, version, n_vocab, n_embed, n_layer, data_type = struct.unpack("<6I", file.read_bytes(0, 24))
    if magic != MAGIC:
        if magic == int.from_bytes(MAGIC.to_bytes(4, "little"), "big"):
            raise FormatError(f"{path}: big-endian rwkv.cpp file; not supported")
        raise FormatError(f"{path}: not an rwkv.cpp file (magic 0x{magic:08x})")
    if version not in VERSIONS:
        raise FormatError(f"{path}: unsupported rwkv.cpp file version {version} (expected 100 or 101)")
    _check_type(path, data_type, version, "the file")
    for what, value in (("n_vocab", n_vocab), ("n_embed", n_embed), ("n_layer", n_layer)):
        if not 0 < value < (1 << 24):
            raise FormatError(f"{path}: implausible {what} = {value} in the header")
    return {"file_version": version, "n_vocab": n_vocab, "n_embed": n_embed, "n_layer": n_layer,
            "data_type": TYPES[data_type][0]}


def _check_type(path: Path, code: int, version: int, what: str) -> str:
    if code in _REMOVED:
        raise FormatError(f"{path}: {what} uses {_REMOVED[code]}, a format rwkv.cpp removed; re-quantize it")
    if code in _UNSUPPORTED:
        raise FormatError(f"{path}: {what} uses {_UNSUPPORTED[code]}, not supported here")
    if code not in TYPES:
        raise FormatError(f"{path}: {what} has unknown data type {code}")
    name = TYPES[code][0]
    if name in QUANTIZED and version == 100:
        raise FormatError(f"{path}: {what} is {name.upper()} from rwkv.cpp file version 100 (old ggml block "
                          f"layout); re-quantize it with a current rwkv.cpp")
    return name


def open_rwkv_cpp(path: Path) -> Checkpoint:
    """Open an rwkv.cpp .bin file; every tensor header is validated, data read lazily."""
    path = Path(path)
    file = RandomAccessFile(path)
    try:
        info = read_rwkv_cpp_header(path, file)
        tensors = _read_tensor_table(path, file, info["file_version"])
    except BaseException:
        file.close()
        raise
    emb = tensors.get("emb.weight")
    if emb is not None and emb.shape != (info["n_vocab"], info["n_embed"]):
        file.close()
        raise FormatError(f"{path}: emb.weight has shape {emb.shape} but the header says "
                          f"n_vocab={info['n_vocab']}, n_embed={info['n_embed']}")
    return Checkpoint(path, "rwkv_cpp", tensors, [path.name], tokenizer_file=find_tokenizer_file(path.parent),
                      info=info, closers=[file.close])


def _read_tensor_table(path: Path, file: RandomAccessFile, version: int) -> dict[str, TensorRef]:
    tensors: dict[str, TensorRef] = {}
    pos = 24
    while pos < file.size:
        if pos + 12 > file.size:
            raise FormatError(f"{path}: truncated tensor header at offset {pos}")
        dim_count, key_length, code = struct.unpack("<3I", file.read_bytes(pos, 12))
        where = f"{path}: tensor #{len(tensors)} at offset {pos}"
        if not 1 <= dim_count <= 3:
            raise FormatError(f"{where}: {dim_count} dimensions (expected 1 to 3)")
        if not 0 < key_length <= MAX_KEY_BYTES:
            raise FormatError(f"{where}: key length {key_length} (expected 1 to {MAX_KEY_BYTES})")
        head_end = pos + 12 + 4 * dim_count
        if head_end + key_length > file.size:
            raise FormatError(f"{where}: header runs past the end of the file (truncated?)")
        dims = struct.unpack(f"<{dim_count}I", file.read_bytes(pos + 12, 4 * dim_count))
        try:
            name = file.read_bytes(head_end, key_length).decode("utf-8")
        except UnicodeDecodeError:
            raise FormatError(f"{where}: key is not valid UTF-8") from None
        where = f"{path}: tensor {name!r}"
        dtype = _check_type(path, code, version, f"tensor {name!r}")
        if not all(0 < d < MAX_DIM for d in dims):
            raise FormatError(f"{where}: bad dimensions {list(dims)}")
        if name in tensors:
            raise FormatError(f"{where}: appears twice")
        numel = prod(dims)
        unit = TYPES[code][1]
        if dtype in QUANTIZED:
            if dims[0] % QK:
                raise FormatError(f"{where}: {dtype} rows of {dims[0]} values are not whole blocks of {QK}")
            nbytes = numel // QK * unit
        else:
            nbytes = numel * unit
        data = head_end + key_length
        if data + nbytes > file.size:
            raise FormatError(f"{where}: data ({nbytes} bytes at offset {data}) runs past the end of the file "
                              f"({file.size} bytes; truncated?)")
        shape = tuple(reversed(dims))                  # rwkv.cpp stores innermost first
        tensors[name] = TensorRef(name, shape, dtype, _rows_reader(file, data, dtype, shape))
        pos = data + nbytes
    if not tensors:
        raise FormatError(f"{path}: rwkv.cpp file without tensors")
    return tensors


def _rows_reader(file: RandomAccessFile, offset: int, dtype: str, shape: tuple[int, ...]):
    tail = shape[1:]
    row = prod(tail)
    if dtype in ("f32", "f16"):
        raw_dtype = np.dtype("<f4" if dtype == "f32" else "<f2")

        def read_rows(start: int, stop: int) -> np.ndarray:
            raw = np.empty((stop - start) * row, raw_dtype)
            if raw.size:
                file.read_into(offset + start * row * raw_dtype.itemsize, raw)
            return raw.astype(np.float32).reshape((stop - start,) + tail)
        return read_rows

    block = BLOCK_DTYPES[dtype]

    def read_quantized_rows(start: int, stop: int) -> np.ndarray:
        first, last = start * row, stop * row               # element range; blocks never straddle rows of
        b0, b1 = first // QK, -(-last // QK)                 # >= 32 values, but 1-D tensors may start mid-block
        raw = np.empty((b1 - b0) * block.itemsize, np.uint8)
        if raw.size:
            file.read_into(offset + b0 * block.itemsize, raw)
        values = dequantize_blocks(raw.view(block), dtype)
        return values[first - b0 * QK:last - b0 * QK].reshape((stop - start,) + tail)
    return read_quantized_rows
