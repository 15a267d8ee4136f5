"""Calibration for int4: what each weight matrix's inputs look like on sample text.

    rwkv-lite calibrate MODEL TEXT -o calib.npz            # MODEL: any rwkv-lite file of the checkpoint (fp16, int8)
    rwkv-lite convert SRC DST --quant int4 --calibration calib.npz

Rounding a weight matters in proportion to the activations it meets, and rounding errors of one row can be
compensated by the row's other weights where inputs are correlated. GPTQ (quantize/gptq.py) does exactly that,
given H = X^T X of each matrix's inputs X (T tokens x C columns). This module runs a model over T tokens of text
in sequence mode and records, per matrix, whichever of the two is smaller: H itself (float32, C x C, when
C <= T / 2: the tiny models) or the inputs X (T x C: billion-parameter models, where a 14336 x 14336 H would be
0.8 GB). The file is a plain .npz of numeric arrays (read without pickle):

    "<tensor name>.h"  float32 (C, C)   sum over tokens of x x^T          or
    "<tensor name>.x"  float16 (T, C)   the inputs themselves (float32 for a matrix whose inputs exceed float16)
    "__tokens__"       int64 ()         T
    "__source__"       uint8 (n,)       UTF-8 JSON: the model file and the text (name, bytes, sha256) used

Memory stays bounded whatever the model: inputs are appended to temporary files (beside the output, or in
`workdir`) as each 512-token chunk runs, the H sums held in memory are capped at H_MEMORY_BYTES (further
matrices record X), and the .npz is written one array at a time. Disk: an Eagle-7B-shaped model's inputs take
2.75 MB per token (32 layers x 43,008 input values x 2 bytes), 5.6 GB at the default 2048 tokens, twice that
while the file is written.

The inputs come from the model given (its own rounding included, as llama.cpp's importance matrices come from
whatever model one has); measured on the tiny models, 512 to 32768 tokens of calibration text give the same
quality within 20% (docs/quantization.md), so the default is 2048.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from ..errors import FormatError, RwkvLiteError

DEFAULT_TOKENS = 2048
H_MEMORY_BYTES = 1 << 30        # float64 H sums held while recording; beyond this, matrices record their inputs
FLOAT16_MAX = 65504.0


class Calibration:
    """Per-matrix input statistics, keyed by tensor name (e.g. 'blocks.0.att.key.weight').

    arrays: '<name>.h' / '<name>.x' -> array (in memory, memory-mapped from a temporary file, or read from the
    .npz when first asked for); tokens: T; source: what was run on what text (recorded in converted files)."""

    def __init__(self, arrays: dict[str, np.ndarray], tokens: int, source: dict, path: str | None = None,
                 *, workdir: tempfile.TemporaryDirectory | None = None):
        self.arrays = arrays
        self.tokens = int(tokens)
        self.source = source
        self.path = path
        self._workdir = workdir           # keeps the memory-mapped input files alive as long as this object

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
        """Write the .npz atomically (temporary name, then rename), one array at a time."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp.npz")
        try:
            with open(tmp, "wb") as f:
                with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED) as zf:
                    _put(zf, "__tokens__", np.int64(self.tokens))
                    _put(zf, "__source__", np.frombuffer(json.dumps(self.source).encode(), np.uint8))
                    for key in self.arrays:
                        _put(zf, key, self.arrays[key])
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()
        return path


def _put(zf: zipfile.ZipFile, key: str, arr) -> None:
    """One .npy member. Staged inputs (a memory-mapped file) are copied through with plain reads, so writing a
    multi-GB calibration maps none of it into this process."""
    with zf.open(key + ".npy", "w", force_zip64=True) as member:
        if isinstance(arr, np.memmap) and arr.filename and arr.offset == 0 and arr.flags.c_contiguous:
            np.lib.format.write_array_header_1_0(member, np.lib.format.header_data_from_array_1_0(arr))
            with open(arr.filename, "rb") as f:
                shutil.copyfileobj(f, member, 16 << 20)
        else:
            np.lib.format.write_array(member, np.asanyarray(arr), allow_pickle=False)


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
            allowed = (np.float32,) if kind == "h" else (np.float16, np.float32)
            if arr.dtype not in allowed or arr.ndim != 2 or (kind == "h" and arr.shape[0] != arr.shape[1]):
                raise FormatError(f"{path}: array {key!r} is {arr.dtype}{list(arr.shape)}, expected "
                                  f"{'float32 (C, C)' if kind == 'h' else 'float16 or float32 (T, C)'}")
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
    except (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile) as e:
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


class _Recorder:
    """Per matrix, the sum of x x^T (float64, in memory) or the inputs x (appended to a file in `folder`)."""

    def __init__(self, tokens: int, folder: str):
        self.tokens = tokens
        self.folder = folder
        self.sums: dict[str, np.ndarray] = {}
        self.inputs: dict[str, list] = {}            # name -> [file path, columns, dtype]
        self.h_bytes = 0

    def add(self, name: str, X: np.ndarray) -> None:
        C = X.shape[1]
        if name not in self.sums and name not in self.inputs:
            if 2 * C <= self.tokens and self.h_bytes + 8 * C * C <= H_MEMORY_BYTES:   # H is the smaller record
                self.sums[name] = np.zeros((C, C), np.float64)
                self.h_bytes += 8 * C * C
            else:
                self.inputs[name] = [os.path.join(self.folder, f"{len(self.inputs)}.x"), C, np.float16]
        if name in self.sums:
            from ..kernels.threads import blas_threads
            X64 = X.astype(np.float64)
            with blas_threads():                  # a large product on its own: every core (BLAS is kept to one)
                self.sums[name] += X64.T @ X64
            return
        record = self.inputs[name]
        file, _, dtype = record
        if dtype == np.float16 and np.abs(X).max(initial=0.0) > FLOAT16_MAX:
            # beyond float16's range (e.g. large squared activations): this matrix's inputs go in float32
            if os.path.exists(file):
                np.fromfile(file, np.float16).astype(np.float32).tofile(file)
            record[2] = dtype = np.float32
        with open(file, "ab") as f:
            X.astype(dtype).tofile(f)

    def names(self) -> set[str]:
        return set(self.sums) | set(self.inputs)

    def arrays(self) -> dict[str, np.ndarray]:
        out = {name + ".h": h.astype(np.float32) for name, h in self.sums.items()}
        for name, (file, C, dtype) in self.inputs.items():
            rows = os.path.getsize(file) // (C * np.dtype(dtype).itemsize)
            out[name + ".x"] = np.memmap(file, dtype, "r", shape=(rows, C))
        return out


def calibrate(model, text: bytes | str, *, tokens: int = DEFAULT_TOKENS, text_name: str = "text",
              workdir: str | os.PathLike | None = None) -> Calibration:
    """Run `model` (a loaded rwkv_lite Model) over the first `tokens` tokens of `text` and record each matrix's
    inputs. The model's tokenizer encodes the text (a model without one reads it as bytes). Recorded inputs are
    kept in a temporary folder inside `workdir` (default: the system's) until the Calibration is dropped.

    The inputs are seen through the forward pass's observer (Model.forward(..., observer=)): every product with a
    stored matrix, in sequence mode and in a last one-token chunk (the fused decode launch) alike."""
    from .. import model as model_module

    data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
    tokenizer = model.tokenizer
    ids = (tokenizer.encode(data.decode("utf-8", errors="replace")) if tokenizer is not None
           else list(data))
    ids = np.asarray(ids[:tokens], np.int64)
    chunk = model_module.CHUNK_TOKENS
    if ids.size < 2:
        raise FormatError(f"{text_name}: too little text to calibrate on ({ids.size} tokens)")
    T = ids.size
    folder = tempfile.TemporaryDirectory(prefix="rwkv-lite-calibrate-", dir=workdir)
    recorder = _Recorder(T, folder.name)
    try:
        state = None
        for start in range(0, T, chunk):               # all_logits: the head sees every token; a chunk at a time
            _, state = model.forward(ids[start:start + chunk], state, all_logits=True,   # bounds the logits
                                     observer=recorder.add)
    except BaseException:
        folder.cleanup()
        raise
    matrices = [name for name, info in model.metadata.get("tensors", {}).items()
                if info.get("role") == "matrix"]
    missing = [name for name in matrices if name not in recorder.names()]
    if missing:
        folder.cleanup()
        raise RwkvLiteError(f"{model.path}: calibration saw no inputs for {len(missing)} matrices "
                            f"(first: {missing[0]}): the forward pass did not report their products")
    source = {"model": Path(str(model.path)).name, "text": text_name, "text_bytes": len(data),
              "text_sha256": hashlib.sha256(data).hexdigest(), "tokens": T}
    return Calibration(recorder.arrays(), T, source, workdir=folder)
