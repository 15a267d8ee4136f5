"""Checkpoint readers: one uniform, streaming, torch-free view of every source the converter accepts.

    with open_checkpoint(path) as ckpt:          # HF folder, .pth / pytorch_model.bin, .safetensors, rwkv.cpp .bin
        for name, ref in ckpt.tensors.items():   # names as stored, in file order
            ref.shape, ref.dtype                 # PyTorch order; 'f32' | 'f16' | 'bf16' | 'q5_0' ...
            block = ref.load_rows(0, 1024)       # float32, reads only those rows

`open_checkpoint` decides by what the path is, not by its extension: a folder is an HF folder, a file starting
with a zip header is a torch zip, the rwkv.cpp magic an rwkv.cpp file, a safetensors header a safetensors file.
Every malformed input is a FormatError naming the file; pickle records asking for anything but tensors are an
UnsafeCheckpointError (nothing from the file is executed). See base.py for why reads are positional, not mmap.
"""
from __future__ import annotations

import os
import struct
from pathlib import Path

from ...errors import FormatError
from .base import Checkpoint, TensorRef, find_tokenizer_file, read_json_file

__all__ = ["Checkpoint", "TensorRef", "open_checkpoint", "open_weights_file"]

_ZIP_MAGIC = b"PK\x03\x04"
_RWKV_CPP_MAGIC = b"fmgg"                        # 0x67676d66 little-endian
# torch.save before 1.6 (and with _use_new_zipfile_serialization=False): a bare pickle stream that starts with
# the pickled magic number 0x1950a86a20f9469cfc6c
_LEGACY_TORCH = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"


def open_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Open any supported checkpoint (see the module docstring). Use as a context manager or call close()."""
    path = Path(path)
    if path.is_dir():
        from .hf_dir import open_hf_dir
        return open_hf_dir(path)
    if path.name.endswith(".index.json") and path.is_file():
        from .hf_dir import open_hf_dir
        return open_hf_dir(path.parent, index=path)
    ckpt = open_weights_file(path)
    try:
        if ckpt.tokenizer_file is None:
            ckpt.tokenizer_file = find_tokenizer_file(path.parent)
        if ckpt.config is None:
            ckpt.config = _rwkv_config_beside(path)
            if ckpt.config is not None:
                ckpt.source_files.append("config.json")
    except BaseException:
        ckpt.close()
        raise
    return ckpt


def open_weights_file(path: str | os.PathLike) -> Checkpoint:
    """Open one weights file (no looking around it for config or tokenizer)."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            head = fh.read(16)
    except FileNotFoundError:
        raise FormatError(f"{path}: no such file or folder") from None
    except OSError as e:
        raise FormatError(f"{path}: cannot read ({e.strerror})") from None
    if head.startswith(_ZIP_MAGIC) or head.startswith(b"PK\x05\x06"):
        from .torch_zip import open_torch_zip
        return open_torch_zip(path)
    if head.startswith(_RWKV_CPP_MAGIC):
        from .rwkv_cpp import open_rwkv_cpp
        return open_rwkv_cpp(path)
    if head.startswith(_LEGACY_TORCH):
        raise FormatError(f"{path}: legacy (non-zip) torch format is not supported; re-save it with torch >= 1.6 "
                          f"(torch.save(torch.load(f, weights_only=True), new_file))")
    if head.startswith(b"\x80") or head[:1] in (b"(", b"}", b"]"):
        raise FormatError(f"{path}: a bare pickle file, not a torch zip checkpoint; not supported")
    if _looks_like_safetensors(head) or path.suffix == ".safetensors":
        from .safetensors_reader import open_safetensors
        return open_safetensors(path)
    if path.suffix in (".pth", ".pt", ".bin", ".ckpt"):
        raise FormatError(f"{path}: neither a torch zip checkpoint nor an rwkv.cpp file (truncated or damaged?)")
    raise FormatError(f"{path}: unrecognised checkpoint format")


def _looks_like_safetensors(head: bytes) -> bool:
    if len(head) < 9:
        return False
    (n,) = struct.unpack("<Q", head[:8])
    return 2 <= n < (1 << 32) and head[8:9] == b"{"


def _rwkv_config_beside(path: Path) -> dict | None:
    """config.json next to a single weights file, used only if it describes an RWKV model (a stray config of
    another model in a downloads folder must not veto the conversion)."""
    cfg_path = path.parent / "config.json"
    if not cfg_path.is_file():
        return None
    try:
        cfg = read_json_file(cfg_path, "config.json")
    except FormatError:
        return None
    if isinstance(cfg, dict) and "rwkv" in str(cfg.get("model_type", "")).lower():
        return cfg
    return None
