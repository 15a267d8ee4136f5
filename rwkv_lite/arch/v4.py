"""RWKV-4: the original WKV with a numerically stable (a, b, p) state (layouts and tests: docs/versions.md).

Per layer l, with a = LN1(x) and p = the previous token's a (token shift):
    x_m   = a * mu_m + p * (1 - mu_m)                for m in k, v, r
    r     = sigmoid(W_r x_r),  k = W_k x_k,  v = W_v x_v
    wkv   = WKV(k, v; w = -exp(time_decay), u = time_first; state aa, bb, pp)        kernels/wkv4.py
    x    += W_o (r * wkv)
    b     = LN2(x), q = previous b
    x    += sigmoid(W_r' (b mu_r + q (1-mu_r))) * (W_v' relu(W_k' (b mu_k + q (1-mu_k)))^2)
logits = head(LN_out(x)).

There are no heads: the recurrence is per channel. The state per layer is att_x, aa, bb, pp, ffn_x (C each), in
the reference's order; pp starts at -1e30.

Our file stores `blocks.L.att.log_decay` = w = -exp(time_decay) and `blocks.L.att.time_first` = u (C each).
rwkv.cpp files already hold -exp(time_decay) under the name time_decay.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import FormatError
from ..kernels.wkv4 import wkv4
from . import common
from .batch import linear_rows, previous_rows, store_rows
from .common import (Planner, layer_count, linear, linear_many, relu_square, sigmoid_gate, token_mixes,
                     token_mixes_rows)

VERSIONS = ("4",)
PP_INIT = np.float32(-1e30)     # "minus infinity" of the running maximum exponent, as the reference


@dataclass(frozen=True)
class Config(common.Config):
    """RWKV-4: n_layer, n_embd, vocab_size, ffn_size (no heads: the recurrence is per channel)."""


def tensor_shapes(cfg: Config) -> dict[str, tuple[int, ...]]:
    """Every tensor of our file for this config, name -> shape."""
    C, F = cfg.n_embd, cfg.ffn_size
    shapes = common.common_tensor_shapes(cfg)
    for l in range(cfg.n_layer):
        p = f"blocks.{l}."
        for name in ("att.time_mix_k", "att.time_mix_v", "att.time_mix_r", "att.log_decay", "att.time_first",
                     "ffn.time_mix_k", "ffn.time_mix_r"):
            shapes[p + name] = (C,)
        for m in ("receptance", "key", "value", "output"):
            shapes[p + f"att.{m}.weight"] = (C, C)
        shapes[p + "ffn.receptance.weight"] = (C, C)
        if F is not None:
            shapes[p + "ffn.key.weight"] = (F, C)
            shapes[p + "ffn.value.weight"] = (C, F)
    return shapes


# ---------------------------------------------------------------------------------------------------------------
# Conversion: source tensors (BlinkDL names) -> the tensors of our file

def infer_config(refs: dict, version: str, source_kind: str) -> dict:
    """Model dimensions from tensor shapes."""
    vocab_size, n_embd = refs["emb.weight"].shape
    dim_att = refs["blocks.0.att.key.weight"].shape[0]
    if dim_att != n_embd:
        raise FormatError(f"attention width {dim_att} != n_embd {n_embd}: not supported")
    return {
        "arch": "rwkv4", "version": "4",
        "n_layer": layer_count(refs), "n_embd": n_embd, "vocab_size": vocab_size,
        "ffn_size": refs["blocks.0.ffn.key.weight"].shape[0],
    }


def plan(refs: dict, cfg: dict, source_kind: str):
    """The reference's load-time transforms: fold ln0, squeeze mixes, w = -exp(time_decay)."""
    C, F = cfg["n_embd"], cfg["ffn_size"]
    P = Planner(refs)
    P.embedding_with_ln0(C)
    if source_kind == "rwkv_cpp":
        log_decay = None                                       # rwkv.cpp stores -exp(time_decay) already
    else:
        log_decay = lambda a: -np.exp(a)                       # noqa: E731
    for l in range(cfg["n_layer"]):
        p = f"blocks.{l}."
        for norm in ("ln1", "ln2"):
            P.vector(p + norm + ".weight", (C,))
            P.vector(p + norm + ".bias", (C,))
        for m in "kvr":
            P.vector(p + f"att.time_mix_{m}", (C,))
        P.vector(p + "att.log_decay", (C,), p + "att.time_decay", log_decay)
        P.vector(p + "att.time_first", (C,))
        for m in ("receptance", "key", "value", "output"):
            P.matrix(p + f"att.{m}.weight", shape=(C, C))
        P.vector(p + "ffn.time_mix_k", (C,))
        P.vector(p + "ffn.time_mix_r", (C,))
        P.matrix(p + "ffn.key.weight", shape=(F, C))
        P.matrix(p + "ffn.receptance.weight", shape=(C, C))
        P.matrix(p + "ffn.value.weight", shape=(C, F))
    P.vector("ln_out.weight", (C,))
    P.vector("ln_out.bias", (C,))
    P.matrix("head.weight", shape=(cfg["vocab_size"], C))
    return P.tensors


# ---------------------------------------------------------------------------------------------------------------
# Running

def state_shapes(cfg) -> dict[str, tuple[int, ...]]:
    """att_x, aa, bb, pp, ffn_x: (L, C) each, the reference's per-layer order (pp starts at PP_INIT)."""
    L, C = common.dims(cfg, "n_layer", "n_embd")
    return {name: (L, C) for name in ("att_x", "aa", "bb", "pp", "ffn_x")}


def init_state(cfg, store=None) -> dict[str, np.ndarray]:
    state = {name: np.zeros(shape, np.float32) for name, shape in state_shapes(cfg).items()}
    state["pp"][:] = PP_INIT
    return state


class Layer:
    """One block's weights, looked up once so the forward pass reads like the equations."""

    def __init__(self, weights, l: int, cfg: Config):
        p = f"blocks.{l}."
        v, m = weights.vector, weights.matrix
        self.ln1_w, self.ln1_b = v(p + "ln1.weight"), v(p + "ln1.bias")
        self.ln2_w, self.ln2_b = v(p + "ln2.weight"), v(p + "ln2.bias")
        self.mix_k, self.mix_v, self.mix_r = v(p + "att.time_mix_k"), v(p + "att.time_mix_v"), v(p + "att.time_mix_r")
        self.w, self.u = v(p + "att.log_decay"), v(p + "att.time_first")
        self.W_r, self.W_k = m(p + "att.receptance.weight"), m(p + "att.key.weight")
        self.W_v = m(p + "att.value.weight")
        self.W_o = m(p + "att.output.weight")
        self.ffn_mix_k, self.ffn_mix_r = v(p + "ffn.time_mix_k"), v(p + "ffn.time_mix_r")
        self.F_k, self.F_v = m(p + "ffn.key.weight"), m(p + "ffn.value.weight")
        self.F_r = m(p + "ffn.receptance.weight")
        self.mixes = np.stack([self.mix_k, self.mix_v, self.mix_r])      # for one kernel call each
        self.ffn_mixes = np.stack([self.ffn_mix_k, self.ffn_mix_r])


def load_weights(store, cfg: Config) -> common.Weights:
    return common.Weights(store, cfg, Layer)


def time_mix(L: Layer, a, state, l, run):
    """RWKV-4 attention replacement of layer l over T tokens; updates the layer's shift and (aa, bb, pp)."""
    xk, xv, xr = token_mixes(a, state["att_x"][l], L.mixes)
    r, k, v = linear_many((L.W_r, L.W_k, L.W_v), (xr, xk, xv), run.observer)
    wkv = np.empty_like(k)
    wkv4(k, v, L.w, L.u, state["aa"][l], state["bb"][l], state["pp"][l], wkv)
    state["att_x"][l] = a[-1]
    return linear(L.W_o, sigmoid_gate(r, wkv), run.observer)


def channel_mix(L: Layer, b, state, l, run):
    """Feed-forward of layer l over T tokens; updates the layer's shift state."""
    xk, xr = token_mixes(b, state["ffn_x"][l], L.ffn_mixes)
    k, r = linear_many((L.F_k, L.F_r), (xk, xr), run.observer)
    state["ffn_x"][l] = b[-1]
    return sigmoid_gate(r, linear(L.F_v, relu_square(k), run.observer))


def forward(W: common.Weights, tokens: np.ndarray, state: dict, all_logits: bool, check=None,
            observer=None) -> np.ndarray:
    """Run T tokens (one chunk) through the model; returns logits (T, V) or (1, V) of the last token."""
    return common.forward(time_mix, channel_mix, W, tokens, state, all_logits, check, observer)


# ---------------------------------------------------------------------------------------------------------------
# Batched decode: B independent sequences, one token each (arch/batch.py)

def time_mix_batch(L: Layer, a, states, l, run):
    """time_mix for B sequences at one token each: row b of `a` belongs to states[b]."""
    obs = run.observer
    xk, xv, xr = token_mixes_rows(a, previous_rows(states, "att_x", l), L.mixes)
    r = linear_rows(L.W_r, xr, obs)
    k, v = linear_rows(L.W_k, xk, obs), linear_rows(L.W_v, xv, obs)
    wkv = np.empty_like(k)
    for b, s in enumerate(states):
        wkv4(k[b:b + 1], v[b:b + 1], L.w, L.u, s["aa"][l], s["bb"][l], s["pp"][l], wkv[b:b + 1])
    store_rows(states, "att_x", l, a)
    return linear_rows(L.W_o, sigmoid_gate(r, wkv), obs)


def channel_mix_batch(L: Layer, b, states, l, run):
    obs = run.observer
    xk, xr = token_mixes_rows(b, previous_rows(states, "ffn_x", l), L.ffn_mixes)
    hidden = relu_square(linear_rows(L.F_k, xk, obs))
    store_rows(states, "ffn_x", l, b)
    return sigmoid_gate(linear_rows(L.F_r, xr, obs), linear_rows(L.F_v, hidden, obs))


def forward_batch(W: common.Weights, tokens: np.ndarray, states: list, observer=None) -> np.ndarray:
    """One token for each of B sequences (tokens (B,), states[b] its state dict, updated in place) -> (B, V)."""
    return common.forward_batch(time_mix_batch, channel_mix_batch, W, tokens, states, observer)
