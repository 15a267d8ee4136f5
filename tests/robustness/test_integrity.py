"""Integrity: every array of a model file carries a CRC32 computed while it was written. `rwkv-lite verify` and
`load(verify=True)` recompute them; one flipped byte anywhere in an array's data is named. `load()` without
verify reads only the header (instant for a 15 GB file), so it does not see such damage: that is the documented
trade-off, asserted here so that it cannot change silently."""
from __future__ import annotations

import json
import shutil

import pytest

import rwkv_lite
from robustness_helpers import array_span, assert_one_line_error, cli, patch_bytes
from rwkv_lite.errors import FormatError


@pytest.fixture(scope="module")
def converted(convert_once):
    return {q: convert_once("tiny-rwkv-5v2-730K-FP32.bin", q) for q in ("int8", "int4")}


def flipped_copy(src, dst, array: str, where: float = 0.5, mask: int = 0x01):
    shutil.copyfile(src, dst)
    a, b = array_span(dst, array)
    offset = a + int(where * (b - a))
    with open(dst, "rb") as f:
        f.seek(offset)
        byte = f.read(1)[0]
    patch_bytes(dst, offset, bytes([byte ^ mask]))
    return dst


def test_unmodified_file_verifies(converted):
    for path in converted.values():
        proc = cli("verify", path)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip().endswith("MB checked)") and ": OK (" in proc.stdout
        rwkv_lite.load(path, verify=True).close()


@pytest.mark.parametrize("quant,array", [("int8", "blocks.7.att.key.weight"),          # int8 values
                                         ("int8", "blocks.7.att.key.weight.scale"),    # its per-row scales
                                         ("int4", "head.weight.groups"),                # int4 scale/zero words
                                         ("int4", "emb.weight"),                        # the embedding
                                         ("int8", "blocks.0.att.decay")])               # an fp32 vector
def test_one_flipped_byte_is_named(converted, tmp_path, quant, array):
    bad = flipped_copy(converted[quant], tmp_path / "bad.safetensors", array)

    assert_one_line_error(cli("verify", bad), str(bad), "checksum mismatch in 1 array(s)", array)
    with pytest.raises(FormatError) as info:
        rwkv_lite.load(bad, verify=True)
    msg = str(info.value)
    assert "\n" not in msg and str(bad) in msg and repr(array) in msg, msg

    model = rwkv_lite.load(bad)                      # header only: the damage is not looked at without verify
    try:
        assert model.verify() == [array]
    finally:
        model.close()


def test_verify_json_lists_every_damaged_array(converted, tmp_path):
    bad = flipped_copy(converted["int8"], tmp_path / "bad.safetensors", "blocks.3.ffn.value.weight", 0.1)
    a, b = array_span(bad, "ln_out.bias")
    patch_bytes(bad, b - 1, bytes([bad.read_bytes()[b - 1] ^ 0x80]))
    proc = cli("verify", bad, "--json")
    assert proc.returncode == 1
    doc = json.loads(proc.stdout)
    assert doc["ok"] is False
    assert sorted(doc["corrupted_arrays"]) == ["blocks.3.ffn.value.weight", "ln_out.bias"]


def test_every_byte_of_a_small_array_is_covered(converted, tmp_path):
    """Exhaustive over one array: a flipped bit in any of its bytes (first, last, every one in between) is caught,
    so the checksummed span is exactly the array's span."""
    path = shutil.copyfile(converted["int8"], tmp_path / "m.safetensors")
    a, b = array_span(path, "blocks.11.ln2.bias")
    original = path.read_bytes()[a:b]
    for offset in range(a, b):
        byte = original[offset - a]
        patch_bytes(path, offset, bytes([byte ^ (1 << (offset % 8))]))
        model = rwkv_lite.load(path)
        try:
            assert model.verify() == ["blocks.11.ln2.bias"], offset
        finally:
            model.close()
        patch_bytes(path, offset, bytes([byte]))
    model = rwkv_lite.load(path, verify=True)
    model.close()
