"""kernels/lowrank.py: the one-token LoRA products of RWKV-6/7 equal numpy's (float32 rounding only)."""
from __future__ import annotations

import numpy as np
import pytest

from rwkv_lite.kernels import lowrank


@pytest.mark.parametrize("C,widths", [(64, (32, 32, 16, 48)), (2048, (96, 96, 64, 256)), (300, (7,))])
def test_down_and_up_match_numpy(C, widths):
    rng = np.random.default_rng(C)
    A = [rng.standard_normal((C, D), dtype=np.float32) for D in widths]
    B = [rng.standard_normal((D, C), dtype=np.float32) for D in widths]
    xs = [rng.standard_normal(C, dtype=np.float32) for _ in widths]
    hs = lowrank.down_many(xs, A)                  # 2048: the parallel path; 64, 300: the serial one
    for x, a, h in zip(xs, A, hs):
        want = x.astype(np.float64) @ a
        np.testing.assert_allclose(h, want, rtol=1e-5, atol=1e-4 * np.abs(want).max())
    Y = lowrank.up_many(hs, B)
    assert Y.shape == (len(widths), C)
    for h, b, y in zip(hs, B, Y):
        want = h.astype(np.float64) @ b
        np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-4 * np.abs(want).max())


def test_parallel_and_serial_paths_agree(monkeypatch):
    rng = np.random.default_rng(1)
    A = [rng.standard_normal((2048, 40), dtype=np.float32)]       # above PARALLEL_MIN_WEIGHTS
    B = [rng.standard_normal((40, 2048), dtype=np.float32)]
    x = [rng.standard_normal(2048, dtype=np.float32)]
    assert A[0].size >= lowrank.PARALLEL_MIN_WEIGHTS
    parallel = lowrank.down_many(x, A)[0], lowrank.up_many([x[0][:40]], B)
    monkeypatch.setattr(lowrank, "PARALLEL_MIN_WEIGHTS", 1 << 40)
    serial = lowrank.down_many(x, A)[0], lowrank.up_many([x[0][:40]], B)
    np.testing.assert_array_equal(parallel[0], serial[0])     # same task split, same order of additions
    np.testing.assert_array_equal(parallel[1], serial[1])


def test_shape_errors_are_reported():
    with pytest.raises(ValueError, match="cannot multiply"):
        lowrank.down_many([np.zeros(5, np.float32)], [np.zeros((6, 3), np.float32)])
    with pytest.raises(ValueError, match="cannot multiply"):
        lowrank.up_many([np.zeros(4, np.float32)], [np.zeros((3, 6), np.float32)])


def test_batched_rows_equal_the_single_token_products_bit_for_bit():
    """kernels/batched.py's LoRA products for B rows read each factor once for all rows, yet row b must be
    down_many / up_many of that row alone, bit for bit (the batched decode's contract)."""
    from rwkv_lite.kernels import batched
    rng = np.random.default_rng(7)
    C, widths, B = 512, (96, 64, 256), 5
    As = [rng.standard_normal((C, D)).astype(np.float32) for D in widths]
    Fs = [rng.standard_normal((D, C)).astype(np.float32) for D in widths]
    Xs = [rng.standard_normal((B, C)).astype(np.float32) for _ in widths]
    H = batched.lowrank_down_rows(Xs, As)
    Y = batched.lowrank_up_rows(H, Fs)
    for b in range(B):
        for h, single in zip(H, lowrank.down_many([x[b] for x in Xs], As)):
            np.testing.assert_array_equal(h[b], single)
        np.testing.assert_array_equal(Y[:, b], lowrank.up_many([h[b] for h in H], Fs))
