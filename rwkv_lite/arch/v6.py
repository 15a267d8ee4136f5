"""RWKV-6 ("Finch"): data-dependent token shift and decay (layouts and their tests: docs/versions.md).

Per layer l, with a = LN1(x), p = the previous token's a and d = p - a:
    x~    = a + d * maa_x
    z     = tanh(x~ . maa_w1), split into 5 blocks of D_mix      (order w, k, v, r, g)
    m_f   = z_f . maa_w2[f]                                       (C each)
    x_f   = a + d * (maa_f + m_f)                                 for f in w, k, v, r, g
    r, k, v = W_r x_r, W_k x_k, W_v x_v      g = silu(W_g x_g)    split into H heads of N channels
    delta = time_decay + tanh(x_w . decay_w1) . decay_w2          w = exp(-exp(delta))   (per token and channel)
    o     = WKV(r, k, v; w, u = time_faaaa, state S)              kernels/wkv5.py: wkv6, S[h, key, value]
    x    += W_o (GroupNorm_H(o; ln_x, eps 64e-5) * g)
    b     = LN2(x), q = previous b, d' = q - b
    x    += sigmoid(W_r' (b + d' maa_r')) * (W_v' relu(W_k' (b + d' maa_k'))^2)
logits = head(LN_out(x)).
"." is a row-vector product with a LoRA-style matrix stored (in, out): (x . M)_o = sum_i x_i M[i, o].

Our file keeps the LoRA factors as (out, in) matrices, like a linear layer's weight (role 'lora': int8 in int8/int4
files, else the file's float scheme): time_maa_w1 (5 D_mix, C), time_maa_w2_f (C, D_mix) for each f in w, k, v, r,
g (the five blocks of BlinkDL's time_maa_w2 (5, D_mix, C)), time_decay_w1 (D_dec, C), time_decay_w2 (C, D_dec).
time_decay (C) raw; `bonus` (H, N) = time_faaaa; optional time_state (H, N, N) [head][key][value]. Files written
before that hold float32 arrays in BlinkDL's orientation (role 'vector': time_maa_w1 (C, 5 D_mix), time_maa_w2
(5, D_mix, C), time_decay_w1 (C, D_dec), time_decay_w2 (D_dec, C)), still read (earlier_shapes). rwkv.cpp files store
w1/decay_w1/decay_w2 as (out, in) and maa_w2 as (5, C, D_mix).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import FormatError
from ..kernels.batched import lowrank_down_rows, lowrank_up_rows
from ..kernels.wkv5 import wkv6, wkv6_rows
from ..kernels import pointwise
from . import common
from .batch import linear_rows, previous_rows, row_addresses, store_rows
from .common import Planner, group_norm, layer_count, linear, linear_many, lora_down, lora_up, relu_square, sigmoid, silu

VERSIONS = ("6",)
LN_X_EPS = 64e-5     # reference, training code and rwkv.cpp agree for v6
MIX_ORDER = "wkvrg"  # order of the five blocks of the time_maa LoRA


@dataclass(frozen=True)
class Config(common.HeadsConfig):
    """RWKV-6: heads, plus the widths of the token-shift LoRA (d_mix per mix) and of the decay LoRA (d_decay)."""
    d_mix: int | None = None
    d_decay: int | None = None


def tensor_shapes(cfg: Config) -> dict[str, tuple[int, ...]]:
    """Every tensor of our file for this config, name -> shape (att.time_state only in state-tuned files)."""
    C, F, H, N = cfg.n_embd, cfg.ffn_size, cfg.n_head, cfg.head_size
    shapes = common.common_tensor_shapes(cfg)
    for l in range(cfg.n_layer):
        p = f"blocks.{l}."
        for f in "x" + MIX_ORDER:
            shapes[p + f"att.time_maa_{f}"] = (C,)
        shapes.update({p + "att.time_decay": (C,), p + "att.bonus": (H, N), p + "att.time_state": (H, N, N),
                       p + "att.ln_x.weight": (C,), p + "att.ln_x.bias": (C,),
                       p + "ffn.time_maa_k": (C,), p + "ffn.time_maa_r": (C,), p + "ffn.receptance.weight": (C, C)})
        if cfg.d_mix is not None:                   # LoRA factors (out, in), like the matrices
            shapes[p + "att.time_maa_w1"] = (5 * cfg.d_mix, C)
            for f in MIX_ORDER:
                shapes[p + f"att.time_maa_w2_{f}"] = (C, cfg.d_mix)
        if cfg.d_decay is not None:
            shapes[p + "att.time_decay_w1"] = (cfg.d_decay, C)
            shapes[p + "att.time_decay_w2"] = (C, cfg.d_decay)
        for m in ("receptance", "key", "value", "gate", "output"):
            shapes[p + f"att.{m}.weight"] = (C, C)
        if F is not None:
            shapes[p + "ffn.key.weight"] = (F, C)
            shapes[p + "ffn.value.weight"] = (C, F)
    return shapes


def earlier_shapes(cfg: Config) -> dict[str, tuple[int, ...]]:
    """Shapes that files written before the LoRA factors became matrices hold (role 'vector', float32, BlinkDL's
    orientation; time_maa_w2 one (5, D_mix, C) array). model.py accepts them there."""
    C, shapes = cfg.n_embd, {}
    for l in range(cfg.n_layer):
        p = f"blocks.{l}."
        if cfg.d_mix is not None:
            shapes[p + "att.time_maa_w1"] = (C, 5 * cfg.d_mix)
            shapes[p + "att.time_maa_w2"] = (5, cfg.d_mix, C)
        if cfg.d_decay is not None:
            shapes[p + "att.time_decay_w1"] = (C, cfg.d_decay)
            shapes[p + "att.time_decay_w2"] = (cfg.d_decay, C)
    return shapes


# ---------------------------------------------------------------------------------------------------------------
# Conversion: source tensors (BlinkDL names) -> the tensors of our file

def infer_config(refs: dict, version: str, source_kind: str) -> dict:
    """Model dimensions from tensor shapes (the LoRA widths from the orientation of the source)."""
    vocab_size, n_embd = refs["emb.weight"].shape
    n_head = refs["blocks.0.att.time_faaaa"].shape[0]
    dim_att = refs["blocks.0.att.key.weight"].shape[0]
    if dim_att != n_embd:
        raise FormatError(f"attention width {dim_att} != n_embd {n_embd}: not supported")
    if n_embd % n_head:
        raise FormatError(f"n_embd {n_embd} is not a multiple of the head count {n_head}")
    from_rwkv_cpp = source_kind == "rwkv_cpp"
    maa_w2 = refs["blocks.0.att.time_maa_w2"].shape              # (5, D, C); rwkv.cpp (5, C, D)
    decay_w1 = refs["blocks.0.att.time_decay_w1"].shape          # (C, D);    rwkv.cpp (D, C)
    return {
        "arch": "rwkv6", "version": "6",
        "n_layer": layer_count(refs), "n_embd": n_embd, "vocab_size": vocab_size,
        "n_head": n_head, "head_size": n_embd // n_head,
        "ffn_size": refs["blocks.0.ffn.key.weight"].shape[0],
        "ln_x_eps": LN_X_EPS,
        "d_mix": int(maa_w2[2] if from_rwkv_cpp else maa_w2[1]),
        "d_decay": int(decay_w1[0] if from_rwkv_cpp else decay_w1[1]),
    }


def plan(refs: dict, cfg: dict, source_kind: str):
    """Load-time transforms: fold ln0, squeeze, LoRA factors as (out, in) matrices (time_maa_w2 split per mix)."""
    C, H, N, F = cfg["n_embd"], cfg["n_head"], cfg["head_size"], cfg["ffn_size"]
    D, Dd = cfg["d_mix"], cfg["d_decay"]
    from_rwkv_cpp = source_kind == "rwkv_cpp"
    P = Planner(refs)
    P.embedding_with_ln0(C)
    for l in range(cfg["n_layer"]):
        p = f"blocks.{l}."
        for norm in ("ln1", "ln2"):
            P.vector(p + norm + ".weight", (C,))
            P.vector(p + norm + ".bias", (C,))
        for f in "x" + MIX_ORDER:
            P.vector(p + f"att.time_maa_{f}", (C,))
        # LoRA factors as (out, in) matrices (role 'lora'); BlinkDL stores them (in, out), rwkv.cpp (out, in)
        as_stored = (lambda a: a) if from_rwkv_cpp else (lambda a: a.T)
        for name, n_in, n_out in (("time_maa_w1", C, 5 * D), ("time_decay_w1", C, Dd), ("time_decay_w2", Dd, C)):
            P.expect_shape(p + "att." + name, (n_out, n_in) if from_rwkv_cpp else (n_in, n_out))
            P.vector(p + "att." + name, (n_out, n_in), transform=as_stored, role="lora")
        P.expect_shape(p + "att.time_maa_w2", (5, C, D) if from_rwkv_cpp else (5, D, C))
        for i, f in enumerate(MIX_ORDER):               # one up factor per mix: block i of time_maa_w2
            P.vector(p + f"att.time_maa_w2_{f}", (C, D), p + "att.time_maa_w2", source_size=5 * D * C,
                     transform=(lambda a, i=i: a[i]) if from_rwkv_cpp else (lambda a, i=i: a[i].T), role="lora")
        P.vector(p + "att.time_decay", (C,))                          # raw: the decay is computed per token
        P.vector(p + "att.bonus", (H, N), p + "att.time_faaaa")
        if P.has(p + "att.time_state"):                                # state-tuned initial state, [h][value][key]
            P.vector(p + "att.time_state", (H, N, N),
                     transform=lambda a: a.reshape(H, N, N).transpose(0, 2, 1))
        P.vector(p + "att.ln_x.weight", (C,))
        P.vector(p + "att.ln_x.bias", (C,))
        for m in ("receptance", "key", "value", "gate", "output"):
            P.matrix(p + f"att.{m}.weight", shape=(C, C))
        P.vector(p + "ffn.time_maa_k", (C,))
        P.vector(p + "ffn.time_maa_r", (C,))
        P.matrix(p + "ffn.key.weight", shape=(F, C))
        P.matrix(p + "ffn.receptance.weight", shape=(C, C))
        P.matrix(p + "ffn.value.weight", shape=(C, F))
    P.vector("ln_out.weight", (C,))
    P.vector("ln_out.bias", (C,))
    P.matrix("head.weight", shape=(cfg["vocab_size"], C))
    return P.tensors


# ---------------------------------------------------------------------------------------------------------------
# Running

STEP_FROM_SOURCE = ("wkv",)          # a single-token step reads the WKV memory from its source (common.wkv_source)


def state_shapes(cfg) -> dict[str, tuple[int, ...]]:
    """att_x, ffn_x (L, C) and wkv (L, H, N, N) in the kernel's [head][key][value] order."""
    L, C, H, N = common.dims(cfg, "n_layer", "n_embd", "n_head", "head_size")
    return {"att_x": (L, C), "ffn_x": (L, C), "wkv": (L, H, N, N)}


def init_state(cfg, store=None) -> dict[str, np.ndarray]:
    return common.wkv_state(cfg, store)


class Layer:
    """One block's weights, looked up once so the forward pass reads like the equations."""

    def __init__(self, weights, l: int, cfg: Config):
        p = f"blocks.{l}."
        v, m = weights.vector, weights.matrix
        self.ln1_w, self.ln1_b = v(p + "ln1.weight"), v(p + "ln1.bias")
        self.ln2_w, self.ln2_b = v(p + "ln2.weight"), v(p + "ln2.bias")
        self.maa_x = v(p + "att.time_maa_x")
        self.maa = [v(p + f"att.time_maa_{f}") for f in MIX_ORDER]          # w, k, v, r, g
        self.time_decay = v(p + "att.time_decay")
        # LoRA factors: matrices (role 'lora'), or an earlier file's float32 arrays in BlinkDL's orientation
        self.lora_matrices = weights.role(p + "att.time_maa_w1") == "lora"
        if self.lora_matrices:
            self.maa_w1 = m(p + "att.time_maa_w1")                          # (5 D, C)
            self.maa_up = tuple(m(p + f"att.time_maa_w2_{f}") for f in MIX_ORDER)    # (C, D) each
            self.decay_w1, self.decay_w2 = m(p + "att.time_decay_w1"), m(p + "att.time_decay_w2")
            self.d_mix = self.maa_w1.shape[0] // 5
        else:
            self.maa_w1, maa_w2 = v(p + "att.time_maa_w1"), v(p + "att.time_maa_w2")
            self.maa_up = tuple(maa_w2[f] for f in range(5))             # (D, C) each
            self.decay_w1, self.decay_w2 = v(p + "att.time_decay_w1"), v(p + "att.time_decay_w2")
            self.d_mix = self.maa_w1.shape[1] // 5
        self.bonus = v(p + "att.bonus")
        self.ln_x_w, self.ln_x_b = v(p + "att.ln_x.weight"), v(p + "att.ln_x.bias")
        self.W_r, self.W_k = m(p + "att.receptance.weight"), m(p + "att.key.weight")
        self.W_v = m(p + "att.value.weight")
        self.W_g, self.W_o = m(p + "att.gate.weight"), m(p + "att.output.weight")
        self.ffn_maa_k, self.ffn_maa_r = v(p + "ffn.time_maa_k"), v(p + "ffn.time_maa_r")
        self.F_k, self.F_v = m(p + "ffn.key.weight"), m(p + "ffn.value.weight")
        self.F_r = m(p + "ffn.receptance.weight")
        # for the compiled row kernels: mixes stacked, the token-shift LoRA's up factors one per mix
        self.maa_stack = np.stack(self.maa)
        self.maa_x_stack = self.maa_x.reshape(1, -1)
        self.ffn_mixes = np.stack([self.ffn_maa_k, self.ffn_maa_r])


def load_weights(store, cfg: Config) -> common.Weights:
    return common.Weights(store, cfg, Layer)


def time_mix(L: Layer, a, state, l, run):
    """RWKV-6 attention replacement of layer l over T tokens; updates the layer's shift and WKV state.
    One token runs without BLAS (fused projections, LoRAs in Numba's pool; see kernels/lowrank.py)."""
    cfg = run.cfg
    previous = state["att_x"][l]
    # data-dependent token shift: a LoRA of the mixed input gives each of w, k, v, r, g its own extra mix
    x = pointwise.shift_mixes(a, previous, L.maa_x_stack)[0]
    D = L.d_mix
    if L.lora_matrices:                  # (the observer watches role 'matrix' products only)
        z = np.tanh(linear(L.maa_w1, x))
        extra = np.stack(linear_many(L.maa_up, [z[:, f * D:(f + 1) * D] for f in range(5)]))    # (5, T, C)
    else:
        (z,) = lora_down((x,), (L.maa_w1,))
        z = np.tanh(z)
        extra = np.stack(lora_up([z[:, f * D:(f + 1) * D] for f in range(5)], L.maa_up))
    xw, xk, xv, xr, xg = pointwise.shift_mixes(a, previous, L.maa_stack, extra)
    r, k, v, g = linear_many((L.W_r, L.W_k, L.W_v, L.W_g), (xr, xk, xv, xg), run.observer)
    g = silu(g)
    # data-dependent decay, one per token and channel
    if L.lora_matrices:
        u = linear(L.decay_w2, np.tanh(linear(L.decay_w1, xw)))
    else:
        (h,) = lora_down((xw,), (L.decay_w1,))
        (u,) = lora_up((np.tanh(h),), (L.decay_w2,))
    w = pointwise.rwkv6_decay(L.time_decay, u)
    o = np.empty_like(r)
    wkv6(r, k, v, w, L.bonus, state["wkv"][l], o, common.wkv_source(state, l))
    y = group_norm(o, cfg.n_head, L.ln_x_w, L.ln_x_b, cfg.ln_x_eps) * g
    state["att_x"][l] = a[-1]
    return linear(L.W_o, y, run.observer)


def channel_mix(L: Layer, b, state, l, run):
    """Feed-forward of layer l over T tokens (v6 mix form b + d * maa); updates the layer's shift state."""
    xk, xr = pointwise.shift_mixes(b, state["ffn_x"][l], L.ffn_mixes)
    k, r = linear_many((L.F_k, L.F_r), (xk, xr), run.observer)
    state["ffn_x"][l] = b[-1]
    return sigmoid(r) * linear(L.F_v, relu_square(k), run.observer)


def forward(W: common.Weights, tokens: np.ndarray, state: dict, all_logits: bool, check=None,
            observer=None) -> np.ndarray:
    """Run T tokens (one chunk) through the model; returns logits (T, V) or (1, V) of the last token."""
    return common.forward(time_mix, channel_mix, W, tokens, state, all_logits, check, observer)


# ---------------------------------------------------------------------------------------------------------------
# Batched decode: B independent sequences, one token each (arch/batch.py)
#
# The big matrices are one batched product each, the LoRAs one launch for all rows (kernels/batched.py); the
# token shift runs row by row (its previous row is each sequence's own). No BLAS in a decode step; every row
# equals its sequence's own single-token decode.

def time_mix_batch(L: Layer, a, states, l, run):
    """time_mix for B sequences at one token each: row b of `a` belongs to states[b]."""
    cfg, obs = run.cfg, run.observer
    previous = previous_rows(states, "att_x", l)
    (x,) = pointwise.shift_mixes_rows(a, previous, L.maa_x_stack)
    D = L.d_mix
    if L.lora_matrices:
        z = np.tanh(linear_rows(L.maa_w1, x))
        extra = np.stack([linear_rows(F, np.ascontiguousarray(z[:, f * D:(f + 1) * D]))
                          for f, F in enumerate(L.maa_up)])                                   # (5, B, C)
    else:
        (z,) = lowrank_down_rows((x,), (L.maa_w1,))
        z = np.tanh(z)
        extra = lowrank_up_rows([z[:, f * D:(f + 1) * D] for f in range(5)], L.maa_up)
    xw, xk, xv, xr, xg = pointwise.shift_mixes_rows(a, previous, L.maa_stack, extra)
    r, k, v, g = (linear_rows(W, x, obs) for W, x in ((L.W_r, xr), (L.W_k, xk), (L.W_v, xv), (L.W_g, xg)))
    g = silu(g)
    if L.lora_matrices:
        u = linear_rows(L.decay_w2, np.tanh(linear_rows(L.decay_w1, xw)))
    else:
        (h,) = lowrank_down_rows((xw,), (L.decay_w1,))
        (u,) = lowrank_up_rows((np.tanh(h),), (L.decay_w2,))
    w = pointwise.rwkv6_decay(L.time_decay, u)
    o = np.empty_like(r)
    wkv6_rows(r, k, v, w, L.bonus, row_addresses(states, "wkv", l), o)
    y = group_norm(o, cfg.n_head, L.ln_x_w, L.ln_x_b, cfg.ln_x_eps) * g
    store_rows(states, "att_x", l, a)
    return linear_rows(L.W_o, y, obs)


def channel_mix_batch(L: Layer, b, states, l, run):
    obs = run.observer
    xk, xr = pointwise.shift_mixes_rows(b, previous_rows(states, "ffn_x", l), L.ffn_mixes)
    k, r = linear_rows(L.F_k, xk, obs), linear_rows(L.F_r, xr, obs)
    store_rows(states, "ffn_x", l, b)
    return sigmoid(r) * linear_rows(L.F_v, relu_square(k), obs)


def forward_batch(W: common.Weights, tokens: np.ndarray, states: list, observer=None) -> np.ndarray:
    """One token for each of B sequences (tokens (B,), states[b] its state dict, updated in place) -> (B, V)."""
    return common.forward_batch(time_mix_batch, channel_mix_batch, W, tokens, states, observer)
