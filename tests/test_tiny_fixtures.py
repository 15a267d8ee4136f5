"""Real trained models: the rwkv.cpp tiny fixtures convert and reproduce rwkv.cpp's expected logits.

Budgets from ../shared/fixtures/README.md: |sum(logits - expected)| <= 1.05 x budget (FP32 0.001; FP16 per file),
and for FP32 also max |diff| <= 1e-4."""
import numpy as np
import pytest

import rwkv_lite
from conftest import shared_file

PROMPT = [34, 105, 110]      # the bytes '"', 'i', 'n'
FP16_BUDGET = {"4v0-660K": 0.0137, "5v1-730K": 0.290, "5v2-730K": 0.456, "7v0-834K": 0.00577}
SUPPORTED = ["5v2-730K"]


def expected_logits(name):
    return np.fromfile(shared_file("rwkv-cpp-tiny", f"expected-logits-{name}.bin"), dtype="<f4")


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    cache = {}

    def get(name, dtype):
        if (name, dtype) not in cache:
            src = shared_file("rwkv-cpp-tiny", f"tiny-rwkv-{name}-{dtype}.bin")
            dst = tmp_path_factory.mktemp("tiny") / f"{name}-{dtype}.safetensors"
            rwkv_lite.convert(src, dst, quant="fp32")
            cache[name, dtype] = rwkv_lite.load(dst)
        return cache[name, dtype]
    return get


@pytest.mark.parametrize("name", SUPPORTED)
@pytest.mark.parametrize("mode", ["serial", "sequence"])
def test_fp32_matches_rwkv_cpp(converted, name, mode):
    model = converted(name, "FP32")
    if mode == "serial":
        state = None
        for t in PROMPT:
            logits, state = model.forward([t], state)
    else:
        logits, _ = model.forward(PROMPT)
    want = expected_logits(name)
    diff = logits - want
    assert abs(diff.sum()) <= 1.05 * 0.001, f"sum diff {diff.sum():.3g}"
    assert np.abs(diff).max() <= 1e-4, f"max diff {np.abs(diff).max():.3g}"


@pytest.mark.parametrize("name", SUPPORTED)
def test_fp16_file_within_budget(converted, name):
    logits, _ = converted(name, "FP16").forward(PROMPT)
    diff = logits - expected_logits(name)
    assert abs(diff.sum()) <= 1.05 * FP16_BUDGET[name], f"sum diff {diff.sum():.3g}"


def test_tiny_v52_metadata(converted):
    model = converted("5v2-730K", "FP32")
    cfg = model.config
    assert (cfg["version"], cfg["n_layer"], cfg["n_embd"], cfg["n_head"], cfg["head_size"], cfg["vocab_size"]) == \
        ("5.2", 12, 64, 8, 8, 256)
    assert cfg["ln_x_eps"] == 1e-5          # rwkv.cpp's value, recorded because the source is an rwkv.cpp file
    assert model.tokenizer.kind == "bytes"
    assert model.metadata["provenance"]["source_files"] == ["tiny-rwkv-5v2-730K-FP32.bin"]
