"""`rwkv-lite info` reads only the header of a file it did not write: odd but parseable metadata must print, and a
tensor record it cannot interpret must end in one line naming the file (exit 1), never a traceback."""
from __future__ import annotations

import json
import struct

from click.testing import CliRunner

from conftest import shared_file
import rwkv_lite
from rwkv_lite import cli


def _rewrite_metadata(path, edit):
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    edit(header["__metadata__"])
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])


def _tiny(tmp_path):
    src = shared_file("rwkv-cpp-tiny", "tiny-rwkv-5v2-730K-FP32.bin")
    return rwkv_lite.convert(src, tmp_path / "tiny.safetensors", quant="int8")


def test_info_prints_non_string_provenance(tmp_path):
    path = _tiny(tmp_path)

    def edit(meta):
        prov = json.loads(meta["provenance"])
        prov["source_files"] = [1, {"nested": ["x"]}, None]
        meta["provenance"] = json.dumps(prov)
    _rewrite_metadata(path, edit)
    result = CliRunner().invoke(cli.main, ["info", str(path)])
    assert result.exit_code == 0, result.output
    assert "1, {'nested': ['x']}, None" in result.output


def test_info_names_the_file_for_an_unknown_scheme(tmp_path):
    path = _tiny(tmp_path)

    def edit(meta):
        tensors = json.loads(meta["tensors"])
        tensors["head.weight"]["scheme"] = "int3"
        meta["tensors"] = json.dumps(tensors)
    _rewrite_metadata(path, edit)
    result = CliRunner().invoke(cli.main, ["info", str(path)])
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and str(path) in lines[0] and "head.weight" in lines[0] and "int3" in lines[0], lines
    assert "Traceback" not in result.output
