"""Torch-free writers of test checkpoints in the formats the converter reads.

    save_pth(state_dict, path, dtype='f32')            torch.save-compatible zip (torch.load reads it back)
    save_safetensors(state_dict, path, dtype='f32')    safetensors, bf16 included, without the safetensors package
    save_hf_dir(state_dict, config, folder, fmt='bin'|'safetensors', shards=1, dtype='f32')
                                                       an HF folder: BlinkDL names renamed to HF names, config.json,
                                                       shards + index json when shards > 1
    bf16_round(arr)                                    float32 values rounded to nearest-even bfloat16
    save_rwkv_cpp(state_dict, path, dtype='f32')       rwkv.cpp .bin (FP32/FP16; RawTensor for quantized blocks)
    write_torch_zip(path, records, archive='archive')  raw records laid out like torch (for hostile-input tests)

`state_dict` maps names to float arrays, or to `LazyArray(shape, make)` whose `make()` is called only when that
tensor is written (so a benchmark can write a 15 GB checkpoint one tensor at a time). `dtype` is 'f32', 'f16' or
'bf16' for every tensor, or a dict name -> dtype (missing names: 'f32'). Values are rounded to the storage dtype
(round-to-nearest-even for bf16, like torch's .to(torch.bfloat16)).
"""
from __future__ import annotations

import json
import struct
import zipfile
from pathlib import Path
from typing import Callable, Mapping

import numpy as np

__all__ = ["LazyArray", "RawTensor", "bf16_round", "bf16_bits", "save_pth", "save_safetensors", "save_hf_dir",
           "save_rwkv_cpp", "blinkdl_to_hf_name", "write_torch_zip", "HF_SHARD_NAMES"]

DTYPES = ("f32", "f16", "bf16")
_CHUNK_ELEMS = 8 << 20                          # elements encoded per write: bounds temporary memory


class LazyArray:
    """A tensor produced on demand: `shape` now, `make()` (-> float array of that shape) when written."""

    def __init__(self, shape, make: Callable[[], np.ndarray]):
        self.shape = tuple(int(d) for d in shape)
        self.make = make


# --- bfloat16 ------------------------------------------------------------------------------------------------

def bf16_bits(arr) -> np.ndarray:
    """uint16 bfloat16 bit patterns of float32 values, rounded to nearest even (NaN stays a quiet NaN)."""
    a = np.asarray(arr, dtype=np.float32, order="C")          # (ascontiguousarray would make 0-d arrays 1-d)
    u = a.view(np.uint32)
    rounded = (u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
    quiet_nan = (u >> np.uint32(16)) | np.uint32(0x0040)
    return np.where(np.isnan(a), quiet_nan, rounded).astype(np.uint16)


def bf16_round(arr) -> np.ndarray:
    """float32 array of the bfloat16 values nearest to `arr` (ties to even)."""
    return (bf16_bits(arr).astype(np.uint32) << np.uint32(16)).view(np.float32)


def _encode(values: np.ndarray, dtype: str) -> np.ndarray:
    """Little-endian raw storage elements of `values` in `dtype`."""
    if dtype == "f32":
        return np.ascontiguousarray(values, dtype="<f4")
    if dtype == "f16":
        return np.ascontiguousarray(np.asarray(values, dtype=np.float32).astype("<f2"))
    if dtype == "bf16":
        return bf16_bits(values).astype("<u2")
    raise ValueError(f"dtype must be one of {DTYPES}, not {dtype!r}")


_ITEMSIZE = {"f32": 4, "f16": 2, "bf16": 2}


def _items(state_dict: Mapping, dtype) -> list[tuple[str, tuple[int, ...], str, object]]:
    out = []
    for name, value in state_dict.items():
        shape = value.shape if isinstance(value, LazyArray) else np.shape(value)
        dt = dtype.get(name, "f32") if isinstance(dtype, Mapping) else dtype
        if dt not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, not {dt!r}")
        out.append((name, tuple(int(d) for d in shape), dt, value))
    return out


def _chunks(value, shape, dtype: str):
    """Raw little-endian chunks of one tensor (made now if lazy)."""
    arr = value.make() if isinstance(value, LazyArray) else value
    arr = np.asarray(arr)
    if arr.shape != shape:
        raise ValueError(f"LazyArray made shape {arr.shape}, promised {shape}")
    flat = arr.reshape(-1)
    for a in range(0, max(flat.size, 1), _CHUNK_ELEMS):
        part = flat[a:a + _CHUNK_ELEMS]
        if part.size:
            yield _encode(part, dtype)


# --- torch zip ---------------------------------------------------------------------------------------------------

def _aligned_member(zf: zipfile.ZipFile, name: str, nbytes: int, alignment: int = 64):
    """Open a STORED member whose data starts at a multiple of `alignment`, padding the local header's extra
    field like torch's writer does (an 'FB' record of 'Z' bytes)."""
    zinfo = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    zinfo.compress_type = zipfile.ZIP_STORED
    zinfo.file_size = nbytes
    zip64 = nbytes > (1 << 30)
    start = zf.fp.tell()
    data_at = start + 30 + len(name.encode("utf-8")) + 4 + (20 if zip64 else 0)
    pad = (-data_at) % alignment
    zinfo.extra = struct.pack("<HH", 0x4246, pad) + b"Z" * pad
    return zf.open(zinfo, "w", force_zip64=zip64)


def write_torch_zip(path, records: Mapping[str, object], archive: str = "archive") -> Path:
    """Write a zip whose members are `archive/<name>` with the given bytes (or raw-chunk iterables), stored and
    64-byte aligned. No checks: this is for building hostile or unusual files in tests."""
    path = Path(path)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, content in records.items():
            chunks = [content] if isinstance(content, (bytes, bytearray, memoryview)) else list(content)
            nbytes = sum(memoryview(c).nbytes for c in chunks)
            with _aligned_member(zf, f"{archive}/{name}" if archive else name, nbytes) as out:
                for c in chunks:
                    out.write(memoryview(c).cast("B"))
    return path


_STORAGE_CLASS = {"f32": "FloatStorage", "f16": "HalfStorage", "bf16": "BFloat16Storage"}


def _p_int(n: int) -> bytes:
    if 0 <= n < 256:
        return b"K" + bytes([n])
    if 0 <= n < 65536:
        return b"M" + struct.pack("<H", n)
    if -(1 << 31) <= n < (1 << 31):
        return b"J" + struct.pack("<i", n)
    raw = n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(raw)]) + raw


def _p_str(s: str) -> bytes:
    raw = s.encode("utf-8")
    return b"X" + struct.pack("<I", len(raw)) + raw


def _p_tuple(parts: list[bytes]) -> bytes:
    if not parts:
        return b")"
    if len(parts) <= 3:
        return b"".join(parts) + bytes([0x84 + len(parts)])
    return b"(" + b"".join(parts) + b"t"


def _p_global(module: str, name: str) -> bytes:
    return b"c" + f"{module}\n{name}\n".encode()


def _state_dict_pickle(items: list[tuple[str, str, str, tuple[int, ...]]]) -> bytes:
    """data.pkl as torch.save writes it for an OrderedDict of contiguous tensors (protocol 2, persistent ids)."""
    out = bytearray(b"\x80\x02")
    out += _p_global("collections", "OrderedDict") + b")R"
    for start in range(0, len(items), 1000):                  # pickle batches SETITEMS by 1000
        out += b"("
        for name, key, dtype, shape in items[start:start + 1000]:
            numel = int(np.prod(shape, dtype=np.int64)) if shape else 1
            stride = [int(np.prod(shape[i + 1:], dtype=np.int64)) for i in range(len(shape))]
            out += _p_str(name) + _p_global("torch._utils", "_rebuild_tensor_v2") + b"("
            out += b"(" + _p_str("storage") + _p_global("torch", _STORAGE_CLASS[dtype]) + _p_str(key) \
                + _p_str("cpu") + _p_int(numel) + b"t" + b"Q"      # BINPERSID
            out += _p_int(0) + _p_tuple([_p_int(d) for d in shape]) + _p_tuple([_p_int(s) for s in stride])
            out += b"\x89" + _p_global("collections", "OrderedDict") + b")R"   # requires_grad, backward_hooks
            out += b"tR"
        out += b"u"
    out += b"."
    return bytes(out)


def save_pth(state_dict: Mapping, path, dtype="f32") -> Path:
    """Write `state_dict` as torch.save(OrderedDict of tensors) would, without torch. Returns the path."""
    path = Path(path)
    items = _items(state_dict, dtype)
    keys = [(name, str(i), dt, shape) for i, (name, shape, dt, _) in enumerate(items)]
    archive = path.stem                                        # torch names the record folder after the file
    records: dict[str, object] = {
        "data.pkl": _state_dict_pickle(keys),
        ".format_version": b"1",
        ".storage_alignment": b"64",
        "byteorder": b"little",
    }
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, content in records.items():
            with _aligned_member(zf, f"{archive}/{name}", len(content)) as out:
                out.write(content)
        for i, (name, shape, dt, value) in enumerate(items):
            numel = int(np.prod(shape, dtype=np.int64)) if shape else 1
            with _aligned_member(zf, f"{archive}/data/{i}", numel * _ITEMSIZE[dt]) as out:
                for chunk in _chunks(value, shape, dt):
                    out.write(memoryview(chunk).cast("B"))
        with _aligned_member(zf, f"{archive}/version", 2) as out:
            out.write(b"3\n")
    return path


# --- safetensors ---------------------------------------------------------------------------------------------

_ST_DTYPE = {"f32": "F32", "f16": "F16", "bf16": "BF16"}


def save_safetensors(state_dict: Mapping, path, dtype="f32", metadata: Mapping[str, str] | None = None) -> Path:
    """Write a safetensors file (tensors in the given order, header padded to 8 bytes). Returns the path."""
    path = Path(path)
    items = _items(state_dict, dtype)
    header: dict = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    for name, shape, dt, _ in items:
        nbytes = (int(np.prod(shape, dtype=np.int64)) if shape else 1) * _ITEMSIZE[dt]
        header[name] = {"dtype": _ST_DTYPE[dt], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * ((-len(raw)) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, shape, dt, value in items:
            for chunk in _chunks(value, shape, dt):
                f.write(memoryview(chunk).cast("B"))
    return path


# --- Hugging Face folders ------------------------------------------------------------------------------------

_HF_COMPONENTS = {"emb": "embeddings", "ln0": "pre_ln", "att": "attention", "ffn": "feed_forward",
                  "time_mix_k": "time_mix_key", "time_mix_v": "time_mix_value",
                  "time_mix_r": "time_mix_receptance", "time_mix_g": "time_mix_gate"}
HF_SHARD_NAMES = {"bin": ("pytorch_model.bin", "pytorch_model-{i:05d}-of-{n:05d}.bin", "pytorch_model.bin.index.json"),
                  "safetensors": ("model.safetensors", "model-{i:05d}-of-{n:05d}.safetensors",
                                  "model.safetensors.index.json")}


def blinkdl_to_hf_name(name: str) -> str:
    """The name HF's RWKV conversion gives a BlinkDL tensor ('head.weight' stays; others get 'rwkv.')."""
    if name.startswith("head."):
        return name
    return "rwkv." + ".".join(_HF_COMPONENTS.get(p, p) for p in name.split("."))


def save_hf_dir(state_dict_blinkdl: Mapping, config: Mapping, path, fmt: str = "bin", shards: int = 1,
                dtype="f32") -> Path:
    """Write an HF model folder: config.json and weights under HF names (sharded with an index if shards > 1)."""
    if fmt not in HF_SHARD_NAMES:
        raise ValueError("fmt must be 'bin' or 'safetensors'")
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(dict(config), indent=2))
    if isinstance(dtype, Mapping):
        dtype = {blinkdl_to_hf_name(k): v for k, v in dtype.items()}
    renamed = {blinkdl_to_hf_name(k): v for k, v in state_dict_blinkdl.items()}
    writer = save_pth if fmt == "bin" else save_safetensors
    single, pattern, index_name = HF_SHARD_NAMES[fmt]
    names = list(renamed)
    if shards <= 1:
        writer(renamed, folder / single, dtype=dtype)
        return folder
    if shards > len(names):
        raise ValueError(f"{shards} shards for {len(names)} tensors")
    weight_map, total = {}, 0
    for i, group in enumerate(np.array_split(np.arange(len(names)), shards), 1):
        part = {names[j]: renamed[names[j]] for j in group}
        shard = pattern.format(i=i, n=shards)
        writer(part, folder / shard, dtype=dtype)
        for name, shape, dt, _ in _items(part, dtype):
            weight_map[name] = shard
            total += (int(np.prod(shape, dtype=np.int64)) if shape else 1) * _ITEMSIZE[dt]
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / index_name).write_text(json.dumps(index, indent=2))
    return folder


# --- rwkv.cpp --------------------------------------------------------------------------------------------------

RWKV_CPP_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q5_0": 7, "q5_1": 8, "q8_0": 9}
_RWKV_CPP_KEEP_F32 = (".time_", ".k_k", ".k_a", ".r_k", ".x_rwkvag", ".x_k", ".w0", ".a0", ".v0")


class RawTensor:
    """Pre-encoded tensor data for save_rwkv_cpp (e.g. ggml quantized blocks): dtype name, PyTorch shape, bytes."""

    def __init__(self, dtype: str, shape, data: bytes):
        self.dtype, self.shape, self.data = dtype, tuple(int(d) for d in shape), bytes(data)


def save_rwkv_cpp(state_dict: Mapping, path, dtype: str = "f32", *, version: int = 101,
                  header: Mapping[str, int] | None = None) -> Path:
    """Write an rwkv.cpp model file. With dtype 'f16', 1-D tensors and the names rwkv.cpp keeps in FP32
    (`.time_`, `.k_k`, ... ) stay FP32, as rwkv.cpp's converter does. RawTensor values are written as given.
    header: overrides for n_vocab, n_embed, n_layer, data_type (code), magic (defaults from emb.weight)."""
    path = Path(path)
    emb = state_dict.get("emb.weight")
    n_vocab, n_embed = (emb.shape if emb is not None else (0, 0))
    n_layer = len({k.split(".")[1] for k in state_dict if k.startswith("blocks.")})
    h = {"magic": 0x67676D66, "version": version, "n_vocab": n_vocab, "n_embed": n_embed, "n_layer": n_layer,
         "data_type": RWKV_CPP_TYPES[dtype]}
    h.update(header or {})
    with open(path, "wb") as f:
        f.write(struct.pack("<6I", h["magic"], h["version"], h["n_vocab"], h["n_embed"], h["n_layer"],
                            h["data_type"]))
        for name, value in state_dict.items():
            if isinstance(value, RawTensor):
                dt, shape, data = value.dtype, value.shape, value.data
            else:
                arr = np.asarray(value, dtype=np.float32)
                shape = arr.shape
                keep = arr.ndim == 1 or any(s in name for s in _RWKV_CPP_KEEP_F32)
                dt = "f32" if dtype == "f32" or keep else "f16"
                data = arr.astype("<f4" if dt == "f32" else "<f2").tobytes()
            key = name.encode("utf-8")
            f.write(struct.pack(f"<3I{len(shape)}I", len(shape), len(key), RWKV_CPP_TYPES[dt], *reversed(shape)))
            f.write(key)
            f.write(data)
    return path
