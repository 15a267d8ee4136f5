"""Property tests: damaged checkpoints (bit flips, truncations, overwritten or inserted bytes, header edits) never
crash a reader, never make it allocate far beyond the file's size, and never yield a tensor of the wrong shape.
Each input either opens and loads with the declared shapes, or fails with a FormatError.

The examples are derandomized so CI is repeatable; for a longer local campaign set RWKV_LITE_FUZZ_EXAMPLES
(e.g. 20000) and HYPOTHESIS_SEED-free randomness with RWKV_LITE_FUZZ_RANDOM=1. Inputs that once broke a reader are
kept in tests/security/corpus/ and replayed by test_corpus_regressions."""
from __future__ import annotations

import json
import os
import struct
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from checkpoint_writers import RawTensor, save_pth, save_rwkv_cpp, save_safetensors
from rwkv_lite.errors import FormatError
from rwkv_lite.quantize.readers import open_checkpoint

EXAMPLES = int(os.environ.get("RWKV_LITE_FUZZ_EXAMPLES", "150"))
RANDOM = os.environ.get("RWKV_LITE_FUZZ_RANDOM") == "1"
CORPUS = Path(__file__).parent / "corpus"
ALLOC_SLACK = 8 << 20                 # bytes a reader may allocate beyond a few times the file size


def _small_state(seed=0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"emb.weight": rng.standard_normal((8, 32)).astype(np.float32),
            "blocks.0.att.time_decay": rng.standard_normal((2, 16)).astype(np.float32),
            "blocks.0.ln1.weight": rng.standard_normal(32).astype(np.float32),
            "head.weight": rng.standard_normal((8, 32)).astype(np.float32)}


@pytest.fixture(scope="module")
def seeds(tmp_path_factory) -> dict[str, bytes]:
    d = tmp_path_factory.mktemp("seeds")
    sd = _small_state()
    q = RawTensor("q5_1", (4, 32), bytes(np.random.default_rng(1).integers(0, 256, 4 * 24, dtype=np.uint8)))
    out = {
        "pth": save_pth(sd, d / "a.pth", dtype="bf16").read_bytes(),
        "safetensors": save_safetensors(sd, d / "a.safetensors", dtype="f16").read_bytes(),
        "rwkv_cpp": save_rwkv_cpp({**sd, "blocks.0.att.key.weight": q}, d / "a.bin", dtype="f16").read_bytes(),
    }
    return out


def check_reader(path: Path) -> None:
    """The property: FormatError, or every tensor loads as float32 with its declared shape."""
    size = path.stat().st_size
    tracemalloc.start()
    try:
        with open_checkpoint(path) as ckpt:
            for ref in ckpt.tensors.values():
                arr = ref.load()
                assert arr.dtype == np.float32 and arr.shape == ref.shape, ref
                if ref.shape:
                    rows = ref.load_rows(0, 1)
                    assert rows.shape == (min(1, ref.shape[0]),) + ref.shape[1:], ref
    except FormatError as e:
        assert "\n" not in str(e), str(e)
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert peak <= 8 * size + ALLOC_SLACK, f"peak allocation {peak} bytes for a {size}-byte file"


def mutate(data: bytes, draw) -> bytes:
    kind = draw(st.sampled_from(["truncate", "flip", "overwrite", "insert", "delete", "int32"]))
    n = len(data)
    if kind == "truncate":
        return data[:draw(st.integers(0, n - 1))]
    buf = bytearray(data)
    if kind == "flip":
        for _ in range(draw(st.integers(1, 8))):
            i = draw(st.integers(0, n - 1))
            buf[i] ^= 1 << draw(st.integers(0, 7))
        return bytes(buf)
    if kind == "overwrite":
        i = draw(st.integers(0, n - 1))
        chunk = draw(st.binary(min_size=1, max_size=16))
        buf[i:i + len(chunk)] = chunk
        return bytes(buf[:n]) if len(buf) > n else bytes(buf)
    if kind == "insert":
        i = draw(st.integers(0, n))
        return bytes(buf[:i]) + draw(st.binary(min_size=1, max_size=16)) + bytes(buf[i:])
    if kind == "delete":
        i = draw(st.integers(0, n - 1))
        return bytes(buf[:i]) + bytes(buf[i + draw(st.integers(1, 16)):])
    # int32: plant an interesting integer (0, -1, huge, small) at an aligned offset: headers are int fields
    i = draw(st.integers(0, max(0, n // 4 - 1))) * 4
    value = draw(st.sampled_from([0, 1, 2, 3, 31, 32, 33, 255, 1 << 16, 1 << 24, (1 << 31) - 1, 1 << 31,
                                  (1 << 32) - 1]))
    buf[i:i + 4] = struct.pack("<I", value)
    return bytes(buf)


def _settings():
    return settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=not RANDOM,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@pytest.mark.parametrize("fmt,suffix", [("pth", ".pth"), ("safetensors", ".safetensors"), ("rwkv_cpp", ".bin")])
def test_mutated_files_fail_cleanly(seeds, tmp_path_factory, fmt, suffix):
    work = tmp_path_factory.mktemp(f"fuzz-{fmt}") / f"m{suffix}"

    @_settings()
    @given(st.data())
    def run(data):
        work.write_bytes(mutate(seeds[fmt], data.draw))
        check_reader(work)
    run()


def test_safetensors_header_edits(seeds, tmp_path_factory):
    """Structured edits of the JSON header: wrong types, offsets, shapes, dtypes in every field."""
    data = seeds["safetensors"]
    (n,) = struct.unpack("<Q", data[:8])
    header, body = json.loads(data[8:8 + n]), data[8 + n:]
    names = sorted(header)
    work = tmp_path_factory.mktemp("fuzz-st-header") / "m.safetensors"
    values = st.one_of(st.integers(-3, 1 << 40), st.sampled_from(["F32", "BF16", "F16", "I8", "X", ""]),
                       st.lists(st.integers(-2, 1 << 33), max_size=4), st.none(), st.booleans(),
                       st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))

    @_settings()
    @given(st.sampled_from(names), st.sampled_from(["dtype", "shape", "data_offsets", "new"]), values)
    def run(name, field, value):
        edited = json.loads(json.dumps(header))
        if name == "__metadata__":
            edited[name] = value
        else:
            edited[name][field] = value
        raw = json.dumps(edited).encode()
        work.write_bytes(struct.pack("<Q", len(raw)) + raw + body)
        check_reader(work)
    run()


def test_corpus_regressions(tmp_path):
    """Inputs that once made a reader misbehave (kept as files: name suffix tells the format)."""
    files = sorted(CORPUS.glob("*"))
    assert files, f"regression corpus missing from {CORPUS}"
    for f in files:
        work = tmp_path / f.name
        work.write_bytes(f.read_bytes())
        check_reader(work)
