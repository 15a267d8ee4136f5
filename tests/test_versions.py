"""Every RWKV generation through every input layout, and the recurrent state carried across calls.

- detection: the version comes from tensor names and shapes (BlinkDL and rwkv.cpp layouts), recorded in the file;
- layouts: the random reference models of tests/reference_models.py, written as BlinkDL .safetensors, Hugging Face
  folders (RWKV-4 as transformers' RwkvForCausalLM names it, RWKV-6 as its HF port) and rwkv.cpp .bin files (with
  the transforms rwkv.cpp's converter applies), give the reference's logits (committed
  fixtures, max |diff| <= 1e-4 x max(1, max |ref|)). The .pth layout of every version is tests/test_reference_parity.py;
- state: for every version, feeding tokens one at a time, all at once, in uneven pieces, through the model's
  internal chunking, or through a saved-and-reloaded state gives the same logits and state;
- quantized files: int8/int4 apply to every version's large matrices; LoRA matrices stay float32.
"""
from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import pytest

import checkpoint_writers as cw
import reference_models as rm
import rwkv_lite
import rwkv_lite.model
from rwkv_lite.arch import detect_version, module_for
from rwkv_lite.errors import FormatError
from rwkv_lite.quantize.names import canonical_names
from rwkv_lite.state import State
from test_reference_parity import REFERENCE_DIR, assert_logits_match, load_fixture

ONE_SPEC_PER_VERSION = ["v4_a", "v50_a", "v51_a", "v52_a", "v6_a", "v7_b"]     # v7_b: 3 layers, layer-0 v0/v1/v2
SERIAL_VS_SEQUENCE_TOL = 1e-5       # relative to max(1, max|logits|): only GEMM-vs-GEMV rounding may differ
N_TOKENS = 40


def convert(src, dst, quant="fp32"):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")          # "no tokenizer found": these models run on token ids
        rwkv_lite.convert(src, dst, quant=quant)
    return rwkv_lite.load(dst)


def to_rwkv_cpp(sd: dict, spec: rm.ModelSpec) -> dict:
    """A BlinkDL state dict as rwkv.cpp's converter writes it."""
    H = spec.n_head
    out = {}
    for name, a in sd.items():
        a = np.asarray(a, np.float32)
        leaf = name.rsplit(".", 1)[-1]
        if spec.version == "4" and leaf == "time_decay":
            a = -np.exp(a)
        elif spec.version in ("5.0", "5.1", "5.2") and leaf == "time_decay":
            a = np.exp(-np.exp(a)).reshape(H, -1, 1)
        elif spec.version in ("5.0", "5.1") and leaf == "time_first":
            a = np.exp(a).reshape(H, 1, 1)
        elif leaf == "time_faaaa":
            a = a.reshape(H, -1, 1)
        elif spec.version == "6" and leaf == "time_decay":
            a = a.reshape(H, -1, 1)
        elif spec.version == "6" and leaf in ("time_maa_w1", "time_decay_w1", "time_decay_w2"):
            a = a.T
        elif spec.version == "6" and leaf == "time_maa_w2":
            a = a.transpose(0, 2, 1)
        elif spec.version == "7" and leaf in ("w1", "w2", "a1", "a2", "v1", "v2", "g1", "g2"):
            if name.startswith("blocks.0.") and leaf in ("v1", "v2"):
                continue                         # rwkv.cpp drops layer 0's (unused) value residual
            a = a.T
        elif spec.version == "7" and name.startswith("blocks.0.") and leaf == "v0":
            continue
        elif spec.version == "7" and leaf in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g") and ".att." in name:
            if leaf != "x_r":
                continue
            p = name[: -len("x_r")]
            a = np.stack([sd[p + f"x_{f}"].reshape(-1) for f in "rwkvag"]).reshape(6, 1, -1)
            name = p + "x_rwkvag"
        elif spec.version != "7" and ".time_" in name and a.ndim == 3 and a.shape[:2] == (1, 1):
            a = a.reshape(-1)                    # rwkv.cpp squeezes the (1, 1, C) mixes of v4-v6
        out[name] = a
    return out


# ---------------------------------------------------------------------------------------------------------------
# detection

@pytest.mark.parametrize("spec", rm.SPECS, ids=lambda s: s.name)
def test_version_detected_from_names_and_shapes(spec):
    sd = rm.make_state_dict(spec)
    assert detect_version(sd) == spec.version
    assert detect_version(to_rwkv_cpp(sd, spec)) == spec.version
    assert detect_version(dict(reversed(list(sd.items())))) == spec.version     # order-independent
    hf = {cw.blinkdl_to_hf_name(k): v for k, v in sd.items()}
    assert detect_version(canonical_names(hf)) == spec.version


# ---------------------------------------------------------------------------------------------------------------
# input layouts against the committed reference logits

def _hf_config(spec: rm.ModelSpec) -> dict:
    """config.json as transformers writes it for RWKV-4 (model_type rwkv) or the RWKV-6 HF port (rwkv6)."""
    cfg = {"hidden_size": spec.n_embd, "num_hidden_layers": spec.n_layer, "vocab_size": spec.vocab_size,
           "attention_hidden_size": spec.n_embd, "intermediate_size": spec.ffn_dim, "layer_norm_epsilon": 1e-5,
           "rescale_every": 6, "bos_token_id": 0, "eos_token_id": 0, "tie_word_embeddings": False}
    if spec.version == "4":
        cfg.update(architectures=["RwkvForCausalLM"], model_type="rwkv", context_length=1024)
    else:
        cfg.update(architectures=["Rwkv6ForCausalLM"], model_type="rwkv6", head_size=spec.head_size,
                   head_size_divisor=8)
    return cfg


LAYOUT_CASES = [("v4_b", "safetensors"), ("v50_b", "safetensors"), ("v51_b", "safetensors"),
                ("v6_b", "safetensors"), ("v7_b", "safetensors"),
                ("v4_a", "hf"), ("v6_a", "hf"),
                ("v4_a", "rwkv_cpp"), ("v4_b", "rwkv_cpp"), ("v6_a", "rwkv_cpp"), ("v6_b", "rwkv_cpp"),
                ("v7_a", "rwkv_cpp"), ("v7_b", "rwkv_cpp"), ("v7_b", "rwkv_cpp_fp16")]


@pytest.mark.parametrize("name,layout", LAYOUT_CASES, ids=[f"{n}-{f}" for n, f in LAYOUT_CASES])
def test_layout_matches_reference(name, layout, tmp_path):
    spec = rm.SPECS_BY_NAME[name]
    fx = load_fixture(spec)
    sd = rm.make_state_dict(spec)
    if layout == "safetensors":
        src = cw.save_safetensors(sd, tmp_path / "model.safetensors")
    elif layout == "hf":
        src = cw.save_hf_dir(sd, _hf_config(spec), tmp_path / "hf", fmt="safetensors", shards=2)
    else:
        dtype = "f16" if layout.endswith("fp16") else "f32"
        src = cw.save_rwkv_cpp(to_rwkv_cpp(sd, spec), tmp_path / "model.bin", dtype=dtype)
    model = convert(src, tmp_path / "out.safetensors")
    assert model.config["version"] == spec.version
    if spec.version != "4":
        assert model.config["ln_x_eps"] == 64e-5        # the reference's GroupNorm eps (rwkv.cpp's v6/v7 too)
    got, _ = model.forward([int(t) for t in fx["tokens"]], None, all_logits=True)
    if layout == "rwkv_cpp_fp16":
        # fp16 weights: a model-level check only (the transforms are proven by the fp32 case)
        diff = np.abs(got - fx["logits_seq"]).max()
        assert diff < 2e-2 * np.abs(fx["logits_seq"]).max(), diff
        assert (got.argmax(axis=1) == fx["logits_seq"].argmax(axis=1)).mean() > 0.9
    else:
        assert_logits_match(got, fx["logits_seq"], f"{name} from {layout}")
    model.close()


@pytest.mark.parametrize("name", ["v50_a", "v51_a", "v52_a"])
def test_rwkv_cpp_v5_layout_equals_pth_with_rwkv_cpp_eps(name, tmp_path):
    """rwkv.cpp's v5 graph uses ln_x eps 1e-5 (not the reference's 64e-5), so its v5 files cannot match the reference
    fixtures; instead: the rwkv.cpp layout (decays and bonus pre-transformed) must give exactly the model of the .pth
    run with eps 1e-5. (The real 5v1/5v2 files are checked against rwkv.cpp in test_tiny_fixtures.py.)"""
    spec = rm.SPECS_BY_NAME[name]
    sd = rm.make_state_dict(spec)
    from_cpp = convert(cw.save_rwkv_cpp(to_rwkv_cpp(sd, spec), tmp_path / "m.bin"), tmp_path / "a.safetensors")
    from_pth = convert(cw.save_pth(sd, tmp_path / "m.pth"), tmp_path / "b.safetensors")
    assert from_cpp.config["version"] == spec.version and from_cpp.config["ln_x_eps"] == 1e-5
    from_pth.weights.cfg = dataclasses.replace(from_pth.weights.cfg, ln_x_eps=1e-5)   # the typed config
    tokens = _tokens(name)
    got, _ = from_cpp.forward(tokens, all_logits=True)
    want, _ = from_pth.forward(tokens, all_logits=True)
    _close(got, want, f"{name}: rwkv.cpp layout vs .pth")
    from_cpp.close()
    from_pth.close()


def test_rwkv_cpp_lora_in_blinkdl_orientation_is_refused(tmp_path):
    """An rwkv.cpp file whose LoRA is not transposed (a broken converter) is a one-line FormatError."""
    spec = rm.SPECS_BY_NAME["v6_a"]
    sd = to_rwkv_cpp(rm.make_state_dict(spec), spec)
    sd["blocks.1.att.time_maa_w1"] = sd["blocks.1.att.time_maa_w1"].T.copy()
    src = cw.save_rwkv_cpp(sd, tmp_path / "bad.bin")
    with pytest.raises(FormatError, match="blocks.1.att.time_maa_w1"):
        convert(src, tmp_path / "out.safetensors")


# ---------------------------------------------------------------------------------------------------------------
# the state carries across calls identically, for every version

_MODELS: dict = {}


@pytest.fixture(scope="module")
def model_of(tmp_path_factory):
    def get(name, quant="fp32"):
        if (name, quant) not in _MODELS:
            spec = rm.SPECS_BY_NAME[name]
            folder = tmp_path_factory.mktemp(name)
            src = cw.save_pth(rm.make_state_dict(spec), folder / "model.pth")
            _MODELS[name, quant] = convert(src, folder / f"{quant}.safetensors", quant)
        return _MODELS[name, quant]
    yield get
    for m in _MODELS.values():
        m.close()
    _MODELS.clear()


def _tokens(name):
    return [int(t) for t in rm.token_sequence(rm.SPECS_BY_NAME[name])[:N_TOKENS]]


def _close(got, want, what):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, what
    err = np.abs(got - want).max()
    assert err <= SERIAL_VS_SEQUENCE_TOL * max(1.0, np.abs(want).max()), f"{what}: max diff {err:.3e}"


def _feed(model, pieces):
    """Feed the token lists in order, carrying the state; all logits concatenated, and the final state."""
    state, rows = None, []
    for piece in pieces:
        logits, state = model.forward(piece, state, all_logits=True)
        rows.append(logits)
    return np.concatenate(rows), state


@pytest.mark.parametrize("name", ONE_SPEC_PER_VERSION)
def test_state_carries_across_calls(name, model_of, monkeypatch):
    model = model_of(name)
    tokens = _tokens(name)
    serial, serial_state = _feed(model, [[t] for t in tokens])
    runs = {"sequence": _feed(model, [tokens]),
            "pieces 1+4+12+rest": _feed(model, [tokens[:1], tokens[1:5], tokens[5:17], tokens[17:]]),
            "pieces of 3": _feed(model, [tokens[i:i + 3] for i in range(0, len(tokens), 3)])}
    monkeypatch.setattr(rwkv_lite.model, "CHUNK_TOKENS", 7)
    runs["internal chunks of 7"] = _feed(model, [tokens])
    for what, (logits, state) in runs.items():
        _close(logits, serial, f"{name}: {what} vs serial logits")
        assert sorted(state.arrays) == sorted(serial_state.arrays)
        for k, arr in serial_state.arrays.items():
            _close(state.arrays[k], arr, f"{name}: {what} vs serial state {k!r}")


@pytest.mark.parametrize("name", ONE_SPEC_PER_VERSION)
def test_saved_state_resumes_exactly(name, model_of, tmp_path):
    model = model_of(name)
    tokens = _tokens(name)
    _, state = model.forward(tokens[:23])
    before = {k: v.copy() for k, v in state.arrays.items()}
    direct, _ = model.forward(tokens[23:], state, all_logits=True)
    for k, v in before.items():                            # forward() never changes the state it is given
        np.testing.assert_array_equal(state.arrays[k], v, err_msg=k)
    state.save(tmp_path / "state.safetensors")
    resumed, _ = model.forward(tokens[23:], State.load(tmp_path / "state.safetensors"), all_logits=True)
    np.testing.assert_array_equal(resumed, direct)


def test_state_layouts():
    """The state arrays per version: the reference's per-layer lists, stacked over layers."""
    shapes = {}
    for name in ONE_SPEC_PER_VERSION:
        spec = rm.SPECS_BY_NAME[name]
        cfg = {"n_layer": spec.n_layer, "n_embd": spec.n_embd, "n_head": spec.n_head, "head_size": spec.head_size}
        state = module_for(spec.version).init_state(cfg)
        shapes[spec.version] = {k: v.shape for k, v in state.items()}
        for v in state.values():
            assert v.dtype == np.float32
        if spec.version == "4":
            assert (state["pp"] == np.float32(-1e30)).all()
            assert not state["aa"].any() and not state["bb"].any()
    L, C = 2, 64
    assert shapes["4"] == {k: (L, C) for k in ("att_x", "aa", "bb", "pp", "ffn_x")}
    assert shapes["6"] == {"att_x": (L, C), "ffn_x": (L, C), "wkv": (L, 2, 32, 32)}
    assert shapes["7"] == {"att_x": (3, 128), "ffn_x": (3, 128), "wkv": (3, 2, 64, 64)}


# ---------------------------------------------------------------------------------------------------------------
# quantized files for every version

@pytest.mark.parametrize("name", ["v4_a", "v50_a", "v6_a", "v7_b"])
@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_quantized_every_version(name, quant, model_of):
    model = model_of(name, quant)
    reference = model_of(name)
    tensors = model.metadata["tensors"]
    matrices = [n for n, t in tensors.items() if t["role"] == "matrix" and n != "head.weight"]
    assert matrices and all(tensors[n]["scheme"] == quant for n in matrices)
    loras = [n for n in tensors if n.rsplit(".", 1)[-1] in ("time_maa_w1", "time_decay_w1", "time_decay_w2",
                                                            "w1", "w2", "a1", "a2", "g1", "g2")
             or n.rsplit(".", 1)[-1].startswith("time_maa_w2_")]
    # RWKV-6's and RWKV-7's LoRA factors: int8 matrices in int8 and int4 files
    assert all(tensors[n]["scheme"] == "int8" and tensors[n]["role"] == "lora"
               and tensors[n]["params"].get("layout") == "p16" for n in loras)
    if name in ("v6_a", "v7_b"):
        assert loras
        leftover = [n for n, t in tensors.items() if t["role"] == "vector" and len(t["shape"]) > 1
                    and not n.endswith(("bonus", "time_state", "r_k"))]
        assert not leftover, leftover                    # no LoRA factor left as a float array
    tokens = _tokens(name)
    got, _ = model.forward(tokens, all_logits=True)
    want, _ = reference.forward(tokens, all_logits=True)
    # quantization noise, not a different model (a wrong transform gives correlation ~0). Random weights amplify
    # the noise far more than trained ones (measured here: int8 corr >= 0.996, int4 >= 0.964; the trained tiny
    # models keep int8 top-1 agreement >= 0.97)
    corr = np.corrcoef(got.ravel(), want.ravel())[0, 1]
    assert corr >= (0.99 if quant == "int8" else 0.9), corr
    assert (got.argmax(axis=1) == want.argmax(axis=1)).mean() >= (0.8 if quant == "int8" else 0.4)


def test_reference_fixtures_cover_every_version():
    versions = {rm.SPECS_BY_NAME[p.stem].version for p in REFERENCE_DIR.glob("*.npz") if p.stem in rm.SPECS_BY_NAME}
    assert versions == {"4", "5.0", "5.1", "5.2", "6", "7"}


# int8/int4 matrices (panel layout, RWKV-6's and RWKV-7's LoRA factors included) run the same integer kernels in
# both modes, and so does the float work around them: every version matches bit for bit.
@pytest.mark.parametrize("name", ONE_SPEC_PER_VERSION)
@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_quantized_sequence_mode_equals_serial_mode(name, quant, model_of):
    model = model_of(name, quant)
    tokens = _tokens(name)
    serial, serial_state = _feed(model, [[t] for t in tokens])
    sequence, sequence_state = _feed(model, [tokens])
    np.testing.assert_array_equal(sequence, serial, err_msg=f"{name} {quant}")
    for k, arr in serial_state.arrays.items():
        np.testing.assert_array_equal(sequence_state.arrays[k], arr, err_msg=f"{name} {quant} state {k}")


def _write_with_float_lora_arrays(model, path):
    """A copy of an fp32 file in the layout files had before the LoRA factors became matrices: each factor a
    float32 (in, out) array (role 'vector'); RWKV-6's five up factors of the token shift as one time_maa_w2
    (5, D, C) array."""
    from rwkv_lite.format import ModelWriter, read_model_file
    src = read_model_file(model.path)
    try:
        tensors = {n: dict(t) for n, t in src.tensors.items()}
        lora = [n for n, t in tensors.items() if t["role"] == "lora"]
        assert lora
        for n in lora:
            tensors[n].update(role="vector", shape=tensors[n]["shape"][::-1])
        arrays = {n: (np.ascontiguousarray(a.T) if n in lora else a) for n, a in src.arrays.items()
                  if not n.startswith("__")}
        for layer in sorted({n.split(".")[1] for n in lora if n.split(".")[-1].startswith("time_maa_w2_")}):
            parts = [f"blocks.{layer}.att.time_maa_w2_{f}" for f in "wkvrg"]
            joined = np.ascontiguousarray(np.stack([arrays.pop(n) for n in parts]))     # (5, D, C)
            name = f"blocks.{layer}.att.time_maa_w2"
            tensors[name] = dict(tensors[parts[0]], shape=list(joined.shape))
            for n in parts:
                del tensors[n]
            arrays[name] = joined
        meta = {k: v for k, v in src.metadata.items() if k not in ("format", "format_version", "tensors")}
        meta["tensors"] = tensors
        with ModelWriter(path, meta, [(n, a.dtype, a.shape) for n, a in arrays.items()]) as w:
            for n, a in arrays.items():
                w.append(n, a)
            w.close()
    finally:
        src.close()


@pytest.mark.parametrize("name", ["v6_a", "v7_b"])
def test_files_with_float_lora_arrays_still_load(name, model_of, tmp_path):
    """Files written before the LoRA factors became matrices hold them as float32 (in, out) arrays (role 'vector');
    they load and run through kernels/lowrank.py, with the same logits as today's layout to float32 rounding."""
    new = model_of(name)                                # fp32: factors stored (out, in), role 'lora'
    old = tmp_path / "old.safetensors"
    _write_with_float_lora_arrays(new, old)
    old_model = rwkv_lite.load(old)
    try:
        assert not old_model.weights.layers[1].lora_matrices and new.weights.layers[1].lora_matrices
        tokens = _tokens(name)
        _close(_feed(old_model, [tokens])[0], _feed(new, [tokens])[0], f"{name} old LoRA layout, sequence")
        _close(_feed(old_model, [[t] for t in tokens[:8]])[0], _feed(new, [[t] for t in tokens[:8]])[0],
               f"{name} old LoRA layout, decode")
        states = [old_model.new_state(), old_model.new_state()]           # batched decode reads them too
        batched = old_model.forward_batch(tokens[:2], states)
        for b in range(2):
            np.testing.assert_array_equal(batched[b], old_model.forward([tokens[b]])[0])
    finally:
        old_model.close()


# generate()'s double buffering: each step writes a reused second state, starting from the previous one
# (forward_in_place with `source`; RWKV-7 reads its WKV memory from the source inside the step instead of after a
# copy). The same logits and state as forward(), the source untouched, the target's old contents irrelevant.
@pytest.mark.parametrize("name", ONE_SPEC_PER_VERSION)
@pytest.mark.parametrize("quant", ["fp32", "int8"])
def test_a_step_from_a_source_state_equals_forward(name, quant, model_of):
    model = model_of(name, quant)
    tokens = _tokens(name)
    _, source = model.forward(tokens[:7])
    kept = source.copy()
    for piece in ([tokens[7]], tokens[7:10]):
        want_logits, want_state = model.forward(piece, source)
        target = model.new_state()
        for array in target.arrays.values():
            array[...] = 12345.0                    # whatever the buffer held before
        got = model.forward_in_place(piece, target, source=source)
        np.testing.assert_array_equal(got, want_logits, err_msg=f"{name} {quant} {len(piece)} tokens")
        for k, arr in want_state.arrays.items():
            np.testing.assert_array_equal(target.arrays[k], arr, err_msg=f"{name} {quant} state {k}")
        for k, arr in kept.arrays.items():
            np.testing.assert_array_equal(source.arrays[k], arr, err_msg=f"{name} {quant}: the source changed")


def test_a_step_from_a_source_of_another_model_is_refused(model_of):
    """Either state of another model is a clear error before anything is copied (not a NumPy broadcast error)."""
    from rwkv_lite.errors import FormatError
    a, b = model_of("v7_b", "fp32"), model_of("v52_a", "fp32")
    with pytest.raises(FormatError, match="this model has arch"):
        a.forward_in_place([1], a.new_state(), source=b.new_state())
    with pytest.raises(FormatError, match="this model has arch"):
        a.forward_in_place([1], b.new_state(), source=a.new_state())
