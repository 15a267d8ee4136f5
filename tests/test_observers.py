"""Forward observers (arch/common.py): every product with a stored matrix is reported as (tensor name, input rows),
in sequence mode, in single-token decode (fused launches included) and in batched decode; calibration is built on
them."""
from __future__ import annotations

import threading
from collections import Counter

import numpy as np
import pytest

from conftest import shared_file
import rwkv_lite
import rwkv_lite.model
from rwkv_lite.kernels import linear
from rwkv_lite.quantize import calibrate as calibrate_module
from rwkv_lite.quantize.calibrate import calibrate

FIXTURES = {"4": "tiny-rwkv-4v0-660K-FP32.bin", "5.1": "tiny-rwkv-5v1-730K-FP32.bin",
            "5.2": "tiny-rwkv-5v2-730K-FP32.bin", "6": "tiny-rwkv-6v0-3m-Q5_1.bin", "7": "tiny-rwkv-7v0-834K-FP32.bin"}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Lazily converted int8 files of the tiny rwkv.cpp models, one per version."""
    folder = tmp_path_factory.mktemp("observers")
    paths = {}

    def get(version):
        if version not in paths:
            src = shared_file("rwkv-cpp-tiny", FIXTURES[version])
            paths[version] = rwkv_lite.convert(src, folder / f"{version}-int8.st", "int8")
        return paths[version]
    return get


def matrix_names(model) -> set[str]:
    return {name for name, info in model.metadata["tensors"].items() if info.get("role") == "matrix"}


class Log:
    """An observer that keeps every (name, copy of X) it is shown."""

    def __init__(self):
        self.calls = []

    def __call__(self, name, X):
        assert X.dtype == np.float32 and X.ndim == 2
        self.calls.append((name, X.copy()))


@pytest.mark.parametrize("version", sorted(FIXTURES))
def test_observer_sees_every_matrix_once_per_token_with_fused_launches(version, converted, monkeypatch):
    # Every matrix counts as large enough for the multi-threaded kernels, so a layer's projections share one fused
    # launch (kernels/linear.gemv_many) as they do in billion-parameter models; that launch bypasses
    # Matrix.__call__, which is why observing is done by the forward pass and not by the matrices.
    monkeypatch.setattr(linear, "PARALLEL_MIN_WEIGHTS", 1)
    through_call = []
    original_call = linear.Matrix.__call__

    def counting_call(self, x):
        through_call.append(self.name)
        return original_call(self, x)
    monkeypatch.setattr(linear.Matrix, "__call__", counting_call)
    model = rwkv_lite.load(converted(version))
    names = matrix_names(model)
    assert "head.weight" in names and "emb.weight" not in names
    tokens = [5, 17, 99, 3]
    log = Log()
    _, state = model.forward(tokens[:1])
    for t in tokens:
        log_before, call_before = len(log.calls), len(through_call)
        logits, _ = model.forward([t], state, observer=log)
        fused = names - set(through_call[call_before:])
        plain_logits, state = model.forward([t], state)
        np.testing.assert_array_equal(logits, plain_logits)          # observing changes nothing
        one_token = log.calls[log_before:]
        assert Counter(n for n, _ in one_token) == Counter(names), version     # each exactly once
        assert all(X.shape[0] == 1 for _, X in one_token)
        assert len(fused) >= 2, "no fused launch ran: the test would not show what it is about"


@pytest.mark.parametrize("version", ["5.2", "7"])
def test_observer_inputs_are_the_matrices_inputs_in_sequence_mode(version, converted, monkeypatch):
    """What the observer is shown equals what the matrices multiply (seen from Matrix.__call__, which every
    sequence-mode product goes through), name by name and in order."""
    model = rwkv_lite.load(converted(version))
    tokens = np.arange(1, 40)
    seen = []
    original_call = linear.Matrix.__call__

    matrices = {n for n, t in model.metadata["tensors"].items() if t["role"] == "matrix"}

    def recording_call(self, x):                     # (RWKV-7's LoRA factors are matrices too, role 'lora': unobserved)
        if self.name in matrices:
            seen.append((self.name, np.array(x, np.float32).reshape(-1, self.shape[1])))
        return original_call(self, x)
    monkeypatch.setattr(linear.Matrix, "__call__", recording_call)
    log = Log()
    model.forward(tokens, all_logits=True, observer=log)
    assert [n for n, _ in log.calls] == [n for n, _ in seen]
    for (name, X), (_, Y) in zip(log.calls, seen):
        np.testing.assert_array_equal(X, Y, err_msg=name)
    counts = Counter(n for n, _ in log.calls)
    assert counts == Counter(matrix_names(model))
    assert all(X.shape[0] == len(tokens) for _, X in log.calls)


def test_observer_in_batched_decode_sees_one_row_per_sequence(converted):
    model = rwkv_lite.load(converted("7"))
    states = [model.forward([1 + i, 2])[1] for i in range(3)]
    log = Log()
    model.forward_batch([7, 8, 9], states, observer=log)
    assert Counter(n for n, _ in log.calls) == Counter(matrix_names(model))
    assert {X.shape[0] for _, X in log.calls} == {3}


def test_observers_of_concurrent_forwards_see_only_their_own_call(converted):
    """The observer travels with the call: two threads running the same model at once each see their own inputs."""
    model = rwkv_lite.load(converted("5.2"))
    names = matrix_names(model)
    logs = {k: Log() for k in range(2)}

    def run(k):
        state = None
        for t in range(6):
            _, state = model.forward([10 * k + t], state, observer=logs[k])
    threads = [threading.Thread(target=run, args=(k,)) for k in logs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for log in logs.values():
        assert Counter(n for n, _ in log.calls) == Counter({n: 6 for n in names})


def _ids(model, text: bytes, n: int) -> np.ndarray:
    """The first n token ids of `text`, as calibrate() encodes it."""
    ids = list(text) if model.tokenizer is None else model.tokenizer.encode(text.decode("utf-8", errors="replace"))
    return np.asarray(ids[:n], np.int64)


def _old_calibration(model, ids, chunk, workdir):
    """The calibration statistics as computed before observers: Matrix.__call__ replaced to record each input
    (which saw every sequence-mode product), over the same chunks."""
    recorder = calibrate_module._Recorder(len(ids), str(workdir))
    original_call = linear.Matrix.__call__

    matrices = {n for n, t in model.metadata["tensors"].items() if t["role"] == "matrix"}

    def recording_call(self, x):
        if self.name in matrices:
            recorder.add(self.name, np.asarray(x, np.float32).reshape(-1, self.shape[1]))
        return original_call(self, x)
    linear.Matrix.__call__ = recording_call
    try:
        state = None
        for start in range(0, len(ids), chunk):
            _, state = model.forward(ids[start:start + chunk], state, all_logits=True)
    finally:
        linear.Matrix.__call__ = original_call
    return {k: np.array(v) for k, v in recorder.arrays().items()}


@pytest.mark.parametrize("version,tokens", [("5.2", 1024), ("7", 1024), ("6", 300)])
def test_calibration_equals_the_matrix_hook_on_full_chunks(version, tokens, converted, tmp_path):
    """Full chunks: the statistics are bit-identical to those of the former Matrix.__call__ hook ('.h' sums for
    1024 tokens of 64-wide inputs, '.x' inputs for 300 tokens of RWKV-6's wider ones)."""
    model = rwkv_lite.load(converted(version))
    text = shared_file("text", "kjv-bible.txt").read_bytes()[:20000]
    calib = calibrate(model, text, tokens=tokens)
    assert calib.tokens == tokens
    want = _old_calibration(model, _ids(model, text, tokens), rwkv_lite.model.CHUNK_TOKENS, tmp_path)
    assert sorted(calib.arrays) == sorted(want)
    for key, arr in want.items():
        np.testing.assert_array_equal(np.asarray(calib.arrays[key]), arr, err_msg=key)


def test_calibration_counts_a_one_token_tail(converted, monkeypatch):
    """A last chunk of one token runs as a decode step (fused launch); it used to be dropped, it is now counted."""
    monkeypatch.setattr(linear, "PARALLEL_MIN_WEIGHTS", 1)          # fused launches, as in large models
    monkeypatch.setattr(rwkv_lite.model, "CHUNK_TOKENS", 16)
    model = rwkv_lite.load(converted("7"))
    text = bytes(range(97, 123)) * 4
    calib = calibrate(model, text, tokens=33)                       # chunks of 16, 16 and 1
    assert calib.tokens == 33
    names = matrix_names(model)
    assert set(calib.names()) == names
    full = Log()
    monkeypatch.setattr(rwkv_lite.model, "CHUNK_TOKENS", 512)       # the comparison: one chunk of 33 tokens
    model.forward(_ids(model, text, 33), all_logits=True, observer=full)
    whole = dict(full.calls)                                        # every name seen once, all 33 rows
    for name in names:
        x = np.asarray(calib.arrays[name + ".x"], np.float32)       # 33 tokens < 2 x 64 columns: inputs kept
        assert x.shape[0] == 33 and whole[name].shape[0] == 33, name
        # The first 32 rows come from sequence mode over two chunks; the tail from a decode step. Two gaps:
        # calibration keeps inputs as float16 (rounding: at most 2**-11 of the value), and the decode step sums
        # in another order than one 33-token chunk: at most 2e-5 of the tensor's largest input on this model
        # (9e-5 on the tiny 5.1 and 5.2 models, 1.9e-4 on the 6; 1 or 2 threads alike). atol allows 2e-4.
        np.testing.assert_allclose(x[-1], whole[name][-1], rtol=2**-11, atol=2e-4 * np.abs(whole[name]).max())
