"""Pieces shared by every RWKV version: norms, activations, token shift, and the conversion-plan record.

All arrays are float32; inputs are (T, C) matrices (T tokens in sequence mode, T = 1 when decoding).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

LN_EPS = np.float32(1e-5)        # LayerNorm epsilon of every RWKV version (ln0, ln1, ln2, ln_out)


def layer_norm(x, weight, bias, eps=LN_EPS):
    """Row-wise LayerNorm with biased variance, as torch.nn.functional.layer_norm."""
    mean = x.mean(axis=-1, keepdims=True)
    centered = x - mean
    var = (centered * centered).mean(axis=-1, keepdims=True)
    return centered / np.sqrt(var + eps) * weight + bias


def group_norm(x, n_head, weight, bias, eps):
    """GroupNorm over each row of x split into n_head consecutive groups (torch.nn.functional.group_norm)."""
    T, C = x.shape
    g = x.reshape(T, n_head, C // n_head)
    mean = g.mean(axis=-1, keepdims=True)
    centered = g - mean
    var = (centered * centered).mean(axis=-1, keepdims=True)
    return (centered / np.sqrt(var + np.float32(eps))).reshape(T, C) * weight + bias


def sigmoid(x):
    return np.float32(1.0) / (np.float32(1.0) + np.exp(-x))


def silu(x):
    return x * sigmoid(x)


def shifted(x, previous_row):
    """Token shift: row t of the result is row t-1 of x, and row 0 is `previous_row` (the state's last row)."""
    out = np.empty_like(x)
    out[0] = previous_row
    out[1:] = x[:-1]
    return out


def linear(matrix, x):
    """y = x W^T for a stored weight matrix; a single row goes through the GEMV kernel, several through GEMM."""
    if x.shape[0] == 1:
        return matrix(x[0])[None, :]
    return matrix(x)


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
