"""The conversion pipeline: checkpoint in, one rwkv-lite file out.

    source files -> reader (name, shape, dtype, lazy rows) -> BlinkDL names -> version + config from shapes
    -> the version's load-time transforms (arch/*.plan) -> storage scheme per tensor -> streaming writer

Only a few row blocks are in memory at any time, so a 15 GB Eagle-7B checkpoint converts in well under 2.5 GB.
The output appears under its final name only once complete (see format.AtomicFile).
"""
from __future__ import annotations

import datetime as _dt
import os
from contextlib import nullcontext
from pathlib import Path

import numpy as np

from .. import __version__
from ..arch import detect_version, module_for
from ..errors import FormatError
from ..format import TOKENIZER_ARRAY, ModelWriter
from ..progress import Progress
from .lora import merge_adapter, open_adapter
from .names import canonical_names
from .readers import open_checkpoint
from ..schemes import SchemeError, get_scheme
from ..schemes.panel import relayout

QUANTS = ("fp32", "fp16", "int8", "int4")
ROW_BLOCK_BYTES = 64 << 20          # float32 bytes of source rows converted at once


def storage_plan(quant: str, group: int | None = None, head: str | None = None) -> dict[str, object]:
    """Scheme per tensor role for a --quant choice.

    RWKV-6/7's LoRA factors (role 'lora') are int8 in int8 and int4 files: 4-bit steps in the decay's LoRA would
    move every token's forgetting; int8 keeps 0.2 GB of float32 per token of the G1 1.5B shape to 0.05 GB.
    The embedding is read one row per token, so it costs memory but no bandwidth. int8 files keep it at fp16: on
    the tiny real models an int8 embedding raised the int8 file's mean KL vs fp32 by a third (5v2, head fp32:
    2.46e-4 -> 3.28e-4); fp16 costs +0.25 GB in an Eagle-7B file. int4 files, made to be small, keep it at int8
    (its effect is ~1% of int4's error there). `head` overrides the head's scheme.
    """
    if quant not in QUANTS:
        raise ValueError(f"unknown quantization {quant!r} (choose from {', '.join(QUANTS)})")
    matrix = _matrix_scheme(quant, group if quant == "int4" else None)
    embedding = {"int8": get_scheme("fp16"), "int4": get_scheme("int8")}.get(quant, matrix)
    lora = _matrix_scheme("int8") if quant in ("int8", "int4") else matrix
    return {"matrix": matrix, "embedding": embedding, "head": _matrix_scheme(head) if head else matrix,
            "lora": lora}


def _matrix_scheme(quant: str, group: int | None = None):
    """The scheme of a weight matrix: int8 and int4 (group 32) in the panel layout that the integer kernels read
    (schemes/panel.py); other int4 group sizes row-major."""
    params = {"group": group} if group else {}
    if quant in ("int8", "int4") and params.get("group", 32) == 32:
        params["layout"] = "p16"
    return get_scheme(quant, **params)


def convert(src: str | os.PathLike, dst: str | os.PathLike, quant: str = "fp16", *, vocab: str | os.PathLike | None = None,
            group: int | None = None, head: str | None = None, provenance: dict | None = None,
            calibration: str | os.PathLike | None = None, lora: str | os.PathLike | None = None,
            lora_alpha: float | None = None, progress: Progress | None = None) -> Path:
    """Convert a checkpoint (HF folder, BlinkDL .pth/.safetensors, rwkv.cpp .bin) to an rwkv-lite file.

    quant: fp32 | fp16 | int8 | int4. vocab: tokenizer file to embed (World vocab .txt or tokenizer.json);
    default: one found beside the source, else the tokenizer shipped with rwkv-lite that fits the vocabulary
    size (see builtin_tokenizer_for), else (vocab 256) the byte tokenizer, else none (the file then runs on
    token ids only; its metadata says tokenizer kind "none"). provenance: extra JSON-ready facts
    recorded in the file (e.g. how a model was trained). calibration: a file from `rwkv-lite calibrate`
    (quantize/calibrate.py): int4 matrices it covers are quantized with GPTQ (quantize/gptq.py) instead of
    rounding each weight on its own. lora, lora_alpha: an adapter merged into the weights before quantization
    (quantize/lora.py). progress(tensors done, tensors, tensor name) is called after each tensor
    (rwkv_lite/progress.py).

    An rwkv-lite fp32/fp16 file is also a valid source (re-quantization, quantize/requantize.py): its tokenizer
    and provenance are carried over. The destination must not be a file the conversion reads."""
    from .requantize import RwkvLiteSource, is_rwkv_lite_file
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
    refuse_overwriting_an_input(dst, [src, vocab, calibration, lora])
    created = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")

    if is_rwkv_lite_file(src):
        if lora is not None:
            raise FormatError(f"{src}: merge a LoRA adapter into the original checkpoint, not an rwkv-lite file")
        with RwkvLiteSource(src) as source:
            if vocab is not None:
                tok = _checked_tokenizer(vocab, source.config["vocab_size"])
                tok_kind, tok_bytes = tok.kind, tok.to_bytes()
            else:
                tok_kind, tok_bytes = source.tokenizer_kind, source.tokenizer_bytes
            prov = {**source.provenance, "converter": f"rwkv-lite {__version__}", "created": created,
                    "quant": quant, "requantized_from": {"file": src.name, "quant": source.quant}}
            if vocab is not None:
                prov["tokenizer"] = Path(vocab).name
            prov.pop("calibration", None)
            if calib is not None:
                prov["calibration"] = {"file": Path(calibration).name, **calib.source}
            if any(t.stored is not None for t in source.planned) and calib is not None:
                raise FormatError(f"{src}: calibration needs float weights; this file is already quantized")
            try:
                return _write_model(dst, source.config, source.planned, tok_kind, tok_bytes,
                                    {**prov, **(provenance or {})}, schemes, calib, progress)
            except SchemeError as e:
                raise FormatError(f"{src}: {e}") from None

    with open_checkpoint(src) as ckpt, (open_adapter(lora) if lora is not None else nullcontext()) as adapter:
        base = ckpt.path if ckpt.path.is_dir() else ckpt.path.parent
        refuse_overwriting_an_input(dst, [base / name for name in ckpt.source_files] + [ckpt.tokenizer_file])
        refs = canonical_names(ckpt)
        if adapter is not None:
            refs = merge_adapter(refs, adapter, lora_alpha)
        try:
            version = detect_version(refs)
            arch = module_for(version)
            cfg = arch.infer_config(refs, version, ckpt.kind)
        except FormatError as e:
            raise FormatError(f"{src}: {_not_a_model_hint(refs) or e}") from None
        except (KeyError, IndexError, ValueError) as e:
            raise FormatError(f"{src}: cannot infer the model configuration ({e.__class__.__name__}: {e})") from None
        _check_against_config_json(src, cfg, ckpt.config)
        _check_fla_norm_eps(src, cfg, ckpt.config)
        read = _ReadTracker(refs)
        try:
            planned = arch.plan(read, cfg, ckpt.kind)
        except FormatError as e:
            raise FormatError(f"{src}: {e}") from None
        read.check_all_used(src)
        tokenizer, tokenizer_name = _choose_tokenizer(src, vocab, ckpt.tokenizer_file, cfg["vocab_size"])
        prov = {
            "converter": f"rwkv-lite {__version__}",
            "created": created,
            "source_kind": ckpt.kind,
            "source_files": list(ckpt.source_files),
            "quant": quant,
            **({"tokenizer": tokenizer_name} if tokenizer_name else {}),
            **({"calibration": {"file": Path(calibration).name, **calib.source}} if calib is not None else {}),
            **({"lora": {"file": Path(lora).name, "alpha": lora_alpha}} if lora is not None else {}),
            **(provenance or {}),
        }
        return _write_model(dst, cfg, planned, tokenizer.kind if tokenizer is not None else "none",
                            tokenizer.to_bytes() if tokenizer is not None else b"", prov, schemes, calib, progress)


def _write_model(dst: Path, cfg: dict, planned, tokenizer_kind: str, tok_bytes: bytes, provenance: dict, schemes,
                 calib, progress) -> Path:
    """Choose each tensor's storage, then stream every tensor through its scheme into the file."""
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
            if t.stored is not None and (t.stored[0].name != scheme.name or t.stored[0].group != scheme.group):
                raise SchemeError(f"tensor {t.name!r} is stored as {t.stored[0].name} {t.stored[0].params}; an "
                                  f"already quantized file converts only to its own quantization (here "
                                  f"{scheme.name}), never rounded twice: convert the original checkpoint instead")
        scheme_of[t.name] = (scheme, parts)
        tensors_meta[t.name] = {"scheme": scheme.name, "params": scheme.params, "shape": list(t.shape),
                                "role": t.role}
        arrays += [(t.name + suffix, dtype, shape) for suffix, (dtype, shape) in parts.items()]
    arrays.append((TOKENIZER_ARRAY, np.uint8, (len(tok_bytes),)))
    metadata = {
        "kind": "model",
        "config": cfg,
        "tensors": tensors_meta,
        "tokenizer": {"kind": tokenizer_kind},
        "provenance": provenance,
    }
    with ModelWriter(dst, metadata, arrays) as writer:
        for done, t in enumerate(planned, 1):
            scheme, parts = scheme_of[t.name]
            if t.stored is not None:                    # an already quantized tensor: re-laid-out, not rounded
                for suffix, arr in relayout(*t.stored, scheme).items():
                    writer.append(t.name + suffix, arr)
                if progress is not None:
                    progress(done, len(planned), t.name)
                continue
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


def refuse_overwriting_an_input(dst: Path, inputs) -> None:
    """The destination is replaced at the end: it must not be the source (inputs[0], same inode) or any other file
    the conversion reads (`convert X X` would otherwise swap the checkpoint for its own conversion)."""
    if not dst.exists():
        return
    for index, path in enumerate(inputs):
        if path is None:
            continue
        path = Path(path)
        try:
            same = path.exists() and os.path.samefile(path, dst)
        except OSError:
            same = False
        if same:
            what = "the source" if index == 0 else f"read by the conversion (as {path})"
            raise FormatError(f"{dst}: the output file is {what}; give another output file name")


def _write_tensor(writer: ModelWriter, t, scheme, parts) -> None:
    n_rows = t.shape[0] if t.shape else 1
    row_floats = int(np.prod(t.shape[1:], dtype=np.int64)) if len(t.shape) > 1 else 1
    step = scheme.row_step if t.role != "vector" else 1     # panel layouts quantize whole panels of rows
    block = max(step, ROW_BLOCK_BYTES // (4 * max(1, row_floats)) // step * step)
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


def _not_a_model_hint(refs: dict) -> str | None:
    """What a checkpoint without a model's tensors is instead, when it is one of the add-on files people mix up."""
    names = list(refs)
    if names and all(n.startswith("blocks.") and n.endswith(".att.time_state") for n in names):
        return ("a state-tuned initial state, not a model: use it with --state on generate/chat, or convert it "
                "with rwkv-lite convert-state")
    if any(n.endswith(".lora_A") or n.endswith(".lora_B") for n in names) and "emb.weight" not in refs:
        return "a LoRA adapter, not a model: convert the base model with --lora and this file"
    return None


class _ReadTracker(dict):
    """The canonical tensors, recording which ones the version's plan looks up.

    A tensor the plan never reads would be dropped from the output without a word, and the model would run with
    wrong logits (a DeepEmbed checkpoint did exactly that): every tensor must be read, or the conversion fails
    naming it."""

    def __init__(self, refs: dict):
        super().__init__(refs)
        self.used: set[str] = set()

    def __getitem__(self, name):
        self.used.add(name)
        return super().__getitem__(name)

    def get(self, name, default=None):
        if name in self:
            self.used.add(name)
        return super().get(name, default)

    def check_all_used(self, src) -> None:
        unused = [name for name in self if name not in self.used]
        if unused:
            more = f" (and {len(unused) - 1} more)" if len(unused) > 1 else ""
            raise FormatError(f"{src}: tensor {unused[0]!r}{more} is not part of the RWKV layout this converter "
                              f"knows; refusing to drop it (the model would run with wrong results)")


def _check_fla_norm_eps(src: Path, cfg: dict, config_json: dict | None) -> None:
    """An fla RWKV-7 folder's norm_eps is its LayerNorms' epsilon, and head_dim * norm_eps its g_norm's (ln_x).
    Every published one has norm_eps 1e-5 and head_dim 64, i.e. BlinkDL's 1e-5 and 64e-5, which we run with
    (a converted BlinkDL model with another head size keeps the 64e-5 it was trained with). Other values would
    need LayerNorms this engine does not have: refused, not silently run with other numbers."""
    if not config_json or cfg.get("version") != "7" or config_json.get("model_type") != "rwkv7":
        return
    norm_eps = config_json.get("norm_eps", 1e-5)
    if not isinstance(norm_eps, (int, float)) or isinstance(norm_eps, bool) or abs(norm_eps - 1e-5) > 1e-12:
        raise FormatError(f"{src}: config.json says norm_eps={norm_eps!r}; RWKV-7 runs with 1e-5 (LayerNorm) and 64e-5 "
                          f"(ln_x), the values every published RWKV-7 model was trained with")


def _check_against_config_json(src: Path, cfg: dict, config_json: dict | None) -> None:
    """Shapes decide the config; a config.json beside the weights must agree with them."""
    if not config_json:
        return
    checks = {
        "hidden_size": cfg["n_embd"], "num_hidden_layers": cfg["n_layer"], "vocab_size": cfg["vocab_size"],
        "head_size": cfg.get("head_size"), "intermediate_size": cfg.get("ffn_size"),
        "attention_hidden_size": cfg["n_embd"],
        # RWKV-7 fla folders
        "head_dim": cfg.get("head_size") if cfg.get("version") == "7" else None,
        "decay_low_rank_dim": cfg.get("d_w"), "a_low_rank_dim": cfg.get("d_a"),
        "v_low_rank_dim": cfg.get("d_v") or None, "gate_low_rank_dim": cfg.get("d_g"),
    }
    for key, inferred in checks.items():
        stated = config_json.get(key)
        if stated is None or inferred is None:
            continue                                  # e.g. intermediate_size null in the Eagle HF config
        if int(stated) != int(inferred):
            raise FormatError(f"{src}: config.json says {key}={stated} but the weights have {inferred}")


# Tokenizers shipped in rwkv_lite/data, used when a checkpoint comes without one (docs/versions.md):
#   the RWKV World vocabulary (Apache-2.0, from the reference `rwkv` package): every World model, v4 World to
#   v7 G1, has a 65536-row embedding;
#   the GPT-NeoX 20B tokenizer.json (Apache-2.0, EleutherAI): RWKV-4 Pile and Raven models, 50277 ids, stored
#   in embeddings of 50277 rows or padded up to a multiple of 64 or 128 (50304, 50432).
WORLD_VOCAB_FILE = "rwkv_vocab_v20230424.txt"
NEOX_20B_FILE = "20B_tokenizer.json"
_NEOX_20B_IDS = 50277


def builtin_tokenizer_for(vocab_size: int) -> Path | None:
    """The shipped tokenizer file that fits an embedding of `vocab_size` rows, or None."""
    data = Path(__file__).resolve().parent.parent / "data"
    if vocab_size == 65536:
        name = WORLD_VOCAB_FILE
    elif _NEOX_20B_IDS <= vocab_size <= 50432:
        name = NEOX_20B_FILE
    else:
        return None
    path = data / name
    return path if path.is_file() else None


def _checked_tokenizer(path, vocab_size: int):
    from ..tokenizer import tokenizer_from_file
    tok = tokenizer_from_file(path)
    if tok.vocab_size > vocab_size:
        raise FormatError(f"{path}: tokenizer has {tok.vocab_size} ids but the model's vocabulary is {vocab_size}")
    return tok


def _choose_tokenizer(src: Path, vocab, found_beside, vocab_size: int):
    """(tokenizer or None, the name recorded in the provenance): --vocab, else a tokenizer file beside the
    source, else the shipped one for this vocabulary size, else bytes (vocab 256), else none."""
    from ..tokenizer import ByteTokenizer
    if vocab is not None:
        return _checked_tokenizer(vocab, vocab_size), Path(vocab).name
    if found_beside is not None:
        return _checked_tokenizer(found_beside, vocab_size), Path(found_beside).name
    if vocab_size == 256:
        return ByteTokenizer(), None             # (the kind, "bytes", says it all)
    builtin = builtin_tokenizer_for(vocab_size)
    if builtin is None:
        return None, None           # the file runs on token ids; `rwkv-lite convert` says so in one line
    return _checked_tokenizer(builtin, vocab_size), f"{builtin.name}, shipped with rwkv-lite"
