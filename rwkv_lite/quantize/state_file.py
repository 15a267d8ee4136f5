"""State-tuned initial states: the `.pth` files RWKV state tuners write (RWKV-PEFT, RWKV-LM state tuning).

Such a file holds one `blocks.N.att.time_state` tensor (H, N, N) per layer and nothing else: the tuned WKV
matrix a conversation starts from (the token-shift states start at zero). Every reference loader installs it as
`time_state.transpose(1, 2)`; our state is the reference's in every version (v5/v6 S[h, key, value], v7
S[h, value, key]), so the same transpose makes ours. A loader that skips it runs without error and writes wrong
text, which is why the orientation is tested against the reference for v6 and v7.

The file is read with the converter's torch-free readers: nothing in it is unpickled but tensors.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from ..errors import FormatError

_KEY = re.compile(r"^blocks\.(\d+)\.att\.time_state$")


def read_time_state(path: str | os.PathLike, config: dict) -> dict[str, np.ndarray]:
    """The initial state (att_x, ffn_x zeros; wkv from the file) for a model with `config`, as float32 arrays.

    FormatError naming the file for anything that does not fit: another model's shape or layer count, a
    version without a WKV matrix state, tensors that are not time_state."""
    from .readers import open_weights_file

    path = Path(path)
    L, C = config["n_layer"], config["n_embd"]
    H, N = config.get("n_head"), config.get("head_size")
    if str(config.get("version")) == "4" or not H or not N:
        raise FormatError(f"{path}: RWKV-{config.get('version')} has no WKV matrix state to tune")
    with open_weights_file(path) as ckpt:
        found: dict[int, object] = {}
        for name, ref in ckpt.tensors.items():
            m = _KEY.match(name)
            if m is None:
                raise FormatError(f"{path}: tensor {name!r} is not a state-tuned time_state (is this a model or "
                                  f"an adapter rather than a state file?)")
            found[int(m.group(1))] = ref
        if not found:
            raise FormatError(f"{path}: no blocks.N.att.time_state tensors: not a state-tuned state file")
        if sorted(found) != list(range(len(found))) or len(found) != L:
            raise FormatError(f"{path}: state is for a model with {max(found) + 1} layers, this model has {L}")
        wkv = np.empty((L, H, N, N), np.float32)
        for l in range(L):
            ref = found[l]
            shape = tuple(d for d in ref.shape if d != 1) or (1,)
            if shape != (H, N, N) and not (H == 1 and shape == (N, N)):
                raise FormatError(f"{path}: state is for a model with {_heads(ref.shape)}, this model has "
                                  f"{H} heads of size {N} (blocks.{l}.att.time_state has shape {list(ref.shape)})")
            a = ref.load().reshape(H, N, N)
            if not np.isfinite(a).all():
                raise FormatError(f"{path}: blocks.{l}.att.time_state contains NaN or Inf")
            wkv[l] = np.swapaxes(a, -1, -2)
    return {"att_x": np.zeros((L, C), np.float32), "ffn_x": np.zeros((L, C), np.float32), "wkv": wkv}


def _heads(shape) -> str:
    shape = [int(d) for d in shape]
    if len(shape) == 3 and shape[1] == shape[2]:
        return f"{shape[0]} heads of size {shape[1]}"
    return f"a time_state of shape {shape}"


def is_torch_file(path: Path) -> bool:
    """A torch zip (.pth) rather than an rwkv-lite file (which is a safetensors file)."""
    try:
        with open(path, "rb") as f:
            return f.read(4) in (b"PK\x03\x04", b"PK\x05\x06")
    except OSError:
        return False


def is_state_tuning_file(path: Path) -> bool:
    """A state tuner's file: a .pth, or a safetensors file of blocks.N.att.time_state tensors (rwkv-lite's own
    state files are safetensors too, but hold att_x / ffn_x / wkv)."""
    if is_torch_file(path):
        return True
    from .readers import open_weights_file
    try:
        with open_weights_file(path) as ckpt:
            return any(_KEY.match(name) for name in ckpt.tensors)
    except (FormatError, OSError):
        return False
