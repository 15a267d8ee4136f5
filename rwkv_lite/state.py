"""The recurrent state of a model: a few float32 arrays per layer.

RWKV carries a fixed-size state instead of a KV cache, so a conversation can be paused, copied, saved to disk and
resumed exactly. v5/v6/v7: att_x (L, C), ffn_x (L, C), wkv (L, H, N, N); v4: att_x, aa, bb, pp, ffn_x (L, C).

A state tuner's file (a .pth, or a .safetensors of blocks.N.att.time_state tensors) is read with the converter's
checkpoint readers. The runtime never imports the converter (rwkv_lite.quantize); the package root, which sits
above both, installs that reader here (``install_tuned_state_reader``, called by rwkv_lite/__init__.py).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .errors import FormatError
from .format import ModelWriter, read_model_file, verify_checksums

# config keys that must agree between a saved state and the model it is used with
_IDENTITY_KEYS = ("arch", "n_layer", "n_embd", "n_head", "head_size", "vocab_size")

# (is_tuned_state_file(path) -> bool, read_tuned_state(path, config) -> arrays), or None: only rwkv-lite's own
# state files are read
_tuned_state_reader = None


def install_tuned_state_reader(is_tuned_state_file, read_tuned_state) -> None:
    """Let State.load read state tuners' files: `is_tuned_state_file(path)` recognises one, `read_tuned_state(path,
    config)` returns its arrays for a model with `config` (FormatError naming the file if it does not fit)."""
    global _tuned_state_reader
    _tuned_state_reader = (is_tuned_state_file, read_tuned_state)


class State:
    def __init__(self, config: dict, arrays: dict[str, np.ndarray]):
        self.config = {k: config[k] for k in _IDENTITY_KEYS if k in config}
        self.arrays = arrays

    def __getitem__(self, name: str) -> np.ndarray:
        return self.arrays[name]

    def copy(self) -> "State":
        """An independent copy: continuing from it never changes this state."""
        return State(self.config, {k: v.copy() for k, v in self.arrays.items()})

    def assign(self, other: "State") -> None:
        """Make this state equal to `other` (of the same model), reusing this state's memory: no fresh pages
        to fault in, unlike copy()."""
        if self.arrays.keys() != other.arrays.keys():
            raise ValueError("assign() needs a state of the same model")
        for name, array in self.arrays.items():
            np.copyto(array, other.arrays[name])

    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays.values())

    def save(self, path: str | os.PathLike) -> None:
        """Write the state to `path` (atomically: a temporary file renamed into place)."""
        arrays = [(name, np.float32, a.shape) for name, a in self.arrays.items()]
        with ModelWriter(path, {"kind": "state", "config": self.config, "tensors": {}}, arrays) as w:
            for name, a in self.arrays.items():
                w.append(name, a)
            w.close()

    @classmethod
    def load(cls, path: str | os.PathLike, model=None) -> "State":
        """A state saved by save() (or `rwkv-lite convert-state`), or a state tuner's file (.pth or .safetensors
        of blocks.N.att.time_state tensors; it needs `model`, the model it was tuned for). With `model`, a state
        made for another model shape is refused (FormatError naming the file)."""
        tuned = _tuned_state_reader
        if tuned is not None and tuned[0](Path(path)):
            if model is None:
                raise FormatError(f"{path}: a state-tuned state file; load it with the model it was made for "
                                  f"(State.load(path, model))")
            state = cls(model.config, tuned[1](path, model.config))
        else:
            state = cls._load_own(path)
        if model is not None:
            state.check_compatible(model.config, path)
            state.check_shapes({n: a.shape for n, a in model.new_state().arrays.items()}, path)
        return state

    @classmethod
    def _load_own(cls, path: str | os.PathLike) -> "State":
        f = read_model_file(path)
        try:
            if f.metadata.get("kind") != "state":
                raise FormatError(f"{path}: not a state file (it is a model file)")
            bad = verify_checksums(f)           # a state is small and read whole anyway: always check it
            if bad:
                raise FormatError(f"{path}: checksum mismatch in state array(s) {', '.join(bad[:5])}: file corrupted")
            for name, a in f.arrays.items():
                if a.dtype != np.float32:
                    raise FormatError(f"{path}: state array {name!r} is stored as {a.dtype}, expected float32")
            arrays = {name: np.array(a) for name, a in f.arrays.items()}
        finally:
            f.close()
        for name, a in arrays.items():
            if not np.isfinite(a).all():
                raise FormatError(f"{path}: state array {name!r} contains NaN or Inf")
        return cls(f.metadata["config"], arrays)

    def check_compatible(self, config: dict, source: str | Path = "state") -> None:
        for k in _IDENTITY_KEYS:
            if k in config and self.config.get(k) != config[k]:
                raise FormatError(f"{source}: state is for a model with {k}={self.config.get(k)}, "
                                  f"this model has {k}={config[k]}")

    def check_shapes(self, shapes: dict[str, tuple[int, ...]], source: str | Path = "state") -> None:
        """Refuse a state whose arrays are not exactly `shapes` (name -> shape) in float32: the WKV kernels index
        the state without bounds checks, so a state file with matching config but other arrays must not reach them."""
        if set(self.arrays) != set(shapes):
            raise FormatError(f"{source}: state has arrays {sorted(self.arrays)}, this model needs {sorted(shapes)}")
        for name, shape in shapes.items():
            a = self.arrays[name]
            if a.shape != tuple(shape) or a.dtype != np.float32:
                raise FormatError(f"{source}: state array {name!r} is {a.dtype}{list(a.shape)}, this model needs "
                                  f"float32{list(shape)}")
