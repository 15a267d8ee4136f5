"""RWKV-5: versions 5.0, 5.1 and 5.2 ("Eagle") (layouts and their tests: docs/versions.md).

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

from dataclasses import dataclass

import numpy as np

from ..errors import FormatError
from ..kernels.threads import get_threads
from ..kernels.token_blocks import rwkv5_block_rows, rwkv5_block_token
from ..kernels.wkv5 import wkv5, wkv5_rows
from ..schemes.panel import PanelMatrix
from . import common
from .batch import BatchStates, linear_rows, previous_rows, row_addresses, store_rows
from .common import (Planner, group_norm, layer_count, linear, linear_many, relu_square, sigmoid_gate, silu_gate,
                     token_mixes, token_mixes_rows)

VERSIONS = ("5.0", "5.1", "5.2")
DEFAULT_LN_X_EPS = 64e-5     # reference and training code: GroupNorm(x / 8, eps 1e-5) == GroupNorm(x, eps 64e-5)
RWKV_CPP_LN_X_EPS = 1e-5     # what rwkv.cpp's v5 graph computes (its tiny fixtures need it)


@dataclass(frozen=True)
class Config(common.HeadsConfig):
    """RWKV-5.x: version "5.0" (no gate), "5.1" or "5.2"; heads of head_size channels."""

    @property
    def has_gate(self) -> bool:
        return self.version != "5.0"


def tensor_shapes(cfg: Config) -> dict[str, tuple[int, ...]]:
    """Every tensor of our file for this config, name -> shape (att.time_state only in state-tuned files)."""
    C, F, H, N = cfg.n_embd, cfg.ffn_size, cfg.n_head, cfg.head_size
    shapes = common.common_tensor_shapes(cfg)
    for l in range(cfg.n_layer):
        p = f"blocks.{l}."
        for m in "kvrg" if cfg.has_gate else "kvr":
            shapes[p + f"att.time_mix_{m}"] = (C,)
        shapes.update({p + "att.decay": (H, N), p + "att.bonus": (H, N), p + "att.time_state": (H, N, N),
                       p + "att.ln_x.weight": (C,), p + "att.ln_x.bias": (C,),
                       p + "ffn.time_mix_k": (C,), p + "ffn.time_mix_r": (C,), p + "ffn.receptance.weight": (C, C)})
        for m in ("receptance", "key", "value") + (("gate",) if cfg.has_gate else ()) + ("output",):
            shapes[p + f"att.{m}.weight"] = (C, C)
        if F is not None:
            shapes[p + "ffn.key.weight"] = (F, C)
            shapes[p + "ffn.value.weight"] = (C, F)
    return shapes


# ---------------------------------------------------------------------------------------------------------------
# Conversion: source tensors (BlinkDL names) -> the tensors of our file

def infer_config(refs: dict, version: str, source_kind: str) -> dict:
    """Model dimensions from tensor shapes."""
    emb = refs["emb.weight"]
    vocab_size, n_embd = emb.shape
    n_layer = layer_count(refs)
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


def plan(refs: dict, cfg: dict, source_kind: str):
    """The load-time transforms of the reference: fold ln0 into the embedding, squeeze, and store decay =
    exp(-exp(time_decay)) and bonus as (H, N) whatever the sub-version's per-head or per-channel source."""
    C, H, N = cfg["n_embd"], cfg["n_head"], cfg["head_size"]
    version = cfg["version"]
    from_rwkv_cpp = source_kind == "rwkv_cpp"      # rwkv.cpp files hold decay/bonus already transformed
    P = Planner(refs)
    P.embedding_with_ln0(C)
    per_head_or_channel = (H, H * N)                  # source sizes of decay / bonus: 5.0 and 5.1 per head

    def heads(a):                                     # (H,) or (H, N) (or rwkv.cpp's (H, N, 1)) -> (H, N)
        return np.broadcast_to(a.reshape(H, -1), (H, N)).copy()

    for l in range(cfg["n_layer"]):
        p = f"blocks.{l}."
        for norm in ("ln1", "ln2"):
            P.vector(p + norm + ".weight", (C,))
            P.vector(p + norm + ".bias", (C,))
        for m in "kvrg" if version != "5.0" else "kvr":
            P.vector(p + f"att.time_mix_{m}", (C,))
        if from_rwkv_cpp:                                    # stored as exp(-exp(time_decay))
            decay = heads
        else:
            decay = lambda a: heads(np.exp(-np.exp(a)))      # noqa: E731
        P.vector(p + "att.decay", (H, N), p + "att.time_decay", decay, source_size=per_head_or_channel)
        if P.has(p + "att.time_faaaa"):                      # bonus used as stored
            P.vector(p + "att.bonus", (H, N), p + "att.time_faaaa", heads, source_size=per_head_or_channel)
        elif P.has(p + "att.time_first"):                    # log-domain bonus (v5.0); rwkv.cpp stores exp() of it
            bonus = heads if from_rwkv_cpp else (lambda a: heads(np.exp(a)))
            P.vector(p + "att.bonus", (H, N), p + "att.time_first", bonus, source_size=per_head_or_channel)
        else:
            raise FormatError(f"missing tensor {p}att.time_faaaa (or time_first)")
        if P.has(p + "att.time_state"):                      # state-tuned initial state; file is [h][value][key]
            P.vector(p + "att.time_state", (H, N, N),
                     transform=lambda a: np.ascontiguousarray(a.reshape(H, N, N).transpose(0, 2, 1)))
        P.vector(p + "att.ln_x.weight", (C,))
        P.vector(p + "att.ln_x.bias", (C,))
        for m in ("receptance", "key", "value") + (("gate",) if version != "5.0" else ()) + ("output",):
            P.matrix(p + f"att.{m}.weight")
        P.vector(p + "ffn.time_mix_k", (C,))
        P.vector(p + "ffn.time_mix_r", (C,))
        for m in ("key", "receptance", "value"):
            P.matrix(p + f"ffn.{m}.weight")
    P.vector("ln_out.weight", (C,))
    P.vector("ln_out.bias", (C,))
    P.matrix("head.weight")
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
        self.mix_k, self.mix_v, self.mix_r = v(p + "att.time_mix_k"), v(p + "att.time_mix_v"), v(p + "att.time_mix_r")
        self.has_gate = cfg.has_gate
        self.mix_g = v(p + "att.time_mix_g") if self.has_gate else None
        self.decay, self.bonus = v(p + "att.decay"), v(p + "att.bonus")
        self.ln_x_w, self.ln_x_b = v(p + "att.ln_x.weight"), v(p + "att.ln_x.bias")
        self.W_r, self.W_k, self.W_v = m(p + "att.receptance.weight"), m(p + "att.key.weight"), m(p + "att.value.weight")
        self.W_g = m(p + "att.gate.weight") if self.has_gate else None
        self.W_o = m(p + "att.output.weight")
        self.ffn_mix_k, self.ffn_mix_r = v(p + "ffn.time_mix_k"), v(p + "ffn.time_mix_r")
        self.F_k, self.F_r, self.F_v = m(p + "ffn.key.weight"), m(p + "ffn.receptance.weight"), m(p + "ffn.value.weight")
        # the token-shift mixes stacked for one kernel call each: r, k, v[, g] and k, r
        self.mixes = np.stack([self.mix_r, self.mix_k, self.mix_v] + ([self.mix_g] if self.has_gate else []))
        self.ffn_mixes = np.stack([self.ffn_mix_k, self.ffn_mix_r])
        self.block_token = _block_token_args(self, cfg)
        self.block_rows = None if self.block_token is None else _block_rows_args(self, cfg)


def _block_token_args(L: Layer, cfg: Config):
    """The weights' arguments of kernels/token_blocks.rwkv5_block_token (the whole block for one token in one
    compiled call), or None where it does not cover this block: a product not a panel-layout matrix, or the
    projections that share a launch not of one scheme and width."""
    C = cfg.n_embd
    att = (L.W_r, L.W_k, L.W_v) + ((L.W_g,) if L.has_gate else ())
    kr = (L.F_k, L.F_r)
    if not all(isinstance(m, PanelMatrix) for m in (*att, *kr, L.W_o, L.F_v)):
        return None
    if len({(m.int8, m.shape, m.padded_cols) for m in att}) != 1 or att[0].shape != (C, C) or L.W_o.shape != (C, C):
        return None
    if len({(m.int8, m.shape[1], m.padded_cols) for m in kr}) != 1 or L.F_r.shape != (C, C):
        return None
    o, fv = L.W_o, L.F_v
    return (np.float64(common.LN_EPS), L.ln1_w, L.ln1_b, L.mixes, C, L.has_gate,
            att[0].int8, tuple(m.wp for m in att), tuple(m.words for m in att), att[0].padded_cols,
            np.array([m.npanels for m in att], np.int64),
            L.decay, L.bonus, cfg.n_head, L.ln_x_w, L.ln_x_b, float(cfg.ln_x_eps),
            o.int8, o.wp, o.words, o.padded_cols, o.parallel,
            L.ln2_w, L.ln2_b, L.ffn_mixes,
            L.F_k.int8, tuple(m.wp for m in kr), tuple(m.words for m in kr), L.F_k.padded_cols,
            np.array([m.npanels for m in kr], np.int64), L.F_k.shape[0],
            fv.int8, fv.wp, fv.words, fv.padded_cols, fv.parallel)


def _block_rows_args(L: Layer, cfg: Config):
    """The weights' arguments of kernels/token_blocks.rwkv5_block_rows (a batched step's block in one call), for a
    block that rwkv5_block_token covers."""
    att = (L.W_r, L.W_k, L.W_v)
    g = L.W_g if L.has_gate else L.W_r              # (not read without a gate)
    kr, o, fv = (L.F_k, L.F_r), L.W_o, L.F_v
    return (np.float64(common.LN_EPS), L.ln1_w, L.ln1_b, L.mixes, cfg.n_embd, L.has_gate,
            att[0].int8, tuple(m.wp for m in att), tuple(m.words for m in att), att[0].padded_cols, g.wp, g.words,
            L.decay, L.bonus, cfg.n_head, L.ln_x_w, L.ln_x_b, float(cfg.ln_x_eps),
            o.int8, o.wp, o.words, o.padded_cols,
            L.ln2_w, L.ln2_b, L.ffn_mixes,
            L.F_k.int8, tuple(m.wp for m in kr), tuple(m.words for m in kr), L.F_k.padded_cols, L.F_k.shape[0],
            fv.int8, fv.wp, fv.words, fv.padded_cols)


def load_weights(store, cfg: Config) -> common.Weights:
    W = common.Weights(store, cfg, Layer)
    W.block_token = all(L.block_token is not None for L in W.layers)
    return W


def time_mix(L: Layer, a, state, l, run):
    """Attention replacement of layer l over T tokens; updates the layer's shift and WKV state."""
    cfg = run.cfg
    xr, xk, xv, *xg = token_mixes(a, state["att_x"][l], L.mixes)
    if L.has_gate:
        r, k, v, g = linear_many((L.W_r, L.W_k, L.W_v, L.W_g), (xr, xk, xv, xg[0]), run.observer)
    else:
        r, k, v = linear_many((L.W_r, L.W_k, L.W_v), (xr, xk, xv), run.observer)
    o = np.empty_like(r)
    wkv5(r, k, v, L.decay, L.bonus, state["wkv"][l], o, common.wkv_source(state, l))
    y = group_norm(o, cfg.n_head, L.ln_x_w, L.ln_x_b, cfg.ln_x_eps)
    if L.has_gate:
        y = silu_gate(y, g)
    state["att_x"][l] = a[-1]
    return linear(L.W_o, y, run.observer)


def channel_mix(L: Layer, b, state, l, run):
    """Feed-forward of layer l over T tokens; updates the layer's shift state."""
    xk, xr = token_mixes(b, state["ffn_x"][l], L.ffn_mixes)
    k, r = linear_many((L.F_k, L.F_r), (xk, xr), run.observer)
    state["ffn_x"][l] = b[-1]
    return sigmoid_gate(r, linear(L.F_v, relu_square(k), run.observer))


def forward(W: common.Weights, tokens: np.ndarray, state: dict, all_logits: bool, check=None,
            observer=None) -> np.ndarray:
    """Run T tokens (one chunk) through the model; returns logits (T, V) or (1, V) of the last token."""
    if len(tokens) == 1 and observer is None and W.block_token:
        return _forward_token(W, tokens, state, all_logits, check)
    return common.forward(time_mix, channel_mix, W, tokens, state, all_logits, check, observer)


def _forward_token(W: common.Weights, tokens, state: dict, all_logits: bool, check=None) -> np.ndarray:
    """forward() of one token with each block one compiled call (kernels/token_blocks.py): the same bits as
    time_mix and channel_mix, without ~10 trips between Python and Numba per block."""
    x = W.emb.rows(tokens)
    threads = get_threads()
    att_x, ffn_x, wkv = state["att_x"], state["ffn_x"], state["wkv"]
    source = state.get("wkv" + common.SOURCE)
    for l, L in enumerate(W.layers):
        x = rwkv5_block_token(x, threads, att_x[l], ffn_x[l], wkv[l], wkv[l] if source is None else source[l],
                              source is not None, *L.block_token)
        if check is not None:
            check(x, l)
    return common.output_logits(W, x, all_logits)


# ---------------------------------------------------------------------------------------------------------------
# Batched decode: B independent sequences, one token each (arch/batch.py)

def time_mix_batch(L: Layer, a, states, l, run):
    """time_mix for B sequences at one token each: row b of `a` belongs to states[b]."""
    cfg, obs = run.cfg, run.observer
    xr, xk, xv, *xg = token_mixes_rows(a, previous_rows(states, "att_x", l), L.mixes)
    r, k, v = linear_rows(L.W_r, xr, obs), linear_rows(L.W_k, xk, obs), linear_rows(L.W_v, xv, obs)
    o = np.empty_like(r)
    wkv5_rows(r, k, v, L.decay, L.bonus, row_addresses(states, "wkv", l), o)
    y = group_norm(o, cfg.n_head, L.ln_x_w, L.ln_x_b, cfg.ln_x_eps)
    if L.has_gate:
        y = silu_gate(y, linear_rows(L.W_g, xg[0], obs))
    store_rows(states, "att_x", l, a)
    return linear_rows(L.W_o, y, obs)


def channel_mix_batch(L: Layer, b, states, l, run):
    obs = run.observer
    xk, xr = token_mixes_rows(b, previous_rows(states, "ffn_x", l), L.ffn_mixes)
    k, r = linear_rows(L.F_k, xk, obs), linear_rows(L.F_r, xr, obs)
    store_rows(states, "ffn_x", l, b)
    return sigmoid_gate(r, linear_rows(L.F_v, relu_square(k), obs))


def forward_batch(W: common.Weights, tokens: np.ndarray, states: list, observer=None) -> np.ndarray:
    """One token for each of B sequences (tokens (B,), states[b] its state dict, updated in place) -> (B, V)."""
    if observer is None and W.block_token:
        return _forward_rows(W, tokens, states)
    return common.forward_batch(time_mix_batch, channel_mix_batch, W, tokens, states, observer)


def _forward_rows(W: common.Weights, tokens, states: list) -> np.ndarray:
    """forward_batch() with each block one compiled call (kernels/token_blocks.rwkv5_block_rows): the same bits
    as time_mix_batch and channel_mix_batch."""
    rows = BatchStates(states)
    x = W.emb.rows(tokens)
    threads = get_threads()
    for l, L in enumerate(W.layers):
        x = rwkv5_block_rows(x, threads, row_addresses(rows, "att_x", l), row_addresses(rows, "ffn_x", l),
                             row_addresses(rows, "wkv", l), *L.block_rows)
    return linear_rows(W.head, common.layer_norm(x, W.ln_out_w, W.ln_out_b))
