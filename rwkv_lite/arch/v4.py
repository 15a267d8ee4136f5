"""RWKV-4: the original WKV with a numerically stable (a, b, p) state. Reference doc sections 4.1 and 4.2.

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

import numpy as np

from ..errors import FormatError
from ..kernels.wkv4 import wkv4
from .common import output_logits, Planner, layer_count, layer_norm, linear, relu_square, shifted, sigmoid, token_mix

VERSIONS = ("4",)
PP_INIT = np.float32(-1e30)     # "minus infinity" of the running maximum exponent, as the reference


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
    """The reference's load-time transforms (doc section 2): fold ln0, squeeze mixes, w = -exp(time_decay)."""
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

def init_state(cfg: dict, weights=None) -> dict[str, np.ndarray]:
    L, C = cfg["n_layer"], cfg["n_embd"]
    return {"att_x": np.zeros((L, C), np.float32),
            "aa": np.zeros((L, C), np.float32),
            "bb": np.zeros((L, C), np.float32),
            "pp": np.full((L, C), PP_INIT, np.float32),
            "ffn_x": np.zeros((L, C), np.float32)}


class Layer:
    """One block's weights, looked up once so the forward pass reads like the equations."""

    def __init__(self, weights, l: int):
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


class Weights:
    def __init__(self, weights, cfg: dict):
        self.cfg = cfg
        self.emb = weights.matrix("emb.weight")
        self.layers = [Layer(weights, l) for l in range(cfg["n_layer"])]
        self.ln_out_w, self.ln_out_b = weights.vector("ln_out.weight"), weights.vector("ln_out.bias")
        self.head = weights.matrix("head.weight")


def time_mix(L: Layer, a, state, l):
    """RWKV-4 attention replacement of layer l over T tokens; updates the layer's shift and (aa, bb, pp)."""
    p = shifted(a, state["att_x"][l])
    xk, xv, xr = token_mix(a, p, L.mix_k), token_mix(a, p, L.mix_v), token_mix(a, p, L.mix_r)
    r = sigmoid(linear(L.W_r, xr))
    k, v = linear(L.W_k, xk), linear(L.W_v, xv)
    wkv = np.empty_like(k)
    wkv4(k, v, L.w, L.u, state["aa"][l], state["bb"][l], state["pp"][l], wkv)
    state["att_x"][l] = a[-1]
    return linear(L.W_o, r * wkv)


def channel_mix(L: Layer, b, state, l):
    """Feed-forward of layer l over T tokens; updates the layer's shift state."""
    q = shifted(b, state["ffn_x"][l])
    xk, xr = token_mix(b, q, L.ffn_mix_k), token_mix(b, q, L.ffn_mix_r)
    hidden = relu_square(linear(L.F_k, xk))
    state["ffn_x"][l] = b[-1]
    return sigmoid(linear(L.F_r, xr)) * linear(L.F_v, hidden)


def forward(W: Weights, tokens: np.ndarray, state: dict, all_logits: bool, check=None) -> np.ndarray:
    """Run T tokens (one chunk) through the model; returns logits (T, V) or (1, V) of the last token."""
    x = W.emb.rows(tokens)
    for l, L in enumerate(W.layers):
        a = layer_norm(x, L.ln1_w, L.ln1_b)
        x = x + time_mix(L, a, state, l)
        b = layer_norm(x, L.ln2_w, L.ln2_b)
        x = x + channel_mix(L, b, state, l)
        if check is not None:
            check(x, l)
    return output_logits(W, x, all_logits)


# ---------------------------------------------------------------------------------------------------------------
# Batched decode: B independent sequences, one token each (arch/batch.py)

from .batch import linear_rows, previous_rows, store_rows  # noqa: E402


def time_mix_batch(L: Layer, a, states, l):
    """time_mix for B sequences at one token each: row b of `a` belongs to states[b]."""
    p = previous_rows(states, "att_x", l)
    xk, xv, xr = token_mix(a, p, L.mix_k), token_mix(a, p, L.mix_v), token_mix(a, p, L.mix_r)
    r = sigmoid(linear_rows(L.W_r, xr))
    k, v = linear_rows(L.W_k, xk), linear_rows(L.W_v, xv)
    wkv = np.empty_like(k)
    for b, s in enumerate(states):
        wkv4(k[b:b + 1], v[b:b + 1], L.w, L.u, s["aa"][l], s["bb"][l], s["pp"][l], wkv[b:b + 1])
    store_rows(states, "att_x", l, a)
    return linear_rows(L.W_o, r * wkv)


def channel_mix_batch(L: Layer, b, states, l):
    q = previous_rows(states, "ffn_x", l)
    xk, xr = token_mix(b, q, L.ffn_mix_k), token_mix(b, q, L.ffn_mix_r)
    hidden = relu_square(linear_rows(L.F_k, xk))
    store_rows(states, "ffn_x", l, b)
    return sigmoid(linear_rows(L.F_r, xr)) * linear_rows(L.F_v, hidden)


def forward_batch(W: Weights, tokens: np.ndarray, states: list) -> np.ndarray:
    """One token for each of B sequences (tokens (B,), states[b] its state dict, updated in place) -> (B, V)."""
    x = W.emb.rows(tokens)
    for l, L in enumerate(W.layers):
        a = layer_norm(x, L.ln1_w, L.ln1_b)
        x = x + time_mix_batch(L, a, states, l)
        b = layer_norm(x, L.ln2_w, L.ln2_b)
        x = x + channel_mix_batch(L, b, states, l)
    return linear_rows(W.head, layer_norm(x, W.ln_out_w, W.ln_out_b))
