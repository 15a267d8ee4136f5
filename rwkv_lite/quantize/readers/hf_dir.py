"""Hugging Face model folders: config.json + weights (one file or shards with an index) + tokenizer.

Weights are looked for in this order (safetensors first: no pickle to refuse):
    model.safetensors.index.json -> its shards;  model.safetensors;
    pytorch_model.bin.index.json -> its shards;  pytorch_model.bin;
    otherwise exactly one *.safetensors / *.bin / *.pth file in the folder, which is then opened as that file
    (kind 'pth' / 'safetensors' / 'rwkv_cpp', e.g. a BlinkDL download), with the folder's config and tokenizer.
An index's weight_map (tensor name -> shard file) must name plain files inside the folder, and every tensor it
lists must be in that shard. Names stay as stored (HF names); quantize/names.py maps them to BlinkDL names.
"""
from __future__ import annotations

from pathlib import Path

from ...errors import FormatError
from .base import Checkpoint, TensorRef, find_tokenizer_file, read_json_file

# (index json, single file) per weights format, in order of preference
HF_WEIGHTS = (("model.safetensors.index.json", "model.safetensors"),
              ("pytorch_model.bin.index.json", "pytorch_model.bin"))


def open_hf_dir(folder: Path, index: Path | None = None) -> Checkpoint:
    """Open an HF folder (or, with `index`, exactly the shards of that index json)."""
    from . import open_weights_file               # the single-file readers

    folder = Path(folder)
    config_path = folder / "config.json"
    config = None
    if config_path.is_file():
        config = read_json_file(config_path, "config.json")
        if not isinstance(config, dict):
            raise FormatError(f"{config_path}: config.json is not a JSON object")

    files, weight_map = None, None
    if index is None:
        for index_name, single_name in HF_WEIGHTS:
            if (folder / index_name).is_file():
                index = folder / index_name
                break
            if (folder / single_name).is_file():
                files = [folder / single_name]
                break
    if index is not None:
        shard_names, weight_map = _read_index(folder, index)
        files = [folder / n for n in shard_names]
    elif files is None:
        ckpt = open_weights_file(_only_weights_file(folder))
        ckpt.config, ckpt.tokenizer_file = config, find_tokenizer_file(folder)
        if config is not None:
            ckpt.source_files.append("config.json")
        return ckpt

    parts: list[Checkpoint] = []
    tensors: dict[str, TensorRef] = {}
    try:
        for f in files:
            part = open_weights_file(f)
            parts.append(part)
            for name, ref in part.tensors.items():
                if weight_map is not None:
                    if weight_map.get(name) != f.name:
                        continue                  # listed for another shard (or not at all): the index decides
                elif name in tensors:
                    raise FormatError(f"{f}: tensor {name!r} appears in two weight files")
                tensors[name] = ref
        if weight_map is not None:
            missing = [n for n in weight_map if n not in tensors]
            if missing:
                raise FormatError(f"{index}: tensor {missing[0]!r} is listed for {weight_map[missing[0]]} "
                                  f"but that shard does not contain it ({len(missing)} missing)")
    except BaseException:
        for p in parts:
            p.close()
        raise

    source_files = [f.name for f in files] + ([index.name] if index is not None else []) + \
        (["config.json"] if config is not None else [])
    info = {"weights_format": parts[0].kind if parts else None, "weight_files": [f.name for f in files],
            "index": index.name if index is not None else None}
    return Checkpoint(folder, "hf", tensors, source_files, config=config,
                      tokenizer_file=find_tokenizer_file(folder), info=info,
                      closers=[p.close for p in parts])


def _read_index(folder: Path, index: Path) -> tuple[list[str], dict[str, str]]:
    data = read_json_file(index, "index json")
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise FormatError(f"{index}: no weight_map in the index")
    shards: list[str] = []
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or not shard or Path(shard).name != shard or shard in (".", ".."):
            raise FormatError(f"{index}: tensor {name!r} maps to {str(shard)[:80]!r}, not a file in this folder")
        if shard not in shards:
            if not (folder / shard).is_file():
                raise FormatError(f"{index}: shard {shard} is missing from {folder}")
            shards.append(shard)
    return sorted(shards), weight_map


def _only_weights_file(folder: Path) -> Path:
    candidates = sorted(p for pattern in ("*.safetensors", "*.bin", "*.pth") for p in folder.glob(pattern)
                        if p.is_file())
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise FormatError(f"{folder}: no model weights found (model.safetensors, pytorch_model.bin, "
                          f"an index json, or a single .safetensors/.bin/.pth file)")
    raise FormatError(f"{folder}: several weight files ({', '.join(p.name for p in candidates[:4])}) and no "
                      f"index json; give the file to convert")
