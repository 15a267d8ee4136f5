"""RWKV-7 ("Goose"): the generalised delta rule with a value residual (layouts and tests: docs/versions.md).

Per layer l, with a = LN1(x), p = the previous token's a and d = p - a:
    x_f   = a + d * mu_f                                   for f in r, w, k, v, a, g
    r, k, v = W_r x_r, W_k x_k, W_v x_v                    split into H heads of N channels
    w     = exp(-0.606531 * sigmoid(w0 + tanh(x_w . w1) . w2))      decay in (0.545, 1), per token and channel
    alpha = sigmoid(a0 + (x_a . a1) . a2)                  in-context learning rate
    gate  = sigmoid(x_g . g1) . g2
    kappa = normalise_per_head(k * k_k)                    the key the memory is addressed by
    k~    = k * (1 + (alpha - 1) * k_a)
    v~    = v                                     layer 0 (and v_first = v, the value residual of this token)
          = v + (v_first - v) * sigmoid(v0 + (x_v . v1) . v2)        layers >= 1
    S     <- S diag(w) - (S kappa)(kappa * alpha)^T + v~ k~^T         kernels/wkv7.py, S[h, value, key]
    o     = S r                                            (new state)
    y     = GroupNorm_H(o; ln_x, eps 64e-5) + (sum_{j in head} r_j k~_j r_k[j]) * v~_head
    x    += W_o (y * gate)
    b     = LN2(x), q = previous b
    x    += W_v' relu(W_k' (b + (q - b) * mu_k'))^2                      (no receptance)
logits = head(LN_out(x)).
"." is a row-vector product with a LoRA matrix stored (in, out). v_first is per token, not state.

Our file keeps the mixes x_r ... x_g, w0, a0, v0, k_k, k_a (C) and r_k (H, N) in float32; the LoRA factors w1, w2,
a1, a2, v1, v2, g1, g2 as (out, in) matrices (role 'lora': int8 in int8/int4 files, else the file's float scheme;
files written before the panel layout hold them as float32 (in, out) arrays, role 'vector', still read); layer 0
has no v0/v1/v2 (unused there).
rwkv.cpp files concatenate the six mixes into x_rwkvag (6, 1, C) and store the LoRA matrices transposed.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import FormatError
from ..kernels.batched import lowrank_down_rows, lowrank_up_rows
from ..kernels.linear import chain_runner
from ..kernels.threads import get_threads
from ..kernels.token_blocks import rwkv7_block_rows, rwkv7_block_token
from ..kernels.wkv7 import rwkv7_token, wkv7
from ..schemes.panel import ChainLaunch, PanelMatrix
from ..kernels import pointwise
from . import common
from .batch import BatchStates, linear_rows, per_row, previous_rows, row_addresses, store_rows
from .common import (Planner, PlannedTensor, layer_count, layer_norm, linear, linear_many, lora_down, lora_up,
                     relu_square, sigmoid, tanh)

VERSIONS = ("7",)
LN_X_EPS = 64e-5                       # reference, training code and rwkv.cpp agree for v7
DECAY_SCALE = np.float32(-0.606531)    # -exp(-1/2), as the reference writes it
NORM_FLOOR = np.float32(1e-12)         # F.normalize's eps
STEP_FROM_SOURCE = ("wkv",)            # a single-token step reads the WKV memory from its source (common.wkv_source)
MIXES = "rwkvag"                       # the token-shift mixes, in rwkv.cpp's x_rwkvag order
LORAS = "wavg"                         # decay, in-context learning rate, value residual, gate


@dataclass(frozen=True)
class Config(common.HeadsConfig):
    """RWKV-7: heads, the LoRA widths d_w, d_a, d_v, d_g, and d_de for a DeepEmbed file (None otherwise)."""
    d_w: int | None = None
    d_a: int | None = None
    d_v: int | None = None
    d_g: int | None = None
    d_de: int | None = None


def tensor_shapes(cfg: Config) -> dict[str, tuple[int, ...]]:
    """Every tensor of our file for this config, name -> shape (att.time_state only in state-tuned files; layer 0
    has no value-residual tensors v0, v1, v2)."""
    C, F, H, N, V = cfg.n_embd, cfg.ffn_size, cfg.n_head, cfg.head_size, cfg.vocab_size
    shapes = common.common_tensor_shapes(cfg)
    for l in range(cfg.n_layer):
        p = f"blocks.{l}."
        for f in MIXES:
            shapes[p + f"att.x_{f}"] = (C,)
        for f in LORAS:
            if f == "v" and l == 0:
                continue
            if f != "g":
                shapes[p + f"att.{f}0"] = (C,)
            D = getattr(cfg, f"d_{f}")
            if D is not None:                      # LoRA factors (out, in), like the matrices
                shapes[p + f"att.{f}1"] = (D, C)
                shapes[p + f"att.{f}2"] = (C, D)
        shapes.update({p + "att.k_k": (C,), p + "att.k_a": (C,), p + "att.r_k": (H, N), p + "att.time_state": (H, N, N),
                       p + "att.ln_x.weight": (C,), p + "att.ln_x.bias": (C,), p + "ffn.x_k": (C,)})
        for m in ("receptance", "key", "value", "output"):
            shapes[p + f"att.{m}.weight"] = (C, C)
        if F is not None:
            shapes[p + "ffn.key.weight"] = (F, C)
            shapes[p + "ffn.value.weight"] = (C, F)
        D = cfg.d_de
        if D is not None and F is not None:
            shapes.update({p + "ffn.s_emb.weight": (V, D * D), p + "ffn.s1": (C, D), p + "ffn.s2": (D, F),
                           p + "ffn.s0": (F,)})
    return shapes


def earlier_shapes(cfg: Config) -> dict[str, tuple[int, ...]]:
    """Shapes that files written before the panel layout hold for some tensors (role 'vector'): the LoRA factors in
    float32 (in, out) orientation. model.py accepts them there."""
    return {name: shape[::-1] for name, shape in tensor_shapes(cfg).items()
            if name.rsplit(".", 1)[-1] in {f + i for f in LORAS for i in "12"}}


# ---------------------------------------------------------------------------------------------------------------
# Conversion: source tensors (BlinkDL names) -> the tensors of our file

def infer_config(refs: dict, version: str, source_kind: str) -> dict:
    """Model dimensions from tensor shapes (the LoRA widths from the orientation of the source)."""
    vocab_size, n_embd = refs["emb.weight"].shape
    r_k = refs["blocks.0.att.r_k"].shape
    n_head = r_k[0]
    dim_att = refs["blocks.0.att.key.weight"].shape[0]
    if dim_att != n_embd:
        raise FormatError(f"attention width {dim_att} != n_embd {n_embd}: not supported")
    if len(r_k) != 2 or r_k[0] * r_k[1] != n_embd:
        raise FormatError(f"blocks.0.att.r_k has shape {list(r_k)}, expected (n_head, head_size) with "
                          f"n_head * head_size = {n_embd}")
    n_layer = layer_count(refs)
    lora_in = 0 if source_kind == "rwkv_cpp" else 1           # axis of the LoRA width in w1 (C, D) / (D, C)

    def width(name):
        return int(refs[name].shape[lora_in]) if name in refs else 0
    return {
        "arch": "rwkv7", "version": "7",
        "n_layer": n_layer, "n_embd": n_embd, "vocab_size": vocab_size,
        "n_head": n_head, "head_size": n_embd // n_head,
        "ffn_size": refs["blocks.0.ffn.key.weight"].shape[0],
        "ln_x_eps": LN_X_EPS,
        "d_w": width("blocks.0.att.w1"), "d_a": width("blocks.0.att.a1"),
        "d_v": width("blocks.1.att.v1"), "d_g": width("blocks.0.att.g1"),
        **deep_embed_config(refs, n_embd),
    }


def deep_embed_config(refs: dict, n_embd: int) -> dict:
    """{'d_de': D} for a DeepEmbed ("v7a") checkpoint (ffn.s_emb / s_emb_x / s0 / s1 / s2 per layer), else {}.

    D is the width of s1 (C, D); each token's s_emb row is a D x D matrix (D = 32 in every published file)."""
    if "blocks.0.ffn.s1" not in refs and "blocks.0.ffn.s_emb.weight" not in refs:
        return {}
    if "blocks.0.ffn.s1" not in refs:
        raise FormatError("DeepEmbed checkpoint without blocks.0.ffn.s1")
    s1 = tuple(refs["blocks.0.ffn.s1"].shape)
    if len(s1) != 2 or s1[0] != n_embd:
        raise FormatError(f"tensor blocks.0.ffn.s1 has shape {list(s1)}, expected [{n_embd}, D]")
    return {"d_de": int(s1[1])}


def plan(refs: dict, cfg: dict, source_kind: str):
    """Load-time transforms: fold ln0 (in float32), squeeze; from rwkv.cpp also split x_rwkvag, transpose LoRAs."""
    C, H, N, F = cfg["n_embd"], cfg["n_head"], cfg["head_size"], cfg["ffn_size"]
    from_rwkv_cpp = source_kind == "rwkv_cpp"
    P = Planner(refs)
    P.embedding_with_ln0(C)

    def lora(p, name, n_in, n_out):
        """A LoRA factor of our file, (out, in) like a linear layer's weight (role 'lora'); BlinkDL's and the HF
        layouts store it (in, out), rwkv.cpp (out, in)."""
        if from_rwkv_cpp:
            P.expect_shape(p + name, (n_out, n_in))
            P.vector(p + name, (n_out, n_in), role="lora")
        else:
            P.expect_shape(p + name, (n_in, n_out))
            P.vector(p + name, (n_out, n_in), transform=lambda a: a.T, role="lora")

    for l in range(cfg["n_layer"]):
        p = f"blocks.{l}."
        for norm in ("ln1", "ln2"):
            P.vector(p + norm + ".weight", (C,))
            P.vector(p + norm + ".bias", (C,))
        for i, f in enumerate(MIXES):
            if from_rwkv_cpp:
                P.vector(p + f"att.x_{f}", (C,), p + "att.x_rwkvag",
                         transform=lambda a, i=i: a.reshape(len(MIXES), C)[i], source_size=len(MIXES) * C)
            else:
                P.vector(p + f"att.x_{f}", (C,))
        for f in LORAS:
            if f == "v" and l == 0:
                for unused in ("v0", "v1", "v2"):          # some files carry them; the reference ignores them too
                    refs.get(p + f"att.{unused}")
                continue                                   # layer 0's value residual is v itself
            if f != "g":
                P.vector(p + f"att.{f}0", (C,))
            D = cfg[f"d_{f}"]
            lora(p, f"att.{f}1", C, D)
            lora(p, f"att.{f}2", D, C)
        P.vector(p + "att.k_k", (C,))
        P.vector(p + "att.k_a", (C,))
        P.vector(p + "att.r_k", (H, N))
        P.vector(p + "att.ln_x.weight", (C,))
        P.vector(p + "att.ln_x.bias", (C,))
        if P.has(p + "att.time_state"):               # a state-tuned initial state merged into the model
            P.vector(p + "att.time_state", (H, N, N), transform=time_state_to_wkv)
        for m in ("receptance", "key", "value", "output"):
            P.matrix(p + f"att.{m}.weight", shape=(C, C))
        P.vector(p + "ffn.x_k", (C,))
        P.matrix(p + "ffn.key.weight", shape=(F, C))
        P.matrix(p + "ffn.value.weight", shape=(C, F))
        if cfg.get("d_de"):
            plan_deep_embed(P, l, cfg)
    P.vector("ln_out.weight", (C,))
    P.vector("ln_out.bias", (C,))
    P.matrix("head.weight", shape=(cfg["vocab_size"], C))
    return P.tensors


def time_state_to_wkv(a):
    """A state-tuned `time_state` (H, N, N) as our wkv state: every reference loader starts from
    time_state.transpose(1, 2), and our v7 state is the reference's (S[h, value, key])."""
    return np.ascontiguousarray(np.swapaxes(a, -1, -2))


def plan_deep_embed(P: Planner, l: int, cfg: dict) -> None:
    """DeepEmbed tensors of layer l. The reference folds s_emb += ln0(emb) @ s_emb_x^T at load; we fold it here,
    row block by row block, into one (V, D*D) table that is read one row per token like the embedding (and
    stored like it: fp16 in fp16/int8 files, int8 in int4 files)."""
    C, F, V, D = cfg["n_embd"], cfg["ffn_size"], cfg["vocab_size"], cfg["d_de"]
    p = f"blocks.{l}.ffn."
    P.expect_shape(p + "s_emb.weight", (V, D * D))
    P.expect_shape(p + "s_emb_x.weight", (D * D, C))
    s_emb, s_emb_x, emb = P.ref(p + "s_emb.weight"), P.ref(p + "s_emb_x.weight"), P.ref("emb.weight")
    w0 = np.asarray(P.ref("blocks.0.ln0.weight").load(), np.float32).reshape(C)
    b0 = np.asarray(P.ref("blocks.0.ln0.bias").load(), np.float32).reshape(C)

    def rows(a, b):
        folded = s_emb.load_rows(a, b) + layer_norm(emb.load_rows(a, b), w0, b0) @ s_emb_x.load().T
        return np.ascontiguousarray(folded, dtype=np.float32)
    P.tensors.append(PlannedTensor(p + "s_emb.weight", (V, D * D), "embedding", rows))
    P.expect_shape(p + "s1", (C, D))
    P.vector(p + "s1", (C, D))
    P.expect_shape(p + "s2", (D, F))
    P.vector(p + "s2", (D, F))
    P.vector(p + "s0", (F,))


# ---------------------------------------------------------------------------------------------------------------
# Running

def state_shapes(cfg) -> dict[str, tuple[int, ...]]:
    """att_x, ffn_x (L, C) and wkv (L, H, N, N) in the reference's [head][value][key] order."""
    L, C, H, N = common.dims(cfg, "n_layer", "n_embd", "n_head", "head_size")
    return {"att_x": (L, C), "ffn_x": (L, C), "wkv": (L, H, N, N)}


def init_state(cfg, store=None) -> dict[str, np.ndarray]:
    """Zeros, or the time_state of a state-tuned model where the file holds one."""
    return common.wkv_state(cfg, store)


class Layer:
    """One block's weights, looked up once so the forward pass reads like the equations."""

    def __init__(self, weights, l: int, cfg: Config):
        p = f"blocks.{l}."
        v, m = weights.vector, weights.matrix

        def factor(name):                # a LoRA factor: a matrix (role 'lora'), or an earlier file's array
            return m(name) if weights.role(name) == "lora" else v(name)
        self.ln1_w, self.ln1_b = v(p + "ln1.weight"), v(p + "ln1.bias")
        self.ln2_w, self.ln2_b = v(p + "ln2.weight"), v(p + "ln2.bias")
        self.x_r, self.x_w, self.x_k, self.x_v, self.x_a, self.x_g = (v(p + f"att.x_{f}") for f in MIXES)
        self.w0, self.w1, self.w2 = v(p + "att.w0"), factor(p + "att.w1"), factor(p + "att.w2")
        self.a0, self.a1, self.a2 = v(p + "att.a0"), factor(p + "att.a1"), factor(p + "att.a2")
        self.has_value_residual = l > 0
        if self.has_value_residual:
            self.v0, self.v1, self.v2 = v(p + "att.v0"), factor(p + "att.v1"), factor(p + "att.v2")
        self.g1, self.g2 = factor(p + "att.g1"), factor(p + "att.g2")
        self.k_k, self.k_a = v(p + "att.k_k"), v(p + "att.k_a")
        self.r_k = v(p + "att.r_k").reshape(-1)
        self.ln_x_w, self.ln_x_b = v(p + "att.ln_x.weight"), v(p + "att.ln_x.bias")
        self.W_r, self.W_k = m(p + "att.receptance.weight"), m(p + "att.key.weight")
        self.W_v = m(p + "att.value.weight")
        self.W_o = m(p + "att.output.weight")
        self.ffn_x_k = v(p + "ffn.x_k")
        self.F_k, self.F_v = m(p + "ffn.key.weight"), m(p + "ffn.value.weight")
        self.s_emb = m(p + "ffn.s_emb.weight") if weights.has(p + "ffn.s_emb.weight") else None   # DeepEmbed
        if self.s_emb is not None:
            self.s0, self.s1, self.s2 = v(p + "ffn.s0"), v(p + "ffn.s1"), v(p + "ffn.s2")
        # for the compiled row kernels: the six token-shift mixes stacked, the LoRA factors in pipeline order
        self.mixes = np.stack([self.x_r, self.x_w, self.x_k, self.x_v, self.x_a, self.x_g])
        self.ffn_mixes = self.ffn_x_k.reshape(1, -1)
        loras = "wavg" if self.has_value_residual else "wag"
        self.lora_down = tuple(getattr(self, f + "1") for f in loras)
        self.lora_up = tuple(getattr(self, f + "2") for f in loras)
        # Files since the panel layout store the factors (out, in) as matrices (int8 in int8/int4 files): they run
        # through the matrices' kernels. Earlier files hold float32 (in, out) arrays for kernels/lowrank.py.
        self.lora_matrices = not isinstance(self.w1, np.ndarray)
        # One token's LoRAs in one launch where the factors' scheme has one (int8 factors: kernels/panel.py
        # lora_chain), with the middle steps of _between; None: _loras runs them step by step
        self.lora_chain = None
        if self.lora_matrices:
            middles = ("tanh",) + ("linear",) * (len(loras) - 2) + ("sigmoid",)
            self.lora_chain = chain_runner(self.lora_down, self.lora_up, middles)
        self.block_token = _block_token_args(self, cfg)
        self.block_rows = None if self.block_token is None else _block_rows_args(self, cfg)


def _block_token_args(L: Layer, cfg: Config):
    """The weights' arguments of kernels/token_blocks.rwkv7_block_token (the whole block for one token in one
    compiled call), or None where it does not cover this block: a product not a panel-layout matrix, LoRA factors
    without the one-launch chain, DeepEmbed."""
    C = cfg.n_embd
    rkv, o, fk, fv = (L.W_r, L.W_k, L.W_v), L.W_o, L.F_k, L.F_v
    if L.s_emb is not None or not isinstance(L.lora_chain, ChainLaunch):
        return None
    if not all(isinstance(m, PanelMatrix) for m in (*rkv, o, fk, fv)):
        return None
    if len({(m.int8, m.shape, m.padded_cols) for m in rkv}) != 1 or rkv[0].shape != (C, C) or o.shape != (C, C):
        return None
    chain = L.lora_chain
    if chain.C != C or chain.R != C:
        return None
    first = rkv[0]
    return (np.float64(common.LN_EPS), L.ln1_w, L.ln1_b, L.mixes, C,
            first.int8, tuple(m.wp for m in rkv), tuple(m.words for m in rkv), first.padded_cols,
            np.array([m.npanels for m in rkv], np.int64),
            chain.down_wp, chain.down_words, chain.up_wp, chain.up_words, chain.cols, chain.dims, chain.middles,
            chain.down_tasks, chain.up_tasks, chain.up_groups, chain.out_cols,
            L.w0, L.a0, L.v0 if L.has_value_residual else L.a0, L.k_k, L.k_a, L.r_k, L.ln_x_w, L.ln_x_b,
            cfg.n_head, L.has_value_residual, DECAY_SCALE, NORM_FLOOR, float(cfg.ln_x_eps),
            o.int8, o.wp, o.words, o.padded_cols, o.parallel,
            L.ln2_w, L.ln2_b, L.ffn_mixes,
            fk.int8, fk.wp, fk.words, fk.padded_cols, fk.shape[0], fk.parallel,
            fv.int8, fv.wp, fv.words, fv.padded_cols, fv.parallel)


def _block_rows_args(L: Layer, cfg: Config):
    """The weights' arguments of kernels/token_blocks.rwkv7_block_rows (a batched step's block in one call), for a
    block that rwkv7_block_token covers."""
    C, chain = cfg.n_embd, L.lora_chain
    rkv, o, fk, fv = (L.W_r, L.W_k, L.W_v), L.W_o, L.F_k, L.F_v
    lora_mixes = [MIXES.index(f) for f in ("wavg" if L.has_value_residual else "wag")]
    return (np.float64(common.LN_EPS), L.ln1_w, L.ln1_b, L.mixes, C,
            rkv[0].int8, tuple(m.wp for m in rkv), tuple(m.words for m in rkv), rkv[0].padded_cols,
            chain.down_wp, chain.down_words, chain.up_wp, chain.up_words, chain.cols, chain.dims, chain.middles,
            np.array([m.padded_cols for m in L.lora_up], np.int64), np.array(lora_mixes, np.int64),
            L.w0, L.a0, L.v0 if L.has_value_residual else L.a0, L.k_k, L.k_a, L.r_k, L.ln_x_w, L.ln_x_b,
            cfg.n_head, L.has_value_residual, DECAY_SCALE, NORM_FLOOR, float(cfg.ln_x_eps),
            o.int8, o.wp, o.words, o.padded_cols,
            L.ln2_w, L.ln2_b, L.ffn_mixes,
            fk.int8, fk.wp, fk.words, fk.padded_cols, fk.shape[0],
            fv.int8, fv.wp, fv.words, fv.padded_cols)


def load_weights(store, cfg: Config) -> common.Weights:
    W = common.Weights(store, cfg, Layer)
    W.block_token = all(L.block_token is not None for L in W.layers)
    return W


def time_mix(L: Layer, a, state, l, run):
    """RWKV-7 attention replacement of layer l over T tokens; updates the layer's shift and WKV state.

    Layer 0 sets run.v_first (its value per token), later layers read it.
    One token runs without BLAS (fused projections, LoRAs in Numba's pool; see kernels/lowrank.py)."""
    H = run.cfg.n_head
    xr, xw, xk, xv, xa, xg = pointwise.shift_mixes(a, state["att_x"][l], L.mixes)
    r, k, v = linear_many((L.W_r, L.W_k, L.W_v), (xr, xk, xv), run.observer)
    if L.has_value_residual:
        u_w, u_a, u_v, gate = _loras(L, (xw, xa, xv, xg))
        v0 = L.v0
    else:
        u_w, u_a, gate = _loras(L, (xw, xa, xg))
        u_v, v0, run.v_first = v, L.a0, v                  # layer 0's value is the value residual of later ones
    if a.shape[0] == 1:                  # one token: WKV inputs, update and output in one launch, the same bits
        y = rwkv7_token(r, k, v, run.v_first, u_w, u_a, u_v, gate, L.w0, L.a0, v0, L.k_k, L.k_a, L.r_k, L.ln_x_w,
                        L.ln_x_b, H, L.has_value_residual, DECAY_SCALE, NORM_FLOOR, run.cfg.ln_x_eps,
                        state=state["wkv"][l], source=common.wkv_source(state, l))
    else:
        w, k, v, neg_kappa, kappa_alpha = pointwise.rwkv7_wkv_inputs(
            k, v, run.v_first, u_w, u_a, u_v, L.w0, L.a0, v0, L.k_k, L.k_a, H, L.has_value_residual, DECAY_SCALE,
            NORM_FLOOR)
        o = np.empty_like(r)
        wkv7(r, w, k, v, neg_kappa, kappa_alpha, state["wkv"][l], o)
        y = pointwise.rwkv7_output(o, r, k, v, L.r_k, gate, L.ln_x_w, L.ln_x_b, H, float(run.cfg.ln_x_eps))
    state["att_x"][l] = a[-1]
    return linear(L.W_o, y, run.observer)


def channel_mix(L: Layer, b, state, l, run):
    """Feed-forward of layer l over T tokens; updates the layer's shift state. DeepEmbed layers scale the hidden
    units per token (deep_embed_scale)."""
    xk = pointwise.shift_mixes(b, state["ffn_x"][l], L.ffn_mixes)[0]
    hidden = relu_square(linear(L.F_k, xk, run.observer))
    if L.s_emb is not None:
        hidden = hidden * deep_embed_scale(L, b, run.tokens)
    state["ffn_x"][l] = b[-1]
    return linear(L.F_v, hidden, run.observer)


def deep_embed_scale(L: Layer, b, tokens):
    """DeepEmbed's per-token FFN modulation ((b . s1) . E_t) . s2 + s0, with E_t token t's s_emb row as a D x D
    matrix and b the un-shifted LN2 output (the reference's channel mix with RWKV_DE_VERSION=1)."""
    T, D = b.shape[0], L.s1.shape[1]
    table = L.s_emb.rows(np.asarray(tokens, dtype=np.int64)).reshape(T, D, D)
    (h,) = lora_down((b,), (L.s1,))
    if T == 1:                                   # decode: the small products in Numba's pool too, never BLAS
        (ss,) = lora_up((h,), (np.ascontiguousarray(table[0]),))
    else:
        ss = np.einsum("ti,tij->tj", h, table)
    (scale,) = lora_up((ss,), (L.s2,))
    return scale + L.s0


def forward(W: common.Weights, tokens: np.ndarray, state: dict, all_logits: bool, check=None,
            observer=None) -> np.ndarray:
    """Run T tokens (one chunk) through the model; returns logits (T, V) or (1, V) of the last token."""
    if len(tokens) == 1 and observer is None and W.block_token:
        return _forward_token(W, tokens, state, all_logits, check)
    return common.forward(time_mix, channel_mix, W, tokens, state, all_logits, check, observer)


def _forward_token(W: common.Weights, tokens, state: dict, all_logits: bool, check=None) -> np.ndarray:
    """forward() of one token with each block one compiled call (kernels/token_blocks.py): the same bits as
    time_mix and channel_mix, without ~13 trips between Python and Numba per block."""
    x = W.emb.rows(tokens)
    threads = get_threads()
    blocks = max(1, min(W.cfg.n_head, threads))
    att_x, ffn_x, wkv = state["att_x"], state["ffn_x"], state["wkv"]
    source = state.get("wkv" + common.SOURCE)
    v_first = x                                      # (layer 0 puts its value here)
    for l, L in enumerate(W.layers):
        x, v_first = rwkv7_block_token(x, v_first, threads, blocks, att_x[l], ffn_x[l], wkv[l],
                                       wkv[l] if source is None else source[l], source is not None,
                                       *L.block_token)
        if check is not None:
            check(x, l)
    return common.output_logits(W, x, all_logits)


# ---------------------------------------------------------------------------------------------------------------
# Batched decode: B independent sequences, one token each (arch/batch.py)
#
# The big matrices are one batched product each, the LoRAs one launch for all rows (kernels/batched.py), the
# row-wise kernels around the WKV step take all B rows at once; the token shift runs row by row (its previous row
# is each sequence's own). No BLAS in a decode step; every row equals its sequence's own single-token decode.

def time_mix_batch(L: Layer, a, states, l, run):
    """time_mix for B sequences at one token each: row b of `a` belongs to states[b]."""
    H, obs = run.cfg.n_head, run.observer
    xr, xw, xk, xv, xa, xg = pointwise.shift_mixes_rows(a, previous_rows(states, "att_x", l), L.mixes)
    r, k, v = linear_rows(L.W_r, xr, obs), linear_rows(L.W_k, xk, obs), linear_rows(L.W_v, xv, obs)
    if L.has_value_residual:
        u_w, u_a, u_v, gate = _loras_batch(L, (xw, xa, xv, xg))
        v0 = L.v0
    else:
        u_w, u_a, gate = _loras_batch(L, (xw, xa, xg))
        u_v, v0, run.v_first = v, L.a0, v                  # layer 0's value is the value residual of later ones
    y = rwkv7_token(r, k, v, run.v_first, u_w, u_a, u_v, gate, L.w0, L.a0, v0, L.k_k, L.k_a, L.r_k, L.ln_x_w,
                    L.ln_x_b, H, L.has_value_residual, DECAY_SCALE, NORM_FLOOR, run.cfg.ln_x_eps,
                    states=row_addresses(states, "wkv", l))
    store_rows(states, "att_x", l, a)
    return linear_rows(L.W_o, y, obs)


def _between(hs):
    """The LoRAs' middle step: tanh for the decay's, sigmoid for the gate's, nothing for the others (compiled
    kernels whose element functions the one-launch chain of a decode step shares: the same bits either way)."""
    return (tanh(hs[0]),) + tuple(hs[1:-1]) + (sigmoid(hs[-1]),)


def _loras(L: Layer, xs):
    """The LoRA outputs (decay, learning rate, [value residual,] gate) of T tokens: x . A, the middle step, . B."""
    if L.lora_matrices:                  # (the observer watches role 'matrix' products only)
        if L.lora_chain is not None and xs[0].shape[0] == 1:           # one token: one launch
            return [y[None, :] for y in L.lora_chain([x[0] for x in xs])]
        return linear_many(L.lora_up, _between(linear_many(L.lora_down, xs)))
    return lora_up(_between(lora_down(xs, L.lora_down)), L.lora_up)


def _loras_batch(L: Layer, xs):
    """_loras for B sequences at one token each (each row its single-token computation)."""
    if L.lora_matrices:
        hs = [linear_rows(A, x) for A, x in zip(L.lora_down, xs)]
        return [linear_rows(F, h) for F, h in zip(L.lora_up, _between(hs))]
    hs = lowrank_down_rows(xs, L.lora_down)
    return lowrank_up_rows(_between(hs), L.lora_up)


def channel_mix_batch(L: Layer, b, states, l, run):
    obs, tokens = run.observer, run.tokens
    (xk,) = pointwise.shift_mixes_rows(b, previous_rows(states, "ffn_x", l), L.ffn_mixes)
    hidden = relu_square(linear_rows(L.F_k, xk, obs))
    if L.s_emb is not None:                      # DeepEmbed: row i scaled by its own token's table
        (scale,) = per_row(lambda i, s: (deep_embed_scale(L, b[i:i + 1], tokens[i:i + 1]),), states)
        hidden = hidden * scale
    store_rows(states, "ffn_x", l, b)
    return linear_rows(L.F_v, hidden, obs)


def forward_batch(W: common.Weights, tokens: np.ndarray, states: list, observer=None) -> np.ndarray:
    """One token for each of B sequences (tokens (B,), states[b] its state dict, updated in place) -> (B, V)."""
    if observer is None and W.block_token:
        return _forward_rows(W, tokens, states)
    return common.forward_batch(time_mix_batch, channel_mix_batch, W, tokens, states, observer)


def _forward_rows(W: common.Weights, tokens, states: list) -> np.ndarray:
    """forward_batch() with each block one compiled call (kernels/token_blocks.rwkv7_block_rows): the same bits
    as time_mix_batch and channel_mix_batch."""
    rows = BatchStates(states)
    x = W.emb.rows(tokens)
    threads = get_threads()
    v_first = x                                      # (layer 0 puts its value here)
    for l, L in enumerate(W.layers):
        x, v_first = rwkv7_block_rows(x, v_first, threads, row_addresses(rows, "att_x", l),
                                      row_addresses(rows, "ffn_x", l), row_addresses(rows, "wkv", l), *L.block_rows)
    return linear_rows(W.head, common.layer_norm(x, W.ln_out_w, W.ln_out_b))
