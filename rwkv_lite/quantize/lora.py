"""LoRA adapters merged into the weights at conversion (`convert SRC DST --lora ADAPTER --lora-alpha A`).

Supported: the adapter files RWKV's own trainers write, RWKV-PEFT (`--peft lora`) and RWKV-LM-LoRA: a .pth (or
.safetensors) in BlinkDL names holding, beside a base weight `X.weight` (out, in),

    X.lora_A  (r, in)   and   X.lora_B  (out, r)       merged as  W + (alpha / r) * B @ A

plus, optionally, full tensors trained alongside (e.g. `blocks.N.att.ln_x.weight`, `time_*`, `emb.weight`),
which replace the base tensor of the same name, as those trainers' merge scripts do. alpha is not stored in these
files (it is a training flag: RWKV-PEFT's `--lora_config`'s lora_alpha, RWKV-LM-LoRA's `--lora_alpha`), so it
must be given. Not supported, and refused naming the tensor: PiSSA (`init_lora_A/B`, which needs its init file),
DiSHA/Bone and other RWKV-PEFT methods, and Hugging Face PEFT adapter folders.

The merge is streamed: each block of base rows is read, B's matching rows times A (r x in, read once) are added in
float32, and the block goes on to quantization; the base checkpoint is never held whole. Every adapter tensor
must be used: one that names no base tensor, a lone lora_A or lora_B, or a shape that does not fit is an error
naming it (a silently ignored adapter key gives a model that is not the one trained).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import FormatError
from .readers.base import TensorRef


def open_adapter(path: str | os.PathLike):
    """The adapter file as a Checkpoint (torch-free readers; nothing but tensors is unpickled)."""
    from .readers import open_weights_file
    path = Path(path)
    if path.is_dir():
        raise FormatError(f"{path}: a folder; give the adapter file (.pth or .safetensors; Hugging Face PEFT "
                          f"adapter folders are not supported)")
    return open_weights_file(path)


def merge_adapter(refs: dict, adapter, alpha: float | None) -> dict:
    """`refs` (BlinkDL name -> TensorRef) with the adapter's LoRA pairs merged and its full tensors replacing
    the base ones. The adapter Checkpoint must stay open while the returned refs are read."""
    where = adapter.path
    tensors = dict(adapter.tensors)
    pairs: dict[str, tuple] = {}
    replacements: dict[str, TensorRef] = {}
    for name, ref in tensors.items():
        if name.endswith(".lora_A") or name.endswith(".lora_B"):
            stem = name[: -len(".lora_A")]
            other = stem + (".lora_B" if name.endswith(".lora_A") else ".lora_A")
            if other not in tensors:
                raise FormatError(f"{where}: adapter tensor {name!r} has no {other.rsplit('.', 1)[1]} partner")
            if name.endswith(".lora_A"):
                pairs[stem] = (ref, tensors[other])
        elif "lora" in name.split(".")[-1] or "pissa" in name.lower() or "bone" in name.split(".")[-1]:
            raise FormatError(f"{where}: adapter tensor {name!r} is not a LoRA pair (lora_A/lora_B) or a full "
                              f"tensor; this kind of adapter (PiSSA, DiSHA/Bone, ...) is not supported")
        else:
            replacements[name] = ref
    if pairs and alpha is None:
        raise FormatError(f"{where}: the LoRA scale is not stored in adapter files: give --lora-alpha (the "
                          f"lora_alpha the adapter was trained with)")
    if not pairs and not replacements:
        raise FormatError(f"{where}: no adapter tensors in this file")

    out = dict(refs)
    for name, ref in replacements.items():
        base = refs.get(name)
        if base is None:
            raise FormatError(f"{where}: adapter tensor {name!r} matches no tensor of the model")
        if int(np.prod(ref.shape)) != int(np.prod(base.shape)):
            raise FormatError(f"{where}: adapter tensor {name!r} has shape {list(ref.shape)}, the model's has "
                              f"{list(base.shape)}")
        if tuple(ref.shape) == tuple(base.shape):
            out[name] = ref                                # streamed like any tensor (a trained emb.weight, ...)
        else:                                              # a vector stored as (C,) vs (1, 1, C)
            out[name] = TensorRef(name, base.shape, ref.dtype, _reshaped_rows(ref, base.shape))
    for stem, (a_ref, b_ref) in pairs.items():
        target = stem + ".weight"
        base = refs.get(target)
        if base is None:
            raise FormatError(f"{where}: adapter tensor {stem + '.lora_A'!r} matches no weight of the model "
                              f"({target} does not exist)")
        if target in replacements:
            raise FormatError(f"{where}: adapter holds both {target!r} and a LoRA pair for it")
        if len(base.shape) != 2 or len(a_ref.shape) != 2 or len(b_ref.shape) != 2:
            raise FormatError(f"{where}: LoRA pair {stem}.lora_A/B must be matrices and {target} a matrix")
        n_out, n_in = base.shape
        r = a_ref.shape[0]
        if a_ref.shape != (r, n_in) or b_ref.shape != (n_out, r):
            raise FormatError(f"{where}: LoRA pair {stem}.lora_A {list(a_ref.shape)} / lora_B "
                              f"{list(b_ref.shape)} does not fit {target} {list(base.shape)} (expected "
                              f"[r, {n_in}] / [{n_out}, r])")
        out[target] = TensorRef(target, base.shape, base.dtype,
                                _merged_rows(base, a_ref, b_ref, np.float32(float(alpha) / r)))
    return out


def _reshaped_rows(ref, shape):
    def read_rows(a, b):
        return np.ascontiguousarray(ref.load().reshape(shape)[a:b], dtype=np.float32)
    return read_rows


def _merged_rows(base, a_ref, b_ref, scale):
    cache = {}

    def read_rows(a, b):
        if "A" not in cache:
            cache["A"] = np.asarray(a_ref.load(), np.float32)          # (r, in): small, read once
        rows = np.asarray(base.load_rows(a, b), np.float32)
        delta = np.asarray(b_ref.load_rows(a, b), np.float32) @ cache["A"]
        return np.ascontiguousarray(rows + scale * delta, dtype=np.float32)
    return read_rows
