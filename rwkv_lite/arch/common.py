"""Pieces shared by every RWKV version: norms, activations, token shift, and the conversion-plan record.

All arrays are float32; inputs are (T, C) matrices (T tokens in sequence mode, T = 1 when decoding).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..errors import FormatError
from ..kernels import pointwise
from ..kernels.linear import gemv_many
from ..kernels.lowrank import down_many, matmul_many, up_many

LN_EPS = np.float32(1e-5)        # LayerNorm epsilon of every RWKV version (ln0, ln1, ln2, ln_out)


def layer_norm(x, weight, bias, eps=LN_EPS):
    """Row-wise LayerNorm with biased variance, as torch.nn.functional.layer_norm."""
    return pointwise.layer_norm(_rows(x), weight, bias, float(eps))


def group_norm(x, n_head, weight, bias, eps):
    """GroupNorm over each row of x split into n_head consecutive groups (torch.nn.functional.group_norm)."""
    return pointwise.group_norm(_rows(x), int(n_head), weight, bias, float(eps))


def token_mix(a, p, mu):
    """a * mu + p * (1 - mu): the token-shift blend of this token's row with the previous one's."""
    return pointwise.token_mix(_rows(a), _rows(p), mu)


def sigmoid(x):
    return pointwise.sigmoid(_rows(x))


def silu(x):
    """x * sigmoid(x)."""
    return pointwise.silu(_rows(x))


def relu_square(x):
    """max(x, 0) ** 2."""
    return pointwise.relu_square(_rows(x))


def shifted(x, previous_row):
    """Token shift: row t of the result is row t-1 of x, and row 0 is `previous_row` (the state's last row)."""
    return pointwise.shifted(_rows(x), previous_row)


def _rows(x):
    """The (T, C) float32 form the pointwise kernels take (a no-op for the forward pass's own arrays)."""
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"expected (T, C) rows, got shape {x.shape}")
    return x


def output_logits(W, x, all_logits: bool):
    """logits = head(LN_out(x)) for every row (all_logits) or only the last token's row."""
    if not all_logits:
        x = x[-1:]
    return linear(W.head, layer_norm(x, W.ln_out_w, W.ln_out_b))


def linear(matrix, x):
    """y = x W^T for a stored weight matrix; a single row goes through the GEMV kernel, several through GEMM."""
    if x.shape[0] == 1:
        return matrix(x[0])[None, :]
    return matrix(x)


def linear_many(matrices, xs):
    """[linear(W, x) for W, x in zip(matrices, xs)]; for one token, one kernel launch where the matrices allow it
    (kernels/linear.gemv_many)."""
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

    role: 'matrix' (a linear layer's weight: quantizable), 'embedding' (rows looked up by token) or 'vector'
    (small float32 parameters: mixes, norms, decays). `rows(a, b)` returns rows a..b (first axis) in float32, so
    that big matrices stream in blocks."""
    name: str
    shape: tuple[int, ...]
    role: str
    rows: Callable[[int, int], np.ndarray]


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
    """Collects the PlannedTensors of one conversion (used by arch/v4, v6, v7).

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
               source_size: int | None = None) -> None:
        """A float32 tensor of our file (role 'vector'), read whole from `src` (default: the same name).

        The source must hold `source_size` values (default: as many as `shape`); `transform` maps the source
        array to one that reshapes to `shape`."""
        src = src or name
        ref, shape = self.ref(src), tuple(int(d) for d in shape)
        size = int(np.prod(shape, dtype=np.int64))
        have = int(np.prod(ref.shape, dtype=np.int64))
        if have != (size if source_size is None else source_size):
            raise FormatError(f"tensor {src} has shape {list(ref.shape)}, expected {list(shape)}")

        def produce(a, b):
            arr = np.asarray(ref.load(), dtype=np.float32)
            if transform is not None:
                arr = transform(arr)
            return np.ascontiguousarray(arr.reshape(shape)[a:b], dtype=np.float32)
        self.tensors.append(PlannedTensor(name, shape, "vector", produce))

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
