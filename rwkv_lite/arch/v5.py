"""RWKV-5: versions 5.0, 5.1 and 5.2 ("Eagle"). The math of docs and reference doc section 4.3.

Per layer l, with a = LN1(x) and p = the previous token's a (token shift):
    x_m   = a * mu_m + p * (1 - mu_m)          for m in k, v, r (and g for 5.1/5.2)
    r, k, v = W_r x_r, W_k x_k, W_v x_v         split into H heads of N channels
    g     = silu(W_g x_g)                       (5.1, 5.2)
    o     = WKV(r, k, v; decay w, bonus u, state S)        kernels/wkv5.py
    x    += W_o (GroupNorm_H(o; ln_x, eps) * g)
    b     = LN2(x), q = previous b
    x    += sigmoid(W_r' (b mu_r + q (1-mu_r))) * (W_v' relu(W_k' (b mu_k + q (1-mu_k)))^2)
logits = head(LN_out(x)).

5.0 has no gate and one decay/bonus per head; 5.1 adds the gate; 5.2 has a decay and bonus per channel. In our file
all three store `decay` = exp(-exp(time_decay)) and `bonus` as (H, N) arrays, so one kernel serves them all.
"""
from __future__ import annotations

import numpy as np

from ..errors import FormatError
from ..kernels.wkv5 import wkv5
from .common import (output_logits, PlannedTensor, group_norm, layer_norm, linear, linear_many, relu_square, shifted, sigmoid, silu,
                     streamed, token_mix, whole)

VERSIONS = ("5.0", "5.1", "5.2")
DEFAULT_LN_X_EPS = 64e-5     # reference and training code: GroupNorm(x / 8, eps 1e-5) == GroupNorm(x, eps 64e-5)
RWKV_CPP_LN_X_EPS = 1e-5     # what rwkv.cpp's v5 graph computes (its tiny fixtures need it)


# ---------------------------------------------------------------------------------------------------------------
# Conversion: source tensors (BlinkDL names) -> the tensors of our file

def infer_config(refs: dict, version: str, source_kind: str) -> dict:
    """Model dimensions from tensor shapes."""
    emb = refs["emb.weight"]
    vocab_size, n_embd = emb.shape
    n_layer = 1 + max(int(name.split(".")[1]) for name in refs if name.startswith("blocks."))
    if version == "5.2":
        n_head = refs["blocks.0.att.time_faaaa"].shape[0]
    else:
        n_head = refs["blocks.0.att.time_decay"].shape[0]
    dim_att = refs["blocks.0.att.key.weight"].shape[0]
    if dim_att != n_embd:
        raise FormatError(f"attention width {dim_att} != n_embd {n_embd}: not supported")
    if n_embd % n_head:
        raise FormatError(f"n_embd {n_embd} is not a multiple of the head count {n_head}")
    return {
        "arch": f"rwkv{version}", "version": version,
        "n_layer": n_layer, "n_embd": n_embd, "vocab_size": vocab_size,
        "n_head": n_head, "head_size": n_embd // n_head,
        "ffn_size": refs["blocks.0.ffn.key.weight"].shape[0],
        "ln_x_eps": RWKV_CPP_LN_X_EPS if source_kind == "rwkv_cpp" else DEFAULT_LN_X_EPS,
    }


def plan(refs: dict, cfg: dict, source_kind: str) -> list[PlannedTensor]:
    """The load-time transforms of reference doc section 2, applied once at conversion."""
    C, H, N = cfg["n_embd"], cfg["n_head"], cfg["head_size"]
    version = cfg["version"]
    from_rwkv_cpp = source_kind == "rwkv_cpp"      # rwkv.cpp files hold decay/bonus already transformed
    out: list[PlannedTensor] = []

    def vector(name, src, shape, transform=None):
        if src not in refs:
            raise FormatError(f"missing tensor {src}")
        out.append(PlannedTensor(name, shape, "vector", whole(refs[src], transform)))

    def matrix(name, role="matrix"):
        if name not in refs:
            raise FormatError(f"missing tensor {name}")
        out.append(PlannedTensor(name, tuple(refs[name].shape), role, streamed(refs[name])))

    # Embedding with ln0 folded in (float32, row block by row block, even for bf16 sources).
    ln0_w, ln0_b = refs.get("blocks.0.ln0.weight"), refs.get("blocks.0.ln0.bias")
    fold = None
    if ln0_w is not None:
        w0 = np.asarray(ln0_w.load(), np.float32).reshape(C)
        b0 = np.asarray(ln0_b.load(), np.float32).reshape(C)
        fold = lambda rows: layer_norm(rows, w0, b0)   # noqa: E731
    out.append(PlannedTensor("emb.weight", tuple(refs["emb.weight"].shape), "embedding",
                             streamed(refs["emb.weight"], fold)))

    flat = lambda a: a.reshape(C)                      # noqa: E731  (1,1,C) -> (C)
    for l in range(cfg["n_layer"]):
        p = f"blocks.{l}."
        for norm in ("ln1", "ln2"):
            vector(p + norm + ".weight", p + norm + ".weight", (C,), flat)
            vector(p + norm + ".bias", p + norm + ".bias", (C,), flat)
        mixes = "kvrg" if version != "5.0" else "kvr"
        for m in mixes:
            vector(p + f"att.time_mix_{m}", p + f"att.time_mix_{m}", (C,), flat)

        td = p + "att.time_decay"
        if from_rwkv_cpp:                                    # stored as exp(-exp(time_decay))
            decay = lambda a: np.broadcast_to(a.reshape(H, -1), (H, N)).copy()  # noqa: E731
        else:
            decay = lambda a: np.broadcast_to(np.exp(-np.exp(a.reshape(H, -1))), (H, N)).copy()  # noqa: E731
        vector(p + "att.decay", td, (H, N), decay)

        if p + "att.time_faaaa" in refs:                     # bonus used as stored
            vector(p + "att.bonus", p + "att.time_faaaa", (H, N),
                   lambda a: np.broadcast_to(a.reshape(H, -1), (H, N)).copy())
        elif p + "att.time_first" in refs:                   # log-domain bonus (v5.0); rwkv.cpp stores exp() of it
            if from_rwkv_cpp:
                bonus = lambda a: np.broadcast_to(a.reshape(H, -1), (H, N)).copy()  # noqa: E731
            else:
                bonus = lambda a: np.broadcast_to(np.exp(a.reshape(H, -1)), (H, N)).copy()  # noqa: E731
            vector(p + "att.bonus", p + "att.time_first", (H, N), bonus)
        else:
            raise FormatError(f"missing tensor {p}att.time_faaaa (or time_first)")

        if p + "att.time_state" in refs:                     # state-tuned initial state; file is [h][value][key]
            vector(p + "att.time_state", p + "att.time_state", (H, N, N),
                   lambda a: np.ascontiguousarray(a.reshape(H, N, N).transpose(0, 2, 1)))
        vector(p + "att.ln_x.weight", p + "att.ln_x.weight", (C,), flat)
        vector(p + "att.ln_x.bias", p + "att.ln_x.bias", (C,), flat)
        for m in ("receptance", "key", "value") + (("gate",) if version != "5.0" else ()) + ("output",):
            matrix(p + f"att.{m}.weight")
        vector(p + "ffn.time_mix_k", p + "ffn.time_mix_k", (C,), flat)
        vector(p + "ffn.time_mix_r", p + "ffn.time_mix_r", (C,), flat)
        for m in ("key", "receptance", "value"):
            matrix(p + f"ffn.{m}.weight")

    vector("ln_out.weight", "ln_out.weight", (C,), flat)
    vector("ln_out.bias", "ln_out.bias", (C,), flat)
    matrix("head.weight")
    return out


# ---------------------------------------------------------------------------------------------------------------
# Running

def init_state(cfg: dict, weights=None) -> dict[str, np.ndarray]:
    L, C, H, N = cfg["n_layer"], cfg["n_embd"], cfg["n_head"], cfg["head_size"]
    wkv = np.zeros((L, H, N, N), np.float32)
    if weights is not None:
        for l in range(L):
            if weights.has(f"blocks.{l}.att.time_state"):
                wkv[l] = weights.vector(f"blocks.{l}.att.time_state")
    return {"att_x": np.zeros((L, C), np.float32), "ffn_x": np.zeros((L, C), np.float32), "wkv": wkv}


class Layer:
    """One block's weights, looked up once so the forward pass reads like the equations."""

    def __init__(self, weights, l: int, version: str):
        p = f"blocks.{l}."
        v, m = weights.vector, weights.matrix
        self.ln1_w, self.ln1_b = v(p + "ln1.weight"), v(p + "ln1.bias")
        self.ln2_w, self.ln2_b = v(p + "ln2.weight"), v(p + "ln2.bias")
        self.mix_k, self.mix_v, self.mix_r = v(p + "att.time_mix_k"), v(p + "att.time_mix_v"), v(p + "att.time_mix_r")
        self.has_gate = version != "5.0"
        self.mix_g = v(p + "att.time_mix_g") if self.has_gate else None
        self.decay, self.bonus = v(p + "att.decay"), v(p + "att.bonus")
        self.ln_x_w, self.ln_x_b = v(p + "att.ln_x.weight"), v(p + "att.ln_x.bias")
        self.W_r, self.W_k, self.W_v = m(p + "att.receptance.weight"), m(p + "att.key.weight"), m(p + "att.value.weight")
        self.W_g = m(p + "att.gate.weight") if self.has_gate else None
        self.W_o = m(p + "att.output.weight")
        self.ffn_mix_k, self.ffn_mix_r = v(p + "ffn.time_mix_k"), v(p + "ffn.time_mix_r")
        self.F_k, self.F_r, self.F_v = m(p + "ffn.key.weight"), m(p + "ffn.receptance.weight"), m(p + "ffn.value.weight")


class Weights:
    def __init__(self, weights, cfg: dict):
        self.cfg = cfg
        self.emb = weights.matrix("emb.weight")
        self.layers = [Layer(weights, l, cfg["version"]) for l in range(cfg["n_layer"])]
        self.ln_out_w, self.ln_out_b = weights.vector("ln_out.weight"), weights.vector("ln_out.bias")
        self.head = weights.matrix("head.weight")


def time_mix(L: Layer, a, state, l, cfg):
    """Attention replacement of layer l over T tokens; updates the layer's shift and WKV state."""
    p = shifted(a, state["att_x"][l])
    xk, xv, xr = token_mix(a, p, L.mix_k), token_mix(a, p, L.mix_v), token_mix(a, p, L.mix_r)
    if L.has_gate:
        r, k, v, g = linear_many((L.W_r, L.W_k, L.W_v, L.W_g), (xr, xk, xv, token_mix(a, p, L.mix_g)))
    else:
        r, k, v = linear_many((L.W_r, L.W_k, L.W_v), (xr, xk, xv))
    o = np.empty_like(r)
    wkv5(r, k, v, L.decay, L.bonus, state["wkv"][l], o)
    y = group_norm(o, cfg["n_head"], L.ln_x_w, L.ln_x_b, cfg["ln_x_eps"])
    if L.has_gate:
        y = y * silu(g)
    state["att_x"][l] = a[-1]
    return linear(L.W_o, y)


def channel_mix(L: Layer, b, state, l):
    """Feed-forward of layer l over T tokens; updates the layer's shift state."""
    q = shifted(b, state["ffn_x"][l])
    xk, xr = token_mix(b, q, L.ffn_mix_k), token_mix(b, q, L.ffn_mix_r)
    k, r = linear_many((L.F_k, L.F_r), (xk, xr))
    state["ffn_x"][l] = b[-1]
    return sigmoid(r) * linear(L.F_v, relu_square(k))


def forward(W: Weights, tokens: np.ndarray, state: dict, all_logits: bool, check=None) -> np.ndarray:
    """Run T tokens (one chunk) through the model; returns logits (T, V) or (1, V) of the last token."""
    cfg = W.cfg
    x = W.emb.rows(tokens)
    for l, L in enumerate(W.layers):
        a = layer_norm(x, L.ln1_w, L.ln1_b)
        x = x + time_mix(L, a, state, l, cfg)
        b = layer_norm(x, L.ln2_w, L.ln2_b)
        x = x + channel_mix(L, b, state, l)
        if check is not None:
            check(x, l)
    return output_logits(W, x, all_logits)


# ---------------------------------------------------------------------------------------------------------------
# Batched decode: B independent sequences, one token each (arch/batch.py)

from .batch import linear_rows, previous_rows, store_rows  # noqa: E402


def time_mix_batch(L: Layer, a, states, l, cfg):
    """time_mix for B sequences at one token each: row b of `a` belongs to states[b]."""
    p = previous_rows(states, "att_x", l)
    xk, xv, xr = token_mix(a, p, L.mix_k), token_mix(a, p, L.mix_v), token_mix(a, p, L.mix_r)
    r, k, v = linear_rows(L.W_r, xr), linear_rows(L.W_k, xk), linear_rows(L.W_v, xv)
    o = np.empty_like(r)
    for b, s in enumerate(states):
        wkv5(r[b:b + 1], k[b:b + 1], v[b:b + 1], L.decay, L.bonus, s["wkv"][l], o[b:b + 1])
    y = group_norm(o, cfg["n_head"], L.ln_x_w, L.ln_x_b, cfg["ln_x_eps"])
    if L.has_gate:
        y = y * silu(linear_rows(L.W_g, token_mix(a, p, L.mix_g)))
    store_rows(states, "att_x", l, a)
    return linear_rows(L.W_o, y)


def channel_mix_batch(L: Layer, b, states, l):
    q = previous_rows(states, "ffn_x", l)
    xk, xr = token_mix(b, q, L.ffn_mix_k), token_mix(b, q, L.ffn_mix_r)
    k, r = linear_rows(L.F_k, xk), linear_rows(L.F_r, xr)
    store_rows(states, "ffn_x", l, b)
    return sigmoid(r) * linear_rows(L.F_v, relu_square(k))


def forward_batch(W: Weights, tokens: np.ndarray, states: list) -> np.ndarray:
    """One token for each of B sequences (tokens (B,), states[b] its state dict, updated in place) -> (B, V)."""
    cfg = W.cfg
    x = W.emb.rows(tokens)
    for l, L in enumerate(W.layers):
        a = layer_norm(x, L.ln1_w, L.ln1_b)
        x = x + time_mix_batch(L, a, states, l, cfg)
        b = layer_norm(x, L.ln2_w, L.ln2_b)
        x = x + channel_mix_batch(L, b, states, l)
    return linear_rows(W.head, layer_norm(x, W.ln_out_w, W.ln_out_b))
