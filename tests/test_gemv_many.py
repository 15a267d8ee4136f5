"""kernels/linear.gemv_many: several GEMVs of one scheme in one parallel launch give exactly what separate calls
give, including odd shapes (rows not a multiple of the row block, columns padded to the group)."""
from __future__ import annotations

import numpy as np
import pytest

from rwkv_lite.kernels import linear
from rwkv_lite.kernels.linear import gemv_many
from rwkv_lite.schemes import get_scheme, make_matrix


def _matrix(name, params, R, C, seed):
    w = np.random.default_rng(seed).standard_normal((R, C), dtype=np.float32) / np.sqrt(C)
    scheme = get_scheme(name, **params)
    return make_matrix(name, scheme.params, scheme.quantize(w), (R, C))


@pytest.mark.parametrize("name, params", [("int8", {"group": 32}), ("int8", {"group": 64}), ("int8", {"group": 128}),
                                          ("int4", {"group": 32}), ("int4", {"group": 64}), ("int4", {"group": 128})])
@pytest.mark.parametrize("C", [520, 1024])
def test_one_launch_equals_separate_calls(name, params, C, monkeypatch):
    monkeypatch.setattr(linear, "PARALLEL_MIN_WEIGHTS", 1)          # small matrices, still the parallel path
    rows = [65, 130, 64, 300]
    matrices = [_matrix(name, params, R, C, seed) for seed, R in enumerate(rows)]
    assert all(m.parallel for m in matrices)
    rng = np.random.default_rng(9)
    xs = [rng.standard_normal(C, dtype=np.float32) for _ in rows]
    fused = gemv_many(matrices, xs)
    separate = [m(x) for m, x in zip(matrices, xs)]
    assert [y.shape for y in fused] == [(R,) for R in rows]
    for a, b in zip(fused, separate):
        np.testing.assert_array_equal(a, b)
    # and both are W x to the kernels' activation rounding
    for m, x, y in zip(matrices, xs, fused):
        want = m.rows(np.arange(m.shape[0])) @ x
        np.testing.assert_allclose(y, want, rtol=0, atol=2e-4 * np.abs(want).max())


def test_mixed_matrices_fall_back_to_separate_calls(monkeypatch):
    monkeypatch.setattr(linear, "PARALLEL_MIN_WEIGHTS", 1)
    matrices = [_matrix("int8", {}, 64, 256, 0), _matrix("int4", {}, 64, 256, 1), _matrix("fp16", {}, 32, 256, 2)]
    xs = [np.ones(256, np.float32)] * 3
    for a, m, x in zip(gemv_many(matrices, xs), matrices, xs):
        np.testing.assert_array_equal(a, m(x))


def test_wrong_input_width_is_an_error(monkeypatch):
    monkeypatch.setattr(linear, "PARALLEL_MIN_WEIGHTS", 1)
    matrices = [_matrix("int8", {}, 64, 256, s) for s in range(2)]
    with pytest.raises(ValueError):
        gemv_many(matrices, [np.ones(256, np.float32), np.ones(255, np.float32)])


def _panel_int8(R, C, seed):
    return _matrix("int8", {"group": 32, "layout": "p16"}, R, C, seed)


@pytest.mark.parametrize("dims, middles", [((96, 96, 64, 256), ("tanh", "linear", "linear", "sigmoid")),
                                           ((96, 80, 256), ("tanh", "linear", "sigmoid")),       # RWKV-7 layer 0
                                           ((40,), ("sigmoid",))])
def test_low_rank_chain_equals_its_steps(dims, middles):
    # RWKV-7's LoRAs of a decode step in one launch (kernels/panel.lora_chain): the same bits as the down
    # products, the compiled activation, then the up products, run one by one; widths that are not whole groups
    # or panels (80, 40) included, whose zero padding must stay zero after the sigmoid
    from rwkv_lite.arch.common import sigmoid, tanh
    C, R = 520, 300
    downs = [_panel_int8(D, C, seed) for seed, D in enumerate(dims)]
    ups = [_panel_int8(R, D, 10 + seed) for seed, D in enumerate(dims)]
    run = linear.chain_runner(downs, ups, middles)
    assert run is not None
    rng = np.random.default_rng(3)
    xs = [rng.standard_normal(C, dtype=np.float32) * 3 for _ in dims]
    act = {"tanh": tanh, "sigmoid": sigmoid, "linear": lambda h: h}
    want = [up(act[f](down(x)[None, :])[0]) for down, up, f, x in zip(downs, ups, middles, xs)]
    got = run(xs)
    assert [y.shape for y in got] == [(R,)] * len(dims)
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(got[0], ups[0](downs[0](xs[0])))       # the middle step is applied


def test_low_rank_chain_only_for_int8_panel_factors():
    fp = _matrix("fp32", {}, 64, 256, 0)
    up = _matrix("fp32", {}, 256, 64, 1)
    assert linear.chain_runner([fp], [up], ["tanh"]) is None
    assert linear.chain_runner([_panel_int8(64, 256, 0)], [up], ["tanh"]) is None
    assert linear.chain_runner([_panel_int8(64, 256, 0)], [_panel_int8(256, 32, 1)], ["tanh"]) is None   # 64 != 32
    assert linear.chain_runner([_panel_int8(64, 256, 0)], [_panel_int8(256, 64, 1)], ["tanh"]) is not None


def test_task_tables_cover_every_panel_once_in_tasks_of_similar_bytes():
    """The LoRA chain's up factors differ in width (RWKV-7 1.5B: 96, 96, 64, 256 columns): their tasks take more
    panels of the narrow ones, so that each of Numba's equal runs of tasks streams about as many bytes."""
    from rwkv_lite.kernels import panel
    npanels = np.array([128, 128, 128, 128], np.int64)
    panel_bytes = [96 * 16, 96 * 16, 64 * 16, 256 * 16]
    per_task = panel.balanced_panels_per_task(panel_bytes)
    assert per_task[3] == panel.PANELS_PER_TASK and per_task[2] > per_task[0] > per_task[3]
    tasks = panel.task_table_sized(npanels, per_task)
    for m in range(4):                                   # every panel exactly once, in order
        mine = tasks[tasks[:, 0] == m]
        assert mine[0, 1] == 0 and mine[-1, 2] == npanels[m] and (mine[1:, 1] == mine[:-1, 2]).all()
    task_bytes = [(b - a) * panel_bytes[m] for m, a, b in tasks]
    full = [t for t, (m, a, b) in zip(task_bytes, tasks) if b - a == per_task[m]]     # all but matrix ends
    assert max(full) / min(full) < 1.25
    half = len(tasks) // 2                               # two threads' runs of tasks
    first, second = sum(task_bytes[:half]), sum(task_bytes[half:])
    assert max(first, second) / min(first, second) < 1.2
    plain = panel.task_table(npanels)                    # the default table: equal panel counts
    plain_bytes = [(b - a) * panel_bytes[m] for m, a, b in plain]
    h = len(plain) // 2
    assert max(sum(plain_bytes[:h]), sum(plain_bytes[h:])) / min(sum(plain_bytes[:h]), sum(plain_bytes[h:])) > 1.5
