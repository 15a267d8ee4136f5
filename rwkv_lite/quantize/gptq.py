"""GPTQ for the int4 scheme: round one column at a time and let each later column compensate the rounding errors
made so far, weighted by how the inputs correlate (Frantar et al., 2022, "GPTQ: Accurate Post-Training
Quantization for Generative Pre-trained Transformers"; this is our own implementation of the published method).

For a row w and inputs X (T x C), the output error is (w - w_q) X^T; with H = X^T X its expected square is
(w - w_q) H (w - w_q)^T. GPTQ rounds column i after adding to it the best compensation for the errors of columns
0..i-1. The paper writes this with U, the upper Cholesky factor of H^-1 (H^-1 = U^T U): the error e_i of column i
moves every later column j by -e_i U_ij / U_ii. Summed up, the value column j is rounded at is

    w'_j = w_j + sum_{i<j} D_i V_ij / V_jj,      D_i = w_i - dequantized(q_i),   V = U^-1,

where V is upper triangular with H = V V^T: the Cholesky factor of H with rows and columns reversed. So one
Cholesky factorisation of H suffices (no inverse): about C^3/3 operations instead of 7 C^3/3, computed in
blocks with matrix products (numpy's own Cholesky runs at 3-7 GFLOP/s here, its matrix product at ~150).

Columns go in blocks of 128: the sums over earlier blocks come from one matrix product D[:, :b0] V[:b0, block]
per block, the sums inside a block from a compiled loop that handles every row in parallel (rows are
independent). A group's scale and zero point are chosen when its first column comes up: for each of a few scale
codes around the group's range / 15, the zero point is fitted (importance-weighted least squares, weights H_ii,
as plain int4's search does) to the values the group's columns would take if each were rounded without error,
the group is then rounded GPTQ's way, and the code leaving the least output error sum_i err_i^2 (which is what
GPTQ minimises: sum_j err_j^2 = D H D^T) is kept. Output: exactly the Int4 layout (kernels unchanged).

Measured on the tiny models (2048 calibration tokens of the KJV text, evaluated on the GPL text): mean KL vs fp32
of whole int4 files (emb int8, head int4) 5v2 4.13e-2 -> 2.38e-2, 5v1 6.03e-2 -> 2.80e-2 (docs/quantization.md).
Cost per matrix: the factorisation (C^3/3), the block products (R C^2) and the rounding loop (R C times a few
hundred operations); memory: the matrix in float32 twice and H twice (the caller's and the factor). Measured:
4096 x 14336 (Eagle-7B's ffn.value) 27 s on 2 cores; a whole 1.5B-shaped conversion 8 minutes (docs/quantization.md).
"""
from __future__ import annotations

import warnings

import numpy as np
from numba import njit, prange

from ..kernels.int4_kernels import int4_scale
from ..schemes.int4 import SCALE_CODES, Int4, fit_group, scale_code_at_most

BLOCK = 128          # columns per block (a multiple of every int4 group size)
CHOLESKY_BLOCK = 256  # diagonal block of the blocked Cholesky factorisation
STRIP = 2048         # columns of its trailing update per matrix product
# Scale codes tried per group, around the code of the group's range / 15. Each is scored by rounding the group
# GPTQ's way (2.5x the work of rounding with the plain search's pick); on the tiny models, -1..+3 gives mean KL
# 5v2 2.38e-2, 5v1 2.80e-2 against 2.44e-2 / 2.80e-2 for -2..+5 and 2.58e-2 / 2.87e-2 for the plain search's pick.
GROUP_CODES_BELOW, GROUP_CODES_ABOVE = 1, 3
DAMP = 0.01          # added to H's diagonal, as a fraction of its mean: keeps H invertible (unused columns, T < C)


def gptq_int4(W: np.ndarray, H: np.ndarray, scheme: Int4, damp: float = DAMP, name: str = "matrix") -> dict:
    """Quantize float32 W (R, C) to the parts of `scheme` (an Int4), using H = X^T X (C, C) of its inputs."""
    W = np.ascontiguousarray(W, dtype=np.float32)
    R, C = W.shape
    G = scheme.group
    energy = np.diag(H).astype(np.float32)             # (a copy)
    dead = energy <= 0                                  # columns no input ever reached: their weights don't matter
    if dead.any():
        W = W.copy()
        W[:, dead] = 0.0
    importance = np.where(dead, 1.0, energy).astype(np.float32)
    importance = np.maximum(importance, 1e-6 * max(float(importance.max()), 1e-30))
    V = _reversed_cholesky(H, dead, damp * max(float(energy.mean()), 1e-30))
    if V is None:
        warnings.warn(f"GPTQ: H of {name} is not positive definite even with 100x the damping; quantized without "
                      "error compensation (inputs' energy weighting only)", stacklevel=2)
        return scheme.quantize(W, importance)

    Cp = scheme.padded_cols(C)
    q = np.zeros((R, Cp), np.uint8)                     # level indices 0..15 (padding columns stay 0)
    words = np.zeros((R, Cp // G), np.uint16)
    D = np.empty((R, C), np.float32)                    # w - dequantized w, column by column
    for b0 in range(0, C, BLOCK):
        b1 = min(C, b0 + BLOCK)
        earlier = (D[:, :b0] @ V[:b0, b0:b1] if b0 else np.zeros((R, b1 - b0), np.float32))
        _gptq_block(W, D, np.ascontiguousarray(earlier, np.float32), V, importance, b0, b1, G, q, words)
    return scheme.pack(q, words)


@njit(cache=True, parallel=True, fastmath={"reassoc", "contract"})
def _gptq_block(W, D, earlier, V, importance, b0, b1, group, q, words):
    """Round columns b0..b1-1 of every row. earlier[r, k]: sum over columns i < b0 of D[r, i] V[i, b0 + k]."""
    R, C = W.shape
    nb = b1 - b0
    for r in prange(R):
        acc = earlier[r].copy()                         # sum_{i<j} D_i V_ij for the block's columns j
        v = np.empty(group, np.float32)
        h = np.empty(group, np.float32)
        pending = np.empty(group, np.float32)
        d = np.float32(1.0)
        zf = np.float32(0.0)
        for j in range(b0, b1):
            k = j - b0
            if j % group == 0:                           # a new group: its scale and zero point
                word = _choose_group_word(W, V, acc, importance, r, j, k, min(group, C - j), v, h, pending)
                words[r, j // group] = word
                d = int4_scale(np.uint16(word))
                zf = np.float32(word >> 9) * np.float32(0.125)
            w = W[r, j] + acc[k] / V[j, j]
            level = min(15.0, max(0.0, np.rint(w * (np.float32(1) / d) + zf)))
            q[r, j] = np.uint8(level)
            delta = W[r, j] - d * (np.float32(level) - zf)
            D[r, j] = delta
            for m in range(k + 1, nb):
                acc[m] += delta * V[j, b0 + m]


@njit(cache=True, fastmath={"reassoc", "contract"})
def _choose_group_word(W, V, acc, importance, r, j, k, n, v, h, pending):
    """The int4 word for columns j..j+n-1 of row r (block offset k): among the scale codes around range/15, each
    with its importance-weighted least-squares zero point for the values the columns would take if rounded
    without error, the one whose GPTQ rounding of the group (with the compensation inside it) leaves the least
    output error, sum_i ((w'_i - dequantized_i) V_ii)^2: the quantity GPTQ minimises, sum_j err_j^2 = D H D^T."""
    for i in range(n):                                   # the values without error (D_i = w_i - w'_i)
        pending[i] = acc[k + i]
    lo = np.float32(0.0)
    hi = np.float32(-np.inf)
    for i in range(n):
        v[i] = W[r, j + i] + pending[i] / V[j + i, j + i]
        h[i] = importance[j + i]
        lo = min(lo, v[i])
        hi = max(hi, v[i])
        for m in range(i + 1, n):
            pending[m] += (W[r, j + i] - v[i]) * V[j + i, j + m]
    base = scale_code_at_most((hi - lo) / 15)
    best_err = np.inf
    word = 0
    for code in range(max(0, base - GROUP_CODES_BELOW), min(SCALE_CODES, base + GROUP_CODES_ABOVE + 1)):
        z, _ = fit_group(v, h, n, code)
        d = int4_scale(np.uint16(code))
        inv = np.float32(1) / d
        zf = np.float32(z) * np.float32(0.125)
        for i in range(n):
            pending[i] = acc[k + i]
        err = np.float32(0.0)
        for i in range(n):
            w = W[r, j + i] + pending[i] / V[j + i, j + i]
            level = min(15.0, max(0.0, np.rint(w * inv + zf)))
            dq = d * (np.float32(level) - zf)
            e = (w - dq) * V[j + i, j + i]
            err += e * e
            for m in range(i + 1, n):
                pending[m] += (W[r, j + i] - dq) * V[j + i, j + m]
        if err < best_err:
            best_err, word = err, code | (z << 9)
    return word


def _reversed_cholesky(H: np.ndarray, dead: np.ndarray, damping: float) -> np.ndarray | None:
    """V upper triangular with H + damping I = V V^T (dead columns' diagonal set to 1 first): the Cholesky factor
    of H with rows and columns reversed, computed in float32 (the damping keeps it well conditioned; should
    rounding still break positive definiteness, the damping is raised 10x, twice). None if that fails too."""
    for _ in range(3):
        M = np.ascontiguousarray(H[::-1, ::-1], dtype=np.float32)     # a copy, factorised in place
        diagonal = np.diag_indices(len(M))
        M[diagonal] = np.where(dead[::-1], 1.0, M[diagonal]) + damping
        try:
            _cholesky_in_place(M)
        except np.linalg.LinAlgError:
            damping *= 10
            continue
        return M[::-1, ::-1]
    return None


def _cholesky_in_place(A: np.ndarray, block: int = CHOLESKY_BLOCK) -> None:
    """A (symmetric positive definite) -> its lower Cholesky factor L (A = L L^T), in place, by blocks: LAPACK on
    the diagonal blocks, matrix products for the rest. Only A's lower triangle is read."""
    C = A.shape[0]
    for k in range(0, C, block):
        e = min(C, k + block)
        L11 = np.linalg.cholesky(A[k:e, k:e])
        A[k:e, k:e] = L11
        A[k:e, e:] = 0.0
        if e < C:
            L21 = A[e:, k:e] @ np.linalg.inv(L11).T      # solves L21 L11^T = A21
            A[e:, k:e] = L21
            for s in range(e, C, STRIP):                  # A22 -= L21 L21^T, lower part only, in column strips
                s1 = min(C, s + STRIP)                    # (bounds the temporary product)
                A[s:, s:s1] -= L21[s - e:] @ L21[s - e:s1 - e].T
