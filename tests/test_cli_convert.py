"""`rwkv-lite convert` safety and defaults: it never replaces its own input, never overwrites without --force,
re-quantizes rwkv-lite's fp32/fp16 files, and picks the shipped tokenizer when a checkpoint comes without one."""
from __future__ import annotations

import dataclasses
import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest

import checkpoint_writers as cw
import reference_models as rm
import rwkv_lite
from conftest import shared_file
from rwkv_lite.format import TOKENIZER_ARRAY, read_model_file
from rwkv_lite.quantize.convert import builtin_tokenizer_for
from test_cli import assert_one_line_error, run


@pytest.fixture(scope="module")
def small_pth(tmp_path_factory) -> Path:
    """A random RWKV-5.2 checkpoint (vocab 512, no tokenizer beside it) in BlinkDL's .pth layout."""
    folder = tmp_path_factory.mktemp("convert-src")
    return cw.save_pth(rm.make_state_dict(rm.SPECS_BY_NAME["v52_b"]), folder / "model.pth")


def _arrays(path: Path) -> dict[str, np.ndarray]:
    mf = read_model_file(path)
    try:
        return {name: np.array(a) for name, a in mf.arrays.items()}
    finally:
        mf.close()


# ------------------------------------------------------------------------------------------------ safety
def test_convert_onto_its_source_is_refused_and_the_source_unchanged(small_pth):
    before = small_pth.read_bytes()
    for force in ([], ["--force"]):
        result = run("convert", small_pth, small_pth, "--quant", "int8", *force)
        assert_one_line_error(result, 1, str(small_pth), "source")
    assert small_pth.read_bytes() == before


def test_convert_onto_a_hard_link_or_a_file_it_reads_is_refused(small_pth, tmp_path):
    link = tmp_path / "link.pth"
    os.link(small_pth, link)
    assert_one_line_error(run("convert", small_pth, link, "--force"), 1, str(link))
    vocab = tmp_path / "rwkv_vocab_v20230424.txt"
    vocab.write_bytes(builtin_tokenizer_for(65536).read_bytes())
    src = tmp_path / "model.pth"
    os.link(small_pth, src)
    result = run("convert", src, vocab, "--force", "--vocab", vocab)
    assert_one_line_error(result, 1, str(vocab), "read by the conversion")
    assert vocab.read_bytes() == builtin_tokenizer_for(65536).read_bytes()


def test_existing_destination_needs_force(small_pth, tmp_path):
    dst = tmp_path / "out.safetensors"
    dst.write_bytes(b"keep me")
    assert_one_line_error(run("convert", small_pth, dst, "--quant", "int8"), 1, str(dst), "--force")
    assert dst.read_bytes() == b"keep me"
    assert run("convert", small_pth, dst, "--quant", "int8", "--force", "--quiet").exit_code == 0
    assert rwkv_lite.load(dst).config["vocab_size"] == 512


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
def test_unwritable_destination_folder_names_the_destination(small_pth, tmp_path):
    folder = tmp_path / "read-only"
    folder.mkdir()
    dst = folder / "out.safetensors"
    folder.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        if os.access(folder, os.W_OK):           # root ignores the mode bits: use a folder that is not one
            blocker = tmp_path / "a-file"
            blocker.write_text("")
            dst = blocker / "out.safetensors"
        result = run("convert", small_pth, dst, "--quant", "int8", "--quiet")
    finally:
        folder.chmod(stat.S_IRWXU)
    assert result.exit_code == 1 and "Traceback" not in result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert str(dst) in line or str(dst.parent) in line, line
    assert ".tmp-" not in result.stderr


# ------------------------------------------------------------------------------------------------ re-quantization
def test_fp32_file_requantized_equals_converting_the_source(small_pth, tmp_path):
    """fp32 -> int4 must give exactly the arrays of checkpoint -> int4 (the fp32 file holds the same floats)."""
    direct, fp32, again = tmp_path / "direct.safetensors", tmp_path / "fp32.safetensors", tmp_path / "re.safetensors"
    rwkv_lite.convert(small_pth, direct, quant="int4")
    rwkv_lite.convert(small_pth, fp32, quant="fp32")
    assert run("convert", fp32, again, "--quant", "int4", "--quiet").exit_code == 0
    a, b = _arrays(direct), _arrays(again)
    assert a.keys() == b.keys()
    for name in a:
        assert np.array_equal(a[name], b[name]), name
    prov = read_model_file(again).metadata["provenance"]
    assert prov["requantized_from"] == {"file": "fp32.safetensors", "quant": "fp32"}
    assert prov["source_files"] == ["model.pth"] and prov["quant"] == "int4"


@pytest.mark.parametrize("quant", ["int4", "int8"])
def test_fp16_file_requantized_is_as_close_to_the_weights_as_converting_the_source(small_pth, tmp_path, quant):
    """fp16 -> QUANT against checkpoint -> QUANT. The fp16 rounding (about 0.3% of int4's error) flips some
    near-tie choices of the quantizer (measured: 2-4% of int4 weights, a quarter of int8 weights move by one
    step), so the bytes differ; what must hold is that every re-quantized tensor is as close to the original
    float32 weights as the direct conversion: root-mean-square error within 0.5% (measured: at most 0.2%)."""
    from rwkv_lite.schemes import get_scheme
    files = {name: tmp_path / f"{name}.safetensors" for name in ("fp32", "fp16", "direct", "again")}
    rwkv_lite.convert(small_pth, files["fp32"], quant="fp32")
    rwkv_lite.convert(small_pth, files["fp16"], quant="fp16")
    rwkv_lite.convert(small_pth, files["direct"], quant=quant)
    assert run("convert", files["fp16"], files["again"], "--quant", quant, "--quiet").exit_code == 0
    exact, direct, again = (read_model_file(files[n]) for n in ("fp32", "direct", "again"))
    try:
        assert direct.metadata["tensors"] == again.metadata["tensors"]
        compared = 0
        for name, rec in direct.metadata["tensors"].items():
            if rec["scheme"] == "fp32":
                assert np.array_equal(direct.arrays[name], again.arrays[name]), name   # vectors: never rounded
                continue
            scheme = get_scheme(rec["scheme"], **rec["params"])
            cols = rec["shape"][-1]

            def weights(mf):
                return scheme.dequantize({s: mf.arrays[name + s] for s in scheme.parts(rec["shape"])})[..., :cols]
            truth = exact.arrays[name]
            rms_direct = np.sqrt(np.mean((weights(direct) - truth) ** 2))
            rms_again = np.sqrt(np.mean((weights(again) - truth) ** 2))
            assert rms_again <= 1.005 * rms_direct, (name, rms_again / rms_direct)
            compared += 1
        assert compared >= 20
    finally:
        for mf in (exact, direct, again):
            mf.close()


def test_quantized_file_cannot_be_quantized_again(small_pth, tmp_path):
    int8 = tmp_path / "int8.safetensors"
    rwkv_lite.convert(small_pth, int8, quant="int8")
    result = run("convert", int8, tmp_path / "int4.safetensors", "--quant", "int4")
    assert_one_line_error(result, 1, str(int8), "int8", "original checkpoint")
    assert not (tmp_path / "int4.safetensors").exists()


def test_requantizing_carries_the_tokenizer_over(tmp_path):
    shared_tiny = shared_file("rwkv-cpp-tiny", "tiny-rwkv-5v2-730K-FP32.bin")
    src = tmp_path / "fp16.safetensors"
    rwkv_lite.convert(shared_tiny, src, quant="fp16")
    out = tmp_path / "int8.safetensors"
    assert run("convert", src, out, "--quant", "int8", "--quiet").exit_code == 0
    assert rwkv_lite.load(out).tokenizer.kind == "bytes"
    assert bytes(_arrays(out)[TOKENIZER_ARRAY]) == bytes(_arrays(src)[TOKENIZER_ARRAY])


# ------------------------------------------------------------------------------------------------ tokenizers
@pytest.mark.parametrize("base, vocab, kind, prompt", [
    ("v52_a", 65536, "world", "The Eiffel tower is in"),      # World models (v5 Eagle)
    ("v7_a", 65536, "world", "你好，世界"),                      # World models (v7 Goose)
    ("v4_a", 50277, "hf", "The Eiffel tower is in"),         # RWKV-4 Pile: GPT-NeoX 20B
    ("v4_a", 50304, "hf", "Hello world"),                    # the same, embedding padded to a multiple of 64
])
def test_checkpoint_without_tokenizer_gets_the_shipped_one(tmp_path, base, vocab, kind, prompt):
    spec = dataclasses.replace(rm.SPECS_BY_NAME[base], vocab_size=vocab, name=f"{base}-{vocab}")
    src = cw.save_pth(rm.make_state_dict(spec), tmp_path / "model.pth")
    dst = tmp_path / "model-int8.safetensors"
    result = run("convert", src, dst, "--quant", "int8", "--quiet")
    assert result.exit_code == 0, result.stderr
    assert "Warning" not in result.stderr and "note:" not in result.stderr
    info = run("info", dst)
    assert f"tokenizer     {kind}: " in info.stdout and "shipped with rwkv-lite" in info.stdout
    model = rwkv_lite.load(dst)
    assert model.tokenizer.kind == kind
    assert model.tokenizer.decode(model.tokenizer.encode(prompt)) == prompt
    model.close()
    generated = run("generate", dst, "-p", prompt, "-n", "4", "--greedy", "--json")
    assert generated.exit_code == 0, generated.stderr
    doc = json.loads(generated.stdout)
    assert len(doc["tokens"]) == 4 and all(0 <= t < vocab for t in doc["tokens"])


def test_unknown_vocabulary_says_so_in_one_line(small_pth, tmp_path):
    dst = tmp_path / "ids.safetensors"
    result = run("convert", small_pth, dst, "--quiet")
    assert result.exit_code == 0
    notes = [line for line in result.stderr.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "--vocab" in notes[0] and "token ids" in notes[0], result.stderr
    assert "Warning" not in result.stderr


def test_shipped_tokenizers_are_the_reference_files():
    """The package data are the exact World vocabulary and 20B tokenizer (sizes pinned; the World file is the
    reference package's own, which may differ only in line endings)."""
    world, neox = builtin_tokenizer_for(65536), builtin_tokenizer_for(50277)
    assert world.name == "rwkv_vocab_v20230424.txt" and neox.name == "20B_tokenizer.json"
    from rwkv_lite.tokenizer import tokenizer_from_file
    assert tokenizer_from_file(world).vocab_size == 65530
    assert tokenizer_from_file(neox).vocab_size == 50277
    assert builtin_tokenizer_for(50276) is None and builtin_tokenizer_for(512) is None
    try:
        import rwkv
    except ImportError:
        return
    reference = Path(rwkv.__file__).parent / "rwkv_vocab_v20230424.txt"
    assert reference.read_bytes().replace(b"\r\n", b"\n") == world.read_bytes().replace(b"\r\n", b"\n")
