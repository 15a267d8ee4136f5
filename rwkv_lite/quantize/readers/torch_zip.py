"""PyTorch zip checkpoints (`.pth`, HF `pytorch_model*.bin`) read without torch and without running their pickle.

Layout written by torch.save (torch >= 1.6), all records under one folder `<archive>/`:
    data.pkl        pickle (protocol 2) of the state dict; tensors appear as
                    _rebuild_tensor_v2(<persistent id ('storage', torch.FloatStorage, key, 'cpu', numel)>,
                                       storage_offset, size, stride, requires_grad, backward_hooks)
    data/<key>      raw little-endian storage bytes, stored uncompressed and 64-byte aligned
    byteorder, version, .format_version, .storage_alignment, .data/serialization_id   small text records

The zip directory comes from `zipfile`; a stored member's bytes are then read in place at the offset given by its
local header, so a 15 GB file streams tensor by tensor. data.pkl runs on a small pickle machine of our own
(torch_pickle.py: `RestrictedUnpickler`): it knows the few globals a state dict needs and maps each to our own code
that records a tensor reference. Nothing named in the file is ever imported or called; any other global, and
opcodes that build arbitrary objects (INST, OBJ, NEWOBJ, EXT*), are refused with UnsafeCheckpointError. This module
reads the zip container: its directory, the records' places, and the storages the pickle refers to.
"""
from __future__ import annotations

import struct
import zipfile
from pathlib import Path

import numpy as np

from ...errors import FormatError, UnsafeCheckpointError
from .base import RAW_DTYPES, Checkpoint, RandomAccessFile, TensorRef, contiguous_rows, decode, prod
from .torch_pickle import RestrictedUnpickler, Storage, TensorSpec, storage_id

MAX_PICKLE_BYTES = 64 << 20            # data.pkl of a 7B state dict is ~100 KB
MAX_COMPRESSED_MEMBER = 256 << 20      # compressed (deflated) storages are read whole; torch never writes them
_LOCAL_HEADER = struct.Struct("<IHHHHHIIIHH")
_LOCAL_MAGIC = 0x04034B50
_ARCHIVE_MAGICS = (b"PK\x03\x04", b"PK\x05\x06", b"\x1f\x8b", b"BZh", b"\xfd7zXZ", b"7z\xbc\xaf")
_ARCHIVE_SUFFIXES = (".zip", ".pth", ".pt", ".bin", ".tar", ".gz", ".tgz", ".bz2", ".xz", ".7z", ".pkl",
                     ".pickle", ".npz", ".whl", ".egg", ".jar", ".ckpt", ".safetensors")
_KNOWN_RECORDS = {"data.pkl", "version", ".data/version", ".data/serialization_id", "byteorder",
                  ".format_version", ".storage_alignment"}


class _Member:
    __slots__ = ("name", "zinfo", "data_offset", "size", "stored")

    def __init__(self, name, zinfo, data_offset, size, stored):
        self.name, self.zinfo, self.data_offset, self.size, self.stored = name, zinfo, data_offset, size, stored


class _MemoryFile:
    """RandomAccessFile look-alike over a compressed member, inflated when read.

    Members sharing one `cache` (one checkpoint) keep only the most recently inflated member in memory: the
    converter reads tensor by tensor, so its row blocks hit the cache and memory stays at one member."""

    def __init__(self, path: Path, zinfo: zipfile.ZipInfo, cache: dict | None = None):
        self.path, self.zinfo = path, zinfo
        self.size = zinfo.file_size
        self._cache = cache if cache is not None else {}

    def _inflated(self) -> bytes:
        if self._cache.get("name") != self.zinfo.filename:
            self._cache.clear()
            try:
                with zipfile.ZipFile(self.path) as zf:
                    data = zf.read(self.zinfo)
            except Exception as e:      # zlib.error, lzma/bz2 errors, BadZipFile (CRC), ...: all mean damaged data
                raise FormatError(f"{self.path}: cannot inflate {self.zinfo.filename} "
                                  f"({e.__class__.__name__}: {str(e)[:80]})") from None
            self._cache.update(name=self.zinfo.filename, data=data)
        return self._cache["data"]

    def read_into(self, offset: int, buf: np.ndarray) -> np.ndarray:
        data = self._inflated()
        view = memoryview(buf).cast("B")
        if offset < 0 or offset + len(view) > len(data):
            raise FormatError(f"{self.path}: read past the end of {self.zinfo.filename}")
        view[:] = data[offset:offset + len(view)]
        return buf


def _zip_members(path: Path, file: RandomAccessFile) -> dict[str, _Member]:
    try:
        with open(path, "rb") as fh, zipfile.ZipFile(fh) as zf:
            infos = zf.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError, struct.error,
            NotImplementedError, UnicodeDecodeError, OverflowError) as e:
        raise FormatError(f"{path}: not a readable zip archive ({e.__class__.__name__}: {str(e)[:100]})") from None
    members: dict[str, _Member] = {}
    spans = []
    for zi in infos:
        if zi.filename in members:
            raise FormatError(f"{path}: zip member {zi.filename!r} appears twice")
        if zi.flag_bits & 0x1:
            raise FormatError(f"{path}: zip member {zi.filename!r} is encrypted")
        if zi.header_offset < 0 or zi.header_offset + _LOCAL_HEADER.size > file.size:
            raise FormatError(f"{path}: zip member {zi.filename!r} has its header outside the file")
        head = _LOCAL_HEADER.unpack(file.read_bytes(zi.header_offset, _LOCAL_HEADER.size))
        magic, name_len, extra_len = head[0], head[9], head[10]
        if magic != _LOCAL_MAGIC:
            raise FormatError(f"{path}: zip member {zi.filename!r}: bad local header")
        data_offset = zi.header_offset + _LOCAL_HEADER.size + name_len + extra_len
        if data_offset + zi.compress_size > file.size:
            raise FormatError(f"{path}: zip member {zi.filename!r} runs past the end of the file (truncated?)")
        stored = zi.compress_type == zipfile.ZIP_STORED
        if stored and zi.compress_size != zi.file_size:
            raise FormatError(f"{path}: stored zip member {zi.filename!r} has inconsistent sizes")
        members[zi.filename] = _Member(zi.filename, zi, data_offset, zi.file_size, stored)
        spans.append((zi.header_offset, data_offset + zi.compress_size, zi.filename))
    spans.sort()
    for (a0, a1, an), (b0, b1, bn) in zip(spans, spans[1:]):
        if b0 < a1:
            raise FormatError(f"{path}: zip members {an!r} and {bn!r} overlap")
    return members


def _read_member(path: Path, file: RandomAccessFile, m: _Member, limit: int) -> bytes:
    if m.size > limit:
        raise FormatError(f"{path}: {m.name} is {m.size} bytes, more than the {limit >> 20} MiB allowed")
    if m.stored:
        return file.read_bytes(m.data_offset, m.size)
    mem = _MemoryFile(path, m.zinfo)
    return mem.read_into(0, np.empty(m.size, np.uint8)).tobytes()


def _member_head(path: Path, file: RandomAccessFile, m: _Member, n: int = 8) -> bytes:
    """The first bytes of a member (inflating a compressed one only if it is small)."""
    if m.stored:
        return file.read_bytes(m.data_offset, min(n, m.size))
    return _read_member(path, file, m, MAX_PICKLE_BYTES)[:n] if m.size <= MAX_PICKLE_BYTES else b""


def _looks_like_archive(head: bytes) -> bool:
    return any(head.startswith(magic) for magic in _ARCHIVE_MAGICS)


def open_torch_zip(path: Path) -> Checkpoint:
    """Open a torch.save zip checkpoint; tensors are read lazily. See the module docstring."""
    path = Path(path)
    file = RandomAccessFile(path)
    try:
        return _open(path, file)
    except BaseException:
        file.close()
        raise


def _open(path: Path, file: RandomAccessFile) -> Checkpoint:
    members = _zip_members(path, file)
    pickles = [n for n in members if n == "data.pkl" or n.endswith("/data.pkl")]
    nested = [n for n in members if n.lower().endswith(_ARCHIVE_SUFFIXES) and not n.endswith("data.pkl")]
    if nested:
        raise UnsafeCheckpointError(f"{path}: contains a nested archive {nested[0]!r}; refused (unpack it and "
                                    f"convert the inner checkpoint if you trust it)")
    if not pickles:
        if any(n.endswith("constants.pkl") or "/code/" in n for n in members):
            raise FormatError(f"{path}: a TorchScript archive, not a state dict; save model.state_dict() instead")
        raise FormatError(f"{path}: zip archive without data.pkl: not a PyTorch checkpoint")
    if len(pickles) > 1:
        raise FormatError(f"{path}: {len(pickles)} data.pkl records ({pickles[0]!r}, {pickles[1]!r}); ambiguous")
    prefix = pickles[0][:-len("data.pkl")]
    for name, m in members.items():          # small records must not hide archives or pickles
        rel = name[len(prefix):] if name.startswith(prefix) else None
        if rel is not None and rel.startswith("data/"):
            continue
        head = _member_head(path, file, m)
        if _looks_like_archive(head):
            raise UnsafeCheckpointError(f"{path}: record {name!r} is itself an archive (nested archive); refused")
        if rel not in _KNOWN_RECORDS and head.startswith(b"\x80"):
            raise UnsafeCheckpointError(f"{path}: extra pickle record {name!r}; refused")

    byteorder = "little"
    if prefix + "byteorder" in members:
        byteorder = _read_member(path, file, members[prefix + "byteorder"], 64).decode("ascii", "replace").strip()
        if byteorder not in ("little", "big"):
            raise FormatError(f"{path}: byteorder record says {byteorder!r}")

    storages: dict[str, Storage] = {}
    inflate_cache: dict = {}                             # shared by compressed storages (see _MemoryFile)

    def persistent_load(pid):
        key, dtype, numel = storage_id(pid, str(path))
        if key in storages:
            s = storages[key]
            if s.dtype != dtype:
                raise FormatError(f"{path}: storage {key} is used as both {s.dtype} and {dtype}")
            return s
        member = members.get(f"{prefix}data/{key}")
        if member is None:
            raise FormatError(f"{path}: storage record data/{key} is missing (truncated or damaged file)")
        nbytes = numel * RAW_DTYPES[dtype].itemsize
        if nbytes > member.size:
            raise FormatError(f"{path}: storage data/{key} holds {member.size} bytes but data.pkl claims {nbytes}")
        if member.stored:
            src, offset = file, member.data_offset
        else:
            if member.size > MAX_COMPRESSED_MEMBER:
                raise FormatError(f"{path}: compressed storage data/{key} is too large to read "
                                  f"({member.size} bytes); re-save the checkpoint with torch.save")
            src, offset = _MemoryFile(path, member.zinfo, inflate_cache), 0
        storages[key] = s = Storage(key, dtype, nbytes, src, offset)
        return s

    pkl = _read_member(path, file, members[prefix + "data.pkl"], MAX_PICKLE_BYTES)
    obj = RestrictedUnpickler(pkl, f"{path}: data.pkl", persistent_load).load()

    state, nested_key = _find_state_dict(path, obj)
    order = ">" if byteorder == "big" else "<"
    tensors: dict[str, TensorRef] = {}
    ignored = []
    for name, value in state.items():
        if not isinstance(value, TensorSpec):
            ignored.append(str(name))
            continue
        if type(name) is not str:
            raise FormatError(f"{path}: tensor key {name!r} is not a string")
        tensors[name] = _tensor_ref(path, name, value, order)
    info = {"archive": prefix.rstrip("/"), "byteorder": byteorder, "storages": len(storages)}
    if nested_key is not None:
        info["state_dict_key"] = nested_key
    if ignored:
        info["ignored_entries"] = ignored
    return Checkpoint(path, "pth", tensors, [path.name], info=info, closers=[file.close, inflate_cache.clear])


def _find_state_dict(path: Path, obj) -> tuple[dict, str | None]:
    """The dict of tensors: the pickle itself, or (training checkpoints) its 'state_dict'/'model'/'module'."""
    if not isinstance(obj, dict):
        raise FormatError(f"{path}: data.pkl holds a {type(obj).__name__}, not a dict of tensors")
    if any(isinstance(v, TensorSpec) for v in obj.values()):
        return obj, None
    for key in ("state_dict", "model", "module"):
        inner = obj.get(key)
        if isinstance(inner, dict) and any(isinstance(v, TensorSpec) for v in inner.values()):
            return inner, key
    raise FormatError(f"{path}: no tensors found in the checkpoint")


def _tensor_ref(path: Path, name: str, spec: TensorSpec, order: str) -> TensorRef:
    raw_dtype = RAW_DTYPES[spec.dtype].newbyteorder(order) if RAW_DTYPES[spec.dtype].itemsize > 1 \
        else RAW_DTYPES[spec.dtype]
    item = raw_dtype.itemsize
    storage = spec.storage
    available = storage.nbytes // item                   # elements of this dtype in the storage
    size, stride = spec.size, spec.stride
    numel = prod(size)
    if numel:
        last = spec.offset + sum((d - 1) * s for d, s in zip(size, stride))
        if last >= available:
            raise FormatError(f"{path}: tensor {name!r} reaches element {last} of storage data/{storage.key}, "
                              f"which holds {available}")
    contiguous_stride = tuple(prod(size[i + 1:]) for i in range(len(size)))
    is_contiguous = all(d == 1 or s == c for d, s, c in zip(size, stride, contiguous_stride))
    if is_contiguous or numel == 0:
        reader = contiguous_rows(storage.file, storage.offset + spec.offset * item, spec.dtype, size, raw_dtype)
    else:
        reader = _strided_rows(storage, spec, raw_dtype)
    return TensorRef(name, size, spec.dtype, reader)


def _strided_rows(storage: Storage, spec: TensorSpec, raw_dtype: np.dtype):
    """Rows of a non-contiguous view (e.g. a saved transpose): read the covering span, then gather."""
    size, stride, item = spec.size, spec.stride, raw_dtype.itemsize
    tail_reach = sum((d - 1) * s for d, s in zip(size[1:], stride[1:]))

    def read_rows(start: int, stop: int) -> np.ndarray:
        shape = (stop - start,) + tuple(size[1:]) if size else (1,)
        if not size:
            first, count, strides = spec.offset, 1, (0,)
        elif stop <= start or 0 in size:
            return np.zeros(shape, np.float32)
        else:
            first = spec.offset + start * stride[0]
            count = (stop - start - 1) * stride[0] + tail_reach + 1
            strides = tuple(s * item for s in stride)
        raw = storage.file.read_into(storage.offset + first * item, np.empty(count, raw_dtype))
        view = np.lib.stride_tricks.as_strided(raw, shape=shape, strides=strides, writeable=False)
        return np.ascontiguousarray(decode(view, spec.dtype))
    return read_rows
