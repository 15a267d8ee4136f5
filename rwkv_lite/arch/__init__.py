"""One module per RWKV generation, each holding that version's math and its load-time transforms.

Every module provides the same contract (tests/test_arch_contract.py checks it):
    VERSIONS                                  version strings it runs ("4", "5.0", "5.1", "5.2", "6", "7")
    Config                                    its typed config: a frozen dataclass (common.Config subclass);
                                              Config.from_dict(file config) validates the numbers
    infer_config(refs, version, source_kind)  dimensions from a checkpoint's tensor shapes -> the file's config dict
    plan(refs, cfg, source_kind)              tensors of our file (load-time transforms) -> [PlannedTensor]
    tensor_shapes(cfg)                        every tensor of our file, name -> shape (what a file is checked against)
    state_shapes(cfg), init_state(cfg, store) the recurrent state: name -> shape; a fresh state (float32 arrays)
    Layer, load_weights(store, cfg)           one block's weights; the file's tensors arranged for the forward pass
    time_mix, channel_mix                     one layer's equations over T tokens of one sequence
    forward(W, tokens, state, all_logits, check=None, observer=None)
                                              logits of one chunk of tokens (T = 1: decode), updating the state
    time_mix_batch, channel_mix_batch, forward_batch(W, tokens, states, observer=None)
                                              one token for each of B sequences
The layer loop, weights access, planning and the shared ops live once in common.py; nothing outside this package
knows a version's tensor names.
"""
from __future__ import annotations

from importlib import import_module

from ..errors import FormatError

_MODULES = {"4": "v4", "5.0": "v5", "5.1": "v5", "5.2": "v5", "6": "v6", "7": "v7"}
# every version the reference knows; an unknown one is refused with a clear message
KNOWN_VERSIONS = ("4", "5.0", "5.1", "5.2", "6", "7")


def detect_version(names) -> str:
    """RWKV version from BlinkDL tensor names and shapes (an order-independent rule).

    `names` maps tensor name -> object with a `.shape`."""
    if "emb.weight" not in names or "head.weight" not in names:
        raise FormatError("not an RWKV checkpoint (no emb.weight / head.weight)")
    if any(n.endswith("att.r_k") for n in names):
        return "7"
    if any(n.endswith("att.time_maa_x") for n in names):
        return "6"
    if any(n.endswith("att.ln_x.weight") for n in names):
        decay = names.get("blocks.0.att.time_decay")
        shape = tuple(d for d in getattr(decay, "shape", ()))
        # (H, N) in BlinkDL files, (H, N, 1) in rwkv.cpp files: 5.2 has a decay per channel
        if len(shape) >= 2 and shape[1] > 1:
            return "5.2"
        if "blocks.0.att.gate.weight" in names:
            return "5.1"
        return "5.0"
    return "4"


def module_for(version: str):
    """The module that runs `version`."""
    name = _MODULES.get(version)
    if name is None:
        if version in KNOWN_VERSIONS:
            raise FormatError(f"RWKV version {version} is not supported yet by this rwkv-lite")
        raise FormatError(f"unknown RWKV version {version!r}")
    return import_module(f".{name}", __name__)
