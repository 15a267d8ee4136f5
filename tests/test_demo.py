"""The built-in demo model (docs/demo-model.md): shipped, small, real, and usable with no model argument."""
import json
import math
import subprocess
import sys

import numpy as np
import pytest

import rwkv_lite
from rwkv_lite.demo import demo_model_path
from rwkv_lite.evaluate import perplexity
from conftest import shared_file


@pytest.fixture(scope="module")
def demo():
    return rwkv_lite.load(demo_model_path(), verify=True)


def test_demo_is_small_int8_rwkv52_with_provenance(demo):
    path = demo_model_path()
    assert path.stat().st_size < 10_000_000
    cfg = demo.config
    assert (cfg["version"], cfg["vocab_size"], cfg["n_layer"], cfg["n_embd"]) == ("5.2", 256, 6, 256)
    assert cfg["ln_x_eps"] == 64e-5
    schemes = {t["scheme"] for t in demo.metadata["tensors"].values() if t["role"] == "matrix"}
    assert schemes == {"int8"}
    prov = demo.metadata["provenance"]
    assert "kjv-bible" in prov["corpus"] and prov["training"]["seed"] == 1234
    assert 1.0 < prov["heldout_bpb_fp32"] < 2.0
    assert demo.tokenizer.kind == "bytes"


def test_heldout_text_far_more_likely_than_shuffled(demo):
    lines = shared_file("text", "kjv-bible.txt").read_bytes().split(b"\n")
    held = b"\n".join(lines[-300:])[:12000]           # from the held-out last 5% of verses
    ids = np.frombuffer(held, np.uint8).astype(np.int64)
    shuffled = np.random.default_rng(0).permutation(ids)
    real = perplexity(demo, ids).nll / math.log(2)
    noise = perplexity(demo, shuffled).nll / math.log(2)
    assert real < 2.2, real                            # bits per byte of real held-out KJV text
    assert noise > 3 * real, (real, noise)


def test_greedy_continuation_reads_as_kjv_english(demo):
    from rwkv_lite.generate import generate_text
    from rwkv_lite.sampling import SamplingParams
    text = generate_text(demo, "And God said", max_tokens=120, params=SamplingParams.greedy())
    words = [w.strip(".,;:").lower() for w in text.split()]
    common = {"the", "and", "of", "unto", "that", "he", "i", "said", "lord", "thou", "thy", "shall", "god", "to",
              "in", "is", "be", "them", "his", "me", "my", "will", "not", "a", "which", "for", "all", "ye", "with"}
    assert len(words) >= 10
    assert sum(w in common for w in words) >= len(words) // 4, text


def test_matches_reference_on_the_shipped_weights(demo, tmp_path):
    """Live oracle: the reference `rwkv` package (cpu fp32) run on the demo's weights as shipped (int8 matrices
    dequantised exactly to float32) gives rwkv-lite's logits within 1e-4 relative."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("rwkv")
    from rwkv_lite.schemes import get_scheme
    f = demo.file
    sd = {}
    for name, info in f.tensors.items():
        if info["role"] == "vector":
            arr = np.array(f.arrays[name])
        else:
            scheme = get_scheme(info["scheme"], **info["params"])
            arr = scheme.dequantize({s: f.arrays[name + s] for s in scheme.parts(tuple(info["shape"]))})
        sd[name] = arr
    cfg = demo.config
    H, N, C = cfg["n_head"], cfg["head_size"], cfg["n_embd"]
    ckpt = {}
    for name, arr in sd.items():                      # back to BlinkDL checkpoint tensors
        if name.endswith("att.decay"):
            ckpt[name.replace("att.decay", "att.time_decay")] = np.log(-np.log(arr.astype(np.float64))).astype(np.float32)
        elif name.endswith("att.bonus"):
            ckpt[name.replace("att.bonus", "att.time_faaaa")] = arr
        elif "time_mix" in name:
            ckpt[name] = arr.reshape(1, 1, C)
        else:
            ckpt[name] = arr
    ckpt["blocks.0.ln0.weight"] = np.ones(C, np.float32)     # replaced below by the folded embedding itself
    ckpt["blocks.0.ln0.bias"] = np.zeros(C, np.float32)
    order = ["emb.weight", "blocks.0.ln0.weight", "blocks.0.ln0.bias"] + [k for k in ckpt if k.startswith("blocks.")
                                                                           and "ln0" not in k] + [
        "ln_out.weight", "ln_out.bias", "head.weight"]
    torch.save({k: torch.from_numpy(np.ascontiguousarray(ckpt[k])) for k in order}, tmp_path / "demo.pth")
    code = f"""
import os, sys, json, numpy as np, torch
os.environ['RWKV_JIT_ON'] = '0'; os.environ['RWKV_CUDA_ON'] = '0'
from rwkv.model import RWKV
m = RWKV(model={str(tmp_path / 'demo')!r}, strategy='cpu fp32', verbose=False)
m.w['emb.weight'] = torch.from_numpy(np.load({str(tmp_path / 'emb.npy')!r}))   # exactly our folded embedding
ids = json.loads(sys.argv[1])
out, _ = m.forward(ids, None, full_output=True)
np.save({str(tmp_path / 'ref.npy')!r}, out.float().numpy())
"""
    np.save(tmp_path / "emb.npy", sd["emb.weight"])
    ids = list(b"And God said, Let there be light: and there was light.\nGe1:4 And God saw the light")
    subprocess.run([sys.executable, "-c", code, json.dumps(ids)], check=True, capture_output=True)
    # the reference's decay is exp(-exp(time_decay)) recomputed in float32: compare against the same values
    ref = np.load(tmp_path / "ref.npy")
    ours, _ = demo.forward(ids, all_logits=True)
    rel = np.abs(ours - ref).max() / max(1.0, np.abs(ref).max())
    assert rel <= 1e-4, rel
