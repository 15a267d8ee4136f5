"""Helpers of the batched decode step shared by every version (each version's `forward_batch` holds its math).

In a batched step the B rows of an activation matrix are B independent sequences at one token each, not B
consecutive tokens of one sequence: a row's "previous token" comes from its own state, the WKV recurrence runs
per sequence, and every matrix product is one kernels/batched.py product whose row b equals the single-token
GEMV of that row.
"""
from __future__ import annotations

import numpy as np

from ..kernels.batched import matmul_rows


def linear_rows(matrix, X, observer=None):
    """(B, R) = X W^T, row b exactly the decode GEMV of X[b] (see kernels/batched.py); `observer` as in
    arch/common.py."""
    if observer is not None:
        observer(matrix.name, X)
    return matmul_rows(matrix, X)


def per_row(fn, states) -> list[np.ndarray]:
    """Run `fn(b, state_b)` for every sequence, each returning a sequence of (1, ...) arrays (a single-token
    computation), and stack them: the i-th result of every row as one (B, ...) array. For the small per-token
    pieces of RWKV-6/7 (token shift, LoRAs) that must stay exactly the single-token computation."""
    rows = [fn(b, s) for b, s in enumerate(states)]
    return [np.concatenate([r[i] for r in rows]) for i in range(len(rows[0]))]


def previous_rows(states, key: str, l: int) -> np.ndarray:
    """(B, C): each sequence's last row of state array `key` at layer l (its token-shift input)."""
    return np.stack([s[key][l] for s in states])


def store_rows(states, key: str, l: int, X) -> None:
    """Write row b of X into sequence b's state array `key` at layer l."""
    for s, x in zip(states, X):
        s[key][l] = x


def row_addresses(states, key: str, l: int) -> np.ndarray:
    """int64 addresses of every sequence's state array `key` at layer l, for the kernels that update all B
    sequences' states in one launch (kernels/wkv5.py, wkv7.py: *_rows). The arrays must be C-contiguous float32
    of one shape (new_state makes them so); they stay owned by `states`, which outlive the call."""
    first = states[0][key]
    out = np.empty(len(states), np.int64)
    for b, s in enumerate(states):
        arr = s[key]
        if arr.dtype != np.float32 or not arr.flags.c_contiguous or arr.shape != first.shape:
            raise ValueError(f"state array {key!r} of sequence {b} is not a C-contiguous float32 {first.shape} array")
        out[b] = arr.__array_interface__["data"][0] + l * arr.strides[0]
    return out
