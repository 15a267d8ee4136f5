"""Write a random-weight RWKV checkpoint of a real model's shape without holding it in memory and without torch.

RWKV-5.2 (default) in the Hugging Face layout of RWKV/v5-Eagle-7B-HF (config.json + ONE bf16 pytorch_model.bin);
RWKV-6 and RWKV-7 (`--arch 6|7`) as a BlinkDL `model.pth` (bf16 torch zip) in the output folder.

    python bench/make_checkpoint.py /tmp/eagle-7b-hf --shape 7b      # 32 x 4096, ffn 14336, vocab 65536 (15 GB)
    python bench/make_checkpoint.py /tmp/world-1b5-hf --shape 1.5b   # 24 x 2048
    python bench/make_checkpoint.py /tmp/world-3b-hf --shape 3b      # 32 x 2560
    python bench/make_checkpoint.py /tmp/g1-1b5 --shape 1.5b --arch 7 --ffn 8192   # RWKV-7 G1 1.5B shape
    python bench/make_checkpoint.py /tmp/v5-1b5-f8k --shape 1.5b --ffn 8192        # Eagle of the same shape

RWKV-7 LoRA widths follow the G1 models (1.5B: w/a 96, v 64, g 256; see LORA_WIDTHS_V7); RWKV-6 uses Finch's
(token-shift LoRA 32 per mix, decay LoRA 64; 7B: 64 / 128).

The weights are random but shaped and scaled like a trained model (LayerNorm weights 1, decays in (0, 1),
matrices ~N(0, 1/C)), so the forward pass stays finite and every kernel does its real amount of work.
The .bin is a torch.save-compatible zip (data.pkl + one stored member per tensor), written tensor by tensor.
"""
from __future__ import annotations

import argparse
import json
import pickle
import sys
import time
import types
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np

SHAPES = {"7b": (32, 4096), "3b": (32, 2560), "1.5b": (24, 2048), "tiny": (2, 256)}
HEAD_SIZE = 64
VOCAB = 65536
CHUNK = 1 << 24                     # values generated per write (32 MB of bf16)


# RWKV-7 LoRA widths (w, a, v, g) by model width, as in the G1 releases
LORA_WIDTHS_V7 = {256: (32, 32, 32, 64), 2048: (96, 96, 64, 256), 2560: (96, 96, 64, 320), 4096: (128, 128, 96, 480)}


def default_ffn(C: int) -> int:
    return int(3.5 * C) // 32 * 32


def tensor_specs(n_layer: int, C: int, vocab: int, F: int | None = None):
    """(HF name, shape, kind) in the order of a real state dict."""
    H = C // HEAD_SIZE
    F = F or default_ffn(C)
    yield "rwkv.embeddings.weight", (vocab, C), "normal1"
    for l in range(n_layer):
        p = f"rwkv.blocks.{l}."
        if l == 0:
            yield p + "pre_ln.weight", (C,), "ones"
            yield p + "pre_ln.bias", (C,), "zeros"
        for n in ("ln1", "ln2"):
            yield p + n + ".weight", (C,), "ones"
            yield p + n + ".bias", (C,), "zeros"
        a = p + "attention."
        for m in ("key", "value", "receptance", "gate"):
            yield a + "time_mix_" + m, (1, 1, C), "mix"
        yield a + "time_decay", (H, HEAD_SIZE), "decay"
        yield a + "time_faaaa", (H, HEAD_SIZE), "small"
        for m in ("receptance", "key", "value", "output", "gate"):
            yield a + m + ".weight", (C, C), "matrix"
        yield a + "ln_x.weight", (C,), "ones"
        yield a + "ln_x.bias", (C,), "zeros"
        f = p + "feed_forward."
        yield f + "time_mix_key", (1, 1, C), "mix"
        yield f + "time_mix_receptance", (1, 1, C), "mix"
        yield f + "key.weight", (F, C), "matrix"
        yield f + "receptance.weight", (C, C), "matrix"
        yield f + "value.weight", (C, F), "matrix"
    yield "rwkv.ln_out.weight", (C,), "ones"
    yield "rwkv.ln_out.bias", (C,), "zeros"
    yield "head.weight", (vocab, C), "matrix"


def tensor_specs_v7(n_layer: int, C: int, vocab: int, F: int | None = None):
    """(BlinkDL name, shape, kind) of an RWKV-7 checkpoint (layer 0 without the unused value-residual LoRA)."""
    H = C // HEAD_SIZE
    F = F or 4 * C
    d_w, d_a, d_v, d_g = LORA_WIDTHS_V7.get(C, (64, 64, 32, 128))
    yield "emb.weight", (vocab, C), "normal1"
    for l in range(n_layer):
        p = f"blocks.{l}."
        if l == 0:
            yield p + "ln0.weight", (C,), "ones"
            yield p + "ln0.bias", (C,), "zeros"
        for n in ("ln1", "ln2"):
            yield p + n + ".weight", (C,), "ones"
            yield p + n + ".bias", (C,), "zeros"
        a = p + "att."
        for f in "rwkvag":
            yield a + "x_" + f, (1, 1, C), "mix"
        for f, D in (("w", d_w), ("a", d_a), ("v", d_v), ("g", d_g)):
            if f == "v" and l == 0:
                continue
            if f != "g":
                yield a + f + "0", (1, 1, C), "small"
            yield a + f + "1", (C, D), "lora"
            yield a + f + "2", (D, C), "lora"
        yield a + "k_k", (1, 1, C), "mix"
        yield a + "k_a", (1, 1, C), "mix"
        yield a + "r_k", (H, HEAD_SIZE), "small"
        for m in ("receptance", "key", "value", "output"):
            yield a + m + ".weight", (C, C), "matrix"
        yield a + "ln_x.weight", (C,), "ones"
        yield a + "ln_x.bias", (C,), "zeros"
        yield p + "ffn.x_k", (1, 1, C), "mix"
        yield p + "ffn.key.weight", (F, C), "matrix"
        yield p + "ffn.value.weight", (C, F), "matrix"
    yield "ln_out.weight", (C,), "ones"
    yield "ln_out.bias", (C,), "zeros"
    yield "head.weight", (vocab, C), "matrix"


def tensor_specs_v6(n_layer: int, C: int, vocab: int, F: int | None = None):
    """(BlinkDL name, shape, kind) of an RWKV-6 checkpoint."""
    H = C // HEAD_SIZE
    F = F or default_ffn(C)
    d_mix, d_decay = (64, 128) if C >= 4096 else (32, 64)
    yield "emb.weight", (vocab, C), "normal1"
    for l in range(n_layer):
        p = f"blocks.{l}."
        if l == 0:
            yield p + "ln0.weight", (C,), "ones"
            yield p + "ln0.bias", (C,), "zeros"
        for n in ("ln1", "ln2"):
            yield p + n + ".weight", (C,), "ones"
            yield p + n + ".bias", (C,), "zeros"
        a = p + "att."
        for f in "xwkvrg":
            yield a + "time_maa_" + f, (1, 1, C), "mix"
        yield a + "time_maa_w1", (C, 5 * d_mix), "lora"
        yield a + "time_maa_w2", (5, d_mix, C), "lora"
        yield a + "time_decay", (1, 1, C), "decay"
        yield a + "time_decay_w1", (C, d_decay), "lora"
        yield a + "time_decay_w2", (d_decay, C), "lora"
        yield a + "time_faaaa", (H, HEAD_SIZE), "small"
        for m in ("receptance", "key", "value", "output", "gate"):
            yield a + m + ".weight", (C, C), "matrix"
        yield a + "ln_x.weight", (C,), "ones"
        yield a + "ln_x.bias", (C,), "zeros"
        yield p + "ffn.time_maa_k", (1, 1, C), "mix"
        yield p + "ffn.time_maa_r", (1, 1, C), "mix"
        yield p + "ffn.key.weight", (F, C), "matrix"
        yield p + "ffn.receptance.weight", (C, C), "matrix"
        yield p + "ffn.value.weight", (C, F), "matrix"
    yield "ln_out.weight", (C,), "ones"
    yield "ln_out.bias", (C,), "zeros"
    yield "head.weight", (vocab, C), "matrix"


def to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (round to nearest even)."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


class _NoiseSource:
    """Fast bf16 noise: one random block reused with a different rotation and sign pattern per chunk."""

    def __init__(self, seed: int):
        rng = np.random.default_rng(seed)
        self.block = rng.standard_normal(CHUNK + 4096, dtype=np.float32)
        self.rng = rng

    def chunk(self, n: int, scale: float) -> np.ndarray:
        start = int(self.rng.integers(0, 4096))
        vals = self.block[start:start + n] * np.float32(scale * (1 if self.rng.random() < 0.5 else -1))
        return to_bf16(vals)


def small_tensor(kind: str, shape, rng) -> np.ndarray:
    n = int(np.prod(shape))
    if kind == "ones":
        x = 1 + 0.05 * rng.standard_normal(n)
    elif kind == "zeros":
        x = 0.02 * rng.standard_normal(n)
    elif kind == "mix":
        x = rng.uniform(0.05, 0.95, n)
    elif kind == "decay":
        x = rng.uniform(-6.0, 1.0, n)           # w = exp(-exp(x)) in (0.07, 0.998)
    elif kind == "lora":                        # a LoRA factor (in, out): ~N(0, 0.1 / in)
        x = rng.standard_normal(n) * (0.1 / np.sqrt(shape[-2]))
    else:
        x = 0.5 * rng.standard_normal(n)
    return to_bf16(x.astype(np.float32).reshape(shape))


# --- a torch.save-compatible pickle, written without torch --------------------------------------------------------
# The pickle must name torch._utils._rebuild_tensor_v2 and torch.BFloat16Storage; pickle resolves globals through
# sys.modules, so we register stand-in modules holding stand-in callables under those names (this process only).
def _install_torch_names():
    if "torch" in sys.modules and not getattr(sys.modules["torch"], "_rwkv_lite_standin", False):
        return sys.modules["torch"]._utils._rebuild_tensor_v2, sys.modules["torch"].BFloat16Storage
    torch_mod = types.ModuleType("torch")
    torch_mod._rwkv_lite_standin = True
    utils_mod = types.ModuleType("torch._utils")

    def _rebuild_tensor_v2(*args):      # never called: only its name is pickled
        raise NotImplementedError

    _rebuild_tensor_v2.__module__ = "torch._utils"
    _rebuild_tensor_v2.__qualname__ = "_rebuild_tensor_v2"
    storage = type("BFloat16Storage", (), {"__module__": "torch"})
    utils_mod._rebuild_tensor_v2 = _rebuild_tensor_v2
    torch_mod._utils = utils_mod
    torch_mod.BFloat16Storage = storage
    sys.modules["torch"] = torch_mod
    sys.modules["torch._utils"] = utils_mod
    return _rebuild_tensor_v2, storage


class _StorageRef:
    def __init__(self, key: str, numel: int):
        self.key, self.numel = key, numel


class _TensorRef:
    def __init__(self, rebuild, storage: _StorageRef, shape):
        self.rebuild, self.storage, self.shape = rebuild, storage, shape

    def __reduce__(self):
        stride, acc = [], 1
        for d in reversed(self.shape):
            stride.insert(0, acc)
            acc *= d
        return (self.rebuild, (self.storage, 0, tuple(self.shape), tuple(stride), False, OrderedDict()))


def _data_pkl(specs) -> bytes:
    rebuild, storage_cls = _install_torch_names()

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            if isinstance(obj, _StorageRef):
                return ("storage", storage_cls, obj.key, "cpu", obj.numel)
            return None

    sd = OrderedDict()
    for i, (name, shape, _) in enumerate(specs):
        sd[name] = _TensorRef(rebuild, _StorageRef(str(i), int(np.prod(shape))), shape)
    import io
    buf = io.BytesIO()
    Pickler(buf, protocol=2).dump(sd)
    return buf.getvalue()


def write_checkpoint(out: Path, n_layer: int, C: int, vocab: int = VOCAB, seed: int = 0, arch: str = "5.2",
                     ffn: int | None = None) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    specs = list({"5.2": tensor_specs, "6": tensor_specs_v6, "7": tensor_specs_v7}[arch](n_layer, C, vocab, ffn))
    rng = np.random.default_rng(seed)
    noise = _NoiseSource(seed)
    path = out / ("pytorch_model.bin" if arch == "5.2" else "model.pth")
    tmp = path.with_name(path.name + ".tmp")
    total = sum(int(np.prod(s)) * 2 for _, s, _ in specs)
    written = 0
    t0 = time.time()
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        zf.writestr("archive/data.pkl", _data_pkl(specs))
        zf.writestr("archive/byteorder", "little")
        for i, (name, shape, kind) in enumerate(specs):
            n = int(np.prod(shape))
            with zf.open(f"archive/data/{i}", "w", force_zip64=True) as member:
                if kind in ("matrix", "normal1"):
                    scale = 1.0 if kind == "normal1" else 1.0 / np.sqrt(shape[1])
                    left = n
                    while left:
                        m = min(left, CHUNK)
                        member.write(noise.chunk(m, scale).tobytes())
                        left -= m
                else:
                    member.write(small_tensor(kind, shape, rng).tobytes())
            written += n * 2
            print(f"\r{written / 1e9:6.2f} / {total / 1e9:.2f} GB", end="", file=sys.stderr, flush=True)
        zf.writestr("archive/version", "3\n")
    tmp.replace(path)
    print(f"\nwrote {path} in {time.time() - t0:.0f} s", file=sys.stderr)
    if arch != "5.2":
        return path
    config = {"model_type": "rwkv5", "architectures": ["Rwkv5ForCausalLM"], "hidden_size": C,
              "num_hidden_layers": n_layer, "head_size": HEAD_SIZE, "attention_hidden_size": C,
              "intermediate_size": ffn, "vocab_size": vocab, "layer_norm_epsilon": 1e-5, "rescale_every": 6,
              "tie_word_embeddings": False, "torch_dtype": "bfloat16"}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return path


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path, help="output folder")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="7b")
    ap.add_argument("--arch", choices=("5.2", "6", "7"), default="5.2")
    ap.add_argument("--ffn", type=int, default=None, help="feed-forward width (default: 3.5 C for 5.2/6, 4 C for 7)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    n_layer, C = SHAPES[args.shape]
    write_checkpoint(args.out, n_layer, C, seed=args.seed, arch=args.arch, ffn=args.ffn)


if __name__ == "__main__":
    main()
