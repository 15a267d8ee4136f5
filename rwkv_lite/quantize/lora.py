"""LoRA adapters merged into the weights at conversion (`convert SRC DST --lora ADAPTER --lora-alpha A`).

Supported: the adapter files RWKV's own trainers write, RWKV-PEFT (`--peft lora`) and RWKV-LM-LoRA: a .pth (or
.safetensors) in BlinkDL names holding, beside a base weight `X.weight` (out, in),

    X.lora_A  (r, in)   and   X.lora_B  (out, r)       merged as  W + (alpha / r) * B @ A

plus, optionally, full tensors trained alongside (e.g. `blocks.N.att.ln_x.weight`, `time_*`, `emb.weight`),
which replace the base tensor of the same name, as those trainers' merge scripts do. alpha is not stored in these
files (it is a training flag: RWKV-PEFT's `--lora_config`'s lora_alpha, RWKV-LM-LoRA's `--lora_alpha`), so it
must be given.

Also supported: Hugging Face PEFT LoRA folders (`adapter_config.json` + `adapter_model.safetensors` or `.bin`) made
on the Hugging Face ports (transformers' RWKV-4/5/6 names, fla's RWKV-7 names): `base_model.model.<module>.lora_A
.weight` / `lora_B.weight`, mapped to BlinkDL names like the checkpoints themselves; alpha and r come from the
config (alpha / sqrt(r) with use_rslora). LoRA on fla's own low-rank `*_lora.lora.N` layers, DoRA and LoRA biases
are refused. Not supported, and refused naming the tensor: PiSSA (`init_lora_A/B`, which needs its init file),
DiSHA/Bone and other RWKV-PEFT methods.

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


class Adapter:
    """An open adapter: tensors under BlinkDL names (`X.lora_A`, `X.lora_B`, full tensors), and the scale the
    file records (HF PEFT: alpha, rslora), if any. Close it (or use `with`) when done."""

    def __init__(self, path: Path, tensors: dict, close, alpha: float | None = None, rslora: bool = False):
        self.path, self.tensors, self._close = path, tensors, close
        self.alpha, self.rslora = alpha, rslora

    def close(self) -> None:
        self._close()

    def __enter__(self) -> "Adapter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_adapter(path: str | os.PathLike) -> Adapter:
    """The adapter file (or HF PEFT folder), read with the torch-free readers: nothing but tensors is unpickled."""
    from .readers import open_weights_file
    path = Path(path)
    if path.is_dir():
        return _open_peft_folder(path)
    ckpt = open_weights_file(path)
    return Adapter(path, dict(ckpt.tensors), ckpt.close)


_PEFT_PREFIX = "base_model.model."


def _open_peft_folder(folder: Path) -> Adapter:
    from .names import fla_to_blinkdl, hf_to_blinkdl, is_fla_naming
    from .readers import open_weights_file
    from .readers.base import read_json_file
    config_path = folder / "adapter_config.json"
    weights = [folder / n for n in ("adapter_model.safetensors", "adapter_model.bin") if (folder / n).is_file()]
    if not config_path.is_file() or not weights:
        raise FormatError(f"{folder}: a folder, but not a Hugging Face PEFT adapter (adapter_config.json and "
                          f"adapter_model.safetensors); give the adapter file")
    config = read_json_file(config_path, "adapter_config.json")
    if not isinstance(config, dict) or str(config.get("peft_type", "LORA")).upper() != "LORA":
        raise FormatError(f"{config_path}: peft_type {config.get('peft_type')!r} is not LORA")
    if config.get("use_dora"):
        raise FormatError(f"{config_path}: DoRA adapters are not supported")
    alpha, r = config.get("lora_alpha"), config.get("r")
    if not isinstance(alpha, (int, float)) or not isinstance(r, int) or r <= 0:
        raise FormatError(f"{config_path}: lora_alpha / r missing or not numbers")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise FormatError(f"{config_path}: per-module rank_pattern / alpha_pattern are not supported")
    ckpt = open_weights_file(weights[0])
    try:
        fla = is_fla_naming([n[len(_PEFT_PREFIX):] for n in ckpt.tensors if n.startswith(_PEFT_PREFIX)])
        tensors = {}
        for name, ref in ckpt.tensors.items():
            if not name.startswith(_PEFT_PREFIX):
                raise FormatError(f"{weights[0]}: adapter tensor {name!r} is not under {_PEFT_PREFIX!r}")
            module = name[len(_PEFT_PREFIX):]
            suffix = ""
            for part in (".lora_A.weight", ".lora_B.weight"):
                if module.endswith(part):
                    module, suffix = module[: -len(part)] + ".weight", part[: -len(".weight")]
            if fla:
                mapped = fla_to_blinkdl(module)
                if mapped is None or mapped[1]:
                    raise FormatError(f"{weights[0]}: adapter tensor {name!r} targets {module}, which this "
                                      f"converter cannot merge into (not a plain weight of the RWKV-7 fla layout)")
                blink = mapped[0]
            else:
                blink = hf_to_blinkdl(module)
            if suffix:
                blink = blink[: -len(".weight")] + suffix
            if blink in tensors:
                raise FormatError(f"{weights[0]}: two adapter tensors map to {blink!r}")
            tensors[blink] = ref
    except BaseException:
        ckpt.close()
        raise
    return Adapter(weights[0], tensors, ckpt.close, alpha=float(alpha), rslora=bool(config.get("use_rslora")))


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
    if adapter.alpha is not None:
        if alpha is not None and float(alpha) != adapter.alpha:
            raise FormatError(f"{where}: the adapter's config says lora_alpha={adapter.alpha:g}, not {alpha:g}")
        alpha = adapter.alpha
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
        scale = float(alpha) / (np.sqrt(r) if adapter.rslora else r)
        out[target] = TensorRef(target, base.shape, base.dtype, _merged_rows(base, a_ref, b_ref, np.float32(scale)))
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
