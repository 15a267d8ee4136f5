"""Quality of 8-bit activations: mean KL vs fp32 with fake-quantized activations on the tiny real models.

    python bench/act8/quality_act8.py                                 # 4v0,5v1,5v2,7v0, first 4096 bytes of KJV
    python bench/act8/quality_act8.py --models 5v1,5v2 --text english-gpl3-8k.txt --bytes 8192
    python bench/act8/quality_act8.py --models 5v2 --bytes 256 --runs "int8 today;int8 + a8/32"
    python bench/act8/quality_act8.py --shared /path/to/shared --out /tmp/q

The tiny rwkv.cpp test models in <shared>/fixtures/rwkv-cpp-tiny are converted with the package API
(rwkv_lite.convert(src, out, quant) with the defaults: int8 group 32 with int8 head and fp16 embedding, int4 g32
without calibration) into <out>/models (reused on later runs with the same --out). Each run decodes the text token
by token (Model.forward([t], state), one byte per token, from the initial state) and is compared with the fp32
file's decode: mean KL(p_fp32 || p_run) over all positions (natural log, softmax over the 256 logits, float64),
top-1 agreement, and delta bits per byte on the next byte.

Simulation: `linear` and `linear_many` are replaced in rwkv_lite.arch.common and in every version module (they
import the names; the head goes through common.output_logits -> common.linear), so each product with a stored
matrix computes fakequant(x) @ W_deq^T in float32, with W_deq the matrix's own dequantised rows (Matrix.rows).
"a8/32": symmetric, scale = max|x_group| / 127 in fp32, rint(x / scale) clipped to +-127, per 32 columns of each
row (groups whose max is 0 or subnormal become 0). "a15/64": today's decode rounding (32767 levels per 64
columns). "a15/32 as two 8-bit digits": rint(x * 16256 / max|x|) per 32 columns (panel_int8_split15's format).
The LoRA products of v7 (fp32 factors) are not quantised products and are left alone. Runs named "today" are
the package's own decode kernels, not the simulation; the "a15/64 (sim)" runs reproducing them validates the
harness.

--shared defaults to $RWKV_LITE_SHARED, else ../shared beside the repository (as tests/conftest.py).
Outputs go to --out (default: a new temporary folder): quality.json and quality.md (also printed).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.dont_write_bytecode = True                     # no __pycache__ beside these files
import numpy as np

REPO = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(REPO))                      # when rwkv_lite is not installed

MODELS = {"4v0": "tiny-rwkv-4v0-660K-FP32.bin", "5v1": "tiny-rwkv-5v1-730K-FP32.bin",
          "5v2": "tiny-rwkv-5v2-730K-FP32.bin", "7v0": "tiny-rwkv-7v0-834K-FP32.bin"}


# ------------------------------------------------------------------------------------------------ fake quantizers
def _groups(x, G):
    x = np.asarray(x, np.float32)
    T, C = x.shape
    Cp = -(-C // G) * G
    xp = np.zeros((T, Cp), np.float32)
    xp[:, :C] = x
    g = xp.reshape(T, Cp // G, G)
    return g, np.abs(g).max(-1, keepdims=True), T, C, Cp


def _inverse(amax, levels):
    """levels / amax in float64, 0 where amax is 0 (float64: no overflow for subnormal amax)."""
    return np.where(amax > 0, levels / np.where(amax > 0, amax, 1).astype(np.float64), 0)


def fq8(x, G=32, f16scale=False):
    """8-bit symmetric per G columns, fp32 scale max|x| / 127 (optionally rounded to fp16)."""
    g, amax, T, C, Cp = _groups(x, G)
    d = amax / np.float32(127)
    if f16scale:
        d = d.astype(np.float16).astype(np.float32)
    q = np.clip(np.rint(g * _inverse(amax, 127.0)), -127, 127)
    return (q * d).reshape(T, Cp)[:, :C].astype(np.float32)


def fq_split15(x, G=32):
    """15-bit as two 8-bit digits: x15 = rint(x * 16256 / max|x|) per 32 columns."""
    g, amax, T, C, Cp = _groups(x, G)
    q = np.rint(g * _inverse(amax, 16256.0))
    return (q * (amax / np.float32(16256))).reshape(T, Cp)[:, :C].astype(np.float32)


def fq15(x, G=64):
    """Today's decode rounding: 15-bit (32767 levels) per 64 columns."""
    g, amax, T, C, Cp = _groups(x, G)
    q = np.rint(g * _inverse(amax, 32767.0))
    return (q * (amax / np.float32(32767))).reshape(T, Cp)[:, :C].astype(np.float32)


def identity(x):
    return x


def fq8_except_head(x):
    return fq8(x)


fq8_except_head.skip_head = True

# label -> (file, fake quantizer or None for the package's own decode)
RUNS = [
    ("fp32 + a8/32", "fp32", fq8),
    ("fp32 + a15/64 (sim)", "fp32", fq15),
    ("int8 today (package decode, a15/64)", "int8", None),
    ("int8 + a15/64 (sim)", "int8", fq15),
    ("int8 fp32-acts (sim)", "int8", identity),
    ("int8 + a8/32", "int8", fq8),
    ("int8 + a8/32 except head", "int8", fq8_except_head),
    ("int8 + a8/32 fp16 scale", "int8", lambda x: fq8(x, 32, True)),
    ("int8 + a8/64", "int8", lambda x: fq8(x, 64)),
    ("int8 + a15/32 as two 8-bit digits", "int8", fq_split15),
    ("int4 today (package decode, a15/64)", "int4", None),
    ("int4 fp32-acts (sim)", "int4", identity),
    ("int4 + a8/32", "int4", fq8),
]


# ------------------------------------------------------------------------------------------------ the patch
class FakeQuantLinear:
    """Replaces linear / linear_many in the arch modules; passes through to the package when no quantizer is set."""

    def __init__(self):
        from rwkv_lite.arch import common, v4, v5, v6, v7
        self.fq = None
        self.skip_head = False
        self.deq = {}
        self.orig_linear, self.orig_linear_many = common.linear, common.linear_many
        for mod in (common, v4, v5, v6, v7):
            if hasattr(mod, "linear"):
                mod.linear = self.linear
            if hasattr(mod, "linear_many"):
                mod.linear_many = self.linear_many

    def dequantized_t(self, m):
        key = id(m)
        if key not in self.deq or self.deq[key][0] is not m:      # keep m alive so that id() stays unique
            self.deq[key] = (m, np.ascontiguousarray(m.rows(np.arange(m.shape[0])).T.astype(np.float32)))
        return self.deq[key][1]

    def linear(self, matrix, x, observer=None):
        if self.fq is None:
            return self.orig_linear(matrix, x, observer)
        if self.skip_head and matrix.name == "head.weight":
            return x @ self.dequantized_t(matrix)
        return self.fq(x) @ self.dequantized_t(matrix)

    def linear_many(self, matrices, xs, observer=None):
        if self.fq is None:
            return self.orig_linear_many(matrices, xs, observer)
        return [self.linear(m, x) for m, x in zip(matrices, xs)]


def decode(patch, model, ids, fq):
    patch.fq, patch.skip_head = fq, getattr(fq, "skip_head", False)
    try:
        state = None
        out = np.empty((len(ids), model.config["vocab_size"]), np.float32)
        for i, t in enumerate(ids):
            out[i], state = model.forward([int(t)], state)
    finally:
        patch.fq, patch.skip_head = None, False
    return out


def log_softmax(logits):
    z = logits.astype(np.float64)
    z -= z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def metrics(ref, got, ids):
    lr, lq = log_softmax(ref), log_softmax(got)
    kl = (np.exp(lr) * (lr - lq)).sum(-1)
    tgt = ids[1:]
    n = len(tgt)
    bpb = -lq[np.arange(n), tgt].mean() / np.log(2)
    bpb_ref = -lr[np.arange(n), tgt].mean() / np.log(2)
    return {"kl": float(kl.mean()), "top1": float((ref.argmax(-1) == got.argmax(-1)).mean()),
            "dbpb": float(bpb - bpb_ref), "bpb_ref": float(bpb_ref)}


def table(res, models, labels, title):
    lines = [f"| {title} | " + " | ".join(f"{m} mean KL (top-1, dbpb)" for m in models) + " |",
             "| --- |" + " ---: |" * len(models)]
    for label in labels:
        cells = []
        for m in models:
            r = res.get(m, {}).get(label)
            cells.append(f"{r['kl']:.3g} ({100 * r['top1']:.2f}%, {r['dbpb']:+.4f})" if r else "-")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="4v0,5v1,5v2,7v0", help=f"subset of {','.join(MODELS)}")
    ap.add_argument("--text", default="kjv-bible.txt", help="file in <shared>/fixtures/text")
    ap.add_argument("--bytes", type=int, default=4096, help="decode the first N bytes of the text")
    ap.add_argument("--runs", default=None,
                    help="';'-separated substrings of the run labels to keep (default: all): "
                         + "; ".join(label for label, _, _ in RUNS))
    ap.add_argument("--shared", type=Path,
                    default=Path(os.environ.get("RWKV_LITE_SHARED", REPO.parent / "shared")),
                    help="the shared fixtures folder (default: $RWKV_LITE_SHARED or ../shared beside the repo)")
    ap.add_argument("--out", type=Path, default=None, help="output folder (default: a new temporary folder)")
    args = ap.parse_args(argv)

    models = [m for m in args.models.split(",") if m]
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        ap.error(f"unknown model {unknown}; expected some of {list(MODELS)}")
    runs = RUNS
    if args.runs:
        keep = [k.strip() for k in args.runs.split(";") if k.strip()]
        runs = [r for r in RUNS if any(k in r[0] for k in keep)]
    tiny = args.shared / "fixtures" / "rwkv-cpp-tiny"
    text_path = args.shared / "fixtures" / "text" / args.text
    for p in [text_path] + [tiny / MODELS[m] for m in models]:
        if not p.exists():
            sys.exit(f"missing fixture {p} (pass --shared or set RWKV_LITE_SHARED)")
    out = args.out or Path(tempfile.mkdtemp(prefix="rwkv-lite-act8-quality-"))
    (out / "models").mkdir(parents=True, exist_ok=True)

    import rwkv_lite
    patch = FakeQuantLinear()
    ids = np.frombuffer(text_path.read_bytes()[:args.bytes], np.uint8).astype(np.int64)
    res = {}
    for name in models:
        patch.deq.clear()
        needed = {"fp32"} | {f for _, f, _ in runs}
        files = {}
        for q in sorted(needed):
            path = out / "models" / f"{name}-{q}.safetensors"
            if not path.exists():
                rwkv_lite.convert(tiny / MODELS[name], path, q)
            files[q] = rwkv_lite.load(path)
        t0 = time.time()
        ref = decode(patch, files["fp32"], ids, None)
        print(f"{name} fp32 reference decode {time.time() - t0:.1f}s", flush=True)
        for label, f, fq in runs:
            t0 = time.time()
            m = metrics(ref, decode(patch, files[f], ids, fq), ids)
            res.setdefault(name, {})[label] = m
            print(f"{name} {label:40s} KL {m['kl']:.3e} top1 {100 * m['top1']:.2f}% dbpb {m['dbpb']:+.4f} "
                  f"({time.time() - t0:.0f}s)", flush=True)
    meta = {"text": args.text, "bytes": int(len(ids)), "models": models}
    (out / "quality.json").write_text(json.dumps({"meta": meta, "results": res}, indent=1))
    md = table(res, models, [label for label, _, _ in runs],
               f"run ({args.text}, first {len(ids)} bytes, token-by-token decode)")
    (out / "quality.md").write_text(md + "\n")
    print("\n" + md)
    print(f"outputs: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
