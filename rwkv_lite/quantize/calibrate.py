"""Calibration for int4: what each weight matrix's inputs look like on sample text.

    rwkv-lite calibrate MODEL TEXT -o calib.npz            # MODEL: any rwkv-lite file of the checkpoint (fp16, int8)
    rwkv-lite convert SRC DST --quant int4 --calibration calib.npz

Rounding a weight matters in proportion to the activations it meets, and rounding errors of one row can be
compensated by the row's other weights where inputs are correlated. GPTQ (quantize/gptq.py) does exactly that,
given H = X^T X of each matrix's inputs X (T tokens x C columns). This module runs a model over T tokens of text
and records, per matrix, whichever of the two is smaller: H itself (float32, C x C, when C <= T / 2: the tiny
models) or the inputs X (float16, T x C: billion-parameter models, where a 14336 x 14336 H would be 0.8 GB). The
file is a plain .npz of numeric arrays (read without pickle):

    "<tensor name>.h"  float32 (C, C)   sum over tokens of x x^T          or
    "<tensor name>.x"  float16 (T, C)   the inputs themselves
    "__tokens__"       int64 ()         T
    "__source__"       uint8 (n,)       UTF-8 JSON: the model file and the text (name, bytes, sha256) used

The inputs come from the model given (its own rounding included, as llama.cpp's importance matrices come from
whatever model one has); measured on the tiny models, 512 to 32768 tokens of calibration text give the same
quality within 20% (docs/quantization.md), so the default is 2048. The records are held in memory until written:
an Eagle-7B-shaped model's inputs take 2.75 MB per token (use --tokens 512 there on small machines).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from ..errors import FormatError

DEFAULT_TOKENS = 2048


class Calibration:
    """Per-matrix input statistics, keyed by tensor name (e.g. 'blocks.0.att.key.weight')."""

    def __init__(self, arrays: dict[str, np.ndarray], tokens: int, source: dict, path: str | None = None):
        self.arrays = arrays
        self.tokens = int(tokens)
        self.source = source
        self.path = path

    def names(self) -> list[str]:
        return sorted({key.rsplit(".", 1)[0] for key in self.arrays})

    def hessian(self, name: str, cols: int) -> np.ndarray | None:
        """H = X^T X (float32, cols x cols) for tensor `name`, or None when the file has nothing for it."""
        where = self.path or "calibration"
        if name + ".h" in self.arrays:
            h = np.asarray(self.arrays[name + ".h"], np.float32)
            if h.shape != (cols, cols):
                raise FormatError(f"{where}: {name}.h has shape {h.shape}, the matrix has {cols} columns")
            return h
        if name + ".x" in self.arrays:
            x = np.asarray(self.arrays[name + ".x"], np.float32)
            if x.ndim != 2 or x.shape[1] != cols:
                raise FormatError(f"{where}: {name}.x has shape {x.shape}, the matrix has {cols} columns")
            return x.T @ x
        return None

    def save(self, path: str | os.PathLike) -> Path:
        """Write the .npz atomically (temporary name, then rename)."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp.npz")
        try:
            with open(tmp, "wb") as f:
                np.savez(f, __tokens__=np.int64(self.tokens),
                         __source__=np.frombuffer(json.dumps(self.source).encode(), np.uint8),
                         **{key: self.arrays[key] for key in self.arrays})
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()
        return path


def load_calibration(path: str | os.PathLike) -> Calibration:
    """Open a calibration .npz (numeric arrays only; a file needing pickle is refused). Every array is checked
    once here; they are then read again one at a time as the converter needs them, so a multi-GB file never sits
    in memory whole."""
    path = Path(path)
    try:
        npz = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise FormatError(f"{path}: no such calibration file") from None
    except (ValueError, OSError, EOFError) as e:
        raise FormatError(f"{path}: not a calibration file ({e.__class__.__name__}: {e})") from None
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise FormatError(f"{path}: not a calibration file (a single array, not an .npz)")
    try:
        tokens = _member(npz, "__tokens__", path) if "__tokens__" in npz.files else None
        raw_source = _member(npz, "__source__", path) if "__source__" in npz.files else None
        if tokens is None or tokens.shape != () or not np.issubdtype(tokens.dtype, np.integer):
            raise FormatError(f"{path}: not a calibration file (no token count)")
        try:
            source = json.loads(bytes(raw_source).decode()) if raw_source is not None else {}
        except (ValueError, UnicodeDecodeError):
            raise FormatError(f"{path}: its source record is not UTF-8 JSON") from None
        for key in npz.files:
            if key in ("__tokens__", "__source__"):
                continue
            kind = key.rsplit(".", 1)[-1]
            if kind not in ("h", "x") or "." not in key:
                raise FormatError(f"{path}: unexpected array {key!r} (expected '<tensor>.h' or '<tensor>.x')")
            arr = _member(npz, key, path)
            want = np.float32 if kind == "h" else np.float16
            if arr.dtype != want or arr.ndim != 2 or (kind == "h" and arr.shape[0] != arr.shape[1]):
                raise FormatError(f"{path}: array {key!r} is {arr.dtype}{list(arr.shape)}, expected "
                                  f"{np.dtype(want)} {'(C, C)' if kind == 'h' else '(T, C)'}")
            if not np.isfinite(arr).all():
                raise FormatError(f"{path}: array {key!r} holds NaN or Inf")
    except BaseException:
        npz.close()
        raise
    arrays = _LazyArrays(npz, path)
    return Calibration(arrays, int(tokens), source if isinstance(source, dict) else {}, str(path))


def _member(npz, key: str, path: Path) -> np.ndarray:
    try:
        return npz[key]
    except (ValueError, OSError, EOFError, KeyError) as e:
        raise FormatError(f"{path}: array {key!r} cannot be read ({e.__class__.__name__}: {e})") from None


class _LazyArrays(dict):
    """The .npz's tensor arrays by key, each read from the file when asked for (a dict of what exists)."""

    def __init__(self, npz, path: Path):
        super().__init__((key, None) for key in npz.files if key not in ("__tokens__", "__source__"))
        self._npz, self._path = npz, path

    def __getitem__(self, key):
        super().__getitem__(key)                      # KeyError for keys the file does not have
        return _member(self._npz, key, self._path)

    def get(self, key, default=None):
        return self[key] if key in self else default

    def items(self):
        return ((key, self[key]) for key in self)

    def values(self):
        return (self[key] for key in self)


def calibrate(model, text: bytes | str, *, tokens: int = DEFAULT_TOKENS, text_name: str = "text") -> Calibration:
    """Run `model` (a loaded rwkv_lite Model) over the first `tokens` tokens of `text` and record each matrix's
    inputs. The model's tokenizer encodes the text (a model without one reads it as bytes)."""
    from ..kernels import linear
    from .. import model as model_module

    data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
    tokenizer = model.tokenizer
    ids = (tokenizer.encode(data.decode("utf-8", errors="replace")) if tokenizer is not None
           else list(data))
    ids = np.asarray(ids[:tokens], np.int64)
    if ids.size % model_module.CHUNK_TOKENS == 1:      # a 1-token chunk would take the fused decode path
        ids = ids[:-1]
    if ids.size < 2:
        raise FormatError(f"{text_name}: too little text to calibrate on ({ids.size} tokens)")
    T = ids.size
    sums: dict[str, np.ndarray] = {}
    inputs: dict[str, list[np.ndarray]] = {}
    widths: dict[str, int] = {}
    original_call = linear.Matrix.__call__

    def recording_call(self, x):
        name = getattr(self, "name", None)
        if name is not None and name != "emb.weight":
            X = np.asarray(x, np.float32).reshape(-1, self.shape[1])
            C = self.shape[1]
            widths[name] = C
            if 2 * C <= T:                               # H (C*C float32) is the smaller record
                sums[name] = sums.get(name, 0) + X.T.astype(np.float64) @ X
            else:
                inputs.setdefault(name, []).append(X.astype(np.float16))
        return original_call(self, x)

    linear.Matrix.__call__ = recording_call
    try:
        model.forward(ids, all_logits=True)
    finally:
        linear.Matrix.__call__ = original_call
    arrays = {name + ".h": h.astype(np.float32) for name, h in sums.items()}
    arrays.update({name + ".x": np.concatenate(xs) for name, xs in inputs.items()})
    source = {"model": Path(str(model.path)).name, "text": text_name, "text_bytes": len(data),
              "text_sha256": hashlib.sha256(data).hexdigest(), "tokens": T}
    return Calibration(arrays, T, source)
