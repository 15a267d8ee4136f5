"""Checkpoints as people download them today: RWKV-7 in the Hugging Face "fla" layout, RWKV-7 DeepEmbed, state-tuned
initial states, LoRA adapters merged at conversion; and the converter refusing any tensor it does not understand.

Every model here is random and small, written by the test in the exact published layout. Parity is against the
reference `rwkv` package: the committed fixture logits (tests/fixtures/reference, no torch needed) where the
weights are a committed spec's, and the live reference (tests/reference_oracle.py, skipped without torch) where the
layout changes what the reference must run (DeepEmbed, an initial state, merged weights).
"""
from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

import checkpoint_writers as cw
import reference_models as rm
import rwkv_lite
from rwkv_lite.errors import FormatError
from test_reference_parity import assert_logits_match, load_fixture, regenerate_weights, run_serial

REPO = Path(__file__).resolve().parent.parent


def convert(src, dst, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                    # "no tokenizer found": these models run on ids
        rwkv_lite.convert(src, dst, quant=kwargs.pop("quant", "fp32"), **kwargs)
    return rwkv_lite.load(dst)


def check_both_modes(model, tokens, ref, what, state=None):
    got_serial, _ = run_serial_from(model, tokens, state)
    assert_logits_match(got_serial, ref["logits_serial"], f"{what} serial")
    got_seq, _ = model.forward([int(t) for t in tokens], state, all_logits=True)
    assert_logits_match(got_seq, ref["logits_seq"], f"{what} sequence")


def run_serial_from(model, tokens, state=None):
    if state is None:
        return run_serial(model, tokens)
    rows = []
    for tok in tokens:
        logits, state = model.forward([int(tok)], state)
        rows.append(np.array(logits, dtype=np.float32))
    return np.stack(rows), state


def live_reference(*args, **kwargs):
    pytest.importorskip("torch")
    pytest.importorskip("rwkv")
    from reference_oracle import run_reference
    return run_reference(*args, **kwargs)


# ---------------------------------------------------------------------------------------------------------------
# RWKV-7 in the fla layout (fla-hub RWKV7ForCausalLM folders, rwkv7-hf)

def to_fla(sd: dict, stacked_mixes: bool = False) -> dict:
    """BlinkDL RWKV-7 tensors under fla's names and orientations (LoRAs as nn.Linear: weight transposed, *0 as
    the bias of lora.2; layer 0 without v_lora; older files: the six mixes as one x_x (6, C))."""
    out = {}
    norms = {"ln0": "pre_norm", "ln1": "attn_norm", "ln2": "ffn_norm"}
    proj = {"receptance": "r_proj", "key": "k_proj", "value": "v_proj", "output": "o_proj"}
    for name, a in sd.items():
        if name == "emb.weight":
            out["model.embeddings.weight"] = a
            continue
        if name.startswith("ln_out."):
            out["model.norm." + name.split(".")[1]] = a
            continue
        if name == "head.weight":
            out["lm_head.weight"] = a
            continue
        _, l, part, *rest = name.split(".")
        p = f"model.layers.{l}."
        if part in norms:
            out[p + f"{norms[part]}.{rest[0]}"] = a
        elif part == "ffn":
            out[p + "ffn." + ".".join(rest)] = a
        elif rest[0] in proj:
            out[p + f"attn.{proj[rest[0]]}.weight"] = a
        elif rest[0] == "ln_x":
            out[p + f"attn.g_norm.{rest[1]}"] = a
        elif len(rest) == 1 and len(rest[0]) == 2 and rest[0][0] in "wavg" and rest[0][1] in "012":
            f, i = rest[0]
            if f == "v" and l == "0":
                continue                                     # fla has no v_lora in layer 0
            if i == "0":
                out[p + f"attn.{f}_lora.lora.2.bias"] = a.reshape(-1)
            else:
                out[p + f"attn.{f}_lora.lora.{0 if i == '1' else 2}.weight"] = np.ascontiguousarray(a.T)
        elif rest[0].startswith("x_") and stacked_mixes:
            if rest[0] == "x_r":
                out[p + "attn.x_x"] = np.stack([sd[f"blocks.{l}.att.x_{f}"].reshape(-1) for f in "rwkvag"])
        elif rest[0] in ("k_k", "k_a"):
            out[p + f"attn.{rest[0]}"] = a.reshape(-1)            # fla keeps these as (C,)
        else:
            out[p + "attn." + rest[0]] = a
    return out


def fla_config(spec: rm.ModelSpec) -> dict:
    """config.json of an fla RWKV-7 folder (fields as fla-hub's rwkv7 repos write them)."""
    return {"architectures": ["RWKV7ForCausalLM"], "model_type": "rwkv7", "attn_mode": "chunk",
            "hidden_size": spec.n_embd, "num_hidden_layers": spec.n_layer, "head_dim": spec.head_size,
            "num_heads": None, "intermediate_size": spec.ffn_dim, "hidden_ratio": spec.ffn_dim / spec.n_embd,
            "decay_low_rank_dim": spec.d_w, "a_low_rank_dim": spec.d_a, "v_low_rank_dim": spec.d_v,
            "gate_low_rank_dim": spec.d_g, "hidden_act": "sqrelu", "norm_eps": 1e-5, "norm_bias": True,
            "norm_first": True, "fuse_norm": False, "vocab_size": spec.vocab_size, "tie_word_embeddings": False,
            "bos_token_id": 0, "eos_token_id": 0, "use_cache": True}


def write_fla_dir(sd, spec, folder: Path, stacked_mixes=False, shards=1, config=None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    tensors = to_fla(sd, stacked_mixes)
    (folder / "config.json").write_text(json.dumps(config or fla_config(spec)))
    if shards == 1:
        cw.save_safetensors(tensors, folder / "model.safetensors")
        return folder
    names, weight_map = list(tensors), {}
    for i, group in enumerate(np.array_split(np.arange(len(names)), shards), 1):
        shard = f"model-{i:05d}-of-{shards:05d}.safetensors"
        cw.save_safetensors({names[j]: tensors[names[j]] for j in group}, folder / shard)
        weight_map.update({names[j]: shard for j in group})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


@pytest.mark.parametrize("name,stacked,shards", [("v7_a", False, 1), ("v7_b", False, 2), ("v7_a", True, 1)],
                         ids=["v7_a-fla", "v7_b-fla-sharded", "v7_a-fla-x_x"])
def test_fla_layout_matches_reference(name, stacked, shards, tmp_path):
    """An fla folder of the committed spec's weights converts to the reference's logits, serial and sequence."""
    spec = rm.SPECS_BY_NAME[name]
    fx = load_fixture(spec)
    sd = regenerate_weights(spec, fx)
    src = write_fla_dir(sd, spec, tmp_path / "fla", stacked_mixes=stacked, shards=shards)
    model = convert(src, tmp_path / "model.safetensors")
    assert model.config["ln_x_eps"] == pytest.approx(64e-5)          # BlinkDL's, whatever the head size
    got, _ = run_serial(model, fx["tokens"])
    assert_logits_match(got, fx["logits_serial"], f"{name} fla serial")
    got, _ = model.forward([int(t) for t in fx["tokens"]], None, all_logits=True)
    assert_logits_match(got, fx["logits_seq"], f"{name} fla sequence")
    model.close()


def test_fla_other_norm_eps_is_refused(tmp_path):
    """fla's LayerNorms use norm_eps and its g_norm head_dim * norm_eps: 1e-5 and 64e-5 in every published file
    (BlinkDL's values). A folder stating another norm_eps is refused rather than run with other numbers."""
    spec = rm.SPECS_BY_NAME["v7_a"]
    cfg = dict(fla_config(spec), norm_eps=2e-5)
    src = write_fla_dir(rm.make_state_dict(spec), spec, tmp_path / "fla", config=cfg)
    with pytest.raises(FormatError, match="norm_eps"):
        rwkv_lite.convert(src, tmp_path / "m.safetensors", quant="fp32")


def test_fla_config_disagreeing_with_weights_is_refused(tmp_path):
    spec = rm.SPECS_BY_NAME["v7_a"]
    cfg = dict(fla_config(spec), decay_low_rank_dim=spec.d_w * 2)
    src = write_fla_dir(rm.make_state_dict(spec), spec, tmp_path / "fla", config=cfg)
    with pytest.raises(FormatError, match="decay_low_rank_dim"):
        rwkv_lite.convert(src, tmp_path / "m.safetensors", quant="fp32")


def test_fla_unknown_tensor_is_named(tmp_path):
    spec = rm.SPECS_BY_NAME["v7_a"]
    folder = tmp_path / "fla"
    folder.mkdir()
    tensors = to_fla(rm.make_state_dict(spec))
    tensors["model.layers.1.attn.mystery"] = np.zeros(spec.n_embd, np.float32)
    cw.save_safetensors(tensors, folder / "model.safetensors")
    with pytest.raises(FormatError, match=r"model\.layers\.1\.attn\.mystery") as e:
        rwkv_lite.convert(folder, tmp_path / "m.safetensors", quant="fp32")
    assert "\n" not in str(e.value)
    assert not (tmp_path / "m.safetensors").exists()


# ---------------------------------------------------------------------------------------------------------------
# any tensor the converter does not read is an error, never silently dropped

def test_unknown_tensor_is_an_error_naming_it(tmp_path):
    spec = rm.SPECS_BY_NAME["v7_a"]
    sd = rm.make_state_dict(spec)
    sd["blocks.1.ffn.mystery.weight"] = np.ones((4, spec.n_embd), np.float32)
    cw.save_pth(sd, tmp_path / "x.pth")
    proc = subprocess.run([sys.executable, "-m", "rwkv_lite", "convert", str(tmp_path / "x.pth"),
                           str(tmp_path / "x.safetensors"), "--quant", "fp32", "--quiet"],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 1, proc.stderr
    lines = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and "blocks.1.ffn.mystery.weight" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "x.safetensors").exists()


def test_layer0_value_residual_of_v7_is_accepted(tmp_path):
    """blocks.0.att.v0/v1/v2 exist in some files and are unused by the reference: not 'unknown'."""
    spec = rm.SPECS_BY_NAME["v7_b"]                         # writes layer 0's v0/v1/v2
    sd = rm.make_state_dict(spec)
    assert "blocks.0.att.v1" in sd
    cw.save_pth(sd, tmp_path / "x.pth")
    convert(tmp_path / "x.pth", tmp_path / "x.safetensors").close()


# ---------------------------------------------------------------------------------------------------------------
# RWKV-7 DeepEmbed ("v7a": ffn.s_emb / s_emb_x / s0 / s1 / s2)

DE_WIDTH = 32                                               # the reference's channel mix hard-codes 32 x 32


def add_deep_embed(sd: dict, spec: rm.ModelSpec, seed: int = 7) -> dict:
    """The spec's weights plus DeepEmbed tensors per layer, inserted after each layer's ffn tensors."""
    rng = np.random.default_rng(seed)
    C, F, V, D = spec.n_embd, spec.ffn_dim, spec.vocab_size, DE_WIDTH
    out = {}
    for name, a in sd.items():
        out[name] = a
        if name.endswith("ffn.value.weight"):
            p = name[: -len("value.weight")]
            out[p + "s_emb.weight"] = rng.normal(0, 0.3, (V, D * D)).astype(np.float32)
            out[p + "s_emb_x.weight"] = rng.normal(0, 0.3 / np.sqrt(C), (D * D, C)).astype(np.float32)
            out[p + "s0"] = rng.normal(1.0, 0.2, (1, 1, F)).astype(np.float32)
            out[p + "s1"] = rng.normal(0, 1 / np.sqrt(C), (C, D)).astype(np.float32)
            out[p + "s2"] = rng.normal(0, 0.5 / np.sqrt(D), (D, F)).astype(np.float32)
    return out


@pytest.mark.oracle
@pytest.mark.parametrize("quant", ["fp32"])
def test_deep_embed_matches_reference(quant, tmp_path):
    spec = rm.SPECS_BY_NAME["v7_a"]
    sd = add_deep_embed(rm.make_state_dict(spec, seed=spec.seed + 15), spec)
    pth = cw.save_pth(sd, tmp_path / "de.pth")
    tokens = np.random.default_rng(15).integers(0, spec.vocab_size, 64)
    model = convert(pth, tmp_path / "de.safetensors", quant=quant)
    assert model.config["d_de"] == DE_WIDTH
    ref = live_reference(pth, "7", tokens, tmp_path, deep_embed=True)
    plain = live_reference(pth, "7", tokens, tmp_path)      # the same file without DeepEmbed: visibly different
    assert np.abs(ref["logits_serial"] - plain["logits_serial"]).max() > 0.1
    check_both_modes(model, tokens, ref, "DeepEmbed")
    model.close()


def test_deep_embed_table_is_stored_like_the_embedding(tmp_path):
    """int8 files keep the per-token s_emb rows at fp16 (as the embedding), not float32 vectors."""
    spec = rm.SPECS_BY_NAME["v7_a"]
    sd = add_deep_embed(rm.make_state_dict(spec), spec)
    pth = cw.save_pth(sd, tmp_path / "de.pth")
    fp32 = convert(pth, tmp_path / "de32.safetensors")
    int8 = convert(pth, tmp_path / "de8.safetensors", quant="int8")
    info = int8.file.tensors["blocks.0.ffn.s_emb.weight"]
    assert info["scheme"] == int8.file.tensors["emb.weight"]["scheme"] == "fp16"
    assert info["role"] == "embedding"
    tokens = np.array([0, 5, 17, spec.vocab_size - 1])
    for l in range(spec.n_layer):
        exact = fp32.weights.layers[l].s_emb.rows(tokens)
        half = int8.weights.layers[l].s_emb.rows(tokens)
        np.testing.assert_allclose(half, exact.astype(np.float16).astype(np.float32), rtol=0, atol=1e-6)
    fp32.close()
    int8.close()


def test_deep_embed_missing_piece_is_named(tmp_path):
    spec = rm.SPECS_BY_NAME["v7_a"]
    sd = add_deep_embed(rm.make_state_dict(spec), spec)
    del sd["blocks.1.ffn.s2"]
    cw.save_pth(sd, tmp_path / "de.pth")
    with pytest.raises(FormatError, match=r"blocks\.1\.ffn\.s2"):
        rwkv_lite.convert(tmp_path / "de.pth", tmp_path / "de.safetensors", quant="fp32")


# ---------------------------------------------------------------------------------------------------------------
# state-tuned initial states (.pth of blocks.N.att.time_state, [H, N, N] per layer)

def random_time_state(spec: rm.ModelSpec, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    H, N = spec.n_head, spec.head_size
    return {f"blocks.{l}.att.time_state": rng.normal(0, 0.7, (H, N, N)).astype(np.float32)
            for l in range(spec.n_layer)}


def with_time_state(sd: dict, ts: dict) -> dict:
    """The model's tensors with each layer's time_state after its time_faaaa (where state tuners' merges put it)."""
    out = {}
    for name, a in sd.items():
        out[name] = a
        if name.endswith("att.time_faaaa"):
            key = name[: -len("time_faaaa")] + "time_state"
            out[key] = ts[key]
    return out


@pytest.mark.oracle
@pytest.mark.parametrize("name", ["v6_a", "v7_a", "v52_a"])
def test_state_tuned_file_matches_reference(name, tmp_path):
    """Logits after a prompt from a tuned initial state equal the reference's: v5.2 and v6 through the reference's
    own time_state loader (the state merged into the model file), v7 with its loaders' convention (transpose(1, 2)).
    The same state without the transpose gives clearly different logits (the bug other loaders had)."""
    spec = rm.SPECS_BY_NAME[name]
    seed = spec.seed + 1515
    sd = rm.make_state_dict(spec, seed=seed)
    ts = random_time_state(spec, seed)
    base = cw.save_pth(sd, tmp_path / "base.pth")
    state_pth = cw.save_pth(ts, tmp_path / "state.pth")
    tokens = np.random.default_rng(seed).integers(0, spec.vocab_size, 48)
    if spec.version != "7":
        merged = cw.save_pth(with_time_state(sd, ts), tmp_path / "merged.pth")
        ref = live_reference(merged, spec.version, tokens, tmp_path)
    else:
        ref = live_reference(base, "7", tokens, tmp_path, time_state=state_pth)
    model = convert(base, tmp_path / "base.safetensors")
    state = rwkv_lite.State.load(state_pth, model)
    check_both_modes(model, tokens, ref, f"{name} state-tuned", state=state)

    wrong = state.copy()
    wrong.arrays["wkv"] = np.ascontiguousarray(np.swapaxes(wrong.arrays["wkv"], -1, -2))
    got, _ = model.forward([int(t) for t in tokens], wrong, all_logits=True)
    assert np.abs(got - ref["logits_seq"]).max() > 100 * 1e-4 * max(1.0, np.abs(ref["logits_seq"]).max())

    # the same state merged into the model file is the model's initial state
    if spec.version == "7":
        merged_model = convert(cw.save_pth(with_time_state_v7(sd, ts), tmp_path / "merged7.pth"),
                               tmp_path / "merged7.safetensors")
    else:
        merged_model = convert(tmp_path / "merged.pth", tmp_path / "merged.safetensors")
    got, _ = merged_model.forward([int(t) for t in tokens], None, all_logits=True)
    assert_logits_match(got, ref["logits_seq"], f"{name} time_state in the model file")
    merged_model.close()
    model.close()


def with_time_state_v7(sd: dict, ts: dict) -> dict:
    out = {}
    for name, a in sd.items():
        out[name] = a
        if name.endswith("att.r_k"):
            key = name[: -len("r_k")] + "time_state"
            out[key] = ts[key]
    return out


def test_convert_state_command_and_refusals(tmp_path):
    """convert-state writes a checksummed state file that generate --state uses like the .pth; a state for
    another model shape, or a file that is not a state, is refused with one line (exit 1)."""
    spec = rm.SPECS_BY_NAME["v7_a"]
    sd = rm.make_state_dict(spec)
    model_path = tmp_path / "m.safetensors"
    convert(cw.save_pth(sd, tmp_path / "m.pth"), model_path).close()
    state_pth = cw.save_pth(random_time_state(spec, 3), tmp_path / "tuned.pth")

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "rwkv_lite", *map(str, args)], capture_output=True,
                              text=True, cwd=REPO)

    out = tmp_path / "tuned.state"
    proc = cli("convert-state", state_pth, out, "-m", model_path)
    assert proc.returncode == 0, proc.stderr
    model = rwkv_lite.load(model_path)
    a = rwkv_lite.State.load(out, model)
    b = rwkv_lite.State.load(state_pth, model)
    for k in a.arrays:
        np.testing.assert_array_equal(a.arrays[k], b.arrays[k])
    runs = [cli("generate", model_path, "--prompt-ids", "1 2 3", "-n", "5", "--temperature", "0", "--state", s)
            for s in (out, state_pth)]
    assert all(r.returncode == 0 for r in runs), runs[0].stderr + runs[1].stderr
    assert runs[0].stdout == runs[1].stdout
    plain = cli("generate", model_path, "--prompt-ids", "1 2 3", "-n", "5", "--temperature", "0")
    assert plain.returncode == 0 and plain.stdout != runs[0].stdout

    other = rm.SPECS_BY_NAME["v7_b"]                        # another shape: 2 heads of 64, 3 layers
    bad = cw.save_pth(random_time_state(other, 4), tmp_path / "other.pth")
    for args in (("convert-state", bad, tmp_path / "x.state", "-m", model_path),
                 ("generate", model_path, "--prompt-ids", "1", "-n", "1", "--state", bad),
                 ("convert-state", tmp_path / "m.pth", tmp_path / "y.state", "-m", model_path)):
        proc = cli(*args)
        errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
        assert proc.returncode == 1 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert str(args[1] if args[0] == "convert-state" else bad) in errors[0], errors[0]
    assert not (tmp_path / "x.state").exists() and not (tmp_path / "y.state").exists()
    with pytest.raises(FormatError, match="pass|model it was made for"):
        rwkv_lite.State.load(state_pth)
    model.close()


# ---------------------------------------------------------------------------------------------------------------
# LoRA adapters (RWKV-PEFT / RWKV-LM-LoRA: X.lora_A (r, in), X.lora_B (out, r); full tensors replace)

LORA_TARGETS = ("att.receptance", "att.key", "att.value", "att.output", "ffn.key", "ffn.value")


def make_adapter(sd: dict, spec: rm.ModelSpec, r: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    adapter = {}
    for l in range(spec.n_layer):
        for t in LORA_TARGETS:
            out_dim, in_dim = sd[f"blocks.{l}.{t}.weight"].shape
            adapter[f"blocks.{l}.{t}.lora_A"] = rng.normal(0, 1 / np.sqrt(in_dim), (r, in_dim)).astype(np.float32)
            adapter[f"blocks.{l}.{t}.lora_B"] = rng.normal(0, 0.05, (out_dim, r)).astype(np.float32)
    key = f"blocks.{spec.n_layer - 1}.att.ln_x.weight"               # a full tensor trained alongside
    adapter[key] = (sd[key] * 1.5).astype(np.float32)
    return adapter


def merged_in_float64(sd: dict, adapter: dict, alpha: float) -> dict:
    out = dict(sd)
    for name, a in adapter.items():
        if name.endswith(".lora_A"):
            stem = name[: -len(".lora_A")]
            A, B = a.astype(np.float64), adapter[stem + ".lora_B"].astype(np.float64)
            W = sd[stem + ".weight"].astype(np.float64)
            out[stem + ".weight"] = (W + (alpha / A.shape[0]) * (B @ A)).astype(np.float32)
        elif not name.endswith(".lora_B"):
            out[name] = a
    return out


@pytest.mark.oracle
@pytest.mark.parametrize("name", ["v7_a", "v6_a"])
def test_lora_merge_matches_reference(name, tmp_path):
    """convert --lora equals the reference run on weights the test merged in float64."""
    spec = rm.SPECS_BY_NAME[name]
    seed, r, alpha = spec.seed + 51, 8, 32.0
    sd = rm.make_state_dict(spec, seed=seed)
    adapter = make_adapter(sd, spec, r, seed)
    base = cw.save_pth(sd, tmp_path / "base.pth")
    lora = cw.save_pth(adapter, tmp_path / "adapter.pth")
    merged = cw.save_pth(merged_in_float64(sd, adapter, alpha), tmp_path / "merged.pth")
    tokens = np.random.default_rng(seed).integers(0, spec.vocab_size, 48)
    ref = live_reference(merged, spec.version, tokens, tmp_path)
    plain = convert(base, tmp_path / "plain.safetensors")
    without, _ = plain.forward([int(t) for t in tokens], None, all_logits=True)
    assert np.abs(ref["logits_seq"] - without).max() > 0.05                    # the adapter matters
    plain.close()
    model = convert(base, tmp_path / "m.safetensors", lora=lora, lora_alpha=alpha)
    assert model.metadata["provenance"]["lora"] == {"file": "adapter.pth", "alpha": alpha}
    check_both_modes(model, tokens, ref, f"{name} + LoRA")
    model.close()


def test_lora_merge_equals_converting_merged_weights(tmp_path):
    """Without torch: merging at conversion gives the same file values as converting pre-merged weights."""
    spec = rm.SPECS_BY_NAME["v7_a"]
    sd = rm.make_state_dict(spec)
    adapter = make_adapter(sd, spec, 4, 5)
    adapter["blocks.0.att.x_r"] = (sd["blocks.0.att.x_r"] * 0.9).reshape(-1)     # (C,) for the base's (1, 1, C)
    ours = convert(cw.save_pth(sd, tmp_path / "b.pth"), tmp_path / "a.safetensors",
                   lora=cw.save_pth(adapter, tmp_path / "ad.pth"), lora_alpha=8)
    theirs = convert(cw.save_pth(merged_in_float64(sd, adapter, 8), tmp_path / "m.pth"), tmp_path / "b.safetensors")
    for name in ours.file.arrays:
        if name != "tokenizer.data":
            np.testing.assert_allclose(ours.file.arrays[name], theirs.file.arrays[name], rtol=2e-6, atol=2e-7,
                                       err_msg=name)
    ours.close()
    theirs.close()


@pytest.mark.parametrize("change,message", [
    (lambda ad, sd: ad.update({"blocks.0.att.gate.lora_A": np.zeros((4, 64), np.float32),
                               "blocks.0.att.gate.lora_B": np.zeros((64, 4), np.float32)}),
     r"blocks\.0\.att\.gate\.lora_A.*matches no weight"),
    (lambda ad, sd: ad.pop("blocks.1.ffn.key.lora_B"), r"blocks\.1\.ffn\.key\.lora_A.*no lora_B"),
    (lambda ad, sd: ad.update({"blocks.0.att.mystery": np.zeros(64, np.float32)}),
     r"blocks\.0\.att\.mystery.*matches no tensor"),
    (lambda ad, sd: ad.update({"blocks.0.att.key.init_lora_A": np.zeros((4, 64), np.float32)}),
     r"init_lora_A.*not supported"),
    (lambda ad, sd: ad.update({"blocks.0.att.key.lora_A": np.zeros((4, 32), np.float32)}),
     r"blocks\.0\.att\.key\.lora_A.*does not fit"),
], ids=["no-base-weight", "lone-lora_A", "unknown-full-tensor", "pissa", "wrong-shape"])
def test_lora_adapter_problems_are_named(change, message, tmp_path):
    spec = rm.SPECS_BY_NAME["v7_a"]
    sd = rm.make_state_dict(spec)
    adapter = make_adapter(sd, spec, 4, 5)
    change(adapter, sd)
    base, lora = cw.save_pth(sd, tmp_path / "b.pth"), cw.save_pth(adapter, tmp_path / "ad.pth")
    with pytest.raises(FormatError, match=message) as e:
        rwkv_lite.convert(base, tmp_path / "x.safetensors", quant="fp32", lora=lora, lora_alpha=8)
    assert "\n" not in str(e.value) and str(lora) in str(e.value)
    assert not (tmp_path / "x.safetensors").exists()


def test_lora_cli_needs_alpha(tmp_path):
    spec = rm.SPECS_BY_NAME["v7_a"]
    sd = rm.make_state_dict(spec)
    base = cw.save_pth(sd, tmp_path / "b.pth")
    lora = cw.save_pth(make_adapter(sd, spec, 4, 5), tmp_path / "ad.pth")
    proc = subprocess.run([sys.executable, "-m", "rwkv_lite", "convert", str(base), str(tmp_path / "x.safetensors"),
                           "--quant", "fp32", "--quiet", "--lora", str(lora)], capture_output=True, text=True,
                          cwd=REPO)
    assert proc.returncode == 1 and "--lora-alpha" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    proc = subprocess.run([sys.executable, "-m", "rwkv_lite", "convert", str(base), str(tmp_path / "x.safetensors"),
                           "--quant", "int8", "--quiet", "--lora", str(lora), "--lora-alpha", "16"],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr


# ---------------------------------------------------------------------------------------------------------------
# RWKV-7 G1 chat: think mode

def test_thinking_splitter_finds_the_end_tag_across_pieces():
    from rwkv_lite.generate import ThinkingSplitter
    pieces = [">\nthe user asks", " about Paris </th", "ink", ">\nParis", " is the capital."]
    s = ThinkingSplitter()
    parts = [p for piece in pieces for p in s.push(piece)] + s.flush()
    thinking = "".join(t for k, t in parts if k == "thinking")
    answer = "".join(t for k, t in parts if k == "answer")
    assert thinking == ">\nthe user asks about Paris </think>"
    assert answer == "\nParis is the capital."
    s = ThinkingSplitter()                                   # a reply cut off while thinking: all reasoning
    assert s.push("> still </thi") == [("thinking", "> still ")] and s.flush() == [("thinking", "</thi")]


def test_chat_think_mode_turn_format():
    """With think=True each turn ends "Assistant: <think"; the reply (reasoning, </think>, answer) follows."""
    from test_generate import GREEDY, ScriptedModel, TinyVocab, script_of
    from rwkv_lite.generate import ChatSession
    vocab = TinyVocab()
    script = script_of(vocab, ">", "\n", "h", "m", "<", "/", "t", "h", "i", "n", "k", ">", "\n", "P", "a", "r", "i",
                       "s", "\n\n")
    model = ScriptedModel(vocab, script)
    chat = ChatSession(model, params=GREEDY, preamble="", think=True)
    reply = chat.ask("Capital of France?")
    assert reply == ">\nhm</think>\nParis"
    assert model.calls[0][0] == vocab.encode("User: Capital of France?\n\nAssistant: <think")
    assert chat.transcript == "User: Capital of France?\n\nAssistant: <think>\nhm</think>\nParis\n\n"


@pytest.mark.parametrize("hide", [False, True])
def test_chat_cli_shows_or_hides_the_reasoning(hide, monkeypatch, capsys):
    from test_generate import GREEDY, ScriptedModel, TinyVocab, script_of
    from rwkv_lite.cli import chat_loop, common
    from rwkv_lite.generate import ChatSession
    vocab = TinyVocab()
    script = script_of(vocab, ">", "\n", "h", "m", "<", "/", "t", "h", "i", "n", "k", ">", "\n", "O", "K", "\n\n")
    chat = ChatSession(ScriptedModel(vocab, script), params=GREEDY, preamble="", think=True)
    written = []
    monkeypatch.setattr(common, "write", written.append)
    chat_loop.chat_turn(chat, "hi", interactive=False, verbose=False, show_thinking=not hide)
    out = "".join(written)
    assert out == ("OK\n\n" if hide else "<think>\nhm</think>\nOK\n\n")


def test_deep_embed_batched_decode_equals_single_sequences(tmp_path):
    """forward_batch (serving) applies DeepEmbed per row's own token, as forward does."""
    spec = rm.SPECS_BY_NAME["v7_a"]
    sd = add_deep_embed(rm.make_state_dict(spec), spec)
    model = convert(cw.save_pth(sd, tmp_path / "de.pth"), tmp_path / "de.safetensors")
    prompts = [[3, 9, 27], [200, 1], [5]]
    states = [model.forward(p, None)[1] for p in prompts]
    nxt = [11, 250, 7]
    singles = [model.forward([t], s)[0] for t, s in zip(nxt, states)]
    batch = model.forward_batch(nxt, [s.copy() for s in states])
    for b in range(3):
        assert_logits_match(batch[b], singles[b], f"DeepEmbed batch row {b}")
    model.close()


def test_state_tuning_file_as_safetensors_and_int4_deep_embed(tmp_path):
    """A time_state file saved as safetensors loads like the .pth; a DeepEmbed model converts to int4 (its s_emb
    table at int8, as the embedding) and runs close to fp32."""
    spec = rm.SPECS_BY_NAME["v7_a"]
    sd = add_deep_embed(rm.make_state_dict(spec), spec)
    pth = cw.save_pth(sd, tmp_path / "de.pth")
    fp32 = convert(pth, tmp_path / "de32.safetensors")
    ts = random_time_state(spec, 9)
    a = rwkv_lite.State.load(cw.save_pth(ts, tmp_path / "s.pth"), fp32)
    b = rwkv_lite.State.load(cw.save_safetensors(ts, tmp_path / "s.safetensors"), fp32)
    np.testing.assert_array_equal(a.arrays["wkv"], b.arrays["wkv"])
    np.testing.assert_array_equal(a.arrays["wkv"][1, 0], ts["blocks.1.att.time_state"][0].T)
    int4 = convert(pth, tmp_path / "de4.safetensors", quant="int4")
    assert int4.file.tensors["blocks.0.ffn.s_emb.weight"]["scheme"] == int4.file.tensors["emb.weight"]["scheme"]
    tokens = [1, 50, 100, 150, 200]
    x, _ = fp32.forward(tokens, a, all_logits=True)
    y, _ = int4.forward(tokens, a, all_logits=True)
    assert np.corrcoef(x.ravel(), y.ravel())[0, 1] > 0.95
    fp32.close()
    int4.close()


@pytest.mark.parametrize("quant", ["fp32", "int8"])
def test_deep_embed_decode_step_never_calls_blas(quant, tmp_path):
    """DeepEmbed's per-token products stay in the decode path's own kernels (see test_decode_no_blas.py)."""
    from test_decode_no_blas import _trap
    spec = rm.SPECS_BY_NAME["v7_a"]
    model = convert(cw.save_pth(add_deep_embed(rm.make_state_dict(spec), spec), tmp_path / "de.pth"),
                    tmp_path / "de.safetensors", quant=quant)
    _, state = model.forward([1, 2, 3])
    plain, _ = model.forward([4], state.copy())
    for L in model.weights.layers:
        _trap(L)
    _trap(model.weights)
    trapped, _ = model.forward([4], state.copy())
    np.testing.assert_array_equal(trapped, plain)
    model.close()


def test_add_on_files_given_as_models_are_explained(tmp_path):
    """A state file or an adapter passed to convert as the model gets one line saying what it is."""
    spec = rm.SPECS_BY_NAME["v7_a"]
    sd = rm.make_state_dict(spec)
    state = cw.save_pth(random_time_state(spec, 1), tmp_path / "state.pth")
    adapter = cw.save_pth({k: v for k, v in make_adapter(sd, spec, 4, 2).items() if "lora" in k},
                          tmp_path / "adapter.pth")
    with pytest.raises(FormatError, match="state-tuned initial state, not a model.*convert-state"):
        rwkv_lite.convert(state, tmp_path / "x.safetensors", quant="fp32")
    with pytest.raises(FormatError, match="LoRA adapter, not a model.*--lora"):
        rwkv_lite.convert(adapter, tmp_path / "x.safetensors", quant="fp32")


def write_peft_folder(adapter: dict, folder: Path, to_module, r: int, alpha: float, rslora=False) -> Path:
    """A Hugging Face PEFT LoRA folder holding `adapter` (BlinkDL names) under the port's module names."""
    folder.mkdir()
    tensors = {}
    for name, a in adapter.items():
        if name.endswith(".lora_A") or name.endswith(".lora_B"):
            module = to_module(name[: -len(".lora_A")] + ".weight")[: -len(".weight")]
            tensors[f"base_model.model.{module}.{name[-6:]}.weight"] = a
    cw.save_safetensors(tensors, folder / "adapter_model.safetensors")
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": r, "lora_alpha": alpha, "use_rslora": rslora, "lora_dropout": 0.0,
        "bias": "none", "target_modules": ["key", "value"], "task_type": "CAUSAL_LM"}))
    return folder


def fla_module_name(blink: str) -> str:
    return next(k for k in to_fla({blink: np.zeros((2, 2), np.float32)}))


@pytest.mark.parametrize("layout,rslora", [("fla", False), ("hf-v6", True)])
def test_hf_peft_adapter_equals_rwkv_peft_adapter(layout, rslora, tmp_path):
    """An HF PEFT folder on an HF port merges exactly like the same LoRA in RWKV-PEFT form on the BlinkDL file
    (whose merge is checked against the reference above); alpha and rslora come from adapter_config.json."""
    spec = rm.SPECS_BY_NAME["v7_a" if layout == "fla" else "v6_a"]
    sd = rm.make_state_dict(spec)
    r, alpha = 4, 16.0
    adapter = {k: v for k, v in make_adapter(sd, spec, r, 8).items() if "lora" in k}
    if layout == "fla":
        base_hf = write_fla_dir(sd, spec, tmp_path / "fla")
        peft = write_peft_folder(adapter, tmp_path / "peft", fla_module_name, r, alpha)
    else:
        base_hf = cw.save_hf_dir(sd, {"model_type": "rwkv6", "hidden_size": spec.n_embd}, tmp_path / "hf",
                                 fmt="safetensors")
        peft = write_peft_folder(adapter, tmp_path / "peft", cw.blinkdl_to_hf_name, r, alpha, rslora)
    blink_alpha = alpha * (np.sqrt(r) if rslora else 1.0)          # the same scale in alpha / r form
    ours = convert(base_hf, tmp_path / "a.safetensors", lora=peft)
    theirs = convert(cw.save_pth(sd, tmp_path / "b.pth"), tmp_path / "b.safetensors",
                     lora=cw.save_pth(adapter, tmp_path / "ad.pth"), lora_alpha=blink_alpha)
    for name in ours.file.arrays:
        if name != "tokenizer.data":
            np.testing.assert_allclose(ours.file.arrays[name], theirs.file.arrays[name], rtol=1e-6, atol=1e-7,
                                       err_msg=name)
    with pytest.raises(FormatError, match="lora_alpha=16"):
        rwkv_lite.convert(base_hf, tmp_path / "c.safetensors", quant="fp32", lora=peft, lora_alpha=8)
    ours.close()
    theirs.close()


def test_other_model_families_in_hf_folders_are_refused(tmp_path):
    """A transformer's HF folder (model.layers.N.self_attn.*) is not mistaken for RWKV-7's fla layout."""
    folder = tmp_path / "llama"
    folder.mkdir()
    cw.save_safetensors({"model.embed_tokens.weight": np.zeros((8, 4), np.float32),
                         "model.layers.0.self_attn.q_proj.weight": np.zeros((4, 4), np.float32)},
                        folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(FormatError, match="not an RWKV-7 checkpoint"):
        rwkv_lite.convert(folder, tmp_path / "x.safetensors", quant="fp32")


def test_memory_check_counts_only_weights_read_per_token(tmp_path, monkeypatch):
    """The embedding and DeepEmbed tables are read one row per token (paged in on use): a machine whose memory
    holds the rest runs the model; one that does not hold the rest is refused."""
    import rwkv_lite.model as model_module
    from rwkv_lite.errors import ResourceError
    spec = rm.SPECS_BY_NAME["v7_a"]
    dst = tmp_path / "de.safetensors"
    convert(cw.save_pth(add_deep_embed(rm.make_state_dict(spec), spec), tmp_path / "de.pth"), dst).close()
    f = model_module.read_model_file(dst)
    per_token = model_module._weights_read_per_token(f)
    tables = sum(a.nbytes for k, a in f.arrays.items() if "s_emb" in k or k.startswith("emb."))
    f.close()
    assert tables > dst.stat().st_size / 2 and per_token < dst.stat().st_size - tables + 1
    monkeypatch.setattr(model_module, "memory_bytes", lambda: (per_token + 4096, per_token + 4096))
    rwkv_lite.load(dst).close()
    monkeypatch.setattr(model_module, "memory_bytes", lambda: (per_token - 4096, per_token - 4096))
    with pytest.raises(ResourceError):
        rwkv_lite.load(dst)


def test_initial_state_is_what_every_sequence_starts_from(tmp_path):
    """Model.initial_state (serve --state): forward from None and the batched engine start from the tuned state."""
    from rwkv_lite.engine import generate_batch
    from rwkv_lite.sampling import SamplingParams
    spec = rm.SPECS_BY_NAME["v7_a"]
    model = convert(cw.save_pth(rm.make_state_dict(spec), tmp_path / "m.pth"), tmp_path / "m.safetensors")
    tuned = rwkv_lite.State.load(cw.save_pth(random_time_state(spec, 6), tmp_path / "s.pth"), model)
    tokens = [5, 6, 7]
    want, _ = model.forward(tokens, tuned)
    plain, _ = model.forward(tokens, None)
    model.initial_state = tuned
    got, _ = model.forward(tokens, None)
    np.testing.assert_array_equal(got, want)
    assert np.abs(got - plain).max() > 0.01
    greedy = SamplingParams.greedy()
    batch = generate_batch(model, [tokens, [9, 9]], max_tokens=6, params=greedy, max_batch=2)
    solo, state = [], tuned
    logits, state = model.forward(tokens, tuned)
    for _ in range(6):
        tok = int(np.argmax(logits))
        solo.append(tok)
        logits, state = model.forward([tok], state)
    assert list(batch[0].tokens) == solo
    model.initial_state = None
    again, _ = model.forward(tokens, None)
    np.testing.assert_array_equal(again, plain)
    other = rm.SPECS_BY_NAME["v7_b"]
    with pytest.raises(FormatError):
        model.initial_state = rwkv_lite.State(
            {"arch": "rwkv7", "n_layer": other.n_layer, "n_embd": other.n_embd},
            {"att_x": np.zeros((other.n_layer, other.n_embd), np.float32)})
    model.close()
