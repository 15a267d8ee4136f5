"""The skeleton every RWKV version shares, and the pieces its equations are written with.

A version module (v4, v5, v6, v7) supplies the parts that differ: its config dataclass, the shapes of its tensors
and state, a `Layer` (one block's weights), and `time_mix` / `channel_mix` (one function each, the equations of
docs/versions.md). This module supplies the rest once: the typed config base (`Config`), weights access
(`Weights`), the layer loop (`forward`, `forward_batch`), planning (`Planner`), and the ops every version uses:
norms, activations and token shift (compiled kernels), `linear` / `linear_many` (the fused decode launch), and
the LoRA products (`lora_down` / `lora_up`, never BLAS at decode).

Observers: `forward(..., observer=f)` calls `f(tensor name, X)` with the input rows X (T, C) of every product with
a stored weight matrix (role 'matrix'), including those inside a fused launch, before the product runs; the
observer travels with the call (no global state), and without one the only cost is an `is not None` test per
product.

All arrays are float32; inputs are (T, C) matrices (T tokens in sequence mode, T = 1 when decoding).
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Callable, Mapping

import numpy as np

from ..errors import FormatError
from ..kernels import pointwise
from ..kernels.linear import gemv_many
from ..kernels.lowrank import down_many, matmul_many, up_many
from .batch import BatchStates, linear_rows

LN_EPS = np.float32(1e-5)        # LayerNorm epsilon of every RWKV version (ln0, ln1, ln2, ln_out)
# A version whose single-token step reads some state arrays from the state it starts from (its STEP_FROM_SOURCE
# names) finds them in the state dict under name + SOURCE (Model.forward_in_place with `source`).
SOURCE = ":source"


def wkv_source(state, l):
    """Layer l of the WKV state a step starts from, when that is not `state`'s own (see SOURCE), else None: the
    WKV kernels then read the old memory from it while writing the new one into `state` (RWKV-7: each row copied
    just before its update), instead of the whole state being copied first."""
    source = state.get("wkv" + SOURCE)
    return None if source is None else source[l]


def layer_norm(x, weight, bias, eps=LN_EPS):
    """Row-wise LayerNorm with biased variance, as torch.nn.functional.layer_norm."""
    return pointwise.layer_norm(_rows(x), weight, bias, float(eps))


def group_norm(x, n_head, weight, bias, eps):
    """GroupNorm over each row of x split into n_head consecutive groups (torch.nn.functional.group_norm)."""
    return pointwise.group_norm(_rows(x), int(n_head), weight, bias, float(eps))


def token_mixes(a, previous_row, mus):
    """The token-shift blends a * mu + p * (1 - mu) of RWKV-4/5 for each row mu of mus (n, C), p being a shifted by
    one token with `previous_row` (the state's last row) first -> (n, T, C), one kernel call."""
    return pointwise.token_mixes(_rows(a), previous_row, mus)


def token_mixes_rows(a, previous, mus):
    """token_mixes for B sequences at one token each: row b of `a` against previous[b], its own state's row."""
    return pointwise.token_mixes_rows(_rows(a), _rows(previous), mus)


def silu_gate(y, gate):
    """y * silu(gate), one kernel call."""
    return pointwise.silu_gate(_rows(y), _rows(gate))


def sigmoid_gate(gate, y):
    """sigmoid(gate) * y, one kernel call."""
    return pointwise.sigmoid_gate(_rows(gate), _rows(y))


def sigmoid(x):
    return pointwise.sigmoid(_rows(x))


def tanh(x):
    return pointwise.tanh(_rows(x))


def silu(x):
    """x * sigmoid(x)."""
    return pointwise.silu(_rows(x))


def relu_square(x):
    """max(x, 0) ** 2."""
    return pointwise.relu_square(_rows(x))


def _rows(x):
    """The (T, C) float32 form the pointwise kernels take (a no-op for the forward pass's own arrays)."""
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"expected (T, C) rows, got shape {x.shape}")
    return x


def output_logits(W, x, all_logits: bool, observer=None):
    """logits = head(LN_out(x)) for every row (all_logits) or only the last token's row."""
    if not all_logits:
        x = x[-1:]
    return linear(W.head, layer_norm(x, W.ln_out_w, W.ln_out_b), observer)


def linear(matrix, x, observer=None):
    """y = x W^T for a stored weight matrix; a single row goes through the GEMV kernel, several through GEMM."""
    if observer is not None:
        observer(matrix.name, x)
    if x.shape[0] == 1:
        return matrix(x[0])[None, :]
    return matrix(x)


def linear_many(matrices, xs, observer=None):
    """[linear(W, x) for W, x in zip(matrices, xs)]; for one token, one kernel launch where the matrices allow it
    (kernels/linear.gemv_many)."""
    if observer is not None:
        for m, x in zip(matrices, xs):
            observer(m.name, x)
    if all(x.shape[0] == 1 for x in xs):
        return [y[None, :] for y in gemv_many(matrices, [x[0] for x in xs])]
    return [linear(m, x) for m, x in zip(matrices, xs)]


def lora_down(xs, factors):
    """[x @ A for x, A in zip(xs, factors)]: x (T, C), A float32 (C, D) -> (T, D). One token: one Numba launch
    for all of them (kernels/lowrank.py), never BLAS, so decode has one owner of the cores; sequences: BLAS calls
    shared out to the tile workers."""
    if all(x.shape[0] == 1 for x in xs):
        return [h[None, :] for h in down_many([x[0] for x in xs], factors)]
    return matmul_many(xs, factors)


def lora_up(hs, factors):
    """[h @ B for h, B in zip(hs, factors)]: h (T, D), B float32 (D, C) -> (T, C); as lora_down."""
    if all(h.shape[0] == 1 for h in hs):
        return [y[None, :] for y in up_many([h[0] for h in hs], factors)]
    return matmul_many(hs, factors)


@dataclass
class PlannedTensor:
    """One tensor of the output file, produced on demand during conversion.

    role: 'matrix' (a linear layer's weight: quantizable), 'embedding' (rows looked up by token), 'lora' (a
    LoRA factor (out, in): int8 in quantized files) or 'vector' (small float32 parameters: mixes, norms,
    decays). `rows(a, b)` returns rows a..b (first axis) in float32, so
    that big matrices stream in blocks. `stored`: for a tensor that is already quantized (an rwkv-lite int8/int4
    file as the source), (scheme, its stored arrays): the converter re-lays them out, never rounds again."""
    name: str
    shape: tuple[int, ...]
    role: str
    rows: Callable[[int, int], np.ndarray]
    stored: tuple | None = None


def whole(ref, transform=None) -> Callable[[int, int], np.ndarray]:
    """A row producer for a small tensor read whole (and transformed) from a source TensorRef."""
    def produce(a, b):
        arr = np.asarray(ref.load(), dtype=np.float32)
        if transform is not None:
            arr = transform(arr)
        return np.ascontiguousarray(arr[a:b], dtype=np.float32)
    return produce


def streamed(ref, transform=None) -> Callable[[int, int], np.ndarray]:
    """A row producer that reads only rows a..b of a (big) source matrix."""
    def produce(a, b):
        arr = np.asarray(ref.load_rows(a, b), dtype=np.float32)
        if transform is not None:
            arr = transform(arr)
        return np.ascontiguousarray(arr, dtype=np.float32)
    return produce


def layer_count(refs: dict) -> int:
    """Number of blocks in a checkpoint, from its `blocks.<l>.` names."""
    layers = [int(name.split(".")[1]) for name in refs if name.startswith("blocks.")]
    if not layers:
        raise FormatError("no blocks.<n>.* tensors: not an RWKV checkpoint")
    return 1 + max(layers)


class Planner:
    """Collects the PlannedTensors of one conversion (every version's `plan` uses it).

    Every source tensor is looked up when planned, so a missing or misshapen tensor is a FormatError before any
    byte is written. Vectors are reshaped to the declared shape after the (optional) transform; `expect_shape`
    checks a source shape where a reshape could hide a transposition (LoRA matrices)."""

    def __init__(self, refs: dict):
        self.refs = refs
        self.tensors: list[PlannedTensor] = []

    def has(self, src: str) -> bool:
        return src in self.refs

    def ref(self, src: str):
        if src not in self.refs:
            raise FormatError(f"missing tensor {src}")
        return self.refs[src]

    def expect_shape(self, src: str, *allowed: tuple[int, ...]) -> tuple[int, ...]:
        """The source shape of `src`, which must be one of `allowed` (FormatError otherwise)."""
        shape = tuple(int(d) for d in self.ref(src).shape)
        if shape not in [tuple(a) for a in allowed]:
            want = " or ".join(str(list(a)) for a in allowed)
            raise FormatError(f"tensor {src} has shape {list(shape)}, expected {want}")
        return shape

    def vector(self, name: str, shape, src: str | None = None, transform=None,
               source_size: int | tuple[int, ...] | None = None, role: str = "vector") -> None:
        """A float32 tensor of our file (role 'vector'), read whole from `src` (default: the same name).

        The source must hold `source_size` values (or one of several sizes; default: as many as `shape`);
        `transform` maps the source array to one that reshapes to `shape`. role 'lora': a small (out, in) factor
        matrix of RWKV-6/7's LoRAs, which int8/int4 files store as an int8 matrix (convert.storage_plan)."""
        src = src or name
        ref, shape = self.ref(src), tuple(int(d) for d in shape)
        size = int(np.prod(shape, dtype=np.int64))
        have = int(np.prod(ref.shape, dtype=np.int64))
        allowed = (size,) if source_size is None else (
            source_size if isinstance(source_size, tuple) else (source_size,))
        if have not in allowed:
            raise FormatError(f"tensor {src} has shape {list(ref.shape)}, expected {list(shape)}")

        def produce(a, b):
            arr = np.asarray(ref.load(), dtype=np.float32)
            if transform is not None:
                arr = transform(arr)
            return np.ascontiguousarray(arr.reshape(shape)[a:b], dtype=np.float32)
        self.tensors.append(PlannedTensor(name, shape, role, produce))

    def matrix(self, name: str, src: str | None = None, shape=None) -> None:
        """A linear layer's weight (out, in), streamed by row blocks; quantizable (role 'matrix')."""
        src = src or name
        ref = self.ref(src)
        if shape is not None:
            self.expect_shape(src, tuple(shape))
        self.tensors.append(PlannedTensor(name, tuple(ref.shape), "matrix", streamed(ref)))

    def embedding_with_ln0(self, n_embd: int) -> None:
        """`emb.weight` with blocks.0.ln0 folded in (LayerNorm of every row in float32), role 'embedding'."""
        emb = self.ref("emb.weight")
        fold = None
        if self.has("blocks.0.ln0.weight"):
            w0 = np.asarray(self.ref("blocks.0.ln0.weight").load(), np.float32).reshape(n_embd)
            b0 = np.asarray(self.ref("blocks.0.ln0.bias").load(), np.float32).reshape(n_embd)
            fold = lambda rows: layer_norm(rows, w0, b0)     # noqa: E731
        self.tensors.append(PlannedTensor("emb.weight", tuple(emb.shape), "embedding", streamed(emb, fold)))


# ---------------------------------------------------------------------------------------------------------------
# The arch contract's shared half: typed config, weights access, the layer loop

# Every dimension a version's config may hold: each present one must be a positive integer (the forward pass and
# the WKV kernels, which index without bounds checks, size everything from them).
DIMENSIONS = ("n_layer", "n_embd", "vocab_size", "n_head", "head_size", "ffn_size", "d_mix", "d_decay",
              "d_w", "d_a", "d_v", "d_g", "d_de")


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


@dataclass(frozen=True)
class Config:
    """The dimensions of a model, parsed from a file's config dict (`from_dict`). Each version subclasses it
    with its own fields; a field with a default of None is optional."""
    version: str
    n_layer: int
    n_embd: int
    vocab_size: int
    ffn_size: int | None = None

    @classmethod
    def from_dict(cls, cfg: Mapping) -> "Config":
        """The typed config of a file's config dict; FormatError naming the first bad entry."""
        wanted = {f.name: f for f in fields(cls)}
        for key in DIMENSIONS:
            value = cfg.get(key)
            if value is None and (key not in wanted or wanted[key].default is None):
                continue
            if not _is_count(value):
                raise FormatError(f"config {key}={value!r} is not a positive integer")
        if not isinstance(cfg.get("arch", ""), str):         # compared with a saved state's (NaN != NaN)
            raise FormatError(f"config arch={cfg['arch']!r} is not a name")
        values = {name: cfg.get(name, f.default) for name, f in wanted.items() if name != "version"}
        config = cls(version=str(cfg.get("version")), **values)
        config.validate()
        return config

    def validate(self) -> None:
        """Relations between the numbers (a subclass adds its own)."""


@dataclass(frozen=True)
class HeadsConfig(Config):
    """Versions 5 to 7: a multi-head WKV state and a GroupNorm over heads (eps ln_x_eps). All three are required
    (from_dict and validate refuse a missing one); the defaults exist only because dataclass fields that follow
    defaulted ones (ffn_size) must have one."""
    n_head: int = 0
    head_size: int = 0
    ln_x_eps: float | None = None

    def validate(self) -> None:
        if self.n_head * self.head_size != self.n_embd:
            raise FormatError(f"config n_head={self.n_head} x head_size={self.head_size} does not make "
                              f"n_embd={self.n_embd}")
        eps = self.ln_x_eps
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < 1:
            raise FormatError(f"config ln_x_eps={eps!r} is not a small positive number")


def dims(cfg, *keys):
    """The named numbers of a Config or of a plain config dict (state layouts accept either)."""
    if isinstance(cfg, Mapping):
        return tuple(cfg[k] for k in keys)
    return tuple(getattr(cfg, k) for k in keys)


def wkv_state(cfg, store=None) -> dict[str, np.ndarray]:
    """The state of versions 5 to 7: att_x, ffn_x (L, C) and wkv (L, H, N, N): zeros, or a state-tuned model's
    time_state where the file holds one (stored in the kernel's layout at conversion)."""
    L, C, H, N = dims(cfg, "n_layer", "n_embd", "n_head", "head_size")
    wkv = np.zeros((L, H, N, N), np.float32)
    if store is not None:
        for l in range(L):
            if store.has(f"blocks.{l}.att.time_state"):
                wkv[l] = store.vector(f"blocks.{l}.att.time_state")
    return {"att_x": np.zeros((L, C), np.float32), "ffn_x": np.zeros((L, C), np.float32), "wkv": wkv}


def common_tensor_shapes(cfg: Config) -> dict[str, tuple[int, ...]]:
    """The tensors of every version outside the blocks, and each block's two LayerNorms."""
    V, C = cfg.vocab_size, cfg.n_embd
    shapes = {"emb.weight": (V, C), "head.weight": (V, C), "ln_out.weight": (C,), "ln_out.bias": (C,)}
    for l in range(cfg.n_layer):
        for norm in ("ln1", "ln2"):
            shapes[f"blocks.{l}.{norm}.weight"] = (C,)
            shapes[f"blocks.{l}.{norm}.bias"] = (C,)
    return shapes


class Weights:
    """A file's tensors arranged for the forward pass: the embedding, one version `Layer` per block (its weights
    looked up once, so the equations read them as attributes), the output norm and the head."""

    def __init__(self, store, cfg: Config, layer: Callable):
        self.cfg = cfg
        self.emb = store.matrix("emb.weight")
        self.layers = [layer(store, l, cfg) for l in range(cfg.n_layer)]
        self.ln_out_w, self.ln_out_b = store.vector("ln_out.weight"), store.vector("ln_out.bias")
        self.head = store.matrix("head.weight")


class Pass:
    """What one forward call hands every layer besides its weights and state: the config, the chunk's token ids,
    the observer (None: none), and what a version carries from layer to layer (RWKV-7's v_first)."""
    __slots__ = ("cfg", "tokens", "observer", "v_first")

    def __init__(self, cfg: Config, tokens: np.ndarray, observer=None):
        self.cfg, self.tokens, self.observer, self.v_first = cfg, tokens, observer, None


def _layers(time_mix, channel_mix, W: Weights, tokens, state, run: Pass, check=None):
    """The residual stream through every block: x += time_mix(LN1 x); x += channel_mix(LN2 x)."""
    x = W.emb.rows(tokens)
    for l, L in enumerate(W.layers):
        x = x + time_mix(L, layer_norm(x, L.ln1_w, L.ln1_b), state, l, run)
        x = x + channel_mix(L, layer_norm(x, L.ln2_w, L.ln2_b), state, l, run)
        if check is not None:
            check(x, l)
    return x


def forward(time_mix, channel_mix, W: Weights, tokens, state: dict, all_logits: bool, check=None,
            observer=None) -> np.ndarray:
    """T tokens of one sequence (one chunk) -> logits (T, V), or (1, V) of the last token; `state` (name ->
    array) is updated in place; `check(x, layer)` sees the residual stream after each block."""
    run = Pass(W.cfg, tokens, observer)
    x = _layers(time_mix, channel_mix, W, tokens, state, run, check)
    return output_logits(W, x, all_logits, observer)


def forward_batch(time_mix, channel_mix, W: Weights, tokens, states: list, observer=None) -> np.ndarray:
    """One token for each of B sequences (tokens (B,), states[b] its state dict, updated in place) -> (B, V).
    time_mix and channel_mix here are a version's batched ones (arch/batch.py)."""
    run = Pass(W.cfg, tokens, observer)
    x = _layers(time_mix, channel_mix, W, tokens, BatchStates(states), run)
    return linear_rows(W.head, layer_norm(x, W.ln_out_w, W.ln_out_b), observer)
