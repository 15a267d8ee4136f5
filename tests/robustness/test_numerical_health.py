"""Numerical health: a long generation on a real (tiny) model stays finite with a bounded recurrent state, and a
NaN or Inf that does appear is reported as a NumericalError naming the layer -- never printed as garbage text.

The long run feeds 20,000 sampled tokens one at a time (the decode path every chat uses), on one thread.
Its measurements are printed (run with -s to see them; docs/reliability.md records them).
"""
from __future__ import annotations

import shutil
import struct
import time

import numpy as np
import pytest

import rwkv_lite
from robustness_helpers import array_span, assert_one_line_error, cli, patch_bytes
from rwkv_lite.errors import FormatError, NumericalError

N_TOKENS = 20_000
NAN = struct.pack("<f", float("nan"))
INF = struct.pack("<f", float("inf"))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    from rwkv_lite.kernels.threads import get_threads, set_threads
    before = get_threads()
    set_threads(1)
    yield
    set_threads(before)


@pytest.fixture(scope="module")
def converted(convert_once):
    return {q: convert_once("tiny-rwkv-5v2-730K-FP32.bin", q) for q in ("fp32", "int8")}


def test_20000_sampled_tokens_stay_finite_with_bounded_state(converted):
    model = rwkv_lite.load(converted["fp32"])
    rng = np.random.default_rng(0)
    logits, state = model.forward(list(b"In the beginning"))
    names = ("att_x", "ffn_x", "wkv")
    peaks = np.empty((N_TOKENS, len(names)), np.float32)     # per token: max |value| of each state array
    start = time.perf_counter()
    for i in range(N_TOKENS):
        p = np.exp(logits - logits.max())
        token = int(rng.choice(p.size, p=p / p.sum()))        # temperature 1: varied text, not a greedy loop
        logits, state = model.forward([token], state)          # raises NumericalError on NaN/Inf anywhere
        for j, name in enumerate(names):
            peaks[i, j] = np.abs(state[name]).max()
    elapsed = time.perf_counter() - start
    assert np.isfinite(logits).all() and np.isfinite(peaks).all()

    early, late = peaks[1000:10000].max(axis=0), peaks[10000:].max(axis=0)
    print(f"\n{N_TOKENS} tokens in {elapsed:.1f} s ({elapsed / N_TOKENS * 1e3:.2f} ms/token); max |state| "
          + ", ".join(f"{n} {e:.1f} -> {l:.1f}" for n, e, l in zip(names, early, late)) + " (tokens 1k-10k -> 10k-20k)")
    assert (late <= 2 * early).all(), (early, late)            # no drift: the second half is no larger
    assert (peaks.max(axis=0) < 1e4).all(), peaks.max(axis=0)


def poisoned(src, dst, array: str, value: bytes, index: int = 0):
    """A copy of model file `src` with float number `index` of `array` replaced (the converter itself refuses
    NaN/Inf weights, so this is what a damaged file or a bad GPU-side export looks like)."""
    shutil.copyfile(src, dst)
    a, b = array_span(dst, array)
    assert a + 4 * index + 4 <= b
    patch_bytes(dst, a + 4 * index, value)
    return dst


@pytest.mark.parametrize("quant,array,value,layer", [
    ("fp32", "blocks.5.ffn.value.weight", NAN, "after layer 5"),
    ("fp32", "blocks.9.att.output.weight", INF, "after layer 9"),
    ("fp32", "blocks.0.att.decay", NAN, "after layer 0"),
    ("int8", "blocks.3.att.receptance.weight.scale", NAN, "after layer 3"),     # a row scale of a quantized matrix
    ("fp32", "ln_out.weight", NAN, "output logits (head / ln_out)"),
])
def test_injected_nan_or_inf_names_the_layer(converted, tmp_path, quant, array, value, layer):
    bad = poisoned(converted[quant], tmp_path / "bad.safetensors", array, value, index=7)
    with pytest.raises(FormatError, match="checksum mismatch"):
        rwkv_lite.load(bad, verify=True)                     # verify would have caught it...
    model = rwkv_lite.load(bad)                              # ...but without it, the forward pass does
    with pytest.raises(NumericalError) as info:
        model.forward(list(b"Hello"))
    assert layer in str(info.value) and "\n" not in str(info.value)
    _, state = rwkv_lite.load(converted[quant]).forward([1])
    with pytest.raises(NumericalError) as info:              # one-token mode too (a NaN decay reaches the
        for token in b"Hi!":                                 # output one token later, through the state)
            _, state = model.forward([token], state)
    assert layer in str(info.value)


def test_cli_reports_nan_in_one_line(converted, tmp_path):
    bad = poisoned(converted["fp32"], tmp_path / "bad.safetensors", "blocks.5.ffn.value.weight", NAN)
    proc = cli("generate", bad, "-p", "Hello", "-n", "5", "--greedy")
    assert_one_line_error(proc, "NaN or Inf in the residual stream after layer 5")
    assert proc.stdout.strip() in ("", "Hello")              # no garbage text was printed
