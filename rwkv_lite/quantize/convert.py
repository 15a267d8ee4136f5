"""The conversion pipeline: checkpoint in, one rwkv-lite file out.

    source files -> reader (name, shape, dtype, lazy rows) -> BlinkDL names -> version + config from shapes
    -> the version's load-time transforms (arch/*.plan) -> storage scheme per tensor -> streaming writer

Only a few row blocks are in memory at any time, so a 15 GB Eagle-7B checkpoint converts in well under 2.5 GB.
The output appears under its final name only once complete (see format.AtomicFile).
"""
from __future__ import annotations

import datetime as _dt
import importlib.util
import os
import warnings
from pathlib import Path
from typing import Callable

import numpy as np

from .. import __version__
from ..arch import detect_version, module_for
from ..errors import FormatError
from ..format import TOKENIZER_ARRAY, ModelWriter
from .names import canonical_names
from .readers import open_checkpoint
from .schemes import get_scheme

QUANTS = ("fp32", "fp16", "int8", "int4")
ROW_BLOCK_BYTES = 64 << 20          # float32 bytes of source rows converted at once


def storage_plan(quant: str, group: int | None = None, head: str | None = None) -> dict[str, object]:
    """Scheme per tensor role for a --quant choice.

    The embedding is read one row per token, so it costs memory but no bandwidth. int8 files keep it at fp16: on
    the tiny real models an int8 embedding raised the int8 file's mean KL vs fp32 by a third (5v2, head fp32:
    2.46e-4 -> 3.28e-4); fp16 costs +0.25 GB in an Eagle-7B file. int4 files, made to be small, keep it at int8
    (its effect is ~1% of int4's error there). `head` overrides the head's scheme.
    """
    if quant not in QUANTS:
        raise ValueError(f"unknown quantization {quant!r} (choose from {', '.join(QUANTS)})")
    params = {"group": group} if (quant == "int4" and group) else {}
    matrix = get_scheme(quant, **params)
    embedding = {"int8": get_scheme("fp16"), "int4": get_scheme("int8")}.get(quant, matrix)
    return {"matrix": matrix, "embedding": embedding, "head": get_scheme(head) if head else matrix}


def convert(src: str | os.PathLike, dst: str | os.PathLike, quant: str = "fp16", *, vocab: str | os.PathLike | None = None,
            group: int | None = None, head: str | None = None, provenance: dict | None = None,
            calibration: str | os.PathLike | None = None,
            progress: Callable[[int, int, str], None] | None = None) -> Path:
    """Convert a checkpoint (HF folder, BlinkDL .pth/.safetensors, rwkv.cpp .bin) to an rwkv-lite file.

    quant: fp32 | fp16 | int8 | int4. vocab: tokenizer file to embed (World vocab .txt or tokenizer.json);
    default: one found beside the source, else (vocab 65536) the World vocab of the `rwkv` package if installed,
    else (vocab 256) the byte tokenizer. provenance: extra JSON-ready facts recorded in the file (e.g. how a model
    was trained). calibration: a file from `rwkv-lite calibrate` (quantize/calibrate.py): int4 matrices it covers are
    quantized with GPTQ (quantize/gptq.py) instead of rounding each weight on its own.
    progress(done, total, tensor_name) is called after each tensor."""
    src, dst = Path(src), Path(dst)
    schemes = storage_plan(quant, group, head)
    calib = None
    if calibration is not None:
        from .calibrate import load_calibration
        calib = load_calibration(calibration)
        if quant != "int4" and head != "int4":
            raise FormatError(f"{calibration}: calibration is used by int4 quantization only (got --quant {quant})")
    if dst.exists() and dst.is_dir():
        raise FormatError(f"{dst}: is a folder; give the output file name")
    if not dst.parent.exists():
        raise FormatError(f"{dst.parent}: output folder does not exist")
    with open_checkpoint(src) as ckpt:
        refs = canonical_names(ckpt)
        try:
            version = detect_version(refs)
            arch = module_for(version)
            cfg = arch.infer_config(refs, version, ckpt.kind)
        except FormatError as e:
            raise FormatError(f"{src}: {e}") from None
        except (KeyError, IndexError, ValueError) as e:
            raise FormatError(f"{src}: cannot infer the model configuration ({e.__class__.__name__}: {e})") from None
        _check_against_config_json(src, cfg, ckpt.config)
        try:
            planned = arch.plan(refs, cfg, ckpt.kind)
        except FormatError as e:
            raise FormatError(f"{src}: {e}") from None
        tokenizer = _choose_tokenizer(src, vocab, ckpt.tokenizer_file, cfg["vocab_size"])

        if calib is not None:
            _check_calibration(calib, planned)
        tensors_meta, arrays, scheme_of = {}, [], {}
        for t in planned:
            if t.role == "vector":
                scheme = get_scheme("fp32")
                parts = {"": (np.dtype(np.float32), t.shape)}
            else:
                scheme = schemes["head"] if t.name == "head.weight" else schemes[t.role]
                parts = scheme.parts(t.shape)
            scheme_of[t.name] = (scheme, parts)
            tensors_meta[t.name] = {"scheme": scheme.name, "params": scheme.params, "shape": list(t.shape),
                                    "role": t.role}
            arrays += [(t.name + suffix, dtype, shape) for suffix, (dtype, shape) in parts.items()]
        tok_bytes = tokenizer.to_bytes() if tokenizer is not None else b""
        arrays.append((TOKENIZER_ARRAY, np.uint8, (len(tok_bytes),)))
        metadata = {
            "kind": "model",
            "config": cfg,
            "tensors": tensors_meta,
            "tokenizer": {"kind": tokenizer.kind if tokenizer is not None else "none"},
            "provenance": {
                "converter": f"rwkv-lite {__version__}",
                "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "source_kind": ckpt.kind,
                "source_files": list(ckpt.source_files),
                "quant": quant,
                **({"calibration": {"file": Path(calibration).name, **calib.source}} if calib is not None else {}),
                **(provenance or {}),
            },
        }
        with ModelWriter(dst, metadata, arrays) as writer:
            for done, t in enumerate(planned, 1):
                scheme, parts = scheme_of[t.name]
                hessian = (calib.hessian(t.name, t.shape[1])
                           if calib is not None and scheme.name == "int4" and t.role == "matrix" else None)
                if hessian is not None:
                    _write_gptq_tensor(writer, t, scheme, hessian)
                else:
                    _write_tensor(writer, t, scheme, parts)
                if progress is not None:
                    progress(done, len(planned), t.name)
            writer.append(TOKENIZER_ARRAY, np.frombuffer(tok_bytes, dtype=np.uint8))
            writer.close()
    return dst


def _write_tensor(writer: ModelWriter, t, scheme, parts) -> None:
    n_rows = t.shape[0] if t.shape else 1
    row_floats = int(np.prod(t.shape[1:], dtype=np.int64)) if len(t.shape) > 1 else 1
    block = max(1, ROW_BLOCK_BYTES // (4 * max(1, row_floats)))
    for a in range(0, n_rows, block):
        b = min(n_rows, a + block)
        rows = t.rows(a, b)
        if not np.isfinite(rows).all():
            raise FormatError(f"tensor {t.name} contains NaN or Inf values")
        if t.role == "vector":
            writer.append(t.name, rows)
        else:
            for suffix, arr in scheme.quantize(rows).items():
                writer.append(t.name + suffix, arr)


def _write_gptq_tensor(writer: ModelWriter, t, scheme, hessian) -> None:
    """GPTQ needs the whole matrix at once (rows are independent, but its column order is not): a 14336 x 4096
    matrix is 235 MB of float32, and H of a 14336-wide input another 0.8 GB during the factorisation."""
    from .gptq import gptq_int4
    rows = t.rows(0, t.shape[0])
    if not np.isfinite(rows).all():
        raise FormatError(f"tensor {t.name} contains NaN or Inf values")
    for suffix, arr in gptq_int4(rows, hessian, scheme, name=t.name).items():
        writer.append(t.name + suffix, arr)


def _check_calibration(calib, planned) -> None:
    """Every calibrated name must be a matrix of this checkpoint with the recorded input width."""
    widths = {t.name: t.shape[1] for t in planned if t.role == "matrix" and len(t.shape) == 2}
    unknown = [n for n in calib.names() if n not in widths]
    if unknown:
        raise FormatError(f"{calib.path}: calibration for {unknown[0]!r}, which this checkpoint does not have "
                          f"(was it made from another model?)")
    for name in calib.names():
        for key in (name + ".h", name + ".x"):
            arr = calib.arrays.get(key)
            if arr is not None and arr.shape[1] != widths[name]:
                raise FormatError(f"{calib.path}: {key} has {arr.shape[1]} columns, the matrix has {widths[name]}")


def _check_against_config_json(src: Path, cfg: dict, config_json: dict | None) -> None:
    """Shapes decide the config; a config.json beside the weights must agree with them."""
    if not config_json:
        return
    checks = {
        "hidden_size": cfg["n_embd"], "num_hidden_layers": cfg["n_layer"], "vocab_size": cfg["vocab_size"],
        "head_size": cfg.get("head_size"), "intermediate_size": cfg.get("ffn_size"),
        "attention_hidden_size": cfg["n_embd"],
    }
    for key, inferred in checks.items():
        stated = config_json.get(key)
        if stated is None or inferred is None:
            continue                                  # e.g. intermediate_size null in the Eagle HF config
        if int(stated) != int(inferred):
            raise FormatError(f"{src}: config.json says {key}={stated} but the weights have {inferred}")


def _choose_tokenizer(src: Path, vocab, found_beside, vocab_size: int):
    from ..tokenizer import ByteTokenizer, tokenizer_from_file
    if vocab is not None:
        tok = tokenizer_from_file(vocab)
    elif found_beside is not None:
        tok = tokenizer_from_file(found_beside)
    elif vocab_size == 256:
        return ByteTokenizer()
    else:
        tok = None
        spec = importlib.util.find_spec("rwkv")
        if vocab_size == 65536 and spec is not None and spec.origin:
            candidate = Path(spec.origin).parent / "rwkv_vocab_v20230424.txt"
            if candidate.exists():
                tok = tokenizer_from_file(candidate)
        if tok is None:
            warnings.warn(f"{src}: no tokenizer found (pass --vocab); the model will run on token ids only",
                          stacklevel=3)
            return None
    if tok.vocab_size > vocab_size:
        raise FormatError(f"tokenizer has {tok.vocab_size} ids but the model's vocabulary is {vocab_size}")
    return tok
