"""Quantization quality on the real tiny models, as ../shared/docs/quality-anchors.md defines it (issue 3's bounds).

Mean KL(p_fp32 || p_quantized) over all 8,192 byte positions of english-gpl3-8k.txt from the initial state, and
top-1 agreement, for 5v2 (v5.2) and 5v1 (v5.0). The bounds are the issue's targets, set against rwkv.cpp:

  int8, emb and head unquantized (as rwkv.cpp's Q files keep them): KL <= 2.5e-4 (5v2) / 4.0e-4 (5v1), top-1 >= 98.5%
      (rwkv.cpp Q8_0 with fp32 activations: 2.5e-4 / 4.0e-4)
  int8 default file (head int8 too): beats Q8_0 as shipped, 5.5e-4 / 7.3e-4
  int4 with calibration (GPTQ), everything in the file quantized (emb int8, head int4), <= 4.5 bits/weight in the
      block matrices: KL <= 2.7e-2 / 4.0e-2   (rwkv.cpp Q4_0, 4.5 b/w: 5.44e-2 / 8.07e-2)
  int4 without calibration: still beats Q4_0

Measured (2026-12-03, panel layout, 5v2 / 5v1): int8 head fp32 2.46e-4 / 3.94e-4; int8 default 2.66e-4 / 4.08e-4;
int4 GPTQ 2.41e-2 / 2.83e-2; int4 plain 4.18e-2 / 6.06e-2. Calibration: the first 2048 bytes of the KJV text (byte tokens),
never the evaluation text. All of it is deterministic; ~30 s.
"""
from __future__ import annotations

import numpy as np
import pytest

from conftest import shared_file
import rwkv_lite
from rwkv_lite.evaluate import compare
from rwkv_lite.inspect import describe
from rwkv_lite.quantize.calibrate import calibrate

MODELS = {"5v2": "tiny-rwkv-5v2-730K-FP32.bin", "5v1": "tiny-rwkv-5v1-730K-FP32.bin"}
# (label, convert kwargs, max mean KL per model, min top-1 or None)
BOUNDS = [
    ("int8, emb/head unquantized", {"quant": "int8", "head": "fp32"}, {"5v2": 2.5e-4, "5v1": 4.0e-4}, 0.985),
    ("int8 default", {"quant": "int8"}, {"5v2": 5.5e-4, "5v1": 7.3e-4}, 0.985),
    ("int4 + calibration", {"quant": "int4", "calibrated": True}, {"5v2": 2.7e-2, "5v1": 4.0e-2}, None),
    ("int4 plain", {"quant": "int4"}, {"5v2": 5.44e-2, "5v1": 8.07e-2}, None),
]


@pytest.fixture(scope="module")
def eval_ids():
    text = shared_file("text", "english-gpl3-8k.txt").read_bytes()
    return np.frombuffer(text, np.uint8).astype(np.int64)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, convert_once):
    """model tag -> (source path, fp32 reference model, calibration file made from its int8 file on KJV text)."""
    folder = tmp_path_factory.mktemp("quality")
    kjv = shared_file("text", "kjv-bible.txt").read_bytes()[:16384]
    out = {}
    for tag, name in MODELS.items():
        src = shared_file("rwkv-cpp-tiny", name)
        reference = rwkv_lite.load(convert_once(src, "fp32"))
        int8 = rwkv_lite.load(convert_once(src, "int8"))
        calib_path = calibrate(int8, kjv, text_name="kjv-bible.txt").save(folder / f"{tag}.calib.npz")
        out[tag] = (src, reference, calib_path)
    return out


@pytest.mark.parametrize("tag", list(MODELS))
@pytest.mark.parametrize("label, kwargs, max_kl, min_top1", BOUNDS, ids=[b[0] for b in BOUNDS])
def test_quality_bounds(tiny, eval_ids, tmp_path, tag, label, kwargs, max_kl, min_top1):
    src, reference, calib_path = tiny[tag]
    kwargs = dict(kwargs)
    if kwargs.pop("calibrated", False):
        kwargs["calibration"] = calib_path
    path = rwkv_lite.convert(src, tmp_path / "q.st", **kwargs)
    agreement = compare(reference, rwkv_lite.load(path), eval_ids)
    assert agreement.positions == 8192
    assert agreement.mean_kl <= max_kl[tag], f"{tag} {label}: mean KL {agreement.mean_kl:.3e} > {max_kl[tag]:.3e}"
    if min_top1 is not None:
        assert agreement.top1 >= min_top1, f"{tag} {label}: top-1 {agreement.top1:.4f}"
    if kwargs["quant"] == "int4":
        blocks = [t for t in describe(path)["tensors"] if t["name"].startswith("blocks.") and t["role"] == "matrix"]
        assert blocks and all(t["bits_per_weight"] <= 4.5 for t in blocks)


def test_calibration_improves_int4(tiny, eval_ids, tmp_path):
    """GPTQ with calibration against plain int4 on the same model: at least 25% lower mean KL (measured 42%)."""
    src, reference, calib_path = tiny["5v2"]
    plain = compare(reference, rwkv_lite.load(rwkv_lite.convert(src, tmp_path / "p.st", "int4")), eval_ids)
    gptq = compare(reference, rwkv_lite.load(rwkv_lite.convert(src, tmp_path / "g.st", "int4",
                                                               calibration=calib_path)), eval_ids)
    assert gptq.mean_kl <= 0.75 * plain.mean_kl, (gptq.mean_kl, plain.mean_kl)
