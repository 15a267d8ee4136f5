"""The model file and state files: valid safetensors, streamed/atomic writing, fp16 storage, state round trips,
and a converter that needs no torch."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import rwkv_lite
from rwkv_lite.format import ALIGN, ModelWriter, read_model_file
from checkpoint_writers import save_pth
from reference_models import SPECS_BY_NAME, make_state_dict, token_sequence


@pytest.fixture(scope="module")
def random_v52(tmp_path_factory):
    spec = SPECS_BY_NAME["v52_c"]
    sd = make_state_dict(spec)
    d = tmp_path_factory.mktemp("fmt")
    save_pth(sd, d / "m.pth")
    for q in ("fp32", "fp16"):
        rwkv_lite.convert(d / "m.pth", d / f"m-{q}.safetensors", q)
    return d, spec


def test_any_safetensors_reader_lists_and_loads_our_arrays(random_v52):
    from safetensors import safe_open
    d, _ = random_v52
    path = d / "m-fp32.safetensors"
    ours = read_model_file(path)
    with safe_open(str(path), framework="numpy") as f:
        keys = set(f.keys())
        assert set(ours.arrays) <= keys
        np.testing.assert_array_equal(f.get_tensor("head.weight"), ours.arrays["head.weight"])
        meta = f.metadata()
    assert meta["format"] == "rwkv-lite" and json.loads(meta["config"])["arch"] == "rwkv5.2"
    for name, (a, b) in ours.spans.items():
        assert a % ALIGN == 0, name                     # every array aligned for SIMD loads


def test_fp16_file_is_half_the_size_and_within_1e_2(random_v52):
    d, spec = random_v52
    f32, f16 = d / "m-fp32.safetensors", d / "m-fp16.safetensors"
    assert 0.45 < f16.stat().st_size / f32.stat().st_size < 0.56
    ids = token_sequence(spec)
    a, _ = rwkv_lite.load(f32).forward(ids, all_logits=True)
    b, _ = rwkv_lite.load(f16).forward(ids, all_logits=True)
    assert np.abs(a - b).max() <= 1e-2 * np.abs(a).max()


def test_state_save_load_continues_identically_and_copy_is_independent(random_v52, tmp_path):
    d, spec = random_v52
    model = rwkv_lite.load(d / "m-fp32.safetensors")
    ids = list(token_sequence(spec))
    _, state = model.forward(ids[:20])
    state.save(tmp_path / "s.state")
    loaded = rwkv_lite.State.load(tmp_path / "s.state")
    a, _ = model.forward(ids[20:30], state)
    b, _ = model.forward(ids[20:30], loaded)
    np.testing.assert_array_equal(a, b)
    copy = state.copy()
    before = {k: v.copy() for k, v in state.arrays.items()}
    model.forward(ids[30:40], copy)                      # forward never mutates its input ...
    copy.arrays["wkv"][:] = 7.0                          # ... and a copy shares no memory with the original
    for k, v in state.arrays.items():
        np.testing.assert_array_equal(v, before[k])


def test_writer_never_leaves_a_partial_file(tmp_path):
    dst = tmp_path / "out.safetensors"
    with pytest.raises(RuntimeError):
        with ModelWriter(dst, {"kind": "model", "config": {}, "tensors": {}}, [("a", np.float32, (4, 4))]) as w:
            w.append("a", np.zeros((2, 4), np.float32))
            raise RuntimeError("interrupted")
    assert not dst.exists()
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="not completely written"):
        with ModelWriter(dst, {"kind": "model", "config": {}, "tensors": {}}, [("a", np.float32, (4, 4))]) as w:
            w.append("a", np.zeros((2, 4), np.float32))
            w.close()
    assert list(tmp_path.iterdir()) == []


def test_converter_runs_with_torch_unimportable(random_v52, tmp_path):
    d, _ = random_v52
    code = ("import sys; sys.modules['torch'] = None\n"
            "import rwkv_lite\n"
            f"rwkv_lite.convert({str(d / 'm.pth')!r}, {str(tmp_path / 'x.safetensors')!r}, 'int8')\n"
            f"m = rwkv_lite.load({str(tmp_path / 'x.safetensors')!r}); m.forward([1, 2, 3])\n"
            "assert sys.modules['torch'] is None\n")
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "NUMBA_NUM_THREADS": "1"})
    assert (tmp_path / "x.safetensors").exists()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="page-cache advice and mincore are Linux")
def test_a_written_model_file_leaves_the_page_cache(tmp_path, monkeypatch):
    """A model-sized file is dropped from the page cache once written (so that its first reader caches it in large
    pieces, read sequentially); a small file (a saved state) stays cached."""
    import mmap
    from rwkv_lite import format as fmt
    from rwkv_lite.readahead import resident

    def cached_share(path):
        with open(path, "rb") as f:
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            pages = resident(np.frombuffer(mm, np.uint8).ctypes.data, len(mm))
        finally:
            mm.close()
        if pages is None:
            pytest.skip("mincore unavailable")
        return pages.mean()

    data = np.random.default_rng(0).integers(0, 255, size=(64, 65536), dtype=np.uint8)     # 4 MiB
    monkeypatch.setattr(fmt, "EVICT_WRITTEN_BYTES", 1 << 20)
    for name, evicted in (("big.safetensors", True), ("small.safetensors", False)):
        rows = data if evicted else data[:8]                   # 4 MiB, or 512 KiB (below the threshold)
        with ModelWriter(tmp_path / name, {"kind": "test"}, [("a", np.uint8, rows.shape)]) as w:
            w.append("a", rows)
            w.close()
        share = cached_share(tmp_path / name)
        if evicted:
            assert share < 0.5, f"{name}: {share:.0%} of its pages still cached"
        else:
            assert share > 0.5, f"{name}: only {share:.0%} of its pages cached"
