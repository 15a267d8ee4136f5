"""Saved states (rwkv_lite/state.py) under damage: a state file is read back whole, so every damaged file must be
refused by `State.load` (one line naming the file: bad header, checksum mismatch, NaN) or, if it still reads, be
refused by `Model.forward` when its config or arrays do not fit the model (the WKV kernels index the state
without bounds checks), or run with the model's shapes. Never a crash, a hang or a huge allocation.

Same knobs as the other fuzz tests: RWKV_LITE_FUZZ_EXAMPLES, RWKV_LITE_FUZZ_RANDOM=1.
"""
from __future__ import annotations

import faulthandler
import json
import os
import struct
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import rwkv_lite
from conftest import shared_file
from rwkv_lite import State
from rwkv_lite.errors import FormatError, RwkvLiteError

EXAMPLES = int(os.environ.get("RWKV_LITE_FUZZ_EXAMPLES", "30"))
RANDOM = os.environ.get("RWKV_LITE_FUZZ_RANDOM") == "1"
HANG_SECONDS = 120
ALLOC_SLACK = 16 << 20


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    from rwkv_lite.kernels.threads import get_threads, set_threads
    before = get_threads()
    set_threads(1)
    yield
    set_threads(before)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    src = shared_file("rwkv-cpp-tiny", "tiny-rwkv-5v2-730K-FP32.bin")
    path = rwkv_lite.convert(src, tmp_path_factory.mktemp("state-model") / "tiny.safetensors", quant="fp32")
    return rwkv_lite.load(path)


@pytest.fixture(scope="module")
def saved(model, tmp_path_factory) -> bytes:
    """A state after "Hello", as saved on disk."""
    _, state = model.forward(list(b"Hello"))
    path = tmp_path_factory.mktemp("state") / "hello.state"
    state.save(path)
    return path.read_bytes()


def split(data: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]), data[8 + n:]


def join(header: dict, body: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body


def check_state_file(model, path: Path) -> str:
    """The property; returns 'refused at load', 'refused by the model' or 'ran'."""
    size = path.stat().st_size
    faulthandler.dump_traceback_later(HANG_SECONDS, exit=True)
    tracemalloc.start()
    try:
        try:
            state = State.load(path)
        except RwkvLiteError as e:
            assert "\n" not in str(e) and str(path) in str(e), str(e)
            return "refused at load"
        try:
            logits, after = model.forward([1], state)
        except FormatError as e:
            assert "\n" not in str(e) and "state" in str(e), str(e)
            return "refused by the model"
        assert logits.shape == (model.config["vocab_size"],)
        fresh = model.new_state()
        assert {k: a.shape for k, a in after.arrays.items()} == {k: a.shape for k, a in fresh.arrays.items()}
        return "ran"
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        faulthandler.cancel_dump_traceback_later()
        assert peak <= 8 * size + ALLOC_SLACK, f"peak allocation {peak} bytes for a {size}-byte file"


def _settings():
    return settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=not RANDOM,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


class Counter:
    def __init__(self, folder: Path):
        self.folder, self.n, self.outcomes = folder, 0, {}

    def check(self, model, data: bytes) -> str:
        path = self.folder / f"s{self.n}.state"
        self.n += 1
        path.write_bytes(data)
        outcome = check_state_file(model, path)
        path.unlink()
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1
        return outcome


def test_saved_state_round_trips(model, saved, tmp_path):
    path = tmp_path / "s.state"
    path.write_bytes(saved)
    state = State.load(path)
    _, expected = model.forward(list(b"Hello"))
    for name, a in expected.arrays.items():
        np.testing.assert_array_equal(state[name], a)
    assert check_state_file(model, path) == "ran"


def test_byte_damage(model, saved, tmp_path):
    """Flips, truncations, inserted and deleted bytes anywhere: a state is checksummed and read whole, so any change
    to its arrays is refused at load; header damage is refused at load or by the model."""
    header_end = 8 + struct.unpack("<Q", saved[:8])[0]
    counter = Counter(tmp_path)

    @_settings()
    @given(st.sampled_from(["flip", "truncate", "insert", "delete"]), st.integers(0, len(saved) - 1),
           st.booleans(), st.integers(1, 8), st.binary(min_size=1, max_size=8))
    def run(kind, pos, in_header, count, blob):
        if in_header:
            pos %= header_end
        data = bytearray(saved)
        if kind == "flip":
            for i in range(count):
                data[(pos + 997 * i) % len(saved)] ^= 1 << (i % 8)
        elif kind == "truncate":
            data = data[:pos]
        elif kind == "insert":
            data[pos:pos] = blob
        else:
            del data[pos:pos + count]
        outcome = counter.check(model, bytes(data))
        if kind == "flip" and all((pos + 997 * i) % len(saved) >= header_end for i in range(count)):
            assert outcome == "refused at load"           # data damage: caught by the checksums
    run()
    assert counter.outcomes.get("refused at load", 0) > 0, counter.outcomes


@pytest.mark.parametrize("what", ["config", "shape", "dtype", "rename", "remove"])
def test_header_and_config_edits(model, saved, tmp_path, what):
    """A state whose config, array shapes, dtypes or names were edited: refused at load or by the model; a
    mismatched array never reaches the kernels."""
    header, body = split(saved)
    names = sorted(n for n in header if n != "__metadata__" and not n.startswith("__pad."))
    config = json.loads(header["__metadata__"]["config"])
    counter = Counter(tmp_path)

    @_settings()
    @given(st.sampled_from(names), st.data())
    def run(name, d):
        h = json.loads(json.dumps(header))
        if what == "config":
            c = dict(config)
            key = d.draw(st.sampled_from(sorted(c)))
            c[key] = d.draw(st.sampled_from([0, 1, -1, 4, 16, 128, 1 << 40, "64", None, [8], c[key]]))
            h["__metadata__"]["config"] = json.dumps(c)
        elif what == "shape":
            shape = h[name]["shape"]
            count = int(np.prod(shape))
            h[name]["shape"] = d.draw(st.sampled_from([shape[::-1], [count], [shape[0], 4, count // shape[0] // 4],
                                                       [1 << 40] * len(shape), [count // 2], shape + [1]]))
        elif what == "dtype":
            h[name]["dtype"] = d.draw(st.sampled_from(["I32", "U32", "F16", "U8", "F64"]))
        elif what == "rename":
            h[d.draw(st.sampled_from(["wkv", "att_x", "ffn_x", "aa", "x"]))] = h.pop(name)
        else:
            del h[name]
        counter.check(model, join(h, body))
    run()


def test_model_file_is_not_a_state(model, tmp_path):
    with pytest.raises(FormatError, match="not a state file"):
        State.load(model.path)


def test_state_of_another_model_is_refused(model, tmp_path):
    """Same container, other dimensions: refused by name of the differing config number."""
    other = State({"arch": "rwkv5.2", "n_layer": 2, "n_embd": 64, "n_head": 8, "head_size": 8, "vocab_size": 256},
                  {"att_x": np.zeros((2, 64), np.float32), "ffn_x": np.zeros((2, 64), np.float32),
                   "wkv": np.zeros((2, 8, 8, 8), np.float32)})
    other.save(tmp_path / "other.state")
    state = State.load(tmp_path / "other.state")
    with pytest.raises(FormatError, match="n_layer=2, this model has n_layer=12"):
        model.forward([1], state)


def test_state_with_right_config_but_wrong_arrays_is_refused(model, tmp_path):
    """Before State.check_shapes a state whose config matched but whose wkv had fewer heads went straight into the
    WKV kernel, which indexed past it (garbage or a crash; corpus file state-wkv-fewer-heads)."""
    _, good = model.forward([1])
    bad = State(good.config, {**good.arrays, "wkv": np.ascontiguousarray(good["wkv"][:, :4])})
    bad.save(tmp_path / "bad.state")
    with pytest.raises(FormatError, match=r"state array 'wkv' is float32\[12, 4, 8, 8\], this model needs "
                                          r"float32\[12, 8, 8, 8\]"):
        model.forward([2], State.load(tmp_path / "bad.state"))


def test_non_finite_state_is_refused_at_load(model, tmp_path):
    _, good = model.forward([1])
    arrays = {k: a.copy() for k, a in good.arrays.items()}
    arrays["ffn_x"][3, 5] = np.nan
    State(good.config, arrays).save(tmp_path / "nan.state")
    with pytest.raises(FormatError, match="'ffn_x' contains NaN or Inf"):
        State.load(tmp_path / "nan.state")
