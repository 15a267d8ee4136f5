"""Resources: a model that cannot fit the machine's memory is refused from its file size alone, before the file is
opened or mapped, with one line that says what is needed and what is there; one that fits only in total memory
(not in what is free now) loads with a warning.

Sparse files stand in for huge models: their size is real (stat), their bytes are not on disk."""
from __future__ import annotations

import warnings

import pytest

import rwkv_lite
import rwkv_lite.model as model_module
from conftest import shared_file
from robustness_helpers import assert_one_line_error, cli
from rwkv_lite.errors import ResourceError

GiB = 1 << 30


def sparse_file(path, size: int):
    with open(path, "wb") as f:
        f.truncate(size)
    return path


@pytest.fixture
def never_mapped(monkeypatch):
    """Fail the test if a model file is opened for mapping."""
    def read_model_file(path):
        raise AssertionError(f"{path} was opened: the memory check must come first")
    monkeypatch.setattr(model_module, "read_model_file", read_model_file)


def test_memory_bytes_reads_this_machine():
    total, available = model_module.memory_bytes()
    assert total > 0 and 0 < available <= total


def test_model_larger_than_memory_is_refused_before_mapping(tmp_path, monkeypatch, never_mapped):
    monkeypatch.setattr(model_module, "memory_bytes", lambda: (16 * GiB, 12 * GiB))
    big = sparse_file(tmp_path / "eagle-7b-fp16.safetensors", 15 * GiB + GiB // 2 + 16 * GiB)
    with pytest.raises(ResourceError) as info:
        rwkv_lite.load(big)
    msg = str(info.value)
    assert "\n" not in msg
    assert msg == (f"{big}: the model needs 31.5 GiB but this machine has 16.0 GiB of memory; convert it with a "
                   f"smaller --quant (int8, int4)")


def test_the_real_machine_refuses_twice_its_memory(tmp_path):
    """End to end in a fresh process, with this machine's real /proc/meminfo."""
    total, _ = model_module.memory_bytes()
    big = sparse_file(tmp_path / "huge.safetensors", 2 * total)
    proc = cli("generate", big, "-p", "Hello", "-n", "1")
    assert_one_line_error(proc, str(big), f"needs {2 * total / GiB:.1f} GiB", f"has {total / GiB:.1f} GiB",
                          "smaller --quant")


def test_cli_refusal_is_one_line(tmp_path, monkeypatch, capsys, never_mapped):
    from rwkv_lite import cli as cli_module
    monkeypatch.setattr(model_module, "memory_bytes", lambda: (8 * GiB, 6 * GiB))
    big = sparse_file(tmp_path / "m.safetensors", 9 * GiB)
    with pytest.raises(SystemExit) as exit_info:
        cli_module.main(["generate", str(big), "-p", "Hello"], standalone_mode=True)
    assert exit_info.value.code == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: {big}: the model needs 9.0 GiB but this machine has 8.0 GiB of memory; convert it with a smaller "
        f"--quant (int8, int4)"]


def test_model_larger_than_free_memory_loads_with_a_warning(tmp_path, monkeypatch):
    tiny = rwkv_lite.convert(shared_file("rwkv-cpp-tiny", "tiny-rwkv-5v2-730K-FP32.bin"),
                             tmp_path / "tiny.safetensors", quant="int8")
    monkeypatch.setattr(model_module, "memory_bytes", lambda: (GiB, 1 << 16))
    with pytest.warns(UserWarning, match="larger than the memory available now .* expect it to run slowly"):
        model = rwkv_lite.load(tiny)
    logits, _ = model.forward([1])
    assert logits.shape == (256,)


def test_unknown_memory_does_not_block(tmp_path, monkeypatch):
    """Where /proc/meminfo is unreadable (0, 0), nothing is refused or warned about."""
    tiny = rwkv_lite.convert(shared_file("rwkv-cpp-tiny", "tiny-rwkv-5v2-730K-FP32.bin"),
                             tmp_path / "tiny.safetensors", quant="int8")
    monkeypatch.setattr(model_module, "memory_bytes", lambda: (0, 0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rwkv_lite.load(tiny).close()
