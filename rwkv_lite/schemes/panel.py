"""The panel layout "p16" of int8 and int4 matrices (params {'group': 32, 'layout': 'p16'}), and its Matrix.

The same quantized values as the row-major layouts of schemes/int8.py and schemes/int4.py (same bits per
weight), stored in the order the integer kernels of kernels/panel.py read them:

  Rows are cut into panels of 16 (R padded up to a multiple of 16 with zero rows: P = ceil(R / 16) panels);
  columns into groups of 32 (C padded up to Cp, a multiple of 32, with zero weights). Inside a panel, for each
  group g and each 4-column chunk k = 0..7 of it, the 16 rows' weights of columns 32g + 4k .. 32g + 4k + 3
  follow each other row by row (64 values: row 0's four, row 1's four, ...).

  int8 p16: {'': uint8 (P, Cp * 16), '.scale': float16 (P, Cp / 32 * 16)}
      byte = q + 128 (q in -127..127 as in the row-major int8 layout); one 64-byte vector per chunk;
      '.scale'[panel, 16 g + i] = the fp16 scale of row 16 panel + i, group g.          8.5 bits/weight
  int4 p16: {'': uint8 (P, Cp * 8), '.groups': uint16 (P, Cp / 32 * 16)}
      the 4-bit levels q (0..15) of a group's chunks k and k + 4 share 64 bytes: chunk k (0..3) in the low
      nibbles, chunk k + 4 in the high nibbles (a group is 256 bytes); '.groups' as '.scale' above, holding
      the int4 scale / zero-point words.                                                  4.5 bits/weight

Padding rows hold q = 0 with scale 0 (int8) or word 0 (int4: W = 2**-24 * (0 - 0) = 0). Each part's first axis is
the panel, so the converter quantizes rows in blocks of a multiple of 16 (``ROW_STEP``).
"""
from __future__ import annotations

import numpy as np

from ..kernels import panel as kernels
from ..kernels.linear import PARALLEL_MIN_WEIGHTS, Matrix
from ..kernels.threads import get_threads
from .base import SchemeError

LAYOUTS = ("rows", "p16")
ROW_STEP = kernels.PANEL
GROUP = kernels.GROUP


def padded_cols(cols: int) -> int:
    return -(-cols // GROUP) * GROUP


def panels(rows: int) -> int:
    return -(-rows // ROW_STEP)


def layout_param(scheme: str, layout, group: int) -> str:
    """A validated `layout` parameter: "rows" (row-major, the default) or "p16" (group 32 only)."""
    if layout not in LAYOUTS:
        raise SchemeError(f"{scheme}: layout must be one of {LAYOUTS}, got {layout!r}")
    if layout == "p16" and group != GROUP:
        raise SchemeError(f"{scheme}: the p16 layout needs group {GROUP}, got {group}")
    return layout


def check_shape(name: str, wp: np.ndarray, words: np.ndarray, shape, bytes_per_col: int) -> tuple[int, int]:
    """(R, Cp) of p16 parts `wp` (P, Cp * bytes_per_col) and `words` (P, Cp / 32 * 16), checked against each other
    and against the logical `shape` (R within the last panel)."""
    P, n = words.shape
    Cp = n // ROW_STEP * GROUP
    if n % ROW_STEP or not Cp or wp.shape != (P, Cp * bytes_per_col):
        raise SchemeError(f"{name} p16 matrix: weights {wp.shape} and scales {words.shape} do not fit the layout")
    R = P * ROW_STEP if shape is None else int(shape[0])
    if not P * ROW_STEP - ROW_STEP < R <= P * ROW_STEP:
        raise SchemeError(f"{name} p16 matrix: {R} rows do not fit {P} panels of {ROW_STEP}")
    return R, Cp


def _pad_rows(a: np.ndarray, rows: int) -> np.ndarray:
    if a.shape[0] == rows:
        return a
    out = np.zeros((rows,) + a.shape[1:], a.dtype)
    out[: a.shape[0]] = a
    return out


def _chunk_order(values: np.ndarray) -> np.ndarray:
    """(R, Cp) -> (P, Cp / 4, 16, 4): chunk-major 16-row panels."""
    R, Cp = values.shape
    P = panels(R)
    return _pad_rows(values, P * ROW_STEP).reshape(P, ROW_STEP, Cp // 4, 4).transpose(0, 2, 1, 3)


def _scale_order(scales: np.ndarray) -> np.ndarray:
    """(R, Cp / 32) 16-bit words -> (P, Cp / 32 * 16)."""
    R, ng = scales.shape
    P = panels(R)
    return np.ascontiguousarray(_pad_rows(scales, P * ROW_STEP).reshape(P, ROW_STEP, ng).transpose(0, 2, 1)
                                ).reshape(P, ng * ROW_STEP)


def _scale_rows(words: np.ndarray, R: int) -> np.ndarray:
    P, n = words.shape
    return words.reshape(P, n // ROW_STEP, ROW_STEP).transpose(0, 2, 1).reshape(P * ROW_STEP, -1)[:R]


def pack_int8(q: np.ndarray, scale_bits: np.ndarray) -> dict:
    """Row-major int8 q (R, Cp) and fp16 scale bits (R, Cp / 32) -> p16 parts."""
    u = (q.astype(np.int16) + 128).astype(np.uint8)
    P = panels(q.shape[0])
    wp = np.ascontiguousarray(_chunk_order(u)).reshape(P, -1)
    if q.shape[0] % ROW_STEP:                      # padding rows: q = 0 is byte 128
        wp.reshape(P, -1, ROW_STEP, 4)[-1, :, q.shape[0] % ROW_STEP:, :] = 128
    return {"": wp, ".scale": _scale_order(scale_bits).view(np.float16)}


def unpack_int8(parts: dict, R: int) -> tuple[np.ndarray, np.ndarray]:
    """p16 int8 parts -> row-major q int8 (R, Cp) and fp16 scales (R, Cp / 32)."""
    wp, scale = parts[""], parts[".scale"]
    P = wp.shape[0]
    Cp = wp.shape[1] // ROW_STEP
    u = wp.reshape(P, Cp // 4, ROW_STEP, 4).transpose(0, 2, 1, 3).reshape(P * ROW_STEP, Cp)[:R]
    return (u.astype(np.int16) - 128).astype(np.int8), _scale_rows(scale.view(np.uint16), R).view(np.float16)


def pack_int4(levels: np.ndarray, words: np.ndarray) -> dict:
    """Levels (R, Cp) uint8 0..15 in column order and group words (R, Cp / 32) -> p16 parts."""
    P = panels(levels.shape[0])
    Cp = levels.shape[1]
    U = _chunk_order(levels).reshape(P, Cp // GROUP, 8, 64)
    wp = (U[:, :, :4] | (U[:, :, 4:] << 4)).astype(np.uint8).reshape(P, Cp * 8)
    return {"": np.ascontiguousarray(wp), ".groups": _scale_order(words)}


def unpack_int4(parts: dict, R: int) -> tuple[np.ndarray, np.ndarray]:
    """p16 int4 parts -> levels (R, Cp) uint8 0..15 and words (R, Cp / 32)."""
    wp, words = parts[""], parts[".groups"]
    P = wp.shape[0]
    Cp = wp.shape[1] // 8
    V = wp.reshape(P, Cp // GROUP, 4, 64)
    U = np.concatenate([V & 15, V >> 4], axis=2)               # (P, groups, 8 chunks, 16 rows x 4)
    levels = U.reshape(P, Cp // 4, ROW_STEP, 4).transpose(0, 2, 1, 3).reshape(P * ROW_STEP, Cp)[:R]
    return np.ascontiguousarray(levels), _scale_rows(words, R)


def gather_rows(wp: np.ndarray, words: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows `ids` of p16 parts in column order: the stored bytes (len(ids), Cp) (int8: q + 128; int4: one
    level per byte) and the 16-bit words (len(ids), Cp / 32)."""
    P, n = words.shape
    Cp = n // ROW_STEP * GROUP
    panel, lane = ids // ROW_STEP, ids % ROW_STEP
    if wp.shape[1] == Cp * ROW_STEP:                            # int8: one byte per weight
        u = wp.reshape(P, Cp // 4, ROW_STEP, 4)[panel, :, lane, :].reshape(len(ids), Cp)
    else:                                                       # int4: chunk k and k + 4 share a byte
        V = wp.reshape(P, Cp // GROUP, 4, ROW_STEP, 4)[panel, :, :, lane, :]      # (n, groups, 4, 4)
        u = np.concatenate([V & 15, V >> 4], axis=2).reshape(len(ids), Cp)
    return u, words.reshape(P, n // ROW_STEP, ROW_STEP)[panel, :, lane]


def relayout(source, parts: dict, target) -> dict:
    """Stored arrays of scheme `source` as those of scheme `target` without rounding again: the same scheme and
    group, from the row-major layout to p16 (or unchanged). SchemeError when the values cannot be carried over."""
    if source.name != target.name or source.group != target.group:
        raise SchemeError(f"stored as {source.name} {source.params}, which cannot be stored as {target.name} "
                          f"{target.params} without quantizing again")
    if source.layout == target.layout:
        return parts
    if source.layout != "rows" or target.layout != "p16":
        raise SchemeError(f"no conversion from the {source.layout} layout to {target.layout}")
    if source.name == "int8":
        return pack_int8(np.asarray(parts[""]), np.asarray(parts[".scale"]).view(np.uint16))
    return target.pack(*source.levels(parts))


class PanelMatrix(Matrix):
    """A p16 int8 or int4 matrix: every product (one token, a batch of sequences, a prompt) runs the integer
    kernels of kernels/panel.py, so a row's result is the same bits whichever way it is computed."""
    aligned_input = False           # the kernels read activations through quantize_rows, at any address

    def __init__(self, scheme, wp, words, shape, params, dequantize_rows):
        super().__init__(shape, params)
        self.scheme = scheme
        self.int8 = scheme == "int8"
        self.wp, self.words = wp, words
        self.padded_cols = words.shape[1] // ROW_STEP * GROUP
        self.npanels = wp.shape[0]
        self.many_key = (PanelMatrix, scheme, self.padded_cols, self.shape[1])
        self._dequantize_rows = dequantize_rows

    def _rows_out(self, Y):
        R = self.shape[0]
        return Y if Y.shape[1] == R else np.ascontiguousarray(Y[:, :R])

    def _product(self, X, parallel):
        if parallel:
            Y = kernels.gemm_parallel(self.int8, self.wp, self.words, X, self.padded_cols, get_threads())
        else:
            Y = kernels.gemm_serial(self.int8, self.wp, self.words, X, self.padded_cols)
        return self._rows_out(Y)

    def _gemv(self, x):
        return self._product(x[None, :], self.parallel)[0]

    def _gemm(self, X):
        return self._product(X, self.parallel or X.shape[0] * self.shape[0] * self.shape[1] >= PARALLEL_MIN_WEIGHTS)

    def _matmul_rows(self, X, parallel):
        return self._product(X, parallel)

    @staticmethod
    def _many_runner(matrices):
        """One launch of kernels/panel.gemv_many for these matrices: X (n, padded_cols) -> their n results
        (views of the launch's output rows)."""
        first = matrices[0]
        int8, cols = first.int8, first.padded_cols
        wps, words = tuple(m.wp for m in matrices), tuple(m.words for m in matrices)
        npanels = np.array([m.npanels for m in matrices], np.int64)
        rows = [m.shape[0] for m in matrices]

        def run(X):
            Y = kernels.gemv_many(int8, wps, words, X, cols, npanels, get_threads())
            return [Y[i, :R] for i, R in enumerate(rows)]
        return run

    @staticmethod
    def _chain_runner(downs, ups, middles):
        """One launch of kernels/panel.lora_chain for the pairs (downs[m], ups[m]) with middle steps `middles`
        (names: "linear", "tanh", "sigmoid"): xs (n vectors (C,)) -> n results (R,). None unless every factor is
        an int8 panel matrix, the downs of one width, the ups of one height and each up as wide as its down is
        tall."""
        pairs = tuple(downs) + tuple(ups)
        if not all(isinstance(m, PanelMatrix) and m.int8 for m in pairs):
            return None
        if len({(m.shape[1], m.padded_cols) for m in downs}) != 1 or len({m.shape[0] for m in ups}) != 1:
            return None
        if any(a.shape[0] != b.shape[1] for a, b in zip(downs, ups)) or len(downs) != len(ups):
            return None
        return ChainLaunch(downs, ups, middles)

    def _dequantize(self, ids, out):
        out[:] = self._dequantize_rows(ids)[:, : out.shape[1]]

    def _arrays(self):
        return (self.wp, self.words)


class ChainLaunch:
    """PanelMatrix._chain_runner's result: call it with n vectors (C,) for their n results (R,). Its attributes are
    kernels/panel.lora_chain's arguments after the input (compiled callers such as kernels/token_blocks.py pass
    them on themselves)."""

    def __init__(self, downs, ups, middles):
        codes = {"linear": kernels.LINEAR, "tanh": kernels.TANH, "sigmoid": kernels.SIGMOID}
        self.down_wp, self.down_words = tuple(m.wp for m in downs), tuple(m.words for m in downs)
        self.up_wp, self.up_words = tuple(m.wp for m in ups), tuple(m.words for m in ups)
        self.C, self.cols, self.R = downs[0].shape[1], downs[0].padded_cols, ups[0].shape[0]
        self.dims = np.array([m.shape[1] for m in ups], np.int64)
        self.middles = np.array([codes[f] for f in middles], np.int64)
        self.down_tasks = kernels.task_table(np.array([m.npanels for m in downs], np.int64))
        self.up_tasks = kernels.task_table_sized(np.array([m.npanels for m in ups], np.int64),
                                                 kernels.balanced_panels_per_task([m.wp.shape[1] for m in ups]))
        self.up_groups = np.array([m.padded_cols // GROUP for m in ups], np.int64)
        self.out_cols = ups[0].npanels * ROW_STEP
        self.n = len(downs)

    def __call__(self, xs):
        X = np.zeros((self.n, self.cols), np.float32)
        for i, x in enumerate(xs):
            X[i, :self.C] = x
        Y = kernels.lora_chain(self.down_wp, self.down_words, self.up_wp, self.up_words, X, self.cols, self.dims,
                               self.middles, self.down_tasks, self.up_tasks, self.up_groups, self.out_cols,
                               get_threads())
        return [Y[i, :self.R] for i in range(self.n)]
