"""Calibration files (quantize/calibrate.py), GPTQ (quantize/gptq.py) and `convert --calibration`."""
from __future__ import annotations

import gc
import hashlib

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import shared_file
import rwkv_lite
from rwkv_lite import cli
from rwkv_lite.errors import FormatError
from rwkv_lite.quantize import calibrate as calibrate_module
from rwkv_lite.quantize.calibrate import Calibration, calibrate, load_calibration
from rwkv_lite.quantize.gptq import _reversed_cholesky, gptq_int4
from rwkv_lite.schemes import Int4
from rwkv_lite.schemes.int4 import scale_and_zero


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, convert_once):
    folder = tmp_path_factory.mktemp("calib")
    src = shared_file("rwkv-cpp-tiny", "tiny-rwkv-5v2-730K-FP32.bin")
    model = rwkv_lite.load(convert_once(src, "int8"))
    return src, model, folder


def _correlated(rng, T, C):
    return rng.standard_normal((T, C)).astype(np.float32) @ rng.standard_normal((C, C)).astype(np.float32)


def test_gptq_lowers_output_error_and_keeps_the_int4_layout():
    rng = np.random.default_rng(0)
    X = _correlated(rng, 600, 160)                     # 160 columns: groups of 32, padded to 192
    W = rng.standard_normal((48, 160)).astype(np.float32)
    scheme = Int4(32)
    parts = gptq_int4(W, X.T @ X, scheme)
    assert {k: (a.dtype, a.shape) for k, a in parts.items()} == \
        {k: (np.dtype(dt), sh) for k, (dt, sh) in scheme.parts(W.shape).items()}
    gptq = scheme.dequantize(parts, 160)
    plain = scheme.dequantize(scheme.quantize(W), 160)
    err_gptq = np.linalg.norm((W - gptq) @ X.T)
    err_plain = np.linalg.norm((W - plain) @ X.T)
    assert err_gptq < 0.85 * err_plain, (err_gptq, err_plain)
    # every value is one of the 16 levels of its group's scale and zero point
    d, z = scale_and_zero(parts[".groups"])
    d, z = np.repeat(d, 32, axis=1)[:, :160], np.repeat(z, 32, axis=1)[:, :160]
    levels = gptq / d + z
    np.testing.assert_allclose(levels, np.clip(np.rint(levels), 0, 15), rtol=0, atol=1e-3)


def test_reversed_cholesky_factor_is_upper_and_reproduces_h():
    """GPTQ's compensation uses V, upper triangular with H = V V^T (blocked factorisation: C spans several blocks)."""
    rng = np.random.default_rng(3)
    X = _correlated(rng, 700, 600)
    H = X.T @ X
    dead = np.zeros(600, bool)
    V = _reversed_cholesky(H, dead, 1.0)
    assert np.array_equal(V, np.triu(V))
    np.testing.assert_allclose(V.astype(np.float64) @ V.T, H + np.eye(600), rtol=0, atol=2e-4 * np.abs(H).max())


def test_gptq_falls_back_to_weighted_rounding_when_h_is_not_positive_definite():
    W = np.random.default_rng(4).standard_normal((4, 64)).astype(np.float32)
    H = np.full((64, 64), 10.0, np.float32) - 9.0 * np.eye(64, dtype=np.float32)   # diagonal 1, strongly indefinite
    with pytest.warns(UserWarning, match="blocks.0.ffn.key.weight"):
        parts = gptq_int4(W, H, Int4(32), name="blocks.0.ffn.key.weight")
    expected = Int4(32).quantize(W, np.ones(64, np.float32))
    for key in expected:
        np.testing.assert_array_equal(parts[key], expected[key])


def test_gptq_ignores_columns_no_input_reaches():
    rng = np.random.default_rng(1)
    X = _correlated(rng, 300, 64)
    X[:, 10] = 0
    W = rng.standard_normal((8, 64)).astype(np.float32)
    out = Int4(32).dequantize(gptq_int4(W, X.T @ X, Int4(32)), 64)
    assert np.isfinite(out).all()


def test_calibration_round_trip_and_both_records(tiny, tmp_path):
    src, model, _ = tiny
    text = shared_file("text", "kjv-bible.txt").read_bytes()[:4000]
    calib = calibrate(model, text, tokens=600, text_name="kjv")
    assert calib.tokens == 600 and calib.source["tokens"] == 600
    # C = 64 or 256 <= 600 / 2 tokens: H is stored; with fewer than 2 C tokens, the inputs themselves
    assert all(k.endswith(".h") for k in calib.arrays)
    small = calibrate(model, text, tokens=200, text_name="kjv")
    assert any(k.endswith(".x") for k in small.arrays) and any(k.endswith(".h") for k in small.arrays)
    name = "blocks.3.ffn.value.weight"                  # 256 input columns > 200 / 2: recorded as X
    X = small.arrays[name + ".x"].astype(np.float32)
    np.testing.assert_allclose(small.hessian(name, 256), X.T @ X, rtol=1e-6)
    path = calib.save(tmp_path / "c.npz")
    back = load_calibration(path)
    assert back.tokens == 600 and back.source == calib.source and back.names() == calib.names()
    for k, a in calib.arrays.items():
        np.testing.assert_array_equal(back.arrays[k], a)
    assert not list(tmp_path.glob("*.tmp*"))


@pytest.mark.parametrize("make, message", [
    (lambda f: f.write(b"not a zip"), "not a calibration file"),
    (lambda p: np.savez(p, x=np.array([object()], dtype=object)), "not a calibration file"),
    (lambda p: np.savez(p, __tokens__=np.int64(3), **{"a.weight.h": np.ones((2, 2), np.float64)}), "expected float32"),
    (lambda p: np.savez(p, __tokens__=np.int64(3), **{"a.weight.h": np.full((2, 2), np.nan, np.float32)}), "NaN"),
    (lambda p: np.savez(p, __tokens__=np.int64(3), **{"a.weight.q": np.ones((2, 2), np.float32)}), "unexpected"),
    (lambda p: np.savez(p, **{"a.weight.h": np.ones((2, 2), np.float32)}), "no token count"),
])
def test_bad_calibration_files_are_refused_in_one_line(tmp_path, make, message):
    path = tmp_path / "bad.npz"
    with open(path, "wb") as f:
        make(f)
    with pytest.raises(FormatError) as info:
        load_calibration(path)
    assert message in str(info.value) and str(path) in str(info.value) and "\n" not in str(info.value)


def test_convert_checks_calibration_against_the_checkpoint(tiny, tmp_path):
    src, model, _ = tiny
    calib = calibrate(model, b"In the beginning " * 40, tokens=300)
    wrong_name = Calibration({"blocks.99.att.key.weight.h": np.eye(64, dtype=np.float32)}, 300, {})
    wrong_width = Calibration({"blocks.0.att.key.weight.h": np.eye(32, dtype=np.float32)}, 300, {})
    for bad, message in ((wrong_name, "does not have"), (wrong_width, "columns")):
        path = bad.save(tmp_path / "bad.npz")
        with pytest.raises(FormatError, match=message):
            rwkv_lite.convert(src, tmp_path / "out.st", "int4", calibration=path)
        assert not (tmp_path / "out.st").exists()
    good = calib.save(tmp_path / "good.npz")
    with pytest.raises(FormatError, match="int4"):
        rwkv_lite.convert(src, tmp_path / "out.st", "int8", calibration=good)


def test_cli_calibrate_then_convert(tiny, tmp_path):
    src, model, _ = tiny
    text = tmp_path / "sample.txt"
    text.write_text("And God said, Let there be light: and there was light. " * 20, encoding="utf-8")
    runner = CliRunner()
    r = runner.invoke(cli.main, ["calibrate", str(model.path), str(text), "-o", str(tmp_path / "c.npz"),
                                 "--tokens", "500"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(cli.main, ["convert", str(src), str(tmp_path / "g.st"), "--quant", "int4", "--quiet",
                                 "--calibration", str(tmp_path / "c.npz")])
    assert r.exit_code == 0, r.output
    out = rwkv_lite.load(tmp_path / "g.st")
    prov = out.metadata["provenance"]
    assert prov["calibration"]["file"] == "c.npz" and prov["calibration"]["tokens"] == 500
    assert prov["calibration"]["text"] == "sample.txt" and len(prov["calibration"]["text_sha256"]) == 64
    logits, _ = out.forward(list(b"light"))
    assert np.isfinite(logits).all()
    r = runner.invoke(cli.main, ["info", str(tmp_path / "g.st")])
    assert "calibrated    int4 by GPTQ on 500 tokens of sample.txt" in r.output
    r = runner.invoke(cli.main, ["calibrate", str(model.path), str(tmp_path / "missing.txt"), "-o",
                                 str(tmp_path / "x.npz")])
    assert r.exit_code == 1 and "missing.txt" in r.output and not (tmp_path / "x.npz").exists()


def test_loaded_calibration_reads_arrays_lazily_and_saves_again(tiny, tmp_path):
    src, model, _ = tiny
    calib = calibrate(model, b"In the beginning God created the heaven and the earth. " * 20, tokens=600)
    back = load_calibration(calib.save(tmp_path / "a.npz"))
    assert all(v is None for v in dict.values(back.arrays))          # nothing read yet
    again = load_calibration(back.save(tmp_path / "b.npz"))
    for key in calib.arrays:
        np.testing.assert_array_equal(again.arrays[key], calib.arrays[key])


@pytest.mark.parametrize("name", ["tiny-rwkv-4v0-660K-FP32.bin", "tiny-rwkv-7v0-834K-FP32.bin"])
def test_calibration_records_every_matrix_of_other_versions(tmp_path, name):
    model = rwkv_lite.load(rwkv_lite.convert(shared_file("rwkv-cpp-tiny", name), tmp_path / "m.st", "fp32"))
    calib = calibrate(model, b"In the beginning God created the heaven and the earth. " * 10, tokens=200)
    matrices = sorted(n for n, info in model.metadata["tensors"].items() if info["role"] == "matrix")
    assert calib.names() == matrices


def test_inputs_are_staged_on_disk_and_the_h_sums_are_capped(tiny, tmp_path, monkeypatch):
    """Inputs go to memory-mapped files in workdir (removed with the Calibration); H sums stop at the budget."""
    src, model, _ = tiny
    matrices = sorted(n for n, info in model.metadata["tensors"].items() if info["role"] == "matrix")
    monkeypatch.setattr(calibrate_module, "H_MEMORY_BYTES", 3 * 8 * 64 * 64)      # room for three 64-wide H
    calib = calibrate(model, b"And God said, Let there be light: and there was light. " * 20, tokens=600,
                      workdir=tmp_path)
    assert calib.names() == matrices
    assert sum(k.endswith(".h") for k in calib.arrays) == 3
    staged = [a for k, a in calib.arrays.items() if k.endswith(".x")]
    assert len(staged) == len(matrices) - 3 and all(isinstance(a, np.memmap) and a.shape[0] == 600 for a in staged)
    (folder,) = tmp_path.glob("rwkv-lite-calibrate-*")
    assert len(list(folder.iterdir())) == len(staged)
    back = load_calibration(calib.save(tmp_path / "c.npz"))
    for key, arr in calib.arrays.items():
        np.testing.assert_array_equal(back.arrays[key], arr)
    del calib, staged, arr
    gc.collect()
    assert not folder.exists()


def test_inputs_beyond_float16_are_kept_in_float32(tmp_path):
    recorder = calibrate_module._Recorder(tokens=4, folder=str(tmp_path))
    small = np.array([[1.5, -2.0, 3.0]], np.float32)
    large = np.array([[1e5, 0.25, -7.0]], np.float32)
    recorder.add("m", small)
    recorder.add("m", large)
    x = recorder.arrays()["m.x"]
    assert x.dtype == np.float32
    np.testing.assert_array_equal(x, np.concatenate([small, large]))


def test_cli_max_bytes_reads_a_prefix_and_records_it(tiny, tmp_path):
    src, model, _ = tiny
    text = tmp_path / "sample.txt"
    text.write_text("Und Gott sprach: Es werde Licht! Und es ward Licht. \u00e4\u00f6\u00fc " * 30, encoding="utf-8")
    data = text.read_bytes()
    cut = data.index("\u00e4".encode()) + 1                    # inside a two-byte character: it is dropped
    runner = CliRunner()
    r = runner.invoke(cli.main, ["calibrate", str(model.path), str(text), "-o", str(tmp_path / "c.npz"),
                                 "--max-bytes", str(cut)])
    assert r.exit_code == 0, r.output
    source = load_calibration(tmp_path / "c.npz").source
    assert source["text_bytes"] == cut - 1 and source["tokens"] == cut - 1          # byte tokenizer: 1 byte = 1 token
    assert source["text_sha256"] == hashlib.sha256(data[:cut - 1]).hexdigest()
    assert not list(tmp_path.glob("rwkv-lite-calibrate-*"))   # the staging folder is gone
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"light \xff\xfe light " * 20)
    r = runner.invoke(cli.main, ["calibrate", str(model.path), str(bad), "-o", str(tmp_path / "d.npz"),
                                 "--max-bytes", "100"])
    assert r.exit_code == 1 and "not UTF-8" in r.output and not (tmp_path / "d.npz").exists()
