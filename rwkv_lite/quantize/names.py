"""Tensor names: Hugging Face RWKV ports -> the BlinkDL names the rest of rwkv-lite uses.

HF = "rwkv." + BlinkDL name, with these dotted components renamed (reference doc section 1.2; the same rule
covers the transformers RWKV-4 port, the RWKV-5 "Eagle" ports and the RWKV-6 ports, whose time_maa_* names are
unchanged):
    emb -> embeddings    ln0 -> pre_ln    att -> attention    ffn -> feed_forward
    time_mix_k|v|r|g -> time_mix_key|value|receptance|gate
`head.weight` has no prefix. Values and orientations are identical, so mapping names is all there is to do.
"""
from __future__ import annotations

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

    HF names are mapped; BlinkDL names pass through. Two source names that land on the same BlinkDL name are a
    FormatError (the checkpoint mixes conventions ambiguously)."""
    tensors = getattr(checkpoint, "tensors", checkpoint)
    where = getattr(checkpoint, "path", None)
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
