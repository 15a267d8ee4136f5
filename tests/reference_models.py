"""Small random-weight RWKV models of every version, for parity tests against the reference `rwkv` package.

NumPy only (no torch): the parity tests regenerate these weights from the seed, write them as checkpoints with
the torch-free writers and compare our logits with the reference's, which `tests/fixtures/make_reference.py`
computed once (with torch) and committed under `tests/fixtures/reference/<spec name>.npz`.

    SPECS                       the model shapes, one `ModelSpec` per committed fixture
    make_state_dict(spec)       {BlinkDL key: float32 array}, keys in the order a real checkpoint has them
    weights_digest(sd)          sha256 over names, shapes and bytes: tells "NumPy made other weights" apart from
                                "the engine computes something else"
    token_sequence(spec)        the fixed token ids the fixtures were computed on

Key names and shapes are BlinkDL's (those the reference `rwkv` package loads). The key ORDER matters to the reference: its
v4-v6 class detects the version by walking keys in order (5.2 is recognised only from a 2-D `att.time_decay` seen
after some `ln_x`, i.e. from layer 1 on), so the keys come in the order BlinkDL's training code registers them:
emb, then per block ln1, ln2, (ln0 in block 0), att parameters, att sub-modules, ffn; then ln_out, head.

Values are drawn to look like trained weights, so that a wrong formula changes the logits visibly: LayerNorm gains
near 1, mixes in (0, 1), decays spread from fast to slow, bonus terms of both signs, matrices scaled 1/sqrt(fan_in).
Receptance and key are scaled down (see _ATT_GAIN) so that the ln_x GroupNorm inputs are small, as in trained
models, and the GroupNorm eps visibly matters.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass

import numpy as np

LN_X_EPS_REFERENCE = 64e-5   # GroupNorm eps of ln_x in the reference (v5, v6, v7); recorded in every spec


@dataclass(frozen=True)
class ModelSpec:
    """One random model. `version` is the reference's name: '4', '5.0', '5.1', '5.2', '6' or '7'."""
    name: str
    version: str
    n_embd: int               # C
    n_layer: int              # L
    vocab_size: int           # V
    ffn_dim: int              # F
    head_size: int = 0        # N (v5+; 0 for v4)
    seed: int = 0
    n_tokens: int = 64        # length of the fixture's token sequence
    bonus_key: str = ""       # v5.0/5.1: 'time_first' (log-domain, u = exp) or 'time_faaaa' (u as stored)
    d_mix: int = 0            # v6: time_maa_w1/w2 LoRA width
    d_decay: int = 0          # v6: time_decay_w1/w2 LoRA width
    d_w: int = 0              # v7 LoRA widths: decay, in-context learning rate (a), value residual, gate
    d_a: int = 0
    d_v: int = 0
    d_g: int = 0
    v7_layer0_value_lora: bool = False   # v7: also emit layer 0's v0/v1/v2 (unused there; engines must ignore)
    source_dtype: str = "fp32"           # 'bf16': weights are rounded to bfloat16 (saved as a bf16 checkpoint)

    @property
    def n_head(self) -> int:
        return self.n_embd // self.head_size if self.head_size else 0

    def to_json(self) -> str:
        """The spec plus what a reader of the fixture needs to know (ln_x eps of the reference)."""
        d = dataclasses.asdict(self)
        d["n_head"] = self.n_head
        d["ln_x_eps"] = LN_X_EPS_REFERENCE if self.version != "4" else None
        return json.dumps(d, sort_keys=True)


def _eagle_ffn(c: int) -> int:
    """Eagle's FFN width: 3.5 C rounded down to a multiple of 32 (HF's rule for intermediate_size = null)."""
    return int(3.5 * c) // 32 * 32


SPECS: list[ModelSpec] = [
    ModelSpec("v4_a", "4", n_embd=64, n_layer=2, vocab_size=256, ffn_dim=256, seed=401),
    ModelSpec("v4_b", "4", n_embd=96, n_layer=3, vocab_size=384, ffn_dim=336, seed=402),
    ModelSpec("v50_a", "5.0", n_embd=64, n_layer=2, vocab_size=256, ffn_dim=256, head_size=16, seed=501,
              bonus_key="time_first"),
    ModelSpec("v50_b", "5.0", n_embd=128, n_layer=3, vocab_size=512, ffn_dim=448, head_size=32, seed=502,
              bonus_key="time_faaaa"),
    ModelSpec("v51_a", "5.1", n_embd=64, n_layer=2, vocab_size=256, ffn_dim=224, head_size=32, seed=511,
              bonus_key="time_faaaa"),
    ModelSpec("v51_b", "5.1", n_embd=128, n_layer=3, vocab_size=512, ffn_dim=512, head_size=64, seed=512,
              bonus_key="time_first"),
    ModelSpec("v52_a", "5.2", n_embd=64, n_layer=2, vocab_size=256, ffn_dim=256, head_size=32, seed=521),
    ModelSpec("v52_b", "5.2", n_embd=128, n_layer=3, vocab_size=512, ffn_dim=_eagle_ffn(128), head_size=64,
              seed=522),
    ModelSpec("v52_c", "5.2", n_embd=256, n_layer=4, vocab_size=1024, ffn_dim=_eagle_ffn(256), head_size=64,
              seed=523),
    ModelSpec("v52_bf16", "5.2", n_embd=128, n_layer=2, vocab_size=512, ffn_dim=_eagle_ffn(128), head_size=32,
              seed=524, source_dtype="bf16"),
    ModelSpec("v6_a", "6", n_embd=64, n_layer=2, vocab_size=256, ffn_dim=224, head_size=32, seed=601,
              d_mix=32, d_decay=64),
    ModelSpec("v6_b", "6", n_embd=128, n_layer=3, vocab_size=512, ffn_dim=448, head_size=64, seed=602,
              d_mix=16, d_decay=32),
    ModelSpec("v7_a", "7", n_embd=64, n_layer=2, vocab_size=256, ffn_dim=256, head_size=32, seed=701,
              d_w=16, d_a=16, d_v=8, d_g=32),
    ModelSpec("v7_b", "7", n_embd=128, n_layer=3, vocab_size=512, ffn_dim=512, head_size=64, seed=702,
              d_w=32, d_a=24, d_v=16, d_g=32, v7_layer0_value_lora=True),
]

SPECS_BY_NAME = {s.name: s for s in SPECS}


# ---------------------------------------------------------------------------------------------------------------
# value generators (all return float32)

class _Draw:
    """Named draws from one seeded generator; every helper returns float32 of the requested shape."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)

    def normal(self, shape, mean=0.0, std=1.0):
        return (mean + std * self.rng.standard_normal(shape)).astype(np.float32)

    def uniform(self, shape, low, high):
        return self.rng.uniform(low, high, shape).astype(np.float32)

    def linear(self, n_out, n_in, gain=1.0):
        """A Linear weight stored (out, in); gain 1 keeps the inputs' magnitude (std 1/sqrt(fan_in))."""
        return self.normal((n_out, n_in), std=gain / np.sqrt(n_in))

    def lora(self, n_in, n_out, gain=1.0):
        """A LoRA-style matrix stored (in, out), used as x @ M."""
        return self.normal((n_in, n_out), std=gain / np.sqrt(n_in))

    def mix(self, c):
        """A token-shift mix vector (1, 1, C) in (0, 1)."""
        return self.uniform((1, 1, c), 0.05, 0.95)

    def ln(self, prefix, c, out):
        out[prefix + ".weight"] = self.normal((c,), mean=1.0, std=0.1)
        out[prefix + ".bias"] = self.normal((c,), std=0.05)

    def log_log_decay(self, shape):
        """Raw v5 time_decay: exp(-exp(td)) spreads over ~0.3 .. 0.999 (td in log(-log 0.999) .. log(-log 0.3))."""
        return self.uniform(shape, np.log(-np.log(0.999)), np.log(-np.log(0.3)))


# Receptance/key gains. With unit gains the ln_x GroupNorm inputs have variance >> its eps (64e-5), so an engine
# using the wrong eps (1e-5, as rwkv.cpp does) would still pass at 1e-4. Trained models have small GroupNorm inputs
# (the rwkv.cpp tiny v5 models move by ~1 logit between the two eps). These gains bring the inputs to that regime:
# with them, eps 1e-5 instead of 64e-5 changes the reference logits by >= 1e-3 relative at EVERY position of every
# v5/v6/v7 spec (>= 10x the parity tolerance), while a 0.1% error in the decay still shows (~5e-3).
_ATT_GAIN = {"receptance": 0.15, "key": 0.15}      # v5.x, v6
_V7_GAIN = {"receptance": 0.2}                     # v7 (its key is normalised per head anyway)


def _v4_att(d: _Draw, s: ModelSpec, p: str, out: dict) -> None:
    c = s.n_embd
    out[p + "time_decay"] = d.uniform((c,), -5.0, 2.0)          # w = -exp(td): slow .. fast forgetting
    out[p + "time_first"] = d.uniform((c,), -1.5, 1.0)
    for m in ("k", "v", "r"):
        out[p + f"time_mix_{m}"] = d.mix(c)
    for m in ("key", "value", "receptance", "output"):
        out[p + f"{m}.weight"] = d.linear(c, c)


def _v5_att(d: _Draw, s: ModelSpec, p: str, out: dict) -> None:
    c, h, n = s.n_embd, s.n_head, s.head_size
    gated = s.version in ("5.1", "5.2")
    for m in ("k", "v", "r") + (("g",) if gated else ()):
        out[p + f"time_mix_{m}"] = d.mix(c)
    if s.version == "5.2":
        out[p + "time_decay"] = d.log_log_decay((h, n))
        out[p + "time_faaaa"] = d.normal((h, n), std=0.5)
    else:
        # one decay per head: spread the heads evenly over the range, jittered
        lo, hi = np.log(-np.log(0.999)), np.log(-np.log(0.3))
        base = np.linspace(lo, hi, h) + d.normal((h,), std=0.2)
        out[p + "time_decay"] = np.clip(base, lo, hi).astype(np.float32)
        out[p + s.bonus_key] = d.normal((h,), std=0.5)
    names = ("receptance", "key", "value") + (("gate",) if gated else ()) + ("output",)
    if s.version == "5.2":     # Eagle's module order: receptance, key, value, output, gate
        names = ("receptance", "key", "value", "output", "gate")
    for m in names:
        out[p + f"{m}.weight"] = d.linear(c, c, gain=_ATT_GAIN.get(m, 1.0))
    d.ln(p + "ln_x", c, out)


def _v6_att(d: _Draw, s: ModelSpec, p: str, out: dict) -> None:
    c, h, n = s.n_embd, s.n_head, s.head_size
    for m in ("x", "w", "k", "v", "r", "g"):
        out[p + f"time_maa_{m}"] = d.mix(c)
    out[p + "time_maa_w1"] = d.lora(c, 5 * s.d_mix)                               # (C, 5 D)
    out[p + "time_maa_w2"] = d.normal((5, s.d_mix, c), std=0.2 / np.sqrt(s.d_mix))  # (5, D, C)
    out[p + "time_decay"] = d.log_log_decay((1, 1, c))
    out[p + "time_decay_w1"] = d.lora(c, s.d_decay)
    out[p + "time_decay_w2"] = d.normal((s.d_decay, c), std=0.5 / np.sqrt(s.d_decay))
    out[p + "time_faaaa"] = d.normal((h, n), std=0.5)
    for m in ("receptance", "key", "value", "output", "gate"):
        out[p + f"{m}.weight"] = d.linear(c, c, gain=_ATT_GAIN.get(m, 1.0))
    d.ln(p + "ln_x", c, out)


def _v7_att(d: _Draw, s: ModelSpec, layer: int, p: str, out: dict) -> None:
    """Roughly the x070 training initialisation (ramps across channels, zigzag within heads) plus noise, and
    non-zero LoRA matrices so that every path contributes."""
    c, h, n = s.n_embd, s.n_head, s.head_size
    ch = np.arange(c)
    linear = (ch / (c - 1) - 0.5).astype(np.float32)
    zig = ((ch % n) - (n - 1) / 2) / ((n - 1) / 2)
    zigzag = (zig * np.abs(zig)).astype(np.float32)
    for m in ("r", "w", "k", "v", "a", "g"):
        out[p + f"x_{m}"] = d.uniform((1, 1, c), 0.0, 1.0)
    ramp = -6.0 + 6.0 * (ch / (c - 1)) ** 1.5
    out[p + "w0"] = (ramp + 0.5 + zigzag * 2.5 + d.normal((c,), std=0.5)).astype(np.float32).reshape(1, 1, c)
    out[p + "w1"] = d.lora(c, s.d_w)
    out[p + "w2"] = d.lora(s.d_w, c, gain=0.5)
    out[p + "a0"] = (-0.19 + zigzag * 0.3 + linear * 0.4 + d.normal((c,), std=0.3)).astype(np.float32).reshape(1, 1, c)
    out[p + "a1"] = d.lora(c, s.d_a)
    out[p + "a2"] = d.lora(s.d_a, c, gain=0.5)
    if layer > 0 or s.v7_layer0_value_lora:
        out[p + "v0"] = (0.73 - linear * 0.4 + d.normal((c,), std=0.3)).astype(np.float32).reshape(1, 1, c)
        out[p + "v1"] = d.lora(c, s.d_v)
        out[p + "v2"] = d.lora(s.d_v, c, gain=0.5)
    out[p + "g1"] = d.lora(c, s.d_g)
    out[p + "g2"] = d.lora(s.d_g, c, gain=2.0)
    out[p + "k_k"] = (0.71 - linear * 0.1 + d.normal((c,), std=0.05)).astype(np.float32).reshape(1, 1, c)
    out[p + "k_a"] = d.normal((1, 1, c), mean=1.02, std=0.05)
    out[p + "r_k"] = d.normal((h, n), mean=-0.04, std=0.3)
    for m in ("receptance", "key", "value", "output"):
        out[p + f"{m}.weight"] = d.linear(c, c, gain=_V7_GAIN.get(m, 1.0))
    d.ln(p + "ln_x", c, out)


def _ffn(d: _Draw, s: ModelSpec, p: str, out: dict) -> None:
    c, f = s.n_embd, s.ffn_dim
    if s.version == "7":
        out[p + "x_k"] = d.mix(c)
        out[p + "key.weight"] = d.linear(f, c)
        out[p + "value.weight"] = d.linear(c, f)
        return
    mix = "time_maa" if s.version == "6" else "time_mix"
    out[p + f"{mix}_k"] = d.mix(c)
    out[p + f"{mix}_r"] = d.mix(c)
    out[p + "key.weight"] = d.linear(f, c)
    out[p + "receptance.weight"] = d.linear(c, c)
    out[p + "value.weight"] = d.linear(c, f)


def make_state_dict(spec: ModelSpec, seed: int | None = None) -> dict[str, np.ndarray]:
    """Random weights for `spec` in BlinkDL names and shapes, float32, keys in checkpoint order.

    `seed` defaults to spec.seed. For spec.source_dtype == 'bf16' every value is rounded to bfloat16 (so writing
    them as bf16 is exact and the float32 arrays are the exact upcast of the bf16 checkpoint)."""
    d = _Draw(spec.seed if seed is None else seed)
    c = spec.n_embd
    out: dict[str, np.ndarray] = {}
    out["emb.weight"] = d.normal((spec.vocab_size, c), std=0.5)
    for layer in range(spec.n_layer):
        b = f"blocks.{layer}."
        d.ln(b + "ln1", c, out)
        d.ln(b + "ln2", c, out)
        if layer == 0:
            d.ln(b + "ln0", c, out)
        att = b + "att."
        if spec.version == "4":
            _v4_att(d, spec, att, out)
        elif spec.version in ("5.0", "5.1", "5.2"):
            _v5_att(d, spec, att, out)
        elif spec.version == "6":
            _v6_att(d, spec, att, out)
        elif spec.version == "7":
            _v7_att(d, spec, layer, att, out)
        else:
            raise ValueError(f"unknown RWKV version {spec.version!r}")
        _ffn(d, spec, b + "ffn.", out)
    d.ln("ln_out", c, out)
    out["head.weight"] = d.linear(spec.vocab_size, c)
    if spec.source_dtype == "bf16":
        out = {k: bf16_round(v) for k, v in out.items()}
    for k, v in out.items():
        assert v.dtype == np.float32, k
    return out


def bf16_round(a: np.ndarray) -> np.ndarray:
    """float32 -> nearest bfloat16 (round half to even) -> float32, as torch's .to(torch.bfloat16) does."""
    bits = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return rounded.astype(np.uint32).view(np.float32).reshape(a.shape)


def weights_digest(sd: dict[str, np.ndarray]) -> str:
    """sha256 over (name, dtype, shape, bytes) of every tensor, in order."""
    h = hashlib.sha256()
    for name, a in sd.items():
        a = np.ascontiguousarray(a)
        h.update(f"{name}|{a.dtype.str}|{a.shape}\n".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def token_sequence(spec: ModelSpec) -> np.ndarray:
    """spec.n_tokens pseudo-random ids in 1..V-1, with id 0 (end-of-text) at one position."""
    rng = np.random.default_rng(spec.seed + 1_000_003)
    tokens = rng.integers(1, spec.vocab_size, spec.n_tokens)
    tokens[spec.n_tokens // 3] = 0
    return tokens.astype(np.int64)


def n_params(sd: dict[str, np.ndarray]) -> int:
    return int(sum(a.size for a in sd.values()))


def hf_config(spec: ModelSpec) -> dict:
    """config.json of a Hugging Face RWKV-5 folder for a v5.2 spec, shaped like RWKV/v5-Eagle-7B-HF's.

    intermediate_size is null when the FFN width equals HF's default rule (3.5 C rounded down to 32), as Eagle's."""
    assert spec.version == "5.2", "HF rwkv5 folders are made for v5.2 specs only"
    return {
        "architectures": ["Rwkv5ForCausalLM"],
        "model_type": "rwkv5",
        "hidden_size": spec.n_embd,
        "num_hidden_layers": spec.n_layer,
        "head_size": spec.head_size,
        "num_attention_heads": spec.n_head,
        "attention_hidden_size": spec.n_embd,
        "intermediate_size": None if spec.ffn_dim == _eagle_ffn(spec.n_embd) else spec.ffn_dim,
        "vocab_size": spec.vocab_size,
        "layer_norm_epsilon": 1e-5,
        "head_size_divisor": 8,
        "rescale_every": 6,
        "context_length": 4096,
        "bos_token_id": 0,
        "eos_token_id": 0,
        "tie_word_embeddings": False,
        "use_cache": True,
    }
