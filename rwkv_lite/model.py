"""Model: a mapped rwkv-lite file plus the forward pass of its RWKV version.

    model = rwkv_lite.load("eagle-7b-int8.safetensors")
    logits, state = model.forward(model.tokenizer.encode("Hello"))      # sequence mode over the prompt
    logits, state = model.forward([token], state)                       # one token at a time after that

Weights stay in the mapped file: every array used by the forward pass is a view of the map, and quantized
matrices are dequantised inside the kernels, so loading costs no copy of the weights.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from . import arch as arch_registry
from .errors import FormatError, NumericalError, ResourceError
from .format import ModelFile, read_model_file, verify_checksums
from .state import State

CHUNK_TOKENS = 512      # sequence mode runs the prompt in chunks of this many tokens (bounds activation memory)


class WeightStore:
    """Named access to a model file's tensors: float32 vectors as views, matrices as kernel-backed objects."""

    def __init__(self, model_file: ModelFile):
        self.file = model_file
        self.tensors = model_file.tensors

    def has(self, name: str) -> bool:
        return name in self.tensors

    def _info(self, name: str) -> dict:
        info = self.tensors.get(name)
        if info is None:
            raise FormatError(f"{self.file.path}: tensor {name!r} is missing")
        return info

    def vector(self, name: str) -> np.ndarray:
        info = self._info(name)
        arr = self.file.arrays.get(name)
        if info.get("scheme") != "fp32" or arr is None or arr.dtype != np.float32:
            raise FormatError(f"{self.file.path}: tensor {name!r} should be stored as fp32")
        if list(arr.shape) != list(info["shape"]):
            raise FormatError(f"{self.file.path}: tensor {name!r} has shape {list(arr.shape)}, "
                              f"metadata says {info['shape']}")
        return arr

    def matrix(self, name: str):
        from .kernels.linear import make_matrix
        from .quantize.schemes import get_scheme
        info = self._info(name)
        try:
            scheme = get_scheme(info["scheme"], **info.get("params", {}))
        except (ValueError, TypeError, KeyError) as e:
            raise FormatError(f"{self.file.path}: tensor {name!r}: {e}") from None
        shape = tuple(info["shape"])
        parts = {}
        for suffix, (dtype, part_shape) in scheme.parts(shape).items():
            arr = self.file.arrays.get(name + suffix)
            if arr is None:
                raise FormatError(f"{self.file.path}: array {name + suffix!r} of {info['scheme']} tensor "
                                  f"{name!r} is missing")
            if arr.dtype != np.dtype(dtype) or tuple(arr.shape) != tuple(part_shape):
                raise FormatError(f"{self.file.path}: array {name + suffix!r} is {arr.dtype}{list(arr.shape)}, "
                                  f"expected {np.dtype(dtype)}{list(part_shape)}")
            parts[suffix] = arr
        return make_matrix(info["scheme"], info.get("params", {}), parts, shape)


class Model:
    """An RWKV model ready to run. Attributes: config (dict), tokenizer (or None), metadata, path."""

    def __init__(self, model_file: ModelFile):
        self.file = model_file
        self.path = model_file.path
        self.metadata = model_file.metadata
        if model_file.metadata.get("kind", "model") != "model":
            raise FormatError(f"{self.path}: not a model file (kind {model_file.metadata.get('kind')!r})")
        self.config = model_file.config
        version = str(self.config.get("version"))
        self.arch = arch_registry.module_for(version)
        store = WeightStore(model_file)
        self.weights = self.arch.Weights(store, self.config)
        self._store = store
        self._tokenizer = None

    @property
    def tokenizer(self):
        """The embedded tokenizer (None if the file has none), built on first use: the model itself runs on ids."""
        if self._tokenizer is None:
            self._tokenizer = _embedded_tokenizer(self.file) or False
        return self._tokenizer or None

    # -- state ---------------------------------------------------------------------------------------------------
    def new_state(self) -> State:
        return State(self.config, self.arch.init_state(self.config, self._store))

    # -- forward -------------------------------------------------------------------------------------------------
    def forward(self, tokens, state: State | None = None, all_logits: bool = False):
        """Feed `tokens` (ids) starting from `state` (None: the initial state).

        Returns (logits, state): logits of the last token (vocab,), or of every token (T, vocab) with
        all_logits=True. Many tokens run in sequence mode (matrix-matrix products per chunk); the given state is
        not modified: the returned state is a new object."""
        ids = np.asarray(tokens, dtype=np.int64).reshape(-1)
        if ids.size == 0:
            raise ValueError("forward() needs at least one token")
        V = self.config["vocab_size"]
        if ids.min() < 0 or ids.max() >= V:
            bad = int(ids[(ids < 0) | (ids >= V)][0])
            raise ValueError(f"token id {bad} is outside the vocabulary (0..{V - 1})")
        if state is None:
            state = self.new_state()
        else:
            state.check_compatible(self.config)
            state = state.copy()
        outputs = []
        for start in range(0, ids.size, CHUNK_TOKENS):
            chunk = ids[start:start + CHUNK_TOKENS]
            last = start + CHUNK_TOKENS >= ids.size
            if all_logits or last:
                outputs.append(self.arch.forward(self.weights, chunk, state.arrays, all_logits, _check_finite))
            else:
                self.arch.forward(self.weights, chunk, state.arrays, False, _check_finite)
        logits = np.concatenate(outputs) if all_logits else outputs[-1][0]
        if not np.isfinite(logits).all():
            raise NumericalError("NaN or Inf in the output logits (head / ln_out)")
        return logits, state

    def verify(self, progress=None) -> list[str]:
        """Recompute the file's checksums; returns the names of corrupted arrays (empty: intact)."""
        return verify_checksums(self.file, progress)

    def close(self) -> None:
        self.weights = None
        self.file.close()


def _check_finite(x: np.ndarray, layer: int) -> None:
    if not np.isfinite(x).all():
        raise NumericalError(f"NaN or Inf in the residual stream after layer {layer}")


def _embedded_tokenizer(model_file: ModelFile):
    info = model_file.metadata.get("tokenizer") or {}
    kind = info.get("kind")
    if not kind or kind == "none":
        return None
    from .tokenizer import tokenizer_from_embedded
    data = model_file.arrays.get("tokenizer.data")
    return tokenizer_from_embedded(kind, bytes(data) if data is not None else b"")


def memory_bytes() -> tuple[int, int]:
    """(total, available) physical memory in bytes, from /proc/meminfo (0, 0 where unknown)."""
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
        return info.get("MemTotal", 0), info.get("MemAvailable", 0)
    except (OSError, ValueError, IndexError):
        return 0, 0


def check_fits_memory(path: Path, file_bytes: int) -> None:
    """Refuse a model whose weights cannot stay in RAM: every token reads all of them, so a model larger than the
    machine's memory would re-read the disk for every token (minutes per token) or be killed."""
    total, available = memory_bytes()
    if total and file_bytes > total:
        raise ResourceError(f"{path}: the model needs {file_bytes / 2**30:.1f} GiB but this machine has "
                            f"{total / 2**30:.1f} GiB of memory; convert it with a smaller --quant (int8, int4)")
    if available and file_bytes > available:
        import warnings
        warnings.warn(f"{path}: the model ({file_bytes / 2**30:.1f} GiB) is larger than the memory available now "
                      f"({available / 2**30:.1f} GiB): expect it to run slowly", stacklevel=3)


def load(path: str | os.PathLike, verify: bool = False) -> Model:
    """Map a model file and return a Model. `verify=True` also checks every array's checksum (reads the file).

    Refuses (ResourceError) a model larger than the machine's memory, before mapping it."""
    path = Path(path)
    if path.is_file():
        check_fits_memory(path, path.stat().st_size)
    model_file = read_model_file(path)
    if verify:
        bad = verify_checksums(model_file)
        if bad:
            model_file.close()
            raise FormatError(f"{path}: checksum mismatch in {len(bad)} array(s), e.g. {bad[0]!r}: file corrupted")
    return Model(model_file)
