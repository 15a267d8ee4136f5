"""Tensor names: Hugging Face RWKV ports -> the BlinkDL names the rest of rwkv-lite uses.

HF = "rwkv." + BlinkDL name, with these dotted components renamed (the same rule covers the transformers RWKV-4
port, the RWKV-5 "Eagle" ports and the RWKV-6 ports, whose time_maa_* names are unchanged; docs/versions.md lists
the tests that check each layout against the reference):
    emb -> embeddings    ln0 -> pre_ln    att -> attention    ffn -> feed_forward
    time_mix_k|v|r|g -> time_mix_key|value|receptance|gate
`head.weight` has no prefix. Values and orientations are identical, so mapping names is all there is to do.
RWKV-7's Hugging Face folders use flash-linear-attention's names instead (`model.layers.N.attn.*`; see below).
"""
from __future__ import annotations

import numpy as np

from ..errors import FormatError

_HF_TO_BLINKDL = {
    "embeddings": "emb",
    "pre_ln": "ln0",
    "attention": "att",
    "feed_forward": "ffn",
    "time_mix_key": "time_mix_k",
    "time_mix_value": "time_mix_v",
    "time_mix_receptance": "time_mix_r",
    "time_mix_gate": "time_mix_g",
}
_HF_MARKERS = ("embeddings", "attention", "feed_forward", "pre_ln")


def hf_to_blinkdl(name: str) -> str:
    """BlinkDL name of a Hugging Face RWKV tensor name; BlinkDL names come back unchanged.

    >>> hf_to_blinkdl("rwkv.blocks.3.attention.time_mix_key")
    'blocks.3.att.time_mix_k'
    >>> hf_to_blinkdl("rwkv.blocks.0.pre_ln.weight")
    'blocks.0.ln0.weight'
    """
    if name.startswith("rwkv."):
        name = name[len("rwkv."):]
    return ".".join(_HF_TO_BLINKDL.get(part, part) for part in name.split("."))


def is_hf_naming(names) -> bool:
    """True when the names look like an HF port (prefix 'rwkv.' or HF component names)."""
    return any(n.startswith("rwkv.") or any(part in _HF_MARKERS for part in n.split(".")) for n in names)


def canonical_names(checkpoint) -> dict:
    """BlinkDL name -> TensorRef for a Checkpoint (or a mapping name -> TensorRef), in file order.

    HF names are mapped; BlinkDL names pass through; an RWKV-7 checkpoint in the fla layout is mapped with its
    LoRA matrices transposed and x_x split (below). Two source names that land on the same BlinkDL name are a
    FormatError (the checkpoint mixes conventions ambiguously)."""
    tensors = getattr(checkpoint, "tensors", checkpoint)
    where = getattr(checkpoint, "path", None)
    if is_fla_naming(tensors):
        return _fla_refs(tensors, where)
    out: dict = {}
    source_of: dict[str, str] = {}
    for name, ref in tensors.items():
        blink = hf_to_blinkdl(name)
        if blink in out:
            prefix = f"{where}: " if where is not None else ""
            raise FormatError(f"{prefix}tensors {source_of[blink]!r} and {name!r} both mean {blink!r}")
        out[blink] = ref
        source_of[blink] = name
    return out


# ---------------------------------------------------------------------------------------------------------------
# RWKV-7 in the flash-linear-attention ("fla") layout: fla-hub's RWKV7ForCausalLM folders and converters such as
# rwkv7-hf. Unlike the older HF ports this layout also changes values: its LoRAs are nn.Linear layers
# (weight = BlinkDL matrix transposed, bias = BlinkDL's *0 vector), and older files hold the six token-shift mixes
# as one x_x (6, C) in r, w, k, v, a, g order. The decay is the same function of the same numbers
# (-0.606531 * sigmoid(bias + tanh(x W0^T) W2^T), then exp), so mapping names and orientations is all there is.

_FLA_TOP = {"model.embeddings.weight": "emb.weight", "model.norm.weight": "ln_out.weight",
            "model.norm.bias": "ln_out.bias", "lm_head.weight": "head.weight"}
_FLA_NORMS = {"pre_norm": "ln0", "attn_norm": "ln1", "ffn_norm": "ln2"}
_FLA_PROJ = {"r_proj": "receptance", "k_proj": "key", "v_proj": "value", "o_proj": "output"}
_FLA_MIXES = "rwkvag"                              # x_x rows


def is_fla_naming(names) -> bool:
    """True for RWKV-7 tensors named as flash-linear-attention's RWKV7 model names them."""
    return any(n.startswith("model.layers.") or n == "model.embeddings.weight" for n in names)


def fla_to_blinkdl(name: str) -> tuple[str, str] | None:
    """(BlinkDL name, transform) for an fla RWKV-7 tensor name, or None when the name is not part of that layout.

    transform: '' (as stored), 'T' (a LoRA matrix: transpose), 'x_x' (the stacked mixes, split by the caller).

    >>> fla_to_blinkdl("model.layers.2.attn.w_lora.lora.0.weight")
    ('blocks.2.att.w1', 'T')
    """
    if name in _FLA_TOP:
        return _FLA_TOP[name], ""
    parts = name.split(".")
    if len(parts) < 4 or parts[:2] != ["model", "layers"] or not parts[2].isdigit():
        return None
    block, rest = f"blocks.{parts[2]}.", parts[3:]
    if len(rest) == 2 and rest[0] in _FLA_NORMS and rest[1] in ("weight", "bias"):
        return block + f"{_FLA_NORMS[rest[0]]}.{rest[1]}", ""
    if rest[0] == "ffn" and len(rest) >= 2:
        if rest[1:] in (["x_k"], ["key", "weight"], ["value", "weight"]):
            return block + ".".join(rest), ""
        return None
    if rest[0] != "attn" or len(rest) < 2:
        return None
    leaf = rest[1:]
    if len(leaf) == 1 and leaf[0] in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g", "k_k", "k_a", "r_k"):
        return block + "att." + leaf[0], ""
    if leaf == ["x_x"]:
        return block + "att.x_x", "x_x"
    if len(leaf) == 2 and leaf[0] in _FLA_PROJ and leaf[1] == "weight":
        return block + f"att.{_FLA_PROJ[leaf[0]]}.weight", ""
    if len(leaf) == 2 and leaf[0] == "g_norm" and leaf[1] in ("weight", "bias"):
        return block + f"att.ln_x.{leaf[1]}", ""
    if len(leaf) == 4 and leaf[0] in ("w_lora", "a_lora", "v_lora", "g_lora") and leaf[1] == "lora":
        f = leaf[0][0]
        if leaf[2:] == ["0", "weight"]:
            return block + f"att.{f}1", "T"
        if leaf[2:] == ["2", "weight"]:
            return block + f"att.{f}2", "T"
        if leaf[2:] == ["2", "bias"] and f != "g":
            return block + f"att.{f}0", ""
    return None


def _derived_ref(ref, name: str, shape: tuple, produce):
    """A TensorRef whose values are computed from a (small) source tensor read whole."""
    from .readers.base import TensorRef

    def read_rows(a, b):
        return np.ascontiguousarray(produce(ref.load())[a:b], dtype=np.float32)
    return TensorRef(name, shape, ref.dtype, read_rows)


def _fla_refs(tensors: dict, where) -> dict:
    """BlinkDL name -> TensorRef for an fla RWKV-7 checkpoint (orientations and stacked mixes undone)."""
    prefix = f"{where}: " if where is not None else ""
    if not any(name.endswith(".attn.r_k") for name in tensors):
        raise FormatError(f"{prefix}tensors named model.layers.N.* but no attn.r_k: not an RWKV-7 checkpoint "
                          f"(e.g. {next(iter(tensors))!r})")
    out: dict = {}
    source_of: dict[str, str] = {}

    def put(blink, ref, src):
        if blink in out:
            raise FormatError(f"{prefix}tensors {source_of[blink]!r} and {src!r} both mean {blink!r}")
        out[blink], source_of[blink] = ref, src

    for name, ref in tensors.items():
        mapped = fla_to_blinkdl(name)
        if mapped is None:
            raise FormatError(f"{prefix}tensor {name!r} is not part of the RWKV-7 fla layout this converter knows")
        blink, how = mapped
        if how == "T":
            if len(ref.shape) != 2:
                raise FormatError(f"{prefix}tensor {name!r} has shape {list(ref.shape)}, expected a matrix")
            put(blink, _derived_ref(ref, blink, ref.shape[::-1], lambda a: a.T), name)
        elif how == "x_x":
            if len(ref.shape) != 2 or ref.shape[0] != len(_FLA_MIXES):
                raise FormatError(f"{prefix}tensor {name!r} has shape {list(ref.shape)}, expected "
                                  f"[{len(_FLA_MIXES)}, n_embd]")
            stem = blink[:-len("x_x")]
            for i, f in enumerate(_FLA_MIXES):
                put(stem + f"x_{f}", _derived_ref(ref, stem + f"x_{f}", (ref.shape[1],),
                                                  lambda a, i=i: a[i]), name)
        else:
            put(blink, ref, name)
    return out
