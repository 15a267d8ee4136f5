"""The reader layer's shared pieces: TensorRef, Checkpoint, positional file reads and dtype decoding.

Every reader (torch zip, safetensors, rwkv.cpp, HF folder) turns a source into a `Checkpoint` whose `tensors`
are lazy `TensorRef`s: opening a checkpoint parses headers only; bytes are read when `load()` or
`load_rows(a, b)` asks for them, so a 15 GB checkpoint streams row block by row block.

Reads are positional (`os.preadv` into a fresh NumPy buffer) rather than memory maps. The converter copies every
value anyway (upcast to float32), and a copy keeps the process's resident set at the size of the blocks in
flight: pages of a mapped 15 GB file would count toward RSS until unmapped, and a mapped file that shrinks under
us kills the process with SIGBUS instead of raising an error.
"""
from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Callable

import numpy as np

from ...errors import FormatError

# Raw element types by our short dtype names (little-endian; readers pass byte order where it can differ).
# bf16 is read as its uint16 bit pattern and widened in `decode`.
RAW_DTYPES: dict[str, np.dtype] = {
    "f32": np.dtype("<f4"), "f16": np.dtype("<f2"), "bf16": np.dtype("<u2"), "f64": np.dtype("<f8"),
    "i64": np.dtype("<i8"), "i32": np.dtype("<i4"), "i16": np.dtype("<i2"), "i8": np.dtype("i1"),
    "u64": np.dtype("<u8"), "u32": np.dtype("<u4"), "u16": np.dtype("<u2"), "u8": np.dtype("u1"),
    "bool": np.dtype("?"),
}


def decode(raw: np.ndarray, dtype: str) -> np.ndarray:
    """float32 array from raw elements of `dtype` (a fresh array; raw may be reused by the caller)."""
    if dtype == "bf16":
        # bfloat16 is the top half of a float32: widening is a 16-bit shift, exact for every value incl. NaN/Inf.
        # Shifting straight into the output (one allocation, no uint32 temporary) is twice as fast.
        out = np.empty(raw.shape, np.uint32)
        np.left_shift(raw, 16, out=out, dtype=np.uint32)
        return out.view(np.float32)
    return raw.astype(np.float32)


def prod(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


class RandomAccessFile:
    """A file read by absolute offset (thread-safe), with its size fixed at open.

    Reads go straight into caller-provided buffers; a short read (the file shrank, or a bad offset slipped
    through) is a FormatError naming the file, never a crash."""

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            self._fh = open(self.path, "rb", buffering=0)
        except OSError as e:
            raise FormatError(f"{self.path}: cannot open ({e.strerror})") from None
        self.size = os.fstat(self._fh.fileno()).st_size
        self._lock = threading.Lock()             # only for platforms without os.preadv (Windows)

    def read_into(self, offset: int, buf: np.ndarray) -> np.ndarray:
        """Fill `buf` (C-contiguous) with bytes starting at `offset`; returns buf."""
        if self._fh.closed:
            raise FormatError(f"{self.path}: checkpoint already closed")
        view = memoryview(buf).cast("B")
        want = len(view)
        if offset < 0 or offset + want > self.size:
            raise FormatError(f"{self.path}: read of {want} bytes at offset {offset} runs past the end of the "
                              f"file ({self.size} bytes)")
        done = 0
        while done < want:
            chunk = view[done:done + (1 << 30)]   # one read call moves at most ~2 GiB on Linux
            try:
                if hasattr(os, "preadv"):
                    got = os.preadv(self._fh.fileno(), [chunk], offset + done)
                else:
                    with self._lock:
                        self._fh.seek(offset + done)
                        got = self._fh.readinto(chunk)
            except OSError as e:
                raise FormatError(f"{self.path}: read failed at offset {offset + done} ({e.strerror})") from None
            if not got:
                raise FormatError(f"{self.path}: file is truncated (wanted {want} bytes at offset {offset})")
            done += got
        return buf

    def read_bytes(self, offset: int, n: int) -> bytes:
        return self.read_into(offset, np.empty(n, dtype=np.uint8)).tobytes()

    def close(self) -> None:
        self._fh.close()


class TensorRef:
    """One tensor of a checkpoint, not yet read.

    name:  the name as stored in the source (no renaming here; see quantize/names.py)
    shape: PyTorch order
    dtype: 'f32' | 'f16' | 'bf16' | quantized rwkv.cpp types 'q4_0','q4_1','q5_0','q5_1','q8_0'
           (rarely 'f64' or an integer type, converted to float32 on load)
    load() -> float32 array of `shape`; load_rows(a, b) -> float32 rows a..b along dim 0, reading only those."""

    __slots__ = ("name", "shape", "dtype", "_read_rows")

    def __init__(self, name: str, shape: tuple[int, ...], dtype: str,
                 read_rows: Callable[[int, int], np.ndarray]):
        self.name = name
        self.shape = tuple(int(d) for d in shape)
        self.dtype = dtype
        self._read_rows = read_rows               # (start, stop) -> float32 array of shape (stop-start, *shape[1:])

    @property
    def numel(self) -> int:
        return prod(self.shape)

    def load(self) -> np.ndarray:
        """The whole tensor as float32."""
        if not self.shape:                        # 0-d: readers store it as one row of one element
            return self._read_rows(0, 1).reshape(())
        return self._read_rows(0, self.shape[0])

    def load_rows(self, start: int, stop: int) -> np.ndarray:
        """float32 rows start..stop (clipped to the tensor, like slicing) along dim 0."""
        if not self.shape:
            raise ValueError(f"{self.name}: a 0-d tensor has no rows")
        start, stop, _ = slice(start, stop).indices(self.shape[0])
        stop = max(start, stop)
        return self._read_rows(start, stop)

    def __repr__(self) -> str:
        return f"TensorRef({self.name!r}, shape={self.shape}, dtype={self.dtype!r})"


class Checkpoint:
    """A parsed source: lazy tensors plus what was found beside them. Close it (or use `with`) when done.

    kind: 'pth' | 'safetensors' | 'hf' | 'rwkv_cpp'. tensors: name -> TensorRef in file order.
    source_files: basenames of the files read (provenance). config: parsed config.json of an HF folder (or an
    RWKV config.json beside a single file), else None. tokenizer_file: a rwkv_vocab*.txt or tokenizer.json beside
    the source, else None. info: format-specific facts (e.g. the rwkv.cpp header)."""

    def __init__(self, path: Path, kind: str, tensors: dict[str, TensorRef], source_files: list[str],
                 config: dict | None = None, tokenizer_file: Path | None = None, info: dict | None = None,
                 closers: list[Callable[[], None]] | None = None):
        self.path = Path(path)
        self.kind = kind
        self.tensors = tensors
        self.source_files = source_files
        self.config = config
        self.tokenizer_file = tokenizer_file
        self.info = info if info is not None else {}
        self._closers = list(closers or [])

    def close(self) -> None:
        while self._closers:
            self._closers.pop()()

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r}, kind={self.kind!r}, {len(self.tensors)} tensors)"


def contiguous_rows(file: RandomAccessFile, offset: int, dtype: str, shape: tuple[int, ...],
                    raw_dtype: np.dtype | None = None) -> Callable[[int, int], np.ndarray]:
    """Row reader for a C-contiguous tensor stored at `offset` (bounds are checked by the caller at open)."""
    raw_dtype = raw_dtype if raw_dtype is not None else RAW_DTYPES[dtype]
    tail = tuple(shape[1:])
    row = prod(tail)

    def read_rows(start: int, stop: int) -> np.ndarray:
        n = (stop - start) * row if shape else 1
        raw = np.empty(n, dtype=raw_dtype)
        if n:
            file.read_into(offset + start * row * raw_dtype.itemsize, raw)
        return decode(raw, dtype).reshape((stop - start,) + tail if shape else (1,))
    return read_rows


def find_tokenizer_file(folder: Path) -> Path | None:
    """A World vocab (rwkv_vocab*.txt, first by name) or a tokenizer.json in `folder`, else None."""
    try:
        vocabs = sorted(p for p in folder.glob("rwkv_vocab*.txt") if p.is_file())
    except OSError:
        return None
    if vocabs:
        return vocabs[0]
    tok = folder / "tokenizer.json"
    return tok if tok.is_file() else None


def read_json_file(path: Path, what: str, limit: int = 64 << 20):
    """Parse a small JSON file (config, index) with a size bound; FormatError on any problem."""
    import json
    try:
        size = path.stat().st_size
        if size > limit:
            raise FormatError(f"{path}: {what} is {size} bytes, more than the {limit >> 20} MiB allowed")
        return json.loads(path.read_bytes())
    except FormatError:
        raise
    except (OSError, ValueError, RecursionError) as e:
        raise FormatError(f"{path}: cannot read {what} ({e.__class__.__name__}: {str(e)[:120]})") from None
