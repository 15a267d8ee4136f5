"""Helpers of the batched decode step shared by every version (each version's `forward_batch` holds its math).

In a batched step the B rows of an activation matrix are B independent sequences at one token each, not B
consecutive tokens of one sequence: a row's "previous token" comes from its own state, the WKV recurrence runs
per sequence, and every matrix product is one kernels/batched.py product whose row b equals the single-token
GEMV of that row.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..kernels.batched import gather_rows, matmul_rows, scatter_rows


def linear_rows(matrix, X, observer=None):
    """(B, R) = X W^T, row b exactly the decode GEMV of X[b] (see kernels/batched.py); `observer` as in
    arch/common.py."""
    if observer is not None:
        observer(matrix.name, X)
    return matmul_rows(matrix, X)


def per_row(fn, states) -> list[np.ndarray]:
    """Run `fn(b, state_b)` for every sequence, each returning a sequence of (1, ...) arrays (a single-token
    computation), and stack them: the i-th result of every row as one (B, ...) array. For the small per-token
    pieces that must stay exactly the single-token computation (RWKV-7's DeepEmbed scale)."""
    rows = [fn(b, s) for b, s in enumerate(states)]
    return [np.concatenate([r[i] for r in rows]) for i in range(len(rows[0]))]


class BatchStates(Sequence):
    """The B sequences' state dicts of one batched step (a list of dicts to the caller), with every state array's
    address looked up once per step instead of once per layer. The kernels that read or update all B sequences'
    states in one launch take these addresses (kernels/wkv5.py, wkv7.py: *_rows; gather_rows / scatter_rows
    below). The arrays must be C-contiguous float32 of one shape (new_state makes them so); they stay owned by
    the state dicts, which outlive the step."""

    def __init__(self, states):
        self.states = list(states)
        self._bases: dict[str, tuple[np.ndarray, int, int]] = {}

    def __len__(self):
        return len(self.states)

    def __getitem__(self, b):
        return self.states[b]

    def addresses(self, key: str, l: int) -> np.ndarray:
        """int64 addresses of every sequence's `key` array at layer l (its first axis)."""
        if key not in self._bases:
            self._bases[key] = _base_addresses(self.states, key)
        bases, stride, layers = self._bases[key]
        if not 0 <= l < layers:
            raise IndexError(f"layer {l} outside state array {key!r} of {layers} layers")
        return bases + l * stride


def _base_addresses(states, key):
    first = states[0][key]
    bases = np.empty(len(states), np.int64)
    for b, s in enumerate(states):
        arr = s[key]
        if arr.dtype != np.float32 or not arr.flags.c_contiguous or arr.shape != first.shape:
            raise ValueError(f"state array {key!r} of sequence {b} is not a C-contiguous float32 {first.shape} array")
        bases[b] = arr.__array_interface__["data"][0]
    return bases, first.strides[0], first.shape[0]


def row_addresses(states: BatchStates, key: str, l: int) -> np.ndarray:
    """int64 addresses of every sequence's state array `key` at layer l (see BatchStates)."""
    return states.addresses(key, l)


def previous_rows(states: BatchStates, key: str, l: int) -> np.ndarray:
    """(B, C): each sequence's last row of state array `key` (L, C) at layer l (its token-shift input)."""
    return gather_rows(states.addresses(key, l), states[0][key].shape[1])


def store_rows(states: BatchStates, key: str, l: int, X) -> None:
    """Write row b of X (B, C) into sequence b's state array `key` (L, C) at layer l."""
    X = np.ascontiguousarray(X, dtype=np.float32)
    if X.shape != (len(states), states[0][key].shape[1]):
        raise ValueError(f"rows {X.shape} do not fit state array {key!r} of {len(states)} sequences")
    scatter_rows(X, states.addresses(key, l))

