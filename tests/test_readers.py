"""Checkpoint readers: round trips through every format and dtype, torch/safetensors compatibility, the rwkv.cpp
tiny fixtures (with ggml dequantization checked against a scalar implementation written from the spec), HF
folders and names, and one-line FormatErrors for damaged files."""
from __future__ import annotations

import json
import struct
import subprocess
import sys

import numpy as np
import pytest

from checkpoint_writers import (LazyArray, RawTensor, bf16_round, blinkdl_to_hf_name, save_hf_dir, save_pth,
                                save_rwkv_cpp, save_safetensors)
from conftest import REPO, shared_file
from rwkv_lite.errors import FormatError
from rwkv_lite.quantize.names import canonical_names, hf_to_blinkdl, is_hf_naming
from rwkv_lite.quantize.readers import open_checkpoint
from rwkv_lite.quantize.readers.rwkv_cpp import open_rwkv_cpp

DTYPES = ["f32", "f16", "bf16"]


def stored(values: np.ndarray, dtype: str) -> np.ndarray:
    """What a tensor holds once stored in `dtype` (the reader must return exactly this, as float32)."""
    v = np.asarray(values, np.float32)
    return {"f32": v, "f16": v.astype(np.float16).astype(np.float32), "bf16": bf16_round(v)}[dtype]


def tiny_v5_state(C=16, L=2, V=40, F=64, H=2, seed=0) -> dict[str, np.ndarray]:
    """Random tensors with RWKV-5.2 BlinkDL names and shapes (values irrelevant to the readers)."""
    rng = np.random.default_rng(seed)
    r = lambda *s: rng.standard_normal(s).astype(np.float32)
    sd = {"emb.weight": r(V, C), "blocks.0.ln0.weight": r(C), "blocks.0.ln0.bias": r(C)}
    for i in range(L):
        b = f"blocks.{i}."
        sd.update({b + "ln1.weight": r(C), b + "ln1.bias": r(C), b + "ln2.weight": r(C), b + "ln2.bias": r(C)})
        for m in "kvrg":
            sd[b + f"att.time_mix_{m}"] = r(1, 1, C)
        sd[b + "att.time_decay"] = r(H, C // H)
        sd[b + "att.time_faaaa"] = r(H, C // H)
        for w in ("receptance", "key", "value", "output", "gate"):
            sd[b + f"att.{w}.weight"] = r(C, C)
        sd[b + "att.ln_x.weight"], sd[b + "att.ln_x.bias"] = r(C), r(C)
        sd[b + "ffn.time_mix_k"], sd[b + "ffn.time_mix_r"] = r(1, 1, C), r(1, 1, C)
        sd[b + "ffn.key.weight"] = r(F, C)
        sd[b + "ffn.receptance.weight"] = r(C, C)
        sd[b + "ffn.value.weight"] = r(C, F)
    sd["ln_out.weight"], sd["ln_out.bias"], sd["head.weight"] = r(C), r(C), r(V, C)
    return sd


def assert_one_line_error(excinfo, path):
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    assert str(path) in msg, msg


# --- bf16 rounding (the writers' ground truth) ---------------------------------------------------------------

def test_bf16_round_ties_to_even_and_specials():
    one = np.float32(1.0)
    ulp = np.float32(2.0 ** -7)                         # bf16 spacing at 1.0
    x = np.array([1 + ulp / 2, 1 + 3 * ulp / 2, 1 + ulp / 2 + 2 ** -20, -(1 + ulp / 2), np.inf, -np.inf, 0.0,
                  -0.0, 3.4e38], np.float32)
    got = bf16_round(x)
    want = np.array([one, 1 + 2 * ulp, 1 + ulp, -one, np.inf, -np.inf, 0.0, -0.0, np.inf], np.float32)
    assert np.array_equal(got, want)
    assert np.signbit(got[7])
    assert np.isnan(bf16_round(np.array([np.nan], np.float32)))[0]


def test_bf16_round_matches_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    scaled = (rng.standard_normal(10000) * 10.0 ** rng.integers(-30, 30, 10000)).astype(np.float32)
    ties = (rng.integers(0, 1 << 16, 1000).astype(np.uint32) << 16 | 0x8000).view(np.float32)  # exact halfway
    x = np.concatenate([scaled, ties])
    x = x[np.isfinite(x)]
    want = torch.from_numpy(x).to(torch.bfloat16).float().numpy()
    assert np.array_equal(bf16_round(x), want)


# --- our writers vs the real libraries -------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
def test_save_pth_is_read_by_torch_load_weights_only(tmp_path, dtype):
    torch = pytest.importorskip("torch")
    sd = tiny_v5_state(L=1)
    sd["scalar"] = np.float32(2.5)
    path = save_pth(sd, tmp_path / "m.pth", dtype=dtype)
    loaded = torch.load(path, weights_only=True)
    assert list(loaded) == list(sd)
    tdt = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[dtype]
    for name, value in sd.items():
        assert loaded[name].dtype == tdt
        assert np.array_equal(loaded[name].float().numpy(), stored(value, dtype)), name


def test_save_safetensors_is_read_by_safetensors(tmp_path):
    st_numpy = pytest.importorskip("safetensors.numpy")
    sd = tiny_v5_state(L=1)
    for dtype in ("f32", "f16"):
        path = save_safetensors(sd, tmp_path / f"m-{dtype}.safetensors", dtype=dtype, metadata={"a": "b"})
        loaded = st_numpy.load_file(str(path))
        for name, value in sd.items():
            assert np.array_equal(loaded[name].astype(np.float32), stored(value, dtype)), name
    st_torch = pytest.importorskip("safetensors.torch")
    path = save_safetensors(sd, tmp_path / "m-bf16.safetensors", dtype="bf16")
    loaded = st_torch.load_file(str(path))
    for name, value in sd.items():
        assert np.array_equal(loaded[name].float().numpy(), bf16_round(value)), name


# --- round trips through our readers ---------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_single_file_round_trip(tmp_path, fmt, dtype):
    sd = tiny_v5_state()
    sd["scalar"] = np.float32(-1.25)
    sd["empty"] = np.zeros((0, 4), np.float32)
    path = (save_pth if fmt == "pth" else save_safetensors)(sd, tmp_path / f"m.{fmt}", dtype=dtype)
    with open_checkpoint(path) as ckpt:
        assert ckpt.kind == fmt
        assert ckpt.source_files == [path.name]
        assert ckpt.config is None and ckpt.tokenizer_file is None
        assert list(ckpt.tensors) == list(sd)                      # file order
        for name, value in sd.items():
            ref = ckpt.tensors[name]
            assert ref.name == name and ref.dtype == dtype and ref.shape == np.shape(value)
            got = ref.load()
            assert got.dtype == np.float32 and np.array_equal(got, stored(value, dtype)), name
        w = ckpt.tensors["blocks.1.ffn.key.weight"]
        want = stored(sd["blocks.1.ffn.key.weight"], dtype)
        for a, b in [(0, 1), (5, 17), (60, 64), (63, 99), (10, 10)]:
            assert np.array_equal(w.load_rows(a, b), want[a:b])
        assert np.array_equal(ckpt.tensors["blocks.0.att.time_mix_k"].load_rows(0, 1),
                              stored(sd["blocks.0.att.time_mix_k"], dtype))


def test_mixed_dtypes_and_lazy_arrays(tmp_path):
    made = []
    big = LazyArray((300, 7), lambda: made.append(1) or np.arange(2100, dtype=np.float32).reshape(300, 7) / 7)
    sd = {"a": np.ones((2, 3), np.float32) / 3, "big": big}
    path = save_pth(sd, tmp_path / "m.pth", dtype={"a": "bf16", "big": "f16"})
    assert made == [1]
    with open_checkpoint(path) as ckpt:
        assert ckpt.tensors["a"].dtype == "bf16" and ckpt.tensors["big"].dtype == "f16"
        assert np.array_equal(ckpt.tensors["a"].load(), bf16_round(sd["a"]))
        assert np.array_equal(ckpt.tensors["big"].load_rows(250, 300),
                              stored(np.arange(2100, dtype=np.float32).reshape(300, 7)[250:] / 7, "f16"))


def test_closed_checkpoint_refuses_reads(tmp_path):
    path = save_safetensors({"a": np.ones(3, np.float32)}, tmp_path / "m.safetensors")
    ckpt = open_checkpoint(path)
    ref = ckpt.tensors["a"]
    ckpt.close()
    with pytest.raises(FormatError, match="closed"):
        ref.load()


# --- torch.save output read by us ---------------------------------------------------------------------------

def test_reads_torch_save_output_exactly(tmp_path):
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    base = torch.randn(6, 8)
    half = torch.randn(4, 6).half()
    sd = {
        "f32": torch.randn(5, 3), "f16": torch.randn(4, 2).half(), "bf16": torch.randn(7, 3).bfloat16(),
        "transposed": base.t(), "slice": base[2:5, 1:7], "row": base[3], "column": base[:, 2],
        "expanded": torch.randn(1, 5).expand(4, 5), "base": base, "flat_view": base.view(48),
        "half_strided": half[::2, 1::2], "bf16_t": torch.randn(3, 9).bfloat16().t(),
        "scalar": torch.tensor(1.5), "param": torch.nn.Parameter(torch.randn(3, 2)),
        "empty": torch.zeros(0, 3), "step": 7,
    }
    path = tmp_path / "views.pth"
    torch.save(sd, path)
    with open_checkpoint(path) as ckpt:
        assert ckpt.info["storages"] == 10              # base and its 5 views share one storage
        assert ckpt.info["ignored_entries"] == ["step"]
        assert list(ckpt.tensors) == [k for k in sd if k != "step"]
        for name, ref in ckpt.tensors.items():
            want = sd[name].detach().float().numpy()
            assert ref.shape == want.shape, name
            assert np.array_equal(ref.load(), want), name
            if want.ndim and want.shape[0] > 2:
                assert np.array_equal(ref.load_rows(1, 3), want[1:3]), name
        assert ckpt.tensors["bf16"].dtype == "bf16" and ckpt.tensors["half_strided"].dtype == "f16"


def test_reads_module_state_dict_parameters_and_wrapped_checkpoints(tmp_path):
    torch = pytest.importorskip("torch")
    lin = torch.nn.Linear(4, 3)                         # state_dict carries `_metadata` (BUILD on OrderedDict)
    torch.save(lin.state_dict(), tmp_path / "sd.pth")
    tagged = torch.randn(3)
    tagged.note = "x"                                   # a tensor with a __dict__: _rebuild_from_type_v2
    torch.save({"state_dict": lin.state_dict(), "epoch": 3, "tagged": tagged}, tmp_path / "wrapped.pth")
    torch.save({"w": torch.nn.Parameter(torch.randn(2, 2))}, tmp_path / "param.pth")
    with open_checkpoint(tmp_path / "sd.pth") as ckpt:
        assert np.array_equal(ckpt.tensors["weight"].load(), lin.weight.detach().numpy())
    with open_checkpoint(tmp_path / "wrapped.pth") as ckpt:      # top level has a tensor: read it as is
        assert list(ckpt.tensors) == ["tagged"]
        assert np.array_equal(ckpt.tensors["tagged"].load(), tagged.numpy())
    torch.save({"state_dict": lin.state_dict(), "epoch": 3}, tmp_path / "lightning.pth")
    with open_checkpoint(tmp_path / "lightning.pth") as ckpt:
        assert ckpt.info["state_dict_key"] == "state_dict"
        assert np.array_equal(ckpt.tensors["bias"].load(), lin.bias.detach().numpy())
    with open_checkpoint(tmp_path / "param.pth") as ckpt:
        assert ckpt.tensors["w"].shape == (2, 2)


# --- rwkv.cpp ---------------------------------------------------------------------------------------------------

TINY = {  # name: (n_embed, n_layer, tensor count, parameter count) of the rwkv.cpp tiny fixtures
    "4v0-660K": (128, 4, 78, 661_504), "5v1-730K": (64, 12, 246, 680_640), "5v2-730K": (64, 12, 270, 731_904),
    "7v0-834K": (64, 12, 339, 829_888),
}


@pytest.mark.parametrize("name", sorted(TINY))
@pytest.mark.parametrize("dtype", ["FP32", "FP16"])
def test_rwkv_cpp_tiny_fixtures_parse(name, dtype):
    path = shared_file("rwkv-cpp-tiny", f"tiny-rwkv-{name}-{dtype}.bin")
    C, L, count, params = TINY[name]
    with open_checkpoint(path) as ckpt:
        assert ckpt.kind == "rwkv_cpp"
        assert ckpt.info == {"file_version": 100 if name.startswith("4") else 101, "n_vocab": 256,
                             "n_embed": C, "n_layer": L, "data_type": {"FP32": "f32", "FP16": "f16"}[dtype]}
        assert len(ckpt.tensors) == count
        assert sum(r.numel for r in ckpt.tensors.values()) == params
        t = ckpt.tensors
        assert t["emb.weight"].shape == (256, C) and t["head.weight"].shape == (256, C)
        assert t["blocks.0.ln0.weight"].shape == (C,)
        assert t["blocks.0.att.key.weight"].shape == (C, C)
        if name == "5v1-730K":
            assert t["blocks.0.att.time_decay"].shape == (8, 1, 1)
        if name == "5v2-730K":
            assert t["blocks.0.att.time_decay"].shape == (8, 8, 1)
            assert t["blocks.0.ffn.key.weight"].shape == (4 * C, C)
        if name == "7v0-834K":
            assert t["blocks.0.att.x_rwkvag"].shape == (6, 1, C)
        if dtype == "FP16":                  # rwkv.cpp keeps vectors and `.time_` tensors in FP32
            assert t["emb.weight"].dtype == "f16" and t["blocks.0.ln1.weight"].dtype == "f32"
            assert all(r.dtype == "f32" for n, r in t.items() if ".time_" in n)


@pytest.mark.parametrize("name", sorted(TINY))
def test_rwkv_cpp_fp16_file_agrees_with_fp32_file(name):
    with open_checkpoint(shared_file("rwkv-cpp-tiny", f"tiny-rwkv-{name}-FP32.bin")) as a, \
            open_checkpoint(shared_file("rwkv-cpp-tiny", f"tiny-rwkv-{name}-FP16.bin")) as b:
        assert list(a.tensors) == list(b.tensors)
        for n, ref in a.tensors.items():
            x, y = ref.load(), b.tensors[n].load()
            assert np.array_equal(stored(x, b.tensors[n].dtype), y), n


def _rwkv_cpp_raw_tensors(path):
    """name -> (type code, dims innermost-first, raw data bytes): an independent walk of the format."""
    data = path.read_bytes()
    pos, out = 24, {}
    sizes = {0: 4, 1: 2}
    block = {7: 22, 8: 24}
    while pos < len(data):
        n_dims, key_len, code = struct.unpack_from("<3i", data, pos)
        dims = struct.unpack_from(f"<{n_dims}i", data, pos + 12)
        pos += 12 + 4 * n_dims
        key = data[pos:pos + key_len].decode()
        pos += key_len
        numel = int(np.prod(dims))
        nbytes = numel * sizes[code] if code in sizes else numel // 32 * block[code]
        out[key] = (code, dims, data[pos:pos + nbytes])
        pos += nbytes
    return out


def _f16(raw: bytes) -> np.float32:
    return np.float32(np.frombuffer(raw, "<f2")[0])


def ggml_block_values(kind: str, raw: bytes) -> list[np.float32]:
    """One ggml block of 32 values, dequantized value by value from ggml's block layout."""
    out = [np.float32(0)] * 32
    if kind == "q8_0":
        d = _f16(raw[0:2])
        return [np.float32(q) * d for q in np.frombuffer(raw[2:34], np.int8)]
    if kind in ("q4_0", "q4_1"):
        d = _f16(raw[0:2])
        m = _f16(raw[2:4]) if kind == "q4_1" else None
        qs = raw[2:18] if kind == "q4_0" else raw[4:20]
        for j in range(16):
            lo, hi = qs[j] & 15, qs[j] >> 4
            if kind == "q4_0":
                out[j], out[j + 16] = np.float32(lo - 8) * d, np.float32(hi - 8) * d
            else:
                out[j], out[j + 16] = np.float32(lo) * d + m, np.float32(hi) * d + m
        return out
    d = _f16(raw[0:2])
    if kind == "q5_0":
        m, qh, qs = None, int.from_bytes(raw[2:6], "little"), raw[6:22]
    else:
        m, qh, qs = _f16(raw[2:4]), int.from_bytes(raw[4:8], "little"), raw[8:24]
    for j in range(16):
        x0 = (qs[j] & 15) | (((qh >> j) & 1) << 4)
        x1 = (qs[j] >> 4) | (((qh >> (j + 16)) & 1) << 4)
        if kind == "q5_0":
            out[j], out[j + 16] = np.float32(x0 - 16) * d, np.float32(x1 - 16) * d
        else:
            out[j], out[j + 16] = np.float32(x0) * d + m, np.float32(x1) * d + m
    return out


@pytest.mark.parametrize("kind", ["Q5_0", "Q5_1"])
def test_rwkv_cpp_q5_dequantization_matches_scalar_spec(kind):
    path = shared_file("rwkv-cpp-tiny", f"tiny-rwkv-6v0-3m-{kind}.bin")
    raw = _rwkv_cpp_raw_tensors(path)
    bsize = 22 if kind == "Q5_0" else 24
    checked = 0
    with open_checkpoint(path) as ckpt:
        assert ckpt.info["data_type"] == kind.lower() and len(ckpt.tensors) == 342
        assert sum(r.numel for r in ckpt.tensors.values()) == 3_334_656
        for name, ref in ckpt.tensors.items():
            code, dims, data = raw[name]
            assert ref.shape == tuple(reversed(dims))
            if ref.dtype == "f32":
                assert code == 0 and np.array_equal(ref.load().ravel(), np.frombuffer(data, "<f4"))
                continue
            assert ref.dtype == kind.lower() and len(ref.shape) == 2
            rows, cols = ref.shape
            r = (len(name) * 7) % rows                       # a row chosen per tensor, plus the first and last
            for row in sorted({0, r, rows - 1}):
                blocks = range(row * cols // 32, (row + 1) * cols // 32)
                want = np.array([v for b in blocks for v in ggml_block_values(kind.lower(),
                                                                               data[b * bsize:(b + 1) * bsize])])
                assert np.array_equal(ref.load_rows(row, row + 1)[0], want), (name, row)
                checked += 1
            assert np.array_equal(ref.load()[r], ref.load_rows(r, r + 1)[0])
    assert checked >= 3 * 132


@pytest.mark.parametrize("kind", ["q4_0", "q4_1", "q5_0", "q5_1", "q8_0"])
def test_rwkv_cpp_synthetic_quantized_blocks(tmp_path, kind):
    size = {"q4_0": 18, "q4_1": 20, "q5_0": 22, "q5_1": 24, "q8_0": 34}[kind]
    rng = np.random.default_rng(3)
    rows, cols = 5, 64
    blocks = []
    for _ in range(rows * cols // 32):
        b = bytearray(rng.integers(0, 256, size, dtype=np.uint8).tobytes())
        b[0:2] = np.float16(rng.uniform(-2, 2)).tobytes()              # finite scales
        if kind in ("q4_1", "q5_1"):
            b[2:4] = np.float16(rng.uniform(-2, 2)).tobytes()
        blocks.append(bytes(b))
    vec = RawTensor(kind, (96,), b"".join(blocks[:3]))                 # 1-D: rows are single values
    sd = {"emb.weight": np.ones((4, cols), np.float32), "w": RawTensor(kind, (rows, cols), b"".join(blocks)),
          "v": vec}
    code = {"q4_0": 2, "q4_1": 3, "q5_0": 7, "q5_1": 8, "q8_0": 9}[kind]
    path = save_rwkv_cpp(sd, tmp_path / "q.bin", header={"data_type": code, "n_layer": 1})
    want = np.array([v for b in blocks for v in ggml_block_values(kind, b)], np.float32).reshape(rows, cols)
    with open_checkpoint(path) as ckpt:
        w = ckpt.tensors["w"]
        assert w.dtype == kind and w.shape == (rows, cols)
        assert np.array_equal(w.load(), want)
        assert np.array_equal(w.load_rows(2, 4), want[2:4])
        v = ckpt.tensors["v"]
        assert np.array_equal(v.load(), want.ravel()[:96])
        assert np.array_equal(v.load_rows(33, 70), want.ravel()[33:70])      # starts and ends mid-block


def test_rwkv_cpp_writer_round_trip_and_tokenizer_beside(tmp_path):
    sd = tiny_v5_state(L=1)
    (tmp_path / "rwkv_vocab_v20230424.txt").write_text("1 'a' 1\n")
    path = save_rwkv_cpp(sd, tmp_path / "m.bin", dtype="f16")
    with open_checkpoint(path) as ckpt:
        assert ckpt.info["n_layer"] == 1 and ckpt.info["data_type"] == "f16"
        assert ckpt.tokenizer_file == tmp_path / "rwkv_vocab_v20230424.txt"
        for name, value in sd.items():
            ref = ckpt.tensors[name]
            assert np.array_equal(ref.load(), stored(value, ref.dtype)), name
        assert ckpt.tensors["blocks.0.att.time_decay"].dtype == "f32"
        assert ckpt.tensors["blocks.0.att.key.weight"].dtype == "f16"


# --- HF folders and names -------------------------------------------------------------------------------------

HF_EXPECTED = {   # BlinkDL -> HF, as HF's conversion script names them (HF's conversion script for RWKV)
    "emb.weight": "rwkv.embeddings.weight",
    "blocks.0.ln0.bias": "rwkv.blocks.0.pre_ln.bias",
    "blocks.1.ln2.weight": "rwkv.blocks.1.ln2.weight",
    "blocks.1.att.time_mix_k": "rwkv.blocks.1.attention.time_mix_key",
    "blocks.1.att.time_mix_v": "rwkv.blocks.1.attention.time_mix_value",
    "blocks.1.att.time_mix_r": "rwkv.blocks.1.attention.time_mix_receptance",
    "blocks.1.att.time_mix_g": "rwkv.blocks.1.attention.time_mix_gate",
    "blocks.0.att.time_decay": "rwkv.blocks.0.attention.time_decay",
    "blocks.0.att.time_first": "rwkv.blocks.0.attention.time_first",
    "blocks.0.att.time_faaaa": "rwkv.blocks.0.attention.time_faaaa",
    "blocks.0.att.ln_x.weight": "rwkv.blocks.0.attention.ln_x.weight",
    "blocks.0.att.gate.weight": "rwkv.blocks.0.attention.gate.weight",
    "blocks.0.att.time_maa_x": "rwkv.blocks.0.attention.time_maa_x",
    "blocks.0.att.time_maa_w1": "rwkv.blocks.0.attention.time_maa_w1",
    "blocks.0.att.time_decay_w2": "rwkv.blocks.0.attention.time_decay_w2",
    "blocks.2.ffn.time_mix_k": "rwkv.blocks.2.feed_forward.time_mix_key",
    "blocks.2.ffn.time_maa_r": "rwkv.blocks.2.feed_forward.time_maa_r",
    "blocks.2.ffn.value.weight": "rwkv.blocks.2.feed_forward.value.weight",
    "ln_out.weight": "rwkv.ln_out.weight",
    "head.weight": "head.weight",
}


@pytest.mark.parametrize("blink", sorted(HF_EXPECTED))
def test_hf_names_map_to_blinkdl(blink):
    hf = HF_EXPECTED[blink]
    assert blinkdl_to_hf_name(blink) == hf           # the test writer follows the same convention
    assert hf_to_blinkdl(hf) == blink
    assert hf_to_blinkdl(blink) == blink             # BlinkDL names pass through


def test_canonical_names_detects_and_refuses_ambiguity():
    refs = {"rwkv.embeddings.weight": 1, "head.weight": 2}
    assert is_hf_naming(refs) and not is_hf_naming({"emb.weight": 1, "head.weight": 2})
    assert canonical_names(refs) == {"emb.weight": 1, "head.weight": 2}
    with pytest.raises(FormatError, match="both mean 'emb.weight'"):
        canonical_names({"rwkv.embeddings.weight": 1, "emb.weight": 2})


@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
@pytest.mark.parametrize("shards", [1, 3])
def test_hf_folder_round_trip(tmp_path, fmt, shards):
    sd = tiny_v5_state()
    config = {"model_type": "rwkv5", "hidden_size": 16, "num_hidden_layers": 2, "intermediate_size": None}
    folder = save_hf_dir(sd, config, tmp_path / "hf", fmt=fmt, shards=shards, dtype="bf16")
    (folder / "tokenizer.json").write_text("{}")
    with open_checkpoint(folder) as ckpt:
        assert ckpt.kind == "hf" and ckpt.config == config
        assert ckpt.tokenizer_file == folder / "tokenizer.json"
        assert ckpt.info["weights_format"] == ("pth" if fmt == "bin" else "safetensors")
        assert len(ckpt.info["weight_files"]) == shards
        assert set(ckpt.source_files) >= set(ckpt.info["weight_files"]) | {"config.json"}
        assert list(ckpt.tensors) == [blinkdl_to_hf_name(k) for k in sd]      # file order across shards
        refs = canonical_names(ckpt)
        assert list(refs) == list(sd)
        for name, value in sd.items():
            assert refs[name].dtype == "bf16"
            assert np.array_equal(refs[name].load(), bf16_round(value)), name
    if shards > 1:                                   # the index json itself is also accepted as the source
        index = next(folder.glob("*.index.json"))
        with open_checkpoint(index) as ckpt:
            assert len(ckpt.tensors) == len(sd)


def test_hf_folder_prefers_safetensors_and_vocab(tmp_path):
    sd = tiny_v5_state(L=1)
    folder = save_hf_dir(sd, {"model_type": "rwkv5"}, tmp_path / "hf", fmt="safetensors")
    save_pth({"junk": np.zeros(2, np.float32)}, folder / "pytorch_model.bin")
    (folder / "tokenizer.json").write_text("{}")
    (folder / "rwkv_vocab_v20230424.txt").write_text("1 'a' 1\n")
    with open_checkpoint(folder) as ckpt:
        assert ckpt.info["weight_files"] == ["model.safetensors"]
        assert ckpt.tokenizer_file.name == "rwkv_vocab_v20230424.txt"


def test_folder_holding_one_plain_checkpoint_opens_as_that_file(tmp_path):
    sd = tiny_v5_state(L=1)
    for name, writer, kind in [("m.bin", save_rwkv_cpp, "rwkv_cpp"), ("m.pth", save_pth, "pth")]:
        folder = tmp_path / kind
        folder.mkdir()
        writer(sd, folder / name)
        (folder / "config.json").write_text(json.dumps({"note": "any config the user put here"}))
        (folder / "rwkv_vocab_v20230424.txt").write_text("1 'a' 1\n")
        with open_checkpoint(folder) as ckpt:
            assert ckpt.kind == kind                  # rwkv.cpp semantics (e.g. ln_x eps) must not be lost
            assert ckpt.config == {"note": "any config the user put here"}
            assert ckpt.tokenizer_file.name == "rwkv_vocab_v20230424.txt"
            assert ckpt.source_files == [name, "config.json"]
            assert list(ckpt.tensors) == list(sd)


def test_hf_folder_prefers_single_safetensors_over_bin_index(tmp_path):
    sd = tiny_v5_state(L=1)
    folder = save_hf_dir(sd, {"model_type": "rwkv5"}, tmp_path / "hf", fmt="bin", shards=2)
    save_safetensors({"rwkv.embeddings.weight": np.ones((2, 2), np.float32)}, folder / "model.safetensors")
    with open_checkpoint(folder) as ckpt:
        assert ckpt.kind == "hf" and ckpt.info["weight_files"] == ["model.safetensors"]


def test_zip64_local_headers_are_understood(tmp_path):
    """Members written with zip64 extra fields (as for > 4 GB files) are located correctly."""
    import zipfile
    from checkpoint_writers import _state_dict_pickle
    values = np.arange(6, dtype="<f4")
    path = tmp_path / "z64.pth"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, data in [("archive/data.pkl", _state_dict_pickle([("w", "0", "f32", (2, 3))])),
                           ("archive/data/0", values.tobytes())]:
            info = zipfile.ZipInfo(name)
            with zf.open(info, "w", force_zip64=True) as out:
                out.write(data)
    with open_checkpoint(path) as ckpt:
        assert np.array_equal(ckpt.tensors["w"].load(), values.reshape(2, 3))


def test_config_beside_a_single_file_only_when_rwkv(tmp_path):
    path = save_pth({"a": np.zeros(2, np.float32)}, tmp_path / "m.pth")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with open_checkpoint(path) as ckpt:
        assert ckpt.config is None
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "rwkv5", "hidden_size": 2}))
    with open_checkpoint(path) as ckpt:
        assert ckpt.config == {"model_type": "rwkv5", "hidden_size": 2}
        assert ckpt.source_files == ["m.pth", "config.json"]


def test_hf_index_problems_are_format_errors(tmp_path):
    sd = tiny_v5_state(L=1)
    folder = save_hf_dir(sd, {"model_type": "rwkv5"}, tmp_path / "hf", fmt="safetensors", shards=2)
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    for bad_shard, pattern in [("../evil.safetensors", "not a file in this folder"),
                               ("model-00009-of-00009.safetensors", "missing")]:
        broken = json.loads(json.dumps(index))
        broken["weight_map"]["head.weight"] = bad_shard
        index_path.write_text(json.dumps(broken))
        with pytest.raises(FormatError, match=pattern) as e:
            open_checkpoint(folder)
        assert_one_line_error(e, index_path)
    broken = json.loads(json.dumps(index))
    first = broken["weight_map"]["head.weight"]
    other = next(s for s in broken["weight_map"].values() if s != first)
    broken["weight_map"]["head.weight"] = other                          # listed in the wrong shard
    index_path.write_text(json.dumps(broken))
    with pytest.raises(FormatError, match="does not contain it"):
        open_checkpoint(folder)
    with pytest.raises(FormatError, match="no model weights"):
        open_checkpoint((tmp_path / "empty").mkdir() or tmp_path / "empty")


# --- damaged and unsupported files -----------------------------------------------------------------------------

def _valid_file(tmp_path, fmt):
    sd = tiny_v5_state(L=1)
    if fmt == "pth":
        return save_pth(sd, tmp_path / "m.pth", dtype="bf16")
    if fmt == "safetensors":
        return save_safetensors(sd, tmp_path / "m.safetensors", dtype="f16")
    return save_rwkv_cpp(sd, tmp_path / "m.bin", dtype="f16")


@pytest.mark.parametrize("fmt", ["pth", "safetensors", "rwkv_cpp"])
@pytest.mark.parametrize("keep", [0, 5, 20, 0.3, 0.7, -1])
def test_truncated_files_give_one_line_format_error(tmp_path, fmt, keep):
    path = _valid_file(tmp_path, fmt)
    data = path.read_bytes()
    n = keep if isinstance(keep, int) and keep >= 0 else (len(data) + keep if keep == -1 else int(len(data) * keep))
    path.write_bytes(data[:n])
    with pytest.raises(FormatError) as e:
        with open_checkpoint(path) as ckpt:
            for ref in ckpt.tensors.values():
                ref.load()
    assert_one_line_error(e, path)


def test_wrong_and_unsupported_files(tmp_path):
    cases = {
        "random.bin": bytes(range(256)) * 4,
        "empty.pth": b"",
        "legacy.pth": b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19\x2e" + b"\0" * 40,
        "bare.pkl": b"\x80\x04\x95" + b"\0" * 40,
        "text.safetensors": b"hello world, not a model",
    }
    messages = {}
    for name, data in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(FormatError) as e:
            open_checkpoint(path)
        assert_one_line_error(e, path)
        messages[name] = str(e.value)
    assert "legacy (non-zip) torch format" in messages["legacy.pth"]
    with pytest.raises(FormatError, match="no such file"):
        open_checkpoint(tmp_path / "missing.pth")


def _rwkv_cpp_bytes(tensors: list[tuple], header=(0x67676D66, 101, 4, 2, 1, 0)) -> bytes:
    out = struct.pack("<6I", *header)
    for n_dims, key, code, dims, data in tensors:
        out += struct.pack(f"<3I{len(dims)}I", n_dims, len(key), code, *dims) + key + data
    return out


@pytest.mark.parametrize("case,pattern", [
    ("magic", "not an rwkv.cpp file"), ("version", "file version 99"), ("dims0", "0 dimensions"),
    ("dims4", "4 dimensions"), ("key0", "key length 0"), ("keyhuge", "key length 4000000000"),
    ("type", "unknown data type 55"), ("removed", "Q4_2"), ("kquant", "Q4_K"), ("zero_dim", "bad dimensions"),
    ("v100_quant", "file version 100"), ("partial_block", "not whole blocks"), ("data", "runs past the end"),
    ("dup", "appears twice"), ("emb_shape", "header says"), ("utf8", "UTF-8"), ("n_layer", "implausible n_layer"),
])
def test_rwkv_cpp_header_validation(tmp_path, case, pattern):
    emb = (2, b"emb.weight", 0, (2, 4), b"\0" * 32)
    header = [0x67676D66, 101, 4, 2, 1, 0]
    tensors = [emb]
    if case == "magic":
        header[0] = 0x12345678
    elif case == "version":
        header[1] = 99
    elif case == "n_layer":
        header[4] = 1 << 30
    elif case == "v100_quant":
        header[1], header[5] = 100, 7
    elif case == "removed":
        header[5] = 5
    else:
        extra = {
            "dims0": (0, b"x", 0, (), b""), "dims4": (4, b"x", 0, (1, 1, 1, 1), b"\0" * 4),
            "key0": (1, b"", 0, (1,), b"\0" * 4), "type": (1, b"x", 55, (1,), b"\0" * 4),
            "kquant": (1, b"x", 13, (256,), b"\0" * 144), "zero_dim": (2, b"x", 0, (0, 3), b""),
            "partial_block": (1, b"x", 7, (40,), b"\0" * 44), "data": (1, b"x", 0, (1000,), b"\0" * 8),
            "dup": emb, "emb_shape": (2, b"emb.weight", 0, (3, 4), b"\0" * 48),
            "utf8": (1, b"\xff\xfe", 0, (1,), b"\0" * 4),
        }.get(case)
        if case == "emb_shape":
            tensors = [extra]
        elif case == "keyhuge":
            tensors = [emb]
        elif extra is not None:
            tensors = [emb, extra]
    data = _rwkv_cpp_bytes(tensors, tuple(header))
    if case == "keyhuge":
        data += struct.pack("<3II", 1, 4_000_000_000, 0, 1)
    path = tmp_path / "bad.bin"
    path.write_bytes(data)
    opener = open_rwkv_cpp if case == "magic" else open_checkpoint    # without the magic, nothing says rwkv.cpp
    with pytest.raises(FormatError, match=pattern) as e:
        with opener(path) as ckpt:
            [r.load() for r in ckpt.tensors.values()]
    assert_one_line_error(e, path)


def _safetensors_bytes(header: dict, data: bytes, length: int | None = None) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


@pytest.mark.parametrize("case,pattern", [
    ("huge_len", "does not fit"), ("len_past_end", "does not fit"), ("not_json", "not valid JSON"),
    ("offset_out", "outside the data section"), ("overlap", "overlap"), ("size_mismatch", "does not match"),
    ("dtype", "unsupported dtype"), ("neg_shape", "non-negative"), ("bool_shape", "non-negative"),
    ("dup_key", "duplicate key"), ("extra_field", "exactly dtype"), ("metadata", "__metadata__"),
    ("reversed", "outside the data section"), ("list_header", "not a JSON object"),
])
def test_safetensors_header_validation(tmp_path, case, pattern):
    ok = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
          "b": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}
    data = b"\0" * 16
    header = json.loads(json.dumps(ok))
    raw = None
    if case == "huge_len":
        raw = struct.pack("<Q", 1 << 62) + b"{}"
    elif case == "len_past_end":
        raw = _safetensors_bytes(ok, data, length=10_000)
    elif case == "not_json":
        raw = struct.pack("<Q", 5) + b"{nope" + data
    elif case == "offset_out":
        header["b"]["data_offsets"] = [8, 24]
        header["b"]["shape"] = [4]
    elif case == "overlap":
        header["b"]["data_offsets"] = [4, 12]
    elif case == "size_mismatch":
        header["b"]["shape"] = [3]
    elif case == "dtype":
        header["a"]["dtype"] = "F8_E4M3"
    elif case == "neg_shape":
        header["a"]["shape"] = [-2]
    elif case == "bool_shape":
        header["a"]["shape"] = [True, 2]
    elif case == "dup_key":
        raw_h = b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, ' \
                b'"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}'
        raw = struct.pack("<Q", len(raw_h)) + raw_h + data
    elif case == "extra_field":
        header["a"]["evil"] = 1
    elif case == "metadata":
        header["__metadata__"] = {"a": 1}
    elif case == "reversed":
        header["a"]["data_offsets"] = [8, 0]
    elif case == "list_header":
        raw_h = b"[1, 2]"
        raw = struct.pack("<Q", len(raw_h)) + raw_h + data
    path = tmp_path / "bad.safetensors"
    path.write_bytes(raw if raw is not None else _safetensors_bytes(header, data))
    with pytest.raises(FormatError, match=pattern) as e:
        open_checkpoint(path)
    assert_one_line_error(e, path)


def test_torch_zip_structure_problems(tmp_path):
    from checkpoint_writers import _state_dict_pickle, write_torch_zip
    pkl = _state_dict_pickle([("w", "0", "f32", (2, 3))])
    cases = {
        "missing_storage.pth": ({"data.pkl": pkl, "version": b"3\n"}, "data/0 is missing"),
        "short_storage.pth": ({"data.pkl": pkl, "data/0": b"\0" * 20}, "claims 24"),
        "no_pickle.pth": ({"version": b"3\n", "data/0": b"\0" * 24}, "without data.pkl"),
        "byteorder.pth": ({"data.pkl": pkl, "byteorder": b"middle", "data/0": b"\0" * 24}, "byteorder"),
        "not_pickle.pth": ({"data.pkl": b"hello", "data/0": b"\0" * 24}, "not a valid checkpoint pickle"),
    }
    for name, (records, pattern) in cases.items():
        path = write_torch_zip(tmp_path / name, records)
        with pytest.raises(FormatError, match=pattern) as e:
            open_checkpoint(path)
        assert_one_line_error(e, path)
    # a view reaching past its storage
    big_view = _state_dict_pickle([("w", "0", "f32", (4, 3))])
    path = write_torch_zip(tmp_path / "view.pth", {"data.pkl": big_view.replace(b"K\x0c", b"K\x06"),
                                                   "data/0": b"\0" * 24})
    with pytest.raises(FormatError, match="reaches element 11") as e:
        open_checkpoint(path)
    assert_one_line_error(e, path)


def test_big_endian_torch_zip(tmp_path):
    from checkpoint_writers import _state_dict_pickle, bf16_bits, write_torch_zip
    values = np.arange(6, dtype=np.float32) / 3 - 2.5
    pkl = _state_dict_pickle([("w", "0", "f32", (2, 3)), ("b", "1", "bf16", (3, 2))])
    path = write_torch_zip(tmp_path / "be.pth", {"data.pkl": pkl, "byteorder": b"big",
                                                 "data/0": values.astype(">f4").tobytes(),
                                                 "data/1": bf16_bits(values).astype(">u2").tobytes()})
    with open_checkpoint(path) as ckpt:
        assert np.array_equal(ckpt.tensors["w"].load(), values.reshape(2, 3))
        assert np.array_equal(ckpt.tensors["b"].load(), bf16_round(values).reshape(3, 2))


# --- no torch needed ---------------------------------------------------------------------------------------------

def test_readers_work_with_torch_unimportable(tmp_path):
    sd = {"w": np.arange(6, dtype=np.float32).reshape(2, 3) / 3, "v": np.ones(4, np.float32)}
    pth = save_pth(sd, tmp_path / "m.pth", dtype="bf16")
    st = save_safetensors(sd, tmp_path / "m.safetensors", dtype="bf16")
    code = f"""
import sys
sys.modules['torch'] = None          # any 'import torch' now raises ImportError
sys.modules['safetensors'] = None
sys.path.insert(0, {str(REPO)!r})
from rwkv_lite.quantize.readers import open_checkpoint
from rwkv_lite.quantize.readers.rwkv_cpp import open_rwkv_cpp
out = []
for p in ({str(pth)!r}, {str(st)!r}):
    with open_checkpoint(p) as c:
        out.append(c.tensors['w'].load().tolist())
print(out)
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    want = bf16_round(sd["w"]).tolist()
    assert eval(res.stdout) == [want, want]
