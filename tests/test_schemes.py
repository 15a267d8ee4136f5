"""Storage schemes (rwkv_lite/schemes/): layouts, round-trip error bounds, row separability, quality."""
from __future__ import annotations

import struct

import numpy as np
import pytest

from rwkv_lite.errors import FormatError
from rwkv_lite.schemes import SchemeError, get_scheme

from conftest import shared_file

SHAPES = [(37, 96), (1, 64), (65, 200), (8, 4096)]
SCHEMES = [("fp32", {}), ("fp16", {}), ("int8", {"group": 0}), ("int8", {"group": 32}), ("int8", {"group": 64}),
           ("int4", {"group": 32}), ("int4", {"group": 64}), ("int4", {"group": 128})]


def weights(shape, seed=0):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(shape).astype(np.float32) * 0.05
    w[:, 0] = 0.4                                  # an outlier column and a negative one
    w[:, -1] = -0.3
    return w


def tiny_matrices():
    """The 2-D block matrices of the real tiny v5.2 model (rwkv.cpp FP32 file; read by rwkv_lite/quantize/readers/rwkv_cpp.py)."""
    data = shared_file("rwkv-cpp-tiny", "tiny-rwkv-5v2-730K-FP32.bin").read_bytes()
    assert struct.unpack_from("<i", data, 0)[0] == 0x67676D66
    off, out = 24, {}
    while off < len(data):
        ndim, klen, dtype = struct.unpack_from("<3i", data, off)
        dims = struct.unpack_from(f"<{ndim}i", data, off + 12)[::-1]
        off += 12 + 4 * ndim
        key = data[off:off + klen].decode()
        off += klen
        n = int(np.prod(dims))
        assert dtype == 0
        if ndim == 2 and key.startswith("blocks."):
            out[key] = np.frombuffer(data, np.float32, n, off).reshape(dims).copy()
        off += 4 * n
    return out


def q4_0_like(w):
    """ggml Q4_0 round trip (blocks of 32, scale = signed max / -8 in fp16, q = clamp(x/d + 8.5) - 8): 4.5 b/w."""
    R, C = w.shape
    b = w.reshape(R, C // 32, 32)
    idx = np.abs(b).argmax(-1)[..., None]
    d = (np.take_along_axis(b, idx, -1) / -8).astype(np.float16).astype(np.float32)
    inv = np.divide(1, d, out=np.zeros_like(d), where=d != 0)
    q = np.minimum(15, (b * inv + 8.5).astype(np.int8))
    return ((q - 8) * d).reshape(R, C)


def rel_rmse(ws, approx):
    return np.sqrt(sum(((w - approx(w)) ** 2).sum() for w in ws) / sum((w ** 2).sum() for w in ws))


def roundtrip(scheme, w):
    return scheme.dequantize(scheme.quantize(w))[:, : w.shape[1]]


@pytest.mark.parametrize("name,params", SCHEMES)
@pytest.mark.parametrize("shape", SHAPES)
def test_parts_match_declared_layout(name, params, shape):
    scheme = get_scheme(name, **params)
    parts = scheme.quantize(weights(shape))
    declared = scheme.parts(shape)
    assert set(parts) == set(declared)
    for suffix, (dtype, part_shape) in declared.items():
        assert parts[suffix].dtype == dtype and parts[suffix].shape == part_shape, suffix
        assert part_shape[0] == shape[0]                          # every part is row-major in R
    assert scheme.params == params


@pytest.mark.parametrize("name,params", SCHEMES)
def test_row_blocks_quantize_like_the_whole(name, params):
    scheme = get_scheme(name, **params)
    w = weights((65, 200), seed=3)
    whole = scheme.quantize(w)
    for a, b in [(0, 1), (1, 17), (17, 64), (64, 65)]:
        block = scheme.quantize(w[a:b])
        for suffix, arr in whole.items():
            np.testing.assert_array_equal(block[suffix], arr[a:b])


def test_fp_roundtrips_are_exact_to_their_rounding():
    w = weights((37, 96))
    np.testing.assert_array_equal(roundtrip(get_scheme("fp32"), w), w)
    np.testing.assert_array_equal(roundtrip(get_scheme("fp16"), w), w.astype(np.float16).astype(np.float32))


@pytest.mark.parametrize("group", [32, 64, 128])
def test_group_scaled_int8_error_is_at_most_half_a_step(group):
    scheme = get_scheme("int8", group=group)
    w = weights((65, 200), seed=1)
    parts = scheme.quantize(w)
    d = np.repeat(parts[".scale"].astype(np.float32), group, 1)[:, :200]
    amax = np.repeat(np.abs(np.pad(w, ((0, 0), (0, 56)))).reshape(65, -1, group).max(-1), group, 1)[:, :200]
    # the scale is max|group| / 127 clipped by at most 20%, rounded to fp16
    assert (d <= amax / 127 * 1.001).all() and (d >= amax / 127 * 0.799).all()
    err = np.abs(scheme.dequantize(parts, cols=200) - w)
    inside = np.abs(w) <= 127 * d
    assert (err[inside] <= d[inside] * (0.5 + 1e-4)).all()
    assert (err[~inside] <= np.abs(w[~inside]) - 127 * d[~inside] + 1e-7).all()   # clipped to the end


def test_int8_error_is_at_most_half_a_step():
    scheme = get_scheme("int8", group=0)
    w = weights((65, 200), seed=1)
    parts = scheme.quantize(w)
    scale = parts[".scale"]
    np.testing.assert_allclose(scale, np.abs(w).max(1) / 127, rtol=1e-6)
    err = np.abs(scheme.dequantize(parts) - w)
    assert (err <= scale[:, None] * (0.5 + 1e-5)).all()
    assert np.abs(parts[""]).max() == 127


def int4_levels(parts, group, C):
    """Per element: the group's scale d and the ends of its level grid d*(0 - z), d*(15 - z)."""
    words = parts[".groups"].astype(np.int64)
    d = (1 + (words & 15) / 16) * 2.0 ** (((words >> 4) & 31) - 24)
    z = (words >> 9) / 8
    d, z = np.repeat(d, group, 1)[:, :C], np.repeat(z, group, 1)[:, :C]
    return d, d * -z, d * (15 - z)


@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("shape", [(37, 96), (65, 200), (4, 4096)])
def test_int4_rounds_to_the_nearest_level_of_its_group(group, shape):
    scheme = get_scheme("int4", group=group)
    w = weights(shape, seed=2)
    parts = scheme.quantize(w)
    approx = scheme.dequantize(parts, cols=shape[1])
    d, low, high = int4_levels(parts, group, shape[1])
    inside = (w >= low) & (w <= high)
    err = np.abs(approx - w)
    # inside its group's grid an element is off by at most half a step; outside (clipped) it sits on the end
    assert (err[inside] <= d[inside] * (0.5 + 1e-4)).all()
    clipped = np.where(w < low, low, high)
    np.testing.assert_allclose(approx[~inside], clipped[~inside], rtol=1e-5, atol=1e-7)
    # the least-squares search may clip a group's extremes, but not far: measured at most 1.71 steps
    assert (err <= d * 2).all()
    assert (~inside).mean() < 0.06


def test_int4_special_rows():
    scheme = get_scheme("int4", group=32)
    w = np.zeros((3, 64), np.float32)
    w[1] = 0.25                                     # constant positive row: levels must reach up from 0
    w[2, :32] = -1e-9                               # values below the smallest scale step
    approx = roundtrip(scheme, w)
    assert (approx[0] == 0).all()
    np.testing.assert_allclose(approx[1], 0.25, rtol=0.02)
    assert np.abs(approx[2]).max() <= 1e-7


@pytest.mark.parametrize("name,params,shape,bits", [
    ("fp32", {}, (64, 64), 32.0), ("fp16", {}, (64, 64), 16.0),
    ("int8", {"group": 0}, (4096, 4096), 8 + 32 / 4096), ("int8", {"group": 0}, (64, 64), 8.5),
    ("int8", {}, (64, 64), 8.5),
    ("int8", {"group": 32}, (4096, 4096), 8.5), ("int8", {"group": 64}, (4096, 4096), 8.25),
    ("int4", {"group": 32}, (4096, 4096), 4.5), ("int4", {"group": 64}, (4096, 14336), 4.25),
    ("int4", {"group": 128}, (4096, 4096), 4.125), ("int4", {"group": 32}, (64, 64), 4.5),
    ("int4", {"group": 32}, (65, 200), (128 * 8 + 8 * 16) / 200),          # padded to 256 columns
])
def test_bits_per_weight(name, params, shape, bits):
    assert get_scheme(name, **params).bits_per_weight(shape) == pytest.approx(bits)


def test_int4_beats_q4_0_at_equal_bits_on_gaussian_weights():
    w = np.random.default_rng(5).standard_normal((64, 4096)).astype(np.float32)
    ours = rel_rmse([w], lambda m: roundtrip(get_scheme("int4", group=32), m))
    baseline = rel_rmse([w], q4_0_like)
    assert ours < 0.88 * baseline, (ours, baseline)           # measured: 0.0726 vs 0.0860


def test_int4_beats_q4_0_at_equal_bits_on_real_tiny_model_weights():
    mats = list(tiny_matrices().values())
    assert len(mats) == 12 * 8
    ours = rel_rmse(mats, lambda m: roundtrip(get_scheme("int4", group=32), m))
    baseline = rel_rmse(mats, q4_0_like)
    assert ours < 0.88 * baseline, (ours, baseline)           # measured: 0.0726 vs 0.0857
    assert rel_rmse(mats, lambda m: roundtrip(get_scheme("int8", group=0), m)) < 0.007
    assert rel_rmse(mats, lambda m: roundtrip(get_scheme("int8"), m)) < 0.0056         # Q8_0-like: 0.00535


@pytest.mark.parametrize("name,params", [("int5", {}), ("int4", {"group": 48}), ("int4", {"group": "32"}),
                                         ("int4", {"grp": 32}), ("int8", {"clip": "mse"}), ("int8", {"group": 16}),
                                         ("fp16", {"x": 1})])
def test_bad_scheme_names_and_params(name, params):
    with pytest.raises(SchemeError) as info:
        get_scheme(name, **params)
    assert isinstance(info.value, FormatError) and isinstance(info.value, ValueError)


@pytest.mark.parametrize("name", ["fp16", "int8", "int4"])
def test_non_finite_weights_are_refused(name):
    w = weights((4, 64))
    w[2, 5] = np.nan
    with pytest.raises(SchemeError, match="NaN or Inf"):
        get_scheme(name).quantize(w)


def test_fp16_overflow_is_refused():
    with pytest.raises(SchemeError, match="float16 range"):
        get_scheme("fp16").quantize(np.full((1, 4), 1e6, np.float32))


def test_int4_importance_weighting_lowers_the_weighted_error():
    """Int4.quantize(rows, importance) (calibration's per-column input energy) minimises sum importance * error^2:
    lower weighted error than the unweighted search; all-ones importance is the unweighted search exactly."""
    rng = np.random.default_rng(2)
    W = rng.standard_normal((256, 64)).astype(np.float32)
    importance = np.exp(rng.standard_normal(64) * 2).astype(np.float32)
    s = get_scheme("int4", group=32)
    plain = s.dequantize(s.quantize(W), 64)
    weighted = s.dequantize(s.quantize(W, importance), 64)
    werr = lambda Q: float(((W - Q) ** 2 * importance).sum())      # noqa: E731
    assert werr(weighted) < 0.97 * werr(plain), (werr(weighted), werr(plain))
    np.testing.assert_array_equal(s.quantize(W, np.ones(64))[".groups"], s.quantize(W)[".groups"])
    for bad in (np.ones(63), np.zeros(64), np.full(64, np.nan)):
        with pytest.raises(SchemeError):
            s.quantize(W, bad)


@pytest.mark.parametrize("name,params", SCHEMES)
def test_a_scheme_opens_its_own_parts_from_a_files_arrays(name, params):
    """Scheme.open: the parts of tensor `name` found as `name + suffix` give the scheme's runtime matrix, which
    computes what dequantize says; a missing or mis-shaped array is refused naming it."""
    scheme = get_scheme(name, **params)
    w = weights((24, 100), seed=5)
    arrays = {"blocks.0.att.key.weight" + suffix: arr for suffix, arr in scheme.quantize(w).items()}
    matrix = scheme.open("blocks.0.att.key.weight", arrays, (24, 100))
    assert matrix.scheme == name and matrix.shape == (24, 100)
    np.testing.assert_array_equal(matrix.rows(np.arange(24)), scheme.dequantize(scheme.quantize(w), 100))
    for suffix in scheme.parts((24, 100)):
        full = "blocks.0.att.key.weight" + suffix
        with pytest.raises(SchemeError, match=f"{full!r} is missing"):
            scheme.open("blocks.0.att.key.weight", {k: v for k, v in arrays.items() if k != full}, (24, 100))
        with pytest.raises(SchemeError, match=f"{full!r} is .*expected"):
            scheme.open("blocks.0.att.key.weight", {**arrays, full: arrays[full][:-1]}, (24, 100))
