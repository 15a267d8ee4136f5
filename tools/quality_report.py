"""Quantization quality on the real tiny models, measured as ../shared/docs/quality-anchors.md defines it.

    python tools/quality_report.py                     # prints the markdown table of docs/quantization.md
    python tools/quality_report.py --json

For 5v1 (reference v5.0) and 5v2 (v5.2), every storage scheme is compared with the same model in fp32 over the
8,192 bytes of english-gpl3-8k.txt, one byte per token from the initial state: mean KL(p_fp32 || p_q) over all
positions (nats), top-1 agreement, bits per byte and its change, and stored bits per weight of the quantized
matrices (scales included): of the blocks' matrices (what rwkv.cpp counts), and of all matrices + embedding.
Calibrated rows use 2048 tokens (bytes) of kjv-bible.txt, never the evaluation text, recorded from the model's
own int8 file. Takes 3-7 minutes on 2 cores.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

import rwkv_lite
from rwkv_lite.evaluate import compare
from rwkv_lite.inspect import describe
from rwkv_lite.quantize.calibrate import calibrate

SHARED = Path(__file__).resolve().parent.parent.parent / "shared" / "fixtures"
MODELS = {"5v1": "tiny-rwkv-5v1-730K-FP32.bin", "5v2": "tiny-rwkv-5v2-730K-FP32.bin"}
# (label, convert kwargs)
SCHEMES = [
    ("fp16", {"quant": "fp16"}),
    ("int8 (emb fp16, head int8)", {"quant": "int8"}),
    ("int8, head fp32 (as rwkv.cpp)", {"quant": "int8", "head": "fp32"}),
    ("int4 g32 (emb int8)", {"quant": "int4", "group": 32}),
    ("int4 g64", {"quant": "int4", "group": 64}),
    ("int4 g32 + calibration (GPTQ)", {"quant": "int4", "group": 32, "calibrated": True}),
    ("int4 g32 + calibration, head int8", {"quant": "int4", "group": 32, "head": "int8", "calibrated": True}),
    ("int4 g32 + calibration, head fp32 (as rwkv.cpp)", {"quant": "int4", "group": 32, "head": "fp32",
                                                         "calibrated": True}),
]
CALIBRATION_BYTES = 16384      # of kjv-bible.txt (never the evaluation text); 2048 tokens are used
# rwkv.cpp on the same models and text (quality-anchors.md): bits/w, 5v1 KL, top-1, dbpb, 5v2 KL, top-1, dbpb
RWKV_CPP = [
    ("FP16", 16, 1.4e-6, 99.94, 0.0000, 1.0e-6, 99.93, 0.0000),
    ("Q8_0", 8.5, 7.3e-4, 98.45, 0.0018, 5.5e-4, 98.41, -0.0016),
    ("Q8_0, fp32 activations", 8.5, 4.0e-4, None, None, 2.5e-4, None, None),
    ("Q5_1", 6.0, 1.55e-2, 91.38, 0.0162, 1.13e-2, 93.46, 0.0153),
    ("Q5_0", 5.5, 2.08e-2, 90.65, 0.0166, 1.48e-2, 92.76, 0.0136),
    ("Q4_1", 5.0, 5.49e-2, 84.16, 0.0745, 4.58e-2, 86.76, 0.0456),
    ("Q4_0", 4.5, 8.07e-2, 81.88, 0.1212, 5.44e-2, 86.07, 0.0745),
]


def measure(shared: Path = SHARED, schemes=SCHEMES) -> dict:
    text = (shared / "text" / "english-gpl3-8k.txt").read_bytes()
    ids = np.frombuffer(text, np.uint8).astype(np.int64)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for model, fname in MODELS.items():
            src = shared / "rwkv-cpp-tiny" / fname
            ref_path = Path(tmp) / f"{model}-fp32.safetensors"
            rwkv_lite.convert(src, ref_path, "fp32")
            reference = rwkv_lite.load(ref_path)
            int8 = rwkv_lite.load(rwkv_lite.convert(src, Path(tmp) / f"{model}-int8-calib.st", "int8"))
            kjv = (shared / "text" / "kjv-bible.txt").read_bytes()[:CALIBRATION_BYTES]
            calib_path = calibrate(int8, kjv, text_name="kjv-bible.txt").save(Path(tmp) / f"{model}.calib.npz")
            for i, (label, kwargs) in enumerate(schemes):
                path = Path(tmp) / f"{model}-{i}.safetensors"
                kwargs = dict(kwargs)
                if kwargs.pop("calibrated", False):
                    kwargs["calibration"] = calib_path
                rwkv_lite.convert(src, path, **kwargs)
                a = compare(reference, rwkv_lite.load(path), ids)
                info = describe(path)
                results.setdefault(label, {})[model] = {
                    "mean_kl": a.mean_kl, "top1": a.top1, "bpb": a.bpb_model,
                    "delta_bpb": a.bpb_model - a.bpb_reference,
                    "bits_per_weight": info["matrix_bits_per_weight"],
                    "block_bits_per_weight": _block_bits(info),
                }
                results.setdefault("fp32", {})[model] = {"bpb": a.bpb_reference}
    return results


def _block_bits(info: dict) -> float:
    """Stored bits per weight of the blocks' matrices only (what rwkv.cpp's bits/w counts)."""
    blocks = [t for t in info["tensors"] if t["name"].startswith("blocks.") and t["role"] == "matrix"]
    n = sum(int(np.prod(t["shape"])) for t in blocks)
    return sum(t["bits_per_weight"] * int(np.prod(t["shape"])) for t in blocks) / n


def markdown(results: dict) -> str:
    rows = ["| format | bits/w blocks (+ emb, head) | 5v1 mean KL | 5v1 top-1 | 5v1 delta bpb | 5v2 mean KL | 5v2 top-1 | 5v2 delta bpb |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for label, _ in SCHEMES:
        r = results[label]
        cells = [f"**rwkv-lite {label}**",
                 f"{r['5v2']['block_bits_per_weight']:.2f} ({r['5v2']['bits_per_weight']:.2f})"]
        for m in ("5v1", "5v2"):
            cells += [f"{r[m]['mean_kl']:.2e}", f"{100 * r[m]['top1']:.2f}%", f"{r[m]['delta_bpb']:+.4f}"]
        rows.append("| " + " | ".join(cells) + " |")
    for name, bits, *vals in RWKV_CPP:
        cells = [f"rwkv.cpp {name}", f"{bits} (emb, head fp32)"]
        for kl, top1, dbpb in (vals[:3], vals[3:]):
            cells += [f"{kl:.2e}", f"{top1:.2f}%" if top1 is not None else "-",
                      f"{dbpb:+.4f}" if dbpb is not None else "-"]
        rows.append("| " + " | ".join(cells) + " |")
    fp32 = results["fp32"]
    rows.append("")
    rows.append(f"fp32 bits/byte (rwkv-lite): 5v1 {fp32['5v1']['bpb']:.4f}, 5v2 {fp32['5v2']['bpb']:.4f}")
    return "\n".join(rows)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--shared", type=Path, default=SHARED)
    args = ap.parse_args()
    results = measure(args.shared)
    print(json.dumps(results, indent=2) if args.json else markdown(results))


if __name__ == "__main__":
    main()
