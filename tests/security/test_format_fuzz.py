"""Property tests of rwkv-lite's own model file (rwkv_lite/format.py, rwkv_lite/model.py) under damage.

The tiny real RWKV-5.2 model is converted to fp32, int8 and int4, then every example damages one file: random bit
flips, truncations, inserted/deleted/overwritten bytes, and structured edits of the safetensors header (dtype,
shape, offsets) and of the metadata (config numbers, per-tensor scheme/params/shape records, format fields,
checksums, tokenizer). The property, for every input:

* `rwkv_lite.load` raises an RwkvLiteError whose message is one line naming the file, or
* it loads; then the forward pass either runs with logits of shape (vocab_size,) and a state of the shapes the
  config implies, or raises NumericalError naming the layer (damaged weights may overflow); the embedded
  tokenizer is either built or refused with one line;
* never another exception, never a crash of the interpreter (faulthandler prints where, if one ever happens),
  never a hang (faulthandler ends the run after HANG_SECONDS), never an allocation far beyond the file's size.

Damage confined to the data section is not visible to `load` (it reads only the header): there the property is
that `verify` names exactly the damaged arrays and `load(verify=True)` refuses the file.

The examples are derandomized so CI is repeatable. For a longer local campaign use the readers' knobs:
RWKV_LITE_FUZZ_EXAMPLES=2000 (examples per test) and RWKV_LITE_FUZZ_RANDOM=1 (fresh random examples each run).
Inputs that once broke a check are kept in tests/security/corpus/model-*.safetensors (test_format_corpus.py).
"""
from __future__ import annotations

import faulthandler
import json
import os
import struct
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import rwkv_lite
from conftest import shared_file
from rwkv_lite.errors import FormatError, NumericalError, RwkvLiteError
from rwkv_lite.inspect import describe

EXAMPLES = int(os.environ.get("RWKV_LITE_FUZZ_EXAMPLES", "30"))
RANDOM = os.environ.get("RWKV_LITE_FUZZ_RANDOM") == "1"
QUANTS = ("fp32", "int8", "int4")
HANG_SECONDS = 120                    # one example takes ~20 ms; this only catches a real hang
ALLOC_SLACK = 32 << 20                # bytes one example may allocate beyond a few times the file's size


# ----------------------------------------------------------------------------------------------------------------
# The seed files and the property

@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matrices: a parallel kernel launch costs more than it saves, and far more on a busy CI machine."""
    from rwkv_lite.kernels.threads import get_threads, set_threads
    before = get_threads()
    set_threads(1)
    yield
    set_threads(before)


@pytest.fixture(scope="module")
def seeds(tmp_path_factory) -> dict[str, bytes]:
    """The tiny 5.2 model converted to each quantization (bytes), with the kernels warmed up (compiled or loaded
    from Numba's cache) outside the traced examples."""
    src = shared_file("rwkv-cpp-tiny", "tiny-rwkv-5v2-730K-FP32.bin")
    folder = tmp_path_factory.mktemp("format-seeds")
    out = {}
    for quant in QUANTS:
        path = rwkv_lite.convert(src, folder / f"tiny-{quant}.safetensors", quant=quant)
        model = rwkv_lite.load(path, verify=True)
        _, state = model.forward([1, 2])
        model.forward([3], state)
        out[quant] = path.read_bytes()
    return out


def split(data: bytes) -> tuple[dict, bytes]:
    """(header JSON, data section) of an intact file."""
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]), data[8 + n:]


def join(header: dict, body: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body


def expected_state_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    L, C = cfg["n_layer"], cfg["n_embd"]
    if str(cfg["version"]) == "4":
        return {name: (L, C) for name in ("att_x", "aa", "bb", "pp", "ffn_x")}
    H, N = cfg["n_head"], cfg["head_size"]
    return {"att_x": (L, C), "ffn_x": (L, C), "wkv": (L, H, N, N)}


def assert_one_line_naming(err: Exception, path: Path) -> None:
    msg = str(err)
    assert "\n" not in msg and msg.strip(), repr(msg)
    assert str(path) in msg, f"message does not name the file: {msg}"


def exercise(path: Path) -> str:
    """Load and run a (possibly damaged) model file; assert the property; return what happened."""
    try:
        description = describe(path)                 # `rwkv-lite info`: header only
        assert isinstance(description["config"], dict)
    except RwkvLiteError as e:
        assert_one_line_naming(e, path)
    try:
        model = rwkv_lite.load(path)
    except RwkvLiteError as e:
        assert_one_line_naming(e, path)
        return "refused"
    try:
        cfg = model.config
        V = cfg["vocab_size"]
        outcome = "ran"
        try:
            logits, state = model.forward([0, V - 1])            # sequence mode
            assert logits.shape == (V,) and logits.dtype == np.float32
            logits, state = model.forward([V // 2], state)        # one-token (GEMV) mode
            assert logits.shape == (V,) and logits.dtype == np.float32
            assert {k: a.shape for k, a in state.arrays.items()} == expected_state_shapes(cfg)
        except NumericalError as e:
            msg = str(e)
            assert "\n" not in msg and ("layer" in msg or "head" in msg), msg
            outcome = "numerical error"
        try:
            tokenizer = model.tokenizer
            if tokenizer is not None:
                assert all(0 <= i < V for i in tokenizer.encode("Hi"))
        except RwkvLiteError as e:
            assert_one_line_naming(e, path)
        try:
            model.verify()
        except FormatError as e:                 # e.g. the checksum record itself was damaged
            assert_one_line_naming(e, path)
        return outcome
    finally:
        model.close()


def check_model_file(path: Path) -> str:
    """`exercise` under a hang watchdog and an allocation bound."""
    size = path.stat().st_size
    faulthandler.dump_traceback_later(HANG_SECONDS, exit=True)
    tracemalloc.start()
    try:
        return exercise(path)
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        faulthandler.cancel_dump_traceback_later()
        assert peak <= 4 * size + ALLOC_SLACK, f"peak allocation {peak} bytes for a {size}-byte file"


class Workspace:
    """Writes each example to a fresh file (a new inode: a map still held by an earlier example never sees its
    file change under it) and counts outcomes for the report at the end of each test."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.n = 0
        self.outcomes: dict[str, int] = {}

    def check(self, data: bytes) -> str:
        path = self.folder / f"m{self.n}.safetensors"
        if self.n:
            (self.folder / f"m{self.n - 1}.safetensors").unlink(missing_ok=True)
        self.n += 1
        path.write_bytes(data)
        outcome = check_model_file(path)
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1
        return outcome


def _settings(share: float = 1.0):
    """Hypothesis settings; `share` scales the example count for tests that are run many times over."""
    return settings(max_examples=max(10, int(EXAMPLES * share)), deadline=None, database=None,
                    derandomize=not RANDOM,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                           HealthCheck.data_too_large])


# ----------------------------------------------------------------------------------------------------------------
# Byte-level damage

def damage(data: bytes, header_end: int, draw) -> bytes:
    """One random byte-level mutation; positions are drawn half the time inside the header, where they matter."""
    n = len(data)
    pos = st.one_of(st.integers(0, header_end - 1), st.integers(0, n - 1))
    kind = draw(st.sampled_from(["truncate", "flip", "overwrite", "insert", "delete", "length"]))
    if kind == "truncate":
        return data[:draw(pos)]
    buf = bytearray(data)
    if kind == "flip":
        for _ in range(draw(st.integers(1, 8))):
            buf[draw(pos)] ^= 1 << draw(st.integers(0, 7))
        return bytes(buf)
    if kind == "overwrite":
        i = draw(pos)
        chunk = draw(st.binary(min_size=1, max_size=16))
        buf[i:i + len(chunk)] = chunk
        return bytes(buf[:n])
    if kind == "insert":
        i = draw(pos)
        return data[:i] + draw(st.binary(min_size=1, max_size=16)) + data[i:]
    if kind == "delete":
        i = draw(pos)
        return data[:i] + data[i + draw(st.integers(1, 16)):]
    # the 8-byte header length itself: off by a little, or absurd
    (h,) = struct.unpack("<Q", data[:8])
    value = draw(st.sampled_from([0, 1, h - 1, h + 1, h + 64, n, n - 8, 1 << 32, (1 << 63) + h, (1 << 64) - 1]))
    return struct.pack("<Q", value % (1 << 64)) + data[8:]


@pytest.mark.parametrize("quant", QUANTS)
def test_random_damage(seeds, tmp_path, quant):
    data = seeds[quant]
    header_end = 8 + struct.unpack("<Q", data[:8])[0]
    ws = Workspace(tmp_path)

    @_settings()
    @given(st.data())
    def run(d):
        ws.check(damage(data, header_end, d.draw))
    run()
    assert ws.outcomes.get("refused", 0) > 0, ws.outcomes


def data_spans(data: bytes) -> dict[str, tuple[int, int]]:
    """Absolute byte spans of the real (non-padding) arrays of an intact file."""
    header, _ = split(data)
    start = 8 + struct.unpack("<Q", data[:8])[0]
    return {name: (start + info["data_offsets"][0], start + info["data_offsets"][1])
            for name, info in header.items() if name != "__metadata__" and not name.startswith("__pad.")}


@pytest.mark.parametrize("quant", QUANTS)
def test_flips_in_data_are_caught_by_verify(seeds, tmp_path, quant):
    """Flipped bits inside arrays: load (header only) succeeds, verify names exactly the damaged arrays, and
    load(verify=True) refuses the file naming it; running the damaged weights is still safe."""
    data = seeds[quant]
    spans = sorted((a, b, name) for name, (a, b) in data_spans(data).items() if b > a)
    ws = Workspace(tmp_path)

    @_settings(share=0.5)
    @given(st.lists(st.tuples(st.integers(0, len(spans) - 1), st.floats(0, 1, exclude_max=True),
                              st.integers(0, 7)), min_size=1, max_size=6, unique_by=lambda t: t[:2]))
    def run(flips):
        buf = bytearray(data)
        touched = set()
        for which, where, bit in flips:
            a, b, name = spans[which]
            buf[a + int(where * (b - a))] ^= 1 << bit
        for a, b, name in spans:
            if buf[a:b] != data[a:b]:
                touched.add(name)
        path = tmp_path / f"flipped{ws.n}.safetensors"
        ws.n += 1
        path.write_bytes(bytes(buf))
        model = rwkv_lite.load(path)
        try:
            assert sorted(model.verify()) == sorted(touched)
        finally:
            model.close()
        if touched:
            with pytest.raises(FormatError) as info:
                rwkv_lite.load(path, verify=True)
            assert_one_line_naming(info.value, path)
            assert any(repr(name) in str(info.value) for name in touched), str(info.value)
        check_model_file(path)
        path.unlink()
    run()


# ----------------------------------------------------------------------------------------------------------------
# Structured edits of the header and the metadata



def _containers(inner):
    return st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3))


ANY_JSON = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(-(1 << 70), 1 << 70), st.floats(),
                                  st.text(max_size=8)), _containers, max_leaves=8)
SAME_SIZE_DTYPES = {"F32": ["I32", "U32"], "I32": ["F32"], "U32": ["F32"], "F16": ["BF16", "U16", "I16"],
                    "U16": ["F16", "BF16", "I16"], "I8": ["U8"], "U8": ["I8"]}


def shape_variants(shape: list[int]):
    """Shapes a header or record could claim instead of `shape`: plausible (same count, swapped, halved,
    doubled, one dimension more or less) and absurd (2^40, negative, not a list)."""
    count = int(np.prod(shape)) if shape else 1
    options = [shape[::-1], shape[:-1], shape + [1], [count], [1] + shape, [d * 2 for d in shape],
               [max(d // 2, 1) for d in shape], [1 << 40] * max(len(shape), 1), [1 << 40, 0], [-1] + shape[1:],
               [float(d) for d in shape], [str(d) for d in shape], [], [0], None, count]
    if len(shape) == 2 and shape[0] % 2 == 0:
        options.append([shape[0] // 2, shape[1] * 2])
    if len(shape) == 1 and count % 8 == 0:
        options.append([8, count // 8])
    return st.sampled_from(options)


@pytest.mark.parametrize("quant", QUANTS)
def test_header_entry_edits(seeds, tmp_path, quant):
    """One array's safetensors entry changed: dtype, shape, offsets, name, or removed."""
    header, body = split(seeds[quant])
    names = sorted(n for n in header if n != "__metadata__")
    ws = Workspace(tmp_path)

    @_settings()
    @given(st.sampled_from(names), st.sampled_from(["dtype", "shape", "offsets", "rename", "remove", "alias"]),
           st.data())
    def run(name, field, d):
        h = json.loads(json.dumps(header))
        entry = h[name]
        if field == "dtype":
            entry["dtype"] = d.draw(st.sampled_from(SAME_SIZE_DTYPES.get(entry["dtype"], []) + ["F64", "X", 7]))
        elif field == "shape":
            entry["shape"] = d.draw(shape_variants(entry["shape"]))
        elif field == "offsets":
            a, b = entry["data_offsets"]
            delta = d.draw(st.sampled_from([1, -1, 4, -4, 64, len(body), 1 << 40]))
            entry["data_offsets"] = d.draw(st.sampled_from([[a + delta, b + delta], [a, b + delta], [a + delta, b],
                                                            [b, a], [a], [-a, b], [a, float(b)]]))
        elif field == "rename":
            h[d.draw(st.sampled_from([name + "x", "__pad.99", "blocks.99.ln1.weight", ""]))] = h.pop(name)
        elif field == "remove":
            del h[name]
        else:                                       # claim another array's bytes (same size where possible)
            other = h[d.draw(st.sampled_from(names))]
            entry.update(json.loads(json.dumps(other)))
        ws.check(join(h, body))
    run()
    assert ws.outcomes.get("refused", 0) > 0, ws.outcomes


def config_value(value):
    near = [value - 1, value + 1, value * 2, value // 2, 0, -1, -value] if isinstance(value, int) else []
    return st.one_of(st.sampled_from(near + [1, 1 << 31, 1 << 40, (1 << 63) + 1, 10 ** 30]),
                     st.sampled_from([None, True, 1.5, float("inf"), float("nan"), "64", "5.2", "4", "7", [64]]),
                     ANY_JSON)


@pytest.mark.parametrize("quant", QUANTS)
def test_config_edits(seeds, tmp_path, quant):
    """Config numbers changed (n_layer, n_embd, n_head, head_size, vocab_size, ffn_size, ln_x_eps, version, ...),
    removed, or added: a config that disagrees with the arrays must be refused at load."""
    header, body = split(seeds[quant])
    cfg = json.loads(header["__metadata__"]["config"])
    ws = Workspace(tmp_path)

    @_settings()
    @given(st.lists(st.sampled_from(sorted(cfg) + ["d_mix", "d_w"]), min_size=1, max_size=3, unique=True),
           st.data())
    def run(keys, d):
        h = json.loads(json.dumps(header))
        c = dict(cfg)
        for key in keys:
            if d.draw(st.integers(0, 9)) == 0:
                c.pop(key, None)
            else:
                c[key] = d.draw(config_value(cfg.get(key, 32)))
        h["__metadata__"]["config"] = json.dumps(c)
        outcome = ws.check(join(h, body))
        if outcome != "refused":         # a config that loads must describe these arrays
            for key in ("n_layer", "n_embd", "n_head", "head_size", "vocab_size"):
                assert c[key] == cfg[key], (key, c[key])
            assert c.get("ffn_size", cfg["ffn_size"]) == cfg["ffn_size"]
    run()
    assert ws.outcomes.get("refused", 0) > 0, ws.outcomes


def record_edit(record: dict, field: str, d) -> object:
    if field == "scheme":
        record["scheme"] = d.draw(st.sampled_from(["fp32", "fp16", "int8", "int4", "q4_0", "", None, 3]))
    elif field == "params":
        record["params"] = d.draw(st.sampled_from([{}, {"group": 32}, {"group": 64}, {"group": 128}, {"group": 16},
                                                   {"group": 0}, {"group": "32"}, {"group": True},
                                                   {"bits": 4}, [32], "x", None]))
    elif field == "shape":
        record["shape"] = d.draw(shape_variants(record["shape"]))
    elif field == "role":
        record["role"] = d.draw(st.sampled_from(["vector", "matrix", "embedding", "x", None]))
    elif field == "drop":
        record.pop(d.draw(st.sampled_from(sorted(record))))
    else:
        return d.draw(ANY_JSON)           # the record replaced by arbitrary JSON
    return record


@pytest.mark.parametrize("quant", QUANTS)
def test_tensor_record_edits(seeds, tmp_path, quant):
    """The metadata record of one tensor changed (scheme, params, shape, role), emptied or removed."""
    header, body = split(seeds[quant])
    tensors = json.loads(header["__metadata__"]["tensors"])
    ws = Workspace(tmp_path)

    @_settings()
    @given(st.sampled_from(sorted(tensors)),
           st.sampled_from(["scheme", "params", "shape", "role", "drop", "replace", "remove"]), st.data())
    def run(name, field, d):
        h = json.loads(json.dumps(header))
        t = json.loads(json.dumps(tensors))
        if field == "remove":
            del t[name]
        else:
            t[name] = record_edit(t[name], field, d)
        h["__metadata__"]["tensors"] = json.dumps(t)
        ws.check(join(h, body))
    run()
    assert ws.outcomes.get("refused", 0) > 0, ws.outcomes


@pytest.mark.parametrize("quant", ["fp32", "int4"])
def test_self_consistent_lies(seeds, tmp_path, quant):
    """The same false shape told by the header entry AND the metadata record (and sometimes the config): such
    files pass every local check, so only the model-level checks stand between them and the kernels."""
    header, body = split(seeds[quant])
    tensors = json.loads(header["__metadata__"]["tensors"])
    cfg = json.loads(header["__metadata__"]["config"])
    names = sorted(n for n in tensors if n in header)       # tensors stored as a single array (fp32 vectors, ...)
    ws = Workspace(tmp_path)

    @_settings()
    @given(st.sampled_from(names), st.data())
    def run(name, d):
        h = json.loads(json.dumps(header))
        t = json.loads(json.dumps(tensors))
        shape = h[name]["shape"]
        count = int(np.prod(shape))
        divisors = [k for k in (2, 4, 8, 16) if count % k == 0]
        new = d.draw(st.sampled_from([shape[::-1], [count]] + [[k, count // k] for k in divisors]
                                     + [[count // k, k] for k in divisors]))
        h[name]["shape"] = new
        t[name]["shape"] = new
        h["__metadata__"]["tensors"] = json.dumps(t)
        if d.draw(st.booleans()):            # re-split the heads to match a (H, N) decay lie
            c = dict(cfg)
            c["n_head"], c["head_size"] = (new[0], new[1]) if len(new) == 2 else (1, cfg["n_embd"])
            h["__metadata__"]["config"] = json.dumps(c)
        ws.check(join(h, body))
    run()


@pytest.mark.parametrize("key", ["format", "format_version", "kind", "checksums", "tokenizer", "provenance",
                                 "config", "tensors"])
def test_metadata_field_edits(seeds, tmp_path, key):
    """A top-level metadata field replaced by other text (valid JSON or not) or removed."""
    header, body = split(seeds["int8"])
    ws = Workspace(tmp_path)
    texts = st.one_of(st.sampled_from(["", "rwkv-lite", "0", "2", "1", "-1", "99999999999999999999", "null", "[]",
                                       "{}", '{"kind": "world"}', '{"kind": "hf"}', '{"kind": "bytes"}',
                                       '{"kind": "nope"}', '{"algorithm": "crc32", "arrays": {}}',
                                       '{"algorithm": "md5", "arrays": {}}', "model", "state", "[" * 5000,
                                       "1" * 5000, "{" * 20]),
                      st.text(max_size=20), ANY_JSON.map(json.dumps))

    @_settings(share=0.34)
    @given(texts, st.booleans())
    def run(text, remove):
        h = json.loads(json.dumps(header))
        if remove:
            h["__metadata__"].pop(key)
        else:
            h["__metadata__"][key] = text
        ws.check(join(h, body))
    run()


@pytest.mark.parametrize("fixture", ["tiny-rwkv-4v0-660K-FP32.bin", "tiny-rwkv-5v1-730K-FP32.bin",
                                     "tiny-rwkv-6v0-3m-Q5_1.bin", "tiny-rwkv-7v0-834K-FP32.bin"])
def test_config_numbers_off_by_one_in_every_version(tmp_path, fixture):
    """Every version's config number (n_layer, n_embd, n_head, head_size, vocab_size, ffn_size, the LoRA widths
    of 6 and 7, ...) one more, halved or removed: refused at load (a removed number the forward pass does not
    use may load, and must then run with correct shapes)."""
    path = rwkv_lite.convert(shared_file("rwkv-cpp-tiny", fixture), tmp_path / "m.safetensors", quant="fp32")
    header, body = split(path.read_bytes())
    cfg = json.loads(header["__metadata__"]["config"])
    ws = Workspace(tmp_path)
    for key, value in cfg.items():
        if not isinstance(value, int):
            continue
        for new in (value + 1, value // 2, None):
            c = {k: v for k, v in cfg.items() if k != key or new is not None}
            if new is not None:
                c[key] = new
            h = json.loads(json.dumps(header))
            h["__metadata__"]["config"] = json.dumps(c)
            outcome = ws.check(join(h, body))
            assert outcome == "refused" or (new is None and key in ("ffn_size", "d_mix", "d_decay", "d_w", "d_a",
                                                                    "d_v", "d_g")), (key, new, outcome)


def test_absurd_size_claims_are_refused_before_allocating(seeds, tmp_path):
    """Shapes of 2^40 elements claimed by the header, by a tensor record or by the config: each refused with its
    own message, and the whole load allocates less than a megabyte beyond the header's JSON."""
    header, body = split(seeds["int8"])
    emb = header["emb.weight"]

    def header_dimension(h):
        h["emb.weight"] = {**emb, "shape": [1 << 40, 64]}

    def header_span(h):
        h["emb.weight"] = {**emb, "shape": [1 << 39], "data_offsets": [0, 1 << 39]}

    def header_shape_only(h):
        h["emb.weight"] = {**emb, "shape": [1 << 39, 1 << 39]}

    def record_edit(h):
        t = json.loads(h["__metadata__"]["tensors"])
        t["emb.weight"]["shape"] = [1 << 40, 64]
        h["__metadata__"]["tensors"] = json.dumps(t)

    def config_edit(h):
        c = json.loads(h["__metadata__"]["config"])
        c.update(n_layer=1 << 40, head_size=1 << 40, n_head=1)
        h["__metadata__"]["config"] = json.dumps(c)

    cases = [(header_dimension, "'emb.weight' has an invalid shape or offsets"),
             (header_span, "spans bytes 0..549755813888 outside the data section"),
             (header_shape_only, f"dtype F16 x shape [{1 << 39}, {1 << 39}] needs {1 << 79}"),   # int8 files: emb fp16
             (record_edit, "has shape [1099511627776, 64] but the config implies [256, 64]"),
             (config_edit, "does not make n_embd=64")]
    for i, (edit, message) in enumerate(cases):
        h = json.loads(json.dumps(header))
        edit(h)
        path = tmp_path / f"absurd{i}.safetensors"
        path.write_bytes(join(h, body))
        tracemalloc.start()
        try:
            with pytest.raises(FormatError) as info:
                rwkv_lite.load(path)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert message in str(info.value) and str(path) in str(info.value), str(info.value)
        assert peak < (1 << 20) + 8 * len(json.dumps(h)), peak
