"""The panel-layout (p16) integer kernels: exact against a float64 evaluation of the same rounded activations,
bit-identical between one token, batches, prompts, thread counts and instruction-set paths."""
import numba
import numpy as np
import pytest
from numba import njit, prange

import rwkv_lite
from conftest import shared_file
from rwkv_lite.kernels import panel, simd
from rwkv_lite.schemes import get_scheme


def _matrix(kind, R, C, seed=0):
    rng = np.random.default_rng(seed)
    W = (rng.standard_normal((R, C)) * rng.uniform(0.2, 3, (R, 1))).astype(np.float32)
    scheme = get_scheme(kind, group=32, layout="p16")
    return scheme, scheme.matrix(scheme.quantize(W), (R, C))


def _reference(kind, scheme, m, X):
    """float64: the stored weights times the kernel's own rounded activations."""
    R, C = m.shape
    Cp = m.padded_cols
    W = scheme.dequantize({"": m.wp, ".scale" if kind == "int8" else ".groups":
                           m.words.view(np.float16) if kind == "int8" else m.words}, rows=R).astype(np.float64)
    digits = 2 if kind == "int8" else 1
    xq, xs, xsum = panel.quantize_rows(X, Cp, digits)
    q = xq.astype(np.int64)
    levels = q[:, :, :32] * 128 + q[:, :, 32:] if digits == 2 else q          # (groups, B, 32)
    np.testing.assert_array_equal(levels.sum(-1), xsum)
    Xr = (levels * xs[:, :, None].astype(np.float64)).transpose(1, 0, 2).reshape(X.shape[0], Cp)
    return Xr @ W.T


@pytest.mark.parametrize("kind", ["int8", "int4"])
@pytest.mark.parametrize("shape", [(64, 64), (40, 100), (257, 96), (48, 2048)])
def test_panel_matches_float64_and_batches_are_bit_identical(kind, shape):
    scheme, m = _matrix(kind, *shape)
    rng = np.random.default_rng(1)
    X = rng.standard_normal((70, shape[1])).astype(np.float32)       # 70 rows: more than one 64-row tile
    X[3] *= 1e-3
    X[5, :7] = 0
    Y = m(X)
    ref = _reference(kind, scheme, m, X)
    np.testing.assert_allclose(Y, ref, rtol=2e-5, atol=2e-5 * np.abs(ref).max())
    for b in (0, 3, 5, 63, 64, 69):
        np.testing.assert_array_equal(m(X[b]), Y[b])
    for B in (2, 7, 29):
        np.testing.assert_array_equal(m._matmul_rows(X[:B], parallel=True), Y[:B])
        np.testing.assert_array_equal(m._matmul_rows(X[:B], parallel=False), Y[:B])


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_few_panels_times_many_rows_split_by_rows_gives_the_same_bits(kind):
    # a LoRA-factor-sized matrix (6 panels: 2 tasks of panels) times prompt-sized row counts: gemm_parallel also
    # splits the rows over the threads, and every row must come out as the serial kernel computes it
    _, m = _matrix(kind, 96, 2048, seed=4)
    rng = np.random.default_rng(5)
    for B in (32, 70, 128):
        X = rng.standard_normal((B, 2048)).astype(np.float32)
        serial = panel.gemm_serial(m.int8, m.wp, m.words, X, m.padded_cols)
        for threads in (1, 2, 8):          # the task split follows the thread count it is given
            np.testing.assert_array_equal(panel.gemm_parallel(m.int8, m.wp, m.words, X, m.padded_cols, threads),
                                          serial)
        np.testing.assert_array_equal(m(X), serial[:, :96])


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_panel_results_do_not_depend_on_the_thread_count(kind):
    _, m = _matrix(kind, 1024, 512, seed=2)
    X = np.random.default_rng(3).standard_normal((9, 512)).astype(np.float32)
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = m(X), m(X[0])
        numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
        many = m(X), m(X[0])
    finally:
        numba.set_num_threads(before)
    np.testing.assert_array_equal(one[0], many[0])
    np.testing.assert_array_equal(one[1], many[1])
    np.testing.assert_array_equal(one[1], one[0][0])


def test_two_digit_activations_keep_15_bits_and_the_sign():
    rng = np.random.default_rng(4)
    X = (rng.standard_normal((3, 96)) * np.array([[1], [1e-20], [5e3]])).astype(np.float32)
    xq, xs, xsum = panel.quantize_rows(X, 96, 2)
    hi, lo = xq[:, :, :32].astype(np.int64), xq[:, :, 32:].astype(np.int64)
    assert np.abs(hi).max() <= 127 and np.abs(lo).max() <= 127
    assert ((hi == 0) | (lo == 0) | (np.sign(hi) == np.sign(lo))).all()
    wide, xs_wide, xsum_wide = panel.quantize_rows(X, 96, 2, True)      # the avx2 kernel's int16 form
    np.testing.assert_array_equal(wide.view(np.int16), hi * 128 + lo)
    np.testing.assert_array_equal(xs_wide, xs)
    np.testing.assert_array_equal(xsum_wide, xsum)
    approx = ((hi * 128 + lo) * xs[:, :, None]).transpose(1, 0, 2).reshape(3, 96)
    amax = np.abs(X).reshape(3, 3, 32).max(-1).repeat(32, axis=1)
    assert (np.abs(approx - X) <= amax / 16256 * 0.5001).all()


def _rounded_in_numpy(X, cols, digits):
    """quantize_rows's definition in NumPy: per row and 32-column group (zero-padded to `cols`), levels =
    rint(x * (L / max|x|)) with L = 127 or 16256, scale max|x| / L; NaN scale for a non-finite group, zeros for
    max|x| < 1e-30."""
    B, C = X.shape
    Xp = np.zeros((B, cols), np.float32)
    Xp[:, :C] = X
    L = np.float32(127 if digits == 1 else 16256)
    levels, scales = np.zeros((cols // 32, B, 32), np.int64), np.zeros((cols // 32, B), np.float32)
    for g in range(cols // 32):
        for b in range(B):
            v = Xp[b, 32 * g: 32 * g + 32]
            amax = np.abs(v).max()
            if not np.isfinite(amax):
                scales[g, b] = np.nan
            elif amax >= np.float32(1e-30):
                levels[g, b] = np.rint(v * (L / amax)).astype(np.int64)
                scales[g, b] = amax / L
    return levels, scales


@pytest.mark.parametrize("digits,wide", [(1, False), (2, False), (2, True)])
def test_activation_rounding_is_exactly_its_numpy_definition(digits, wide):
    # every value rounded from one IEEE product x * (L / max|x|), whatever the row count, width or compile-time
    # constants of the caller (a fast-math version once folded the division into the products differently for
    # different callers); ties, a partial last group, non-finite and tiny groups included
    rng = np.random.default_rng(6)
    X = (rng.standard_normal((7, 200)) * rng.choice([1e-3, 1.0, 40.0], (7, 1))).astype(np.float32)
    X[0, 3], X[1, 40], X[2, 100] = np.nan, np.inf, -np.inf
    X[3, :32] = 0
    X[3, 64:96] = 1e-35
    L = 127 if digits == 1 else 16256                             # every group's max |x| = L, so x * (L / L)
    X[4] = rng.integers(-2 * L + 1, 2 * L, 200) * np.float32(0.5)   # is x: half-integers, exact ties for rint
    X[4, ::32] = L
    X[5, 7] = 3.4e38
    want, scales = _rounded_in_numpy(X, 224, digits)
    xq, xs, xsum = panel.quantize_rows(X, 224, digits, wide)
    if wide:
        levels = xq.view(np.int16).astype(np.int64)
    elif digits == 2:
        hi, lo = xq[:, :, :32].astype(np.int64), xq[:, :, 32:].astype(np.int64)
        assert ((hi == 0) | (lo == 0) | (np.sign(hi) == np.sign(lo))).all()      # hi toward zero
        levels = 128 * hi + lo
    else:
        levels = xq.astype(np.int64)
    np.testing.assert_array_equal(levels, want)
    np.testing.assert_array_equal(xs, scales)
    np.testing.assert_array_equal(xsum, want.sum(-1))
    for b in (0, 4, 6):                                            # a row rounds the same alone or among others
        one = panel.quantize_rows(X[b:b + 1], 224, digits, wide)
        for a, full in zip(one, (xq, xs, xsum)):
            np.testing.assert_array_equal(a[:, 0], full[:, b])
    strided = np.asfortranarray(X)                                 # any memory order
    for a, full in zip(panel.quantize_rows(strided, 224, digits, wide), (xq, xs, xsum)):
        np.testing.assert_array_equal(a, full)


def test_nan_and_inf_activations_give_nan_zeros_give_zero():
    _, m = _matrix("int4", 32, 64)
    x = np.zeros(64, np.float32)
    assert (m(x) == 0).all()
    x[40] = np.nan
    assert np.isnan(m(x)).all()
    x[40] = np.inf
    assert np.isnan(m(x)).all()
    x[40] = 1e-38                                       # a group too small to scale: flushed to zero
    assert (m(x) == 0).all()


def _driver(kind, isa, single):
    kernel = panel.make_panel_kernel("i8" if kind == "int8" else "i4", single, isa=isa)

    @njit
    def run(wp, wd, xq, xs, xsum, Y, acc):
        for b in range(xq.shape[1]) if single else range(1):
            for p in range(wp.shape[0]):
                if single:
                    kernel(wp, wd, p, xq, xs, xsum, b, b + 1, acc, Y)
                else:
                    kernel(wp, wd, p, xq, xs, xsum, 0, xq.shape[1], acc, Y)
    return run


@pytest.mark.parametrize("kind", ["int8", "int4"])
@pytest.mark.parametrize("isa", panel.usable_isas())
def test_every_instruction_set_path_gives_the_same_bits(kind, isa):
    _, m = _matrix(kind, 48, 160, seed=5)
    X = np.random.default_rng(6).standard_normal((5, 160)).astype(np.float32)
    expect = m(X)
    wide = isa == "avx2" and kind == "int8"
    xq, xs, xsum = panel.quantize_rows(X, m.padded_cols, 2 if kind == "int8" else 1, wide)
    acc = panel._aligned_scratch(5)
    for single in (True, False):
        Y = np.full((5, m.npanels * 16), np.nan, np.float32)
        _driver(kind, isa, single)(m.wp, m.words, xq, xs, xsum, Y, acc)
        np.testing.assert_array_equal(Y[:, :48], expect, err_msg=f"{isa} single={single}")


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_a_row_major_file_converts_to_p16_without_rounding_again(tmp_path, monkeypatch, quant):
    """Files from before the panel layout: `convert old new --quant Q` re-lays their matrices out; the result is
    the file a fresh conversion of the checkpoint writes (same stored values, same logits)."""
    from rwkv_lite.errors import FormatError
    from rwkv_lite.format import read_model_file
    from rwkv_lite.quantize import convert as convert_module
    src = shared_file("rwkv-cpp-tiny", "tiny-rwkv-5v2-730K-FP32.bin")
    fresh = rwkv_lite.convert(src, tmp_path / "fresh.st", quant)
    monkeypatch.setattr(convert_module, "_matrix_scheme",
                        lambda q, group=None: get_scheme(q, **({"group": group} if group else {})))
    old = rwkv_lite.convert(src, tmp_path / "old.st", quant)
    monkeypatch.undo()
    new = rwkv_lite.convert(old, tmp_path / "new.st", quant)
    f_old, f_new, f_fresh = read_model_file(old), read_model_file(new), read_model_file(fresh)
    try:
        layouts = {rec["params"].get("layout") for rec in f_new.tensors.values() if rec["role"] == "matrix"}
        assert layouts == {"p16"}
        assert {rec["params"].get("layout") for rec in f_old.tensors.values()} == {None}
        for name in f_fresh.arrays:
            np.testing.assert_array_equal(f_new.arrays[name], f_fresh.arrays[name], err_msg=name)
    finally:
        for f in (f_old, f_new, f_fresh):
            f.close()
    ids = list(b"In the beginning")
    np.testing.assert_array_equal(rwkv_lite.load(new).forward(ids)[0], rwkv_lite.load(fresh).forward(ids)[0])
    other = "int4" if quant == "int8" else "int8"
    with pytest.raises(FormatError, match="old.st: tensor .* already quantized file converts only"):
        rwkv_lite.convert(old, tmp_path / "x.st", other)


@njit(parallel=True, cache=False)
def _first_worker_held(tasks, spin_limit):
    """Two workers sharing out `tasks` with simd.claim_task; worker 0 holds on to its first task until the others
    are all taken (or spin_limit reads have passed). Returns how many times each worker ran each task."""
    cursors, done = simd.task_cursors(2), simd.task_cursors(1)
    ran = np.zeros((2, tasks), np.int64)
    for w in prange(2):
        t = simd.claim_task(cursors, w, tasks, 2)
        while t >= 0:
            ran[w, t] += 1
            if w == 0:
                spins = 0
                while simd.fetch_add(done, 0, np.int64(0)) < tasks - 1 and spins < spin_limit:
                    spins += 1
            simd.fetch_add(done, 0, np.int64(1))
            t = simd.claim_task(cursors, w, tasks, 2)
    return ran


@pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="needs two threads")
def test_a_slow_worker_leaves_the_rest_of_its_run_to_the_others():
    # the drivers' workers share out tasks with simd.claim_task: a worker held up on its first task (a slower core)
    # does not keep the rest of its run waiting, and every task runs exactly once
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(2)
        ran = _first_worker_held(64, 10 ** 9)
    finally:
        numba.set_num_threads(before)
    np.testing.assert_array_equal(ran.sum(0), np.ones(64, np.int64))
    assert ran[0, 0] == 1 and ran[0].sum() == 1          # with Numba's own split, worker 0 would run tasks 0-31
    assert ran[1, 1:].sum() == 63


def test_a_worker_takes_its_own_run_in_order_then_the_others():
    cursors = simd.task_cursors(3)
    assert simd.claim_task(cursors, 2, 10, 3) == 8                  # 10 tasks in runs of 4: 0-3, 4-7, 8-9
    order = []
    while (t := simd.claim_task(cursors, 0, 10, 3)) >= 0:
        order.append(t)
    assert order == [0, 1, 2, 3, 4, 5, 6, 7, 9]
    assert simd.claim_task(cursors, 1, 10, 3) == -1
