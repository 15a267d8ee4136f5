"""The rwkv-lite model file: one safetensors file that holds everything a model needs.

Specified in docs/format.md. In short: a valid safetensors file (8-byte little-endian header length, a JSON header,
then the data section) whose ``__metadata__`` carries the format version, the architecture and config, the storage
scheme of every logical tensor, provenance, per-array CRC32 checksums; the tokenizer travels as a uint8 array.

Two halves:

* ``ModelWriter`` streams arrays to disk: the caller declares every stored array (name, dtype, shape) up front,
  then appends bytes to each in order (rows of a big matrix can arrive block by block, and several arrays can be
  filled in turn). The header is written first with placeholder checksums and rewritten, same length, at the end.
  Output goes to a temporary file in the destination folder, is fsync'ed and renamed into place only when complete.
* ``read_model_file`` maps a file read-only and returns views of its arrays, after checking the header against the
  file: bounds, overlaps, dtype x shape == byte span, known metadata. ``verify_checksums`` re-reads the data.
"""
from __future__ import annotations

import json
import mmap
import os
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from .errors import FormatError

FORMAT_NAME = "rwkv-lite"
FORMAT_VERSION = 1
ALIGN = 64                       # every array starts at a multiple of 64 bytes of the file (SIMD/cache friendly)
MAX_HEADER_BYTES = 64 << 20      # refuse absurd headers before allocating
PAD_PREFIX = "__pad."            # filler uint8 arrays that keep the next array aligned (safetensors has no gaps)
TOKENIZER_ARRAY = "tokenizer.data"

# safetensors dtype names <-> numpy dtypes (little-endian)
DTYPES = {
    "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2"), "F64": np.dtype("<f8"),
    "I8": np.dtype("i1"), "U8": np.dtype("u1"), "I16": np.dtype("<i2"), "I32": np.dtype("<i4"),
    "I64": np.dtype("<i8"), "U16": np.dtype("<u2"), "U32": np.dtype("<u4"),
}
_NUMPY_TO_ST = {np.dtype("<f4"): "F32", np.dtype("<f2"): "F16", np.dtype("i1"): "I8", np.dtype("u1"): "U8",
                np.dtype("<i4"): "I32", np.dtype("<u2"): "U16", np.dtype("<u4"): "U32", np.dtype("<f8"): "F64"}


def st_dtype(dtype) -> str:
    """safetensors name of a numpy dtype."""
    try:
        return _NUMPY_TO_ST[np.dtype(dtype).newbyteorder("<") if np.dtype(dtype).itemsize > 1 else np.dtype(dtype)]
    except KeyError:
        raise ValueError(f"dtype {dtype} cannot be stored") from None


# ----------------------------------------------------------------------------------------------------------------
# Writing

@dataclass
class _Slot:
    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    start: int                   # offset inside the data section
    nbytes: int
    written: int = 0
    crc: int = 0


def _temp_path(dst: Path) -> Path:
    return dst.with_name(f".{dst.name}.tmp-{os.getpid()}")


def clean_stale_temporaries(dst: Path) -> None:
    """Remove temporaries of `dst` left by writers that died (their process id no longer exists)."""
    prefix = f".{dst.name}.tmp-"
    try:
        entries = list(dst.parent.iterdir())
    except OSError:
        return
    for entry in entries:
        if not entry.name.startswith(prefix):
            continue
        pid = entry.name[len(prefix):]
        if pid.isdigit() and not _pid_alive(int(pid)):
            try:
                entry.unlink()
            except OSError:
                pass


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class AtomicFile:
    """A file written under a temporary name in the destination folder and renamed into place on success.

    On any exception the temporary is deleted and the destination is left untouched."""

    def __init__(self, dst: str | os.PathLike):
        self.dst = Path(dst)
        clean_stale_temporaries(self.dst)
        self.tmp = _temp_path(self.dst)
        try:
            self.file = open(self.tmp, "w+b")
        except OSError as e:            # name the file the user asked for, not our temporary
            raise OSError(e.errno, e.strerror or str(e), str(self.dst)) from None

    def commit(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        try:
            os.replace(self.tmp, self.dst)
        except OSError as e:
            self.abort()
            raise OSError(e.errno, e.strerror or str(e), str(self.dst)) from None
        try:                                   # make the rename itself durable
            dir_fd = os.open(self.dst.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError:
            pass

    def abort(self) -> None:
        try:
            self.file.close()
        finally:
            try:
                self.tmp.unlink()
            except FileNotFoundError:
                pass

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.commit()
        else:
            self.abort()
        return False


def atomic_write_bytes(dst: str | os.PathLike, data: bytes) -> None:
    with AtomicFile(dst) as f:
        f.file.write(data)


# A model file just written sits in the page cache in the pieces the writer wrote it in, small ones when the
# converter appends row blocks; the kernel then keeps those pieces (4 KiB-64 KiB folios) for as long as the file stays
# cached. Read back sequentially (the loader's read-ahead, or the first pass's page faults), the same file is cached
# in 2 MiB folios, and decoding from it is faster: RWKV-7 1.5B int8 decode took 0.93x the time on a Zen 5 VM
# (Linux 6.18, ext4) with the file re-read (docs/performance.md). So once the written data is on disk the writer drops
# it from the cache: the first load reads the file from disk, sequentially (a cold start, with its progress line).
EVICT_WRITTEN_BYTES = 64 << 20


def evict_from_page_cache(path) -> None:
    """Ask the kernel to drop the (clean) cached pages of `path` (Linux; elsewhere, or on any error, nothing)."""
    if not hasattr(os, "posix_fadvise"):
        return
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    except OSError:
        pass
    finally:
        os.close(fd)


class ModelWriter:
    """Streaming writer of a model file.

    >>> w = ModelWriter(path, metadata, [("a", np.float32, (4, 8)), ("a.scale", np.float32, (4,))])
    >>> w.append("a", rows_0_to_2); w.append("a.scale", s02); w.append("a", rows_2_to_4); ...
    >>> w.close()          # checks every array is complete, writes checksums, fsyncs, renames into place

    `metadata` values that are not strings are JSON-encoded. Use as a context manager so that an error removes the
    temporary file."""

    def __init__(self, dst, metadata: dict, arrays: Iterable[tuple[str, object, tuple[int, ...]]]):
        self.dst = Path(dst)
        self.metadata = {k: v if isinstance(v, str) else json.dumps(v, sort_keys=True) for k, v in metadata.items()}
        self.metadata["format"] = FORMAT_NAME
        self.metadata["format_version"] = str(FORMAT_VERSION)
        self.slots: dict[str, _Slot] = {}
        offset = 0
        n_pad = 0
        self._order: list[str] = []
        for name, dtype, shape in arrays:
            if name in self.slots or name.startswith(PAD_PREFIX) or name == "__metadata__":
                raise ValueError(f"duplicate or reserved array name {name!r}")
            if offset % ALIGN:
                pad = ALIGN - offset % ALIGN
                pad_name = f"{PAD_PREFIX}{n_pad}"
                n_pad += 1
                self.slots[pad_name] = _Slot(pad_name, np.dtype("u1"), (pad,), offset, pad)
                self._order.append(pad_name)
                offset += pad
            dtype = np.dtype(dtype)
            shape = tuple(int(d) for d in shape)
            nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            self.slots[name] = _Slot(name, dtype, shape, offset, nbytes)
            self._order.append(name)
            offset += nbytes
        self.data_bytes = offset
        self._header = self._header_bytes()
        self._data_start = 8 + len(self._header)
        self._file = AtomicFile(self.dst)
        try:
            f = self._file.file
            f.write(struct.pack("<Q", len(self._header)))
            f.write(self._header)
            f.truncate(self._data_start + self.data_bytes)
        except OSError as e:
            raise self._write_failed(e) from None
        for slot in self.slots.values():        # pads are zeros: already there after truncate
            if slot.name.startswith(PAD_PREFIX):
                slot.crc = zlib.crc32(bytes(slot.nbytes))
                slot.written = slot.nbytes

    def _header_bytes(self) -> bytes:
        header: dict = {}
        checksums = {}
        for name in self._order:
            s = self.slots[name]
            header[name] = {"dtype": st_dtype(s.dtype), "shape": list(s.shape),
                            "data_offsets": [s.start, s.start + s.nbytes]}
            if not name.startswith(PAD_PREFIX):
                checksums[name] = f"{s.crc:08x}"
        meta = dict(self.metadata)
        meta["checksums"] = json.dumps({"algorithm": "crc32", "arrays": checksums}, sort_keys=True)
        header["__metadata__"] = meta
        raw = json.dumps(header, separators=(",", ":")).encode()
        # pad with spaces so that the data section starts aligned (allowed by the safetensors spec)
        total = 8 + len(raw)
        raw += b" " * ((-total) % ALIGN)
        return raw

    def append(self, name: str, data: np.ndarray) -> None:
        """Append the next bytes of array `name` (any number of leading rows, C-contiguous order)."""
        slot = self.slots.get(name)
        if slot is None:
            raise KeyError(f"array {name!r} was not declared")
        arr = np.ascontiguousarray(data, dtype=slot.dtype)
        buf = memoryview(arr).cast("B")
        if slot.written + len(buf) > slot.nbytes:
            raise ValueError(f"array {name!r}: more data than its declared shape {slot.shape}")
        f = self._file.file
        try:
            f.seek(self._data_start + slot.start + slot.written)
            f.write(buf)
        except OSError as e:
            raise self._write_failed(e) from None
        slot.crc = zlib.crc32(buf, slot.crc)
        slot.written += len(buf)

    def close(self) -> None:
        missing = [s.name for s in self.slots.values() if s.written != s.nbytes]
        if missing:
            self.abort()
            raise ValueError(f"arrays not completely written: {', '.join(missing[:5])}")
        header = self._header_bytes()
        if len(header) != len(self._header):       # checksums are fixed-width hex, so this cannot change
            self.abort()
            raise AssertionError("header length changed between passes")
        f = self._file.file
        try:
            f.seek(8)
            f.write(header)
            self._file.commit()
        except OSError as e:
            raise self._write_failed(e) from None
        if self.data_bytes >= EVICT_WRITTEN_BYTES:
            evict_from_page_cache(self.dst)

    def abort(self) -> None:
        self._file.abort()

    def _write_failed(self, e: OSError) -> OSError:
        """A write failed (typically ENOSPC, which may surface only at flush or fsync): remove the temporary and
        return the error re-addressed to the destination, so that the one-line message names the file."""
        try:
            self.abort()
        except OSError:                 # closing flushes the buffer again, and that fails the same way
            pass
        return OSError(e.errno, e.strerror or str(e), str(self.dst))

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self.abort()
        return False


# ----------------------------------------------------------------------------------------------------------------
# Reading

@dataclass
class ModelFile:
    """A mapped model file: `arrays` are read-only views into the map; `metadata` is the decoded metadata."""
    path: Path
    metadata: dict
    arrays: dict[str, np.ndarray]
    spans: dict[str, tuple[int, int]] = field(default_factory=dict)   # absolute byte spans, for verification
    _map: object = None

    @property
    def config(self) -> dict:
        return self.metadata["config"]

    @property
    def tensors(self) -> dict:
        return self.metadata["tensors"]

    def close(self) -> None:
        self.arrays.clear()
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:        # views still alive elsewhere; the map goes when they do
                pass
            self._map = None


_JSON_META = ("config", "tensors", "tokenizer", "provenance", "checksums")


def _parse_json(text):
    """json.loads, with every way hostile text can make it fail reported as ValueError: besides malformed JSON,
    nesting deeper than the interpreter's recursion limit (RecursionError) and integers longer than Python's
    int-conversion digit limit (a ValueError that is not a JSONDecodeError)."""
    try:
        return json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(e.__class__.__name__) from None
    except RecursionError:
        raise ValueError("nested too deeply") from None
    except ValueError:
        raise ValueError("a number too long to convert") from None


def _record_is_well_formed(record) -> bool:
    """A tensor's metadata record: {"scheme": str, "shape": [int >= 0, ...], "params": {...} (optional), ...}."""
    return (isinstance(record, dict) and isinstance(record.get("scheme"), str)
            and isinstance(record.get("params", {}), dict) and isinstance(record.get("shape"), list)
            and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in record["shape"]))


def read_header(path: Path, file_size: int, read: Callable[[int, int], bytes]) -> tuple[dict, int]:
    """Parse and bounds-check a safetensors header. Returns (header dict, data start offset)."""
    if file_size < 8:
        raise FormatError(f"{path}: too short to be a safetensors file ({file_size} bytes)")
    (n,) = struct.unpack("<Q", read(0, 8))
    if n == 0 or n > MAX_HEADER_BYTES or 8 + n > file_size:
        if read(8, 1) != b"{":
            raise FormatError(f"{path}: not a model file (no safetensors header)")
        raise FormatError(f"{path}: header length {n} does not fit the file ({file_size} bytes; truncated?)")
    raw = read(8, n)
    try:
        header = _parse_json(raw)
    except ValueError as e:
        raise FormatError(f"{path}: header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise FormatError(f"{path}: header is not a JSON object")
    data_start = 8 + n
    data_size = file_size - data_start
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            if not isinstance(info, dict) or not all(isinstance(v, str) for v in info.values()):
                raise FormatError(f"{path}: __metadata__ must map strings to strings")
            continue
        try:
            dtype = DTYPES[info["dtype"]]
            shape = tuple(info["shape"])
            a, b = info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise FormatError(f"{path}: array {name!r} has a malformed header entry") from None
        if not all(isinstance(d, int) and 0 <= d < 2**40 for d in shape) or not (
                isinstance(a, int) and isinstance(b, int)):
            raise FormatError(f"{path}: array {name!r} has an invalid shape or offsets")
        count = 1
        for d in shape:
            count *= d
        if not (0 <= a <= b <= data_size):
            raise FormatError(f"{path}: array {name!r} spans bytes {a}..{b} outside the data section "
                              f"({data_size} bytes; file truncated?)")
        if count * dtype.itemsize != b - a:
            raise FormatError(f"{path}: array {name!r} has {b - a} bytes but dtype {info['dtype']} x shape "
                              f"{list(shape)} needs {count * dtype.itemsize}")
        spans.append((a, b, name))
    spans.sort()
    for (a0, b0, n0), (a1, b1, n1) in zip(spans, spans[1:]):
        if a1 < b0:
            raise FormatError(f"{path}: arrays {n0!r} and {n1!r} overlap")
    return header, data_start


def read_model_file(path: str | os.PathLike) -> ModelFile:
    """Map a model file read-only and return views of its arrays (no weight is copied)."""
    path = Path(path)
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise FormatError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise FormatError(f"{path}: is a folder, not a model file") from None
    except OSError as e:
        raise FormatError(f"{path}: cannot open ({e.strerror})") from None
    with f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            raise FormatError(f"{path}: empty file")
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    header, data_start = read_header(path, size, lambda a, n: mm[a:a + n])
    raw_meta = header.pop("__metadata__", {})
    if raw_meta.get("format") != FORMAT_NAME:
        raise FormatError(f"{path}: not an rwkv-lite model file (a plain safetensors file? convert it first with "
                          f"`rwkv-lite convert`)")
    try:
        version = int(raw_meta.get("format_version", "0"))
    except ValueError:
        version = 0
    if version < 1 or version > FORMAT_VERSION:
        raise FormatError(f"{path}: format version {raw_meta.get('format_version')!r} is not supported by this "
                          f"rwkv-lite (supports 1..{FORMAT_VERSION})")
    metadata = dict(raw_meta)
    for key in _JSON_META:
        if key in metadata:
            try:
                metadata[key] = _parse_json(metadata[key])
            except ValueError as e:
                raise FormatError(f"{path}: metadata {key!r} is not valid JSON ({e})") from None
    for key in ("config", "tensors"):
        if not isinstance(metadata.get(key), dict):
            raise FormatError(f"{path}: metadata {key!r} is missing")
    for key in ("tokenizer", "provenance", "checksums"):
        if metadata.get(key) is not None and not isinstance(metadata[key], dict):
            raise FormatError(f"{path}: metadata {key!r} is not a JSON object")
    for name, record in metadata["tensors"].items():
        if not _record_is_well_formed(record):
            raise FormatError(f"{path}: tensor {name!r} has a malformed record in the metadata")
    arrays = {}
    spans = {}
    buf = memoryview(mm)
    for name, info in header.items():
        a, b = info["data_offsets"]
        spans[name] = (data_start + a, data_start + b)
        if name.startswith(PAD_PREFIX):
            continue
        dtype = DTYPES[info["dtype"]]
        arr = np.frombuffer(buf, dtype=dtype, count=(b - a) // dtype.itemsize, offset=data_start + a)
        arrays[name] = arr.reshape(info["shape"])
    return ModelFile(path, metadata, arrays, spans, mm)


def verify_checksums(model_file: ModelFile, progress: Callable[[int], None] | None = None) -> list[str]:
    """Recompute every array's CRC32; return the names of arrays whose bytes do not match (empty list = intact).

    `progress(nbytes)` is called as data is checked."""
    sums = model_file.metadata.get("checksums")
    if not isinstance(sums, dict) or sums.get("algorithm") != "crc32" or not isinstance(sums.get("arrays"), dict):
        raise FormatError(f"{model_file.path}: file has no checksums")
    expected = sums["arrays"]
    bad = []
    missing = set(model_file.arrays) - set(expected)
    if missing:
        bad.extend(sorted(missing))
    mm = model_file._map
    for name, want in expected.items():
        span = model_file.spans.get(name)
        if span is None:
            bad.append(name)
            continue
        crc = 0
        pos, end = span
        step = 64 << 20
        while pos < end:
            n = min(step, end - pos)
            crc = zlib.crc32(mm[pos:pos + n], crc)
            pos += n
            if progress:
                progress(n)
        if f"{crc:08x}" != want:
            bad.append(name)
    return bad
