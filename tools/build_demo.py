"""Build the built-in demo model file from a checkpoint trained by tools/train_demo.py.

    python tools/build_demo.py /work/demo/kjv-b.pth --corpus ../shared/fixtures/text/kjv-bible.txt

Converts the checkpoint with rwkv-lite's own converter (fp32, int8, int4), measures held-out bits per byte of each
with rwkv-lite (the last 5% of the corpus's lines, the split train_demo.py used), checks rwkv-lite fp32 against the
reference `rwkv` package on the checkpoint when torch is installed, and writes the int8 file with the training facts
in its provenance to rwkv_lite/data/. Prints a JSON report (recorded in docs/demo-model.md).
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

import rwkv_lite
from rwkv_lite.demo import DEMO_FILE
from rwkv_lite.evaluate import perplexity

REPO = Path(__file__).resolve().parent.parent


def heldout_bytes(corpus: Path) -> bytes:
    lines = corpus.read_bytes().split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    n_held = math.ceil(len(lines) * 0.05)
    return b"\n".join(lines[-n_held:]) + b"\n"


def bits_per_byte(model_path: Path, text: bytes, streams: int = 64) -> float:
    """Held-out bpb as train_demo.py measures it: the text cut into `streams` contiguous pieces, each scored from
    the initial state (so the figure is comparable with the training log)."""
    model = rwkv_lite.load(model_path)
    ids = np.frombuffer(text, dtype=np.uint8).astype(np.int64)
    bounds = np.linspace(0, len(ids), streams + 1).astype(int)
    total_bits = 0.0
    scored = 0
    for a, b in zip(bounds[:-1], bounds[1:]):
        p = perplexity(model, ids[a:b])
        total_bits += p.nll * p.predicted / math.log(2)
        scored += p.predicted
    return total_bits / scored


def reference_parity(ckpt: Path, fp32_file: Path, text: bytes) -> float | None:
    """max |rwkv-lite fp32 - reference cpu fp32| / max(1, max |ref|) over all positions of a short text."""
    try:
        import os
        os.environ.setdefault("RWKV_JIT_ON", "0")
        os.environ.setdefault("RWKV_CUDA_ON", "0")
        from rwkv.model import RWKV
    except ImportError:
        return None
    ids = list(text[:200])
    ref = RWKV(model=str(ckpt.with_suffix("")), strategy="cpu fp32", verbose=False)
    ref_logits, _ = ref.forward(ids, None, full_output=True)
    ref_logits = ref_logits.float().numpy()
    ours, _ = rwkv_lite.load(fp32_file).forward(ids, all_logits=True)
    return float(np.abs(ours - ref_logits).max() / max(1.0, np.abs(ref_logits).max()))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", type=Path, help="trained .pth (a .json with the training facts beside it)")
    ap.add_argument("--corpus", type=Path, default=REPO.parent / "shared/fixtures/text/kjv-bible.txt")
    ap.add_argument("--out", type=Path, default=REPO / "rwkv_lite" / "data" / DEMO_FILE)
    args = ap.parse_args()
    facts = json.loads(args.checkpoint.with_suffix(".json").read_text())
    held = heldout_bytes(args.corpus)
    report = {"checkpoint": args.checkpoint.name, "checkpoint_sha256": facts["checkpoint"]["sha256"],
              "heldout_bytes": len(held)}
    with tempfile.TemporaryDirectory() as tmp:
        files = {}
        for quant in ("fp32", "int8", "int4"):
            files[quant] = Path(tmp) / f"demo-{quant}.safetensors"
            t = time.perf_counter()
            rwkv_lite.convert(args.checkpoint, files[quant], quant)
            report[f"{quant}_bytes"] = files[quant].stat().st_size
            report[f"{quant}_heldout_bpb"] = round(bits_per_byte(files[quant], held), 4)
            report[f"{quant}_convert_s"] = round(time.perf_counter() - t, 2)
        parity = reference_parity(args.checkpoint, files["fp32"], held)
        report["fp32_vs_reference_rel"] = parity
        # Ship the int8 file, with the training facts in its provenance.
        provenance = {
            "model": "rwkv-lite demo: byte-level RWKV-5.2 trained on the King James Bible",
            "corpus": f"{facts['corpus']['path']} sha256 {facts['corpus']['sha256']} (public domain); "
                      f"last 5% of verses held out",
            "training": {k: facts["training"][k] for k in ("steps", "batch", "ctx", "seed", "lr", "wall_seconds")},
            "heldout_bpb_fp32": report["fp32_heldout_bpb"],
            "heldout_bpb_int8": report["int8_heldout_bpb"],
            "trained_checkpoint_sha256": facts["checkpoint"]["sha256"],
        }
        tmp_out = Path(tmp) / "ship.safetensors"
        rwkv_lite.convert(args.checkpoint, tmp_out, "int8", provenance=provenance)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(tmp_out, args.out)
    report["shipped"] = str(args.out.relative_to(REPO)) if args.out.is_relative_to(REPO) else str(args.out)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
