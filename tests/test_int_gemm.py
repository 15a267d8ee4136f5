"""kernels/int_gemm.py: the integer panel and lanes kernels of group-scaled int8 weights (RWKV_LITE_BATCH_KERNELS=1).

Single-token decode is the B = 1 case of the panel kernel; batched decode runs the panel kernel (few rows) or the
lanes kernel (rows in the vector lanes). Every output must be bit-identical across these paths, whatever B, the
thread split or the shape's tails; and the products must agree with float32 arithmetic on the dequantised weights
within the 15-bit activation rounding."""
from __future__ import annotations

import numpy as np
import pytest

from rwkv_lite.kernels import int_gemm
from rwkv_lite.schemes import get_scheme, make_matrix

GROUPS = (32, 64, 128)


def _matrix(group, R, C, seed):
    w = np.random.default_rng(seed).standard_normal((R, C), dtype=np.float32) / np.sqrt(C)
    scheme = get_scheme("int8", group=group)
    return make_matrix("int8", scheme.params, scheme.quantize(w), (R, C))


def _padded(m, X):
    Xp = np.zeros((X.shape[0], m.padded_cols), np.float32)
    Xp[:, :X.shape[1]] = X
    return Xp


KERNELS = (int_gemm.gemm_i8g, int_gemm.gemm_i8g_serial, int_gemm.lanes_i8g, int_gemm.lanes_i8g_serial)


@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("R, C", [(130, 520), (7, 200), (64, 1024), (1, 64)])
def test_every_path_gives_the_single_row_result(group, R, C):
    m = _matrix(group, R, C, seed=R + C)
    panel, panel_serial, lanes, lanes_serial = KERNELS
    rng = np.random.default_rng(1)
    X = rng.standard_normal((17, C), dtype=np.float32)
    X[0, :64] = 0.0                                   # an all-zero activation block (step 0)
    X[1] *= 1e-30                                     # tiny activations (subnormal products stay exact in int)
    Xp = _padded(m, X)
    args = (m.q, m.scale)
    single = np.concatenate([panel_serial(*args, Xp[b:b + 1], m.block_source, group) for b in range(len(X))])
    for B in (1, 2, 3, 4, 5, 8, 9, 16, 17):
        for kernel in (panel, panel_serial, lanes, lanes_serial):
            np.testing.assert_array_equal(kernel(*args, Xp[:B], m.block_source, group), single[:B])
    # and the product is W x within the rounding of x to 15 bits per block
    W = m.rows(np.arange(R))
    ref = X.astype(np.float64) @ W.T.astype(np.float64)
    bound = 2e-4 * np.abs(X).max(axis=1, keepdims=True) * np.abs(W).sum(axis=1)[None, :] + 1e-30
    assert np.all(np.abs(single - ref) <= bound)


@pytest.mark.parametrize("group", GROUPS)
def test_many_matrices_in_one_launch_equal_each_alone(group):
    ms = [_matrix(group, R, 256, seed=R) for R in (130, 64, 200)]
    rng = np.random.default_rng(2)
    X = rng.standard_normal((3, 256), dtype=np.float32)
    rows = np.array([m.shape[0] for m in ms], np.int64)
    y = int_gemm.gemv_many_i8g(tuple(m.q for m in ms), tuple(m.scale for m in ms), X, ms[0].block_source, group,
                               rows)
    alone = np.concatenate([int_gemm.gemm_i8g_serial(m.q, m.scale, X[i:i + 1], m.block_source, group)[0]
                            for i, m in enumerate(ms)])
    np.testing.assert_array_equal(y, alone)


@pytest.mark.parametrize("group", [32, 64])
def test_non_finite_activations_give_nan_for_their_row_only(group):
    m = _matrix(group, 40, 256, seed=3)
    X = np.random.default_rng(4).standard_normal((9, 256), dtype=np.float32)
    X[2, 70] = np.inf
    X[5, 3] = np.nan
    for kernel in KERNELS:
        Y = kernel(m.q, m.scale, X, m.block_source, group)
        assert np.isnan(Y[[2, 5]]).all()
        assert np.isfinite(np.delete(Y, [2, 5], axis=0)).all()


@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("threads", ["serial", "parallel"])
def test_matrices_with_batch_kernels_on_give_batched_rows_equal_single_tokens(group, threads, monkeypatch):
    """RWKV_LITE_BATCH_KERNELS=1: a group-int8 matrix's single-token GEMV, fused multi-matrix launch and batched
    rows all come from int_gemm and agree exactly, for batch sizes that take the panel kernel, the lanes kernel
    and both."""
    from rwkv_lite.kernels import batched, linear
    monkeypatch.setattr(int_gemm, "BATCH_KERNELS", True)
    monkeypatch.setattr(batched, "PARALLEL_MIN_WORK", 1 if threads == "parallel" else 1 << 62)
    m = _matrix(group, 130, 520, seed=group)
    m.parallel = threads == "parallel"
    rng = np.random.default_rng(5)
    X = rng.standard_normal((29, 520), dtype=np.float32)
    single = np.stack([m(x) for x in X])
    np.testing.assert_array_equal(single[0], int_gemm.gemm_i8g_serial(m.q, m.scale, _padded(m, X[:1]),
                                                                      m.block_source, group)[0])
    for B in (2, 5, 12, 16, 17, 29):
        np.testing.assert_array_equal(batched.matmul_rows(m, X[:B]), single[:B])
    if m.parallel:
        ys = linear.gemv_many([m, m], [X[0], X[1]])
        np.testing.assert_array_equal(np.stack(ys), single[:2])


def test_model_batch_with_batch_kernels_on_equals_each_sequence_alone(tmp_path, monkeypatch):
    """A whole int8 model (RWKV-5.2) with RWKV_LITE_BATCH_KERNELS=1: 13 sequences stepped together give each
    sequence's own single-token logits exactly."""
    import warnings

    import checkpoint_writers as cw
    import reference_models as rm
    import rwkv_lite
    monkeypatch.setattr(int_gemm, "BATCH_KERNELS", True)
    src = cw.save_pth(rm.make_state_dict(rm.SPECS_BY_NAME["v52_a"]), tmp_path / "model.pth")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rwkv_lite.convert(src, tmp_path / "m.safetensors", quant="int8")
    with rwkv_lite.load(tmp_path / "m.safetensors") as model:
        _, state = model.forward([1, 2, 3])
        states = [state.copy() for _ in range(13)]
        tokens = list(range(4, 17))
        rows = model.forward_batch(tokens, states)
        for b, t in enumerate(tokens):
            want, _ = model.forward([t], state)
            np.testing.assert_array_equal(rows[b], want)
